"""``amigw ingest --config ingest.toml [--workers N] [--check-config] [--completeness METER DAY]
[--daily-report DAY [--json]] [--loss [--json]]
[--replay-dead-letters [--since T] [--until T] [--reason R]]
[--billing-export --from DAY --to DAY [--by meter|account] [--format csv|json|ndjson] [--output FILE]
[--accounts-db FILE]]``.

Loads the whole configuration once (registry and tariff calendar included), so a bad file is a
:class:`~protocols.errors.ConfigError` at start (exit 2 from ``amigw``). ``--workers N`` starts N
independent worker processes (each its own MQTT session ``<client_id>-<i>`` in the shared
subscription, its own sink connection, metrics on port + i) and supervises them: SIGTERM/SIGINT
are passed on and end the supervisor once the workers exit, SIGHUP (registry reload) is passed on
to every live worker and the supervisor keeps running, a worker that dies is restarted after a
pause. With one worker the process itself is the worker. ``--completeness`` prints the KPI-01 line
of one meter-day from InfluxDB and exits. ``--daily-report DAY`` computes the day's line loss per
transformer area and collection success per meter, gateway and area from ``daily_tou``, writes
them to InfluxDB (idempotent), prints a summary (``--json``: one JSON document) and exits
(:mod:`ingest.reports.daily`, ``docs/ingest-report.md``). ``--check-config`` also probes InfluxDB
(:meth:`~ingest.sinks.base.Sink.probe`, nothing written or created): a refusal is a
ConfigError naming the key to fix (exit 2), an unreachable server a SinkError (exit 1); with
``[state] url`` it first connects to that database (a ConfigError naming ``state.url`` when it
cannot).
``--replay-dead-letters`` puts dead-lettered payloads back through the pipeline
(:mod:`ingest.pipeline.replay`; exit 1 when one is still failing or the replay stopped). ``--loss``
prints the loss account of ``[loss] path`` (or of ``[state] url``, shared by every machine;
:mod:`ingest.pipeline.loss`): each gateway with open gaps
or batches lost at a sequence reset, the gaps with their age, and a total line (``--json``:
every gateway, one JSON document); it exits 0 whatever the account says. ``--billing-export``
writes the validated daily and TOU totals of the local days ``--from`` .. ``--to`` per meter or
per account to stdout or ``--output`` (:mod:`ingest.reports.billing`, ``docs/billing.md``), a
progress line per day on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ingest.config import IngestConfig, load_calendar, load_config
from protocols.errors import ConfigError

if TYPE_CHECKING:
    from ingest.sinks.influx.sink import InfluxSink
    from ingest.sinks.victoria.sink import VictoriaSink

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
    parser.add_argument(
        "--daily-report",
        metavar="DAY",
        help="compute, write and print the line-loss and collection report of local day DAY (YYYY-MM-DD), "
        "then exit; run it once the day is complete",
    )
    parser.add_argument(
        "--loss",
        action="store_true",
        help="print the batches missing per gateway (open seq gaps and their age) and exit",
    )
    parser.add_argument(
        "--json", action="store_true", help="with --daily-report or --loss: print one JSON document"
    )
    parser.add_argument(
        "--replay-dead-letters",
        action="store_true",
        help="put the dead-lettered payloads back through the pipeline (once their cause is fixed) and exit",
    )
    parser.add_argument(
        "--since", metavar="T", help="with --replay-dead-letters: received at or after T (ISO 8601)"
    )
    parser.add_argument(
        "--until", metavar="T", help="with --replay-dead-letters: received before T (ISO 8601)"
    )
    parser.add_argument(
        "--reason", metavar="R", help="with --replay-dead-letters: only entries of this reason"
    )
    parser.add_argument(
        "--billing-export",
        action="store_true",
        help="write the validated daily and TOU totals of the local days --from .. --to (both included) "
        "and exit",
    )
    parser.add_argument(
        "--from",
        dest="from_day",
        metavar="DAY",
        help="with --billing-export: the first local day (YYYY-MM-DD)",
    )
    parser.add_argument(
        "--to", dest="to_day", metavar="DAY", help="with --billing-export: the last local day (YYYY-MM-DD); "
        "366 days at most in all",
    )  # fmt: skip
    parser.add_argument(
        "--by", metavar="meter|account", help="with --billing-export: one row per meter-day (default) "
        "or per account-day",
    )  # fmt: skip
    parser.add_argument(
        "--format", dest="fmt", metavar="csv|json|ndjson", help="with --billing-export: the output "
        "format (default csv)",
    )  # fmt: skip
    parser.add_argument(
        "--output", metavar="FILE", type=Path, help="with --billing-export: write FILE (default stdout)"
    )
    parser.add_argument(
        "--accounts-db", metavar="FILE", type=Path, help="with --billing-export: meter -> account from "
        "this fee-control ledger (default: the registry's account keys)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.check_config:
        _check_state(cfg)
        sink = asyncio.run(_check_sink(cfg))
        print(
            f"{args.config}: ok: mqtt={cfg.mqtt.url} topics={','.join(cfg.mqtt.topics)} "
            f"influx={cfg.influx.url} api={cfg.influx.api} db={cfg.influx.database} "
            f"schema={cfg.pipeline.schema} registry={cfg.registry or 'none'} "
            f"tariff_calendar={cfg.tariff_calendar or 'built-in'} queue_max={cfg.mqtt.queue_max}\n{sink}"
        )
        return 0
    if args.json and not (args.daily_report or args.loss):
        raise ConfigError("--json", "only with --daily-report or --loss")
    for key, option in _EXPORT_OPTIONS.items():
        if getattr(args, key) is not None and not args.billing_export:
            raise ConfigError(f"--{option}", "only with --billing-export")
    if args.loss:
        return _loss(cfg, as_json=args.json)
    for option in ("since", "until", "reason"):
        if getattr(args, option) is not None and not args.replay_dead_letters:
            raise ConfigError(f"--{option}", "only with --replay-dead-letters")
    if args.replay_dead_letters:
        return _replay(cfg, args)
    if args.billing_export:
        return _billing_export(cfg, args)
    if args.completeness:
        return _completeness(cfg, *args.completeness)
    if args.daily_report:
        return _daily_report(cfg, args.daily_report, as_json=args.json)
    if args.workers < 1:
        raise ConfigError("--workers", f"expected >= 1, got {args.workers}")
    if args.worker_index is not None or args.workers == 1:
        from ingest.pipeline.worker import run_worker

        asyncio.run(run_worker(cfg, args.worker_index or 0))
        return 0
    return _supervise(args.config, args.workers)


def _completeness(cfg: IngestConfig, meter: str, day_text: str) -> int:
    day = _day("--completeness", day_text)
    offset = load_calendar(cfg).utc_offset_ms

    async def main() -> str:
        async with _sink(cfg) as sink:
            report = await sink.completeness(
                meter, day, utc_offset_ms=offset, interval_ms=cfg.pipeline.interval_s * 1000
            )
        return str(report)

    print(asyncio.run(main()))
    return 0


def _day(option: str, text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(option, f"DAY: expected YYYY-MM-DD, got {text!r}") from None


def _daily_report(cfg: IngestConfig, day_text: str, *, as_json: bool) -> int:
    from ingest.reports.daily import daily_report, day_window
    from protocols.errors import SinkError

    day = _day("--daily-report", day_text)
    _, end_ms = day_window(day, load_calendar(cfg).utc_offset_ms)
    if end_ms > time.time() * 1000:
        log.warning("daily report day=%s: the day is not over yet; run it again once it is", day)
    try:
        report = asyncio.run(daily_report(cfg, day))
    except SinkError as exc:
        # one line naming what failed, through amigw's AmigwError handler (exit 1, no traceback)
        msg = f"daily report {day}: InfluxDB {cfg.influx.url}: {exc}"
        raise SinkError(msg, retryable=exc.retryable, status=exc.status) from None
    print(json.dumps(report.to_dict(), ensure_ascii=False) if as_json else report.summary())
    return 0


_EXPORT_OPTIONS = {
    "from_day": "from", "to_day": "to", "by": "by", "fmt": "format", "output": "output",
    "accounts_db": "accounts-db",
}  # fmt: skip


def _billing_export(cfg: IngestConfig, args: argparse.Namespace) -> int:
    """The export to ``--output`` (written beside it and renamed once complete, so a failed
    export leaves no file that looks whole) or stdout; a progress line per day on stderr."""
    from ingest.reports.billing import billing_export
    from protocols.errors import ExportError, SinkError

    for option in ("from_day", "to_day"):
        if getattr(args, option) is None:
            raise ConfigError(f"--{_EXPORT_OPTIONS[option]}", "required with --billing-export")
    start, end = _day("--from", args.from_day), _day("--to", args.to_day)

    def progress(done: int, days: int) -> None:
        print(f"billing export: {done}/{days} days ({start + dt.timedelta(days=done - 1)})", file=sys.stderr)

    part = None if args.output is None else args.output.with_name(args.output.name + ".part")
    out = sys.stdout.buffer if part is None else part.open("wb")
    done = False
    try:
        asyncio.run(
            billing_export(
                cfg, out.write, start_day=start, end_day=end, by=args.by or "meter", fmt=args.fmt or "csv",
                accounts_db=args.accounts_db, progress=progress,
            )
        )  # fmt: skip
        done = True
    except ExportError as exc:
        raise ConfigError(f"--{exc.key_path}", exc.reason) from None
    except SinkError as exc:
        msg = f"billing export {start}..{end}: InfluxDB {cfg.influx.url}: {exc}"
        raise SinkError(msg, retryable=exc.retryable, status=exc.status) from None
    finally:
        out.flush()
        if part is not None:
            out.close()
            if done:
                part.replace(args.output)
            else:
                part.unlink(missing_ok=True)
    return 0


def _check_state(cfg: IngestConfig) -> None:
    """With ``[state] url``: connect to the shared state database once (nothing is created).

    Raises: ConfigError naming ``state.url`` when it cannot be reached or refuses the login."""
    if not cfg.state.url:
        return
    from ingest.pipeline.statedb import StateDb
    from protocols.errors import StateUnavailable

    try:
        StateDb("", url=cfg.state.url, connect_timeout_s=cfg.state.connect_timeout_s).close()
    except StateUnavailable as exc:
        raise ConfigError("state.url", str(exc)) from None


async def _check_sink(cfg: IngestConfig) -> str:
    """Probe the store(s) without writing or creating anything; the summary line, else raise.

    Raises: ConfigError naming the key for a refusal, SinkError when unreachable."""
    from ingest.sinks.victoria.sink import VictoriaSink
    from protocols.errors import SinkError, SinkRefused

    influx = cfg.influx
    async with _sink(cfg) as sink:
        vm = ""
        if isinstance(sink, VictoriaSink):  # VictoriaMetrics first: its refusals name its keys
            try:
                await sink.probe_victoria()
            except SinkRefused as exc:
                key = "read_url" if "[victoriametrics] read_url" in str(exc) else "write_url"
                raise ConfigError(f"victoriametrics.{key}", str(exc)) from None
            except SinkError as exc:
                raise SinkError(f"victoriametrics: {exc}", retryable=True, status=exc.status) from None
            vm = f"victoriametrics {cfg.victoriametrics.writes_to} accepts writes; records: "
            sink = sink.records
        try:
            return vm + await sink.probe(create=False)
        except SinkRefused as exc:
            if exc.reason == "not_found" and influx.create_database and sink.api == "v1":
                return (
                    f"influxdb {influx.url} (v1): database {influx.database!r} missing, the worker creates it"
                )
            raise ConfigError(_refused_key(exc.reason, sink.api, influx.username), str(exc)) from None
        except SinkError as exc:
            raise SinkError(f"influxdb {influx.url}: {exc}", retryable=True, status=exc.status) from None


def _sink(cfg: IngestConfig) -> InfluxSink | VictoriaSink:
    """The configured sink (:func:`~ingest.sinks.configured.configured_sink`)."""
    from ingest.sinks.configured import configured_sink

    return configured_sink(cfg)


def _refused_key(reason: str, api: str | None, username: str | None) -> str:
    """The ``[influx]`` key an operator fixes for a refusal."""
    if reason == "api_unknown":
        return "influx.api"
    if reason == "not_found":
        return "influx.database" if api == "v1" else "influx.bucket"
    if api == "v2":
        return "influx.token"
    if reason == "unauthorized" and username is not None:
        return "influx.password"
    return "influx.username" if reason in ("unauthorized", "forbidden") else "influx"


def _replay(cfg: IngestConfig, args: argparse.Namespace) -> int:
    from ingest.pipeline.replay import exit_status, parse_time_ms, replay_dead_letters

    since = parse_time_ms("--since", args.since)
    until = parse_time_ms("--until", args.until)
    summary = asyncio.run(
        replay_dead_letters(cfg, sys.stdout, since_ms=since, until_ms=until, reason=args.reason)
    )
    return exit_status(summary)


def _loss(cfg: IngestConfig, *, as_json: bool) -> int:
    from ingest.pipeline.loss import Gap, LossStore
    from ingest.pipeline.statedb import redact

    path = Path(cfg.loss.path)
    where = redact(cfg.state.url) if cfg.state.url else str(path)
    accounts = []
    if cfg.state.url or path.exists():  # a machine whose workers never ran has no file
        with LossStore.from_config(cfg.loss, cfg.state.url) as store:
            accounts = store.report()
    now_ms = int(time.time() * 1000)
    missing = sum(a.missing for a in accounts)

    def age_s(g: Gap) -> float:
        return round((now_ms - g.opened_ms) / 1000, 1)

    if as_json:
        gateways = [
            {
                "gateway": a.gateway, "first": a.first, "last": a.last, "missing": a.missing,
                "resets": a.resets, "lost": a.lost,
                "gaps": [
                    {"first": g.first, "last": g.last, "missing": g.missing, "opened_ms": g.opened_ms,
                     "age_s": age_s(g), "alarmed": g.alarmed_ms is not None}
                    for g in a.gaps
                ],
            }
            for a in accounts
        ]  # fmt: skip
        doc = {
            "path": where,
            "missing": missing,
            "lost": sum(a.lost for a in accounts),
            "gateways": gateways,
        }
        print(json.dumps(doc, ensure_ascii=False))
        return 0
    for a in accounts:
        if not a.gaps and not a.lost:
            continue
        line = f"{a.gateway}: durable {a.first}-{a.last}, missing {a.missing}"
        if a.gaps:
            alarmed = {True: ", alarmed", False: ""}
            gaps = [
                f"{g.first}-{g.last} (open {age_s(g):.0f} s{alarmed[g.alarmed_ms is not None]})"
                for g in a.gaps
            ]
            line += f" in {len(a.gaps)} gap(s): {', '.join(gaps)}"
        if a.lost:
            line += f"; {a.lost} lost at {a.resets} sequence reset(s)"
        print(line)
    gaps_total = sum(len(a.gaps) for a in accounts)
    print(f"missing {missing} batch(es) in {gaps_total} gap(s) across {len(accounts)} gateway(s) ({where})")
    return 0


def _worker_argv(config: Path, index: int) -> list[str]:
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return [sys.executable, "-m", "gateway.cli", "--log-level", str(level), "ingest",
            "--config", str(config), "--worker-index", str(index)]  # fmt: skip


def _supervise(config: Path, workers: int) -> int:
    """Start N workers; pass SIGTERM/SIGINT on and return 0 once they exit; pass SIGHUP (registry
    reload) on to every live worker and keep going; restart a worker that died on its own.

    The handlers are installed before the first worker starts, so no signal finds the supervisor
    with its default action (SIGHUP's would kill it and leave the workers unsupervised). A worker
    that gets SIGHUP before its own handler is installed dies of it and is restarted, which also
    loads the new registry."""
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        _signal_live(procs, signal.SIGTERM)

    def reload(_sig: int, _frame: object) -> None:
        log.info("ingest supervisor: SIGHUP passed on to the workers (registry reload)")
        _signal_live(procs, signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    for i in range(workers):
        procs[i] = subprocess.Popen(_worker_argv(config, i))
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
                if not stopping:
                    procs[i] = subprocess.Popen(_worker_argv(config, i))


def _signal_live(procs: dict[int, subprocess.Popen[bytes]], sig: signal.Signals) -> None:
    for p in list(procs.values()):
        if p.poll() is None:
            p.send_signal(sig)
