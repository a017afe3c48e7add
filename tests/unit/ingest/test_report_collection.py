"""Collection success per gateway counts the meters the registry binds to it (KPI-01)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from ingest.model.registry import MeterRegistry
from ingest.reports.daily import compute_report
from ingest.sinks.base import DaySums

DAY = dt.date(2024, 3, 10)
REGISTRY = """
[meters.B1]
voltage_v = 220
imax_a = 60
phases = 1
area = "TA-1"
gateway = "gw-1"

[meters.B2]
voltage_v = 220
imax_a = 60
phases = 1
area = "TA-1"
gateway = "gw-1"

[meters.U1]
voltage_v = 220
imax_a = 60
phases = 1
area = "TA-1"
"""


def _row(meter: str, gateway: str, intervals: int) -> DaySums:
    return DaySums(meter, gateway, {"total": 100 * intervals, "intervals": intervals})


def test_a_bound_meter_silent_all_day_costs_its_gateway_an_unbound_one_only_its_area(
    tmp_path: Path,
) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(REGISTRY)
    registry = MeterRegistry.load(path)
    # B1 read by its gateway, B2 (bound to gw-1) silent, U1 (unbound) read by gw-2
    report = compute_report([_row("B1", "gw-1", 96), _row("U1", "gw-2", 90)], registry, DAY)
    by_gateway = {c.id: (c.received, c.expected) for c in report.level("gateway")}
    assert by_gateway == {"gw-1": (96, 192), "gw-2": (90, 96)}
    by_area = {c.id: (c.received, c.expected) for c in report.level("area")}
    assert by_area == {"TA-1": (186, 288)}


def test_a_bound_gateway_that_sent_nothing_still_has_a_row(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(REGISTRY)
    report = compute_report([], MeterRegistry.load(path), DAY)
    by_gateway = {c.id: (c.received, c.expected) for c in report.level("gateway")}
    assert by_gateway == {"gw-1": (0, 192)}
