"""``amigw sim``: run a meter simulator until SIGINT/SIGTERM.

    amigw sim dlt645 --meters 000000000001,000000000002 [--pty | --tcp HOST:PORT] [--baud 2400 --pace]
                     [--load-kw 1.5] [--edition 2007|1997] [--speed 60]
    amigw sim modbus --model sdm630 --unit 1 [--port N | --rtu-pty]
    amigw sim fleet --url mqtt://127.0.0.1:1883 --gateways 4 --meters 20 --intervals 96 --truth truth.npz
                    [--seed N] [--speed X] [--burst-s S] [--min-each N] [--registry F] [--tariff F]

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
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{dlt645,modbus,fleet}")
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
    f = kinds.add_parser(
        "fleet",
        help="publish a generated fleet through edge outboxes, record its ground truth",
        description="N virtual gateways x M meters publish 15-minute readings with injected anomalies "
        "through the edge's outbox and publisher (head-end confirmations), on a simulated clock; "
        "the ground truth goes to --truth (docs/fleet.md).",
    )
    f.add_argument("--url", default="mqtt://127.0.0.1:1883", help="MQTT broker (default %(default)s)")
    f.add_argument("--gateways", type=int, default=4, help="virtual gateways (default %(default)s)")
    f.add_argument("--meters", type=int, default=20, help="meters per gateway, 1..1024 (default %(default)s)")
    f.add_argument("--intervals", type=int, default=96, help="15-minute boundaries (default 96: a day)")
    f.add_argument("--days-back", type=int, default=3, help="start at local midnight this many days ago")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--speed", type=float, default=0.0, help="simulated s per real s (0: as fast as possible)")
    f.add_argument("--burst-s", type=float, default=60.0, help="uploads spread over this after a boundary")
    f.add_argument("--burst-shape", choices=("uniform", "front"), default="uniform")
    f.add_argument("--min-each", type=int, default=0, help="at least this many anomalies of every kind")
    f.add_argument("--clean", action="store_true", help="no anomalies at all")
    f.add_argument("--replay-rate", type=float, default=0.0, help="replays per gateway and boundary")
    f.add_argument("--truth", required=True, help="write the ground truth here (.npz)")
    f.add_argument("--workdir", default="fleet-outboxes", help="the gateways' outbox files")
    f.add_argument("--registry", help="also write the meter registry for ingest here (TOML)")
    f.add_argument("--tariff", help="also write the fleet's tariff (calendar and prices) here (TOML)")
    f.add_argument("--confirm-timeout-s", type=float, default=120.0)


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


def _run_fleet(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simulators.fleet import AnomalyRates, Fleet, FleetSpec, default_start_ms
    from simulators.fleet_run import run_fleet

    try:
        rates = (
            AnomalyRates.none()
            if args.clean
            else AnomalyRates(min_each=args.min_each, replay=args.replay_rate)
        )
        spec = FleetSpec(
            gateways=args.gateways, meters_per_gateway=args.meters, intervals=args.intervals,
            start_ms=default_start_ms(args.days_back), seed=args.seed, rates=rates, burst_s=args.burst_s,
            burst_shape=args.burst_shape,
        )  # fmt: skip
    except ValueError as exc:
        print(f"amigw sim fleet: {exc}")
        return 2
    fleet = Fleet(spec)
    if args.registry:
        Path(args.registry).write_text(fleet.registry_toml())
    if args.tariff:
        Path(args.tariff).write_text(fleet.tariff_toml())

    def progress(k: int, batches: int, confirmed: int) -> None:
        print(
            f"boundary {k + 1}/{spec.intervals}: {batches} batches stored, {confirmed} confirmed", flush=True
        )

    try:
        timeout_s = args.confirm_timeout_s
        run = run_fleet(
            fleet, args.url, args.workdir, speed=args.speed, confirm_timeout_s=timeout_s, progress=progress
        )
        result = asyncio.run(run)
    except TimeoutError as exc:
        print(f"amigw sim fleet: {exc}")
        return 1
    finally:
        fleet.truth.save(args.truth)
    print(
        f"published {result.batches} batches ({result.readings:,} readings), {result.replays} replays, "
        f"{result.confirmed} confirmed in {result.wall_s:.1f} s; truth: {args.truth}"
    )
    print(fleet.truth.summary())
    return 0


def run(args: argparse.Namespace) -> int:
    if args.kind == "fleet":
        return _run_fleet(args)
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
