"""DL/T 645 meters (2007 and 1997 editions) on a shared :class:`~drivers.bus.Bus`.

One driver serves both editions: the edition comes from ``MeterRef.protocol`` (``"dlt645-2007"``
or ``"dlt645-1997"``, the two names :data:`drivers.base.DRIVERS` registers it under). It runs on a
serial line or a transparent serial server (never its own connection); 2007 meters can do every
:class:`~drivers.base.Capability`, 1997 meters have no relay control and no read-address command.

Every request goes out with ``preamble`` wake-up ``FE`` bytes (reference
§1: masters send 4). One :meth:`Dlt645Driver.read` is one bus transaction (a short sequence of
request/answer pairs with one meter), each exchange under the bus's adaptive per-device timeout.

Errors, and what is retried (``retries`` extra attempts per request):

* no (complete) answer -> retried, then ``TransportTimeout``; the rest of that read is abandoned
  (the meter is unreachable, the bus moves on);
* a checksum or framing error, a reply for another DI, or a reply from another address (ignored
  while listening; reported as ``FramingError`` if nothing else came) -> retried, then raised;
* an error reply (control D6 set) is the meter's answer and is never retried: for a read it flags
  that DI's quantities ``Flag.METER_ERROR`` (value 0) and the other quantities are still read;
  for a command it raises ``MeterErrorReply`` with the ERR bits named (reference §6).

Multi-frame answers (D5 set, 0xB1/0xB2) are completed with follow-up requests (0x12, SEQ 1, 2, ...;
reference §7, SEQ numbering UNCONFIRMED). Block DIs (a DI byte of FF: ``0001FF00`` total + tariffs,
``0201FF00`` voltages ...) replace two or more single reads when ``use_blocks`` is on; a meter that
refuses a block is remembered and read item by item from then on.

The field tool's raw option is ``--di HEX`` (:meth:`Dlt645Driver.raw_reads`): data identifiers
read as they are, decoded when the registry knows them; ``--discover`` is the base driver's
(the lone meter's address, 0x13).
"""

from __future__ import annotations

import argparse
import calendar
import collections
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Self

from drivers.base import (
    Capability,
    DriverSetup,
    FieldRead,
    FieldRow,
    MeterDriver,
    MeterRef,
    MeterSpec,
    QuantityReading,
    ReadResult,
)
from drivers.bus import Bus, BusTransaction
from drivers.lines import TransportKind
from protocols.commands import Action
from protocols.dlt645 import (
    BROADCAST_ADDRESS,
    REGISTRY,
    RELAY_CODES,
    WILDCARD_ADDRESS,
    AddressReply,
    ControlCode,
    DataIdentifier,
    Frame,
    FrameDecoder,
    MeterDate,
    Password,
    RelayControlRequest,
    TimeSyncRequest,
    WriteRequest,
    check_reply,
    decode_read_response,
    decode_value,
    di_for_quantity,
    di_info,
    encode_frame,
    encode_value,
    normalize_address,
    parse_response,
    quantity_map,
    relay_state,
)
from protocols.errors import (
    ConfigError,
    FrameError,
    FramingError,
    MeterErrorReply,
    ProtocolError,
    TransportTimeout,
)
from protocols.quantities import Quantity, by_name
from protocols.stream import NeedData, Skipped

__all__ = ["DEFAULT_CONTROL_PASSWORD", "Dlt645Driver", "parse_password"]

#: Plaintext 0x1C password when the meter has none configured: level 02, 000000 (reference §5.9,
#: G-esp; which level a meter accepts is UNCONFIRMED, so MeterRef.password overrides it).
DEFAULT_CONTROL_PASSWORD: Final = Password(2, "000000")
_MAX_FOLLOWUPS: Final = 32
_DATE_DI: Final = {2007: 0x04000101, 1997: 0xC010}
_TIME_DI: Final = {2007: 0x04000102, 1997: 0xC011}
_STATUS_WORD_3: Final = 0x04000503


