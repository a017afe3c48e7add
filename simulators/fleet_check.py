"""Check what the pipeline stored against a fleet's ground truth (:mod:`simulators.fleet`).

``check(truth, influx_url=..., database=...)`` reads InfluxDB 1.x (InfluxQL over HTTP, read only)
and compares, per gateway:

* **readings** (``meter_reading``, wide schema): every reading sent is stored exactly once with
  its value (``lost``: sent, not stored or another value; ``unexpected``: stored, never sent);
  every repeat (VEE-10) is in ``reading_duplicate`` with DUPLICATE, and nothing else is there
  (``duplicated``).
* **flags**: every reading and interval an anomaly touched carries the flag bits its rule
  requires (``missed_flags``, per anomaly kind); readings and intervals no anomaly touched carry
  none (``false_flags``, and ``false_flag_rate`` over the clean items).
* **intervals** (``intervals``): every expected row, energy exact (estimates included); no row
  the truth does not expect (``interval_mismatches``).
* **totals**: ``hourly`` ``total`` and ``daily_tou`` ``total``/``sharp``/``peak``/``flat``/``valley``
  equal the truth's own sums of the expected rows (``total_mismatches``), when ``totals=True``
  (they appear once ingest rolled the days up).
* **alarms**: one ``area_outage`` alarm per injected area outage, at its first point, and none
  elsewhere (``alarm_mismatches``).
* **charges** (``ledger_path``): fee control's charges per prepaid meter equal
  :meth:`~simulators.fleet.GroundTruth.expected_charges` (``charge_mismatches``), read through a
  caller-supplied ``ledger_reader`` (see :func:`check_charges`).

The loss counter (missing batches) is ingest's to report (``amigw ingest --loss``): not read here.
A gateway whose clock jumped (:meth:`~simulators.fleet.Fleet.jump_clock`) is checked for its
readings only. Nothing is written anywhere. Raises ``OSError``/``ValueError`` when InfluxDB cannot
be read (a check that cannot read is no pass).
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols.flags import Flag
from protocols.quantities import by_code
from simulators.fleet import ANOMALY_KINDS, DAY_MS, PERIODS, GroundTruth

__all__ = ["CheckReport", "check", "check_charges", "query"]

_ENERGY_FIELDS = {1: "energy_fwd_active_total", 6: "energy_rev_active_total"}


@dataclass(slots=True)
class CheckReport:
    """Counts of everything that differs from the truth; ``ok`` when every count is 0."""

    readings_sent: int = 0
    readings_stored: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    clean_items: int = 0
    false_flags: int = 0
    missed_flags: dict[str, int] = field(default_factory=dict)
    anomalies_checked: dict[str, int] = field(default_factory=dict)
    intervals_expected: int = 0
    interval_mismatches: int = 0
    totals_checked: int = 0
    total_mismatches: int = 0
    alarms_expected: int = 0
    alarm_mismatches: int = 0
    charges_checked: int = 0
    charge_mismatches: int = 0
    examples: list[str] = field(default_factory=list)
    max_false_flag_rate: float = 0.0

    @property
    def false_flag_rate(self) -> float:
        return self.false_flags / self.clean_items if self.clean_items else 0.0

    @property
    def ok(self) -> bool:
        return (
            self.lost == self.duplicated == self.unexpected == 0
            and not any(self.missed_flags.values())
            and self.false_flag_rate <= self.max_false_flag_rate
            and self.interval_mismatches == self.total_mismatches == 0
            and self.alarm_mismatches == self.charge_mismatches == 0
        )

    def note(self, text: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(text)

    def to_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]
        d.update(ok=self.ok, false_flag_rate=self.false_flag_rate)
        return d

    def summary(self) -> str:
        missed = sum(self.missed_flags.values())
        kinds = ", ".join(f"{k} {v}" for k, v in self.anomalies_checked.items() if v) or "none"
        which = {k: v for k, v in self.missed_flags.items() if v} or ""
        lines = [
            f"{'OK' if self.ok else 'FAILED'}: {self.readings_sent:,} readings sent, "
            f"{self.readings_stored:,} stored; lost {self.lost}, duplicated {self.duplicated}, "
            f"unexpected {self.unexpected}",
            f"anomalies: {kinds}; missed flags {missed} {which}".rstrip(),
            f"false flags {self.false_flags} of {self.clean_items:,} clean items "
            f"({self.false_flag_rate:.2e}, allowed {self.max_false_flag_rate:.2e})",
            f"intervals {self.intervals_expected:,} expected, {self.interval_mismatches} differ; totals "
            f"{self.totals_checked:,} checked, {self.total_mismatches} differ; alarms {self.alarms_expected} "
            f"expected, {self.alarm_mismatches} differ; charges {self.charges_checked} checked, "
            f"{self.charge_mismatches} differ",
        ]
        lines.extend(f"  e.g. {e}" for e in self.examples)
        return "\n".join(lines)


def query(influx_url: str, database: str, influxql: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Rows of an InfluxQL query (``epoch=ms``, chunked), each a dict of tags and columns."""
    params = urllib.parse.urlencode(
        {"db": database, "q": influxql, "epoch": "ms", "chunked": "true", "chunk_size": "20000"}
    )
    with urllib.request.urlopen(f"{influx_url.rstrip('/')}/query?{params}", timeout=timeout_s) as resp:
        body = resp.read()
    rows: list[dict[str, Any]] = []
    for line in body.splitlines():
        if not line.strip():
            continue
        doc = json.loads(line)
        for result in doc.get("results", []):
            if "error" in result:
                raise ValueError(f"influxdb: {result['error']} (query {influxql[:120]})")
            for series in result.get("series", []):
                tags = series.get("tags", {})
                cols = series["columns"]
                rows.extend({**tags, **dict(zip(cols, values, strict=True))} for values in series["values"])
    return rows


