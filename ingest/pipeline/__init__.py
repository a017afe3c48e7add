"""The ingest pipeline: MQTT batch -> decode, dedup -> :mod:`ingest.pipeline.transform` (validate,
intervals, aggregates) -> sink -> confirm and acknowledge.

* :mod:`ingest.pipeline.transform` -- the pure per-batch part; no I/O, identical output for a
  redelivered batch given the same carried run state.
* :mod:`ingest.pipeline.worker` -- :class:`~ingest.pipeline.worker.IngestWorker`: intake
  overlapped with grouped, awaited sink writes; acks in arrival order, never before the data is
  durable; :func:`~ingest.pipeline.worker.run_worker` for ``amigw ingest``.
* durable state: :mod:`~ingest.pipeline.dedup` (processed (gateway, seq) keys),
  :mod:`~ingest.pipeline.state` (the run state of VEE-08/09/19 carried across batches),
  :mod:`~ingest.pipeline.loss` (the loss account), :mod:`~ingest.pipeline.deadletter` (what could
  not be stored, with its reason) and :mod:`~ingest.pipeline.replay` (putting it back).
"""
