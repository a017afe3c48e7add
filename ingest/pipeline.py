"""The head-end ingest pipeline: MQTT batch -> validate -> intervals -> line protocol -> InfluxDB.

Contract
--------
* :func:`transform` is pure: one decoded :class:`~protocols.payload.ReadingBatch` (plus the
  registry, the tariff calendar and the settings) in, a :class:`BatchOutput` (line protocol,
  interval records, daily partials, collapsed-voltage events) out. It reads nothing but the
  batch -- the first interval of each channel comes from the batch's own ``prev`` columns -- so
  a redelivered or replayed batch gives byte-identical output whatever arrived before it
  (DESIGN §6). Columns are wrapped with ``numpy.frombuffer``; no Python object per reading.
* :class:`IngestWorker` consumes one MQTT session (shared subscription) and, per message:
  decode (a bad payload is dead-lettered with its reason and acknowledged; nothing raises out of
  the loop) -> dedup by ``(gateway, seq)`` -> transform -> **awaited** sink write, retried with
  back-off for as long as InfluxDB is unavailable (never acknowledged meanwhile, so the bounded
  consumer queue and the broker's Receive Maximum stop intake) -> publish the batch's intervals
  and running daily TOU totals (QoS 1, PUBACK awaited) -> ``dedup.mark`` -> MQTT ack. A sink
  refusal that is not about lines (``SinkError(retryable=False)``) dead-letters the payload with
  the reason, then acks. Events are written to ``events``; power-down and collapsed-voltage
  events are correlated per area (OUT-02) into one ``alarms`` point per outage.
* Aggregates are published *before* the ack (the issue's order puts the ack first; that would
  lose the aggregates of a batch whose worker dies between the two). They are idempotent: every
  interval item is keyed by ``(meter, quantity, start_ms)`` and a redelivery republishes the same
  keys; daily items are running totals of ``(meter, day)`` (the item with more ``intervals``
  supersedes).
* :func:`query_completeness` answers "meter M, day D: 96 of 96 intervals, 0 duplicates, 2
  estimated" from InfluxDB (InfluxQL, ``/query``). ``docs/ingest.md`` documents the schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import random
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ingest import stages as st
from ingest.config import IngestConfig, load_calendar, load_registry
from ingest.deadletter import DeadLetterStore
from ingest.dedup import DedupStore
from ingest.metrics import IngestMetrics
from ingest.mqtt_consumer import Message, MqttConsumer
from ingest.registry import MeterRegistry
from ingest.sink import InfluxSink, SinkConfig, _HttpConnection, backoff_delay_s
from ingest.tariff_calendar import TariffCalendar
from protocols.aggregates import IntervalRecord
from protocols.errors import AmigwError, PayloadError, SinkError, TransportError
from protocols.flags import Flag
from protocols.payload import Event, ReadingBatch, decode, decode_event
from protocols.quantities import QUANTITIES

__all__ = [
    "BatchOutput",
    "InfluxQuery",
    "IngestWorker",
    "Settings",
    "query_completeness",
    "stored_tag",
    "transform",
]

log = logging.getLogger("amigw.ingest")

DAY_MS = 86_400_000
Q_ENERGY_TOTAL = 1
NOT_BILLABLE = int(Flag.SPIKE | Flag.WENT_BACKWARDS | Flag.METER_REPLACED)
_QNAME = {q.code: q.name for q in QUANTITIES}
_VOLTAGE = (30, 31, 32)  # voltage_a, _b, _c (consecutive codes, protocols.quantities)
_EPOCH = dt.date(1970, 1, 1)


# --------------------------------------------------------------------------------------------
# the pure part


@dataclass(frozen=True, slots=True)
class Settings:
    """What :func:`transform` needs besides the batch (built once per worker)."""

    registry: MeterRegistry
    calendar: TariffCalendar
    wide: bool = True
    interval_ms: int = 900_000
    max_gap_intervals: int = 8
    future_tol_ms: int = 300_000
    check_topic_gateway: bool = True

    @classmethod
    def from_config(cls, cfg: IngestConfig) -> Settings:
        p = cfg.pipeline
        return cls(
            load_registry(cfg),
            load_calendar(cfg),
            wide=p.schema == "wide",
            interval_ms=p.interval_s * 1000,
            max_gap_intervals=p.max_gap_intervals,
            future_tol_ms=p.future_tol_s * 1000,
            check_topic_gateway=p.check_topic_gateway,
        )


@dataclass(frozen=True, slots=True)
class BatchOutput:
    """Everything one batch becomes. ``lines`` holds every measurement's line protocol."""

    lines: bytes
    readings: int
    flags: npt.NDArray[np.uint16]
    iv: st.Intervals  # validated intervals, one row per (meter, quantity, end)
    meter_ids: tuple[str, ...]
    interval_ms: int
    daily_keys: list[tuple[str, int]]  # (meter id, local day start ms) touched by this batch
    outage_events: int  # collapsed-voltage events written (they feed the area-outage check)
    outage_ts: tuple[int, int] = (0, 0)

    @property
    def n_intervals(self) -> int:
        return int(self.iv.end_ts.shape[0])

    def interval_records(self) -> list[IntervalRecord]:
        """The intervals as :class:`IntervalRecord` objects (tests, tools; not the hot path)."""
        iv = self.iv
        cols = (
            iv.meter.tolist(),
            iv.quantity.tolist(),
            iv.end_ts.tolist(),
            iv.energy.tolist(),
            iv.flags.tolist(),
        )
        return [
            IntervalRecord(self.meter_ids[m], q, e - self.interval_ms, e, v, f)
            for m, q, e, v, f in zip(*cols, strict=True)
        ]

    def intervals_payload(self, gateway: str, batch_seq: int) -> bytes:
        """``protocols.aggregates.encode_intervals`` output, built without a dataclass per row
        (``asdict`` cost 20 µs an interval); a unit test checks the two agree."""
        iv, ims = self.iv, self.interval_ms
        names = [json.dumps(m, ensure_ascii=False) for m in self.meter_ids]
        cols = (
            iv.meter.tolist(),
            iv.quantity.tolist(),
            iv.end_ts.tolist(),
            iv.energy.tolist(),
            iv.flags.tolist(),
        )
        items = ",".join(
            f'{{"meter":{names[m]},"quantity":{q},"start_ms":{e - ims},"end_ms":{e},'
            f'"energy":{v},"flags":{f}}}'
            for m, q, e, v, f in zip(*cols, strict=True)
        )
        head = json.dumps({"v": 1, "type": "intervals", "gateway": gateway, "batch_seq": batch_seq},
                          ensure_ascii=False, separators=(",", ":"))  # fmt: skip
        return (head[:-1] + ',"intervals":[' + items + "]}").encode()


