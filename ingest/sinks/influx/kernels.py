"""Numba kernels of the InfluxDB line-protocol encoders (wrapped by :mod:`ingest.sinks.influx.lines`).

Contract (STYLE H7, as :mod:`ingest.rules.kernels`): every function is
``@numba.njit(cache=True, nogil=True)``, takes arrays and scalars, writes only into the ``buf`` it
is given, never raises and uses integers only. Each public kernel has an obviously-correct twin in
``tests/reference.py`` (``encode_lines``, ``parse_lines``) and the tests assert exact equality.
"""

from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True)


_S_QUANTITY = tuple(b",quantity=")
_S_VALUE = tuple(b" value=")
_S_FLAGS = tuple(b",flags=")
_S_SUFFIX_FLAGS = tuple(b"_flags=")


@_jit
def _put(buf, p, src, a, b):
    for k in range(a, b):
        buf[p] = src[k]
        p += 1
    return p


_POW10 = np.array([10**k for k in range(20)], dtype=np.uint64)
_DIGIT_PAIRS = np.frombuffer("".join(f"{k:02d}" for k in range(100)).encode(), dtype=np.uint8).copy()


@_jit
def _put_uint(buf, p, u):
    """Decimal digits of a non-negative uint64: the length from a table of powers of ten, then two
    digits per division, back to front."""
    k = 1
    while k < 20 and u >= _POW10[k]:
        k += 1
    end = p + k
    while u >= np.uint64(100):
        r = u % np.uint64(100)
        u = u // np.uint64(100)
        end -= 2
        buf[end] = _DIGIT_PAIRS[2 * r]
        buf[end + 1] = _DIGIT_PAIRS[2 * r + 1]
    if u >= np.uint64(10):
        buf[end - 2] = _DIGIT_PAIRS[2 * u]
        buf[end - 1] = _DIGIT_PAIRS[2 * u + 1]
    else:
        buf[end - 1] = 48 + np.uint8(u)
    return p + k


