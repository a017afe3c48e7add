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

Every option is checked before the port is opened (a bad address, DI, quantity, unit id, model,
register or unit range is a usage error and the port is never touched): the address must be a
DL/T 645 address, a DI must fit its edition (4 bytes for 2007, 2 for 1997), a quantity must be
one the edition has a DI for or the Modbus model has a register for.

Exit status: 0 every value read; 1 a runtime failure (timeout, checksum error with the raw bytes,
error reply with its bits); 2 a usage error. Errors go to stderr and say what happened on the wire.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from drivers.base import MeterRef
from drivers.bus import Bus, ResponseTimeout
from protocols.dlt645 import di_for_quantity, normalize_address
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
from protocols.modbus.maps import load_map
from protocols.quantities import Quantity, by_name, to_display

__all__ = ["add_arguments", "run"]

_DEFAULT_BAUD = {"dlt645": 2400, "dlt645-1997": 1200, "modbus": 9600}
_DEFAULT_PARITY = {"dlt645": "E", "dlt645-1997": "E", "modbus": "N"}


class _UsageError(Exception):
    """A bad combination of options (exit status 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", required=True, help="serial device (/dev/ttyUSB0) or tcp://HOST:PORT")
    parser.add_argument("--protocol", choices=("dlt645", "dlt645-1997", "modbus"), default="dlt645")
    parser.add_argument("--baud", type=int, help="line speed (default 2400 DL/T 645, 1200 1997, 9600 Modbus)")
    parser.add_argument("--parity", choices=("N", "E", "O"), help="default E for DL/T 645, N for Modbus")
    parser.add_argument("--address", help="DL/T 645 meter address (12 digits)")
    parser.add_argument("--unit", type=int, help="Modbus unit id (1..247)")
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


async def _open_bus(args: argparse.Namespace) -> Bus:
    from drivers.tcp_transport import TcpTransport

    if args.port.startswith("tcp://"):
        host, _, port = args.port.removeprefix("tcp://").rpartition(":")
        if not port.isdigit():
            raise _UsageError(f"--port {args.port}: expected tcp://HOST:PORT")
        return Bus(await TcpTransport.connect(host, int(port)), name=args.port)
    from drivers.serial_transport import SerialTransport

    baud = args.baud or _DEFAULT_BAUD[args.protocol]
    parity = args.parity or _DEFAULT_PARITY[args.protocol]
    return Bus(SerialTransport(args.port, baud=baud, parity=parity), baud=baud, name=args.port)


def _timeout(args: argparse.Namespace) -> ResponseTimeout:
    return ResponseTimeout(initial_s=args.timeout, min_s=args.timeout, max_s=args.timeout)


async def _dlt645(args: argparse.Namespace, out: _Printer) -> None:
    from drivers.dlt645 import Dlt645Driver
    from protocols.dlt645 import decode_value, di_info

    if not (args.discover or args.address):
        raise _UsageError("DL/T 645 needs --address (or --discover)")
    if args.register or args.probe_order:
        raise _UsageError("--register and --probe-order are Modbus options")
    edition = 1997 if args.protocol == "dlt645-1997" else 2007
    if args.address:
        try:
            args.address = normalize_address(args.address)
        except ValueError as exc:
            raise _UsageError(f"--address: {exc}") from None
    quantities = [_dlt645_quantity(name, edition) for name in args.quantity]
    dis = [_di(text, edition) for text in args.di]
    async with await _open_bus(args) as bus:
        driver = Dlt645Driver(bus, retries=args.retries)
        if args.discover:
            bus.configure_device(driver.device_key("AAAAAAAAAAAA"), timeout=_timeout(args))
            address = await driver.read_address()
            out.value(address, "quantity", "address", address, "", label="address")
            args.address = args.address or address
            if not (args.quantity or args.di):
                return
        protocol = "dlt645-1997" if args.protocol == "dlt645-1997" else "dlt645-2007"
        meter = MeterRef(args.address, args.address, protocol)
        bus.configure_device(driver.device_key(meter), timeout=_timeout(args))
        if quantities:
            readings, _ = await driver.read_detailed(meter, quantities)
            for r in readings:
                if r.error is not None:
                    out.error(meter.address, "quantity", r.quantity.name, r.error)
                else:
                    shown = _show(r.quantity, r.value)
                    out.value(meter.address, "quantity", r.quantity.name, shown, r.quantity.unit)
        for di in dis:
            label = f"{di:08X}" if protocol == "dlt645-2007" else f"{di:04X}"
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


def _show(q: Quantity, value: int) -> str:
    return to_display(q, value)


def _quantity(name: str) -> Quantity:
    try:
        return by_name(name)
    except KeyError as exc:
        raise _UsageError(f"--quantity: {exc.args[0]}") from None


def _dlt645_quantity(name: str, edition: int) -> Quantity:
    q = _quantity(name)
    if name != "meter_clock":  # read as date and time, not one DI
        try:
            di_for_quantity(name, edition)
        except KeyError as exc:
            raise _UsageError(f"--quantity: {exc.args[0]}") from None
    return q


def _di(text: str, edition: int) -> int:
    digits = 8 if edition == 2007 else 4
    if not (len(text) == digits and all(c in "0123456789abcdefABCDEF" for c in text)):
        raise _UsageError(f"--di {text!r}: a DL/T 645-{edition} DI is {digits} hex digits")
    return int(text, 16)


async def _modbus(args: argparse.Namespace, out: _Printer) -> None:
    from drivers.modbus import ModbusDriver

    if args.di or args.address:
        raise _UsageError("--di and --address are DL/T 645 options; Modbus uses --unit")
    if not args.discover and args.unit is None:
        raise _UsageError("Modbus needs --unit (or --discover)")
    if args.quantity and not args.model:
        raise _UsageError("--quantity over Modbus needs --model (the register map)")
    if args.unit is not None and not 1 <= args.unit <= 247:
        raise _UsageError(f"--unit {args.unit}: a Modbus unit id is 1..247")
    if args.model:
        try:
            regmap = load_map(args.model)
        except ConfigError as exc:
            raise _UsageError(f"--model: {exc.reason}") from None
        for name in args.quantity:
            _quantity(name)
            try:
                regmap.for_quantity(name)
            except KeyError as exc:
                raise _UsageError(f"--quantity: {exc.args[0]}") from None
    args.register = [_register(spec) for spec in args.register]
    if args.probe_order and any(dtype.width != 2 for _, dtype, _ in args.register):
        raise _UsageError("--probe-order needs a 32-bit type (float32, int32, uint32)")
    args.units = _units(args.units) if args.discover else None
    bus: Bus | None = None
    if args.port.startswith("tcp://"):
        host, _, port = args.port.removeprefix("tcp://").rpartition(":")
        if not port.isdigit():
            raise _UsageError(f"--port {args.port}: expected tcp://HOST:PORT")
        driver = ModbusDriver.tcp(host, int(port), timeout_s=args.timeout, retries=args.retries)
    else:
        bus = await _open_bus(args)
        for unit in range(1, 248):
            bus.configure_device(("modbus", unit), timeout=_timeout(args))
        driver = ModbusDriver.rtu(bus, retries=args.retries)
    try:
        await _modbus_reads(args, driver, out)
    finally:
        await driver.aclose()
        if bus is not None:
            await bus.aclose()


async def _modbus_reads(args: argparse.Namespace, driver: Any, out: _Printer) -> None:
    from protocols.flags import Flag

    if args.discover:
        await _scan_units(args, driver, out)
    if args.unit is None:
        return
    if args.quantity:
        meter = MeterRef(f"unit{args.unit}", str(args.unit), "modbus", args.model)
        qs = [_quantity(n) for n in args.quantity]
        result = await driver.read(meter, qs)
        for q in qs:
            if result.flags(q) & Flag.METER_ERROR:
                out.error(str(args.unit), "quantity", q.name, await _why_refused(driver, meter, q))
            else:
                out.value(str(args.unit), "quantity", q.name, _show(q, result.value(q)), q.unit)
    for register in args.register:
        await _read_register(args, driver, register, out)


async def _why_refused(driver: Any, meter: MeterRef, q: Quantity) -> MeterErrorReply:
    """The exception the meter answers for ``q``'s register alone, or "not a number" when it
    answers with a NaN or infinity."""
    reg = driver.register_map(meter).for_quantity(q.name)
    try:
        await driver.link.read_registers(meter.unit_id, reg.function, reg.address, reg.count)
    except MeterErrorReply as exc:
        return exc
    return MeterErrorReply(0, None, ("not a number",))


def _units(text: str) -> range:
    lo, _, hi = text.partition("-")
    if not (lo.isdigit() and (hi or lo).isdigit() and 1 <= int(lo) <= int(hi or lo) <= 247):
        raise _UsageError(f"--units {text!r}: expected LO-HI within 1..247")
    return range(int(lo), int(hi or lo) + 1)


async def _scan_units(args: argparse.Namespace, driver: Any, out: _Printer) -> None:
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
    args: argparse.Namespace, driver: Any, register: tuple[int, DataType, WordOrder], out: _Printer
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
    handler: Callable[[argparse.Namespace, _Printer], Any] = _modbus if args.protocol == "modbus" else _dlt645
    if not (args.discover or args.quantity or args.di or args.register):
        print("amigw read: nothing to read: give --quantity, --di, --register or --discover", file=sys.stderr)
        return 2
    try:
        asyncio.run(handler(args, out))
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