def _u(col: Any, dtype: Any) -> Any:
    return np.frombuffer(col, dtype=dtype) if len(col) else np.empty(0, dtype=dtype)


def columns(batch: ReadingBatch) -> tuple[st.Readings, st.PreviousRegisters]:
    """Wrap a decoded batch's columns without copying; check meter indices vectorised.

    Raises: PayloadError for an index outside the meter table or an empty id."""
    r = st.Readings(
        _u(batch.meter, np.uint32),
        _u(batch.ts, np.int64),
        _u(batch.quantity, np.uint16),
        _u(batch.value, np.int64),
        _u(batch.flags, np.uint16),
    )
    p = batch.prev
    prev = st.PreviousRegisters(
        _u(p.meter, np.uint32), _u(p.quantity, np.uint16), _u(p.value, np.int64), _u(p.ts, np.int64)
    )
    n = len(batch.meters)
    for name, col in (("meter", r.meter), ("prev.meter", prev.meter)):
        if col.shape[0] and int(col.max()) >= n:
            raise PayloadError(f"column {name!r}: index {int(col.max())} outside the {n}-entry meter table")
    if "" in batch.meters:
        raise PayloadError("empty meter id in the meter table")
    return r, prev


def stored_tag(text: str) -> str:
    """The tag value InfluxDB stores for ``text`` (``escape_tag`` minus line-protocol escapes)."""
    raw = st.escape_tag(text).decode("utf-8")
    return raw.replace("\\,", ",").replace("\\=", "=").replace("\\ ", " ")


def _field_str(text: str) -> bytes:
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").encode() + b'"'


def _subset(r: st.Readings, mask: npt.NDArray[np.bool_]) -> st.Readings:
    return st.Readings(r.meter[mask], r.ts[mask], r.quantity[mask], r.value[mask], r.flags[mask])


def _dedup_intervals(iv: st.Intervals) -> st.Intervals:
    """One row per (meter, quantity, end): the first (VEE-10, as the encoder does for readings)."""
    if iv.end_ts.shape[0] < 2:
        return iv
    _, _, first = st.group_labels(iv.meter.astype(np.int64), iv.quantity.astype(np.int64), iv.end_ts)
    if first.shape[0] == iv.end_ts.shape[0]:
        return iv
    return st.Intervals(
        iv.meter[first], iv.quantity[first], iv.end_ts[first], iv.energy[first], iv.flags[first]
    )


