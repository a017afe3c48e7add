"""The edge agent: poll meters on schedule, store every reading durably, publish, obey commands.

Tasks (one ``asyncio.TaskGroup``, every task named):

* ``poll-<bus>`` -- one per bus, so buses run in parallel while each bus carries one transaction
  at a time (the :class:`~drivers.bus.Bus` lock). Reads are aligned to each plan's interval
  boundaries; a failing meter backs off (:func:`gateway.schedule.backoff_ms`) so it never starves
  its bus. After each cycle the readings go into the outbox as batches, per plan kind, with the
  next sequence number and the previous value sent of every cumulative channel, atomically.
  The task opens its bus itself: a port that is missing or a server that refuses does not stop
  the agent. The bus is reported down (``amigw_bus_up`` 0, ``bus_<name>_up`` 0 in the status, a
  ``bus_down`` event, one log line) and reopened with back-off
  (:func:`gateway.schedule.bus_retry_s`, 1 s doubling to 60 s) while the other buses poll; once
  it opens (``bus_up`` event) its meters are read on their schedule. A read that fails with a
  transport error other than a timeout (the port vanished, the server closed the connection)
  makes the task reopen the bus at once, and report it down if that fails. Any other exception
  while reading a meter is that meter's failure (cause ``other``, logged with its traceback).
* ``drain`` -- publishes the outbox (QoS 1, bounded in-flight window) whenever the broker is
  reachable, and applies the head-end's confirmations (``ami/v1/{gateway}/down/ack``): readings
  batches and events leave the outbox only once the head-end confirmed them durable (or on the
  broker's PUBACK with ``[outbox] confirm = "broker"``); unconfirmed ones are re-sent after
  ``ack_timeout_s``. After an outage or a restart it replays in order.
* ``commands`` -- verified, replay-protected downlink commands (:mod:`gateway.commands`). A
  command waits for the bus lock like a poll transaction does; ``asyncio.Lock`` is FIFO and the
  drivers take the lock per transaction, so a command gets the bus right after the transaction in
  progress (the priority lane), and its validity window is its deadline. Whatever happens while
  handling one command ends at that command: it is answered (``rejected`` or ``failed`` with a
  reason), counted in ``amigw_command_errors_total{reason}``, logged once, and the loop goes on.
* ``status`` -- the retained status message with health and counters, every ``status_interval_s``.

Time comes from ``now_ms`` (injected); nothing here reads the wall clock directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from drivers.base import Capability, DriverSetup, MeterDriver, MeterRef, load_driver
from drivers.bus import Bus, ResponseTimeout
from drivers.lines import open_transport, parse_port
from drivers.transport import ClosedTransport, Transport
from gateway.commands import CommandIntake, ExecutedCommands
from gateway.config import BusConfig, EdgeConfig, MeterConfig, PlanConfig, unreadable_quantity
from gateway.metrics import EdgeMetrics, serve
from gateway.outbox import Outbox
from gateway.publisher import ConnectionLostError, Publisher
from gateway.schedule import MeterStats, bus_retry_s, next_boundary
from protocols import payload, topics
from protocols.commands import RELAY_ACTIONS, Action, Command, CommandResult
from protocols.errors import (
    AmigwError,
    ChecksumError,
    ConfigError,
    FrameError,
    MeterErrorReply,
    ProtocolError,
    TransportError,
    TransportTimeout,
)
from protocols.quantities import Quantity, by_code, by_name

__all__ = ["EdgeAgent", "wall_ms"]

log = logging.getLogger("amigw.edge")


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _cause(exc: BaseException) -> str:
    if isinstance(exc, TransportTimeout):
        return "timeout"
    if isinstance(exc, ChecksumError | FrameError):
        return "checksum"
    if isinstance(exc, MeterErrorReply):
        return "error_reply"
    if isinstance(exc, TransportError):
        return "transport"
    return "other"


def _failure_reason(exc: BaseException) -> str:
    """The ``reason`` of a ``failed`` command result for ``exc``."""
    if isinstance(exc, MeterErrorReply):
        return "meter_error"
    if isinstance(exc, TransportTimeout):
        return "no_answer"
    if isinstance(exc, TransportError):
        return "transport"
    if isinstance(exc, ProtocolError):
        return "meter_error"  # it answered, but not with a frame that fits
    if isinstance(exc, NotImplementedError | ConfigError):
        return "unsupported"
    if isinstance(exc, TimeoutError):
        return "deadline"
    return "internal"


def _line_failure(exc: Exception | None) -> bool:
    """A failed read that says the line itself may be gone (not a silent or garbled meter)."""
    return isinstance(exc, TransportError) and not isinstance(exc, TransportTimeout)


@dataclass(slots=True)
class _Meter:
    cfg: MeterConfig
    ref: MeterRef
    driver: MeterDriver
    plans: list[PlanConfig]
    stats: MeterStats = field(default_factory=MeterStats)
    relay_state: int | None = None
    failing: bool = False
    next_clock_check_ms: int = 0
    power_down_count: int | None = None


@dataclass(slots=True)
class _Line:
    """One bus as the agent runs it. ``bus`` is ``None`` for Modbus TCP (its driver owns the
    connection). ``up`` is None until the first open; ``failed_opens`` counts opens that failed
    in a row (the back-off)."""

    cfg: BusConfig
    meters: list[_Meter]
    bus: Bus | None
    drivers: list[MeterDriver]
    up: bool | None = None
    failed_opens: int = 0


class _Cycle:
    """Readings of one bus cycle as ``(meter, ts_ms, quantity, value, flags)`` rows, per plan kind.

    ``ad_hoc`` cycles (read-now commands) are off the interval grid: their cumulative values are
    published but never become the "previous value sent" that anchors the next batch's intervals."""

    def __init__(self, *, ad_hoc: bool = False) -> None:
        self.rows: dict[str, list[tuple[str, int, int, int, int]]] = {}
        self.ad_hoc = ad_hoc

    def add(self, kind: str, meter: str, ts_ms: int, q: int, value: int, flags: int) -> None:
        self.rows.setdefault(kind, []).append((meter, ts_ms, q, value, flags))


