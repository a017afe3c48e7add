"""The sink a configuration names: the one place that picks the implementation.

:func:`configured_sink` returns an :class:`~ingest.sinks.influx.sink.InfluxSink` on ``[influx]``,
or, with ``[victoriametrics] enabled = true``, a
:class:`~ingest.sinks.victoria.sink.VictoriaSink` on ``[victoriametrics]`` with its records in
``[influx]``. Both are async context managers. It connects to nothing until used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ingest.sinks.influx.sink import InfluxSink
from ingest.sinks.victoria.sink import VictoriaSink

if TYPE_CHECKING:
    from ingest.config import IngestConfig

__all__ = ["configured_sink"]


def configured_sink(cfg: IngestConfig) -> InfluxSink | VictoriaSink:
    """The pipeline's store for ``cfg`` (see the module contract)."""
    wide = cfg.pipeline.schema == "wide"
    records = InfluxSink(cfg.influx, wide=wide)
    if cfg.victoriametrics.enabled:
        return VictoriaSink(cfg.victoriametrics, records, wide=wide)
    return records