def transform(batch: ReadingBatch, s: Settings) -> BatchOutput:
    """The pure per-batch pipeline (see the module contract).

    Raises: PayloadError for what the decoder left to ingest (meter index, empty id)."""
    readings, prev = columns(batch)
    meters = s.registry.params(batch.meters)
    # The reference time of FUTURE_TIME is the batch's send time (bounded by now), not the
    # arrival time: a replay days later must flag exactly what the first delivery flagged.
    now_ms = time.time_ns() // 1_000_000
    ref_ms = min(batch.sent_ms, now_ms) if batch.sent_ms else now_ms
    params = st.ValidationParams(interval_ms=s.interval_ms, future_tol_ms=s.future_tol_ms)
    checked = st.validate_batch(readings, prev, meters, ref_ms, params)
    flags = checked.flags
    checked_r = st.Readings(readings.meter, readings.ts, readings.quantity, readings.value, flags)
    gw = batch.gateway
    tags = _Tags(batch.meters, gw)
    parts: list[bytes] = []
    dup = (flags & int(Flag.DUPLICATE)) != 0
    has_dup = bool(dup.any())
    main = _subset(checked_r, ~dup) if has_dup else checked_r
    parts.append(st.encode_lines(main, tags.table(b"meter_reading"), wide=s.wide))
    if has_dup:  # stored too, in their own series, so they never overwrite the first arrival
        dups = _subset(checked_r, dup)
        parts.append(st.encode_lines(dups, tags.table(b"reading_duplicate")))
    iv = st.aggregate_intervals(
        checked_r, checked, meters, interval_ms=s.interval_ms, max_gap_intervals=s.max_gap_intervals
    )
    iv = _dedup_intervals(iv)
    iv_r = st.Readings(iv.meter, iv.end_ts, iv.quantity, iv.energy, iv.flags)
    parts.append(st.encode_lines(iv_r, tags.table(b"intervals")))
    daily_lines, daily_keys = _daily_partials(iv, batch.meters, tags, s)
    parts.append(daily_lines)
    collapsed, span = _collapsed_voltage(checked_r, meters.un_dv, batch.meters, tags)
    parts.append(collapsed[0])
    return BatchOutput(
        b"".join(parts), len(readings), flags, iv, batch.meters, s.interval_ms, daily_keys, collapsed[1], span
    )


class _Tags:
    """Escaped tag values of one batch, escaped once (not once per measurement)."""

    def __init__(self, meter_ids: tuple[str, ...], gateway: str) -> None:
        self.meters = [st.escape_tag(m) for m in meter_ids]
        self.gateway = st.escape_tag(gateway)

    def table(self, measurement: bytes) -> st.LineTables:
        tail = b",gateway=" + self.gateway
        return st.LineTables(*st._table([measurement + b",meter=" + m + tail for m in self.meters]))