class EdgeAgent:
    """Runs until :meth:`stop` (or cancellation). Raises :class:`~protocols.errors.ConfigError`
    at start for a configuration that cannot work (unreadable key, unknown register map)."""

    def __init__(
        self,
        cfg: EdgeConfig,
        *,
        now_ms: Callable[[], int] = wall_ms,
        status_interval_s: float = 30.0,
        version: str = "",
    ) -> None:
        self.cfg = cfg
        self.now_ms = now_ms
        self.metrics = EdgeMetrics()
        self.status_interval_s = status_interval_s
        self.version = version
        self.topic_readings = topics.readings(cfg.gateway_id)
        self.topic_events = topics.events(cfg.gateway_id)
        self.topic_results = topics.cmd_result(cfg.gateway_id)
        self._key = cfg.key_bytes()
        self._plans = {p.name: p for p in cfg.plans}
        self._meters: dict[str, _Meter] = {}
        self._buses: list[tuple[BusConfig, list[_Meter]]] = []
        self._lines: dict[str, _Line] = {}
        self._outbox_wakeup = asyncio.Event()
        self._stop = asyncio.Event()
        self.outbox: Outbox | None = None
        self.publisher: Publisher | None = None

    def stop(self) -> None:
        self._stop.set()

    # -- setup --------------------------------------------------------------------------------

    async def _open_transport(self, bus_cfg: BusConfig) -> Transport:
        """Open the bus's port or serial server. Raises ``TransportError``."""
        return await open_transport(
            parse_port(bus_cfg.port),
            baud=bus_cfg.baud,
            parity=bus_cfg.parity,
            stop_bits=bus_cfg.stop_bits,
            echo=bus_cfg.echo,
        )

    async def _open_bus(self, bus_cfg: BusConfig, stack: contextlib.AsyncExitStack) -> Bus | None:
        """The bus object, not yet open (its poll task opens it); ``None`` for a kind of line
        that is not shared (its driver owns the connection)."""
        if not bus_cfg.kind.shared:
            return None
        bus = Bus(ClosedTransport(bus_cfg.port), baud=bus_cfg.baud, name=bus_cfg.name)
        await stack.enter_async_context(bus)
        return bus

    def _driver(
        self, bus_cfg: BusConfig, bus: Bus | None, protocol: str, cache: dict[str, MeterDriver]
    ) -> MeterDriver:
        if protocol in cache:
            return cache[protocol]
        setup = DriverSetup(  # command deadlines are in the meters' local time, as configured
            parse_port(bus_cfg.port),
            bus,
            retries=bus_cfg.retries,
            timeout_s=bus_cfg.timeout_s,
            local_now=self._meter_local_now,
        )
        driver = cache[protocol] = load_driver(protocol).open(setup)
        return driver

    def _meter_local_now(self) -> datetime.datetime:
        """Now on the meters' clocks ([clock] utc_offset_min, else this machine's zone), naive."""
        now = self.now_ms()
        return datetime.datetime(1970, 1, 1) + datetime.timedelta(
            milliseconds=now + self._local_offset_ms(now)
        )

    async def _setup(self, stack: contextlib.AsyncExitStack) -> None:
        for bus_cfg in self.cfg.buses:
            bus = await self._open_bus(bus_cfg, stack)
            drivers: dict[str, MeterDriver] = {}
            meters = []
            for mc in (m for m in self.cfg.meters if m.bus == bus_cfg.name):
                driver = self._driver(bus_cfg, bus, mc.protocol, drivers)
                ref = MeterRef(mc.id, mc.address, mc.protocol, mc.model, mc.password, mc.operator)
                if bus is not None:
                    bus.configure_device(
                        driver.device_key(ref),
                        min_gap_s=bus_cfg.min_gap_ms / 1000,
                        timeout=ResponseTimeout(
                            initial_s=bus_cfg.timeout_s,
                            min_s=bus_cfg.min_timeout_s,
                            max_s=bus_cfg.max_timeout_s,
                        ),
                    )
                meter = _Meter(mc, ref, driver, [self._plans[p] for p in mc.plans])
                self._meters[mc.id] = meter
                meters.append(meter)
            for driver in drivers.values():
                stack.push_async_callback(driver.aclose)
            self._buses.append((bus_cfg, meters))
            self._lines[bus_cfg.name] = _Line(bus_cfg, meters, bus, list(drivers.values()))
            self.metrics.bus_up.labels(bus_cfg.name).set(0)

    # -- run ----------------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.cfg
        state_dir = Path(cfg.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        Path(cfg.outbox.path).parent.mkdir(parents=True, exist_ok=True)
        if cfg.metrics_listen:
            serve(self.metrics, cfg.metrics_listen)
        async with contextlib.AsyncExitStack() as stack:
            self.outbox = Outbox(
                cfg.outbox.path,
                max_bytes=cfg.outbox.max_bytes,
                policy=cfg.outbox.policy,
                confirm=cfg.outbox.confirm,
                ack_timeout_s=cfg.outbox.ack_timeout_s,
                resend_cap_s=cfg.outbox.resend_max_s,
            )
            stack.callback(self.outbox.close)
            self.metrics.watch_outbox(self.outbox.stats)
            executed = ExecutedCommands(state_dir / f"{cfg.gateway_id}-commands.sqlite")
            stack.callback(executed.close)
            await self._setup(stack)
            intake = CommandIntake(
                cfg.gateway_id, self._key, executed, self._execute, self._meters.__contains__
            )
            m = cfg.mqtt
            self.publisher = await stack.enter_async_context(
                Publisher(
                    m.url,
                    gateway=cfg.gateway_id,
                    client_id=m.client_id or f"amigw-edge-{cfg.gateway_id}",
                    username=m.username,
                    password=m.password,
                    ca_file=m.ca_file,
                    certfile=m.cert_file,
                    keyfile=m.key_file,
                    keepalive_s=m.keepalive_s,
                    window=cfg.outbox.max_inflight,
                    version=self.version,
                    on_ack_rejected=lambda reason: self.metrics.acks_rejected.labels(reason).inc(),
                )
            )
            log.info(
                "edge agent started",
                extra={
                    "kv": {"gateway": cfg.gateway_id, "buses": len(self._buses), "meters": len(self._meters)}
                },
            )
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._poll_bus(line), name=f"poll-{name}")
                    for name, line in self._lines.items()
                ]
                tasks.append(tg.create_task(self._drain(), name="drain"))
                tasks.append(tg.create_task(self._commands(intake), name="commands"))
                tasks.append(tg.create_task(self._status(), name="status"))
                await self._stop.wait()
                for t in tasks:
                    t.cancel()

    # -- polling ------------------------------------------------------------------------------

    async def _sleep_until(self, due_ms: int) -> None:
        delay = (due_ms - self.now_ms()) / 1000
        if delay > 0:
            await asyncio.sleep(delay)

    async def _poll_bus(self, line: _Line) -> None:
        """Open the bus (retrying with back-off), poll it until it fails, and again."""
        while line.meters:
            await self._bring_up(line)
            await self._poll_line(line)

    async def _poll_line(self, line: _Line) -> None:
        """Poll an open bus on schedule; return when it has failed and could not be reopened."""
        bus_cfg, meters = line.cfg, line.meters
        start = self.now_ms()
        due = {(m.cfg.id, p.name): next_boundary(start, p.interval_s * 1000) for m in meters for p in m.plans}
        while line.up:
            at = min(due.values())
            await self._sleep_until(at)
            t0 = time.perf_counter()
            cycle = _Cycle()
            for meter in meters:
                plans = [p for p in meter.plans if due[(meter.cfg.id, p.name)] <= at]
                for p in plans:
                    due[(meter.cfg.id, p.name)] = next_boundary(max(at, self.now_ms()), p.interval_s * 1000)
                if plans:
                    failure = await self._read_meter(bus_cfg, meter, plans, cycle, at)
                    if _line_failure(failure) and not await self._reopen(line):
                        break
                    await self._check_clock(meter)
            elapsed = time.perf_counter() - t0
            self.metrics.cycle_seconds.labels(bus_cfg.name).observe(elapsed)
            self.metrics.bus_busy.labels(bus_cfg.name).inc(elapsed)
            self._store_cycle(cycle)
            await asyncio.to_thread(self.outbox.checkpoint)  # type: ignore[union-attr]

    async def _open_line(self, line: _Line) -> None:
        """(Re)open the line's port or connection. Raises ``AmigwError`` (``TransportError``)."""
        if line.bus is not None:
            await line.bus.reopen(lambda: self._open_transport(line.cfg))
        else:
            for driver in line.drivers:  # a line that is not shared: each driver's own connection
                await driver.connect()

    async def _bring_up(self, line: _Line) -> None:
        """Open the line, retrying with back-off for as long as it takes."""
        while not await self._reopen(line):
            await asyncio.sleep(bus_retry_s(line.failed_opens))

    async def _reopen(self, line: _Line) -> bool:
        """Try once to (re)open the line; report it up or down on a change. True when open."""
        name = line.cfg.name
        try:
            await self._open_line(line)
        except Exception as exc:  # whatever stops it opening, the bus is down and retried
            line.failed_opens += 1
            if line.up is not False:  # edge-triggered: one log line and one event per outage
                log.error("bus down", extra={"kv": {"bus": name, "port": line.cfg.port, "error": str(exc)}})
                self._event("bus_down", None, {"bus": name, "port": line.cfg.port, "error": str(exc)})
            else:
                log.debug("bus still down", extra={"kv": {"bus": name, "error": str(exc)}})
            line.up = False
            self.metrics.bus_up.labels(name).set(0)
            return False
        if line.up is False:
            log.info("bus up", extra={"kv": {"bus": name, "port": line.cfg.port, "after": line.failed_opens}})
            self._event("bus_up", None, {"bus": name, "port": line.cfg.port})
        line.up, line.failed_opens = True, 0
        self.metrics.bus_up.labels(name).set(1)
        return True

    async def _read_meter(
        self,
        bus_cfg: BusConfig,
        meter: _Meter,
        plans: list[PlanConfig],
        cycle: _Cycle,
        slot_ms: int | None = None,
    ) -> Exception | None:
        """Read ``meter`` into ``cycle``; a failure is counted, reported and returned. Any
        exception of the driver is this meter's failure (cause ``other`` for one that is not
        ours, logged with its traceback): it never stops the bus."""
        now = self.now_ms()
        interval_ms = min(p.interval_s for p in plans) * 1000
        if meter.stats.skip_until_ms > now:
            return None  # backing off a meter that keeps failing: its bus serves the others
        quantities: list[Quantity] = []
        kind_of: dict[int, str] = {}
        for p in plans:
            for name in p.quantities:
                q = by_name(name)
                if q.code not in kind_of:
                    quantities.append(q)
                    kind_of[q.code] = p.kind
        try:
            result = await meter.driver.read(meter.ref, quantities)
        except Exception as exc:  # the meter's failure, whatever raised it
            cause = _cause(exc)
            meter.stats.record_failure(cause, now, interval_ms)
            self.metrics.reads.labels(bus_cfg.name, "failed").inc()
            self.metrics.read_failures.labels(bus_cfg.name, cause).inc()
            if not meter.failing:  # edge-triggered: ERROR once, DEBUG while it keeps failing
                meter.failing = True
                log.error(
                    "meter read failing",
                    extra={
                        "kv": {"meter": meter.cfg.id, "bus": bus_cfg.name, "cause": cause, "error": str(exc)}
                    },
                    exc_info=not isinstance(exc, AmigwError),
                )
                self._event("meter_unreachable", meter.cfg.id, {"cause": cause})
            else:
                log.debug("meter read failed", extra={"kv": {"meter": meter.cfg.id, "cause": cause}})
            failure: Exception | None = exc
        else:
            failure = None
            meter.stats.record_success(now)
            self.metrics.reads.labels(bus_cfg.name, "ok").inc()
            if meter.failing:
                meter.failing = False
                log.info("meter recovered", extra={"kv": {"meter": meter.cfg.id, "bus": bus_cfg.name}})
                self._event("meter_recovered", meter.cfg.id, {})
            # The meter's clock is meter-local time (as UTC-naive ms): make it UTC before using it.
            ts = result.meter_ts_ms - self._local_offset_ms(now) if result.meter_ts_ms else result.read_ts_ms
            # A scheduled register read carries the grid slot it was due at (VEE-13: ingest takes
            # interval deltas only between on-grid readings), if the read started inside it.
            slot_ts = ts
            if slot_ms is not None and result.meter_ts_ms is None and 0 <= now - slot_ms < interval_ms:
                slot_ts = slot_ms
            for code, value, flags in result.values:
                kind = kind_of.get(code, "instant")
                cycle.add(
                    kind, meter.cfg.id, slot_ts if kind in ("register", "daily") else ts, code, value, flags
                )
                if code == _POWER_DOWN_COUNT and not flags:
                    if meter.power_down_count is not None and value > meter.power_down_count:
                        self._event(
                            "power_down",
                            meter.cfg.id,
                            {"count": value, "new": value - meter.power_down_count},
                        )
                    meter.power_down_count = value
        self.metrics.success_rate.labels(meter.cfg.id).set(meter.stats.success_rate)
        bus = meter.driver.bus
        if bus is not None:
            timeout_s = bus.response_timeout_s(meter.driver.device_key(meter.ref))
            self.metrics.response_timeout.labels(bus_cfg.name, meter.cfg.id).set(timeout_s)
        return failure

    def _store_cycle(self, cycle: _Cycle) -> None:
        """Each kind's rows become batches of at most ``max_readings_per_batch`` readings; each
        batch carries the previous value sent of its cumulative channels and, in the same outbox
        transaction, records its own last values as the new previous ones."""
        outbox = self.outbox
        assert outbox is not None
        limit = self.cfg.outbox.max_readings_per_batch
        for kind, rows in cycle.rows.items():
            for start in range(0, len(rows), limit):
                self._add_batch(outbox, kind, rows[start : start + limit], record_prev=not cycle.ad_hoc)
        self._outbox_wakeup.set()

    def _add_batch(
        self,
        outbox: Outbox,
        kind: str,
        rows: list[tuple[str, int, int, int, int]],
        *,
        record_prev: bool = True,
    ) -> None:
        builder = payload.BatchBuilder()
        last: dict[tuple[str, int], tuple[int, int]] = {}
        for meter, ts, q, value, flags in rows:
            builder.add(meter, ts, q, value, flags)
            if record_prev and flags == 0 and _is_cumulative(q):
                last[(meter, q)] = (value, ts)
        for (meter, q), (value, ts) in outbox.get_prev(last).items():
            builder.set_prev(meter, q, value, ts)
        sent_ms = self.now_ms()
        encoding, version = self.cfg.mqtt.encoding, self.cfg.mqtt.payload_version

        def make(seq: int) -> bytes:
            return payload.encode(builder.build(self.cfg.gateway_id, seq, sent_ms), encoding, version)

        added = outbox.add_batch(self.topic_readings, make, kind=kind, prev=last)
        if added.dropped:
            log.warning(
                "outbox full: dropped messages", extra={"kv": {"dropped": added.dropped, "kind": kind}}
            )

    def _local_offset_ms(self, now_ms: int) -> int:
        if self.cfg.clock.utc_offset_min is not None:
            return self.cfg.clock.utc_offset_min * 60_000
        offset = datetime.datetime.fromtimestamp(now_ms / 1000).astimezone().utcoffset()
        return int(offset.total_seconds() * 1000) if offset else 0

    async def _check_clock(self, meter: _Meter) -> None:
        """Correct a meter whose clock is off by more than the tolerance, and report it -- a
        meter whose driver declares clock read and set (:class:`~drivers.base.Capability`).

        A skew up to ``max_adjust_s`` is corrected by broadcast (DL/T 645-2007 §5, 0x08: it
        reaches every meter on the line, needs no password and is only accepted by meters within
        a few minutes of the sent time; it corrects the bus's other meters too). A larger skew
        needs an authorised write to that one meter (DL/T 645: 0x14 of date and time)."""
        now = self.now_ms()
        clock_caps = {Capability.CLOCK_READ, Capability.CLOCK_SET}
        if now < meter.next_clock_check_ms or meter.failing:
            return
        if not clock_caps <= meter.driver.capabilities(meter.ref.protocol):
            return
        clock = self.cfg.clock
        meter.next_clock_check_ms = now + clock.check_interval_s * 1000
        try:
            meter_ms = await meter.driver.read_clock(meter.ref)
            true_local = self.now_ms() + self._local_offset_ms(now)
            skew_ms = meter_ms - true_local
            if abs(skew_ms) <= clock.tolerance_s * 1000:
                return
            broadcast = abs(skew_ms) <= clock.max_adjust_s * 1000
            method = "broadcast" if broadcast else "write"
            await meter.driver.set_clock(meter.ref, true_local, broadcast=broadcast)
        except Exception as exc:  # a failed check is retried at the next interval, never fatal
            log.warning(
                "clock check failed",
                extra={"kv": {"meter": meter.cfg.id, "error": f"{type(exc).__name__}: {exc}"}},
                exc_info=not isinstance(exc, AmigwError | NotImplementedError),
            )
            return
        log.info(
            "meter clock adjusted",
            extra={"kv": {"meter": meter.cfg.id, "skew_ms": skew_ms, "method": method}},
        )
        self._event("clock_adjusted", meter.cfg.id, {"skew_ms": skew_ms, "method": method})

    # -- publishing ---------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Publish and re-send the outbox, and apply the head-end's confirmations to it."""
        assert self.publisher is not None and self.outbox is not None
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._confirm(), name="confirm")
            await self.publisher.deliver(
                self.outbox, self._outbox_wakeup, on_published=self.metrics.published.inc
            )

    async def _confirm(self) -> None:
        assert self.publisher is not None and self.outbox is not None
        async for ack in self.publisher.acks():
            confirmed = self.outbox.confirm(ack)
            log.debug("confirmation", extra={"kv": {"rows": confirmed, "ranges": len(ack.seqs),
                                                    "events": len(ack.events)}})  # fmt: skip

    def _event(self, kind: str, meter: str | None, detail: dict[str, object]) -> None:
        if self.outbox is None:
            return
        ev = payload.Event(
            f"{self.cfg.gateway_id}-{uuid.uuid4().hex}",
            self.cfg.gateway_id,
            kind,
            self.now_ms(),
            meter,
            detail,
        )
        self.outbox.add(self.topic_events, ev.to_json(), kind="event", event_id=ev.id)
        self._outbox_wakeup.set()

    def counters(self) -> dict[str, int | float]:
        attempts = sum(m.stats.attempts for m in self._meters.values())
        successes = sum(m.stats.successes for m in self._meters.values())
        out: dict[str, int | float] = {
            "meters": len(self._meters),
            "reads": attempts,
            "read_successes": successes,
            "read_success_rate": round(successes / attempts, 4) if attempts else 1.0,
        }
        for bus_cfg, meters in self._buses:  # the KPI per bus, beside the gateway's
            b_attempts = sum(m.stats.attempts for m in meters)
            b_ok = sum(m.stats.successes for m in meters)
            out[f"bus_{bus_cfg.name}_read_success_rate"] = round(b_ok / b_attempts, 4) if b_attempts else 1.0
            out[f"bus_{bus_cfg.name}_up"] = int(bool(self._lines[bus_cfg.name].up))
        if self.outbox is not None:
            s = self.outbox.stats()
            out.update(
                {
                    "outbox_pending": s.pending,
                    "outbox_pending_bytes": s.pending_bytes,
                    "outbox_unconfirmed": s.unconfirmed,
                    "outbox_added": s.added,
                    "outbox_published": s.published,
                    "outbox_confirmed": s.confirmed,
                    "outbox_resent": s.resent,
                }
            )
            out.update({f"outbox_dropped_{k}": n for k, n in s.dropped.items()})
        return out

    async def _status(self) -> None:
        assert self.publisher is not None
        while True:
            await asyncio.sleep(self.status_interval_s)
            status = payload.Status(self.cfg.gateway_id, True, self.now_ms(), self.version, self.counters())
            with contextlib.suppress(ConnectionLostError):
                await self.publisher.publish(self.publisher.status_topic, status.to_json(), retain=True)

    # -- commands -----------------------------------------------------------------------------

    async def _commands(self, intake: CommandIntake) -> None:
        assert self.publisher is not None and self.outbox is not None
        async for raw in self.publisher.commands():
            try:
                result = await intake.handle_result(raw, self.now_ms())
                self.metrics.commands.labels(result.status).inc()
                if result.status != "done":
                    self.metrics.command_errors.labels(result.reason or "unknown").inc()
                self.outbox.add(self.topic_results, result.signed(self._key), kind="cmd_result")
                self._outbox_wakeup.set()
            except Exception as exc:  # the loop outlives any one message
                self.metrics.command_errors.labels("internal").inc()
                log.error(
                    "command not answered",
                    extra={"kv": {"bytes": len(raw), "error": f"{type(exc).__name__}: {exc}"}},
                    exc_info=True,
                )

    async def _execute(self, cmd: Command) -> CommandResult:
        meter = self._meters[cmd.meter]
        line = self._line_of(meter)
        deadline_s = max(0.1, (cmd.expires_ms - self.now_ms()) / 1000)

        def result(
            status: str, detail: str = "", state: int | None = None, reason: str | None = None
        ) -> CommandResult:
            return CommandResult(
                cmd.id, cmd.gateway, cmd.meter, cmd.action, status, self.now_ms(), reason, detail, state
            )

        if not line.up:
            return result("failed", f"bus {line.cfg.name} is down", reason="bus_down")
        try:
            async with asyncio.timeout(deadline_s):
                if cmd.action in RELAY_ACTIONS:
                    return await self._relay(meter, cmd, Action(cmd.action), result)
                if cmd.action == Action.TIME_SYNC:  # meters keep local time, like the clock check
                    now = self.now_ms()
                    await meter.driver.set_clock(meter.ref, now + self._local_offset_ms(now))
                    self._event("clock_adjusted", meter.cfg.id, {"by": "command", "command": cmd.id})
                    return result("done")
                return await self._read_now(line, meter, cmd, result)
        except (AmigwError, NotImplementedError) as exc:
            return result("failed", f"{type(exc).__name__}: {exc}", reason=_failure_reason(exc))
        except TimeoutError:
            return result("failed", "deadline passed before the meter answered", reason="deadline")

    async def _read_now(
        self, line: _Line, meter: _Meter, cmd: Command, result: Callable[..., CommandResult]
    ) -> CommandResult:
        names = cmd.params.get("quantities") or [q for p in meter.plans for q in p.quantities]
        why = unreadable_quantity(meter.cfg, names)
        if why is not None:
            return result("failed", why, reason="unsupported")
        cycle = _Cycle(ad_hoc=True)
        plan = PlanConfig("read_now", tuple(dict.fromkeys(names)), 60, "register")
        failure = await self._read_meter(line.cfg, meter, [plan], cycle)
        self._store_cycle(cycle)
        if failure is not None:
            return result("failed", f"read failed: {failure}", reason=_failure_reason(failure))
        return result("done", "read stored")

    async def _relay(
        self, meter: _Meter, cmd: Command, action: Action, result: Callable[..., CommandResult]
    ) -> CommandResult:
        before = meter.relay_state
        meter.driver.require(meter.ref, Capability.RELAY)
        await meter.driver.control(meter.ref, action)
        if action not in _SWITCHING:
            self._relay_done(meter, cmd, None)
            return result("done")
        state = await meter.driver.read_relay_state(meter.ref)
        meter.relay_state = state
        if state != before:
            self._event("relay_changed", meter.cfg.id, {"from": before, "to": state, "command": cmd.id})
        expected = 1 if action is Action.TRIP else 0
        if state == expected:
            self._relay_done(meter, cmd, state)
            return result("done", "relay state verified by read-back", state)
        if action is Action.CLOSE_ALLOWED:
            self._relay_done(meter, cmd, state)
            return result("done", "closing allowed; relay stays open until the customer closes it", state)
        return result(
            "failed", f"relay state read back as {state}, expected {expected}", state, reason="not_verified"
        )

    def _relay_done(self, meter: _Meter, cmd: Command, state: int | None) -> None:
        log.info(
            "relay command done",
            extra={"kv": {"meter": meter.cfg.id, "action": cmd.action, "id": cmd.id, "relay_state": state}},
        )

    def _line_of(self, meter: _Meter) -> _Line:
        return self._lines[meter.cfg.bus]


_POWER_DOWN_COUNT = by_name("power_down_count").code
#: Relay actions that move the relay, verified by reading its state back.
_SWITCHING = frozenset({Action.TRIP, Action.CLOSE_ALLOWED, Action.DIRECT_CLOSE})


def _is_cumulative(code: int) -> bool:
    try:
        return by_code(code).kind == "cumulative"
    except KeyError:
        return False