def _fixed(value: Any, decimals: int) -> int:
    return round(float(value) * 10**decimals)


def check(
    truth: GroundTruth,
    *,
    influx_url: str,
    database: str,
    ledger_path: str | None = None,
    ledger_reader: Callable[[str], Mapping[str, int]] | None = None,
    totals: bool = True,
    max_false_flag_rate: float = 0.0,
    gateways: Iterable[str] | None = None,
    progress: Callable[[str], None] | None = None,
    progress_s: float = 30.0,
) -> CheckReport:
    """Compare the stores with ``truth`` (see the module docstring); ``gateways`` limits the
    check to some gateways (default all). ``ledger_reader(ledger_path)`` returns fee control's
    charged fen per meter id (:func:`check_charges`). ``progress`` is told how far the check
    got, at most every ``progress_s`` seconds, and when each part starts."""
    say = progress or (lambda _text: None)
    last = time.monotonic()
    rep = CheckReport(max_false_flag_rate=max_false_flag_rate)
    spec = truth.spec
    ids = truth.meter_ids()
    gw_ids = truth.gateway_ids()
    wanted = set(gateways) if gateways is not None else set(gw_ids)
    index = {m: i for i, m in enumerate(ids)}
    r = truth.readings
    iv = truth.intervals
    lo, hi = spec.start_ms, spec.end_ms + 366 * DAY_MS  # a jumped clock may stamp later
    r_gw = truth.gateway_of(r["meter"])
    iv_gw = truth.gateway_of(iv["meter"])
    jumped = {
        int(a)
        for a in truth.anomalies["gateway"][truth.anomalies["kind"] == ANOMALY_KINDS.index("clock_jump")]
    }
    for kind in ANOMALY_KINDS[1:]:
        rep.missed_flags[kind] = 0
        rep.anomalies_checked[kind] = int(
            np.count_nonzero(truth.anomalies["kind"] == ANOMALY_KINDS.index(kind))
        )
    for g, gw in enumerate(gw_ids):
        if gw not in wanted:
            continue
        if time.monotonic() - last >= progress_s:
            last = time.monotonic()
            say(f"store check: readings and intervals of gateway {g + 1:,} of {len(gw_ids):,} ...")
        sel = r_gw == g
        _check_readings(rep, influx_url, database, gw, index, lo, hi, {k: v[sel] for k, v in r.items()})
        if g not in jumped:
            sel_i = iv_gw == g
            _check_intervals(
                rep, influx_url, database, gw, index, lo, hi, {k: v[sel_i] for k, v in iv.items()}
            )
    if totals:
        say("store check: hourly and daily totals ...")
        _check_totals(rep, truth, influx_url, database, wanted, jumped)
    _check_alarms(rep, truth, influx_url, database, wanted)
    if ledger_path is not None and ledger_reader is not None:
        say("store check: charges ...")
        check_charges(rep, truth, ledger_reader(ledger_path))
    return rep


