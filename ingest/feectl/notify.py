"""Customer notifications: a durable outbox in the ledger, delivered by pluggable notifiers.

Accepts the ledger's journal: every ``decision`` row whose kind is notified (:data:`SEVERITY`)
and every ``notice`` row (an area outage, planned :data:`OUTAGE_PLANNED` or detected
:data:`OUTAGE_DETECTED`) becomes one notification,
a JSON object (:func:`note_payload`) with a stable id ``<ledger id>-<journal seq>``. The outbox is
*derived* from the journal by a cursor (:meth:`Outbox.collect`): the notification rows, one
delivery row per notifier, and the cursor's move commit in one transaction. A decision and its
journal row commit together in the core, so a crash at any point loses nothing: whatever the
cursor had not passed is derived again, to the same ids, by the next process.

Delivery (:meth:`Outbox.deliver`) is per notifier and in outbox order (so in order per account):
each notifier's oldest pending row is sent, then marked ``sent``; a
:class:`TransientNotifyError` leaves it pending and retries it after an exponential back-off
(:func:`backoff_ms`), holding back that notifier's later rows only; a
:class:`PermanentNotifyError` marks it ``dead`` with its reason and moves on. A crash between a
send and its mark sends it again with the same id: at least once, and exactly once to a receiver
that de-duplicates by id.

Notifiers (:class:`Notifier`): :class:`MqttNotifier` (``ami/v1/agg/notifications``, QoS 1, the
PUBACK awaited) and :class:`WebhookNotifier` (HTTP POST, optionally HMAC-SHA256 signed).
Never raises from a notifier anything but :class:`NotifyError`; never logs per send.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from protocols import topics
from protocols.errors import AmigwError, TransportError

from ._log import kv
from .model import DecisionKind
from .store import JournalEntry, JournalKind, LedgerStore, OutboxRow

if TYPE_CHECKING:
    import aiohttp

    from .config import NotifySettings
    from .metrics import FeeControlMetrics

__all__ = [
    "OUTAGE_DETECTED",
    "OUTAGE_PLANNED",
    "SEVERITY",
    "MqttNotifier",
    "Note",
    "Notifier",
    "NotifyError",
    "Outbox",
    "PermanentNotifyError",
    "TransientNotifyError",
    "WebhookNotifier",
    "backoff_ms",
    "http_status_error",
    "note_payload",
    "notification_id",
    "signature",
]

log = logging.getLogger("amigw.feectl.notify")

NOTIFICATION_TYPE = "feectl-notification"
OUTAGE_PLANNED = "OUTAGE_PLANNED"  # the journal code of a planned-outage notice
OUTAGE_DETECTED = "OUTAGE_DETECTED"  # the journal code of a detected (OUT-02) area-outage notice
SIGNATURE_HEADER = "X-Amigw-Signature"
ID_HEADER = "X-Amigw-Notification-Id"
_COLLECT_BATCH = 500
_REASON_CHARS = 300

# kind -> (category, severity); kinds not here are not notified.
SEVERITY: dict[str, tuple[str, str]] = {
    DecisionKind.ALARM1: ("balance", "warning"),
    DecisionKind.ALARM2: ("balance", "warning"),
    DecisionKind.ZERO_NOTICE: ("balance", "critical"),
    DecisionKind.RECOVERED: ("balance", "info"),
    DecisionKind.RESTORE_DEFERRED: ("balance", "warning"),
    DecisionKind.TRIP_ISSUED: ("supply", "critical"),
    DecisionKind.RESTORE_ISSUED: ("supply", "info"),
    DecisionKind.RESTORE_CONFIRMED: ("supply", "info"),
    DecisionKind.FAILED: ("command", "warning"),
    DecisionKind.EXPIRED: ("command", "warning"),
    DecisionKind.UNCONFIRMED: ("command", "warning"),
    DecisionKind.COMMAND_FAILED: ("command", "critical"),
    DecisionKind.METER_IN_PROTECT: ("command", "critical"),
    OUTAGE_PLANNED: ("outage", "warning"),
    OUTAGE_DETECTED: ("outage", "critical"),
}


class NotifyError(AmigwError):
    """A notification was not delivered. ``reason`` is a short code (``http_503``, ``timeout``,
    ``connection``, ``mqtt``); ``detail`` says more."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class TransientNotifyError(NotifyError):
    """Worth retrying: the receiver is down, slow, overloaded (5xx, 408, 429) or unreachable."""


