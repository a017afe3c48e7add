"""Prometheus metrics of an ingest worker, on a private registry (no process-global state).

Counts and durations go here, not to log lines (STYLE H12). :func:`serve` starts the endpoint
(``metrics_listen``; worker ``i`` adds ``i`` to the port so that N workers on one host do not
collide). Nothing here decides anything: the pipeline only increments.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from protocols.flags import Flag

__all__ = ["IngestMetrics", "serve"]

_FLAG_BITS = tuple((int(f), f.name or str(int(f))) for f in Flag)


class IngestMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.batches = Counter(
            "amigw_ingest_batches_total",
            "Reading batches by outcome (written, duplicate, dead_lettered)",
            ["result"],
            registry=r,
        )
        self.readings = Counter("amigw_ingest_readings_total", "Readings written to InfluxDB", registry=r)
        self.intervals = Counter("amigw_ingest_intervals_total", "Interval rows written", registry=r)
        self.events = Counter("amigw_ingest_events_total", "Events written, by kind", ["kind"], registry=r)
        self.alarms = Counter("amigw_ingest_alarms_total", "Area-outage alarms raised", registry=r)
        self.dead_letters = Counter(
            "amigw_ingest_dead_letters_total", "Payloads dead-lettered, by reason", ["reason"], registry=r
        )
        self.flagged = Counter(
            "amigw_ingest_flagged_readings_total",
            "Readings with a quality flag set, by flag",
            ["flag"],
            registry=r,
        )
        self.sink_latency = Histogram(
            "amigw_ingest_sink_latency_seconds",
            "From a batch's first write attempt to InfluxDB's acceptance (retries included)",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 120, 600),
        )
        self.sink_retries = Counter(
            "amigw_ingest_sink_retries_total",
            "Whole-batch retries while InfluxDB was unavailable",
            registry=r,
        )
        self.sink_lines_dead_lettered = Counter(
            "amigw_ingest_sink_lines_dead_lettered_total",
            "Lines InfluxDB refused (dead-lettered)",
            registry=r,
        )
        self.sink_refused = Gauge(
            "amigw_ingest_sink_refused",
            "1 while InfluxDB refuses the worker (credentials, privileges, database or bucket), by reason",
            ["reason"],
            registry=r,
        )
        self.sink_refusals = Counter(
            "amigw_ingest_sink_refusals_total",
            "Writes and probes InfluxDB refused for a reason of ours (kept and retried), by reason",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "amigw_ingest_queue_depth",
            "Messages waiting in the consumer queue (set at intake and at every write retry)",
            registry=r,
        )
        self.unacked = Gauge(
            "amigw_ingest_unacked",
            "Messages received and not yet acknowledged (set at intake, ack and every write retry)",
            registry=r,
        )
        self.published = Counter(
            "amigw_ingest_aggregates_published_total",
            "Aggregate messages published, by topic kind",
            ["kind"],
            registry=r,
        )
        self.confirmations = Counter(
            "amigw_ingest_confirmations_total",
            "Confirmation messages published to gateways (each on its down/ack topic)",
            registry=r,
        )
        self.missing_batches = Gauge(
            "amigw_ingest_missing_batches",
            "Batches missing between the lowest and highest durable seq, over all gateways of this "
            "machine's loss store (every worker reports the same number)",
            registry=r,
        )
        self.seq_gap_alarms = Counter(
            "amigw_ingest_seq_gap_alarms_total",
            "seq_gap alarms raised: a gateway's batches missing longer than gap_alarm_s",
            registry=r,
        )
        self.rollups = Counter(
            "amigw_ingest_rollups_total",
            "Periods rolled up (their totals written once), by kind (hour, day)",
            ["kind"],
            registry=r,
        )
        self.rollup_failures = Counter(
            "amigw_ingest_rollup_failures_total",
            "Rollup attempts that failed (the periods stay owed and are tried again)",
            registry=r,
        )
        self.rollup_pending = Gauge(
            "amigw_ingest_rollup_pending",
            "Periods owed a rollup on this machine (touched by a batch since their last rollup)",
            registry=r,
        )
        self.state_retries = Counter(
            "amigw_ingest_state_retries_total",
            "Steps retried while the shared state database ([state] url) was unavailable",
            registry=r,
        )
        self.seq_resets = Counter(
            "amigw_ingest_seq_resets_total",
            "Gateways seen starting their sequence again (outbox wiped); their open gaps count as lost",
            registry=r,
        )

    def count_flags(self, flags: npt.NDArray[np.uint32]) -> None:
        """One vectorised count per flag bit present in the batch (most batches carry few bits;
        none per reading)."""
        if flags.shape[0] == 0:
            return
        present = int(np.bitwise_or.reduce(flags))
        for bit, name in _FLAG_BITS:
            if not present & bit:
                continue
            n = int(np.count_nonzero(flags & bit))
            if n:
                self.flagged.labels(name).inc(n)


def serve(metrics: IngestMetrics, listen: str, worker: int = 0) -> None:
    """Start the HTTP endpoint (a daemon thread inside prometheus_client) on port + worker."""
    host, _, port = listen.rpartition(":")
    start_http_server(int(port) + worker, addr=host or "127.0.0.1", registry=metrics.registry)