def _daily_partials(
    iv: st.Intervals, meter_ids: tuple[str, ...], tags: _Tags, s: Settings
) -> tuple[bytes, list[tuple[str, int]]]:
    """One ``daily_tou`` point per (meter, local day) of this batch's total-register intervals.

    The point's time is the start of the batch's first interval of that day: batches cover
    disjoint intervals, so partials never collide, a replay rewrites the same point, and the
    day's total is ``sum()`` over the day (see docs/ingest.md)."""
    sel = iv.quantity == Q_ENERGY_TOTAL
    if not sel.any():
        return b"", []
    iv1 = st.Intervals(iv.meter[sel], iv.quantity[sel], iv.end_ts[sel], iv.energy[sel], iv.flags[sel])
    off = s.calendar.utc_offset_ms
    tot = st.interval_totals(iv1, interval_ms=s.interval_ms, utc_offset_ms=off)
    tou = st.tou_split(iv1, s.calendar, interval_ms=s.interval_ms)
    day = (iv1.end_ts - s.interval_ms + off) // DAY_MS * DAY_MS - off
    labels, ng, _ = st.group_labels(iv1.meter.astype(np.int64), day)
    first_start = np.full(ng, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_start, labels, iv1.end_ts - s.interval_ms)
    gw_tag = tags.gateway
    lines = []
    keys = []
    for g in range(ng):
        m = int(tot.meter[g])
        day_start = int(tot.start_ts[g])
        local_day = _EPOCH + dt.timedelta(days=(day_start + off) // DAY_MS)
        c = tou.calendar[g]
        lines.append(
            b"daily_tou,meter=%s,gateway=%s day=\"%s\",total=%di,sharp=%di,peak=%di,flat=%di,valley=%di,"
            b"intervals=%di,estimated=%di,invalid=%di %d\n"
            % (
                tags.meters[m], gw_tag, local_day.isoformat().encode(), int(tot.energy[g]),
                int(c[0]), int(c[1]), int(c[2]), int(c[3]), int(tot.n_actual[g] + tot.n_estimated[g]),
                int(tot.n_estimated[g]), int(tot.n_invalid[g]), int(first_start[g]),
            )
        )  # fmt: skip
        keys.append((meter_ids[m], day_start))
    return b"".join(lines), keys


def _collapsed_voltage(
    r: st.Readings, un_dv: npt.NDArray[np.int64], meter_ids: tuple[str, ...], tags: _Tags
) -> tuple[tuple[bytes, int], tuple[int, int]]:
    """OUT-01 from readings: (meter, ts) points where every phase voltage read is below 60 % U_n
    become ``events`` points of kind ``voltage_collapsed`` (meters with a known rating only)."""
    sel = (r.quantity >= _VOLTAGE[0]) & (r.quantity <= _VOLTAGE[-1])
    if not sel.any():
        return (b"", 0), (0, 0)
    meter, ts, value = r.meter[sel].astype(np.int64), r.ts[sel], r.value[sel]
    un = un_dv[meter]
    low = (un > 0) & (value * 10 < un * 6)
    labels, ng, first = st.group_labels(meter, ts)
    n_all = np.bincount(labels, minlength=ng)
    n_low = np.bincount(labels, weights=low, minlength=ng).astype(np.int64)
    hit = np.flatnonzero((n_all == n_low) & (n_low > 0))
    if hit.shape[0] == 0:
        return (b"", 0), (0, 0)
    gw_tag = tags.gateway
    lines = []
    for g in hit.tolist():
        m, t = int(meter[first[g]]), int(ts[first[g]])
        lines.append(
            b'events,gateway=%s,meter=%s,kind=voltage_collapsed id=%s,detail="{}" %d\n'
            % (gw_tag, tags.meters[m], _field_str(f"vc-{meter_ids[m]}-{t}"), t)
        )
    span = (int(ts[first[hit]].min()), int(ts[first[hit]].max()))
    return (b"".join(lines), len(lines)), span


def event_line(ev: Event) -> bytes:
    """``events`` point of one edge event (tags gateway, meter, kind; fields id, detail JSON)."""
    tags = b"events,gateway=" + st.escape_tag(ev.gateway)
    if ev.meter:
        tags += b",meter=" + st.escape_tag(ev.meter)
    tags += b",kind=" + st.escape_tag(ev.kind)
    detail = json.dumps(ev.detail, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return tags + b" id=%s,detail=%s %d\n" % (_field_str(ev.id), _field_str(detail), ev.ts_ms)


# --------------------------------------------------------------------------------------------
# InfluxQL queries (read-after-write for running daily totals, outages, completeness)


def quote_str(text: str) -> str:
    """An InfluxQL single-quoted string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class InfluxQuery:
    """InfluxQL over HTTP ``/query`` (1.x; 2.x through its v1-compatibility endpoint and a DBRP
    mapping). Raises ``SinkError`` like the sink: retryable when unreachable or 5xx."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self._http = _HttpConnection(config.url, config.timeout_s, config.ca_file)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def rows(self, influxql: str) -> list[dict[str, Any]]:
        """Rows as ``{tag or column: value}``, times as epoch ms."""
        cfg = self.config
        params = {"db": cfg.bucket or cfg.database, "q": influxql, "epoch": "ms"}
        if cfg.retention_policy:
            params["rp"] = cfg.retention_policy
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if cfg.token:
            headers["Authorization"] = f"Token {cfg.token}"
        elif cfg.username is not None:
            params.update(u=cfg.username, p=cfg.password or "")
        resp = await self._http.request("POST", "/query", headers, urllib.parse.urlencode(params).encode())
        if resp.status >= 500:
            raise SinkError(f"influxdb query failed ({resp.status})", retryable=True, status=resp.status)
        try:
            doc = json.loads(resp.body or b"{}")
        except ValueError:
            doc = {}
        results = doc.get("results", []) if isinstance(doc, dict) else []
        errors = [r["error"] for r in results if isinstance(r, dict) and "error" in r]
        if resp.status // 100 != 2 or errors or "error" in doc:
            raise SinkError(f"influxql refused: {errors or doc}", retryable=False, status=resp.status)
        out = []
        for result in results:
            for series in result.get("series", ()):
                tags = series.get("tags") or {}
                out += [{**tags, **dict(zip(series["columns"], v, strict=True))} for v in series["values"]]
        return out


def _day_window(day: dt.date, utc_offset_ms: int) -> tuple[int, int]:
    start = (day - _EPOCH).days * DAY_MS - utc_offset_ms
    return start, start + DAY_MS


async def query_completeness(
    query: InfluxQuery,
    meter_id: str,
    day: dt.date,
    *,
    utc_offset_ms: int = 8 * 3_600_000,
    interval_ms: int = 900_000,
    quantity: str = "energy_fwd_active_total",
) -> st.DayCompleteness:
    """KPI-01 / VEE-13 for one meter-day from the ``intervals`` and ``reading_duplicate``
    measurements: intervals are end-labelled, so day D holds ``time > start AND time <= end``.

    Raises: SinkError (unreachable or refused)."""
    start, end = _day_window(day, utc_offset_ms)
    where = (
        f"meter = {quote_str(stored_tag(meter_id))} AND quantity = {quote_str(quantity)} "
        f"AND time > {start}ms AND time <= {end}ms"
    )
    rows = await query.rows(f'SELECT "flags" FROM "intervals" WHERE {where}')
    flags = np.array([int(r["flags"]) for r in rows], dtype=np.int64)
    bad = (flags & NOT_BILLABLE) != 0
    est = ~bad & ((flags & int(Flag.ESTIMATED)) != 0)
    dups = await query.rows(f'SELECT count("flags") FROM "reading_duplicate" WHERE {where}')
    n_dup = int(dups[0]["count"]) if dups else 0
    return st.DayCompleteness(
        meter_id, day, DAY_MS // interval_ms, int((~bad & ~est).sum()), int(est.sum()), int(bad.sum()), n_dup
    )


# --------------------------------------------------------------------------------------------
# aggregates publisher


class AggregatePublisher:
    """A paho client that publishes QoS 1 and awaits the PUBACK (its own connection, clean
    session). Raises TransportError when no PUBACK arrives within ``timeout_s``."""

    def __init__(self, cfg: IngestConfig, worker: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        m = cfg.mqtt
        self.timeout_s = m.publish_timeout_s
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{m.client_id}-{worker}-pub",
            protocol=mqtt.MQTTv5 if m.protocol == "5" else mqtt.MQTTv311,
        )
        if m.username is not None:
            self._client.username_pw_set(m.username, m.password)
        if urllib.parse.urlsplit(m.url).scheme == "mqtts":
            self._client.tls_set(ca_certs=m.ca_file)
        self._client.on_publish = self._on_publish
        self._client.max_inflight_messages_set(1000)
        self._lock = threading.Lock()
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._early: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        parts = urllib.parse.urlsplit(m.url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 1883

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client.connect_async(self._host, self._port)
        self._client.loop_start()

    async def aclose(self) -> None:
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)

    def _on_publish(self, _c: Any, _ud: Any, mid: int, _rc: Any, _props: Any) -> None:
        with self._lock:
            fut = self._waiting.pop(mid, None)
            if fut is None:
                self._early.add(mid)
        if fut is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Publish all, then await every PUBACK. Raises: TransportError on timeout."""
        assert self._loop is not None
        futs = []
        for topic, payload in items:
            fut: asyncio.Future[None] = self._loop.create_future()
            # Not under self._lock: paho calls on_publish holding its own mutex (lock order).
            info = self._client.publish(topic, payload, qos=1)
            with self._lock:
                if info.mid in self._early:
                    self._early.discard(info.mid)
                    fut.set_result(None)
                else:
                    self._waiting[info.mid] = fut
            futs.append(fut)
        try:
            async with asyncio.timeout(self.timeout_s):
                await asyncio.gather(*futs)
        except TimeoutError:
            raise TransportError(f"no PUBACK for aggregates within {self.timeout_s}s") from None


# --------------------------------------------------------------------------------------------
# the worker


@dataclass(slots=True)
class _Resources:
    sink: InfluxSink
    query: InfluxQuery
    dead_letter: DeadLetterStore
    dedup: DedupStore
    publisher: AggregatePublisher | None
    consumer: MqttConsumer | None = None
    extra: list[Any] = field(default_factory=list)


class IngestWorker:
    """One worker process's pipeline (see the module contract). ``await worker.run()`` until
    :meth:`stop`; ``handle(msg)`` is the per-message transaction, public for tests."""

    def __init__(self, cfg: IngestConfig, worker: int = 0, *, metrics: IngestMetrics | None = None) -> None:
        self.cfg = cfg
        self.worker = worker
        self.settings = Settings.from_config(cfg)
        self.metrics = metrics or IngestMetrics()
        self._rng = random.Random(worker)
        self._task: asyncio.Task[None] | None = None
        self._res: _Resources | None = None
        self.ready = asyncio.Event()

    def stop(self) -> None:
        """Stop consuming; an unfinished message stays unacknowledged (the broker redelivers it)."""
        if self._task is not None:
            self._task.cancel()

    def reload_registry(self) -> None:
        """Re-read the registry (SIGHUP); a bad file keeps the old one and raises ConfigError."""
        self.settings.registry.reload()

    async def run(self) -> None:
        self._task = asyncio.current_task()
        cfg = self.cfg
        dead = DeadLetterStore.from_config(cfg.dead_letter)
        dedup = DedupStore.from_config(cfg.dedup)
        sink = InfluxSink(cfg.influx, dead_letter=dead)
        publisher = None
        if cfg.pipeline.publish_intervals or cfg.pipeline.publish_daily:
            publisher = AggregatePublisher(cfg, self.worker)
        res = self._res = _Resources(sink, InfluxQuery(cfg.influx), dead, dedup, publisher)
        try:
            if publisher is not None:
                await publisher.connect()
            consumer = res.consumer = MqttConsumer(cfg.mqtt.consumer(self.worker))
            # Consume while connect() still waits for the SUBACK: a resumed session's backlog is
            # redelivered before it, and paho's thread blocks in on_message once queue_max
            # messages wait, so nobody draining the queue would hold the SUBACK back forever.
            # (connect() creates its queue before its first await.)
            connecting = asyncio.create_task(consumer.connect(), name=f"ingest-connect-{self.worker}")
            connecting.add_done_callback(lambda t: self._connected(t, consumer))
            await asyncio.sleep(0)
            try:
                async for msg in consumer:
                    self.metrics.queue_depth.set(consumer.queued)
                    await self.handle(msg)
                    self.metrics.unacked.set(consumer.stats.unacked)
                await connecting  # raises TransportError when the connection never came up
            finally:
                connecting.cancel()
                await consumer.aclose()
        except asyncio.CancelledError:
            pass
        finally:
            for closer in (sink.aclose, res.query.aclose, *((publisher.aclose,) if publisher else ())):
                with contextlib.suppress(Exception):
                    await closer()
            dead.close()
            dedup.close()

    def _connected(self, task: asyncio.Task[None], consumer: MqttConsumer) -> None:
        if not task.cancelled() and task.exception() is None:
            self.ready.set()
            log.info("ingest worker started worker=%d client_id=%s", self.worker, consumer.config.client_id)

    async def handle(self, msg: Message) -> None:
        """One message, start to ack. Retries in place while InfluxDB or the broker is unavailable
        (an unacknowledged message is not redelivered on a live session, so it must not be left)."""
        assert self._res is not None and self._res.consumer is not None
        attempt = 0
        while True:
            try:
                if msg.topic.endswith("/up/events"):
                    await self._event(msg)
                else:
                    await self._readings(msg)
                break
            except (TransportError, SinkError) as exc:
                if isinstance(exc, SinkError) and not exc.retryable:
                    self._dead_letter(msg, "influx refused", str(exc))
                    break
                attempt += 1
                self.metrics.sink_retries.inc()
                delay = backoff_delay_s(
                    attempt,
                    self.cfg.pipeline.retry_initial_s,
                    self.cfg.pipeline.retry_max_s,
                    self._rng.random() * 0.2,
                )
                log.debug(
                    "batch retry topic=%s attempt=%d delay_s=%.2f error=%s", msg.topic, attempt, delay, exc
                )
                await asyncio.sleep(delay)
        await self._res.consumer.ack(msg)

    def _dead_letter(self, msg: Message, reason: str, detail: str) -> None:
        assert self._res is not None
        self._res.dead_letter.put("payload", reason, msg.payload, msg.topic, detail=detail)
        self.metrics.dead_letters.labels(reason).inc()
        self.metrics.batches.labels("dead_lettered").inc()
        log.warning("payload dead-lettered topic=%r reason=%s detail=%.200s", msg.topic, reason, detail)

    async def _write(self, lines: bytes) -> None:
        """The sink write, retried (same lines) for as long as InfluxDB stays unavailable."""
        assert self._res is not None
        t0 = time.monotonic()
        attempt = 0
        while True:
            try:
                result = await self._res.sink.write(lines)
                break
            except SinkError as exc:
                if not exc.retryable:
                    raise
                attempt += 1
                self.metrics.sink_retries.inc()
                p = self.cfg.pipeline
                await asyncio.sleep(
                    backoff_delay_s(attempt, p.retry_initial_s, p.retry_max_s, self._rng.random() * 0.2)
                )
        self.metrics.sink_latency.observe(time.monotonic() - t0)
        if result.dead_lettered_lines:
            self.metrics.sink_lines_dead_lettered.inc(result.dead_lettered_lines)

    async def _readings(self, msg: Message) -> None:
        assert self._res is not None
        res = self._res
        try:
            batch = decode(msg.payload, check_meter_indices=False)
            if self.settings.check_topic_gateway and msg.topic != f"ami/v1/{batch.gateway}/up/readings":
                raise PayloadError(f"gateway {batch.gateway!r} does not match topic {msg.topic!r}")
            digest = hashlib.blake2b(msg.payload, digest_size=16).digest()
            if res.dedup.seen(batch.gateway, batch.seq, digest):
                self.metrics.batches.labels("duplicate").inc()
                return
            out = transform(batch, self.settings)
        except PayloadError as exc:
            self._dead_letter(msg, _reason(str(exc)), str(exc))
            return
        except (ValueError, TypeError, OverflowError) as exc:  # data the stages refuse: never crash
            self._dead_letter(msg, "rejected by pipeline", f"{type(exc).__name__}: {exc}")
            return
        await self._write(out.lines)
        await self._publish(batch, out)
        if out.outage_events:
            await self._outages(*out.outage_ts)
        res.dedup.mark(batch.gateway, batch.seq, digest)
        self.metrics.batches.labels("written").inc()
        self.metrics.readings.inc(out.readings)
        self.metrics.intervals.inc(out.n_intervals)
        self.metrics.count_flags(out.flags)

    async def _event(self, msg: Message) -> None:
        try:
            ev = decode_event(msg.payload)
            line = event_line(ev)
        except (PayloadError, ValueError) as exc:
            self._dead_letter(msg, "undecodable event", str(exc))
            return
        await self._write(line)
        self.metrics.events.labels(ev.kind).inc()
        if ev.kind == "power_down" and ev.meter:
            await self._outages(ev.ts_ms, ev.ts_ms)

    async def _publish(self, batch: ReadingBatch, out: BatchOutput) -> None:
        res, p = self._res, self.cfg.pipeline
        assert res is not None
        if res.publisher is None:
            return
        items = []
        if p.publish_intervals and out.n_intervals:
            items.append(
                (f"ami/v1/agg/intervals/{batch.gateway}", out.intervals_payload(batch.gateway, batch.seq))
            )
            self.metrics.published.labels("intervals").inc()
        if p.publish_daily and out.daily_keys:
            totals = await self._daily_totals(batch.gateway, out.daily_keys)
            if totals:
                items.append((f"ami/v1/agg/daily/{batch.gateway}", daily_payload(batch.gateway, totals)))
                self.metrics.published.labels("daily").inc()
        if items:
            await res.publisher.publish_many(items)

    async def _daily_totals(self, gateway: str, keys: list[tuple[str, int]]) -> list[tuple[Any, ...]]:
        """Running totals of the days this batch touched, read back after the write (InfluxDB is
        the shared state of all workers, so the last writer of a day publishes all of it)."""
        assert self._res is not None
        off = self.settings.calendar.utc_offset_ms
        lo = min(k[1] for k in keys)
        hi = max(k[1] for k in keys) + DAY_MS
        group_offset = (-off) % DAY_MS
        q = (
            'SELECT sum("total") AS total, sum("sharp") AS sharp, sum("peak") AS peak, sum("flat") AS flat, '
            'sum("valley") AS valley, sum("intervals") AS intervals, sum("estimated") AS estimated '
            f'FROM "daily_tou" WHERE gateway = {quote_str(stored_tag(gateway))} AND time >= {lo}ms '
            f"AND time < {hi}ms GROUP BY time(1d, {group_offset}ms), meter"
        )
        try:
            rows = await self._res.query.rows(q)
        except SinkError as exc:
            if exc.retryable:
                raise
            log.error("daily totals query refused error=%s", exc)
            return []
        wanted = {(stored_tag(m), d) for m, d in keys}
        totals = []
        for r in rows:
            if (r.get("meter"), r["time"]) not in wanted or r.get("total") is None:
                continue
            day = (_EPOCH + dt.timedelta(days=(r["time"] + off) // DAY_MS)).isoformat()
            meter = st.unescape_tag(r["meter"])
            keys_ = ("total", "sharp", "peak", "flat", "valley", "intervals", "estimated")
            totals.append((meter, day, *(int(r[k]) for k in keys_)))
        totals.sort()
        return totals

    async def _outages(self, t_lo: int, t_hi: int) -> None:
        """OUT-02 over every power-down-like event InfluxDB holds near [t_lo, t_hi] (all workers'),
        then one ``alarms`` point per outage: an alarm already open for the area within
        ``outage_hold_s`` is updated in place (same series and time), never duplicated."""
        assert self._res is not None
        p = self.cfg.pipeline
        win = p.outage_window_s * 1000
        rows = await self._res.query.rows(
            "SELECT \"id\" FROM \"events\" WHERE (kind = 'power_down' OR kind = 'voltage_collapsed') "
            f"AND time >= {t_lo - win}ms AND time <= {t_hi + win}ms GROUP BY meter"
        )
        rows = [r for r in rows if r.get("meter")]
        if not rows:
            return
        ids = sorted({st.unescape_tag(r["meter"]) for r in rows})
        index = {m: i for i, m in enumerate(ids)}
        reg = self.settings.registry
        params = reg.params(ids)
        ev_meter = np.array([index[st.unescape_tag(r["meter"])] for r in rows], dtype=np.uint32)
        ev_ts = np.array([int(r["time"]) for r in rows], dtype=np.int64)
        known = params.area[ev_meter] >= 0
        if not known.any():
            return
        out = st.area_outages(
            ev_meter[known], ev_ts[known], params, reg.area_sizes(),
            window_ms=win, k_min=p.outage_min_meters, pct=p.outage_pct,
        )  # fmt: skip
        for a in range(out.alarm_area.shape[0]):
            area = reg.areas[int(out.alarm_area[a])]
            await self._raise_alarm(area, int(out.alarm_ts[a]), int(out.alarm_events[a]))

    async def _raise_alarm(self, area: str, ts: int, events: int) -> None:
        assert self._res is not None
        hold = self.cfg.pipeline.outage_hold_s * 1000
        existing = await self._res.query.rows(
            f'SELECT "events" FROM "alarms" WHERE area = {quote_str(stored_tag(area))} '
            f"AND kind = 'area_outage' AND time >= {ts - hold}ms AND time <= {ts + hold}ms"
        )
        if existing:
            first = min(existing, key=lambda r: r["time"])
            ts, events = int(first["time"]), max(events, int(first["events"]))
            if events == int(first["events"]):
                return
        else:
            self.metrics.alarms.inc()
            log.warning("area outage alarm area=%s ts_ms=%d events=%d", area, ts, events)
        await self._write(
            b"alarms,area=%s,kind=area_outage events=%di %d\n" % (st.escape_tag(area), events, ts)
        )


def daily_payload(gateway: str, totals: Sequence[tuple[Any, ...]]) -> bytes:
    """``protocols.aggregates.encode_daily`` of ``DailyTotal(*row)`` rows, without ``asdict`` per
    row (a unit test checks the two agree)."""
    items = ",".join(
        f'{{"meter":{json.dumps(m, ensure_ascii=False)},"day":"{d}","total":{t},"sharp":{a},"peak":{b},'
        f'"flat":{c},"valley":{v},"intervals":{n},"estimated_intervals":{e}}}'
        for m, d, t, a, b, c, v, n, e in totals
    )
    head = json.dumps({"v": 1, "type": "daily", "gateway": gateway}, ensure_ascii=False,
                      separators=(",", ":"))  # fmt: skip
    return (head[:-1] + ',"days":[' + items + "]}").encode()


def _reason(message: str) -> str:
    """A low-cardinality dead-letter reason for a PayloadError message."""
    if "outside the" in message and "meter table" in message:
        return "meter index out of range"
    if "empty meter id" in message:
        return "empty meter id"
    if "does not match topic" in message:
        return "gateway does not match topic"
    return "undecodable"


async def run_worker(cfg: IngestConfig, worker: int = 0) -> None:
    """A worker until SIGTERM/SIGINT (SIGHUP reloads the registry). Metrics when configured."""
    import signal

    from ingest.metrics import serve

    w = IngestWorker(cfg, worker)
    if cfg.metrics_listen:
        serve(w.metrics, cfg.metrics_listen, worker)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, w.stop)

    def reload() -> None:
        try:
            w.reload_registry()
        except AmigwError as exc:
            log.error("registry reload failed, keeping the old one error=%s", exc)

    loop.add_signal_handler(signal.SIGHUP, reload)
    await w.run()