class PermanentNotifyError(NotifyError):
    """Retrying cannot help: the receiver refused this notification (4xx other than 408, 429)."""


@dataclass(frozen=True, slots=True)
class Note:
    """One notification as sent: its id, its account and its JSON bytes."""

    id: str
    account_id: str
    payload: bytes


class Notifier(Protocol):
    """A delivery channel. ``name`` labels its outbox rows and metrics and must stay the same
    across restarts (a renamed notifier is a new one)."""

    name: str

    async def send(self, note: Note) -> None:
        """Deliver one notification. Raises: TransientNotifyError, PermanentNotifyError."""

    async def aclose(self) -> None: ...


# -- pure rules -------------------------------------------------------------------------------------
def notification_id(ledger_id: str, seq: int) -> str:
    """The stable id of the notification derived from journal row ``seq`` of ledger ``ledger_id``."""
    return f"{ledger_id}-{seq}"


def note_payload(entry: JournalEntry, note_id: str) -> dict[str, Any] | None:
    """The JSON object sent for a journal row, or None when the row is not notified.

    Every notification has ``v, type, id, ts_ms, kind, category, severity, account, meter,
    reasons, balance_fen, actual_balance_fen, action, command_id``. ``ZERO_NOTICE`` adds
    ``trip_not_before_ms`` (the notice time plus the grace, FC-06) and ``overdraft_limit_fen``;
    ``OUTAGE_PLANNED`` adds ``outage: {area, start_ms, end_ms, reason}``; ``OUTAGE_DETECTED`` adds
    ``outage: {area, start_ms, end_ms: null, reason: "power_down_events", events}``.
    """
    if entry.kind not in (JournalKind.DECISION, JournalKind.NOTICE):
        return None
    cs = SEVERITY.get(entry.code)
    if cs is None:
        return None
    if entry.code == DecisionKind.RESTORE_DEFERRED and "BALANCE_NOT_ABOVE_RESTORE" not in entry.reasons:
        return None  # waiting for a command in flight or a retry is not news to the customer
    detail: Mapping[str, Any] = json.loads(entry.detail) if entry.detail else {}
    body: dict[str, Any] = {
        "v": 1,
        "type": NOTIFICATION_TYPE,
        "id": note_id,
        "ts_ms": entry.ts_ms,
        "kind": entry.code,
        "category": cs[0],
        "severity": cs[1],
        "account": entry.account_id,
        "meter": entry.meter,
        "reasons": list(entry.reasons),
        "balance_fen": detail.get("b"),
        "actual_balance_fen": detail.get("b_actual"),
        "action": detail.get("action"),
        "command_id": entry.ref if entry.kind is JournalKind.DECISION else None,
    }
    if entry.code == DecisionKind.ZERO_NOTICE:
        notice = detail.get("notice_ms")
        grace_ms = int(detail.get("grace_s", 0)) * 1000
        body["trip_not_before_ms"] = (entry.ts_ms if notice is None else int(notice)) + grace_ms
        body["overdraft_limit_fen"] = detail.get("L")
    if entry.code == OUTAGE_PLANNED:
        body["outage"] = {k: detail.get(k) for k in ("area", "start_ms", "end_ms", "reason")}
    elif entry.code == OUTAGE_DETECTED:
        body["outage"] = {k: detail.get(k) for k in ("area", "start_ms", "end_ms", "reason", "events")}
    return body


def http_status_error(status: int, detail: str = "") -> NotifyError | None:
    """How a webhook's answer is read: None for 2xx (delivered); transient for 408, 429, 5xx and
    anything else unexpected (1xx, 3xx); permanent for the other 4xx."""
    if 200 <= status < 300:
        return None
    reason = f"http_{status}"
    if 400 <= status < 500 and status not in (408, 429):
        return PermanentNotifyError(reason, detail)
    return TransientNotifyError(reason, detail)


