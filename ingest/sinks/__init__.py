"""Where results are stored: InfluxDB writes (:mod:`~ingest.sinks.influxdb`) and reads
(:mod:`~ingest.sinks.influxql`)."""
