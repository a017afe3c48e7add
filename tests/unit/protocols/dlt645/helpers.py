"""Shared helpers for the DL/T 645 codec tests: the public vectors and a decoder driver."""

from __future__ import annotations

import json
from pathlib import Path

from protocols.dlt645 import Frame, FrameDecoder
from protocols.errors import FrameError
from protocols.stream import NEED_DATA, Skipped

_ROOT = Path(__file__).resolve().parents[4]
VECTORS_FILE = _ROOT / "tests" / "cases" / "dlt645_public_vectors" / "vectors.json"
SHARED_VECTORS_FILE = _ROOT.parent / "shared" / "reference" / "dlt645_vectors.json"


def load_vectors() -> list[dict[str, object]]:
    """The public vectors (each with ``id``, ``hex``, ``kind``, ``decoded`` ...), from the repo's copy."""
    return list(json.loads(VECTORS_FILE.read_text(encoding="utf-8")))


def drain(decoder: FrameDecoder) -> list[Frame | Skipped | FrameError]:
    """Pull results until NEED_DATA; a raised FrameError is recorded as a result."""
    out: list[Frame | Skipped | FrameError] = []
    while True:
        try:
            ev = decoder.next()
        except FrameError as exc:
            out.append(exc)
            continue
        if ev is NEED_DATA:
            return out
        assert not isinstance(ev, type(NEED_DATA))
        out.append(ev)


def feed_all(data: bytes, chunks: int | None = None, decoder: FrameDecoder | None = None) -> list[object]:
    """Feed ``data`` whole (``chunks=None``) or in pieces of ``chunks`` bytes, draining after each."""
    dec = decoder or FrameDecoder()
    out: list[object] = []
    step = chunks or max(len(data), 1)
    for i in range(0, len(data), step):
        dec.feed(data[i : i + step])
        out.extend(drain(dec))
    return out


def frames(events: list[object]) -> list[Frame]:
    return [e for e in events if isinstance(e, Frame)]
