"""The daily report job (``ingest.reports.daily``, ``amigw ingest --daily-report``) against a real influxd.

The day's ``daily_tou`` rows are made the way the worker makes them: register reads on the
15-min grid in :class:`BatchBuilder` batches, through :func:`ingest.pipeline.transform.transform`, written
to influxd, then the days rolled up from the stored intervals (:mod:`tests.rollup`). The registry has three areas:

* ``TA-1``: master ``MA`` (CT x40) and customers ``C1``, ``C2`` (two readings missing: 3 estimated
  intervals) and ``C 3,x``; 5.00 % loss, QUALIFIED;
* ``TA 2,"东"``: master ``MB``, customers ``D1``, ``D2``; the physical customer ``D3 50%`` is
  missing from the registry, so the area shows 20.00 % loss: HIGH, and earlier runs wrote HIGH for
  the two days before: the third day not QUALIFIED raises one alarm (LL-02);
* ``TA-3``: master ``MC`` sent nothing on the day: NOT_COMPUTABLE, half its meters collected; the
  day before was NOT_COMPUTABLE too but the one before QUALIFIED: two days, no alarm.

A next-day row of ``MA`` and a previous-day row of ``C1`` must stay outside the day.
Every expected value below is worked out by hand from the deltas.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ingest.config import parse_config
from ingest.pipeline.transform import Settings, transform
from ingest.reports.daily import daily_report
from ingest.sinks.influx.lines import TagCache, encode_batch, escape_tag, stored_tag
from protocols.errors import ConfigError
from protocols.flags import Flag
from protocols.payload import BatchBuilder
from tests.rollup import roll_up_days

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
Q = 900_000
T0 = 1_710_000_000_000  # 2024-03-10 00:00 at UTC+8
DAY = dt.date(2024, 3, 10)
AREA_B = 'TA 2,"东"'
D3 = "D3 50%"
GW_A, GW_B = "gw-a", "gw b,1"

# meter -> (area, master, multiplier, register delta per interval in 0.01 kWh)
METERS = {
    "MA": ("TA-1", True, 40, 25),
    "C1": ("TA-1", False, 1, 300),
    "C2": ("TA-1", False, 1, 300),
    "C 3,x": ("TA-1", False, 1, 350),
    "MB": (AREA_B, True, 1, 100),
    "D1": (AREA_B, False, 1, 40),
    "D2": (AREA_B, False, 1, 40),
    "MC": ("TA-3", True, 1, 10),
    "E1": ("TA-3", False, 1, 10),
}
DELTA = {m: v[3] for m, v in METERS.items()} | {D3: 20}
GAPS = {"C2": {10, 11}}  # readings not received: the k=12 read spans 3 intervals -> 3 estimated


def _stored(out: Any) -> bytes:
    """The line protocol the InfluxDB sink writes for a transformed batch (wide readings)."""
    return encode_batch(out.columns, TagCache(), wide=True)


def registry_toml(with_d3: bool = False) -> str:
    rows = dict(METERS)
    if with_d3:
        rows[D3] = (AREA_B, False, 1, 20)
    return "".join(
        f"[meters.{json.dumps(m)}]\nvoltage_v = 220\nimax_a = 100\nphases = 1\n"
        f"area = {json.dumps(area)}\nmaster = {str(master).lower()}\nmultiplier = {mul}\n"
        for m, (area, master, mul, _) in rows.items()
    )


def batch(gw: str, meters: list[str], k_lo: int, k_hi: int, seq: int) -> Any:
    """Register reads k_lo+1 .. k_hi (prev = the read at k_lo) of each meter, value = 10^5 + delta*k."""
    bb = BatchBuilder()
    for m in meters:
        bb.set_prev(m, 1, 100_000 + DELTA[m] * k_lo, T0 + k_lo * Q)
        for k in range(k_lo + 1, k_hi + 1):
            if k not in GAPS.get(m, ()):
                bb.add(m, T0 + k * Q, 1, 100_000 + DELTA[m] * k)
    return bb.build(gw, seq, sent_ms=T0 + k_hi * Q + 1_000)


def config_toml(tmp: Path, url: str, db: str) -> str:
    return (
        f"registry = {json.dumps(str(tmp / 'meters.toml'))}\n"
        f'[influx]\nurl = {json.dumps(url)}\napi = "v1"\ndatabase = {json.dumps(db)}\n'
        "max_attempts = 2\nbackoff_initial_s = 0.1\nbackoff_max_s = 0.2\ntimeout_s = 5.0\n"
        f"[dead_letter]\npath = {json.dumps(str(tmp / 'dead.sqlite'))}\n"
        f"[dedup]\npath = {json.dumps(str(tmp / 'dedup.sqlite'))}\n"
    )


@pytest.fixture
def day_loaded(influx_db: Any, tmp_path: Path) -> tuple[Any, str, Path]:
    """influxd holding the day's rows; returns (influxd, db, config file)."""
    influxd, db = influx_db
    (tmp_path / "meters.toml").write_text(registry_toml())
    cfg_file = tmp_path / "ingest.toml"
    cfg_file.write_text(config_toml(tmp_path, influxd.url, db))
    settings = Settings.from_config(parse_config(cfg_file.read_text(), base_dir=tmp_path))
    a_meters = ["MA", "C1", "C2", "C 3,x"]
    b_meters = ["MB", "D1", "D2", D3, "E1"]  # MC sends nothing
    batches = [
        batch(GW_A, a_meters, 0, 48, 1),
        batch(GW_A, a_meters, 48, 96, 2),
        batch(GW_A, ["MA"], 96, 100, 3),  # the next day
        batch(GW_A, ["C1"], -4, 0, 4),  # the day before
        batch(GW_B, b_meters, 0, 48, 1),
        batch(GW_B, b_meters, 48, 96, 2),
    ]
    influxd.write(b"".join(_stored(transform(b, settings)) for b in batches), db)
    cfg = parse_config(cfg_file.read_text(), base_dir=tmp_path)
    roll_up_days(cfg, settings, (GW_A, GW_B), (T0 - 86_400_000, T0, T0 + 86_400_000))
    influxd.write(HISTORY, db)
    # the day rows are what the report will sum: check the fixture made what the test assumes
    rows = influxd.query(
        f'SELECT sum("intervals") AS n, sum("estimated") AS e FROM daily_tou '
        f"WHERE time >= {T0}ms AND time < {T0 + 96 * Q}ms GROUP BY meter",
        db=db,
    )
    assert {stored_tag(m): 96 for m in [*a_meters, *b_meters]} == {r["meter"]: r["n"] for r in rows}
    assert {r["meter"]: r["e"] for r in rows if r["e"]} == {"C2": 3}
    return influxd, db, cfg_file


