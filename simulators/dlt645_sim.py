"""A DL/T 645 bus simulator: several meters on one pseudo-terminal or TCP port, with fault injection.

    sim = Dlt645Simulator(["000000000001", "000000000002"], clock=fake_clock, load_kw=1.5)
    path = await sim.serve_pty()                    # the driver opens `path` with SerialTransport
    port = await sim.serve_tcp()                    # or a transparent serial server on 127.0.0.1
    sim.meter("000000000002").inject("bad_checksum", times=1)
    ... fake_clock advances one hour: +1.50 kWh on meter 1, split by its time-of-use schedule ...
    assert sim.reads[-1].di == 0x00010000           # every read answered, with its value
    await sim.aclose()

Model (per :class:`SimMeter`):

* **Energy** accumulates from a load profile (``load_kw``: a number or a function of the simulated
  epoch seconds, kW; negative = export into the reverse registers) while the meter is powered and its
  relay is closed, split into tariff registers 1..4 by a time-of-use schedule that the meter's own
  clock drives. Registers hold 0.01 kWh and roll over after 999999.99 kWh, like the real BCD ones.
* **Instantaneous values** follow the power: per-phase V, I = P / (V * PF), P, Q, S, PF, frequency;
  current and power are zero while the relay is open.
* **Relay** (0x1C): trip opens it (energy stops), close-allowed closes it (or only arms it with
  ``auto_close=False`` until :meth:`SimMeter.press_button`), direct close closes it; protect
  refuses trips. Wrong password -> error reply with the password bit; a deadline already past
  (meter clock) -> error reply "other". Status word 3: bit 4 relay open, bit 6 trip commanded,
  bit 7 alarm (reference §4.3).
* **Clock**: offset and drift (ppm) against simulated time; set by broadcast time sync (0x08,
  optionally bounded) or by writing 04000101/04000102 with the password.
* **Events**: power-down, relay trip/close, programming and time-set counters.

Time is injected: ``clock`` (default ``time.time``) and ``speed`` (simulated seconds per clock
second, for demos). Faults (:mod:`simulators.faults`) are set per meter at run time with
:meth:`SimMeter.inject`; register faults are :meth:`SimMeter.set_energy` (near 999999.99 for a
rollover) and :meth:`SimMeter.replace` (a new meter: registers restart near zero).

Line timing: with ``pace=True`` a request is taken as complete only when its bytes would have
arrived at ``baud`` (11 bits per character, 8E1), the meter waits ``turnaround_s``, and the reply
is emitted no faster than ``baud``. :attr:`Dlt645Simulator.reads` records every read answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import os
import termios
import time
import tty
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

from protocols.dlt645 import (
    BROADCAST_ADDRESS,
    ErrorBits,
    Frame,
    FrameDecoder,
    MeterDate,
    Password,
    ReadAddressRequest,
    ReadRequest,
    RelayCode,
    RelayControlRequest,
    Request,
    TimeSyncRequest,
    Value,
    WriteRequest,
    ack_response,
    decode_value,
    di_info,
    error_response,
    normalize_address,
    parse_request,
    read_address_response,
    read_followup_response,
    read_response,
)
from protocols.dlt645 import FollowupRequest as _Followup
from protocols.dlt645 import encode_value as _encode_value
from protocols.errors import FrameError
from protocols.quantities import ENERGY_REGISTER_MAX, by_name
from protocols.stream import NeedData
from simulators.faults import Fault, FaultKind, apply_fault

__all__ = ["DEFAULT_TOU", "Dlt645Simulator", "ReadRecord", "SimMeter"]

#: (start minute of the day, tariff 1..4): sharp 1, peak 2, flat 3, valley 4 (a common utility plan).
DEFAULT_TOU: Final = ((0, 4), (480, 3), (600, 2), (690, 1), (780, 3), (1020, 2), (1320, 4))
_MICRO: Final = 10_000  # register micro-kWh per 0.01 kWh
_WRAP: Final = (ENERGY_REGISTER_MAX + 1) * _MICRO
_CONTROL_PASSWORD: Final = Password(2, "000000")
_TIME_DIS: Final = (0x04000101, 0x04000102)

LoadProfile = float | Callable[[float], float]


@dataclass(frozen=True, slots=True)
class ReadRecord:
    """One read the simulator answered: ``value`` as encoded (DI decimals), ``ts`` simulated epoch s.
    ``fault`` names a fault that altered the bytes on the line (``None``: delivered intact)."""

    meter: str
    di: int
    value: Value
    ts: float
    fault: str | None = None


@dataclass(slots=True)
class _Answer:
    reply: bytes | None
    di: int | None = None
    value: Value = None


def _address_matches(requested: str, address: str) -> bool:
    """Byte by byte equal, or AA (wildcard / abbreviated addressing, reference §3.1)."""
    return all(requested[i : i + 2] in ("AA", address[i : i + 2]) for i in range(0, 12, 2))


class SimMeter:
    """One simulated meter. Its state advances lazily to ``now()`` whenever it is touched."""

    def __init__(
        self,
        address: str,
        *,
        now: Callable[[], float],
        edition: int = 2007,
        load_kw: LoadProfile = 1.0,
        power_factor: float = 0.95,
        voltage_v: float = 220.0,
        frequency_hz: float = 50.0,
        phases: int = 3,
        tou: tuple[tuple[int, int], ...] = DEFAULT_TOU,
        password: Password = _CONTROL_PASSWORD,
        clock_offset_s: float = 0.0,
        drift_ppm: float = 0.0,
        max_payload: int = 200,
        auto_close: bool = True,
        tz: dt.tzinfo | None = None,
        energy: int = 0,
    ) -> None:
        if edition not in (1997, 2007) or phases not in (1, 3) or not 0 < power_factor <= 1:
            raise ValueError("edition 1997/2007, phases 1/3 and 0 < power_factor <= 1")
        self.address, self.edition, self._now = normalize_address(address), edition, now
        self.load_kw, self.power_factor, self.voltage_v = load_kw, power_factor, voltage_v
        self.frequency_hz, self.phases, self.tou = frequency_hz, phases, tuple(sorted(tou))
        self.password, self.max_payload, self.auto_close, self.tz = password, max_payload, auto_close, tz
        self.drift_ppm, self._offset_s, self._t_ref = drift_ppm, clock_offset_s, now()
        self._t = now()
        self.relay_open = self.trip_commanded = self.armed = self.protected = self.alarm = False
        self.powered = True
        self._fwd, self._rev, self._frac = [energy * _MICRO, 0, 0, 0, energy * _MICRO], [0] * 5, 0.0
        self.counters = dict.fromkeys(
            ("power_down_count", "relay_trip_count", "relay_close_count", "programming_count",
             "time_set_count", "meter_clear_count", "cover_open_count"), 0)  # fmt: skip
        self.overrides: dict[str, int] = {}
        self.faults: list[Fault] = []
        self._pending: dict[int, list[bytes]] = {}

    # -- time ---------------------------------------------------------------------------------
    def meter_time(self, t: float | None = None) -> float:
        """The meter's clock (epoch s) at simulated time ``t`` (default now): offset + drift."""
        t = self._now() if t is None else t
        return t + self._offset_s + self.drift_ppm * 1e-6 * (t - self._t_ref)

    def local_time(self, t: float | None = None) -> dt.datetime:
        """The meter's clock as naive local wall time (what it puts on the wire)."""
        local = dt.datetime.fromtimestamp(self.meter_time(t), self.tz)
        return local.replace(tzinfo=None, microsecond=0)

    def set_local_time(self, when: dt.datetime) -> None:
        self._advance()
        target = when.replace(tzinfo=self.tz).timestamp() if self.tz else when.timestamp()
        t = self._now()
        self._offset_s, self._t_ref = target - t, t
        self.counters["time_set_count"] += 1

    def tariff_at(self, t: float) -> int:
        local = self.local_time(t)
        minute = local.hour * 60 + local.minute
        return next(tariff for start, tariff in reversed(self.tou) if start <= minute)

    def _next_boundary(self, t: float) -> float:
        local = dt.datetime.fromtimestamp(self.meter_time(t), self.tz)
        minute = local.hour * 60 + local.minute
        start = next((s for s, _ in self.tou if s > minute), 24 * 60)
        delta = (start - minute) * 60 - local.second - local.microsecond / 1e6
        return t + max(delta, 1e-3)

    # -- energy -------------------------------------------------------------------------------
    def load_at(self, t: float) -> float:
        """The load in kW at simulated time ``t`` (0 while powered down or tripped)."""
        if not self.powered or self.relay_open:
            return 0.0
        return float(self.load_kw(t) if callable(self.load_kw) else self.load_kw)

    def _advance(self) -> None:
        t1 = self._now()
        t = self._t
        while t < t1:
            end = min(t1, self._next_boundary(t), t + 60.0 if callable(self.load_kw) else t1)
            kw = self.load_at((t + end) / 2)
            self._frac += abs(kw) * 1e6 * (end - t) / 3600.0
            whole = int(self._frac)
            self._frac -= whole
            regs = self._fwd if kw >= 0 else self._rev
            for i in (0, self.tariff_at(t)):
                regs[i] = (regs[i] + whole) % _WRAP
            t = end
        self._t = max(self._t, t1)

    def energy(self, name: str = "energy_fwd_active_total") -> int:
        """A register in 0.01 kWh: ``energy_{fwd,rev}_active_{total,t1..t4}``."""
        self._advance()
        regs = self._fwd if "_fwd_" in name else self._rev
        index = 0 if name.endswith("_total") else int(name[-1])
        return regs[index] // _MICRO

    def set_energy(self, total: int, tariffs: tuple[int, int, int, int] | None = None) -> None:
        """Set the forward registers (0.01 kWh); without ``tariffs`` all of it is tariff 4.
        Near 99999999 this sets up a rollover."""
        self._advance()
        tariffs = tariffs if tariffs is not None else (0, 0, 0, total)
        self._fwd = [v * _MICRO for v in (total, *tariffs)]

    def replace(self, initial: int = 0) -> None:
        """A new meter at the same address: registers restart near zero, counters cleared."""
        self._advance()
        self.set_energy(initial)
        self._rev = [0] * 5
        self.counters = dict.fromkeys(self.counters, 0)

    def set_load(self, load_kw: LoadProfile) -> None:
        self._advance()
        self.load_kw = load_kw

    def power_off(self) -> None:
        self._advance()
        self.powered = False

    def power_on(self) -> None:
        self._advance()
        if not self.powered:
            self.powered = True
            self.counters["power_down_count"] += 1

    def press_button(self) -> None:
        """The customer closes an armed relay (after close-allowed with ``auto_close=False``)."""
        if self.armed and self.relay_open:
            self._set_relay(open_=False)

    def _set_relay(self, *, open_: bool) -> None:
        self._advance()
        if open_ != self.relay_open:
            self.counters["relay_trip_count" if open_ else "relay_close_count"] += 1
        self.relay_open, self.armed = open_, False

    # -- values -------------------------------------------------------------------------------
    def quantity_values(self) -> dict[str, int]:
        """Every quantity this meter knows, fixed point in the quantity's decimals."""
        self._advance()
        t = self._now()
        kw = self.load_at(t)
        live = ("a", "b", "c")[: self.phases]
        pf = self.power_factor if kw else 1.0
        v: dict[str, int] = {"frequency": round(self.frequency_hz * 100)}
        v["power_factor_total"] = round(pf * 1000)
        totals = {
            "power_active": round(kw * 1e4),
            "power_reactive": round(kw * math.tan(math.acos(pf)) * 1e4),
            "power_apparent": round(abs(kw) / pf * 1e4),
        }
        for stem, total in totals.items():  # phases share the total exactly (the first takes the rest)
            share = int(total / self.phases)
            for i, ph in enumerate(("a", "b", "c")):
                v[f"{stem}_{ph}"] = (
                    (total - share * (self.phases - 1) if i == 0 else share) if ph in live else 0
                )
            v[f"{stem}_total"] = total
        for ph in ("a", "b", "c"):
            on = ph in live
            v[f"voltage_{ph}"] = round(self.voltage_v * 10) if on else 0
            v[f"current_{ph}"] = round(kw / self.phases * 1e6 / (self.voltage_v * pf)) if on else 0
            v[f"power_factor_{ph}"] = round(pf * 1000) if on else 0
        v["demand_active"] = v["power_active_total"]
        for direction, regs in (("fwd", self._fwd), ("rev", self._rev)):
            v[f"energy_{direction}_active_total"] = regs[0] // _MICRO
            for i in range(1, 5):
                v[f"energy_{direction}_active_t{i}"] = regs[i] // _MICRO
        v["energy_combined_active_total"] = v["energy_fwd_active_total"]
        v["status_word_3"] = (self.relay_open << 4) | (self.trip_commanded << 6) | (self.alarm << 7)
        v["status_word_1"] = int(kw < 0) << 4
        v["meter_temperature"], v["clock_battery_voltage"], v["prepaid_balance"] = 250, 360, 0
        v.update(self.counters)
        v.update(self.overrides)
        return v

    def set_value(self, quantity: str, value: int) -> None:
        """Override one quantity's value (fixed point), e.g. ``prepaid_balance``."""
        by_name(quantity)
        self.overrides[quantity] = value

    def di_value(self, di: int) -> Value:
        """The value the meter answers for ``di``. Raises ``KeyError``: the meter has no such data."""
        info = di_info(di)
        if info.edition != self.edition:
            raise KeyError(f"DI {di:X} is not a DL/T 645-{self.edition} identifier")
        if info.fmt == "date":
            return MeterDate.from_date(self.local_time().date())
        if info.fmt == "time":
            return self.local_time().time()
        if info.name in ("comm_address", "meter_number"):
            return self.address
        if not info.quantities or None in info.quantities:
            raise KeyError(f"DI {di:X} is not simulated")
        values = self.quantity_values()
        items = tuple(_scale(values[q], q, info.decimals) for q in info.quantities if q is not None)
        return items[0] if info.count == 1 else items

    # -- faults -------------------------------------------------------------------------------
    def inject(
        self,
        kind: FaultKind | str,
        *,
        dis: Iterable[int] | None = None,
        times: int | None = None,
        delay_s: float = 0.0,
        error: int = int(ErrorBits.OTHER),
        garbage: bytes | None = None,
    ) -> Fault:
        """Add a fault (see :mod:`simulators.faults`); faults apply in the order added."""
        fault = Fault(FaultKind(kind), None if dis is None else frozenset(dis), times, delay_s, error)
        if garbage is not None:
            fault.garbage = garbage
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    def take_fault(self, di: int | None) -> Fault | None:
        for fault in self.faults:
            if fault.matches(di):
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times == 0:
                        self.faults.remove(fault)
                return fault
        return None

    # -- requests -----------------------------------------------------------------------------
    def answer(self, request: Request, control: int) -> _Answer:
        """The reply to one request addressed to this meter (``reply=None``: stays silent)."""
        if isinstance(request, ReadRequest):
            return self._read(request)
        if isinstance(request, _Followup):
            return self._followup(request)
        if isinstance(request, ReadAddressRequest):
            return _Answer(read_address_response(self.address))
        if self.edition != 2007:
            return _Answer(None)  # 1997 meters in this simulator only read
        if isinstance(request, RelayControlRequest):
            err = self._relay(request)
        elif isinstance(request, WriteRequest):
            err = self._write(request)
        else:
            err = int(ErrorBits.OTHER)
        if err:
            return _Answer(error_response(self.address, control, err))
        return _Answer(ack_response(self.address, control))

    def _read(self, request: ReadRequest) -> _Answer:
        di = request.di
        if request.edition != self.edition:
            return _Answer(None, di)
        try:
            value = self.di_value(di)
            raw = _encode_value(di, value)
        except (KeyError, ValueError):
            return _Answer(error_response(self.address, request.control, int(ErrorBits.NO_DATA)), di)
        room = self.max_payload - (4 if self.edition == 2007 else 2)
        if len(raw) <= room or self.edition == 1997:
            return _Answer(read_response(self.address, di, raw, edition=self.edition), di, value)
        chunks = [raw[:room]] + [raw[i : i + room - 1] for i in range(room, len(raw), room - 1)]
        self._pending[di] = chunks
        return _Answer(read_response(self.address, di, chunks[0], more=True), di, value)

    def _followup(self, request: _Followup) -> _Answer:
        chunks = self._pending.get(request.di, [])
        if not 1 <= request.seq < len(chunks):
            return _Answer(error_response(self.address, request.control, int(ErrorBits.NO_DATA)), request.di)
        more = request.seq < len(chunks) - 1
        reply = read_followup_response(self.address, request.di, chunks[request.seq], request.seq, more=more)
        return _Answer(reply, request.di)

    def _relay(self, request: RelayControlRequest) -> int:
        if request.password != self.password:
            return int(ErrorBits.UNAUTHORIZED)
        if request.valid_until < self.local_time():
            return int(ErrorBits.OTHER)  # the command's deadline has passed (reference §5.9)
        action = request.action
        if action == RelayCode.TRIP:
            if self.protected:
                return int(ErrorBits.OTHER)
            self.trip_commanded = True
            self._set_relay(open_=True)
        elif action == RelayCode.CLOSE_ALLOWED:
            self.trip_commanded = False
            if self.auto_close:
                self._set_relay(open_=False)
            else:
                self.armed = self.relay_open
        elif action in (RelayCode.DIRECT_CLOSE, RelayCode.PROTECT):
            self.trip_commanded = False
            self._set_relay(open_=False)
            self.protected = self.protected or action == RelayCode.PROTECT
        elif action == RelayCode.PROTECT_RELEASE:
            self.protected = False
        else:
            self.alarm = action == RelayCode.ALARM
        return 0

    def _write(self, request: WriteRequest) -> int:
        if request.password != self.password:
            return int(ErrorBits.UNAUTHORIZED)
        if request.di not in _TIME_DIS:
            return int(ErrorBits.OTHER)
        try:
            value = decode_value(request.di, request.data)
        except FrameError:
            return int(ErrorBits.OTHER)
        now = self.local_time()
        if isinstance(value, MeterDate):
            self.set_local_time(dt.datetime.combine(value.to_date(), now.time()))
        elif isinstance(value, dt.time):
            self.set_local_time(dt.datetime.combine(now.date(), value))
        self.counters["programming_count"] += 1
        return 0