def parse_password(text: str | None) -> Password:
    """``MeterRef.password`` text -> :class:`Password`.

    ``"02123456"`` is level 02 with password 123456; six digits (``"123456"``) keep level 02.

    Raises:
        ConfigError: neither 6 nor 8 hex digits.
    """
    if not text:
        return DEFAULT_CONTROL_PASSWORD
    t = text.strip().upper()
    try:
        if len(t) == 8:
            return Password(int(t[:2], 16), t[2:])
        return Password(DEFAULT_CONTROL_PASSWORD.level, t)
    except ValueError as exc:
        raise ConfigError(
            "meters[].password", f"expected PAP0P1P2 (8 hex digits) or 6 digits: {exc}"
        ) from None


@dataclass(frozen=True, slots=True)
class _Plan:
    """One DI to read and the quantities (with their item index in the DI's value) it serves."""

    info: DataIdentifier
    items: tuple[tuple[Quantity, int], ...]


_Readings = dict[int, QuantityReading]


class _ReplyDecoder:
    """A :class:`FrameDecoder` that hunts past frames which are not replies from ``address``.

    Requests (our own echo) and replies from other meters are hunted over like garbage; the last
    foreign reply is kept so that a timeout can say what was heard instead.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.foreign: Frame | None = None
        self._inner = FrameDecoder()

    def feed(self, data: bytes) -> None:
        self._inner.feed(data)

    def next(self) -> Frame | Skipped | NeedData:
        result = self._inner.next()
        if isinstance(result, Frame) and (
            not result.is_response or (self.address is not None and result.address != self.address)
        ):
            self.foreign = result
            return Skipped(len(result.encode()), f"frame from {result.address}, not a reply to us")
        return result


def _meter_epoch_ms(day: dt.date, clock: dt.time) -> int:
    """Meter-local date and time as UTC-naive epoch ms (the ``meter_clock`` convention)."""
    return calendar.timegm(dt.datetime.combine(day, clock).timetuple()) * 1000


class Dlt645Driver(MeterDriver):
    """DL/T 645-2007 and -1997 meters on one bus (see the module docstring for the error rules)."""

    protocol = "dlt645-2007"
    family = "DL/T 645"
    transports = (TransportKind.SERIAL, TransportKind.SERIAL_SERVER)

    def __init__(
        self,
        bus: Bus,
        *,
        retries: int = 1,
        preamble: int = 4,
        use_blocks: bool = True,
        read_meter_clock: bool = False,
        relay_validity_s: float = 600.0,
        clock_method: str = "broadcast",
        local_now: Callable[[], dt.datetime] = dt.datetime.now,
        time_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        key: Hashable = "dlt645",
    ) -> None:
        """``local_now`` gives meter-local wall time (relay validity deadlines); ``time_ms`` the read
        timestamp. ``clock_method`` is ``"broadcast"`` (0x08 to 99..99: every meter on the line) or
        ``"write"`` (0x14 to 04000101/04000102 with the meter's password, acknowledged)."""
        if retries < 0 or not 0 <= preamble <= 4:
            raise ValueError("need retries >= 0 and preamble in 0..4")
        if clock_method not in ("broadcast", "write"):
            raise ValueError(f"clock_method {clock_method!r} not 'broadcast' or 'write'")
        self._bus, self.retries, self.preamble = bus, retries, preamble
        self.use_blocks, self.read_meter_clock = use_blocks, read_meter_clock
        self.relay_validity_s, self.clock_method = relay_validity_s, clock_method
        self._local_now, self._time_ms, self.key = local_now, time_ms, key
        self._no_blocks: set[tuple[str, int]] = set()
        #: Counters: transactions, requests, retries, timeouts, frame_errors, error_replies.
        self.stats: collections.Counter[str] = collections.Counter()
        self._opened = True

    # -- what the class says about itself -----------------------------------------------------

    @classmethod
    def open(cls, setup: DriverSetup) -> Dlt645Driver:
        """On the line's shared bus; relay-command deadlines in the meters' local time."""
        if setup.bus is None:
            raise ConfigError(
                "port", f"{setup.port.text}: DL/T 645 meters need a serial line or serial server"
            )
        return cls(setup.bus, retries=setup.retries, local_now=setup.local_now)

    @classmethod
    def serial_defaults(cls, protocol: str) -> tuple[int, str]:
        return (1200 if cls.edition_of(protocol) == 1997 else 2400), "E"

    @classmethod
    def capabilities(cls, protocol: str) -> frozenset[Capability]:
        if cls.edition_of(protocol) == 1997:  # no 0x1C relay control, no 0x13 read address
            return frozenset({Capability.CLOCK_READ, Capability.CLOCK_SET})
        return frozenset(Capability)

    @classmethod
    def check_meter(cls, meter: MeterSpec) -> None:
        cls.edition_of(meter.protocol)
        if not (len(meter.address) == 12 and meter.address.isdigit()):
            raise ConfigError("address", f"a DL/T 645 address is 12 digits, got {meter.address!r}")

    @classmethod
    def quantities(cls, meter: MeterSpec) -> tuple[Quantity, ...]:
        names = [*quantity_map(cls.edition_of(meter.protocol)), "meter_clock"]
        return tuple(by_name(n) for n in dict.fromkeys(names))

    @classmethod
    def why_unreadable(cls, meter: MeterSpec, names: Iterable[str]) -> str | None:
        edition = cls.edition_of(meter.protocol)
        for name in names:
            if name == "meter_clock":
                continue  # read as date and time, not one DI
            try:
                di_for_quantity(name, edition)
            except KeyError as exc:
                return str(exc.args[0])
        return None

    @staticmethod
    def edition_of(protocol: str) -> int:
        """2007 or 1997. Raises ``ConfigError`` (key ``protocol``) for another protocol name."""
        editions = {"dlt645-2007": 2007, "dlt645-1997": 1997}
        if protocol not in editions:
            raise ConfigError("protocol", f"{protocol!r} is not DL/T 645")
        return editions[protocol]

    # -- the field tool (amigw read) -----------------------------------------------------------

    @classmethod
    def add_raw_options(cls, group: argparse._ArgumentGroup) -> Sequence[argparse.Action]:
        help_ = "raw data identifier, repeatable: 8 hex digits (4 for -1997)"
        return (group.add_argument("--di", action="append", default=[], metavar="HEX", help=help_),)

    @classmethod
    def raw_reads(cls, protocol: str, options: argparse.Namespace) -> FieldRead[Self] | None:
        """``--di HEX ...`` of the ``--address`` meter; each DI must fit the edition (4 bytes
        for 2007, 2 for 1997)."""
        if not options.di:
            return None
        edition = cls.edition_of(protocol)
        dis = [_raw_di(text, edition) for text in options.di]
        if options.address is None:
            raise ConfigError("--di", "needs the meter: --address")
        try:
            meter = MeterRef(options.address, options.address, protocol)
        except ConfigError as exc:
            raise ConfigError("--address", exc.reason) from None

        async def read_dis(driver: Self) -> AsyncIterator[FieldRow | str]:
            for di in dis:
                label = f"{di:08X}" if edition == 2007 else f"{di:04X}"
                try:
                    raw = await driver.read_di(meter, di)
                except MeterErrorReply as exc:
                    yield FieldRow(meter.address, "di", label, error=exc)
                    continue
                try:
                    info = di_info(di)
                except KeyError:
                    yield FieldRow(
                        meter.address, "di", label, raw.hex(), "raw", label=f"{label} (unknown DI)"
                    )
                    continue
                value = decode_value(di, raw)
                shown = (
                    _fixed(value, info.decimals)
                    if isinstance(value, int) and info.fmt == "bcd"
                    else str(value)
                )
                yield FieldRow(meter.address, "di", label, shown, info.unit, label=f"{label} {info.name}")

        return read_dis

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def bus(self) -> Bus:
        """The shared line (RS-485 or a serial server) this driver talks on."""
        return self._bus

    def device_key(self, meter: MeterRef | str) -> Hashable:
        """The bus device key of ``meter`` (to ``bus.configure_device`` its timeout and gap)."""
        address = meter.address if isinstance(meter, MeterRef) else meter
        return (self.key, normalize_address(address))

    @classmethod
    def edition(cls, meter: MeterSpec) -> int:
        try:
            return cls.edition_of(meter.protocol)
        except ConfigError as exc:
            raise ConfigError(f"meters[{meter.id}].protocol", exc.reason) from None

    async def _request(
        self, tx: BusTransaction, address: str | None, control: int, payload: bytes, di: int | None = None
    ) -> Frame:
        """Send one request to ``address`` (None: whoever answers) and return the checked reply.

        Retries timeouts, frame errors and mismatched replies; never an error reply.

        Raises:
            TransportTimeout, FrameError, ProtocolError (after the retries), MeterErrorReply.
        """
        target = address if address is not None else WILDCARD_ADDRESS
        wire = encode_frame(target, control, payload, preamble=self.preamble)
        for attempt in range(self.retries + 1):
            self.stats["requests"] += 1
            decoder = _ReplyDecoder(address)
            try:
                frame = await tx.exchange(wire, decoder)
                if not isinstance(frame, Frame):  # pragma: no cover - FrameDecoder returns nothing else
                    raise FramingError(f"decoder returned {frame!r}")
                return check_reply(frame, control, di=di)
            except MeterErrorReply:
                self.stats["error_replies"] += 1
                raise
            except TransportTimeout as exc:
                failure: ProtocolError | TransportTimeout = exc
                if decoder.foreign is not None:
                    heard = decoder.foreign
                    failure = FramingError(f"only a frame from {heard.address} (control {heard.control:02X})"
                                           f" answered {target}", heard.encode())  # fmt: skip
                    self.stats["frame_errors"] += 1
                else:
                    self.stats["timeouts"] += 1
            except ProtocolError as exc:  # checksum, framing, a reply to another request
                failure = exc
                self.stats["frame_errors"] += 1
            if attempt == self.retries:
                raise failure
            self.stats["retries"] += 1
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_di(self, tx: BusTransaction, address: str, di: int, edition: int) -> bytes:
        """The value bytes of ``di``, following up multi-frame answers. Raises as ``_request``."""
        width = 4 if edition == 2007 else 2
        control = ControlCode.READ if edition == 2007 else 0x01
        frame = await self._request(tx, address, control, di.to_bytes(width, "little"), di)
        reply = decode_read_response(frame, di=di)
        data, seq = reply.data, 0
        while reply.more:
            seq += 1
            if edition != 2007 or seq > _MAX_FOLLOWUPS:
                raise FramingError(f"DI {di:08X}: follow-up frame {seq} not supported", reply.data)
            payload = di.to_bytes(4, "little") + bytes((seq,))
            frame = await self._request(tx, address, ControlCode.READ_FOLLOWUP, payload, di)
            reply = decode_read_response(frame, di=di)
            data += reply.data
        return data

    # -- reads --------------------------------------------------------------------------------

    def _plan(self, meter: MeterRef, quantities: Sequence[Quantity]) -> list[_Plan]:
        edition, address = self.edition(meter), normalize_address(meter.address)
        singles: dict[int, list[tuple[Quantity, int]]] = {}
        for q in quantities:
            if q.name == "meter_clock":
                continue  # read as date + time, see _read_clock
            try:
                info = di_for_quantity(q.name, edition)
            except KeyError as exc:
                raise ConfigError(f"meters[{meter.id}].quantities", str(exc.args[0])) from None
            singles.setdefault(info.di, []).append((q, 0))
        plans: list[_Plan] = []
        if self.use_blocks:
            for block in _blocks(edition):
                if (address, block.di) in self._no_blocks:
                    continue
                hits = [
                    (q, block.quantities.index(q.name))
                    for items in singles.values()
                    for q, _ in items
                    if q.name in block.quantities
                ]
                if len({q.code for q, _ in hits}) >= 2:
                    for q, _ in hits:
                        singles.pop(di_for_quantity(q.name, edition).di, None)
                    plans.append(_Plan(block, tuple(hits)))
        plans.extend(_Plan(REGISTRY[di], tuple(items)) for di, items in singles.items())
        return plans

    async def _read_plan(
        self, tx: BusTransaction, meter: MeterRef, plan: _Plan
    ) -> dict[int, QuantityReading]:
        address, edition, info = normalize_address(meter.address), self.edition(meter), plan.info
        try:
            raw = await self._read_di(tx, address, info.di, edition)
        except MeterErrorReply as exc:
            if info.count > 1:  # the meter has no block read: item by item, now and later
                self._no_blocks.add((address, info.di))
                return await self._read_singles(tx, meter, plan)
            return {q.code: QuantityReading(q, 0, exc) for q, _ in plan.items}
        out: dict[int, QuantityReading] = {}
        try:
            value = decode_value(info.di, raw)
        except FrameError as exc:  # a checksummed answer whose bytes do not fit the DI's format
            return {q.code: QuantityReading(q, 0, exc) for q, _ in plan.items}
        for q, index in plan.items:
            if isinstance(value, tuple) and index >= len(value):  # fewer tariffs than asked for
                out |= await self._read_singles(tx, meter, _Plan(info, ((q, index),)))
                continue
            try:
                item = value[index] if isinstance(value, tuple) else value
                out[q.code] = QuantityReading(q, _to_quantity(q, info, item))
            except FrameError as exc:
                out[q.code] = QuantityReading(q, 0, exc)
        return out

    async def _read_singles(
        self, tx: BusTransaction, meter: MeterRef, plan: _Plan
    ) -> dict[int, QuantityReading]:
        out: dict[int, QuantityReading] = {}
        for q, _ in plan.items:
            single = di_for_quantity(q.name, self.edition(meter))
            out |= await self._read_plan(tx, meter, _Plan(single, ((q, 0),)))
        return out

    async def _read_clock(self, tx: BusTransaction, meter: MeterRef) -> int:
        """The meter's clock (date + time DIs) as UTC-naive epoch ms. Raises as ``_request``."""
        address, edition = normalize_address(meter.address), self.edition(meter)

        async def item(table: dict[int, int]) -> object:
            return decode_value(table[edition], await self._read_di(tx, address, table[edition], edition))

        day, clock = await item(_DATE_DI), await item(_TIME_DI)
        if isinstance(clock, dt.time) and clock < dt.time(0, 0, 5):  # the date may predate midnight
            day = await item(_DATE_DI)
        if not isinstance(day, MeterDate) or not isinstance(clock, dt.time):
            raise FramingError(f"meter {address} clock is {day!r} {clock!r}")
        return _meter_epoch_ms(day.to_date(), clock)

    async def read_detailed(self, meter: MeterRef, quantities: Sequence[Quantity]) -> list[QuantityReading]:
        """Like :meth:`read`, keeping each refusal's :class:`MeterErrorReply` (for ``amigw read``)."""
        readings, _ = await self._read_detailed(meter, quantities, meter_clock=False)
        return readings

    async def _read_detailed(
        self, meter: MeterRef, quantities: Sequence[Quantity], *, meter_clock: bool | None = None
    ) -> tuple[list[QuantityReading], int | None]:
        """The readings in the order asked and the meter clock (epoch ms) when read."""
        want_clock = self.read_meter_clock if meter_clock is None else meter_clock
        want_clock = want_clock or any(q.name == "meter_clock" for q in quantities)
        plans = self._plan(meter, quantities)
        got: dict[int, QuantityReading] = {}
        meter_ts: int | None = None
        clock_q = by_name("meter_clock")
        async with self.bus.transaction(device=self.device_key(meter)) as tx:
            self.stats["transactions"] += 1
            for plan in plans:
                got |= await self._read_plan(tx, meter, plan)
            if want_clock:
                try:
                    meter_ts = await self._read_clock(tx, meter)
                    got[clock_q.code] = QuantityReading(clock_q, meter_ts)
                except (MeterErrorReply, FramingError) as exc:
                    got[clock_q.code] = QuantityReading(clock_q, 0, exc)
        return [got[q.code] for q in quantities], meter_ts

    async def read(
        self, meter: MeterRef, quantities: Sequence[Quantity], *, meter_clock: bool | None = None
    ) -> ReadResult:
        """Read ``quantities``; ``meter_clock`` (default: the constructor's ``read_meter_clock``)
        also reads the meter's date and time (two more requests) into ``meter_ts_ms``.

        Raises:
            TransportTimeout: the meter did not answer (after retries).
            FrameError, ProtocolError: the answers stayed corrupt (after retries).
            ConfigError: a quantity no DI of the meter's edition carries.
        """
        read_ts_ms = self._time_ms()
        readings, meter_ts = await self._read_detailed(meter, quantities, meter_clock=meter_clock)
        values = tuple((r.quantity.code, r.value, r.flags) for r in readings)
        return ReadResult(meter.id, read_ts_ms, values, meter_ts)

    async def read_clock(self, meter: MeterRef) -> int:
        """The meter's date and time (two requests) as UTC-naive epoch ms. Raises as :meth:`read`."""
        async with self.bus.transaction(device=self.device_key(meter)) as tx:
            self.stats["transactions"] += 1
            return await self._read_clock(tx, meter)

    async def read_di(self, meter: MeterRef, di: int) -> bytes:
        """The raw value bytes of one DI (the field tool's ``--di``).

        Raises:
            MeterErrorReply: the meter refused; otherwise as :meth:`read`.
        """
        async with self.bus.transaction(device=self.device_key(meter)) as tx:
            self.stats["transactions"] += 1
            return await self._read_di(tx, normalize_address(meter.address), di, self.edition(meter))

    async def read_address(self, meter: MeterRef | None = None) -> str:
        """Ask the only meter on the line for its address (0x13 to AA..AA; 2007 only).

        Raises:
            TransportTimeout: nobody answered; FrameError: an unreadable answer (two meters collide).
        """
        if meter is not None and self.edition(meter) == 1997:
            raise NotImplementedError("DL/T 645-1997 has no read-address command")
        async with self.bus.transaction(device=self.device_key(WILDCARD_ADDRESS)) as tx:
            self.stats["transactions"] += 1
            reply = parse_response(await self._request(tx, None, ControlCode.READ_ADDRESS, b""))
        if not isinstance(reply, AddressReply):  # pragma: no cover - parse_response guarantees it
            raise ProtocolError(f"unexpected reply {reply!r}")
        return reply.address

    # -- commands -----------------------------------------------------------------------------

    async def _command(self, meter: MeterRef, control: int, payload: bytes, di: int | None = None) -> None:
        async with self.bus.transaction(device=self.device_key(meter)) as tx:
            self.stats["transactions"] += 1
            await self._request(tx, normalize_address(meter.address), control, payload, di)

    async def control(self, meter: MeterRef, action: Action) -> None:
        """Relay / alarm / protect command (0x1C) with the meter's password and operator code.

        The deadline N3..N8 is meter-local now + ``relay_validity_s``.

        Raises:
            MeterErrorReply: refused (``reasons`` names the bits: password, other ...).
            NotImplementedError: a 1997 meter (no 0x1C). TransportTimeout / FrameError as :meth:`read`.
        """
        if self.edition(meter) == 1997:
            raise NotImplementedError("DL/T 645-1997 has no relay control code")
        if action not in RELAY_CODES:
            raise NotImplementedError(f"{action} is not a relay action")
        until = (self._local_now() + dt.timedelta(seconds=self.relay_validity_s)).replace(microsecond=0)
        request = RelayControlRequest(
            RELAY_CODES[action], until, parse_password(meter.password),
            (meter.operator or "00000000").upper(),
        )  # fmt: skip
        await self._command(meter, request.control, request.payload())

    async def read_relay_state(self, meter: MeterRef) -> int:
        """Status word 3 (04000503) bit 4: 0 closed, 1 open (reference §4.3). Raises as :meth:`read_di`."""
        if self.edition(meter) == 1997:
            raise NotImplementedError("DL/T 645-1997 meters have no status word 3")
        word = decode_value(_STATUS_WORD_3, await self.read_di(meter, _STATUS_WORD_3))
        if not isinstance(word, int):  # pragma: no cover - "bits" decodes to int
            raise FramingError(f"status word 3 decoded to {word!r}")
        return relay_state(word)

    async def set_clock(self, meter: MeterRef, epoch_ms: int, *, broadcast: bool | None = None) -> None:
        """Set the clock to ``epoch_ms`` (meter-local time as UTC-naive epoch ms); ``broadcast``
        overrides the constructor's ``clock_method`` for this call (True: broadcast, False: write).

        ``clock_method="broadcast"``: time sync 0x08 to 99..99 (reference §5): every meter on the line
        takes it and none answers, so nothing can be verified here -- read the clock back.
        ``"write"``: 0x14 writes of 04000101 (date) and 04000102 (time) with the meter's password.

        Raises:
            MeterErrorReply: a refused write. TransportTimeout / FrameError as :meth:`read`.
        """
        when = dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=epoch_ms)
        when = when.replace(microsecond=0)
        edition = self.edition(meter)
        if broadcast if broadcast is not None else self.clock_method == "broadcast":
            wire = encode_frame(BROADCAST_ADDRESS, ControlCode.BROADCAST_TIME_SYNC,
                                TimeSyncRequest(when).payload(), preamble=self.preamble)  # fmt: skip
            async with self.bus.transaction(device=self.device_key(BROADCAST_ADDRESS)) as tx:
                self.stats["transactions"] += 1
                await tx.transport.write(wire)
            return
        if edition == 1997:
            raise NotImplementedError("clock writes are implemented for DL/T 645-2007 only")
        password, operator = parse_password(meter.password), (meter.operator or "00000000").upper()
        for di, value in ((_DATE_DI[2007], MeterDate.from_date(when.date())), (_TIME_DI[2007], when.time())):
            request = WriteRequest(di, encode_value(di, value), password, operator)
            await self._command(meter, request.control, request.payload(), di)

    async def aclose(self) -> None:
        """The bus belongs to whoever made it (other drivers may share it): nothing to release."""
        await super().aclose()


