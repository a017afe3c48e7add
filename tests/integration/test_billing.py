"""The billing export (``ingest.reports.billing``, ``amigw ingest --billing-export``) against a real influxd.

``daily_tou`` rows are written through the InfluxDB sink as the workers' rollups
(:class:`~ingest.sinks.base.Rollup`, the sink's own line protocol) for three local days
2026-12-01 .. 03 at UTC+8, and one row on each day just outside the range. The registry knows
``M1`` and ``M 2,x`` (account ``AC-1``, bound to ``gw-a``) and ``M3`` (``AC-2``, bound to ``gw-b``);
``U9`` is not in it but has data on the first day.

* day 1: all complete; ``M 2,x`` has 3 estimated intervals;
* day 2: ``M1`` has a VEE-15 mismatch, ``M 2,x`` reverse energy, ``M3`` no row at all;
* day 3: ``M1`` 91 intervals and 2 invalid; ``M 2,x`` half under ``gw-a``, half (1 estimated)
  under ``gw-b``.

Every expected cell below is worked out by hand from those rows.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import socket
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ingest.config import IngestConfig, parse_config
from ingest.feectl.model import Account, MeterRef
from ingest.feectl.sqlite_store import SqliteLedgerStore
from ingest.model.registry import MeterRegistry
from ingest.reports.billing import columns, export_daily, registry_accounts
from ingest.sinks.base import PeriodTotals, Rollup, Writes
from ingest.sinks.influx.sink import InfluxSink

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DAY_MS = 86_400_000
D0 = 1_796_054_400_000  # 2026-12-01 00:00 at UTC+8
FIRST, LAST = dt.date(2026, 12, 1), dt.date(2026, 12, 3)
M2 = "M 2,x"
DAILY = ("total", "sharp", "peak", "flat", "valley", "intervals", "estimated", "invalid",
         "reg_sharp", "reg_peak", "reg_flat", "reg_valley", "tou_mismatch")  # fmt: skip
REVERSE = ("rev_total", "rev_intervals", "rev_invalid")


def row(sharp: int, peak: int, flat: int, valley: int, n: int = 96, est: int = 0, bad: int = 0, mm: int = 0,
        rev: int | None = None) -> dict[str, int]:  # fmt: skip
    """A daily_tou row's fields; the registers agree with the calendar's split."""
    tou = [sharp, peak, flat, valley]
    out = dict(zip(DAILY, [sum(tou), *tou, n, est, bad, *tou, mm], strict=True))
    if rev is not None:
        out |= {"rev_total": rev, "rev_intervals": 96, "rev_invalid": 0}
    return out


# (day index from 2026-12-01, meter, gateway) -> fields (0.01 kWh)
ROWS = {
    (-1, "M1", "gw-a"): row(1111, 0, 0, 10000),  # 2026-11-30: outside
    (0, "M1", "gw-a"): row(1000, 2000, 3000, 3600),
    (0, M2, "gw-a"): row(500, 1000, 1500, 1800, est=3),
    (0, "M3", "gw-b"): row(100, 200, 300, 360),
    (0, "U9", "gw-b"): row(10, 20, 30, 40),
    (1, "M1", "gw-a"): row(1000, 2100, 3000, 3600, mm=1),
    (1, M2, "gw-a"): row(500, 1000, 1500, 1800, rev=250),
    (2, "M1", "gw-a"): row(900, 2000, 3000, 3200, n=91, bad=2),
    (2, M2, "gw-a"): row(250, 500, 750, 900, n=48),
    (2, M2, "gw-b"): row(250, 500, 750, 900, n=48, est=1),
    (2, "M3", "gw-b"): row(100, 200, 300, 360),
    (3, "M1", "gw-a"): row(2222, 0, 0, 20000),  # 2026-12-04: outside
}

BY_METER = """\
2026-12-01,"M 2,x",gw-a,AC-1,48.00,5.00,10.00,15.00,18.00,,96,96,3,0,0,100.00,estimated
2026-12-01,M1,gw-a,AC-1,96.00,10.00,20.00,30.00,36.00,,96,96,0,0,0,100.00,ok
2026-12-01,M3,gw-b,AC-2,9.60,1.00,2.00,3.00,3.60,,96,96,0,0,0,100.00,ok
2026-12-01,U9,gw-b,,1.00,0.10,0.20,0.30,0.40,,96,96,0,0,0,100.00,ok
2026-12-02,"M 2,x",gw-a,AC-1,48.00,5.00,10.00,15.00,18.00,2.50,96,96,0,0,0,100.00,ok
2026-12-02,M1,gw-a,AC-1,97.00,10.00,21.00,30.00,36.00,,96,96,0,0,1,100.00,tou_mismatch
2026-12-02,M3,gw-b,AC-2,,,,,,,0,96,0,0,0,0.00,missing
2026-12-03,"M 2,x",gw-a;gw-b,AC-1,48.00,5.00,10.00,15.00,18.00,,96,96,1,0,0,100.00,estimated
2026-12-03,M1,gw-a,AC-1,91.00,9.00,20.00,30.00,32.00,,91,96,0,2,0,94.79,incomplete;invalid
2026-12-03,M3,gw-b,AC-2,9.60,1.00,2.00,3.00,3.60,,96,96,0,0,0,100.00,ok
"""

BY_ACCOUNT = """\
2026-12-01,AC-1,2,144.00,15.00,30.00,45.00,54.00,,192,192,3,0,0,100.00,estimated
2026-12-01,AC-2,1,9.60,1.00,2.00,3.00,3.60,,96,96,0,0,0,100.00,ok
2026-12-02,AC-1,2,145.00,15.00,31.00,45.00,54.00,2.50,192,192,0,0,1,100.00,tou_mismatch
2026-12-02,AC-2,1,,,,,,,0,96,0,0,0,0.00,missing
2026-12-03,AC-1,2,139.00,14.00,30.00,45.00,50.00,,187,192,1,2,0,97.39,incomplete;estimated;invalid
2026-12-03,AC-2,1,9.60,1.00,2.00,3.00,3.60,,96,96,0,0,0,100.00,ok
"""

# the ledger's mapping (AC-9: M1 and M3; M 2,x in no account), by account
BY_LEDGER_ACCOUNT = """\
2026-12-01,AC-9,2,105.60,11.00,22.00,33.00,39.60,,192,192,0,0,0,100.00,ok
2026-12-02,AC-9,2,97.00,10.00,21.00,30.00,36.00,,96,192,0,0,1,50.00,missing;incomplete;tou_mismatch
2026-12-03,AC-9,2,100.60,10.00,22.00,33.00,35.60,,187,192,0,2,0,97.39,incomplete;invalid
"""

REGISTRY = "".join(
    f'[meters."{m}"]\nvoltage_v = 220\nimax_a = 60\nphases = 1\naccount = "{a}"\ngateway = "{g}"\n'
    for m, a, g in (("M1", "AC-1", "gw-a"), (M2, "AC-1", "gw-a"), ("M3", "AC-2", "gw-b"))
)


def config_toml(tmp: Path, url: str, db: str) -> str:
    return (
        f"registry = {json.dumps(str(tmp / 'meters.toml'))}\n"
        f'[influx]\nurl = {json.dumps(url)}\napi = "v1"\ndatabase = {json.dumps(db)}\n'
        "max_attempts = 1\ntimeout_s = 5.0\n"
        f"[dead_letter]\npath = {json.dumps(str(tmp / 'dead.sqlite'))}\n"
        f"[dedup]\npath = {json.dumps(str(tmp / 'dedup.sqlite'))}\n"
    )


def rollups() -> list[Rollup]:
    """``ROWS`` as the workers' day rollups: one per (gateway, with or without reverse fields)."""
    out = []
    for gw in ("gw-a", "gw-b"):
        for rev in (False, True):
            keys = [k for k in ROWS if k[2] == gw and ("rev_total" in ROWS[k]) == rev]
            if not keys:
                continue
            meters = tuple(sorted({m for _, m, _ in keys}))
            days = sorted({d for d, _, _ in keys})
            fields = DAILY + REVERSE if rev else DAILY
            p = PeriodTotals(
                meter=np.array([meters.index(m) for _, m, _ in keys], dtype=np.int64),
                bucket=np.array([days.index(d) for d, _, _ in keys], dtype=np.int64),
                labels=tuple((FIRST + dt.timedelta(days=d)).isoformat().encode() for d in days),
                fields=tuple(f.encode() for f in fields),
                values=np.array([[ROWS[k][f] for f in fields] for k in keys], dtype=np.int64),
                ts=np.array([D0 + d * DAY_MS for d, _, _ in keys], dtype=np.int64),
            )
            out.append(Rollup(gw, meters, "day", p))
    return out


