"""The VictoriaMetrics sink: the readings and intervals in a VictoriaMetrics server or cluster
(InfluxDB line protocol in, ``/api/v1/export`` out), the records it cannot hold in InfluxDB
(:mod:`.sink`); its ``[victoriametrics]`` section (:mod:`.config`) and export reader
(:mod:`.export`). ``docs/victoriametrics.md`` says which store answers what."""