def _scale(value: int, quantity: str, decimals: int) -> int:
    """Quantity fixed point -> the DI's decimals (1997 voltage is whole volts), truncating."""
    shift = decimals - by_name(quantity).decimals
    if shift >= 0:
        return value * int(10**shift)
    whole = abs(value) // int(10**-shift)
    return -whole if value < 0 else whole


class _Line:
    """One half-duplex line (the pty, or one TCP connection): requests in, (paced) replies out."""

    def __init__(self, sim: Dlt645Simulator, write: Callable[[bytes], None], name: str) -> None:
        self.sim, self.write = sim, write
        self.decoder = FrameDecoder()
        self.queue: asyncio.Queue[tuple[Frame, float]] = asyncio.Queue()
        self.rx_start, self.fed = 0.0, 0
        self.task = asyncio.create_task(self._serve(), name=f"dlt645-sim-{name}")

    def received(self, data: bytes) -> None:
        now = asyncio.get_running_loop().time()
        if self.decoder.buffered == 0:
            self.rx_start, self.fed = now, 0
        self.fed += len(data)
        try:
            self.decoder.feed(data)
        except FrameError:
            self.decoder = FrameDecoder()
            return
        while True:
            try:
                result = self.decoder.next()
            except FrameError:
                continue  # a corrupt request: a meter ignores it
            if isinstance(result, NeedData):
                return
            if isinstance(result, Frame):
                end = self.rx_start + (self.fed - self.decoder.buffered) * self.sim.char_s
                self.queue.put_nowait((result, max(end, now) if self.sim.pace else now))
                self.rx_start, self.fed = end, self.decoder.buffered

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frame, end = await self.queue.get()
            reply, delay_s = self.sim.handle(frame)
            if reply is None:
                continue
            wait = end + self.sim.turnaround_s + delay_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._emit(reply)

    async def _emit(self, data: bytes) -> None:
        if not self.sim.pace:
            self.write(data)
            return
        loop = asyncio.get_running_loop()
        start, sent, char_s = loop.time(), 0, self.sim.char_s
        while sent < len(data):
            done = min(len(data), int((loop.time() - start) / char_s))
            if done > sent:
                self.write(data[sent:done])
                sent = done
            if sent < len(data):
                await asyncio.sleep(max(0.0, start + (sent + 1) * char_s - loop.time()))