# What earlier runs of the report wrote for the two days before (only the class matters here).
HISTORY = "".join(
    f'area_loss,area={escape_tag(area).decode()} class="{klass}" {T0 - days * 86_400_000}\n'
    for area, klass, days in ((AREA_B, "HIGH", 1), (AREA_B, "HIGH", 2), ("TA-3", "NOT_COMPUTABLE", 1),
                              ("TA-3", "QUALIFIED", 2))
).encode()  # fmt: skip

AREA_LOSS = {  # area -> supply, sales, loss, rate_bp, class, customers_present, customers_expected,
    # days_not_qualified
    "TA-1": (96 * 25 * 40, 96 * (300 + 300 + 350), 4_800, 500, "QUALIFIED", 3, 3, 0),
    AREA_B: (9_600, 7_680, 1_920, 2_000, "HIGH", 2, 2, 3),
    "TA-3": (0, 960, -960, 0, "NOT_COMPUTABLE", 1, 1, 2),  # master missing: supply 0, no rate
}
COLLECTION = {  # (level, id) -> received, expected, estimated, invalid, rate_bp
    **{("meter", m): (96, 96, 0, 0, 10_000) for m in [*METERS, D3]},
    ("meter", "C2"): (93, 96, 3, 0, 9_687),
    ("meter", "MC"): (0, 96, 0, 0, 0),
    ("gateway", GW_A): (381, 384, 3, 0, 9_921),
    ("gateway", GW_B): (480, 480, 0, 0, 10_000),  # the 5 meters seen under it
    ("area", "TA-1"): (381, 384, 3, 0, 9_921),  # 4 meters incl. the master
    ("area", AREA_B): (288, 288, 0, 0, 10_000),  # D3 is not in the registry: no area
    ("area", "TA-3"): (96, 192, 0, 0, 5_000),
}


