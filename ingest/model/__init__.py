"""Domain data: the meter registry (:mod:`~ingest.model.registry`) and the tariff and time-of-use
model (:mod:`~ingest.model.tariff`)."""
