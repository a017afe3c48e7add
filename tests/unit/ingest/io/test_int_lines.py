"""The integer-field line kernel of the InfluxDB sink against obviously-correct Python (STYLE H7)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from ingest.sinks.influx import lines as lp

NAMES = ["M1", 'm "1"\\ü', "表计-5", "a,b=c d", "\n\t"]


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


@pytest.mark.parametrize("repeats", [False, True])
@pytest.mark.parametrize("n", [0, 1, 25])
def test_int_lines_equal_the_reference(n: int, repeats: bool) -> None:
    rng = random.Random(100 + n)
    heads = [b"daily_tou,meter=" + lp.escape_tag(m) + b",gateway=g\\ 1" for m in NAMES]
    tables = lp.LineTables(*lp._table(heads))
    texts = [b"2024-03-10", b"2024-03-11", b""]
    names = [b"day=", b"total=", b"sharp=", b"n="]
    row_head = np.array([rng.randrange(len(heads)) for _ in range(n)], np.int64)
    row_text = np.array([rng.randrange(len(texts)) for _ in range(n)], np.int64)
    values = np.array(
        [[rng.randrange(-(2**63), 2**63) for _ in range(3)] for _ in range(n)], np.int64
    ).reshape(n, 3)
    ts = np.array(random_ts(rng, n, repeats), np.int64)
    got = lp.encode_int_lines(tables, row_head, texts, row_text, names, values, ts)
    assert got == reference_int_lines(
        heads, row_head.tolist(), texts, row_text.tolist(), names, values.tolist(), ts.tolist()
    )


def test_int_lines_check_shapes() -> None:
    tables = lp.LineTables(*lp._table([b"m,t=1"]))
    one = np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="values"):
        lp.encode_int_lines(tables, one, [b"x"], one, [b"s=", b"a="], np.zeros((1, 2), np.int64), one)
    with pytest.raises(ValueError, match="index"):
        lp.encode_int_lines(tables, one + 1, [b"x"], one, [b"s=", b"a="], np.zeros((1, 1), np.int64), one)
