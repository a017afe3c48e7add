"""Prometheus metrics of the fee-control service, on a private registry (no process-global state).

The service and its payments API only increment these; nothing here decides anything.
:func:`serve` starts the endpoint on ``[service] metrics_listen`` (``host:port``; port 0 picks a
free one) and returns the server, so that the service can read its address and shut it down.

Counters (all ``_total``):

* ``amigw_feectl_messages_total{topic, result}``: MQTT messages by topic kind (``intervals``,
  ``cmd_result``, ``alarms``, ``other``) and result (``applied``, ``rejected``, ``ignored``, ``unpriced``);
* ``amigw_feectl_charges_total{status}``: intervals by charge status (``charged``,
  ``duplicate``, ``held``, ``trued_up``, ``superseded``, ``conflict``), ``not_billable`` (flagged
  with a ``NOT_BILLABLE`` bit: nothing charged) and ``skipped`` (another quantity, or a meter not
  under fee control);
* ``amigw_feectl_rejected_total{reason}``: messages and intervals rejected, by reason;
* ``amigw_feectl_decisions_total{kind}``: decisions taken (``TRIP_ISSUED``, ``RESTORE_ISSUED``,
  ``VERIFIED``, ...);
* ``amigw_feectl_commands_sent_total{action, attempt}``: trips and restores put on the wire
  (``attempt``: ``first`` or ``resend``);
* ``amigw_feectl_payments_total{result}``: ``recorded``, ``repeated`` (same id again), or the
  API's error code for a refused payment;
* ``amigw_feectl_notifications_total{notifier, result}``: deliveries by notifier (``mqtt``, or
  a webhook's name) and result (``sent``; ``retry``: a transient failure, tried again later;
  ``dead``: refused for good, kept with its reason);
* ``amigw_feectl_publish_failures_total``.

Gauges:

* ``amigw_feectl_notifications_pending{notifier}``: notifications in the outbox that the notifier
  has not delivered yet.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

__all__ = ["FeeControlMetrics", "serve"]


class FeeControlMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.messages = Counter(
            "amigw_feectl_messages_total",
            "MQTT messages by topic kind and result",
            ["topic", "result"],
            registry=r,
        )
        self.charges = Counter(
            "amigw_feectl_charges_total", "Intervals by charge status (or skipped)", ["status"], registry=r
        )
        self.rejected = Counter(
            "amigw_feectl_rejected_total",
            "Messages and intervals rejected, by reason",
            ["reason"],
            registry=r,
        )
        self.decisions = Counter(
            "amigw_feectl_decisions_total", "Decisions taken, by kind", ["kind"], registry=r
        )
        self.commands_sent = Counter(
            "amigw_feectl_commands_sent_total",
            "Relay commands published, by action and attempt (first, resend)",
            ["action", "attempt"],
            registry=r,
        )
        self.payments = Counter(
            "amigw_feectl_payments_total",
            "Payments by result (recorded, repeated, or the refusal's error code)",
            ["result"],
            registry=r,
        )
        self.notifications = Counter(
            "amigw_feectl_notifications_total",
            "Notification deliveries by notifier and result (sent, retry, dead)",
            ["notifier", "result"],
            registry=r,
        )
        self.notifications_pending = Gauge(
            "amigw_feectl_notifications_pending",
            "Notifications in the outbox not yet delivered, by notifier",
            ["notifier"],
            registry=r,
        )
        self.publish_failures = Counter(
            "amigw_feectl_publish_failures_total", "Publishes that failed (retried later)", registry=r
        )


def serve(metrics: FeeControlMetrics, listen: str) -> WSGIServer:
    """Start the HTTP endpoint (a daemon thread inside prometheus_client); ``host:port``."""
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=metrics.registry)
    return server
