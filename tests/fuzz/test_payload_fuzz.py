"""Fuzz: random and mutated payloads (v1 and v2) raise only PayloadError, quickly, with bounded
memory."""

from __future__ import annotations

import random
import struct
import time
import tracemalloc

import msgpack

from protocols import PayloadError
from protocols.payload import MAGIC, BatchBuilder, decode, encode

N_INPUTS = 100_000


MAGIC_V2 = b"AMI\x02"


def _seeds() -> list[bytes]:
    b = BatchBuilder()
    for i in range(20):
        b.add(f"meter-{i % 3}", 1_700_000_000_000 + i, 1 + i % 5, i * 1000, i % 4)
    b.set_prev("meter-0", 1, 5, 6)
    batch = b.build("gw-1", seq=9)
    wide = BatchBuilder()  # v2: flag bits above 15
    for i in range(20):
        wide.add(f"meter-{i % 3}", 1_700_000_000_000 + i, 1 + i % 5, i * 1000, (i % 4) << (14 + i % 18))
    wide_batch = wide.build("gw-2", seq=10)
    return [
        encode(batch),
        encode(batch, "json"),
        encode(BatchBuilder().build("g", 0)),
        encode(wide_batch, version=2),
        encode(wide_batch, "json", version=2),
        encode(BatchBuilder().build("g", 0), version=2),
    ]


def _huge_counts() -> list[bytes]:
    """Hand-made lies about sizes: msgpack headers declaring 2**32-1 items or bytes."""
    return [
        MAGIC + b"\xdd\xff\xff\xff\xff",  # array32 with 4 billion entries
        MAGIC + b"\xdf\xff\xff\xff\xff",  # map32 with 4 billion entries
        MAGIC + b"\x81\xa1t\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
        MAGIC + b"\x81\xa1t\xdb\xff\xff\xff\xff" + b"x" * 10,  # str32 of 4 GiB
        MAGIC
        + msgpack.packb(
            {
                "t": "readings",
                "gw": "g",
                "seq": 1,
                "meters": [],
                "meter": b"\0" * 4,
                "ts": b"",
                "q": b"",
                "v": b"",
                "f": b"",
                "prev": {},
            }
        ),
        b'{"v":1,"type":"readings","gateway":"g","seq":1,"meters":[],"readings":' + b"[" * 50_000,
        b'{"v":1,"type":"readings","gateway":"g","seq":' + b"9" * 5000 + b"}",
    ]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    op = rng.randrange(7)
    if op == 0 and buf:  # truncate
        return bytes(buf[: rng.randrange(len(buf))])
    if op == 1 and buf:  # flip some bytes
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        return bytes(buf)
    if op == 2:  # insert random bytes
        pos = rng.randrange(len(buf) + 1)
        return bytes(buf[:pos]) + rng.randbytes(rng.randint(1, 16)) + bytes(buf[pos:])
    if op == 3 and len(buf) > 8:  # overwrite a 4-byte length-like field with a huge number
        pos = rng.randrange(len(buf) - 4)
        buf[pos : pos + 4] = struct.pack(">I", rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 1 << 24, 0]))
        return bytes(buf)
    if op == 4:  # pure noise, sometimes behind a valid magic
        noise = rng.randbytes(rng.randint(0, 64))
        return rng.choice((MAGIC, MAGIC_V2, b"")) + noise
    if op == 5 and buf:  # duplicate a slice
        a = rng.randrange(len(buf))
        b = rng.randrange(a, len(buf) + 1)
        return bytes(buf[:b] + buf[a:b] + buf[b:])
    return bytes(buf[::-1])


def test_random_and_mutated_payloads_raise_only_payload_error() -> None:
    rng = random.Random(20261122)
    seeds = _seeds()
    inputs = _huge_counts() + [_mutate(rng, rng.choice(seeds)) for _ in range(N_INPUTS)]
    ok = rejected = 0
    started = time.perf_counter()
    tracemalloc.start()
    try:
        for data in inputs:
            try:
                decode(data)
                ok += 1
            except PayloadError:
                rejected += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - started
    assert ok + rejected == len(inputs) >= 100_000
    assert rejected > N_INPUTS // 2  # the mutations really do break most payloads
    # Bounded memory: no input may make the decoder allocate what a size field claims.
    assert peak < 64 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"
    # "Quickly": generous enough for a loaded 2-core CI box with tracemalloc on, catches a hang.
    assert elapsed < 240, f"{elapsed:.0f} s for {len(inputs)} inputs"


def test_seeds_of_both_versions_decode() -> None:
    assert [decode(s).gateway for s in _seeds()] == ["gw-1", "gw-1", "g", "gw-2", "gw-2", "g"]


def test_every_huge_count_input_is_rejected() -> None:
    for data in _huge_counts():
        try:
            decode(data)
        except PayloadError:
            continue
        raise AssertionError(f"accepted {data[:40]!r}")
