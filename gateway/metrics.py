"""Prometheus metrics of the edge agent, on their own registry (no process-global state).

Counts and durations go here, not to log lines (STYLE H12). Served on ``metrics_listen`` by
:func:`serve`; ``metrics_listen = ""`` disables the endpoint (the counters still feed the
retained status message).

The outbox's gauges and counters are read from :meth:`Outbox.stats` at each scrape
(:meth:`EdgeMetrics.watch_outbox`), so they are current at every moment, during a broker or
head-end outage too, not only after a successful drain. Its counters are the outbox's own,
persisted across restarts (monotonic, as Prometheus counters must be).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.outbox import OutboxStats

__all__ = ["EdgeMetrics", "serve"]


class EdgeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.reads = Counter(
            "amigw_reads_total", "Meter reads attempted, by bus and result", ["bus", "result"], registry=r
        )
        self.read_failures = Counter(
            "amigw_read_failures_total", "Failed meter reads by cause", ["bus", "cause"], registry=r
        )
        self.bus_busy = Counter(
            "amigw_bus_busy_seconds_total",
            "Time each bus spent in transactions (rate() of it is the bus utilisation)",
            ["bus"],
            registry=r,
        )
        self.cycle_seconds = Histogram(
            "amigw_poll_cycle_seconds",
            "Duration of one poll cycle of a bus",
            ["bus"],
            registry=r,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        )
        self.success_rate = Gauge(
            "amigw_read_success_ratio", "Read success rate since start, per meter", ["meter"], registry=r
        )
        self.response_timeout = Gauge(
            "amigw_response_timeout_seconds",
            "Adaptive response timeout in force",
            ["bus", "meter"],
            registry=r,
        )
        self.published = Counter(
            "amigw_published_total", "Publishes acknowledged by the broker (re-sends included)", registry=r
        )
        self.acks_rejected = Counter(
            "amigw_acks_rejected_total",
            "Head-end confirmations ignored (invalid, other_gateway)",
            ["reason"],
            registry=r,
        )
        self.commands = Counter(
            "amigw_commands_total", "Downlink commands answered, by result status", ["status"], registry=r
        )
        self.command_errors = Counter(
            "amigw_command_errors_total",
            "Downlink commands answered rejected or failed, by reason",
            ["reason"],
            registry=r,
        )
        self.bus_up = Gauge(
            "amigw_bus_up", "1 while the bus is open, 0 while it is down", ["bus"], registry=r
        )
        self._outbox = _OutboxCollector()
        r.register(self._outbox)

    def watch_outbox(self, stats: Callable[[], OutboxStats | None]) -> None:
        """Serve the outbox metrics from ``stats()`` at each scrape (None: no outbox yet).
        ``stats`` runs on the HTTP server's thread: :meth:`Outbox.stats` reads only memory."""
        self._outbox.stats = stats


class _OutboxCollector(Collector):
    def __init__(self) -> None:
        self.stats: Callable[[], OutboxStats | None] = lambda: None

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        if s is None:
            return
        yield GaugeMetricFamily(
            "amigw_outbox_pending", "Messages stored in the outbox (unconfirmed ones included)", s.pending
        )
        yield GaugeMetricFamily("amigw_outbox_pending_bytes", "Bytes stored in the outbox", s.pending_bytes)
        yield GaugeMetricFamily(
            "amigw_outbox_unconfirmed",
            "Messages the broker acknowledged that wait for the head-end's confirmation",
            s.unconfirmed,
        )
        dropped = CounterMetricFamily(
            "amigw_outbox_dropped", "Messages dropped by the outbox policy, by kind", labels=["kind"]
        )
        for kind, n in s.dropped.items():
            dropped.add_metric([kind], n)
        yield dropped
        yield CounterMetricFamily(
            "amigw_outbox_confirmed",
            "Messages that left the outbox on the head-end's confirmation",
            s.confirmed,
        )
        yield CounterMetricFamily(
            "amigw_outbox_resent", "Re-sends of unconfirmed messages acknowledged by the broker", s.resent
        )


def serve(metrics: EdgeMetrics, listen: str) -> None:
    """Start the HTTP endpoint (a daemon thread inside prometheus_client)."""
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1", registry=metrics.registry)
