"""``amigw read``: the field technician's one-shot read of one meter (see ``docs/field-tool.md``).

    amigw read --port /dev/ttyUSB0 --address 000000000001 --quantity energy_fwd_active_total
    amigw read --port tcp://10.0.0.7:8899 --di 00010000 --di 04000503 --json
    amigw read --port /dev/ttyUSB0 --discover                            # a lone DL/T 645 meter
    amigw read --protocol modbus --port tcp://10.0.0.9:502 --unit 1 --model sdm630 --quantity voltage_a
    amigw read --protocol modbus --port /dev/ttyUSB1 --unit 3 --register 0x0000:float32 --probe-order

Output: ``name = value unit`` per value, or with ``--json`` one object per line:
``{"meter": "000000000001", "quantity": "energy_fwd_active_total", "value": "12345.67", "unit": "kWh"}``
(``"di": "00010000"`` or ``"register": 0`` instead of ``quantity`` for raw reads). ``value`` is a
decimal **string**: the meter's fixed point exactly, never a float. A refused value prints as
``{"meter", "quantity", "error", "error_code"}``; for Modbus ``error_code`` is the exception code
and ``error`` names it (``meter error reply 0x02: illegal_data_address``).

``--protocol`` is a name of the driver registry (:data:`drivers.base.DRIVERS`); the tool asks
that driver how it runs over the port (a bare ``tcp://`` is its first network kind: a serial
server for DL/T 645, Modbus TCP for Modbus), whether the address and model are valid, whether it
can read each ``--quantity``, and (``--discover``) whether a lone meter can say its address. Raw
options are the protocol's own: ``--di`` for DL/T 645; ``--register``, ``--probe-order`` and the
``--discover`` unit scan for Modbus.

Every option is checked before the port is opened (a bad address, DI, quantity, unit id, model,
register or unit range is a usage error and the port is never touched): the address is checked
by the protocol's driver, a DI must fit its edition (4 bytes for 2007, 2 for 1997), a quantity
must be one the driver can read (a DI of the edition, a register of the Modbus model).

Exit status: 0 every value read; 1 a runtime failure (timeout, checksum error with the raw bytes,
error reply with its bits); 2 a usage error. Errors go to stderr and say what happened on the wire.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from drivers.base import (
    DEFAULT_PROTOCOL,
    DRIVERS,
    Capability,
    DriverSetup,
    MeterDriver,
    MeterRef,
    load_driver,
)
from drivers.bus import Bus, ResponseTimeout
from drivers.lines import LinePort, TransportKind, open_transport, parse_port
from protocols.errors import (
    AmigwError,
    ConfigError,
    FrameError,
    MeterErrorReply,
    ProtocolError,
    TransportError,
    TransportTimeout,
)
from protocols.modbus import DataType, WordOrder
from protocols.quantities import Quantity, by_name, to_display

if TYPE_CHECKING:
    from drivers.dlt645 import Dlt645Driver
    from drivers.modbus import ModbusDriver

__all__ = ["add_arguments", "run"]


class _UsageError(Exception):
    """A bad combination of options (exit status 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", required=True, help="serial device (/dev/ttyUSB0) or tcp://HOST:PORT")
    parser.add_argument("--protocol", choices=tuple(DRIVERS), default=DEFAULT_PROTOCOL)
    parser.add_argument("--baud", type=int, help="line speed (default: the protocol's; 2400 DL/T 645, "
                        "1200 1997, 9600 Modbus)")  # fmt: skip
    parser.add_argument(
        "--parity", choices=("N", "E", "O"), help="default: the protocol's (E DL/T 645, N Modbus)"
    )
    parser.add_argument("--address", help="the meter's address in its protocol (DL/T 645: 12 digits)")
    parser.add_argument("--unit", type=int, help="Modbus unit id (1..247), the same as --address")
    parser.add_argument("--model", help="Modbus register map (sdm630, sdm120, dtsu666, ddsu666)")
    parser.add_argument("--quantity", action="append", default=[], metavar="NAME", help="repeatable")
    parser.add_argument(
        "--di", action="append", default=[], metavar="HEX", help="raw DL/T 645 DI, repeatable"
    )
    parser.add_argument(
        "--register", action="append", default=[], metavar="ADDR[:TYPE[:ORDER]]",
        help="raw Modbus register, e.g. 0x0000:float32:ABCD (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--function", type=int, choices=(3, 4), default=4, help="Modbus function for --register"
    )
    parser.add_argument("--probe-order", action="store_true", help="show a 32-bit register under every order")
    parser.add_argument("--discover", action="store_true", help="DL/T 645: read the lone meter's address; "
                        "Modbus: scan --units")  # fmt: skip
    parser.add_argument(
        "--units", default="1-16", metavar="LO-HI", help="Modbus unit ids to scan (default 1-16)"
    )
    parser.add_argument(
        "--timeout", type=float, default=1.0, help="response timeout in seconds (default 1.0)"
    )
    parser.add_argument("--retries", type=int, default=1, help="extra attempts per request (default 1)")
    parser.add_argument("--json", action="store_true", help="one JSON object per value, for scripts")


class _Printer:
    def __init__(self, as_json: bool) -> None:
        self.as_json, self.failures = as_json, 0

    def value(
        self,
        meter: str,
        key: str,
        name: str,
        value: str,
        unit: str,
        label: str | None = None,
        note: str = "",
        extra: dict[str, object] | None = None,
    ) -> None:
        if self.as_json:
            print(
                json.dumps({"meter": meter, key: name, "value": value, "unit": unit} | (extra or {})),
                flush=True,
            )
        else:
            print(f"{label or name} = {value}{' ' + unit if unit else ''}{note}", flush=True)

    def text(self, line: str) -> None:
        if not self.as_json:
            print(line, flush=True)

    def error(self, meter: str, key: str, name: str, exc: BaseException) -> None:
        self.failures += 1
        code = exc.error_code if isinstance(exc, MeterErrorReply) else None
        if self.as_json:
            record = {"meter": meter, key: name, "error": _describe(exc), "error_code": code}
            print(json.dumps(record), flush=True)
        print(f"{name}: {_describe(exc)}", file=sys.stderr, flush=True)


def _describe(exc: BaseException) -> str:
    """What went wrong on the wire, in words."""
    if isinstance(exc, TransportTimeout):
        return f"timeout: {exc}"
    if isinstance(exc, MeterErrorReply):
        return f"error reply: {exc}"
    if isinstance(exc, FrameError):
        return f"bad frame ({type(exc).__name__}): {exc}"
    if isinstance(exc, TransportError):
        return f"line failed: {exc}"
    return str(exc)


def _fixed(value: int, decimals: int) -> str:
    if decimals == 0:
        return str(value)
    whole, frac = divmod(abs(value), 10**decimals)
    return f"{'-' if value < 0 else ''}{whole}.{frac:0{decimals}d}"


def _port(args: argparse.Namespace, cls: type[MeterDriver]) -> LinePort:
    """The port as the driver runs over it: a bare ``tcp://`` is the first network kind the
    driver lists (a serial server, or the protocol's own TCP)."""
    try:
        port = parse_port(args.port)
    except ValueError as exc:
        raise _UsageError(f"--port: {exc}") from None
    if port.kind is TransportKind.SERIAL_SERVER:
        network = [k for k in cls.transports if k is not TransportKind.SERIAL]
        port = replace(port, kind=network[0]) if network else port
    if port.kind not in cls.transports:
        raise _UsageError(
            f"--port {args.port}: a {args.protocol} meter does not run over {port.kind.described}"
        )
    return port


def _meter(args: argparse.Namespace, cls: type[MeterDriver]) -> MeterRef | None:
    """The meter named by ``--address`` (or ``--unit``), checked by its driver, with the
    ``--quantity`` names it must be able to read; None when none is named (discovery)."""
    address = str(args.unit) if args.unit is not None else args.address
    if address is None:
        return None
    option = f"--unit {args.unit}" if args.unit is not None else "--address"
    try:
        meter = MeterRef(address, address, args.protocol, args.model)
    except ConfigError as exc:
        field = exc.key_path.rpartition(".")[2]
        raise _UsageError(f"{'--model' if field == 'model' else option}: {exc.reason}") from None
    for name in args.quantity:
        _quantity(name)
    try:
        why = cls.why_unreadable(meter, args.quantity)
    except ConfigError as exc:
        raise _UsageError(f"--model: {exc.reason}") from None
    if why is not None:
        raise _UsageError(f"--quantity: {why}")
    return meter


async def _read(args: argparse.Namespace, out: _Printer) -> None:
    """Check every option, open the line and the driver, read; raw reads are the protocol's own."""
    cls = load_driver(args.protocol)
    raw = _raw_reader(args, cls)
    port = _port(args, cls)
    meter = _meter(args, cls) if args.quantity or args.di or not raw else None
    if args.quantity and meter is None:
        raise _UsageError("--quantity needs the meter: --address (or --unit)")
    if args.discover and raw is None and Capability.READ_ADDRESS not in cls.capabilities(args.protocol):
        raise _UsageError(f"--discover: a {args.protocol} meter cannot be asked for its address")
    if not (meter or args.discover or raw):
        raise _UsageError("name the meter with --address (or --unit), or --discover")
    if raw is not None:
        raw.check()
    baud, parity = cls.serial_defaults(args.protocol)
    baud, parity = args.baud or baud, args.parity or parity
    bus: Bus | None = None
    if port.kind.shared:
        serial = port.kind is TransportKind.SERIAL
        transport = await open_transport(port, baud=baud, parity=parity)
        bus = Bus(transport, baud=baud if serial else None, name=args.port, timeout=_timeout(args))
    driver = cls.open(DriverSetup(port, bus, retries=args.retries, timeout_s=args.timeout))
    try:
        await driver.connect()
        if args.discover and raw is None:
            address = await driver.read_address()
            out.value(address, "quantity", "address", address, "", label="address")
            if not (args.quantity or args.di):
                return
            meter = meter or MeterRef(address, address, args.protocol, args.model)
        if meter is not None and args.quantity:
            for r in await driver.read_detailed(meter, [by_name(n) for n in args.quantity]):
                if r.error is not None:
                    out.error(meter.address, "quantity", r.quantity.name, r.error)
                else:
                    out.value(
                        meter.address,
                        "quantity",
                        r.quantity.name,
                        _show(r.quantity, r.value),
                        r.quantity.unit,
                    )
        if raw is not None:
            await raw.read(driver, meter, out)
    finally:
        await driver.aclose()
        if bus is not None:
            await bus.aclose()


def _timeout(args: argparse.Namespace) -> ResponseTimeout:
    return ResponseTimeout(initial_s=args.timeout, min_s=args.timeout, max_s=args.timeout)


def _show(q: Quantity, value: int) -> str:
    return to_display(q, value)


def _quantity(name: str) -> Quantity:
    try:
        return by_name(name)
    except KeyError as exc:
        raise _UsageError(f"--quantity: {exc.args[0]}") from None


def _raw_reader(args: argparse.Namespace, cls: type[MeterDriver]) -> _DiReader | _RegisterReader | None:
    """The reader of the protocol's own raw options (``--di``; ``--register``, ``--probe-order``,
    a unit scan), or None when none is asked for. Raises ``_UsageError`` for another protocol's."""
    from drivers.dlt645 import Dlt645Driver
    from drivers.modbus import ModbusDriver

    registers = args.register or args.probe_order or args.function != 4
    if args.di:
        if not issubclass(cls, Dlt645Driver):
            raise _UsageError(f"--di is a DL/T 645 option, not one of {args.protocol}")
        if registers:
            raise _UsageError("--register and --probe-order are Modbus options")
        return _DiReader(args, cls)
    if registers or (args.discover and issubclass(cls, ModbusDriver)):
        if not issubclass(cls, ModbusDriver):
            raise _UsageError(f"--register and --probe-order are Modbus options, not of {args.protocol}")
        return _RegisterReader(args)
    return None


class _DiReader:
    """``--di HEX``: raw DL/T 645 data identifiers, decoded when the registry knows them."""

    def __init__(self, args: argparse.Namespace, cls: type[Dlt645Driver]) -> None:
        self.args, self.edition = args, cls.edition_of(args.protocol)

    def check(self) -> None:
        self.dis = [_di(text, self.edition) for text in self.args.di]

    async def read(self, driver: MeterDriver, meter: MeterRef | None, out: _Printer) -> None:
        from drivers.dlt645 import Dlt645Driver
        from protocols.dlt645 import decode_value, di_info

        assert isinstance(driver, Dlt645Driver) and meter is not None
        for di in self.dis:
            label = f"{di:08X}" if self.edition == 2007 else f"{di:04X}"
            try:
                raw = await driver.read_di(meter, di)
            except MeterErrorReply as exc:
                out.error(meter.address, "di", label, exc)
                continue
            try:
                info = di_info(di)
            except KeyError:
                out.value(meter.address, "di", label, raw.hex(), "raw", label=f"{label} (unknown DI)")
                continue
            value = decode_value(di, raw)
            shown = (
                _fixed(value, info.decimals) if isinstance(value, int) and info.fmt == "bcd" else str(value)
            )
            out.value(meter.address, "di", label, shown, info.unit, label=f"{label} {info.name}")


def _di(text: str, edition: int) -> int:
    digits = 8 if edition == 2007 else 4
    if not (len(text) == digits and all(c in "0123456789abcdefABCDEF" for c in text)):
        raise _UsageError(f"--di {text!r}: a DL/T 645-{edition} DI is {digits} hex digits")
    return int(text, 16)


class _RegisterReader:
    """``--register``, ``--probe-order`` and the ``--discover`` unit scan of Modbus."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def check(self) -> None:
        args = self.args
        if args.unit is not None and not 1 <= args.unit <= 247:
            raise _UsageError(f"--unit {args.unit}: a Modbus unit id is 1..247")
        if not args.discover and args.unit is None:
            raise _UsageError("Modbus needs --unit (or --discover)")
        args.register = [_register(spec) for spec in args.register]
        if args.probe_order and any(dtype.width != 2 for _, dtype, _ in args.register):
            raise _UsageError("--probe-order needs a 32-bit type (float32, int32, uint32)")
        args.units = _units(args.units) if args.discover else None

    async def read(self, driver: MeterDriver, meter: MeterRef | None, out: _Printer) -> None:
        from drivers.modbus import ModbusDriver

        assert isinstance(driver, ModbusDriver)
        if self.args.discover:
            await _scan_units(self.args, driver, out)
        if self.args.unit is None:
            return
        for register in self.args.register:
            await _read_register(self.args, driver, register, out)


def _units(text: str) -> range:
    lo, _, hi = text.partition("-")
    if not (lo.isdigit() and (hi or lo).isdigit() and 1 <= int(lo) <= int(hi or lo) <= 247):
        raise _UsageError(f"--units {text!r}: expected LO-HI within 1..247")
    return range(int(lo), int(hi or lo) + 1)


async def _scan_units(args: argparse.Namespace, driver: ModbusDriver, out: _Printer) -> None:
    found = 0
    for unit in args.units:
        note, extra = "  answers", dict[str, object]()
        try:
            await driver.link.read_registers(unit, args.function, 0, 1)
        except MeterErrorReply as exc:
            if exc.error_code in (0x0A, 0x0B):  # a TCP gateway says: no such unit behind me
                continue
            # any other exception reply still proves that something answers to this unit id
            note, extra = (
                f"  answers with exception {exc.error_code} ({', '.join(exc.reasons)})",
                {"exception": exc.error_code},
            )
        except (TransportTimeout, FrameError):
            continue
        found += 1
        out.value(str(unit), "quantity", "unit", str(unit), "", label="unit", note=note, extra=extra)
    if not found:
        raise TransportTimeout(f"no Modbus unit answered in {args.units.start}-{args.units.stop - 1}")


def _register(spec: str) -> tuple[int, DataType, WordOrder]:
    parts = spec.split(":")
    try:
        address = int(parts[0], 0)
        dtype = DataType(parts[1].lower()) if len(parts) > 1 else DataType.FLOAT32
        order = WordOrder(parts[2].upper()) if len(parts) > 2 else WordOrder.ABCD
        if not 0 <= address <= 0xFFFF or len(parts) > 3:
            raise ValueError(spec)
    except ValueError:
        hint = "expected ADDR[:TYPE[:ORDER]] with ADDR 0..0xFFFF, e.g. 0x0000:float32:ABCD"
        raise _UsageError(f"--register {spec!r}: {hint}") from None
    return address, dtype, order


async def _read_register(
    args: argparse.Namespace, driver: ModbusDriver, register: tuple[int, DataType, WordOrder], out: _Printer
) -> None:
    from protocols.modbus import decode_registers, probe_orders

    address, dtype, order = register
    label = f"register {address:#06x}"
    try:
        words = await driver.link.read_registers(args.unit, args.function, address, dtype.width)
    except MeterErrorReply as exc:  # the unit refuses this register: say which exception
        out.error(str(args.unit), "register", f"{address}:{dtype}:{order}", exc)
        return
    if args.probe_order:
        out.text(f"{label} words {' '.join(f'{w:04X}' for w in words)} as {dtype} under each order:")
        for probe_order, value, plausible in probe_orders(words, dtype):
            name = f"{address}:{dtype}:{probe_order}"
            mark = "   <- plausible" if plausible else ""
            out.value(str(args.unit), "register", name, repr(value), "", label=f"  {probe_order}", note=mark)
        return
    value = decode_registers(words, dtype, order)
    out.value(str(args.unit), "register", f"{address}:{dtype}:{order}", repr(value), "",
              label=f"{label} {dtype} {order}")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    out = _Printer(args.json)
    if not (args.discover or args.quantity or args.di or args.register):
        print("amigw read: nothing to read: give --quantity, --di, --register or --discover", file=sys.stderr)
        return 2
    try:
        asyncio.run(_read(args, out))
    except _UsageError as exc:
        print(f"amigw read: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"amigw read: {exc}", file=sys.stderr)
        return 2
    except (TransportError, ProtocolError) as exc:
        where = f" (meter {args.address or args.unit} on {args.port})" if (args.address or args.unit) else ""
        print(f"amigw read: {_describe(exc)}{where}", file=sys.stderr)
        return 1
    except AmigwError as exc:
        print(f"amigw read: {exc}", file=sys.stderr)
        return 1
    return 1 if out.failures else 0
