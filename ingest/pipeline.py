"""The head-end ingest pipeline: MQTT batch -> validate -> intervals -> line protocol -> InfluxDB.

This module is the pipeline's public face; the parts live in three modules:

* :mod:`ingest.transform` -- the pure per-batch part (:func:`transform`, :class:`Settings`,
  :class:`BatchOutput`, the line and payload encoders); no I/O, byte-identical output for a
  redelivered batch.
* :mod:`ingest.worker` -- :class:`IngestWorker`: intake (decode, dedup, transform) overlapped with
  grouped, awaited InfluxDB writes, aggregates published before the ack, acks in arrival order
  and never before the data is durable; :func:`run_worker` for ``amigw ingest``.
* :mod:`ingest.influxql` -- InfluxQL reads (:class:`InfluxQuery`, :func:`query_completeness`).

``docs/ingest.md`` documents the flow, the schema and the decisions.
"""

from __future__ import annotations

from ingest.influxql import InfluxQuery, query_completeness, quote_str
from ingest.transform import BatchOutput, Settings, columns, daily_payload, event_line, stored_tag, transform
from ingest.worker import AggregatePublisher, IngestWorker, run_worker

__all__ = [
    "AggregatePublisher",
    "BatchOutput",
    "InfluxQuery",
    "IngestWorker",
    "Settings",
    "columns",
    "daily_payload",
    "event_line",
    "query_completeness",
    "quote_str",
    "run_worker",
    "stored_tag",
    "transform",
]
