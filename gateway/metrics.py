"""Prometheus metrics of the edge agent, on their own registry (no process-global state).

Counts and durations go here, not to log lines (STYLE H12). Served on ``metrics_listen`` by
:func:`serve`; ``metrics_listen = ""`` disables the endpoint (the counters still feed the
retained status message).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
        self.outbox_pending = Gauge("amigw_outbox_pending", "Messages waiting in the outbox", registry=r)
        self.outbox_pending_bytes = Gauge(
            "amigw_outbox_pending_bytes", "Bytes waiting in the outbox", registry=r
        )
        self.outbox_dropped = Gauge(
            "amigw_outbox_dropped", "Messages dropped by the outbox policy, by kind", ["kind"], registry=r
        )
        self.published = Counter("amigw_published_total", "Messages acknowledged by the broker", registry=r)
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


def serve(metrics: EdgeMetrics, listen: str) -> None:
    """Start the HTTP endpoint (a daemon thread inside prometheus_client)."""
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1", registry=metrics.registry)
