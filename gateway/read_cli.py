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
can read each ``--quantity``, and how to ``--discover`` (:meth:`~drivers.base.MeterDriver.discover`).
Raw options are the protocol's own: each registered driver adds them to the parser in a group
titled by its :attr:`~drivers.base.MeterDriver.family`
(:meth:`~drivers.base.MeterDriver.add_raw_options`), checks them and reads them
(:meth:`~drivers.base.MeterDriver.raw_reads`); the tool refuses one given for another protocol
and prints the :class:`~drivers.base.FieldRow` values the driver yields. Nothing here knows a
protocol: a new one is a driver and its registry entry.

Every option is checked before the port is opened (a bad address, quantity, model or raw option is a
usage error and the port is never touched): the address and raw options are checked by the
protocol's driver, a quantity must be one the driver can read.

Exit status: 0 every value read; 1 a runtime failure (timeout, checksum error with the raw bytes,
error reply with its bits); 2 a usage error. Errors go to stderr and say what happened on the wire.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace

from drivers.base import (
    DEFAULT_PROTOCOL,
    DRIVERS,
    DriverSetup,
    FieldRow,
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
from protocols.quantities import Quantity, by_name, to_display

__all__ = ["add_arguments", "run"]


class _UsageError(Exception):
    """A bad combination of options (exit status 2)."""


@dataclass(frozen=True, slots=True)
class _RawOption:
    """A raw option in the parser and the driver class that added it."""

    owner: type[MeterDriver]
    action: argparse.Action

    def given(self, args: argparse.Namespace) -> bool:
        return bool(getattr(args, self.action.dest) != self.action.default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    classes = list(dict.fromkeys(load_driver(name) for name in DRIVERS))
    serial = {name: load_driver(name).serial_defaults(name) for name in DRIVERS}
    bauds = ", ".join(f"{name} {baud}" for name, (baud, _) in serial.items())
    parities = ", ".join(f"{name} {parity}" for name, (_, parity) in serial.items())
    parser.add_argument("--port", required=True, help="serial device (/dev/ttyUSB0) or tcp://HOST:PORT")
    parser.add_argument("--protocol", choices=tuple(DRIVERS), default=DEFAULT_PROTOCOL)
    parser.add_argument("--baud", type=int, help=f"line speed (default: the protocol's; {bauds})")
    parser.add_argument("--parity", choices=("N", "E", "O"), help=f"default: the protocol's ({parities})")
    parser.add_argument("--address", help="the meter's address in its protocol (DL/T 645: 12 digits)")
    parser.add_argument("--unit", type=int, help="Modbus unit id (1..247), the same as --address")
    parser.add_argument(
        "--model", help="the meter's model, if its protocol needs one (a Modbus register map)"
    )
    parser.add_argument("--quantity", action="append", default=[], metavar="NAME", help="repeatable")
    parser.add_argument("--discover", action="store_true", help="find the meters on the line (as the "
                        "protocol can: a lone meter's address, a scan of unit ids)")  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=1.0, help="response timeout in seconds (default 1.0)"
    )
    parser.add_argument("--retries", type=int, default=1, help="extra attempts per request (default 1)")
    parser.add_argument("--json", action="store_true", help="one JSON object per value, for scripts")
    raw: list[_RawOption] = []
    for cls in classes:
        if "add_raw_options" not in vars(cls):  # a subclass's options are its parent's group
            continue
        group = parser.add_argument_group(f"{cls.family or cls.protocol} raw options")
        raw += [_RawOption(cls, action) for action in cls.add_raw_options(group)]
    parser.set_defaults(raw_options=tuple(raw))


class _Printer:
    def __init__(self, as_json: bool) -> None:
        self.as_json, self.failures = as_json, 0

    def row(self, row: FieldRow | str) -> None:
        if isinstance(row, str):
            self.text(row)
        elif row.error is not None:
            self.error(row.meter, row.key, row.name, row.error)
        else:
            self.value(row.meter, row.key, row.name, row.value, row.unit, row.label, row.note, row.extra)

    def value(
        self,
        meter: str,
        key: str,
        name: str,
        value: str,
        unit: str,
        label: str | None = None,
        note: str = "",
        extra: Mapping[str, object] | None = None,
    ) -> None:
        if self.as_json:
            record = {"meter": meter, key: name, "value": value, "unit": unit} | dict(extra or {})
            print(json.dumps(record), flush=True)
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


def _refuse_foreign_options(args: argparse.Namespace, cls: type[MeterDriver]) -> None:
    """A raw option of another protocol's driver is a usage error."""
    for option in args.raw_options:
        if option.given(args) and not issubclass(cls, option.owner):
            name, family = option.action.option_strings[0], option.owner.family or option.owner.protocol
            raise _UsageError(f"{name} is a {family} option, not one of {args.protocol}")


def _meter(args: argparse.Namespace, cls: type[MeterDriver]) -> MeterRef | None:
    """The meter named by ``--address`` (or ``--unit``), checked by its driver, with the
    ``--quantity`` names it must be able to read; None when none is named."""
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
    """Check every option, open the line and the driver, then discover, read the quantities and
    the raw reads, in that order."""
    cls = load_driver(args.protocol)
    _refuse_foreign_options(args, cls)
    port = _port(args, cls)
    discovery = cls.discover(args.protocol, args) if args.discover else None
    raw = cls.raw_reads(args.protocol, args)
    meter = _meter(args, cls) if args.quantity else None
    if args.quantity and meter is None:
        raise _UsageError("--quantity needs the meter: --address (or --unit)")
    if not (args.quantity or discovery or raw):
        own = [o.action.option_strings[0] for o in args.raw_options if issubclass(cls, o.owner)]
        raise _UsageError(f"nothing to read: give --quantity, --discover{''.join(', ' + o for o in own)}")
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
        if discovery is not None:
            async for row in discovery(driver):
                out.row(row)
        if meter is not None:
            for r in await driver.read_detailed(meter, [by_name(n) for n in args.quantity]):
                if r.error is not None:
                    out.error(meter.address, "quantity", r.quantity.name, r.error)
                else:
                    out.value(
                        meter.address,
                        "quantity",
                        r.quantity.name,
                        to_display(r.quantity, r.value),
                        r.quantity.unit,
                    )
        if raw is not None:
            async for row in raw(driver):
                out.row(row)
    finally:
        await driver.aclose()
        if bus is not None:
            await bus.aclose()


def _timeout(args: argparse.Namespace) -> ResponseTimeout:
    return ResponseTimeout(initial_s=args.timeout, min_s=args.timeout, max_s=args.timeout)


def _quantity(name: str) -> Quantity:
    try:
        return by_name(name)
    except KeyError as exc:
        raise _UsageError(f"--quantity: {exc.args[0]}") from None


def run(args: argparse.Namespace) -> int:
    out = _Printer(args.json)
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
