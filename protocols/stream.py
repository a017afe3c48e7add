"""The stream-decoder sentinels shared by every codec (STYLE H2), the one definition.

A sans-I/O stream decoder has ``feed(data: bytes)`` and ``next()``; ``next()`` returns a frame,
a :class:`Skipped` (``nbytes`` bytes of garbage hunted over; call ``next()`` again) or
:data:`NEED_DATA` (the one :class:`NeedData` instance: feed more bytes), or raises a
``FrameError``. :func:`drivers.transport.read_frame` tells them apart with ``isinstance``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["NEED_DATA", "NeedData", "Skipped"]


@dataclass(frozen=True, slots=True)
class Skipped:
    """``nbytes`` bytes were discarded while hunting for a frame; ``reason`` says why."""

    nbytes: int
    reason: str


class NeedData:
    """Type of :data:`NEED_DATA`: the decoder holds no complete frame, feed it more bytes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: The one :class:`NeedData` instance decoders return.
NEED_DATA: Final = NeedData()