@_jit
def _put_fixed(buf, p, v, decimals):
    """Exact decimal text of a fixed-point int64: 12345 with 2 decimals -> ``123.45``; decimals 0
    gives an integer field ``12345i``. No float is involved."""
    if v < 0:
        buf[p] = 45  # '-'
        p += 1
        u = np.uint64(-(v + 1)) + np.uint64(1)  # |INT64_MIN| without overflow
    else:
        u = np.uint64(v)
    if decimals == 0:
        p = _put_uint(buf, p, u)
        buf[p] = 105  # 'i'
        return p + 1
    scale = np.uint64(1)
    for _ in range(decimals):
        scale = scale * np.uint64(10)
    p = _put_uint(buf, p, u // scale)
    buf[p] = 46  # '.'
    p += 1
    frac = u % scale
    div = scale // np.uint64(10)
    for _ in range(decimals):
        buf[p] = 48 + np.uint8(frac // div)
        frac = frac % div
        div = div // np.uint64(10)
        p += 1
    return p


@_jit
def _put_int_field(buf, p, v):
    """An integer field value: ``_put_int`` and the ``i`` suffix."""
    p = _put_int(buf, p, v)
    buf[p] = 105
    return p + 1


@_jit
def _same_key(a, b, meter, ts, quantity):
    return meter[a] == meter[b] and ts[a] == ts[b] and quantity[a] == quantity[b]


@_jit
def encode_lines(
    order,
    meter,
    ts,
    quantity,
    value,
    flags,
    head,
    head_off,
    fname,
    fname_off,
    q_decimals,
    wide,
    buf,
):
    """Line protocol into ``buf`` (preallocated, large enough; see the wrapper), returns bytes used.

    ``head[head_off[m]:head_off[m+1]]`` is the pre-escaped ``measurement,tag=…`` prefix of meter m;
    ``fname[fname_off[q]:fname_off[q+1]]`` the field name of quantity q. ``order`` visits rows sorted
    by (meter, ts). Narrow (``wide`` false): one line per reading,
    ``<head>,quantity=<q> value=<v>,flags=<f>i <ts>``. Wide: one line per (meter, ts) with a
    field per quantity, ``<q>=<v>`` plus ``<q>_flags=<f>i`` where flags are non-zero. Of readings
    with the same (meter, ts, quantity) only the first to arrive is written (VEE-10), so a line
    never repeats a field and a redelivered batch writes the same points."""
    p = 0
    n = order.shape[0]
    memo = np.zeros(3, dtype=np.int64)
    j = 0
    while j < n:
        i = order[j]
        m = meter[i]
        if j > 0 and _same_key(order[j - 1], i, meter, ts, quantity):
            j += 1  # VEE-10: a redelivered (meter, quantity, ts) keeps the first arrival
            continue
        p = _put(buf, p, head, head_off[m], head_off[m + 1])
        if wide:
            buf[p] = 32
            p += 1
            t = ts[i]
            first = True
            while j < n and meter[order[j]] == m and ts[order[j]] == t:
                i = order[j]
                q = quantity[i]
                if not first and quantity[order[j - 1]] == q:
                    j += 1
                    continue
                if not first:
                    buf[p] = 44
                    p += 1
                first = False
                p = _put(buf, p, fname, fname_off[q], fname_off[q + 1])
                buf[p] = 61
                p = _put_fixed(buf, p + 1, value[i], q_decimals[q])
                if flags[i] != 0:
                    buf[p] = 44
                    p = _put(buf, p + 1, fname, fname_off[q], fname_off[q + 1])
                    for ch in _S_SUFFIX_FLAGS:
                        buf[p] = ch
                        p += 1
                    p = _put_int_field(buf, p, np.int64(flags[i]))
                j += 1
        else:
            q = quantity[i]
            for ch in _S_QUANTITY:
                buf[p] = ch
                p += 1
            p = _put(buf, p, fname, fname_off[q], fname_off[q + 1])
            for ch in _S_VALUE:
                buf[p] = ch
                p += 1
            p = _put_fixed(buf, p, value[i], q_decimals[q])
            for ch in _S_FLAGS:
                buf[p] = ch
                p += 1
            p = _put_int_field(buf, p, np.int64(flags[i]))
            t = ts[i]
            j += 1
        buf[p] = 32
        p = _put_int_memo(buf, p + 1, np.int64(t), memo)
        buf[p] = 10
        p += 1
    return p


# --- integer-field lines ---------------------------------------------------------------------------


@_jit
def _put_int(buf, p, v):
    """Decimal text of an int64 (``-`` for negatives), as JSON and Python's ``str`` write it."""
    if v < 0:
        buf[p] = 45
        p += 1
        return _put_uint(buf, p, np.uint64(-(v + 1)) + np.uint64(1))
    return _put_uint(buf, p, np.uint64(v))


@_jit
def _put_int_memo(buf, p, v, memo):
    """``_put_int``, copying the text already in ``buf`` when ``v`` is the value written last
    through the same ``memo`` (``[value, start, end]``; ``end == start`` means empty): timestamps
    repeat from line to line, and a copy is cheaper than the divisions."""
    if memo[2] > memo[1] and memo[0] == v:
        return _put(buf, p, buf, memo[1], memo[2])
    q = _put_int(buf, p, v)
    memo[0] = v
    memo[1] = p
    memo[2] = q
    return q


@_jit
def encode_int_lines(head, head_off, row_head, text, text_off, row_text, names, names_off, values, ts, buf):
    """One line-protocol point per row into ``buf``; returns the bytes used. Row r is
    ``<head[row_head[r]]> <names[0]>"<text[row_text[r]]>",<names[1]><values[r,0]>i,… <ts[r]>\\n``:
    ``names[k]`` carries its own ``=`` (and, for the string field, the opening quote is added here);
    the string field's text must already be escaped for a line-protocol string."""
    p = 0
    nf = values.shape[1]
    memo = np.zeros(3, dtype=np.int64)
    for r in range(values.shape[0]):
        h = row_head[r]
        p = _put(buf, p, head, head_off[h], head_off[h + 1])
        buf[p] = 32
        p = _put(buf, p + 1, names, names_off[0], names_off[1])
        buf[p] = 34
        t = row_text[r]
        p = _put(buf, p + 1, text, text_off[t], text_off[t + 1])
        buf[p] = 34
        p += 1
        for k in range(nf):
            buf[p] = 44
            p = _put(buf, p + 1, names, names_off[k + 1], names_off[k + 2])
            p = _put_int(buf, p, values[r, k])
            buf[p] = 105
            p += 1
        buf[p] = 32
        p = _put_int_memo(buf, p + 1, ts[r], memo)
        buf[p] = 10
        p += 1
    return p