def stored(influxd: Any, db: str) -> dict[str, Any]:
    """Every report point, keyed by (tags), values with their time, ids as the user wrote them."""
    loss = {
        r["area"]: (r["supply"], r["sales"], r["loss"], r["rate_bp"], r["class"],
                    r["customers_present"], r["customers_expected"], r["days_not_qualified"], r["time"])
        for r in influxd.query(f"SELECT * FROM area_loss WHERE time >= {T0}ms", db=db)
    }  # fmt: skip
    coll = {
        (r["level"], r["id"]): (
            r["received"],
            r["expected"],
            r["estimated"],
            r["invalid"],
            r["rate_bp"],
            r["time"],
        )
        for r in influxd.query("SELECT * FROM collection", db=db)
    }
    alarms = [
        (r["area"], r["kind"], r.get("class"), r.get("rate_bp"), r.get("events"), r["time"])
        for r in influxd.query("SELECT * FROM alarms", db=db)
    ]
    return {"area_loss": loss, "collection": coll, "alarms": sorted(alarms, key=str)}


def expected_points(area_loss: dict[str, Any], collection: dict[Any, Any]) -> dict[str, Any]:
    return {
        "area_loss": {stored_tag(a): (*v, T0) for a, v in area_loss.items()},
        "collection": {(lv, stored_tag(i)): (*v, T0) for (lv, i), v in collection.items()},
        "alarms": [(stored_tag(a), "line_loss", v[4], v[3], None, T0) for a, v in area_loss.items()
                   if v[7] >= 3],
    }  # fmt: skip


async def test_report_writes_area_loss_collection_and_one_alarm_and_a_rerun_overwrites(
    day_loaded: tuple[Any, str, Path],
) -> None:
    influxd, db, cfg_file = day_loaded
    cfg = parse_config(cfg_file.read_text(), base_dir=cfg_file.parent)
    report = await daily_report(cfg, DAY)
    want = expected_points(AREA_LOSS, COLLECTION)
    first = stored(influxd, db)
    assert first == want
    assert stored_tag(D3) == "D3 50%25" and ("meter", "D3 50%25") in first["collection"]
    assert [(a.area, a.klass, a.rate_bp) for a in report.alarms] == [(AREA_B, "HIGH", 2_000)]
    assert {(c.level, c.id): (c.received, c.expected, c.estimated, c.invalid, c.rate_bp)
            for c in report.collection} == COLLECTION  # fmt: skip
    # idempotent: the same day again rewrites the same series and timestamps
    again = await daily_report(cfg, DAY)
    assert again == report
    assert stored(influxd, db) == first
    n = influxd.query("SELECT count(rate_bp) FROM collection", db=db)
    assert n[0]["count"] == len(COLLECTION)


async def test_a_rerun_after_a_registry_fix_clears_the_stale_line_loss_alarm_only(
    day_loaded: tuple[Any, str, Path],
) -> None:
    influxd, db, cfg_file = day_loaded
    cfg = parse_config(cfg_file.read_text(), base_dir=cfg_file.parent)
    area_tag = escape_tag(AREA_B).decode()
    influxd.write(f"alarms,area={area_tag},kind=area_outage events=4i {T0 + 60_000}\n", db)
    await daily_report(cfg, DAY)
    outage = (AREA_B, "area_outage", None, None, 4, T0 + 60_000)
    assert stored(influxd, db)["alarms"] == sorted(
        [(AREA_B, "line_loss", "HIGH", 2_000, None, T0), outage], key=str
    )
    (cfg_file.parent / "meters.toml").write_text(registry_toml(with_d3=True))  # D3 mapped to its area
    report = await daily_report(cfg, DAY)
    assert report.alarms == ()
    got = stored(influxd, db)
    assert got["alarms"] == [outage]  # the line-loss alarm is gone, the outage alarm is not touched
    assert got["area_loss"][stored_tag(AREA_B)] == (9_600, 9_600, 0, 0, "QUALIFIED", 3, 3, 0, T0)
    assert got["collection"][("area", stored_tag(AREA_B))] == (384, 384, 0, 0, 10_000, T0)


