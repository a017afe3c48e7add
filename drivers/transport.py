"""The byte-stream transport interface, and the one request/response loop over it.

A :class:`Transport` moves bytes; it knows nothing of frames. Implementations translate their
library's exceptions *once*, here at the boundary (``OSError``/``serial.SerialException`` ->
:class:`~protocols.errors.TransportError`, an expired wait -> :class:`~protocols.errors.TransportTimeout`).

:func:`exchange` is the only "write a request, feed a decoder until a frame or a timeout" loop in
the project. It takes any object with the stream-decoder shape (STYLE H2)::

    decoder.feed(data: bytes) -> None
    decoder.next() -> frame | Skipped | NeedData     # may raise a FrameError

:class:`~protocols.stream.NeedData` means "read more", :class:`~protocols.stream.Skipped` means
"garbage was hunted over, keep going" (the one sentinel pair every codec returns); anything else is
the frame and is returned.
"""

from __future__ import annotations

import abc
import asyncio
import warnings
from types import TracebackType
from typing import Protocol, Self

from protocols.errors import TransportError, TransportTimeout
from protocols.stream import NeedData, Skipped

__all__ = ["ClosedTransport", "StreamDecoder", "Transport", "exchange", "read_frame"]


class Transport(abc.ABC):
    """A half-duplex byte stream to a meter bus (a serial line or a transparent serial server)."""

    #: Silence after the first byte of an answer that ends a read (None: only the response timeout).
    inter_byte_timeout_s: float | None = None
    _closed: bool = False

    @abc.abstractmethod
    async def write(self, data: bytes) -> None:
        """Send all of ``data``. Raises ``TransportError`` (line/socket failed or closed)."""

    @abc.abstractmethod
    async def read(self, max_bytes: int, *, timeout_s: float) -> bytes:
        """Up to ``max_bytes`` bytes, as soon as at least one is there.

        Returns ``b""`` only at end of stream (peer closed / line hung up). Raises
        ``TransportTimeout`` when nothing arrived within ``timeout_s``, ``TransportError`` else."""

    @abc.abstractmethod
    async def discard_input(self) -> int:
        """Drop stale bytes already received (late answers, line noise); returns how many."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the port or socket. Idempotent; never raises for an already-broken peer."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if not self._closed and getattr(self, "_opened", False):
            warnings.warn(f"{type(self).__name__} was never closed", ResourceWarning, stacklevel=2)


class ClosedTransport(Transport):
    """Stands in for a line that is not open (the port is missing, the server refuses): every
    operation raises ``TransportError``; closing it does nothing."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _refuse(self) -> TransportError:
        return TransportError(f"{self.name} is not open")

    async def write(self, data: bytes) -> None:
        raise self._refuse()

    async def read(self, max_bytes: int, *, timeout_s: float) -> bytes:
        raise self._refuse()

    async def discard_input(self) -> int:
        raise self._refuse()

    async def aclose(self) -> None:
        self._closed = True


class StreamDecoder(Protocol):
    def feed(self, data: bytes) -> None: ...
    def next(self) -> object: ...


async def read_frame(
    transport: Transport,
    decoder: StreamDecoder,
    *,
    timeout_s: float,
    inter_byte_timeout_s: float | None = None,
    max_read: int = 256,
) -> object:
    """Read and feed ``decoder`` until it yields a frame; return it.

    ``timeout_s`` bounds the whole answer; once bytes flow, a silence longer than
    ``inter_byte_timeout_s`` (default: the transport's) also ends the wait.

    Raises:
        TransportTimeout: no complete frame in time.
        TransportError: the transport failed or reached end of stream mid-answer.
        FrameError: raised by the decoder (e.g. too much garbage).
    """
    loop = asyncio.get_running_loop()
    gap = inter_byte_timeout_s if inter_byte_timeout_s is not None else transport.inter_byte_timeout_s
    deadline = loop.time() + timeout_s
    received = 0
    while True:
        result = decoder.next()
        if isinstance(result, Skipped):
            continue
        if not isinstance(result, NeedData):
            return result
        wait = deadline - loop.time()
        if received and gap is not None:
            wait = min(wait, gap)
        if wait <= 0:
            raise TransportTimeout(f"incomplete answer after {received} bytes" if received else "no answer")
        try:
            data = await transport.read(max_read, timeout_s=wait)
        except TransportTimeout:
            raise TransportTimeout(
                f"incomplete answer after {received} bytes" if received else f"no answer in {timeout_s:.3f} s"
            ) from None
        if not data:
            raise TransportError(f"end of stream after {received} bytes of an answer")
        received += len(data)
        decoder.feed(data)


async def exchange(
    transport: Transport,
    request: bytes,
    decoder: StreamDecoder,
    *,
    timeout_s: float,
    inter_byte_timeout_s: float | None = None,
    discard_stale: bool = True,
) -> object:
    """Flush stale input, write ``request``, and return the decoder's first frame.

    ``request`` may be empty (listen only). Raises as :func:`read_frame` does."""
    if discard_stale:
        await transport.discard_input()
    if request:
        await transport.write(request)
    return await read_frame(
        transport, decoder, timeout_s=timeout_s, inter_byte_timeout_s=inter_byte_timeout_s
    )
