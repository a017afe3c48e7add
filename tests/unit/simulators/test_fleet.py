"""The fleet generator: determinism, what the payloads carry, and the truth it records."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gateway.outbox import Outbox
from protocols import payload
from protocols.flags import Flag
from simulators.fleet import AnomalyRates, Fleet, FleetSpec, GroundTruth

START = 1_700_006_400_000 - 1_700_006_400_000 % 86_400_000 - 8 * 3_600_000  # a local midnight


def _spec(**kw: object) -> FleetSpec:
    base: dict[str, object] = {"gateways": 3, "meters_per_gateway": 12, "intervals": 16, "start_ms": START}
    base.update(kw)
    return FleetSpec(**base)  # type: ignore[arg-type]


def _run(fleet: Fleet) -> list[bytes]:
    out = []
    for k in range(fleet.spec.intervals):
        for i, up in enumerate(fleet.uploads(k)):
            out.append(up.make_payload(k * 100 + i + 1))
    return out


def test_same_spec_same_bytes_and_truth() -> None:
    spec = _spec(rates=AnomalyRates(min_each=1))
    a, b = Fleet(spec), Fleet(spec)
    assert _run(a) == _run(b)
    for name in ("readings", "intervals", "anomalies"):
        for col, values in getattr(a.truth, name).items():
            assert np.array_equal(values, getattr(b.truth, name)[col]), (name, col)


def test_clean_fleet_payloads_carry_exactly_the_truths_readings() -> None:
    fleet = Fleet(_spec(rates=AnomalyRates.none()))
    rows = []
    for data in _run(fleet):
        batch = payload.decode(data)
        ids = fleet.truth.meter_ids()
        for m, t, q, v, f in zip(
            batch.meter, batch.ts, batch.quantity, batch.value, batch.flags, strict=True
        ):
            rows.append((ids.index(batch.meters[m]), t, q, v))
            assert f == 0
    r = fleet.truth.readings
    truth_rows = list(
        zip(r["meter"].tolist(), r["ts"].tolist(), r["quantity"].tolist(), r["value"].tolist(), strict=True)
    )
    assert sorted(rows) == sorted(truth_rows)
    assert not r["expect"].any() and not r["kind"].any()
    assert all(t % 900_000 == 0 for t in r["ts"].tolist())


def test_interval_energies_are_the_register_deltas() -> None:
    fleet = Fleet(_spec(rates=AnomalyRates.none()))
    _run(fleet)
    r, iv = fleet.truth.readings, fleet.truth.intervals
    fwd = r["quantity"] == 1
    for m in range(fleet.spec.meters):
        values = r["value"][fwd & (r["meter"] == m)]
        energies = iv["energy"][(iv["quantity"] == 1) & (iv["meter"] == m)]
        assert np.array_equal(np.diff(values), energies[1:])


def test_uploads_go_through_the_edge_outbox(tmp_path: object) -> None:
    fleet = Fleet(_spec(gateways=1, intervals=3, rates=AnomalyRates.none()))
    with Outbox(f"{tmp_path}/o.sqlite", max_bytes=1 << 30) as box:
        for k in range(3):
            for up in fleet.uploads(k):
                added = box.add_batch(up.topic, up.make_payload, prev=up.prev)
                assert added.seq == k + 1
        assert box.stats().pending == 3


def test_every_anomaly_kind_is_recorded_with_its_expectation() -> None:
    fleet = Fleet(
        _spec(gateways=4, meters_per_gateway=20, intervals=32, rates=AnomalyRates(min_each=1, replay=0.01))
    )
    replayed = []
    for k in range(fleet.spec.intervals):
        for i, up in enumerate(fleet.uploads(k)):
            up.make_payload(k * 100 + i + 1)
        replayed += fleet.replays(k)
    counts = fleet.truth.anomaly_counts()
    for kind in (
        "rollover",
        "replacement",
        "spike",
        "gap",
        "duplicate",
        "clock_skew",
        "phase_loss",
        "area_outage",
    ):
        assert counts[kind] >= 1, kind
    assert counts["replay"] >= 1 and fleet.truth.replayed == len(replayed) >= 1
    first = {data for _, _, data in replayed}
    assert all(payload.decode(data).seq % 100 >= 1 for data in first)  # original seqs, original bytes
    r = fleet.truth.readings
    assert (r["expect"] & Flag.ROLLOVER).any() and (r["expect"] & Flag.SPIKE).any()
    assert (r["copy"] == 1).sum() >= 1
    assert len(fleet.truth.alarms["area"]) >= 1


def test_truth_round_trips_through_a_file(tmp_path: object) -> None:
    fleet = Fleet(_spec(rates=AnomalyRates(min_each=1)))
    _run(fleet)
    path = f"{tmp_path}/truth.npz"
    fleet.truth.save(path)
    back = GroundTruth.load(path)
    assert back.spec == fleet.spec
    for col, values in fleet.truth.readings.items():
        assert np.array_equal(values, back.readings[col])
    assert back.summary() == fleet.truth.summary()


def test_spec_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="meters_per_gateway"):
        FleetSpec(meters_per_gateway=2000)
    with pytest.raises(ValueError, match="start_ms"):
        FleetSpec(start_ms=START + 1)
    with pytest.raises(ValueError, match=r"rates\.gap"):
        AnomalyRates(gap=2)


def test_a_gateway_clock_jump_shifts_its_stamps_and_expects_clock_skew() -> None:
    fleet = Fleet(_spec(gateways=2, intervals=4, rates=AnomalyRates.none()))
    fleet.uploads(0)
    fleet.jump_clock("fgw-00001", 3600)
    fleet.uploads(1)
    r = fleet.truth.readings
    late = r["ts"] == fleet.spec.point_ms(1) + 3_600_000
    assert late.any() and (r["expect"][late] & Flag.CLOCK_SKEW).all()
    assert not (r["expect"][~late] & Flag.CLOCK_SKEW).any()
    assert fleet.truth.anomaly_counts()["clock_jump"] == 1


def test_a_split_boundary_keeps_each_meters_rows_and_repeats_in_one_batch() -> None:
    """Over max_readings_per_batch a gateway's boundary is several batches, cut between meters:
    a repeat (VEE-10) is in its original's batch (where the head-end can see it), every batch
    within the limit."""
    spec = _spec(
        gateways=2, meters_per_gateway=40, intervals=8, max_readings_per_batch=100,
        rates=AnomalyRates(min_each=3, duplicate=0.02),
    )  # fmt: skip
    fleet = Fleet(spec)
    batches = [payload.decode(data) for data in _run(fleet)]
    assert any(b.gateway == batches[0].gateway and b.seq != batches[0].seq for b in batches[:4])  # split
    where: dict[tuple[str, int], set[int]] = {}  # (meter, boundary ts) -> batches holding its rows
    repeats = 0
    for i, b in enumerate(batches):
        assert len(b.meter) <= 100
        seen: set[tuple[int, int, int]] = set()
        for m, t, q in zip(b.meter.tolist(), b.ts.tolist(), b.quantity.tolist(), strict=True):
            where.setdefault((b.meters[m], b.sent_ms // 900_000), set()).add(i)
            repeats += (m, t, q) in seen
            seen.add((m, t, q))
    assert all(len(held) == 1 for held in where.values())
    same_point = int((fleet.truth.readings["copy"] == 1).sum())
    assert repeats > 0 and same_point >= repeats


def test_a_forward_spike_of_a_pv_meter_leaves_its_export_interval_billable() -> None:
    """A spike (VEE-05) is of the forward register: the export interval of the same PV meter and
    point expects no SPIKE and stays billable."""
    fleet = Fleet(_spec(profile_mix=(0, 0, 1), rates=dataclasses.replace(AnomalyRates.none(), spike=0.05)))
    _run(fleet)
    iv = fleet.truth.intervals
    fwd_spiked = (iv["quantity"] == 1) & ((iv["expect"] & Flag.SPIKE) != 0)
    assert fwd_spiked.any() and not iv["billable"][fwd_spiked].any()
    rev = iv["quantity"] == 6
    key = iv["meter"].astype(np.int64) * 10**14 + iv["end"]
    same = rev & np.isin(key, key[fwd_spiked])
    assert same.sum() == fwd_spiked.sum()
    assert not (iv["expect"][rev] & Flag.SPIKE).any() and iv["billable"][same].all()


def test_outages_of_one_area_start_further_apart_than_ingests_alarm_hold() -> None:
    """Closer, the head-end joins the second outage to the first's alarm (OUT-02's hold)."""
    from ingest.config import PipelineSection
    from simulators.fleet import OUTAGE_HOLD_S

    assert PipelineSection().outage_hold_s == OUTAGE_HOLD_S
    spec = _spec(gateways=2, meters_per_gateway=8, intervals=96, rates=AnomalyRates(area_outage=0.2))
    fleet = Fleet(spec)
    _run(fleet)
    alarms = fleet.truth.alarms
    assert alarms["area"].size >= 4
    for a in np.unique(alarms["area"]):
        ts = np.sort(alarms["ts"][alarms["area"] == a])
        assert (np.diff(ts) > OUTAGE_HOLD_S * 1000).all(), ts
