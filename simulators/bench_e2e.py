"""``amigw bench e2e``: the fleet against the real head-end, with faults, checked against the truth.

    amigw bench e2e [--gateways 20 --meters 64 --hours 24] [--workers 2] [--speed 0]
                    [--fault broker-kill --fault replay@40 | --faults all] [--json report.json]

It starts the head-end (:mod:`simulators.fleet_headend`: mosquitto, influxd, ``--workers``
``amigw ingest`` processes, ``amigw feectl`` with the fleet's prepaid accounts), the fleet's
edges (:mod:`simulators.fleet_publish`: an outbox and an MQTT connection per virtual gateway,
head-end confirmations), then drives the generator on a simulated clock: boundary by boundary,
each boundary's uploads go into their gateways' outboxes, ordered by their offset after the
boundary. With ``--speed 0`` (the default) the next boundary starts as soon as the backlog of
unconfirmed batches is at most ``--lead - 1`` boundaries' worth (as fast as the pipeline takes
them); with ``--speed S`` a simulated second takes 1/S real seconds.

Faults (:mod:`simulators.fleet_faults`) are scheduled at boundaries (``NAME@K``; without ``@K``
they are spread evenly over the run in the order given) and run beside the publishing. A line
of progress every ``--progress-s``; at the end a report (human, and ``--json FILE``) with the
throughput, latency percentiles, memory, counts and every check. Exit 0 when every check holds,
1 otherwise, 2 for bad options. SIGTERM or SIGINT stops the run and closes its head-end (exit 1).

``--anchors`` adds, after the checks and on the same mosquitto and influxd (the ingest workers
and fee control stopped first), the figures the run's throughput is read against
(:mod:`simulators.bench_anchors`), over ``--anchor-hours`` of the same fleet without anomalies:
influxd's ceiling for those readings alone and for the lines the pipeline writes for them
(max(2, cores) concurrent writers, bodies gzipped before the clock starts), and the conventional
pipeline (paho, JSON, an influxdb-client ``Point`` per reading, POSTs of 5,000 lines on one
kept-alive connection) on the same payloads in JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from protocols import topics
from protocols.errors import ConfigError
from simulators.bench_anchors import cpu_s
from simulators.fleet_faults import FAULTS, Check, FaultContext, FaultResult, inject
from simulators.fleet_headend import (
    DATABASE,
    FeectlSetup,
    HarnessError,
    HeadEnd,
    HeadEndSettings,
    ledger_charges,
    rss_kib,
)
from simulators.fleet_publish import EdgeFleet, RawClient, UploadLike

__all__ = ["BenchOptions", "BenchReport", "add_arguments", "parse_faults", "run", "run_bench"]

Say = Callable[[str], None]


class Source(Protocol):
    """What the bench drives: the fleet generator (``simulators.fleet.Fleet``)."""

    @property
    def gateways(self) -> tuple[str, ...]: ...
    def uploads(self, k: int) -> Sequence[Any]: ...


@dataclass(frozen=True, slots=True)
class BenchOptions:
    gateways: int = 20
    meters: int = 64
    hours: float = 24.0
    seed: int = 1
    min_each: int = 0  # each anomaly kind at least this often (small fleets)
    workers: int = 2
    speed: float = 0.0  # simulated seconds per real second; 0: as fast as the pipeline takes them
    lead: int = 2  # boundaries in flight at most (speed 0)
    faults: tuple[tuple[str, int | None], ...] = ()
    influx_outage_s: float = 60.0
    flood_count: int = 1000
    replay_s: int = 3600
    clock_jump_s: int = 3600
    ack_timeout_s: float = 10.0
    resend_cap_s: float = 30.0
    session_expiry_s: int = 3600
    progress_s: float = 5.0
    settle_timeout_s: float = 600.0
    run_dir: Path | None = None
    feectl: bool = True
    max_false_flag_rate: float = 0.0
    anchors: bool = False
    anchor_hours: float = 1.0
    state_url: str = ""  # ingest [state] url: each worker a machine of its own

    @property
    def intervals(self) -> int:
        return max(1, round(self.hours * 4))


@dataclass(slots=True)
class BenchReport:
    options: dict[str, Any]
    run_dir: str
    throughput: dict[str, Any] = field(default_factory=dict)
    latency_s: dict[str, Any] = field(default_factory=dict)
    memory_kib: dict[str, int] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    faults: list[FaultResult] = field(default_factory=list)
    store_check: dict[str, Any] = field(default_factory=dict)
    store_summary: str = ""
    anchors: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks) and all(f.ok for f in self.faults)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "options": self.options, "run_dir": self.run_dir, "cores": os.cpu_count(),
            "throughput": self.throughput, "latency_s": self.latency_s, "memory_kib": self.memory_kib,
            "cpu_s": self.cpu_s, "counts": self.counts, "faults": [f.to_dict() for f in self.faults],
            "store_check": self.store_check, "anchors": self.anchors,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
        }  # fmt: skip

    def summary(self) -> str:
        t, lat, mem = self.throughput, self.latency_s, self.memory_kib
        lines = [
            f"bench e2e: {'PASS' if self.ok else 'FAIL'}  (run directory {self.run_dir})",
            f"  throughput: {t.get('readings', 0):,} readings in {t.get('batches', 0):,} batches, "
            f"{t.get('wall_s', 0):.1f} s: {t.get('readings_per_s', 0):,.0f} readings/s sustained "
            f"(best {self_window(t)}: {t.get('peak_readings_per_s', 0):,.0f}/s)",
            "  latency (outbox -> head-end confirmation, i.e. stored in InfluxDB): "
            f"p50 {lat.get('p50', 0):.2f} s,"
            f" p95 {lat.get('p95', 0):.2f} s, p99 {lat.get('p99', 0):.2f} s, max {lat.get('max', 0):.2f} s",
            "  memory (max RSS, MiB): " + ", ".join(f"{k} {v / 1024:.0f}" for k, v in mem.items()),
            "  CPU seconds over the run (first boundary to last confirmation): "
            + ", ".join(f"{k} {v:,.1f}" for k, v in self.cpu_s.items()),
            "  counts: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()),
        ]
        for f in self.faults:
            lines.append(
                f"  fault {f.name} at boundary {f.boundary} (t+{f.started_s:.0f} s, {f.duration_s:.1f} s): "
                f"{'ok' if f.ok else 'FAILED'}"
            )
            lines += [f"      [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in f.checks]
        if self.store_summary:
            lines += ["  store check:", *("    " + s for s in self.store_summary.splitlines())]
        if self.anchors:
            lines += ["  anchors (same machine, after the run):", *anchor_lines(self.anchors, t)]
        lines += [f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        return "\n".join(lines)


def anchor_lines(a: dict[str, Any], t: dict[str, Any]) -> list[str]:
    """The anchors and the run's sustained readings/s read against them."""
    if "error" in a:
        return [f"    not measured: {a['error']}"]
    ours = float(t.get("readings_per_s", 0.0))
    ceil_r, ceil_p, conv = a["ceiling_readings"], a["ceiling_pipeline"], a["conventional"]
    return [
        f"    sample: {a['sample']}; {a['cores']} cores; ceiling clients {a['clients']}",
        f"    influxd ceiling, the readings alone: {ceil_r['readings_per_s']:,.0f} readings/s "
        f"(influxd {ceil_r['influxd_cpu_us']:.2f} µs CPU per reading)",
        f"    influxd ceiling, the pipeline's lines for them: {ceil_p['readings_per_s']:,.0f} readings/s "
        f"= {ceil_p['readings_per_s'] / ceil_r['readings_per_s']:.2f}x the readings alone "
        f"(influxd {ceil_p['influxd_cpu_us']:.2f} µs)",
        f"    conventional pipeline: {conv['readings_per_s']:,.0f} readings/s, {conv['cpu_us']:.2f} µs "
        f"CPU per reading (influxd {conv['influxd_cpu_us']:.2f} µs)",
        f"    this run, sustained ({ours:,.0f} readings/s, with the generator, the edges, fee control "
        f"and the faults on the same machine): {ours / ceil_r['readings_per_s']:.2f}x the readings-only "
        f"ceiling, {ours / conv['readings_per_s']:.2f}x the conventional pipeline",
    ]