def _amigw(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "ingest", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_prints_the_report_as_json_and_as_a_summary(day_loaded: tuple[Any, str, Path]) -> None:
    influxd, db, cfg_file = day_loaded
    out = _amigw("--config", str(cfg_file), "--daily-report", "2024-03-10", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert (doc["day"], doc["day_start_ms"], doc["utc_offset_ms"]) == ("2024-03-10", T0, 8 * 3_600_000)
    keys = ("supply", "sales", "loss", "rate_bp", "class", "customers_present", "customers_expected",
            "days_not_qualified")  # fmt: skip
    assert {a["area"]: tuple(a[k] for k in keys) for a in doc["areas"]} == AREA_LOSS
    assert {(c["level"], c["id"]): (c["received"], c["expected"], c["estimated"], c["invalid"], c["rate_bp"])
            for c in doc["collection"]} == COLLECTION  # fmt: skip
    assert doc["alarms"] == [{"area": AREA_B, "kind": "line_loss", "class": "HIGH", "rate_bp": 2_000}]
    assert doc["spike_rel"] == 0  # constant deltas: no relative spike
    assert stored(influxd, db) == expected_points(AREA_LOSS, COLLECTION)  # the CLI wrote them too

    text = _amigw("--config", str(cfg_file), "--daily-report", "2024-03-10")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert any(ln.split()[:6] == ["TA-1", "960.00", "912.00", "48.00", "5.00", "QUALIFIED"] for ln in lines)
    assert any(ln.startswith(AREA_B) and "HIGH" in ln and " 20.00 " in ln for ln in lines), text.stdout
    assert any(ln.split() == [GW_A, "99.21", "%", "(381/384)"] for ln in lines), text.stdout
    assert f"line-loss alarms: {AREA_B} HIGH 20.00 % (3 days not QUALIFIED)" in lines
    assert "relative spikes (VEE-06): 0 intervals" in lines


def test_cli_bad_day_and_unreachable_influxdb_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "meters.toml").write_text(registry_toml())
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg_file = tmp_path / "ingest.toml"
    cfg_file.write_text(config_toml(tmp_path, f"http://127.0.0.1:{port}", "nodb"))
    bad = _amigw("--config", str(cfg_file), "--daily-report", "2024-13-01", "--json")
    assert bad.returncode == 2 and "--daily-report" in bad.stderr and "2024-13-01" in bad.stderr
    down = _amigw("--config", str(cfg_file), "--daily-report", "2024-03-10")
    assert down.returncode == 1 and down.stdout == ""
    assert "daily report 2024-03-10" in down.stderr and "unreachable" in down.stderr
    assert "Traceback" not in down.stderr


async def test_an_area_anomaly_needs_three_consecutive_days_not_qualified(
    day_loaded: tuple[Any, str, Path],
) -> None:
    """LL-02: HIGH today alone, or after a QUALIFIED day, is a class, not yet an anomaly."""
    from ingest.reports.daily import SUMS, compute_report, day_window
    from ingest.sinks.influx.sink import InfluxSink

    _, _, cfg_file = day_loaded
    cfg = parse_config(cfg_file.read_text(), base_dir=cfg_file.parent)
    async with InfluxSink(cfg.influx) as sink:
        rows = await sink.day_sums(*day_window(DAY, 8 * 3_600_000), SUMS)
    registry = Settings.from_config(cfg).registry
    for history, days in (
        ({}, 1),
        ({AREA_B: ["HIGH", "QUALIFIED"]}, 2),
        ({AREA_B: ["NEGATIVE", "INCOMPLETE"]}, 3),
    ):
        report = compute_report(rows, registry, DAY, utc_offset_ms=8 * 3_600_000, history=history)
        b = next(a for a in report.areas if a.area == AREA_B)
        assert (b.klass, b.days_not_qualified) == ("HIGH", days)
        assert [a.area for a in report.alarms] == ([AREA_B] if days == 3 else [])


async def test_pv_export_enters_supply_and_the_masters_export_enters_sales(
    influx_db: Any, tmp_path: Path
) -> None:
    """LL-01 with the reverse register (quantity 6) read by the edge: customer ``P1``'s PV export
    is supply inside the area, the master's export upstream is sales. Per interval: master forward
    25 and reverse 1 (x40 CT), ``P1`` forward 300 and reverse 250, ``P2`` 500 and ``P3`` 400 forward
    (no reverse register). Supply 96·25·40 + 96·250 = 120,000; sales 96·1,200 + 96·1·40 = 119,040;
    loss 960 = 0.80 %, QUALIFIED. Without the export terms it would read NEGATIVE (-20 %)."""
    influxd, db = influx_db
    deltas = {"MP": {1: 25, 6: 1}, "P1": {1: 300, 6: 250}, "P2": {1: 500}, "P3": {1: 400}}
    (tmp_path / "meters.toml").write_text(
        "".join(
            f'[meters.{m}]\nvoltage_v = 220\nimax_a = 100\nphases = 1\narea = "TA-PV"\n'
            f"master = {str(m == 'MP').lower()}\nmultiplier = {40 if m == 'MP' else 1}\n"
            for m in deltas
        )
    )
    cfg_file = tmp_path / "ingest.toml"
    cfg_file.write_text(config_toml(tmp_path, influxd.url, db))
    cfg = parse_config(cfg_file.read_text(), base_dir=tmp_path)
    settings = Settings.from_config(cfg)
    lines = []
    for seq, (k_lo, k_hi) in enumerate(((0, 48), (48, 96)), start=1):
        bb = BatchBuilder()
        for m, per_q in deltas.items():
            for q, d in per_q.items():
                bb.set_prev(m, q, 50_000 + d * k_lo, T0 + k_lo * Q)
                for k in range(k_lo + 1, k_hi + 1):
                    bb.add(m, T0 + k * Q, q, 50_000 + d * k)
        lines.append(_stored(transform(bb.build("gw-pv", seq, sent_ms=T0 + k_hi * Q + 1_000), settings)))
    influxd.write(b"".join(lines), db)
    await asyncio.to_thread(roll_up_days, cfg, settings, ("gw-pv",), (T0,))
    rev = influxd.query(
        'SELECT sum("rev_total") AS e, sum("rev_intervals") AS n FROM daily_tou GROUP BY meter', db=db
    )
    assert {r["meter"]: (r["e"], r["n"]) for r in rev} == {
        "MP": (96 * 40, 96),
        "P1": (96 * 250, 96),
        "P2": (0, 0),
        "P3": (0, 0),
    }

    report = await daily_report(cfg, DAY)
    (pv,) = report.areas
    assert (pv.supply, pv.sales, pv.loss, pv.rate_bp, pv.klass) == (120_000, 119_040, 960, 80, "QUALIFIED")
    assert stored(influxd, db)["area_loss"]["TA-PV"][:5] == (120_000, 119_040, 960, 80, "QUALIFIED")


async def test_area_types_select_their_ll02_band(day_loaded: tuple[Any, str, Path]) -> None:
    """LL-02 bands per area type: ``AREA_B``'s 20 % loss is HIGH in the default band (10 %) and
    QUALIFIED for a rural area whose band ends at 25 %; the band applied is written with it. A
    type the config does not list is a start-up error naming the registry key."""
    influxd, db, cfg_file = day_loaded
    registry = cfg_file.parent / "meters.toml"
    registry.write_text(registry_toml() + f'[areas.{json.dumps(AREA_B)}]\ntype = "rural"\n')
    with pytest.raises(ConfigError) as exc:
        parse_config(cfg_file.read_text(), base_dir=cfg_file.parent)
    assert exc.value.key_path == f'registry: areas."{AREA_B}".type' and "rural" in str(exc.value)
    cfg_file.write_text(cfg_file.read_text() + "[line_loss.area_types.rural]\nhigh_pct = 25.0\n")
    cfg = parse_config(cfg_file.read_text(), base_dir=cfg_file.parent)
    report = await daily_report(cfg, DAY)
    b = next(a for a in report.areas if a.area == AREA_B)
    assert (b.klass, b.rate_bp, b.area_type, b.high_bp, b.days_not_qualified) == (
        "QUALIFIED",
        2_000,
        "rural",
        2_500,
        0,
    )
    assert report.alarms == ()
    rows = influxd.query(
        f'SELECT "class", "high_bp" FROM area_loss WHERE time >= {T0}ms GROUP BY area', db=db
    )
    assert {r["area"]: (r["class"], r["high_bp"]) for r in rows} == {
        "TA-1": ("QUALIFIED", 1_000),
        stored_tag(AREA_B): ("QUALIFIED", 2_500),
        "TA-3": ("NOT_COMPUTABLE", 1_000),
    }


async def test_relative_spikes_are_ranked_over_the_stored_day_and_flagged_once(
    influx_db: Any, tmp_path: Path
) -> None:
    """VEE-06 over the whole day: meter ``S 1,x`` (CT x2) sends one interval per batch, the edge's
    cadence, so no batch can rank it. Interval energies 0.40, 0.50, 2.10, 0.40, 0.45 kWh before the
    CT: (2.10 − 0.45)/0.45 > 300 %, the 2.10 interval gets SPIKE_REL in the store (its energy stays);
    the next day's larger interval is ranked with its own day only. A rerun changes nothing."""
    influxd, db = influx_db
    meter, field = "S 1,x", "energy_fwd_active_total"
    (tmp_path / "meters.toml").write_text(
        f'[meters.{json.dumps(meter)}]\nvoltage_v = 220\nimax_a = 100\nphases = 1\narea = "TA-S"\n'
        "master = true\nmultiplier = 2\n"
    )
    cfg_file = tmp_path / "ingest.toml"
    cfg_file.write_text(config_toml(tmp_path, influxd.url, db))
    cfg = parse_config(cfg_file.read_text(), base_dir=tmp_path)
    settings = Settings.from_config(cfg)
    deltas = {1: 40, 2: 50, 3: 210, 4: 40, 5: 45, 97: 900}  # interval k ends at T0 + k*Q
    register, lines = 100_000, []
    for seq, (k, d) in enumerate(sorted(deltas.items()), start=1):
        bb = BatchBuilder()
        bb.set_prev(meter, 1, register, T0 + (k - 1) * Q)
        register += d
        bb.add(meter, T0 + k * Q, 1, register)
        out = transform(bb.build("gw-s", seq, sent_ms=T0 + k * Q + 1_000), settings)
        assert not (out.columns.intervals.flags & Flag.SPIKE_REL).any()  # a batch ranks nothing
        lines.append(_stored(out))
    influxd.write(b"".join(lines), db)

    def points() -> list[tuple[int, float, int | None]]:
        rows = influxd.query(f'SELECT "{field}", "{field}_flags" FROM intervals', db=db)
        return [(r["time"], r[field], r.get(f"{field}_flags")) for r in rows]

    report = await daily_report(cfg, DAY)
    assert report.spike_rel == 1
    first = points()
    assert [(t, e) for t, e, f in first if (f or 0) & Flag.SPIKE_REL] == [(T0 + 3 * Q, 4.2)]
    assert [t for t, _, _ in first] == [T0 + k * Q for k in sorted(deltas)]  # no point added
    assert await daily_report(cfg, DAY) == report
    assert points() == first
    assert (await daily_report(cfg, DAY + dt.timedelta(days=1))).spike_rel == 0  # one interval that day
