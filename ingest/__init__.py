"""Head-end ingest: MQTT consumer, numba kernels, InfluxDB sink, dead letters, dedup, fee control.

The I/O adapters are re-exported lazily (python-can's lazy registry idea), so importing one kernel
module does not import paho-mqtt or open anything:

* :class:`~ingest.mqtt_consumer.MqttConsumer` -- manual-ack, persistent-session MQTT consumer;
* :class:`~ingest.sink.InfluxSink` -- awaited, gzip line-protocol writes to InfluxDB 1.x / 2.x / 3.x;
* :class:`~ingest.deadletter.DeadLetterStore` -- undecodable payloads and rejected lines, bounded;
* :class:`~ingest.dedup.DedupStore` -- processed (gateway, seq) keys, bounded.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ConsumerConfig",
    "DeadLetterConfig",
    "DeadLetterStore",
    "DedupConfig",
    "DedupStore",
    "InfluxSink",
    "Message",
    "MqttConsumer",
    "SinkConfig",
    "WriteResult",
]

_LAZY = {
    "ConsumerConfig": "ingest.mqtt_consumer",
    "Message": "ingest.mqtt_consumer",
    "MqttConsumer": "ingest.mqtt_consumer",
    "DeadLetterConfig": "ingest.deadletter",
    "DeadLetterStore": "ingest.deadletter",
    "DedupConfig": "ingest.dedup",
    "DedupStore": "ingest.dedup",
    "InfluxSink": "ingest.sink",
    "SinkConfig": "ingest.sink",
    "WriteResult": "ingest.sink",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ingest' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