def self_window(t: dict[str, Any]) -> str:
    return f"{t.get('window_s', 0):.0f} s window"


# -- options -----------------------------------------------------------------------------------
def parse_faults(specs: Sequence[str]) -> tuple[tuple[str, int | None], ...]:
    """``["broker-kill", "replay@40", "flood,worker-kill", "all"]`` -> ((name, boundary or None), ...).

    Raises:
        ConfigError: an unknown fault name or a bad boundary (key ``--fault``).
    """
    out: list[tuple[str, int | None]] = []
    for spec in specs:
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, _, at = item.partition("@")
            names = list(FAULTS) if name == "all" else [name]
            for n in names:
                if n not in FAULTS:
                    raise ConfigError("--fault", f"unknown fault {n!r}; one of {', '.join(FAULTS)} or all")
                if at and not at.isdigit():
                    raise ConfigError("--fault", f"{item!r}: expected NAME@BOUNDARY (an integer)")
                out.append((n, int(at) if at else None))
    return tuple(out)


def schedule(faults: tuple[tuple[str, int | None], ...], intervals: int) -> list[tuple[int, str]]:
    """(boundary, name) in run order: those without a boundary spread evenly over the run."""
    free = [name for name, at in faults if at is None]
    spaced = [(round((i + 1) * intervals / (len(free) + 1)), name) for i, name in enumerate(free)]
    fixed = [(at, name) for name, at in faults if at is not None]
    return sorted([*fixed, *spaced], key=lambda p: p[0])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{e2e}")
    p = sub.add_parser(
        "e2e",
        help="fleet generator -> mosquitto -> ingest workers -> InfluxDB + fee control, with faults, "
        "checked against the ground truth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = BenchOptions()
    p.add_argument(
        "--gateways", type=int, default=d.gateways, help=f"virtual gateways (default {d.gateways})"
    )
    p.add_argument("--meters", type=int, default=d.meters, help=f"meters per gateway (default {d.meters})")
    p.add_argument(
        "--hours", type=float, default=d.hours, help=f"simulated hours of 15-min data (default {d.hours:g})"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="the generator's seed (default 1)")
    p.add_argument(
        "--min-each",
        type=int,
        default=d.min_each,
        help="inject each anomaly kind at least this often, whatever its rate (default 0)",
    )
    p.add_argument(
        "--workers", type=int, default=d.workers, help=f"ingest worker processes (default {d.workers})"
    )
    p.add_argument(
        "--speed",
        type=float,
        default=d.speed,
        help="simulated seconds per real second; 0 (default): as fast as the pipeline takes them",
    )
    p.add_argument(
        "--lead",
        type=int,
        default=d.lead,
        help=f"with --speed 0: boundaries unconfirmed at most before the next starts (default {d.lead})",
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME[@BOUNDARY]",
        help=f"inject a fault (repeatable; 'all' for every one): {', '.join(FAULTS)}",
    )
    p.add_argument("--faults", default="", metavar="A,B,...", help="faults, comma-separated")
    p.add_argument(
        "--influx-outage-s",
        type=float,
        default=d.influx_outage_s,
        help=f"how long influx-outage keeps influxd down (default {d.influx_outage_s:g} s)",
    )
    p.add_argument(
        "--flood-count",
        type=int,
        default=d.flood_count,
        help=f"malformed payloads of the flood (default {d.flood_count})",
    )
    p.add_argument(
        "--replay-s",
        type=int,
        default=d.replay_s,
        help=f"simulated seconds of confirmed batches the replay re-publishes (default {d.replay_s})",
    )
    p.add_argument(
        "--clock-jump-s",
        type=int,
        default=d.clock_jump_s,
        help=f"how far clock-jump moves a gateway's clock (default {d.clock_jump_s} s)",
    )
    p.add_argument(
        "--ack-timeout-s",
        type=float,
        default=d.ack_timeout_s,
        help=f"the edges' [outbox] ack_timeout_s (default {d.ack_timeout_s:g})",
    )
    p.add_argument(
        "--resend-cap-s",
        type=float,
        default=d.resend_cap_s,
        help=f"the edges' [outbox] resend_max_s (default {d.resend_cap_s:g})",
    )
    p.add_argument("--progress-s", type=float, default=d.progress_s, help="seconds between progress lines")
    p.add_argument(
        "--settle-timeout-s",
        type=float,
        default=d.settle_timeout_s,
        help="how long the end of the run may wait for the last confirmations and rollups",
    )
    p.add_argument("--run-dir", type=Path, help="servers' data, outboxes, logs (default: a new temp dir)")
    p.add_argument(
        "--max-false-flag-rate",
        type=float,
        default=d.max_false_flag_rate,
        help="flags allowed on clean readings and intervals, as a share (default 0)",
    )
    p.add_argument("--no-feectl", action="store_true", help="run without fee control (no charges checked)")
    p.add_argument(
        "--state-url",
        default=d.state_url,
        metavar="URL",
        help="each ingest worker a machine of its own (its own directory and config file), their "
        "shared state in this PostgreSQL database (ingest [state] url; it should be empty)",
    )
    p.add_argument(
        "--anchors",
        action="store_true",
        help="after the run, measure influxd's ceiling (readings alone, the pipeline's lines) and the "
        "conventional pipeline on the same servers and fleet",
    )
    p.add_argument(
        "--anchor-hours",
        type=float,
        default=d.anchor_hours,
        help=f"simulated hours of the fleet the anchors write (default {d.anchor_hours:g})",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON to FILE")


def _options(args: argparse.Namespace) -> BenchOptions:
    faults = parse_faults([*args.fault, *([args.faults] if args.faults else [])])
    for key, value, low in (("--gateways", args.gateways, 1), ("--meters", args.meters, 1),
                            ("--workers", args.workers, 1), ("--lead", args.lead, 1)):  # fmt: skip
        if value < low:
            raise ConfigError(key, f"expected >= {low}, got {value}")
    if args.anchor_hours <= 0:
        raise ConfigError("--anchor-hours", "must be positive")
    if args.hours <= 0 or args.speed < 0:
        raise ConfigError("--hours" if args.hours <= 0 else "--speed", "must be positive")
    if any(n == "worker-stop" for n, _ in faults) and args.workers < 2:
        raise ConfigError("--workers", "worker-stop needs at least 2 workers")
    if args.state_url:
        from ingest.pipeline.statedb import check_url

        try:
            check_url(args.state_url)
        except ValueError as exc:
            raise ConfigError("--state-url", str(exc).removeprefix("url: ")) from None
    return BenchOptions(
        gateways=args.gateways, meters=args.meters, hours=args.hours, seed=args.seed, min_each=args.min_each,
        workers=args.workers,
        speed=args.speed, lead=args.lead, faults=faults, influx_outage_s=args.influx_outage_s,
        flood_count=args.flood_count, replay_s=args.replay_s, clock_jump_s=args.clock_jump_s,
        ack_timeout_s=args.ack_timeout_s, resend_cap_s=args.resend_cap_s, progress_s=args.progress_s,
        settle_timeout_s=args.settle_timeout_s, run_dir=args.run_dir, feectl=not args.no_feectl,
        max_false_flag_rate=args.max_false_flag_rate, anchors=args.anchors, anchor_hours=args.anchor_hours,
        state_url=args.state_url,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    opts = _options(args)
    report = asyncio.run(run_bench(opts, say=_say))
    print(report.summary(), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return 0 if report.ok else 1


def _say(text: str) -> None:
    print(f"[{dt.datetime.now().strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- the run -----------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


class _Meter:
    """Memory maxima, CPU seconds per program, readings/s windows and the batches each worker
    wrote, sampled on every progress tick (and once when the run starts)."""

    def __init__(self, he: HeadEnd) -> None:
        self.he = he
        self.max: dict[str, int] = {}
        self.samples: list[tuple[float, int]] = []
        self._cpu: dict[tuple[str, int], list[float]] = {}  # (program, pid): [at first sight, last]
        self._first = True
        self.sample_cpu()

    def sample_cpu(self) -> None:
        """CPU seconds of every program since the run started: a process already running then
        counts from then, one started during the run (a restart) from its start."""
        he = self.he
        pids = [("ingest_workers", he.worker_pid(i)) for i in range(len(he.workers))]
        pids += [("influxd", he.influx.pid), ("broker", he.broker.pid), ("feectl", he.feectl_pid)]
        pids.append(("harness", os.getpid()))
        for name, pid in pids:
            if pid is None:
                continue
            try:
                used = cpu_s(pid)
            except (OSError, ValueError, IndexError):  # gone since: its last sample stands
                continue
            seen = self._cpu.setdefault((name, pid), [used if self._first else 0.0, used])
            seen[1] = max(seen[1], used)
        self._first = False

    def cpu_by_program(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (name, _pid), (first, last) in self._cpu.items():
            out[name] = round(out.get(name, 0.0) + last - first, 1)
        return out

    def sample(self, readings: int) -> None:
        he = self.he
        he.note_written()
        self.sample_cpu()
        workers = [rss_kib(he.worker_pid(i)) for i in range(len(he.workers))]
        now = {
            "ingest_worker_max": max(workers, default=0),
            "ingest_workers_total": sum(workers),
            "broker": rss_kib(he.broker.pid),
            "influxd": rss_kib(he.influx.pid),
            "feectl": rss_kib(he.feectl_pid),
            "harness": rss_kib(os.getpid()),
        }
        for k, v in now.items():
            self.max[k] = max(self.max.get(k, 0), v)
        self.samples.append((time.monotonic(), readings))

    def peak_rate(self) -> tuple[float, float]:
        """(best readings/s over consecutive samples at least 10 s apart, that window's length)."""
        best, window = 0.0, 0.0
        j = 0
        for i, (t, n) in enumerate(self.samples):
            while j < i and t - self.samples[j + 1][0] >= 10.0:
                j += 1
            t0, n0 = self.samples[j]
            if t - t0 >= 10.0 and (n - n0) / (t - t0) > best:
                best, window = (n - n0) / (t - t0), t - t0
        return best, window


async def run_bench(opts: BenchOptions, *, say: Say = _say, source: Source | None = None) -> BenchReport:
    """One run (see the module docstring); never raises for what went wrong in the run: a
    program that died or a server that did not come back is a failed check of the report."""
    run_dir = opts.run_dir or Path(tempfile.mkdtemp(prefix="amigw-bench-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    report = BenchReport({k: str(v) for k, v in _opts_dict(opts).items()}, str(run_dir))
    fleet = source if source is not None else _make_fleet(opts)
    he = HeadEnd(run_dir, _headend_settings(opts, fleet))
    say(f"run directory {run_dir}; starting mosquitto, influxd, {opts.workers} ingest worker(s)"
        f"{', fee control' if opts.feectl else ''} ...")  # fmt: skip
    stopped = _stop_on_signals(asyncio.current_task())
    try:
        await _start_headend(he)
        edges = EdgeFleet(
            he.broker.url, tuple(fleet.gateways), run_dir / "edges", ack_timeout_s=opts.ack_timeout_s,
            resend_cap_s=opts.resend_cap_s,
        )  # fmt: skip
        say(f"head-end up (broker {he.broker.url}, influxd {he.influx.url}); connecting "
            f"{len(fleet.gateways)} gateways ...")  # fmt: skip
        await edges.start()
        try:
            await _drive(opts, fleet, he, edges, report, say)
        finally:
            await edges.close()
        await _final_checks(opts, fleet, he, report, say)
        if opts.anchors:
            await asyncio.to_thread(_anchors, opts, fleet, he, report, say)
    except (HarnessError, RuntimeError, OSError) as exc:  # ServiceError is a RuntimeError
        report.checks.append(Check("the run completed", False, f"{type(exc).__name__}: {exc}"))
        say(f"run stopped: {exc}")
    except asyncio.CancelledError:
        if not stopped:
            raise
        report.checks.append(Check("the run completed", False, f"stopped by {stopped[0]}"))
        say(f"run stopped by {stopped[0]}; closing the head-end ...")
    finally:
        _restore_signals()
        await asyncio.to_thread(he.close)
    return report


async def _start_headend(he: HeadEnd) -> None:
    """``he.start()`` in a thread; cancelled, it still waits for the start to return, so that
    ``he.close()`` afterwards finds every program the start spawned."""
    started = asyncio.ensure_future(asyncio.to_thread(he.start))
    try:
        await asyncio.shield(started)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await started
        raise


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _stop_on_signals(task: asyncio.Task[Any] | None) -> list[str]:
    """SIGTERM and SIGINT cancel the run's task, so that its head-end (servers, workers, fee
    control) is closed rather than left running; returns the list the signal's name goes into.
    Only in the main thread (elsewhere the signals stay as they are)."""
    stopped: list[str] = []
    loop = asyncio.get_running_loop()

    def stop(sig: signal.Signals) -> None:
        if not stopped and task is not None:
            stopped.append(sig.name)
            task.cancel()

    for sig in _SIGNALS:
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(sig, stop, sig)
    return stopped


def _restore_signals() -> None:
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.remove_signal_handler(sig)


def _opts_dict(opts: BenchOptions) -> dict[str, Any]:
    return {f: getattr(opts, f) for f in BenchOptions.__dataclass_fields__}


def _make_fleet(opts: BenchOptions) -> Any:
    from simulators.fleet import AnomalyRates, Fleet, FleetSpec

    rates = AnomalyRates(min_each=opts.min_each)
    return Fleet(
        FleetSpec(
            gateways=opts.gateways,
            meters_per_gateway=opts.meters,
            intervals=opts.intervals,
            seed=opts.seed,
            rates=rates,
        )
    )


def feectl_setup(fleet: Any) -> FeectlSetup:
    """Fee control for the fleet: one prepaid account per prepaid meter of the registry
    (``account = ...``) on the fleet's tariff, every gateway's command key. Nobody is tripped
    (every day a no-trip day, a vast overdraft allowance): the bench checks charges, and the
    virtual gateways execute no commands."""
    import secrets
    import tomllib

    registry = tomllib.loads(fleet.registry_toml())["meters"]
    accounts = [
        f'[[service.accounts]]\naccount_id = "{m["account"]}"\ntariff = "fleet-tou"\n'
        f'meters = [{{ meter = "{meter}", gateway = "{m["gateway"]}" }}]\n'
        for meter, m in registry.items()
        if "account" in m
    ]
    keys = ", ".join(f'"{gw}" = "gateway.key"' for gw in fleet.gateways)
    toml = (
        "[feectl]\noverdraft_limit_fen = 1000000000000\nalarm1_fen = 2\nalarm2_fen = 1\ngrace_s = 0\n"
        f"interval_s = {fleet.spec.interval_s}\n"
        '[feectl.windows]\nallowed_hours = ["00:00", "00:01"]\n'
        'weekend_days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]\n'
        '[service]\ndb_path = "ledger.sqlite"\ntick_interval_s = 5.0\nresend_interval_s = 600\n'
        f'command_key_files = {{ {keys} }}\ntariff_files = {{ "fleet-tou" = "tariff.toml" }}\n'
        + "".join(accounts)
    )
    return FeectlSetup(toml, {"tariff.toml": fleet.tariff_toml(), "gateway.key": secrets.token_hex(32)})


def _headend_settings(opts: BenchOptions, fleet: Any) -> HeadEndSettings:
    return HeadEndSettings(
        workers=opts.workers, interval_s=int(fleet.spec.interval_s), session_expiry_s=opts.session_expiry_s,
        registry_toml=fleet.registry_toml(), tariff_toml=fleet.tariff_toml(),
        feectl=feectl_setup(fleet) if opts.feectl else None, state_url=opts.state_url,
    )  # fmt: skip


async def _drive(
    opts: BenchOptions, fleet: Any, he: HeadEnd, edges: EdgeFleet, report: BenchReport, say: Say
) -> None:
    """Publish every boundary, inject the faults on schedule, wait for the last confirmation."""
    spec = fleet.spec
    intervals = int(spec.intervals)
    plan = schedule(opts.faults, intervals)
    sim_now = [int(spec.point_ms(0))]
    ctx = FaultContext(
        he, edges, tuple(fleet.gateways), lambda: sim_now[0], fleet.replay_payloads, fleet.jump_clock,
        influx_outage_s=opts.influx_outage_s, flood_count=opts.flood_count, replay_s=opts.replay_s,
        clock_jump_s=opts.clock_jump_s, settle_timeout_s=opts.settle_timeout_s, seed=opts.seed,
    )  # fmt: skip
    meter = _Meter(he)
    t0 = time.monotonic()
    done = [0]
    fault_tasks: list[asyncio.Task[FaultResult]] = []
    progress = asyncio.create_task(_progress(opts, he, edges, meter, done, intervals, sim_now, t0, say))
    last_batches = 0
    try:
        for k in range(intervals):
            boundary_ms = int(spec.point_ms(k))
            sim_now[0] = boundary_ms
            for _at, name in [p for p in plan if p[0] == k]:
                if fault_tasks:  # faults are phases: one at a time, each after the one before
                    await _until_done(he, fault_tasks[-1])
                say(f"fault {name} at boundary {k} ({_sim_text(boundary_ms)})")
                fault_tasks.append(asyncio.create_task(inject(name, ctx, k, t0), name=f"fault-{name}"))
                await asyncio.sleep(0)  # let it start (a stop happens before this boundary's uploads)
            uploads = sorted(fleet.uploads(k), key=lambda u: u.offset_s)
            if opts.speed > 0:
                await _paced(opts, edges, uploads, t0 + k * spec.interval_s / opts.speed)
            else:
                await _until_backlog(he, edges, (opts.lead - 1) * last_batches, fault_tasks)
                for u in uploads:
                    edges.add(u)
            last_batches = len(uploads)
            replays = [(topic, data) for _gw, topic, data in fleet.replays(k)]
            if replays:  # the generator's own replay anomalies: old batches, raw, as they were
                fault_tasks.append(asyncio.create_task(_publish_raw(he, replays, k, t0), name=f"replay-{k}"))
            done[0] = k + 1
            await asyncio.sleep(0)
        say(f"every boundary published; waiting for the last confirmations (backlog {edges.stats().backlog})")
        await _until_backlog(he, edges, 0, fault_tasks, opts.settle_timeout_s)
        for task in fault_tasks:
            report.faults.append(await task)
        await _until_backlog(he, edges, 0, fault_tasks, opts.settle_timeout_s)  # what a late fault re-sent
    finally:
        progress.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await progress
        for task in fault_tasks:
            if not task.done():
                task.cancel()
    wall = time.monotonic() - t0
    meter.sample(edges.stats().readings_confirmed)
    stats = edges.stats()
    peak, window = meter.peak_rate()
    lat = edges.latencies_s
    report.throughput = {
        "readings": stats.readings_confirmed, "batches": stats.confirmed, "wall_s": round(wall, 2),
        "readings_per_s": round(stats.readings_confirmed / wall, 1) if wall else 0.0,
        "peak_readings_per_s": round(peak, 1), "window_s": round(window, 1), "boundaries": intervals,
    }  # fmt: skip
    report.latency_s = {
        "what": "batch added to its edge outbox -> head-end confirmation (written to InfluxDB: queryable)",
        "batches": len(lat), "p50": round(percentile(lat, 50), 3), "p95": round(percentile(lat, 95), 3),
        "p99": round(percentile(lat, 99), 3), "max": round(max(lat, default=0.0), 3),
    }  # fmt: skip
    report.memory_kib = dict(meter.max)
    report.cpu_s = meter.cpu_by_program()
    report.counts.update(batches_added=stats.added, batches_confirmed=stats.confirmed, resent=stats.resent,
                         outbox_dropped=stats.dropped, backlog_at_end=stats.backlog,
                         batches_written_by_worker=he.written_by_worker())  # fmt: skip
    report.checks.append(
        Check(
            "every batch confirmed by the head-end",
            stats.backlog == 0 and stats.confirmed == stats.added,
            f"{stats.confirmed} of {stats.added} confirmed, {stats.backlog} still stored",
        )
    )
    report.checks.append(Check("no outbox dropped anything", stats.dropped == 0, f"{stats.dropped} dropped"))


async def _publish_raw(he: HeadEnd, items: list[tuple[str, bytes]], k: int, t0: float) -> FaultResult:
    res = FaultResult("generator-replay", k, time.monotonic() - t0, evidence={"published": len(items)})
    async with RawClient(he.broker.url, f"bench-gen-replay-{k}") as raw:
        await raw.publish_all(items)
    res.duration_s = time.monotonic() - t0 - res.started_s
    return res


async def _paced(opts: BenchOptions, edges: EdgeFleet, uploads: Sequence[UploadLike], at: float) -> None:
    for u in uploads:
        delay = at + u.offset_s / opts.speed - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        edges.add(u)


async def _until_done(he: HeadEnd, task: asyncio.Task[FaultResult]) -> None:
    while not task.done():
        he.check()
        await asyncio.sleep(0.05)


async def _until_backlog(
    he: HeadEnd, edges: EdgeFleet, most: int, faults: list[asyncio.Task[FaultResult]], timeout_s: float = 0.0
) -> None:
    """Until at most ``most`` batches are unconfirmed (``timeout_s`` > 0: at most that long)."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    while edges.stats().backlog > most:
        he.check()
        for task in faults:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        if deadline is not None and time.monotonic() > deadline:
            raise HarnessError(f"{edges.stats().backlog} batches still unconfirmed after {timeout_s:.0f} s")
        await asyncio.sleep(0.05)


def _sim_text(ms: int) -> str:
    local = dt.datetime.fromtimestamp(ms / 1000, dt.UTC) + dt.timedelta(hours=8)
    return local.strftime("%Y-%m-%d %H:%M") + " UTC+8"


async def _progress(
    opts: BenchOptions, he: HeadEnd, edges: EdgeFleet, meter: _Meter, done: list[int], intervals: int,
    sim_now: list[int], t0: float, say: Say,
) -> None:  # fmt: skip
    last_t, last_n = t0, 0
    while True:
        await asyncio.sleep(opts.progress_s)
        s = edges.stats()
        meter.sample(s.readings_confirmed)
        now = time.monotonic()
        rate = (s.readings_confirmed - last_n) / max(now - last_t, 1e-9)
        last_t, last_n = now, s.readings_confirmed
        say(
            f"t+{now - t0:5.0f}s  sim {_sim_text(sim_now[0])}  boundaries {done[0]}/{intervals}  "
            f"{rate:,.0f} readings/s (avg {s.readings_confirmed / max(now - t0, 1e-9):,.0f})  "
            f"backlog {s.backlog} unconfirmed  resent {s.resent}  workers {len(he.live_workers())} live  "
            f"gateways {s.connected}/{len(edges.names)} connected"
        )


async def _final_checks(opts: BenchOptions, fleet: Any, he: HeadEnd, report: BenchReport, say: Say) -> None:
    say("waiting for the rollups and fee control to settle ...")
    await _settle_rollups(he, opts.settle_timeout_s)
    await _settle_ledger(he, opts.settle_timeout_s)
    loss = await asyncio.to_thread(he.loss_account)
    missing, lost = int(loss.get("missing", -1)), int(loss.get("lost", -1))  # type: ignore[call-overload]
    dead = he.dead_letters()
    report.counts.update(missing_batches=missing, lost_batches=lost, dead_letters=dead)
    report.checks.append(
        Check(
            "ingest's loss account at 0",
            missing == 0 and lost == 0,
            f"missing {missing}, lost at sequence resets {lost}",
        )
    )
    flood = sum(f.evidence.get("dead_lettered", 0) for f in report.faults if f.name == "flood")  # type: ignore[misc]
    report.checks.append(
        Check(
            "nothing dead-lettered but the flood",
            sum(dead.values()) == flood,
            f"{sum(dead.values())} dead letters, {flood} from the flood: {dead}",
        )
    )
    say("checking the stores against the ground truth ...")
    await asyncio.to_thread(_store_check, fleet, he, report, opts.max_false_flag_rate, say, opts.progress_s)


def _store_check(
    fleet: Any, he: HeadEnd, report: BenchReport, max_false_flag_rate: float, say: Say, progress_s: float
) -> None:
    try:
        from simulators import fleet_check
    except ImportError as exc:
        report.checks.append(
            Check("stores match the ground truth (fleet_check)", False, f"not available: {exc}")
        )
        return

    ledger = None if he.ledger_path is None else str(he.ledger_path)
    result = fleet_check.check(
        fleet.truth, influx_url=he.influx.url, database=DATABASE, ledger_path=ledger,
        ledger_reader=lambda path: ledger_charges(Path(path)), max_false_flag_rate=max_false_flag_rate,
        progress=say, progress_s=progress_s,
    )  # fmt: skip
    report.store_check = result.to_dict()
    report.store_summary = result.summary() if hasattr(result, "summary") else str(result)
    d = report.store_check
    for key in ("lost", "duplicated"):
        if key in d:
            report.counts[key] = d[key]
    report.checks.append(
        Check(
            "stores match the ground truth (fleet_check)",
            bool(result.ok),
            report.store_summary.splitlines()[0] if report.store_summary else "",
        )
    )


async def _settle_rollups(he: HeadEnd, timeout_s: float) -> None:
    """Until every live worker reports no rollup pending, twice in a row 1 s apart."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while quiet < 2:
        he.check()
        pending = [he.worker_metrics(i).get("amigw_ingest_rollup_pending") for i in he.live_workers()]
        quiet = quiet + 1 if pending and all(p == 0 for p in pending) else 0
        if time.monotonic() > deadline:
            raise HarnessError(f"rollups still pending after {timeout_s:.0f} s: {pending}")
        await asyncio.sleep(1.0)


async def _settle_ledger(he: HeadEnd, timeout_s: float) -> None:
    """Until fee control has handled no message and journaled nothing for 5 s (it charges the
    intervals ingest published, one message after another)."""
    path = he.ledger_path
    if path is None:
        return
    import sqlite3

    def progress() -> tuple[float, int]:
        handled = he.feectl_metrics().get("amigw_feectl_messages_total", -1.0)
        if not path.exists():
            return handled, 0
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            return handled, int(db.execute("SELECT max(seq) FROM journal").fetchone()[0] or 0)

    deadline = time.monotonic() + timeout_s
    last, stable_since = (-2.0, -1), time.monotonic()
    while time.monotonic() - stable_since < 5.0:
        he.check()
        now = await asyncio.to_thread(progress)
        if now != last:
            last, stable_since = now, time.monotonic()
        if time.monotonic() > deadline:
            raise HarnessError(f"fee control still charging after {timeout_s:.0f} s")
        await asyncio.sleep(0.5)


def command_line(argv: Sequence[str]) -> str:
    """The exact command, for the report."""
    return "amigw bench " + shlex.join(argv)


# -- the anchors -------------------------------------------------------------------------------
def _anchors(opts: BenchOptions, fleet: Any, he: HeadEnd, report: BenchReport, say: Say) -> None:
    """influxd's ceilings and the conventional pipeline over ``--anchor-hours`` of the same fleet
    (clean), on the run's servers, once the run's own programs are stopped (see the module doc)."""
    import dataclasses

    from ingest.config import load_config
    from ingest.pipeline.transform import Settings
    from protocols.payload import ReadingBatch, decode, encode
    from simulators import bench_anchors as ba
    from simulators.fleet import AnomalyRates, Fleet

    try:
        for i in he.live_workers():
            he.stop_worker(i)
        he.stop_feectl()
        spec = dataclasses.replace(
            fleet.spec, intervals=max(1, round(opts.anchor_hours * 3600 / fleet.spec.interval_s)) + 1,
            rates=AnomalyRates.none(), history_intervals=0,
        )  # fmt: skip
        sample = Fleet(spec)
        say(f"anchors: building {opts.anchor_hours:g} simulated hour(s) of the fleet ...")
        warm_batches: list[ReadingBatch] = []
        batches: list[ReadingBatch] = []
        for k in range(spec.intervals):  # the first boundary warms the series up, unmeasured
            for i, up in enumerate(sample.uploads(k)):
                (warm_batches if k == 0 else batches).append(decode(up.make_payload(k * 10_000 + i + 1)))
        readings = _readings(batches)
        points, warm_points = _points(batches), _points(warm_batches)
        cores = len(os.sched_getaffinity(0))
        clients = max(2, cores)
        settings = Settings.from_config(load_config(he.worker_config(0)))
        field_name = "energy_fwd_active_total"  # every meter of the fleet has it
        warm_r = ba.Warm(ba.readings_lines(warm_batches), warm_points)
        warm_p = ba.Warm(ba.pipeline_lines(warm_batches, settings), warm_points)
        say(f"anchors: influxd ceiling, {readings:,} readings alone ({clients} clients) ...")
        ceil_r = ba.ceiling_run(
            he.influx, ba.bodies(ba.readings_lines(batches)), readings, points, clients, warm_r, field_name
        )
        say("anchors: influxd ceiling, the pipeline's lines for them ...")
        ceil_p = ba.ceiling_run(
            he.influx, ba.bodies(ba.pipeline_lines(batches, settings)), readings, points, clients, warm_p,
            field_name,
        )  # fmt: skip
        say("anchors: the conventional pipeline ...")
        warm_c = ba.Warm(ba.conventional_lines(warm_batches), _readings(warm_batches))
        items = [(topics.readings(b.gateway), encode(b, "json")) for b in batches]
        conv = ba.conventional_run(
            he.broker, he.influx, items, readings, he.dir, lambda text: say(f"anchors: {text}"), warm_c
        )
    except (ba.BenchError, OSError, RuntimeError) as exc:
        report.anchors = {"error": f"{type(exc).__name__}: {exc}"}
        say(f"anchors not measured: {exc}")
        return
    report.anchors = {
        "sample": f"{opts.anchor_hours:g} simulated hour(s), {len(batches):,} batches, {readings:,} readings",
        "cores": cores, "clients": clients,
        "ceiling_readings": dataclasses.asdict(ceil_r), "ceiling_pipeline": dataclasses.asdict(ceil_p),
        "conventional": dataclasses.asdict(conv),
    }  # fmt: skip


def _readings(batches: Sequence[Any]) -> int:
    return sum(len(b.meter) for b in batches)


def _points(batches: Sequence[Any]) -> int:
    """Wide ``meter_reading`` points: distinct (meter, ts) per batch."""
    return sum(len(set(zip(list(b.meter), list(b.ts), strict=True))) for b in batches)