@dataclass(slots=True)
class _Pty:
    master: int
    slave: int
    line: _Line
    attrs: list[Any] = field(default_factory=list)


class Dlt645Simulator:
    """Meters on one simulated RS-485 line; serve it on a pty and/or a TCP port."""

    def __init__(
        self,
        meters: Iterable[str] = ("000000000001",),
        *,
        clock: Callable[[], float] = time.time,
        speed: float = 1.0,
        start_epoch_s: float | None = None,
        baud: int = 2400,
        pace: bool = False,
        turnaround_s: float | None = None,
        reply_preamble: int = 0,
        broadcast_sync_limit_s: float | None = None,
        **meter_options: object,
    ) -> None:
        """``meter_options`` are :class:`SimMeter` keyword arguments applied to every meter.
        ``turnaround_s`` defaults to 20 ms when pacing (the minimum Td, reference §1), else 0."""
        if speed <= 0 or baud <= 0 or not 0 <= reply_preamble <= 4:
            raise ValueError("speed and baud must be positive, reply_preamble 0..4")
        self._clock, self.speed = clock, speed
        self._c0 = clock()
        self._t0 = self._c0 if start_epoch_s is None else start_epoch_s
        self.baud, self.pace, self.char_s = baud, pace, 11 / baud
        self.turnaround_s = turnaround_s if turnaround_s is not None else (0.02 if pace else 0.0)
        self.reply_preamble, self.broadcast_sync_limit_s = reply_preamble, broadcast_sync_limit_s
        self.meter_options = meter_options
        self.meters: dict[str, SimMeter] = {}
        for address in meters:
            self.add_meter(address)
        #: Every read answered, in order (see :class:`ReadRecord`).
        self.reads: list[ReadRecord] = []
        self.requests = 0
        self._ptys: list[_Pty] = []
        self._servers: list[asyncio.Server] = []
        self._lines: list[_Line] = []
        self._clients: set[asyncio.StreamWriter] = set()

    def now(self) -> float:
        """Simulated epoch seconds."""
        return self._t0 + (self._clock() - self._c0) * self.speed

    def add_meter(self, address: str, **options: object) -> SimMeter:
        meter = SimMeter(address, now=self.now, **(self.meter_options | options))  # type: ignore[arg-type]
        self.meters[meter.address] = meter
        return meter

    def meter(self, address: str) -> SimMeter:
        """The meter at ``address``. ``KeyError`` when there is none."""
        return self.meters[normalize_address(address)]

    # -- the bus ------------------------------------------------------------------------------
    def handle(self, frame: Frame) -> tuple[bytes | None, float]:
        """Reply bytes for one request frame seen on the line (``None``: silence), and extra delay."""
        self.requests += 1
        try:
            request = parse_request(frame)
        except FrameError:
            return None, 0.0
        if frame.address == BROADCAST_ADDRESS:
            if isinstance(request, TimeSyncRequest):
                self._time_sync(request.when)
            return None, 0.0
        targets = [
            m for m in self.meters.values() if m.powered and _address_matches(frame.address, m.address)
        ]
        if len(targets) != 1:  # nobody, or a collision of several answers on the line
            answers = [m.answer(request, frame.control).reply or b"" for m in targets]
            return (_collide(answers) if len(targets) > 1 else None), 0.0
        meter = targets[0]
        answer = meter.answer(request, frame.control)
        fault = meter.take_fault(answer.di)
        reply, delay_s = answer.reply, 0.0
        if reply is not None and fault is not None:
            if fault.kind is FaultKind.ERROR_REPLY:
                reply = error_response(meter.address, frame.control, fault.error)
            elif fault.kind is FaultKind.DELAY:
                delay_s = fault.delay_s
            else:
                reply = apply_fault(fault, reply)
        answered = answer.value is not None and (fault is None or fault.kind is not FaultKind.ERROR_REPLY)
        if reply is not None and answer.di is not None and answered:
            altered = None if fault is None or fault.kind is FaultKind.DELAY else str(fault.kind)
            self.reads.append(ReadRecord(meter.address, answer.di, answer.value, self.now(), altered))
        if reply is not None:
            reply = b"\xfe" * self.reply_preamble + reply
        return reply, delay_s

    def _time_sync(self, when: dt.datetime) -> None:
        for meter in self.meters.values():
            if not meter.powered:
                continue
            skew = abs((when - meter.local_time()).total_seconds())
            if self.broadcast_sync_limit_s is None or skew <= self.broadcast_sync_limit_s:
                meter.set_local_time(when)

    # -- transports ---------------------------------------------------------------------------
    async def serve_pty(self) -> str:
        """Serve the line on a new pseudo-terminal; returns the slave path for ``SerialTransport``."""
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)

        def write(data: bytes) -> None:
            with contextlib.suppress(BlockingIOError, OSError):  # nobody reading: the bytes are lost
                os.write(master, data)

        pty = _Pty(master, slave, _Line(self, write, f"pty{len(self._ptys)}"), termios.tcgetattr(slave))
        self._ptys.append(pty)
        asyncio.get_running_loop().add_reader(master, self._on_pty, pty)
        return os.ttyname(slave)

    def _on_pty(self, pty: _Pty) -> None:
        try:
            data = os.read(pty.master, 4096)
        except (BlockingIOError, OSError):
            return
        if data:
            # pyserial leaves its line settings (speed, parity) on the pty when it closes, and the next
            # process's open then fails with termios EINVAL; a pty ignores them, so put ours back.
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(pty.slave, termios.TCSANOW, pty.attrs)
            pty.line.received(data)

    async def serve_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve the line on TCP (a transparent serial server); returns the bound port."""
        server = await asyncio.start_server(self._on_tcp, host, port)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = _Line(self, writer.write, f"tcp{len(self._lines)}")
        self._lines.append(line)
        self._clients.add(writer)
        try:
            while data := await reader.read(4096):
                line.received(data)
        except OSError:
            pass
        finally:
            line.task.cancel()
            self._clients.discard(writer)
            writer.close()

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        for pty in self._ptys:
            loop.remove_reader(pty.master)
            pty.line.task.cancel()
            for fd in (pty.master, pty.slave):
                with contextlib.suppress(OSError):
                    os.close(fd)
        for line in self._lines:
            line.task.cancel()
        for server in self._servers:
            server.close()
        for writer in list(self._clients):  # a serial server that goes away drops its clients
            writer.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._ptys, self._lines, self._servers = [], [], []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _collide(answers: list[bytes]) -> bytes:
    """Several meters talking at once: the line carries the bitwise OR (RS-485 wired, roughly)."""
    out = bytearray(max(map(len, answers)))
    for answer in answers:
        for i, b in enumerate(answer):
            out[i] |= b
    return bytes(out)