def _blocks(edition: int) -> list[DataIdentifier]:
    return [e for e in REGISTRY.values() if e.edition == edition and e.count > 1 and any(e.quantities)]


def _to_quantity(q: Quantity, info: DataIdentifier, item: object) -> int:
    """A decoded item -> the quantity's fixed point (rescaled from the DI's decimals)."""
    if q.name == "relay_state" and isinstance(item, int):
        return relay_state(item)
    if not isinstance(item, int):
        raise FramingError(f"DI {info.di:08X} item for {q.name} decoded to {item!r}")
    shift = q.decimals - info.decimals
    if shift >= 0:
        return item * int(10**shift)
    whole = abs(item) // int(10**-shift)  # fewer decimals: truncate toward zero
    return -whole if item < 0 else whole


def _raw_di(text: str, edition: int) -> int:
    """A ``--di`` of the field tool. Raises ``ConfigError`` (key ``--di 'TEXT'``)."""
    digits = 8 if edition == 2007 else 4
    if not (len(text) == digits and all(c in "0123456789abcdefABCDEF" for c in text)):
        raise ConfigError(f"--di {text!r}", f"a DL/T 645-{edition} DI is {digits} hex digits")
    return int(text, 16)


def _fixed(value: int, decimals: int) -> str:
    """``value`` with ``decimals`` implied decimals as exact decimal text."""
    if decimals == 0:
        return str(value)
    whole, frac = divmod(abs(value), 10**decimals)
    return f"{'-' if value < 0 else ''}{whole}.{frac:0{decimals}d}"
