"""The fleet bench, CI-sized: every fault of the harness in one run, one phase after another.

A small fleet (6 gateways x 30 meters, 4 simulated hours, every anomaly kind injected at least
once) goes through real mosquitto, 2 ingest worker processes, influxd and fee control
(:func:`simulators.bench_e2e.run_bench`), while the faults happen in turn: broker restart
(SIGTERM) and crash (SIGKILL), influxd down, an ingest worker SIGKILLed and restarted, a worker
stopped for good, an hour of old batches replayed, a malformed-payload flood, a gateway whose
clock jumps. Afterwards: every batch confirmed, nothing lost or duplicated, every anomaly
flagged, totals and charges equal to the truth's, the loss counter at 0, and each fault's own
evidence (the pids that changed, the dead letters of the flood, the duplicates of the replay).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from simulators.bench_e2e import BenchOptions, parse_faults, run_bench
from simulators.fleet_faults import FAULTS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_every_fault_in_turn_nothing_lost_or_duplicated(tmp_path: Path) -> None:
    opts = BenchOptions(
        gateways=6, meters=30, hours=4, seed=7, min_each=1, workers=2, faults=parse_faults(["all"]),
        influx_outage_s=4.0, flood_count=200, replay_s=3600, clock_jump_s=3600, ack_timeout_s=3.0,
        resend_cap_s=5.0, progress_s=5.0, settle_timeout_s=90.0, run_dir=tmp_path / "run",
    )  # fmt: skip
    report = asyncio.run(run_bench(opts, say=print))
    print(report.summary())
    faults = {f.name: f for f in report.faults}
    assert set(FAULTS) <= set(faults), f"faults that did not run: {set(FAULTS) - set(faults)}"
    for f in faults.values():
        assert f.ok, f"fault {f.name}: {[c for c in f.checks if not c.ok]}"
    # each fault really happened
    assert faults["broker-restart"].evidence["pid_before"] != faults["broker-restart"].evidence["pid_after"]
    assert faults["broker-kill"].evidence["pid_before"] != faults["broker-kill"].evidence["pid_after"]
    assert faults["influx-outage"].evidence["down_s"] >= 4.0  # type: ignore[operator]
    assert faults["worker-kill"].evidence["pid_before"] != faults["worker-kill"].evidence["pid_after"]
    assert faults["worker-stop"].evidence["live_workers"] == [0]
    assert faults["replay"].evidence["replayed"] == faults["replay"].evidence["duplicates_counted"] > 0
    assert faults["flood"].evidence["dead_lettered"] == 200
    # nothing lost, nothing twice, everything flagged, totals and charges exact
    check = report.store_check
    assert check, report.summary()
    assert check["lost"] == check["duplicated"] == check["unexpected"] == 0, report.store_summary
    assert not any(check["missed_flags"].values()), report.store_summary
    assert all(check["anomalies_checked"][k] > 0 for k in ("spike", "gap", "rollover", "clock_jump"))
    assert check["false_flags"] == 0, report.store_summary
    assert check["interval_mismatches"] == check["total_mismatches"] == check["alarm_mismatches"] == 0
    assert check["charges_checked"] > 0 and check["charge_mismatches"] == 0, report.store_summary
    assert report.counts["missing_batches"] == report.counts["lost_batches"] == 0
    assert report.counts["batches_added"] == report.counts["batches_confirmed"] > 0
    # the report accounts for where the CPU went and which worker wrote what
    assert all(report.cpu_s.get(k, 0) > 0 for k in ("ingest_workers", "influxd", "feectl", "harness"))
    assert all(n > 0 for n in report.counts["batches_written_by_worker"])
    assert report.ok, report.summary()
