"""The InfluxDB sink: line protocol (:mod:`.lines`, :mod:`.kernels`), HTTP writes
(:mod:`.http`), InfluxQL reads (:mod:`.query`), and the :class:`~ingest.sinks.base.Sink` they
make together (:mod:`.sink`)."""