@pytest.fixture
def loaded(influx_db: Any, tmp_path: Path) -> tuple[IngestConfig, Path]:
    """influxd holding ``ROWS``; returns the config and its file."""
    influxd, db = influx_db
    (tmp_path / "meters.toml").write_text(REGISTRY)
    cfg_file = tmp_path / "ingest.toml"
    cfg_file.write_text(config_toml(tmp_path, influxd.url, db))
    cfg = parse_config(cfg_file.read_text(), base_dir=tmp_path)

    async def write() -> None:
        async with InfluxSink(cfg.influx) as sink:
            result = await sink.write(Writes(rollups=rollups()))
            assert result.rejected == () and result.written == len(ROWS)

    asyncio.run(write())
    return cfg, cfg_file


def csv_body(by: str, text: str) -> str:
    return "\r\n".join([",".join(columns(by)), *text.splitlines()]) + "\r\n"


async def export(cfg: IngestConfig, **kw: Any) -> bytes:
    registry = MeterRegistry.load(cfg.registry)
    async with InfluxSink(cfg.influx) as sink:
        it = export_daily(sink, start_day=FIRST, end_day=LAST, accounts=registry_accounts(registry),
                          registry=registry, **kw)  # fmt: skip
        return b"".join([c async for c in it])


async def test_csv_per_meter_and_per_account_every_cell(loaded: tuple[IngestConfig, Path]) -> None:
    cfg, _ = loaded
    assert (await export(cfg, by="meter", fmt="csv")).decode() == csv_body("meter", BY_METER)
    assert (await export(cfg, by="account", fmt="csv")).decode() == csv_body("account", BY_ACCOUNT)


