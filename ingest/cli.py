"""``amigw ingest --config ingest.toml [--workers N] [--check-config] [--completeness METER DAY]``.

Loads the whole configuration once (registry and tariff calendar included), so a bad file is a
:class:`~protocols.errors.ConfigError` at start (exit 2 from ``amigw``). ``--workers N`` starts N
independent worker processes (each its own MQTT session ``<client_id>-<i>`` in the shared
subscription, its own sink connection, metrics on port + i) and supervises them: SIGTERM/SIGINT
are passed on, a worker that dies is restarted after a pause. With one worker the process itself
is the worker. ``--completeness`` prints the KPI-01 line of one meter-day from InfluxDB and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from ingest.config import IngestConfig, load_calendar, load_config
from protocols.errors import ConfigError

__all__ = ["add_arguments", "run"]

log = logging.getLogger("amigw.ingest")

RESTART_PAUSE_S = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="the ingest TOML file")
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--workers", type=int, default=1, help="worker processes to start (default 1)")
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--completeness",
        nargs=2,
        metavar=("METER", "DAY"),
        help="print interval completeness of METER on local day DAY (YYYY-MM-DD) and exit",
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.check_config:
        print(
            f"{args.config}: ok: mqtt={cfg.mqtt.url} topics={','.join(cfg.mqtt.topics)} "
            f"influx={cfg.influx.url} api={cfg.influx.api} db={cfg.influx.database} "
            f"schema={cfg.pipeline.schema} registry={cfg.registry or 'none'} "
            f"tariff_calendar={cfg.tariff_calendar or 'built-in'} queue_max={cfg.mqtt.queue_max}"
        )
        return 0
    if args.completeness:
        return _completeness(cfg, *args.completeness)
    if args.workers < 1:
        raise ConfigError("--workers", f"expected >= 1, got {args.workers}")
    if args.worker_index is not None or args.workers == 1:
        from ingest.pipeline import run_worker

        asyncio.run(run_worker(cfg, args.worker_index or 0))
        return 0
    return _supervise(args.config, args.workers)


def _completeness(cfg: IngestConfig, meter: str, day_text: str) -> int:
    from ingest.pipeline import InfluxQuery, query_completeness

    try:
        day = dt.date.fromisoformat(day_text)
    except ValueError:
        raise ConfigError("--completeness", f"DAY: expected YYYY-MM-DD, got {day_text!r}") from None
    offset = load_calendar(cfg).utc_offset_ms

    async def main() -> str:
        query = InfluxQuery(cfg.influx)
        try:
            report = await query_completeness(
                query, meter, day, utc_offset_ms=offset, interval_ms=cfg.pipeline.interval_s * 1000
            )
        finally:
            await query.aclose()
        return str(report)

    print(asyncio.run(main()))
    return 0


def _worker_argv(config: Path, index: int) -> list[str]:
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return [sys.executable, "-m", "gateway.cli", "--log-level", str(level), "ingest",
            "--config", str(config), "--worker-index", str(index)]  # fmt: skip


def _supervise(config: Path, workers: int) -> int:
    """Start N workers, pass SIGTERM/SIGINT on, restart a worker that died on its own."""
    procs = {i: subprocess.Popen(_worker_argv(config, i)) for i in range(workers)}
    stopping = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("ingest supervisor started workers=%d pids=%s", workers, [p.pid for p in procs.values()])
    while True:
        time.sleep(0.2)
        if stopping:
            for p in procs.values():
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            return 0
        for i, p in list(procs.items()):
            rc = p.poll()
            if rc is not None:
                log.error("ingest worker died worker=%d rc=%s; restarting in %.0fs", i, rc, RESTART_PAUSE_S)
                time.sleep(RESTART_PAUSE_S)
                procs[i] = subprocess.Popen(_worker_argv(config, i))
