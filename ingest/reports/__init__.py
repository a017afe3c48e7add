"""Jobs over stored data: the daily line-loss and collection report (:mod:`~ingest.reports.daily`)."""