def from_csv(by: str, text: str) -> list[dict[str, Any]]:
    """The JSON objects the CSV rows stand for (decimals exact, empty -> null, marks a list)."""
    counts = ("meters", "intervals", "expected", "estimated", "invalid", "tou_mismatch")
    out = []
    for cells in csv.reader(io.StringIO(text)):
        obj: dict[str, Any] = dict(zip(columns(by), cells, strict=True))
        for k, v in obj.items():
            if k.endswith(("_kwh", "_pct")):
                obj[k] = Decimal(v) if v else None
            elif k in counts:
                obj[k] = int(v)
        obj["quality"] = obj["quality"].split(";")
        out.append(obj)
    return out


async def test_json_and_ndjson_hold_the_same_rows(loaded: tuple[IngestConfig, Path]) -> None:
    cfg, _ = loaded
    for by, text in (("meter", BY_METER), ("account", BY_ACCOUNT)):
        want = from_csv(by, text)
        doc = json.loads(await export(cfg, by=by, fmt="json"), parse_float=Decimal)
        assert doc == want
        lines = (await export(cfg, by=by, fmt="ndjson")).decode().splitlines()
        assert [json.loads(line, parse_float=Decimal) for line in lines] == want


async def test_exactly_the_meters_asked_for(loaded: tuple[IngestConfig, Path]) -> None:
    cfg, _ = loaded
    out = (await export(cfg, meters=["M3", "ZZ"], fmt="csv")).decode()
    rows = [r[:2] + r[-2:] for r in csv.reader(io.StringIO(out))][1:]
    assert rows == [
        ["2026-12-01", "M3", "100.00", "ok"], ["2026-12-01", "ZZ", "0.00", "missing"],
        ["2026-12-02", "M3", "0.00", "missing"], ["2026-12-02", "ZZ", "0.00", "missing"],
        ["2026-12-03", "M3", "100.00", "ok"], ["2026-12-03", "ZZ", "0.00", "missing"],
    ]  # fmt: skip


