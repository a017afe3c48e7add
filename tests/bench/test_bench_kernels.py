"""Benchmark: validation + aggregation readings/s, numba kernels against the pure-Python reference.

Run: .venv/bin/python -m pytest tests/bench/test_bench_kernels.py -s -o addopts=""
Ratios come from one run on one core (DESIGN §9). The reference is run on a slice of the batch
(it is slow) and its rate is per reading, like the kernels'."""

from __future__ import annotations

import time

import numpy as np

from ingest.model.registry import MeterParams
from ingest.rules import stages
from tests import reference as ref

I = 900_000  # noqa: E741 (the interval, as in the rules)
T0 = 1_710_000_000_000 // I * I


def _batch(nmeters: int, intervals: int, seed: int = 1):
    """Per meter: energy total, T2, voltage A, current A, power total, at each interval."""
    rng = np.random.default_rng(seed)
    m = np.repeat(np.arange(nmeters, dtype=np.uint32), intervals * 5)
    slot = np.tile(np.repeat(np.arange(1, intervals + 1), 5), nmeters)
    q = np.tile(np.array([1, 3, 30, 33, 40], np.uint16), nmeters * intervals)
    inc = rng.integers(0, 60, size=(nmeters, intervals)).cumsum(axis=1)
    value = np.empty(m.shape[0], np.int64)
    value[q == 1] = (inc + 500_000).ravel()
    value[q == 3] = (inc // 2 + 200_000).ravel()
    value[q == 30] = rng.integers(2100, 2300, size=nmeters * intervals)
    value[q == 33] = rng.integers(0, 20_000, size=nmeters * intervals)
    value[q == 40] = rng.integers(0, 40_000, size=nmeters * intervals)
    keep = rng.random(m.shape[0]) > 0.01  # 1 % lost: gaps to estimate
    r = stages.Readings(
        m[keep], T0 + slot[keep] * I, q[keep], value[keep], np.zeros(int(keep.sum()), np.uint32)
    )
    pm = np.repeat(np.arange(nmeters, dtype=np.uint32), 2)
    prev = stages.PreviousRegisters(
        pm,
        np.tile(np.array([1, 3], np.uint16), nmeters),
        np.tile(np.array([500_000, 200_000], np.int64), nmeters),
        np.full(pm.shape, T0),
    )
    meters = MeterParams(
        np.ones(nmeters, np.bool_),
        np.full(nmeters, 2200),
        np.full(nmeters, 60_000),
        np.full(nmeters, 5_000),
        np.ones(nmeters, np.int64),
        np.ones(nmeters, np.int64),
        np.zeros(nmeters, np.int32),
        np.zeros(nmeters, np.bool_),
    )
    return r, prev, meters


def _kernel_pipeline(r, prev, meters):
    c = stages.validate_batch(r, prev, meters, T0 + 200 * I)
    iv = stages.aggregate_intervals(r, c, meters)
    return stages.interval_totals(iv)


P = stages.ValidationParams()


def _reference_pipeline(r, prev, meters):
    flags, delta, anchor, _ = ref.validate(*stages.validate_args(r, prev, meters, T0 + 200 * I))
    selected = np.zeros(1 << 16, np.bool_)
    selected[list(stages.ENERGY_CHANNELS)] = True
    iv = stages.Intervals(
        *ref.intervals(
            r.meter,
            r.ts,
            r.quantity,
            flags,
            delta,
            anchor,
            selected,
            meters.multiplier,
            I,
            P.max_gap_intervals,
            P.flat_gap_max_intervals,
            P.prolonged_est_ms,
        )
    )
    start = stages._bucket_start(iv.end_ts, I, stages.DAY_MS, stages.SHANGHAI_MS)
    labels, ng, _ = stages.group_labels(iv.meter.astype(np.int64), iv.quantity.astype(np.int64), start)
    return ref.group_totals(labels, ng, iv.energy, iv.flags)


def _rate(fn, n, min_s=1.0):
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_s or runs == 0:
        fn()
        runs += 1
    return runs * n / elapsed


def test_bench_validation_aggregation_vs_reference() -> None:
    big = _batch(2_000, 96)
    small = _batch(40, 96)
    got = _kernel_pipeline(*small)
    assert np.array_equal(got.energy, _reference_pipeline(*small)[0])  # same answer before timing
    n_big, n_small = len(big[0]), len(small[0])
    fast = _rate(lambda: _kernel_pipeline(*big), n_big)
    slow = _rate(lambda: _reference_pipeline(*small), n_small)
    t0 = time.perf_counter()
    c = stages.validate_batch(*big, T0 + 200 * I)
    t1 = time.perf_counter()
    print(
        f"\nvalidation+aggregation: numba {fast:,.0f} readings/s ({n_big:,}-reading batch), "
        f"pure-Python reference {slow:,.0f} readings/s ({n_small:,}); ratio {fast / slow:,.0f}x; "
        f"validate_batch alone {n_big / (t1 - t0):,.0f} readings/s, flagged {int((c.flags != 0).sum()):,}"
    )
    assert fast > slow
