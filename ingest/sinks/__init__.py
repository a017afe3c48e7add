"""Where results are stored: the seam (:mod:`~ingest.sinks.base`) and its InfluxDB
implementation (:mod:`~ingest.sinks.influx`)."""
