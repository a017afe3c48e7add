"""The ingest worker: one MQTT session (shared subscription) -> transform -> sink -> aggregates -> ack.

Contract
--------
:class:`IngestWorker` consumes one MQTT session and never acknowledges a message before its data
is durable (the sink wrote it, or a record it can never accept sits in the dead-letter store). It
knows the store only through :class:`~ingest.sinks.base.Sink` (today
:class:`~ingest.sinks.influx.sink.InfluxSink`): it hands over columns and reads back values.

* **intake** (one task): per message, refuse one over ``max_payload_bytes`` (the consumer kept
  only a prefix), decode (a bad payload is dead-lettered with its reason, nothing raises out of
  the loop) -> dedup by ``(gateway, seq, digest)`` against the store *and* against the batches
  still in flight -> cut out the readings of meters bound to another gateway
  (:func:`~ingest.pipeline.transform.split_foreign`, dead-lettered as a batch of their own) ->
  :func:`~ingest.pipeline.transform.transform` of the rest. An event is dead-lettered when its gateway
  is not its topic's, its meter is bound to another gateway, or its time is outside the bounds.
  It takes a message only while fewer than ``queue_max`` taken messages wait for their ack (the
  *window*), so the pipeline's memory is bounded and a stalled sink stops intake (back-pressure,
  never loss).
* **commit** (up to ``COMMIT_SLOTS`` groups at once): whatever intake has ready, at most
  ``queue_max // COMMIT_SLOTS`` messages, becomes one group. A group's write (its batches' columns
  and events in one :class:`~ingest.sinks.base.Writes`) is prepared once
  (:meth:`~ingest.sinks.base.Sink.prepare`: encoded, cut, compressed) and sent until written
  through the one retry layer (:func:`~ingest.sinks.base.send_until_written`: back-off with
  jitter, ``Retry-After`` honoured) for as long as the store is unavailable; each retry posts only
  the bodies not yet accepted. The records the sink reports rejected are dead-lettered here, once
  (with the store's reason and message), the rest is written. Each commit step (VEE-21 shaping,
  the write, publishing and outage correlation) is retried on its own: a failing publish does not
  redo the write. Then the group's intervals are published (one message per batch, PUBACKs
  awaited), outages correlated (a new area-outage alarm is published on ``ami/v1/agg/alarms``,
  then written), ``dedup.mark`` per batch (with the ``(gateway, day)`` keys whose
  totals it changed, in the same transaction), and finally every message of the group is
  acknowledged. Right before the marks, the run state the group's batches carry out
  (VEE-08/09/19) is saved (:mod:`ingest.pipeline.state`: at once in the worker's copy, in the
  file at most once a second);
  each batch read its channels' carry at intake. While one group waits for the store the next is
  transformed and written on a second connection.
* **like days** (VEE-21, rare): a batch whose intervals spread a long gap flat (EST_FLAT) gets,
  at commit before its write, one sink read of the stored intervals of those gaps' meters in the
  like-day window (:func:`~ingest.rules.stages.like_day_window`), then is transformed again from
  its batch and intake carry with those like days, so its intervals (and the totals rolled up
  from them) follow the like-day shape (EST_HIST). A failing read is a sink error like a failing
  write: the shaping is retried with back-off (while replaying it raises), never written flat for
  want of the store. A batch without such gaps reads nothing.
* **rollups** (one task, :class:`~ingest.pipeline.rollup.RollupJob`): every ``rollup_check_s``
  the days that closed ``rollup_delay_s`` ago and are owed (durable in the dedup store) are
  rolled up from the stored intervals: one ``daily_tou`` row per meter and day and one
  ``hourly`` row per meter and hour of it, the daily totals published; what a crash interrupts
  is done by the next start.
* **acks in arrival order**: a group acknowledges only after the group before it did (MQTT
  3.1.1 and 5 §4.6 both require PUBACKs in the order the PUBLISHes arrived). A group that fails or
  is cancelled never releases the next one, so no ack ever overtakes an unacknowledged message.
* A sink refusal that is not about lines (:class:`~protocols.errors.SinkRefused`: credentials,
  privileges, unknown database or bucket) is *our* misconfiguration, never the data's fault: the
  group is kept and retried like an outage, nothing is dead-lettered or acknowledged, and the
  alarm is raised while it lasts (logged once per episode, the gauge
  ``amigw_ingest_sink_refused{reason}`` at 1, ``amigw_ingest_sink_refusals_total{reason}``
  counting every refusal). Once fixed, every batch
  lands exactly once (rewrites are idempotent, the dedup marks follow the write). Only records
  the store will never accept are dead-lettered (by the worker, the rest of the batch is written).
* **sink probe** (one task at start): :meth:`~ingest.sinks.base.Sink.probe` until the store
  accepts the worker (reachable, database or bucket present, credentials accepted; with
  ``create_database`` a missing v1 database is created). A failing probe raises the same alarm and
  is retried with back-off; the worker keeps running (the broker holds the messages).
* ``amigw_ingest_queue_depth`` and ``amigw_ingest_unacked`` are set at every intake and at every
  retry of a write, so they move while InfluxDB is down.
* **dead-letter replay** (:meth:`IngestWorker.replaying`, :meth:`IngestWorker.replay`): a
  dead-lettered payload goes through the same intake and commit code (decode, dedup, transform,
  write, publish, mark), without an MQTT session and giving up instead of waiting forever: a
  write is tried ``[influx] max_attempts`` times (a short outage does not stop the replay), any
  other step once.
* Intervals are published *before* the ack (acking first would lose them if the worker died in
  between), and the rollup obligation is durable before the ack; both are idempotent: interval
  items are keyed by ``(meter, quantity, start_ms)``, daily items are the totals of ``(meter,
  day)`` computed from the stored intervals (the shared state of all workers); a rollup after
  late data publishes the item again, with more ``intervals``.

Confirmations and loss accounting
---------------------------------
After a group's acks, every item whose outcome is final (written and dedup-marked, dead-lettered
with a reason, or a duplicate of a batch already durable, i.e. an edge's re-send after a lost
confirmation) and whose batch or event is known is confirmed to its gateway: per gateway one
:class:`protocols.acks.Ack` on ``ami/v1/{gw}/down/ack`` (QoS 1, not retained) with the seq ranges
and event ids. The gateway is the topic's (the one the broker's ACL authenticated); a batch naming
another gateway than its topic is never confirmed, so no gateway can clear another's outbox.
Before they are confirmed the batches are recorded in :class:`~ingest.pipeline.loss.LossStore` (a
recording that fails is not confirmed: the edge's re-send records it later); a dedup mark that
replaced another digest is a sequence reset there. A task updates ``amigw_ingest_missing_batches``
every ``LossConfig.check_s`` (``min(5 s, gap_alarm_s / 4)``) and raises the due
``seq_gap``/``seq_reset`` alarms (log line, counter, an alarm written to the sink), each claimed
by one worker of the machine.

Decision: confirmations are **not** awaited (no PUBACK wait, paho queues them through a
reconnect). Awaiting would add a round trip to every group and make the pipeline stall or fail
while the broker is briefly away, for nothing: a lost confirmation is repaired by the edge, which
re-sends an unconfirmed batch after its timeout; dedup recognises the re-send as a duplicate and
it is confirmed again. Confirming is idempotent and needs no state shared between workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ingest.config import IngestConfig
from ingest.metrics import IngestMetrics
from ingest.model.registry import MeterRegistry
from ingest.mqtt.consumer import ConsumerStats, Message, MqttConsumer
from ingest.mqtt.publisher import MqttPublisher
from ingest.pipeline.deadletter import DeadLetter, DeadLetterStore
from ingest.pipeline.dedup import DedupStore
from ingest.pipeline.loss import Alarm, LossStore
from ingest.pipeline.outages import AreaAlarmStore, Merge, OpenAlarm
from ingest.pipeline.rollup import RollupJob
from ingest.pipeline.state import RunStateStore
from ingest.pipeline.transform import BatchOutput, Settings, split_foreign, transform, warm_up
from ingest.rules import stages as st
from ingest.sinks.base import (
    AreaAlarm,
    OnFailure,
    RetryPolicy,
    Sink,
    WriteResult,
    Writes,
    retry_until_done,
    send_until_written,
)
from ingest.sinks.configured import configured_sink
from protocols import topics
from protocols.acks import MAX_EVENTS, MAX_RANGES, Ack, seq_ranges
from protocols.alarms import AreaOutage, check_area
from protocols.errors import (
    AmigwError,
    PayloadError,
    SinkError,
    SinkRefused,
    StateUnavailable,
    TransportError,
)
from protocols.flags import Flag
from protocols.payload import Event, ReadingBatch, decode, decode_event, encode

__all__ = ["COMMIT_SLOTS", "IngestWorker", "run_worker"]

log = logging.getLogger("amigw.ingest")

T = TypeVar("T")
COMMIT_SLOTS = 2  # groups in flight at once, each on its own sink connection
_STATE_ERRORS = (sqlite3.Error, StateUnavailable)  # a state store could not record or answer
_NOT_BOUND = "meter not bound to gateway"
_FINAL = frozenset({"written", "duplicate", "dead_lettered", "event"})  # outcomes a gateway is told
_ACK_EVENT_BYTES = 64 * 1024  # event ids per confirmation (with MAX_RANGES ranges: < MAX_ACK_BYTES)


@dataclass(slots=True)
class _Item:
    """One taken message on its way to the ack; it has something to write when it holds a
    transformed batch or an event (else it is a duplicate or dead-lettered at intake)."""

    msg: Message
    result: str  # written | duplicate | dead_lettered | event
    batch: ReadingBatch | None = None
    out: BatchOutput | None = None
    event: Event | None = None
    key: tuple[str, int, bytes] | None = None  # dedup key, marked after the write
    carry: st.RunCarry | None = None  # the run state ``out`` was transformed with
    shaped: bool = False  # VEE-21: ``out`` was transformed again with its like days
    refusal: tuple[str, str] | None = None  # dead_lettered: (reason, detail)

    @property
    def to_write(self) -> bool:
        return self.out is not None or self.event is not None


@dataclass(slots=True)
class _Resources:
    sinks: asyncio.Queue[Sink]  # one per commit slot; reads take one too
    dead_letter: DeadLetterStore
    dedup: DedupStore
    publisher: MqttPublisher | None
    consumer: MqttConsumer | None = None
    loss: LossStore | None = None
    state: RunStateStore | None = None
    alarms: AreaAlarmStore | None = None


class IngestWorker:
    """One worker process's pipeline (see the module contract). ``await worker.run()`` until
    :meth:`stop`."""

    def __init__(self, cfg: IngestConfig, worker: int = 0, *, metrics: IngestMetrics | None = None) -> None:
        self.cfg = cfg
        self.worker = worker
        self.settings = Settings.from_config(cfg)
        self.metrics = metrics or IngestMetrics()
        self._rng = random.Random(worker)
        self._task: asyncio.Task[None] | None = None
        self._res: _Resources | None = None
        self.ready = asyncio.Event()
        window = cfg.mqtt.queue_max
        self._window = asyncio.Semaphore(window)  # taken, not yet acknowledged messages
        self._group_max = max(1, window // COMMIT_SLOTS)
        self._slots = asyncio.Semaphore(COMMIT_SLOTS)
        self._items: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._in_flight: dict[tuple[str, int, bytes], int] = {}
        self._refused: str | None = None  # the reason the sink refuses us, while it does
        self._replaying = False  # replay: no new dead letters, writes give up instead of waiting

    def stop(self) -> None:
        """Stop consuming; unfinished messages stay unacknowledged (the broker redelivers them)."""
        if self._task is not None:
            self._task.cancel()

    def reload_registry(self) -> None:
        """Re-read the registry (SIGHUP); a bad file keeps the old one and raises ConfigError."""
        self.settings.registry.reload()

    async def run(self) -> None:
        """Raises: TransportError when the MQTT session cannot be set up or a subscription is refused."""
        self._task = asyncio.current_task()
        cfg = self.cfg
        try:
            async with self._resources(COMMIT_SLOTS, self.worker) as res:
                consumer = res.consumer = MqttConsumer(cfg.mqtt.consumer(self.worker))
                try:
                    await consumer.connect()
                    self.ready.set()
                    log.info(
                        "ingest worker started worker=%d client_id=%s", self.worker, consumer.config.client_id
                    )
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._probe_sink(), name=f"ingest-probe-{self.worker}")
                        tg.create_task(self._intake(consumer), name=f"ingest-intake-{self.worker}")
                        tg.create_task(self._commit_loop(), name=f"ingest-commit-{self.worker}")
                        tg.create_task(self._loss_loop(), name=f"ingest-loss-{self.worker}")
                        tg.create_task(self._state_loop(), name=f"ingest-state-{self.worker}")
                        job = self.rollup_job()
                        tg.create_task(
                            job.run(cfg.pipeline.rollup_check_s), name=f"ingest-rollup-{self.worker}"
                        )
                except BaseExceptionGroup as eg:  # one task failed: raise its error, not the group
                    raise eg.exceptions[0] from None
                finally:
                    await consumer.aclose()
        except asyncio.CancelledError:
            pass

    @contextlib.asynccontextmanager
    async def _resources(self, slots: int, publisher_id: int | str) -> AsyncIterator[_Resources]:
        """The worker's stores, ``slots`` sink connections and the publisher (client id
        ``<client_id>-<publisher_id>-pub``), opened for :meth:`run` and :meth:`replaying`, closed
        on the way out."""
        cfg, p = self.cfg, self.cfg.pipeline
        url = cfg.state.url
        dead, dedup, loss, state, alarms = await self._state(
            "open",
            lambda: (
                DeadLetterStore.from_config(cfg.dead_letter, url),
                DedupStore.from_config(cfg.dedup, url),
                LossStore.from_config(cfg.loss, url),
                RunStateStore(cfg.run_state_path, max_age_s=p.state_max_age_s, url=url),
                AreaAlarmStore(cfg.run_state_path, max_age_s=p.state_max_age_s, url=url),
            ),
        )
        sinks: asyncio.Queue[Sink] = asyncio.Queue()
        for _ in range(slots):
            sinks.put_nowait(configured_sink(cfg))
        publisher = None
        if p.publish_intervals or p.publish_daily or p.publish_alarms or p.confirm:
            publisher = MqttPublisher(cfg.mqtt, f"{cfg.mqtt.client_id}-{publisher_id}-pub")
        res = self._res = _Resources(sinks, dead, dedup, publisher, loss=loss, state=state, alarms=alarms)
        try:
            sample = warm_up(self.settings)
            for sink in _drain(sinks):
                sink.warm_up(sample)
                sinks.put_nowait(sink)
            if publisher is not None:
                await publisher.connect()
            yield res
        finally:
            closers = [s.aclose for s in _drain(sinks)]
            closers += [publisher.aclose] if publisher else []
            for closer in closers:
                with contextlib.suppress(Exception):
                    await closer()
            dead.close()
            dedup.close()
            loss.close()
            state.close()
            alarms.close()

    # -- intake ------------------------------------------------------------------------------

    async def _intake(self, consumer: MqttConsumer) -> None:
        while True:
            await self._window.acquire()
            try:
                msg = await anext(consumer)
            except StopAsyncIteration:
                self._items.put_nowait(None)
                return
            self._update_gauges()
            prepare = functools.partial(self._prepare, msg)
            self._items.put_nowait(await self._state("intake", prepare))
            await asyncio.sleep(0)  # let the committer start on it while the next is transformed

    def _prepare(self, msg: Message) -> _Item:
        """Decode, dedup and transform one message (CPU only; dead letters are committed here)."""
        if msg.oversize:  # only a prefix was kept (mqtt_consumer): refused before any decoding
            limit = self.cfg.mqtt.max_payload_bytes
            detail = f"{msg.oversize} bytes > max_payload_bytes {limit}; the first {len(msg.payload)} kept"
            return self._dead_letter(msg, "payload too large", detail)
        if msg.topic.endswith("/up/events"):
            return self._prepare_event(msg)
        assert self._res is not None
        try:
            batch = decode(msg.payload, check_meter_indices=False)
            if self.settings.check_topic_gateway and msg.topic != topics.readings(batch.gateway):
                raise PayloadError(f"gateway {batch.gateway!r} does not match topic {msg.topic!r}")
            key = (batch.gateway, batch.seq, hashlib.sha256(msg.payload).digest()[:16])
            # In flight counts as seen: its ack goes out after the original's, i.e. after its write.
            if key in self._in_flight or self._res.dedup.seen(*key):
                return _Item(msg, "duplicate", batch=batch)
            own, foreign = split_foreign(batch, self.settings)
            if foreign is not None:
                self._dead_letter_foreign(msg, foreign)
                if not len(own) and not len(own.prev):
                    return _Item(msg, "dead_lettered", batch=batch)
            state = self._res.state
            carry = state.carry(own.gateway, own.meters) if state is not None else None
            out = transform(own, self.settings, carry)
        except PayloadError as exc:
            return self._dead_letter(msg, _reason(str(exc)), str(exc))
        except (ValueError, TypeError, OverflowError) as exc:  # data the stages refuse: never crash
            return self._dead_letter(msg, "rejected by pipeline", f"{type(exc).__name__}: {exc}")
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        return _Item(msg, "written", own, out, key=key, carry=carry)

    def _prepare_event(self, msg: Message) -> _Item:
        """Decode one event and check it against its topic, the registry's binding of its meter
        and the time bounds; a refused event is dead-lettered with the reason."""
        try:
            ev = decode_event(msg.payload)
            if not ev.gateway:
                raise PayloadError("event: empty gateway")
        except (PayloadError, ValueError) as exc:
            return self._dead_letter(msg, "undecodable event", str(exc))
        s = self.settings
        bound = s.registry.bound_gateway(ev.meter) if ev.meter else None
        latest = time.time_ns() // 1_000_000 + s.future_tol_ms
        if s.check_topic_gateway and msg.topic != topics.events(ev.gateway):
            detail = f"gateway {ev.gateway!r} does not match topic {msg.topic!r}"
            return self._dead_letter(msg, "gateway does not match topic", detail)
        if bound is not None and bound != ev.gateway:
            return self._dead_letter(
                msg, _NOT_BOUND, f"meter {ev.meter!r} is bound to {bound!r}, not to {ev.gateway!r}"
            )
        if not s.min_ts_ms <= ev.ts_ms <= latest:
            detail = f"ts_ms {ev.ts_ms} outside [{s.min_ts_ms}, now + future_tol_s]"
            return self._dead_letter(msg, "event time out of bounds", detail)
        return _Item(msg, "event", event=ev)

    def _dead_letter_foreign(self, msg: Message, foreign: ReadingBatch) -> None:
        """Dead-letter the readings of meters bound to other gateways, as a batch of their own
        (replayable once the registry is corrected); the rest of the message goes on."""
        table = self.settings.registry.params(foreign.meters)
        mask = self.settings.registry.foreign(table, foreign.gateway)
        names = [m for m, f in zip(foreign.meters, mask.tolist(), strict=True) if f]  # per meter, not reading
        detail = f"{len(foreign)} readings of {len(names)} meters bound to other gateways: {', '.join(names)}"
        # v2: every flag bit survives (ingest reads both versions; a v1 batch had none above 15)
        self._dead_letter(msg, _NOT_BOUND, detail, payload=encode(foreign, version=2))

    def _dead_letter(self, msg: Message, reason: str, detail: str, *, payload: bytes | None = None) -> _Item:
        """Store ``payload`` (default: the message's) with the reason, count and log it once."""
        assert self._res is not None
        if not self._replaying:  # a replay keeps the entry it took and records the new reason
            body = msg.payload if payload is None else payload
            self._res.dead_letter.put("payload", reason, body, msg.topic, detail=detail)
        self.metrics.dead_letters.labels(reason).inc()
        log.warning("payload dead-lettered topic=%r reason=%s detail=%.200s", msg.topic, reason, detail)
        return _Item(msg, "dead_lettered", refusal=(reason, detail))

    # -- commit ------------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        prev: asyncio.Future[None] | None = None
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            ended = False
            while not ended:
                await self._slots.acquire()
                first = await self._items.get()
                if first is None:
                    return
                group = [first]
                while len(group) < self._group_max and not self._items.empty():
                    item = self._items.get_nowait()
                    if item is None:
                        ended = True
                        break
                    group.append(item)
                done: asyncio.Future[None] = loop.create_future()
                tg.create_task(self._commit(group, prev, done), name=f"ingest-group-{self.worker}")
                prev = done

    async def _commit(
        self, group: list[_Item], prev: asyncio.Future[None] | None, done: asyncio.Future[None]
    ) -> None:
        """Write, publish, mark and ack one group (see the module contract)."""
        try:
            writes = [it for it in group if it.to_write]
            if writes:
                await self._durable(writes)
            if prev is not None:
                await prev  # acks in arrival order
            await self._ack(group)
            done.set_result(None)
        finally:
            if not done.done():
                done.cancel()  # never let a later group ack past this one
            self._slots.release()

    async def _durable(self, writes: list[_Item]) -> None:
        """Shape, write, publish: each step retried on its own while the sink or the broker is
        unavailable or the sink refuses us (a failing publish does not redo the write): an
        unacknowledged message is not redelivered on a live session, and nothing is
        dead-lettered for our own misconfiguration.

        Raises (only while replaying, instead of waiting): TransportError, SinkError."""
        once = RetryPolicy(1, 1, attempts=1)  # while replaying: raise, do not wait
        policy = once if self._replaying else self._retry_policy()
        failed = self._failure_callback(len(writes))

        async def retried(step: Callable[[], Awaitable[None]]) -> None:
            # any sink error: a refused like-day read is retried too, never written flat
            await retry_until_done(
                step, policy, retry_on=(TransportError, SinkError), give_up=lambda _exc: False,
                on_failure=failed, rng=self._rng,
            )  # fmt: skip

        await retried(lambda: self._shape_long_gaps(writes))
        batches = [it.out.columns for it in writes if it.out is not None]
        await self._write(Writes(batches, [it.event for it in writes if it.event is not None]), len(writes))
        await retried(lambda: self._after_write(writes))

    def _retry_policy(self) -> RetryPolicy:
        """The commit's retry: forever, ``[pipeline] retry_initial_s``/``retry_max_s``."""
        p = self.cfg.pipeline
        cap_s = self.cfg.influx.retry_after_max_s
        return RetryPolicy(p.retry_initial_s, p.retry_max_s, retry_after_max_s=cap_s)

    def _failure_callback(self, messages: int) -> OnFailure:
        """What every failed step of a group of ``messages`` does: the refusal alarm, the retries
        counter, the gauges (so they move while InfluxDB is down), a debug line."""

        def failed(exc: Exception, attempt: int, delay_s: float | None) -> None:
            if isinstance(exc, SinkError):
                self._sink_failed(exc)
            if delay_s is None:
                return
            self.metrics.sink_retries.inc()
            self._update_gauges()
            log.debug(
                "group retry messages=%d attempt=%d delay_s=%.2f error=%s", messages, attempt, delay_s, exc
            )

        return failed

    async def _shape_long_gaps(self, writes: list[_Item]) -> None:
        """VEE-21: transform again, with their like days read from the sink (one read per batch),
        the batches whose intervals spread a long gap flat (see the module contract).

        Raises: SinkError (the read failed; the caller retries the group)."""
        todo = [it for it in writes if it.out is not None and not it.shaped and it.out.flat_gaps]
        if not todo:
            return
        assert self._res is not None
        sink = await self._res.sinks.get()
        try:
            for it in todo:
                assert it.out is not None and it.batch is not None
                iv = it.out.iv
                flat = (iv.flags & np.uint32(Flag.EST_FLAT)) != 0
                start, end = st.like_day_window(iv, self.settings.interval_ms)
                index = {m: i for i, m in enumerate(it.out.meter_ids)}
                meters = [it.out.meter_ids[m] for m in np.unique(iv.meter[flat]).tolist()]
                quantities = np.unique(iv.quantity[flat]).tolist()
                stored = await sink.day_intervals(start, end, quantities, meters=meters)
                to_batch = np.array([index.get(m, -1) for m in stored.meters], np.int64)
                rows = to_batch[stored.meter.astype(np.int64)] >= 0 if len(stored) else np.zeros(0, np.bool_)
                like = st.Intervals(
                    to_batch[stored.meter[rows].astype(np.int64)].astype(np.uint32), stored.quantity[rows],
                    stored.end_ts[rows], stored.energy[rows], stored.flags[rows],
                )  # fmt: skip
                it.out = transform(it.batch, self.settings, it.carry, like)
                it.shaped = True
                b = it.batch
                log.debug("VEE-21 like days gateway=%s seq=%d rows=%d", b.gateway, b.seq, len(stored))
        finally:
            self._res.sinks.put_nowait(sink)

    async def _ack(self, group: list[_Item]) -> None:
        res = self._res
        assert res is not None and res.consumer is not None
        m = self.metrics
        reused = await self._state("mark", self._marker(group))
        for it in group:
            if it.key is not None:
                if it.result == "written":
                    m.readings.inc(it.out.readings if it.out else 0)
                    m.intervals.inc(it.out.n_intervals if it.out else 0)
                    if it.out is not None:
                        m.count_flags(it.out.flags)
                n = self._in_flight.pop(it.key, 1) - 1
                if n:
                    self._in_flight[it.key] = n
            if it.result == "event" and it.event is not None:
                m.events.labels(it.event.kind).inc()
            elif it.result != "event":
                m.batches.labels(it.result).inc()
            await res.consumer.ack(it.msg)
            self._window.release()
        self._update_gauges()
        self._confirm(group, reused)

    def _marker(self, group: list[_Item]) -> Callable[[], set[tuple[str, int]]]:
        """The group's run state save and dedup marks, as one step that can be called again
        after a failure (a batch already marked is not marked twice); returns the marks that
        replaced another digest (sequence resets)."""
        res = self._res
        assert res is not None
        reused: set[tuple[str, int]] = set()
        marked: set[int] = set()
        saved = False

        def mark() -> set[tuple[str, int]]:
            nonlocal saved
            if res.state is not None and not saved:  # before the marks (written within write_every_s)
                res.state.save(
                    [
                        (it.out.columns.gateway, it.out.columns.meter_ids, it.out.carry)
                        for it in group
                        if it.result == "written" and it.out is not None and len(it.out.carry)
                    ]
                )
                saved = True
            for i, it in enumerate(group):
                if it.key is not None and it.result == "written" and i not in marked:
                    periods = it.out.periods if it.out is not None else ()
                    if res.dedup.mark(*it.key, periods=periods):
                        reused.add(it.key[:2])
                    marked.add(i)
            return reused

        return mark

    async def _state(self, what: str, step: Callable[[], T]) -> T:
        """``step()`` (a call into the state stores), retried with the commit's back-off while
        the shared state database is unavailable (:class:`~protocols.errors.StateUnavailable`:
        nothing is acknowledged meanwhile; logged when it starts failing and when it recovers).
        While replaying it raises instead."""
        failing = False

        async def attempt() -> T:
            return step()

        def failed(exc: Exception, attempt_no: int, delay_s: float | None) -> None:
            nonlocal failing
            self.metrics.state_retries.inc()
            if not failing:
                failing = True
                log.error("state database unavailable, retrying; nothing is acknowledged meanwhile "
                          "worker=%d step=%s error=%s", self.worker, what, exc)  # fmt: skip

        policy = RetryPolicy(1, 1, attempts=1) if self._replaying else self._retry_policy()
        result = await retry_until_done(
            attempt, policy, retry_on=(StateUnavailable,), give_up=lambda _exc: False,
            on_failure=failed, rng=self._rng,
        )  # fmt: skip
        if failing:
            log.info("state database available again worker=%d step=%s", self.worker, what)
        return result

    def _confirm(self, group: list[_Item], reused: set[tuple[str, int]]) -> None:
        """Record the group's final batches in the loss account, then confirm them and its events
        to their gateways (see "Confirmations and loss accounting")."""
        res = self._res
        assert res is not None
        seqs: dict[str, list[int]] = {}
        events: dict[str, list[str]] = {}
        for it in group:
            if it.result not in _FINAL:
                continue
            try:
                gw = topics.gateway_of(it.msg.topic)
            except PayloadError:
                continue
            if it.batch is not None and it.batch.gateway == gw and it.batch.seq >= 1:
                seqs.setdefault(gw, []).append(it.batch.seq)
            if it.event is not None and 0 < len(it.event.id) <= 256:
                events.setdefault(gw, []).append(it.event.id)
        for gw in list(seqs):
            if not self._record_loss(gw, seqs[gw], [s for g, s in reused if g == gw]):
                del seqs[gw]  # not confirmed: the edge re-sends it, and it is recorded then
        if not self.cfg.pipeline.confirm or res.publisher is None:
            return
        now_ms = int(time.time() * 1000)
        for gw in sorted(seqs.keys() | events.keys()):
            for ack in _acks(gw, seq_ranges(seqs.get(gw, ())), events.get(gw, ()), now_ms):
                res.publisher.send(topics.ack(gw), ack.to_json())
                self.metrics.confirmations.inc()

    def _record_loss(self, gw: str, seqs: list[int], reused: list[int]) -> bool:
        """Record durable seqs in the loss account (a sequence reset is counted and logged).
        False when the store failed."""
        assert self._res is not None
        if self._res.loss is None:
            return True
        try:
            reset = self._res.loss.record(gw, seqs, reused=reused)
        except _STATE_ERRORS as exc:
            log.error("loss accounting failed, batches not confirmed gateway=%s error=%s", gw, exc)
            return False
        if reset is not None:
            self.metrics.seq_resets.inc()
            log.warning(
                "gateway sequence reset, open gaps counted as lost gateway=%s lost_batches=%d gaps=%s",
                gw, reset.lost, ",".join(f"{g.first}-{g.last}" for g in reset.gaps) or "none",
            )  # fmt: skip
        return True

    # -- loss accounting ---------------------------------------------------------------------

    async def _loss_loop(self) -> None:
        """Every ``check_s``: the missing-batches gauge, then the due alarms (each claimed by one
        worker of the machine), written by a task of their own so that the gauge keeps moving
        while InfluxDB is away."""
        res, lc = self._res, self.cfg.loss
        assert res is not None and res.loss is not None
        writing: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    self.metrics.missing_batches.set(res.loss.missing())
                    if writing is None or writing.done():
                        due = res.loss.claim_alarms(lc.gap_alarm_s)
                        if due:
                            writing = asyncio.create_task(self._raise_loss_alarms(due))
                except _STATE_ERRORS as exc:
                    log.error("loss accounting unavailable, retrying error=%s", exc)
                await asyncio.sleep(lc.check_s)
        finally:
            if writing is not None:
                writing.cancel()

    async def _raise_loss_alarms(self, alarms: list[Alarm]) -> None:
        """One ``alarms`` point each (``kind`` seq_gap or seq_reset, tagged by gateway), written on
        a free sink connection; one that is not written (refused, or the worker stops first) is
        given back, to be claimed again."""
        res = self._res
        assert res is not None and res.loss is not None
        pending = list(alarms)
        try:
            while pending:
                alarm = pending[0]
                sink = await res.sinks.get()
                try:
                    await self._dead_letter_rejected(await sink.write(Writes(loss_alarms=[alarm])))
                except SinkError as exc:
                    self._release(alarm)
                    log.warning("loss alarm not written yet, retried kind=%s gateway=%s error=%s",
                                alarm.kind, alarm.gateway, exc)  # fmt: skip
                else:
                    self._announce(alarm)
                finally:
                    res.sinks.put_nowait(sink)
                pending.pop(0)
        finally:
            for alarm in pending:
                self._release(alarm)

    def _release(self, alarm: Alarm) -> None:
        """Give a claimed alarm back; one the store cannot take back now stays claimed (it was
        logged as due; the next gap of the gateway raises a new one)."""
        assert self._res is not None and self._res.loss is not None
        try:
            self._res.loss.release(alarm)
        except _STATE_ERRORS as exc:
            log.error("loss alarm not given back kind=%s gateway=%s error=%s", alarm.kind, alarm.gateway, exc)

    def _announce(self, alarm: Alarm) -> None:
        """Count and log a raised gap alarm (a reset was logged when it was recognised)."""
        if alarm.kind == "seq_gap":
            self.metrics.seq_gap_alarms.inc()
            age_s = (time.time() * 1000 - alarm.ts_ms) / 1000
            log.warning(
                "batches missing alarm gateway=%s missing=%d gaps=%d first=%d last=%d open_s=%.0f",
                alarm.gateway, alarm.missing, alarm.gaps, alarm.first, alarm.last, age_s,
            )  # fmt: skip

    async def _write(self, writes: Writes, messages: int = 0) -> None:
        """The sink write on a free connection: prepared once (encoded, cut, compressed), sent
        until written (each retry posts only the bodies not yet accepted) while the store is
        unavailable or refuses us (the alarm is raised while it refuses, see the module contract);
        then the records it rejected are dead-lettered, once.

        Raises (only while replaying, after ``[influx] max_attempts`` tries): SinkError."""
        assert self._res is not None
        sinks = self._res.sinks
        sink = await sinks.get()
        t0 = time.monotonic()
        policy = self.cfg.influx.one_shot_retry if self._replaying else self._retry_policy()
        try:
            prepared = sink.prepare(writes)
            result = await send_until_written(
                sink, prepared, policy, on_failure=self._failure_callback(messages), rng=self._rng
            )
        finally:
            sinks.put_nowait(sink)
        self._sink_accepted()
        self.metrics.sink_latency.observe(time.monotonic() - t0)
        await self._dead_letter_rejected(result)

    async def _dead_letter_rejected(self, result: WriteResult) -> None:
        """Commit the records the store refused for good, with its reason and message (retried
        while the state database is unavailable)."""
        if not result.rejected:
            return
        assert self._res is not None
        now_ms = time.time_ns() // 1_000_000
        entries = [(r.kind, r.reason, r.record, None, now_ms, r.detail) for r in result.rejected]
        dead_letter = self._res.dead_letter
        await self._state("dead-letter", lambda: dead_letter.put_many(entries))
        self.metrics.sink_lines_dead_lettered.inc(len(result.rejected))
        for r in result.rejected[:10]:
            log.warning(
                "record dead-lettered reason=%r store=%r record=%r", r.reason, r.detail[:300], r.record[:300]
            )

    def _update_gauges(self) -> None:
        """Queue depth and unacknowledged messages, as the consumer sees them now."""
        consumer = self._res.consumer if self._res is not None else None
        if consumer is not None:
            self.metrics.queue_depth.set(consumer.queued)
            self.metrics.unacked.set(consumer.stats.unacked)

    def _sink_failed(self, exc: SinkError) -> None:
        """Raise the refusal alarm for a :class:`SinkRefused` (once per episode and reason)."""
        if not isinstance(exc, SinkRefused):
            return
        m = self.metrics
        m.sink_refusals.labels(exc.reason).inc()
        if self._refused == exc.reason:
            return
        if self._refused is not None:
            m.sink_refused.labels(self._refused).set(0)
        self._refused = exc.reason
        m.sink_refused.labels(exc.reason).set(1)
        log.error(
            "influxdb refuses the worker: nothing is acknowledged or dead-lettered until it is fixed",
            extra={
                "kv": {"worker": self.worker, "reason": exc.reason, "status": exc.status, "error": str(exc)}
            },
        )

    def _sink_accepted(self) -> None:
        """InfluxDB accepted a write or the probe: end a refusal episode."""
        if self._refused is None:
            return
        self.metrics.sink_refused.labels(self._refused).set(0)
        log.info(
            "influxdb accepts the worker again", extra={"kv": {"worker": self.worker, "was": self._refused}}
        )
        self._refused = None

    async def _probe_sink(self) -> None:
        """Probe InfluxDB at start until it accepts the worker (see the module contract)."""
        sinks = self._res.sinks if self._res is not None else None
        assert sinks is not None

        async def probe() -> str:
            sink = await sinks.get()
            try:
                return await sink.probe()
            finally:
                sinks.put_nowait(sink)

        def failed(exc: Exception, _attempt: int, _delay_s: float | None) -> None:
            if isinstance(exc, SinkError):  # unreachable: the sink logs it; refused: the alarm
                self._sink_failed(exc)

        summary = await retry_until_done(
            probe, self._retry_policy(), give_up=lambda _exc: False, on_failure=failed, rng=self._rng
        )
        self._sink_accepted()
        log.info("influxdb probe ok", extra={"kv": {"worker": self.worker, "sink": summary}})

    async def _after_write(self, writes: list[_Item]) -> None:
        await self._publish(writes)
        for it in writes:
            span = None
            if it.out is not None and it.out.outage_events:
                span = it.out.outage_ts
            if it.event is not None and it.event.kind == "power_down" and it.event.meter:
                span = (it.event.ts_ms, it.event.ts_ms)
            if span is None:
                continue
            try:
                await self._outages(*span)
            except SinkError as exc:
                if exc.retryable:
                    raise  # the group is retried (its rewrite is idempotent)
                # The data is written; only the correlation query was refused. Dead-lettering
                # the group here would report written batches as lost.
                log.error("outage correlation refused, no area alarm evaluated error=%s", exc)

    async def _publish(self, writes: list[_Item]) -> None:
        """The group's intervals, one message per batch, PUBACKs awaited."""
        res, p = self._res, self.cfg.pipeline
        assert res is not None
        if res.publisher is None or not p.publish_intervals:
            return
        items = []
        for it in writes:
            b, out = it.batch, it.out
            if b is not None and out is not None and out.n_intervals:
                payload = out.intervals_payload(b.gateway, b.seq, p.aggregates_encoding)
                items.append((topics.agg("intervals", b.gateway), payload))
                self.metrics.published.labels("intervals").inc()
        if items:
            await res.publisher.publish_many(items)

    # -- dead-letter replay ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def replaying(self) -> AsyncIterator[DeadLetterStore]:
        """The worker's stores, a sink and the aggregate publisher, without an MQTT session, for
        :meth:`replay`; yields the dead-letter store. The rollups the replayed batches owe are
        left to the workers (the keys are durable in the dedup store)."""
        self._replaying = True
        # its own client id: a live worker's publisher must not be taken over
        async with self._resources(1, "replay") as res:
            res.consumer = _NoSession()  # type: ignore[assignment]
            yield res.dead_letter

    async def replay(self, entry: DeadLetter) -> tuple[str, str]:
        """Put one dead-lettered payload back through intake and commit (inside :meth:`replaying`):
        decode, dedup, transform, write, publish, mark, as if it had just arrived.

        Returns ``(outcome, why)``: ``"replayed"`` (written now) or ``"duplicate"`` (already
        durable): the entry is removed, so a second replay writes nothing; ``"failing"``: refused
        again, the entry keeps its id and time with the new reason, ``why`` is ``reason: detail``.
        Raises: SinkError, TransportError: InfluxDB or the broker unavailable or refusing us (the
        entry stays as it was; stop and replay again once it is fixed)."""
        assert self._res is not None and entry.topic is not None
        item = self._prepare(Message(entry.topic, entry.payload, mid=0, qos=0))
        if item.refusal is not None:
            reason, detail = item.refusal
            self._res.dead_letter.set_reason(entry.id, reason, detail)
            return "failing", f"{reason}: {detail}"
        if item.to_write:
            await self._durable([item])
        await self._ack([item])
        self._res.dead_letter.remove(entry.id)
        return ("duplicate" if item.result == "duplicate" else "replayed"), ""

    # -- run state and rollups ---------------------------------------------------------------

    async def _state_loop(self) -> None:
        """Write the run state's unsaved carries every ``write_every_s``, also when no batch
        comes (a save writes them only when it finds them due)."""
        assert self._res is not None
        state = self._res.state
        while state is not None:
            await asyncio.sleep(state.write_every_s)
            try:
                state.flush()
            except _STATE_ERRORS as exc:  # kept in memory, written by the next flush
                log.warning("run state not written yet, retried error=%s", exc)

    def rollup_job(self) -> RollupJob:
        """The rollup of this worker's owed periods (see :mod:`ingest.pipeline.rollup`), on its
        stores, sink connections and publisher (open: inside :meth:`run` or :meth:`replaying`)."""
        res, p = self._res, self.cfg.pipeline
        assert res is not None
        publish = res.publisher.publish_many if res.publisher is not None and p.publish_daily else None
        return RollupJob(
            res.dedup,
            self.settings,
            res.sinks.get,
            res.sinks.put_nowait,
            publish,
            self.metrics,
            p.rollup_delay_s,
            owner=self.cfg.mqtt.consumer(self.worker).client_id,
        )

    async def _outages(self, t_lo: int, t_hi: int) -> None:
        """OUT-02 over every power-down-like event the sink holds near [t_lo, t_hi] (all workers'),
        then one area-outage alarm per outage: an alarm already open for the area within
        ``outage_hold_s`` is updated in place (same area and time), never duplicated."""
        assert self._res is not None
        p = self.cfg.pipeline
        win = p.outage_window_s * 1000
        sink = await self._res.sinks.get()
        try:
            await self._correlate(sink, t_lo - win, t_hi + win)
        finally:
            self._res.sinks.put_nowait(sink)

    async def _correlate(self, sink: Sink, t_lo: int, t_hi: int) -> None:
        p = self.cfg.pipeline
        reg = self.settings.registry
        events = [
            e for e in await sink.outage_events(t_lo, t_hi) if _from_its_gateway(reg, e.meter, e.gateway)
        ]
        if not events:
            return
        ids = sorted({e.meter for e in events})
        index = {m: i for i, m in enumerate(ids)}
        params = reg.params(ids)
        ev_meter = np.array([index[e.meter] for e in events], dtype=np.uint32)
        ev_ts = np.array([e.ts_ms for e in events], dtype=np.int64)
        known = params.area[ev_meter] >= 0
        if not known.any():
            return
        out = st.area_outages(
            ev_meter[known], ev_ts[known], params, reg.area_sizes(),
            window_ms=p.outage_window_s * 1000, k_min=p.outage_min_meters, pct=p.outage_pct,
        )  # fmt: skip
        for a in range(out.alarm_area.shape[0]):
            area = reg.areas[int(out.alarm_area[a])]
            await self._raise_alarm(sink, area, int(out.alarm_ts[a]), int(out.alarm_events[a]))

    async def _raise_alarm(self, sink: Sink, area: str, ts: int, events: int) -> None:
        """Open or merge the outage in the shared alarm store (:mod:`ingest.pipeline.outages`),
        publish a new alarm, then make the sink hold the alarm as the store does."""
        assert self._res is not None and self._res.alarms is not None
        store = self._res.alarms
        hold = self.cfg.pipeline.outage_hold_s * 1000
        stored = await sink.open_area_alarm(area, ts - hold, ts + hold)
        known = None if stored is None else (stored.ts_ms, stored.events)
        alarm, merge = await self._state("area alarm", lambda: store.merge(area, ts, events, hold, known))
        if merge is Merge.OPENED:
            self.metrics.alarms.inc()
            log.warning("area outage alarm area=%s ts_ms=%d events=%d", area, ts, events)
        elif merge is Merge.MOVED:
            log.info(
                "area outage alarm moved back area=%s ts_ms=%d from_ms=%d", area, alarm.ts_ms, alarm.last_ms
            )
        if not alarm.published:
            # Published before it is written, and marked after the PUBACK: a failed publish
            # retries the step, and a repeat is harmless ((area, ts_ms) names the alarm).
            await self._publish_alarm(area, alarm.ts_ms, alarm.events)
            await self._state("area alarm", lambda: store.mark_published(area, alarm.ts_ms))
        unmoved = alarm.last_ms == alarm.ts_ms
        if merge is Merge.SAME and unmoved and stored == AreaAlarm(area, alarm.ts_ms, alarm.events):
            return  # the sink holds it as the store does
        await self._store_alarm(sink, store, alarm, hold)

    async def _store_alarm(self, sink: Sink, store: AreaAlarmStore, alarm: OpenAlarm, hold: int) -> None:
        """Write ``alarm``, drop the times it had before it moved back, and again while another
        worker changed it meanwhile (see :mod:`ingest.pipeline.outages`)."""
        current: OpenAlarm | None = alarm
        while current is not None:
            a = current
            await self._dead_letter_rejected(
                await sink.write(Writes(area_alarms=[AreaAlarm(a.area, a.ts_ms, a.events)]))
            )
            if a.last_ms > a.ts_ms:
                await sink.drop_area_alarms(a.area, a.ts_ms, a.last_ms)
            current = await self._state("area alarm", functools.partial(store.current, a.area, a.ts_ms, hold))
            if current is not None and current.version == a.version:
                return

    async def _publish_alarm(self, area: str, ts: int, events: int) -> None:
        """The new area-outage alarm on ``ami/v1/agg/alarms`` (``[pipeline] publish_alarms``),
        PUBACK awaited, for fee control to notify the area's customers.

        Raises: TransportError (the caller's step is retried)."""
        res = self._res
        if res is None or res.publisher is None or not self.cfg.pipeline.publish_alarms:
            return
        if check_area(area) is not None:  # a registry name the alarm format cannot carry
            log.error("area outage alarm not published: area name not allowed area=%r", area)
            return
        await res.publisher.publish(topics.ALARMS, AreaOutage(area, ts, events).to_json())
        self.metrics.published.labels("alarms").inc()


class _NoSession:
    """The consumer stand-in of a replay: its messages come from the dead-letter store, so
    there is nothing to acknowledge and nothing queued."""

    queued = 0
    stats = ConsumerStats()

    async def ack(self, msg: Message) -> None:
        pass


def _from_its_gateway(reg: MeterRegistry, meter: str, gateway: str) -> bool:
    """An outage event whose gateway may speak for its meter: the meter's bound gateway, or any
    for an unbound meter (events stored before the binding)."""
    bound = reg.bound_gateway(meter)
    return bound is None or gateway == bound


def _acks(gw: str, ranges: Sequence[tuple[int, int]], events: Sequence[str], ts_ms: int) -> list[Ack]:
    """The confirmations of one gateway, split to stay within the protocol's bounds (one message
    unless a group holds more than MAX_RANGES ranges or MAX_EVENTS/64 KiB of event ids)."""
    parts_r = [tuple(ranges[i : i + MAX_RANGES]) for i in range(0, len(ranges), MAX_RANGES)]
    parts_e: list[list[str]] = []
    size = 0
    for e in events:
        cost = len(e.encode()) * 6 + 3  # worst case of JSON's \uXXXX escapes
        if not parts_e or len(parts_e[-1]) == MAX_EVENTS or size + cost > _ACK_EVENT_BYTES:
            parts_e.append([])
            size = 0
        parts_e[-1].append(e)
        size += cost
    n = max(len(parts_r), len(parts_e))
    return [
        Ack(gw, parts_r[i] if i < len(parts_r) else (), tuple(parts_e[i]) if i < len(parts_e) else (), ts_ms)
        for i in range(n)
    ]


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
        else:
            log.info("registry reloaded meters=%d", len(w.settings.registry.ids))

    loop.add_signal_handler(signal.SIGHUP, reload)
    await w.run()


def _drain(q: asyncio.Queue[Sink]) -> list[Sink]:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out