def _amigw(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "ingest", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_writes_the_file_with_the_ledgers_accounts_and_progress(
    loaded: tuple[IngestConfig, Path], tmp_path: Path
) -> None:
    _, cfg_file = loaded
    ledger = tmp_path / "feectl.sqlite"
    store = SqliteLedgerStore(ledger)
    store.put_account(Account("AC-9", (MeterRef("M1", "gw-a"), MeterRef("M3", "gw-b")), "t1"))
    store.close()
    out_file = tmp_path / "out" / "bill.csv"
    out_file.parent.mkdir()
    run = _amigw("--config", str(cfg_file), "--billing-export", "--from", "2026-12-01", "--to", "2026-12-03",
                 "--by", "account", "--output", str(out_file), "--accounts-db", str(ledger))  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""
    assert out_file.read_bytes().decode() == csv_body("account", BY_LEDGER_ACCOUNT)
    assert [p.name for p in out_file.parent.iterdir()] == ["bill.csv"]
    progress = [ln for ln in run.stderr.splitlines() if ln.startswith("billing export:")]
    assert progress == [f"billing export: {n}/3 days (2026-12-0{n})" for n in (1, 2, 3)]

    to_stdout = _amigw("--config", str(cfg_file), "--billing-export", "--from", "2026-12-01",
                       "--to", "2026-12-03", "--format", "json")  # fmt: skip
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert json.loads(to_stdout.stdout, parse_float=Decimal) == from_csv("meter", BY_METER)


def test_cli_bad_requests_and_unreachable_influxdb_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "meters.toml").write_text(REGISTRY)
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg_file = tmp_path / "ingest.toml"
    cfg_file.write_text(config_toml(tmp_path, f"http://127.0.0.1:{port}", "nodb"))
    base = ("--config", str(cfg_file), "--billing-export")
    for args, words in (
        (("--from", "2026-12-03", "--to", "2026-12-01"), "--to: 2026-12-01 is before from=2026-12-03"),
        (("--from", "2026-01-01", "--to", "2027-01-02"), "--to: the range is 367 days, at most 366"),
        (("--from", "2026-12-01", "--to", "2026-12-01", "--by", "area"), "--by: expected one of meter, account"),
        (("--from", "2026-12-01", "--to", "2026-12-01", "--format", "xml"), "--format: expected one of csv"),
        (("--from", "2026-12-01",), "--to: required with --billing-export"),
        (("--from", "2026-12-32", "--to", "2026-12-01"), "--from: DAY: expected YYYY-MM-DD"),
    ):  # fmt: skip
        bad = _amigw(*base, *args)
        assert bad.returncode == 2 and words in bad.stderr, (args, bad.stderr)
    only = _amigw("--config", str(cfg_file), "--from", "2026-12-01")
    assert only.returncode == 2 and "--from: only with --billing-export" in only.stderr
    out_file = tmp_path / "bill.csv"
    down = _amigw(*base, "--from", "2026-12-01", "--to", "2026-12-02", "--output", str(out_file))
    assert down.returncode == 1 and down.stdout == ""
    assert "billing export 2026-12-01..2026-12-02" in down.stderr and "unreachable" in down.stderr
    assert "Traceback" not in down.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ingest.toml", "meters.toml"]  # no partial file