def _check_readings(
    rep: CheckReport,
    url: str,
    db: str,
    gw: str,
    index: Mapping[str, int],
    lo: int,
    hi: int,
    r: dict[str, Any],
) -> None:
    orig = r["copy"] == 0
    rep.readings_sent += int(np.count_nonzero(orig))
    stored: dict[tuple[int, int, int], tuple[int, int]] = {}
    for row in query(
        url, db, f"SELECT * FROM meter_reading WHERE gateway = '{gw}' AND time >= {lo}ms AND time < {hi}ms"
    ):
        m = index.get(row.get("meter", ""), -1)
        for name, value in row.items():
            if value is None or name in ("time", "meter", "gateway") or name.endswith("_flags"):
                continue
            try:
                q = _code(name)
            except KeyError:
                continue
            flags = row.get(f"{name}_flags") or 0
            stored[(m, int(row["time"]), q)] = (_fixed(value, by_code(q).decimals), int(flags))
    rep.readings_stored += len(stored)
    expect_keys = set()
    for m, t, q, v, e, kind in zip(
        r["meter"][orig].tolist(), r["ts"][orig].tolist(), r["quantity"][orig].tolist(),
        r["value"][orig].tolist(), r["expect"][orig].tolist(), r["kind"][orig].tolist(), strict=True,
    ):  # fmt: skip
        key = (m, t, q)
        expect_keys.add(key)
        got = stored.get(key)
        if got is None or got[0] != v:
            rep.lost += 1
            rep.note(f"reading lost: meter #{m} ts {t} q {q} value {v}, stored {got}")
            continue
        _judge(rep, kind, e, got[1], f"reading meter #{m} ts {t} q {q}")
    extra = set(stored) - expect_keys
    rep.unexpected += len(extra)
    for key in list(extra)[:3]:
        rep.note(f"reading stored, never sent: {key}")
    # repeats (VEE-10) go to reading_duplicate, and nothing else does
    copies = {
        (m, t, q): v
        for m, t, q, v in zip(
            r["meter"][~orig].tolist(),
            r["ts"][~orig].tolist(),
            r["quantity"][~orig].tolist(),
            r["value"][~orig].tolist(),
            strict=True,
        )
    }
    found = 0
    for row in query(
        url,
        db,
        f"SELECT * FROM reading_duplicate WHERE gateway = '{gw}' AND time >= {lo}ms AND time < {hi}ms",
    ):
        key = (index.get(row.get("meter", ""), -1), int(row["time"]), _code(row["quantity"]))
        if key in copies and int(row.get("flags") or 0) & Flag.DUPLICATE:
            found += 1
        else:
            rep.duplicated += 1
            rep.note(f"unexpected reading_duplicate row {key}")
    if found < len(copies):
        rep.missed_flags["duplicate"] += len(copies) - found
        rep.note(f"{len(copies) - found} repeat(s) of {gw} not in reading_duplicate")


def _judge(rep: CheckReport, kind: int, expect: int, flags: int, what: str) -> None:
    if kind == 0:
        rep.clean_items += 1
        if flags:
            rep.false_flags += 1
            rep.note(f"false flag {Flag(flags)!r} on clean {what}")
    elif expect & ~flags:
        rep.missed_flags[ANOMALY_KINDS[kind]] += 1
        rep.note(f"{ANOMALY_KINDS[kind]}: {what} flags {flags:#x}, expected bits {expect:#x}")


def _code(name: str) -> int:
    from protocols.quantities import by_name

    return by_name(name).code


def _check_intervals(
    rep: CheckReport,
    url: str,
    db: str,
    gw: str,
    index: Mapping[str, int],
    lo: int,
    hi: int,
    iv: dict[str, Any],
) -> None:
    stored: dict[tuple[int, int, int], tuple[int, int]] = {}
    for row in query(
        url, db, f"SELECT * FROM intervals WHERE gateway = '{gw}' AND time >= {lo}ms AND time < {hi}ms"
    ):
        m = index.get(row.get("meter", ""), -1)
        for q, name in _ENERGY_FIELDS.items():
            if row.get(name) is not None:
                stored[(m, int(row["time"]), q)] = (_fixed(row[name], 2), int(row.get(f"{name}_flags") or 0))
    rep.intervals_expected += iv["meter"].shape[0]
    keys = set()
    for m, q, t, e, x, kind in zip(
        iv["meter"].tolist(), iv["quantity"].tolist(), iv["end"].tolist(), iv["energy"].tolist(),
        iv["expect"].tolist(), iv["kind"].tolist(), strict=True,
    ):  # fmt: skip
        keys.add((m, t, q))
        got = stored.get((m, t, q))
        if got is None or got[0] != e:
            rep.interval_mismatches += 1
            rep.note(f"interval meter #{m} q {q} end {t}: expected {e}, stored {got}")
            continue
        _judge(rep, kind, x, got[1], f"interval meter #{m} q {q} end {t}")
    extra = set(stored) - keys
    rep.interval_mismatches += len(extra)
    for key in list(extra)[:3]:
        rep.note(f"interval stored, not expected: {key}")


