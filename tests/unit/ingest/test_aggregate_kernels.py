"""The aggregates-JSON and integer-field line kernels against obviously-correct Python (STYLE H7)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from ingest.rules import stages

NAMES = ["M1", 'm "1"\\ü', "表计-5", "a,b=c d", "\n\t"]


def reference_interval_items(iv: stages.Intervals, meter_ids: list[str], interval_ms: int) -> bytes:
    """What ``protocols.aggregates.encode_intervals`` writes for the items, one dict per row."""
    rows = [
        {"meter": meter_ids[m], "quantity": q, "start_ms": e - interval_ms, "end_ms": e, "energy": v, "flags": f}
        for m, q, e, v, f in zip(
            iv.meter.tolist(), iv.quantity.tolist(), iv.end_ts.tolist(), iv.energy.tolist(), iv.flags.tolist(),
            strict=True,
        )
    ]  # fmt: skip
    return ",".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in rows).encode()


def reference_int_lines(heads: list[bytes], row_head, texts, row_text, names, values, ts) -> bytes:
    out = []
    for r in range(len(ts)):
        fields = [names[0] + b'"' + texts[row_text[r]] + b'"']
        fields += [names[k + 1] + b"%di" % values[r][k] for k in range(len(names) - 1)]
        out.append(heads[row_head[r]] + b" " + b",".join(fields) + b" %d\n" % ts[r])
    return b"".join(out)


def random_ts(rng: random.Random, n: int, repeats: bool) -> list[int]:
    """Random timestamps, or (``repeats``) runs of a few values: the encoders copy the text of
    a timestamp equal to the one they wrote last, and both paths must give the same bytes."""
    pool = [rng.randrange(-(2**40), 2**42) for _ in range(3)] + [0, -1, 10**12]
    return [rng.choice(pool) if repeats else rng.randrange(-(2**40), 2**42) for _ in range(n)]


def random_intervals(rng: random.Random, n: int, repeats: bool = False) -> stages.Intervals:
    return stages.Intervals(
        np.array([rng.randrange(len(NAMES)) for _ in range(n)], np.uint32),
        np.array([rng.randrange(1, 7) for _ in range(n)], np.uint16),
        np.array(random_ts(rng, n, repeats), np.int64),
        np.array(
            [rng.choice([0, 1, -5, 2**62, -(2**62), rng.randrange(-999, 999)]) for _ in range(n)], np.int64
        ),
        np.array([rng.randrange(0, 2**32) for _ in range(n)], np.uint32),
    )


@pytest.mark.parametrize("repeats", [False, True])
@pytest.mark.parametrize("n", [0, 1, 2, 37])
def test_interval_items_equal_the_reference(n: int, repeats: bool) -> None:
    rng = random.Random(n)
    for interval_ms in (900_000, 1):
        iv = random_intervals(rng, n, repeats)
        names = [json.dumps(m, ensure_ascii=False).encode() for m in NAMES]
        got = stages.encode_interval_items(iv, names, interval_ms=interval_ms)
        assert got == reference_interval_items(iv, NAMES, interval_ms)
        assert json.loads(b"[" + got + b"]") == json.loads(
            b"[" + reference_interval_items(iv, NAMES, interval_ms) + b"]"
        )


def test_interval_items_refuse_a_meter_off_the_table() -> None:
    iv = random_intervals(random.Random(1), 5)
    with pytest.raises(ValueError, match="meter"):
        stages.encode_interval_items(iv, [b'"x"'], interval_ms=900_000)


@pytest.mark.parametrize("repeats", [False, True])
@pytest.mark.parametrize("n", [0, 1, 25])
def test_int_lines_equal_the_reference(n: int, repeats: bool) -> None:
    rng = random.Random(100 + n)
    heads = [b"daily_tou,meter=" + stages.escape_tag(m) + b",gateway=g\\ 1" for m in NAMES]
    tables = stages.LineTables(*stages._table(heads))
    texts = [b"2024-03-10", b"2024-03-11", b""]
    names = [b"day=", b"total=", b"sharp=", b"n="]
    row_head = np.array([rng.randrange(len(heads)) for _ in range(n)], np.int64)
    row_text = np.array([rng.randrange(len(texts)) for _ in range(n)], np.int64)
    values = np.array(
        [[rng.randrange(-(2**63), 2**63) for _ in range(3)] for _ in range(n)], np.int64
    ).reshape(n, 3)
    ts = np.array(random_ts(rng, n, repeats), np.int64)
    got = stages.encode_int_lines(tables, row_head, texts, row_text, names, values, ts)
    assert got == reference_int_lines(
        heads, row_head.tolist(), texts, row_text.tolist(), names, values.tolist(), ts.tolist()
    )


def test_int_lines_check_shapes() -> None:
    tables = stages.LineTables(*stages._table([b"m,t=1"]))
    one = np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="values"):
        stages.encode_int_lines(tables, one, [b"x"], one, [b"s=", b"a="], np.zeros((1, 2), np.int64), one)
    with pytest.raises(ValueError, match="index"):
        stages.encode_int_lines(tables, one + 1, [b"x"], one, [b"s=", b"a="], np.zeros((1, 1), np.int64), one)
