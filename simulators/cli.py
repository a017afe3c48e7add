"""``amigw sim``: run a meter simulator until SIGINT/SIGTERM.

    amigw sim dlt645 --meters 000000000001,000000000002 [--pty | --tcp HOST:PORT] [--baud 2400 --pace]
                     [--load-kw 1.5] [--edition 2007|1997] [--speed 60]
    amigw sim modbus --model sdm630 --unit 1 [--port N | --rtu-pty]

The first line on stdout says where to connect, and is flushed at once: the pty path
(``/dev/pts/7``) or ``tcp://127.0.0.1:40123`` for DL/T 645; the Modbus simulator's own line
(``modbus simulator model=sdm630 unit=1 on tcp 127.0.0.1:40123[, rtu /dev/pts/8]``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from simulators import modbus_sim
from simulators.dlt645_sim import Dlt645Simulator

__all__ = ["add_arguments", "run"]


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.removeprefix("tcp://").rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{dlt645,modbus}")
    d = kinds.add_parser("dlt645", help="DL/T 645 meters on one pty or TCP port")
    d.add_argument("--meters", default="000000000001", help="comma-separated 12-digit addresses")
    where = d.add_mutually_exclusive_group()
    where.add_argument("--pty", action="store_true", help="serve on a new pseudo-terminal (the default)")
    where.add_argument("--tcp", type=_host_port, metavar="HOST:PORT", help="serve on TCP (port 0: any free)")
    d.add_argument("--baud", type=int, default=2400, help="line speed for --pace (default 2400)")
    d.add_argument("--pace", action="store_true", help="emit bytes no faster than --baud (11 bits/byte)")
    d.add_argument(
        "--turnaround-s", type=float, default=None, help="meter response delay (default 20 ms paced)"
    )
    d.add_argument("--load-kw", type=float, default=1.0, help="constant load of every meter (default 1.0 kW)")
    d.add_argument("--edition", type=int, choices=(2007, 1997), default=2007)
    d.add_argument("--speed", type=float, default=1.0, help="simulated seconds per real second (demos)")
    m = kinds.add_parser("modbus", help="one Modbus meter (delegates to simulators.modbus_sim)")
    m.add_argument("--model", default="sdm630")
    m.add_argument("--unit", type=int, default=1)
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=0)
    m.add_argument("--rtu-pty", action="store_true", help="also serve Modbus RTU on a pseudo-terminal")


async def _serve_dlt645(args: argparse.Namespace) -> None:
    addresses = [a.strip() for a in args.meters.split(",") if a.strip()]
    sim = Dlt645Simulator(
        addresses, baud=args.baud, pace=args.pace, turnaround_s=args.turnaround_s, speed=args.speed,
        load_kw=args.load_kw, edition=args.edition,
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.tcp:
            host, port = args.tcp
            where = f"tcp://{host}:{await sim.serve_tcp(host, port)}"
        else:
            where = await sim.serve_pty()
        print(where, flush=True)
        print(f"dlt645-{args.edition} meters {', '.join(sim.meters)}; stop with Ctrl-C", flush=True)
        await stop.wait()
    finally:
        await sim.aclose()


def run(args: argparse.Namespace) -> int:
    if args.kind == "modbus":
        argv = [
            "--model",
            args.model,
            "--unit",
            str(args.unit),
            "--host",
            args.host,
            "--port",
            str(args.port),
        ]
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends it like Ctrl-C
        return modbus_sim.main(argv + (["--rtu-pty"] if args.rtu_pty else []))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_dlt645(args))
    return 0