def _check_totals(
    rep: CheckReport, truth: GroundTruth, url: str, db: str, wanted: set[str], jumped: set[int]
) -> None:
    ids = truth.meter_ids()
    gw_ids = truth.gateway_ids()
    for bucket, measurement, fields in (
        ("hour", "hourly", ("total",)),
        ("day", "daily_tou", ("total", *PERIODS)),
    ):
        tot = truth.totals(bucket)  # type: ignore[arg-type]
        gws = truth.gateway_of(tot["meter"])
        lo, hi = int(tot["start"].min(initial=0)), int(tot["start"].max(initial=0)) + 1
        for g, gw in enumerate(gw_ids):
            if gw not in wanted or g in jumped:
                continue
            stored = {
                (row["meter"], int(row["time"])): row
                for row in query(
                    url,
                    db,
                    f"SELECT * FROM {measurement} WHERE gateway = '{gw}' "
                    f"AND time >= {lo}ms AND time < {hi}ms",
                )
            }
            for i in np.flatnonzero(gws == g).tolist():
                key = (ids[int(tot["meter"][i])], int(tot["start"][i]))
                row = stored.get(key)
                rep.totals_checked += 1
                want = {f: int(tot[f][i]) for f in fields}
                got = {f: int(row.get(f) or 0) for f in fields} if row else None
                if got != want:
                    rep.total_mismatches += 1
                    rep.note(f"{measurement} {key}: expected {want}, stored {got}")


def _check_alarms(rep: CheckReport, truth: GroundTruth, url: str, db: str, wanted: set[str]) -> None:
    areas = truth.area_ids()
    alarms = truth.alarms
    gw_of_area = {
        int(a): int(truth.gateway_of(np.array([i]))[0]) for i, a in enumerate(truth.area_of.tolist())
    }
    gw_ids = truth.gateway_ids()
    want = {
        (areas[int(a)], int(t))
        for a, t in zip(alarms["area"].tolist(), alarms["ts"].tolist(), strict=True)
        if gw_ids[gw_of_area[int(a)]] in wanted
    }
    rep.alarms_expected += len(want)
    rows = query(
        url, db, f"SELECT * FROM alarms WHERE kind = 'area_outage' AND time >= {truth.spec.start_ms}ms"
    )
    mine = {areas[i]: i for i in range(len(areas))}
    got = {(row["area"], int(row["time"])) for row in rows if row.get("area") in mine}
    got = {x for x in got if gw_ids[gw_of_area[mine[x[0]]]] in wanted}
    for missing in sorted(want - got):
        rep.alarm_mismatches += 1
        rep.missed_flags["area_outage"] += 1
        rep.note(f"area_outage alarm missing: {missing}")
    for extra in sorted(got - want):
        rep.alarm_mismatches += 1
        rep.note(f"area_outage alarm not expected: {extra}")


def check_charges(rep: CheckReport, truth: GroundTruth, charged_fen: Mapping[str, int]) -> None:
    """Compare fee control's charged fen per prepaid meter id (``charged_fen``) with the truth's
    :meth:`~simulators.fleet.GroundTruth.expected_charges` (one account per meter)."""
    exp = truth.expected_charges()
    ids = truth.meter_ids()
    for m, fen in zip(exp["meter"].tolist(), exp["fen"].tolist(), strict=True):
        rep.charges_checked += 1
        got = charged_fen.get(ids[m])
        if got != fen:
            rep.charge_mismatches += 1
            rep.note(f"charge of meter {ids[m]}: expected {fen} fen, ledger {got}")


def _as_array(values: Iterable[int]) -> npt.NDArray[np.int64]:
    return np.fromiter(values, dtype=np.int64)