def backoff_ms(attempts: int, initial_s: float, max_s: float) -> int:
    """The wait after the ``attempts``-th failed try in a row (1, 2, ...): ``initial_s`` doubled
    each time, at most ``max_s``."""
    if attempts < 1:
        raise ValueError("attempts: must be >= 1")
    return int(min(max_s, initial_s * 2 ** min(attempts - 1, 62)) * 1000)


def signature(secret: bytes, body: bytes) -> str:
    """The webhook signature header's value: ``sha256=<hex HMAC-SHA256 of the body>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


# -- notifiers --------------------------------------------------------------------------------------
class _Publisher(Protocol):
    async def publish(self, topic: str, payload: bytes) -> None: ...


class MqttNotifier:
    """Publishes on ``ami/v1/agg/notifications`` through the service's publisher (QoS 1; the
    publish resolves on the PUBACK). Every failure is transient."""

    name = "mqtt"

    def __init__(self, publisher: Callable[[], _Publisher | None]) -> None:
        self._publisher = publisher

    async def send(self, note: Note) -> None:
        pub = self._publisher()
        if pub is None:
            raise TransientNotifyError("mqtt", "no publisher yet")
        try:
            await pub.publish(topics.NOTIFICATIONS, note.payload)
        except TransportError as exc:
            raise TransientNotifyError("mqtt", str(exc)) from exc

    async def aclose(self) -> None:
        return None  # the publisher is the service's


class WebhookNotifier:
    """POSTs the JSON to ``url`` (``Content-Type: application/json``, the id in
    ``X-Amigw-Notification-Id``, and with a secret ``X-Amigw-Signature: sha256=<hex>``, the
    HMAC-SHA256 of the body). 2xx: delivered; :func:`http_status_error` classifies the rest; a
    timeout (``timeout_s``, the whole exchange) or a connection failure is transient."""

    def __init__(self, name: str, url: str, *, secret: bytes | None = None, timeout_s: float = 10.0) -> None:
        self.name = name
        self.url = url
        self._secret = secret
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def send(self, note: Note) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        headers = {"Content-Type": "application/json", ID_HEADER: note.id}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = signature(self._secret, note.payload)
        try:
            async with self._session.post(self.url, data=note.payload, headers=headers) as resp:
                status = resp.status
                text = (await resp.content.read(_REASON_CHARS)).decode("utf-8", "replace")
        except TimeoutError as exc:
            raise TransientNotifyError("timeout", f"no answer within {self._timeout_s} s") from exc
        except aiohttp.ClientError as exc:
            raise TransientNotifyError("connection", f"{type(exc).__name__}: {exc}") from exc
        err = http_status_error(status, text)
        if err is not None:
            raise err

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# -- the outbox -------------------------------------------------------------------------------------
class Outbox:
    """The notifications outbox over the ledger store, and delivery to each notifier.

    Every method but :meth:`deliver`, :meth:`deliver_all` and :meth:`aclose` is one short ledger
    transaction. Raises what the store raises (``sqlite3.OperationalError``)."""

    def __init__(
        self,
        store: LedgerStore,
        notifiers: Sequence[Notifier],
        settings: NotifySettings,
        metrics: FeeControlMetrics,
        clock: Callable[[], int],
    ) -> None:
        names = [n.name for n in notifiers]
        if len(set(names)) != len(names):
            raise ValueError(f"notifiers: duplicate name in {names}")
        self.store = store
        self.notifiers = tuple(notifiers)
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.counts: dict[str, dict[str, int]] = {n: {"sent": 0, "retry": 0, "dead": 0} for n in names}
        self._locks = {n: asyncio.Lock() for n in names}
        self._failing: set[str] = set()
        self._retired = False

    def collect(self) -> int:
        """Derive notifications from the journal rows after the cursor; returns how many."""
        names = [n.name for n in self.notifiers]
        added = 0
        with self.store.transaction():
            if not self._retired:
                dead = self.store.retire_notifiers(names, self.clock())
                if dead:
                    log.warning("deliveries to removed notifiers marked dead", extra=kv(count=dead))
                self._retired = True
            ledger, cursor = self.store.ledger_id(), self.store.notify_cursor()
            start = cursor
            while rows := self.store.notice_rows_after(cursor, _COLLECT_BATCH):
                for e in rows:
                    note_id = notification_id(ledger, e.seq)
                    body = note_payload(e, note_id)
                    if body is not None and names:
                        payload = json.dumps(body, separators=(",", ":")).encode()
                        self.store.add_notification(e.seq, note_id, e.ts_ms, e.account_id, payload, names)
                        added += 1
                cursor = rows[-1].seq
            if cursor != start:
                self.store.set_notify_cursor(cursor)
        if added:
            self._gauge()
        return added

    def pending(self) -> tuple[int, dict[str, int]]:
        """Notifications not yet delivered by every notifier, and pending deliveries per notifier."""
        with self.store.transaction():
            return self.store.pending_notifications(), self.store.pending_deliveries()

    def prune(self) -> int:
        """Remove notifications older than ``keep_days`` that nothing waits for."""
        before = self.clock() - int(self.settings.keep_days * 86_400_000)
        with self.store.transaction():
            return self.store.prune_notifications(before)

    def _gauge(self) -> None:
        _, per = self.pending()
        for n in self.notifiers:
            self.metrics.notifications_pending.labels(n.name).set(per.get(n.name, 0))

    async def deliver(self, notifier: Notifier) -> int | None:
        """Send ``notifier``'s pending notifications in order until none is left (None) or the
        head must wait: returns the time (ms) it may be tried again."""
        async with self._locks[notifier.name]:
            try:
                while True:
                    with self.store.transaction():
                        row = self.store.next_delivery(notifier.name)
                    if row is None:
                        return None
                    if row.next_ms > self.clock():
                        return row.next_ms
                    retry_ms = await self._send(notifier, row)
                    if retry_ms is not None:
                        return retry_ms
            finally:
                self._gauge()

    async def _send(self, notifier: Notifier, row: OutboxRow) -> int | None:
        """Try one delivery and record its outcome; the retry time when it must wait."""
        name = notifier.name
        try:
            await notifier.send(Note(row.note_id, row.account_id, row.payload))
        except PermanentNotifyError as exc:
            self._finish(name, row.seq, "dead", str(exc)[:_REASON_CHARS])
            log.warning("notification dead", extra=kv(notifier=name, id=row.note_id, reason=exc))
            return None
        except TransientNotifyError as exc:
            return self._retry(name, row.seq, row.attempts + 1, exc)
        self._finish(name, row.seq, "sent", None)
        if name in self._failing:
            self._failing.discard(name)
            log.info("notifier recovered", extra=kv(notifier=name))
        return None

    async def deliver_all(self) -> None:
        """:meth:`deliver` for every notifier at once (one's outage does not hold back another)."""
        await asyncio.gather(*(self.deliver(n) for n in self.notifiers))

    def _finish(self, name: str, seq: int, state: str, reason: str | None) -> None:
        with self.store.transaction():
            self.store.finish_delivery(name, seq, state, self.clock(), reason)
        self.counts[name][state] += 1
        self.metrics.notifications.labels(name, state).inc()

    def _retry(self, name: str, seq: int, attempts: int, exc: NotifyError) -> int:
        s = self.settings
        next_ms = self.clock() + backoff_ms(attempts, s.retry_initial_s, s.retry_max_s)
        with self.store.transaction():
            self.store.retry_delivery(name, seq, attempts, next_ms, str(exc)[:_REASON_CHARS])
        self.counts[name]["retry"] += 1
        self.metrics.notifications.labels(name, "retry").inc()
        fields = kv(notifier=name, reason=exc, attempts=attempts, retry_ms=next_ms)
        if name in self._failing:
            log.debug("notifier still failing", extra=fields)
        else:
            self._failing.add(name)
            log.error("notifier failing", extra=fields)
        return next_ms

    async def aclose(self) -> None:
        for n in self.notifiers:
            await n.aclose()
