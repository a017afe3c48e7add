"""Serial-over-TCP: a transparent serial server (e.g. a USR/Moxa box) in raw TCP mode, over asyncio streams.

Exceptions: ``OSError`` (refused, reset, unreachable) -> ``TransportError``; an expired wait ->
``TransportTimeout``. ``b""`` from :meth:`read` means the server closed the connection.
"""

from __future__ import annotations

import asyncio
import contextlib

from drivers.transport import Transport
from protocols.errors import TransportError, TransportTimeout

__all__ = ["TcpTransport"]


class TcpTransport(Transport):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, name: str) -> None:
        self._reader, self._writer, self.name = reader, writer, name
        self._opened = True
        self.inter_byte_timeout_s = 0.2  # TCP segments of one frame may arrive apart

    @classmethod
    async def connect(cls, host: str, port: int, *, timeout_s: float = 5.0) -> TcpTransport:
        """Open the connection. Raises ``TransportTimeout`` / ``TransportError``."""
        name = f"{host}:{port}"
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        except TimeoutError as exc:
            raise TransportTimeout(f"connect to {name} timed out after {timeout_s} s") from exc
        except OSError as exc:
            raise TransportError(f"connect to {name} failed: {exc}") from exc
        return cls(reader, writer, name=name)

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise TransportError(f"{self.name} is closed")
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError as exc:  # ConnectionResetError, BrokenPipeError ...
            raise TransportError(f"write to {self.name} failed: {exc}") from exc

    async def read(self, max_bytes: int, *, timeout_s: float) -> bytes:
        if self._closed:
            raise TransportError(f"{self.name} is closed")
        try:
            # Cancelling StreamReader.read loses nothing: bytes stay in its buffer.
            return await asyncio.wait_for(self._reader.read(max_bytes), timeout_s)
        except TimeoutError as exc:
            raise TransportTimeout(f"no bytes from {self.name} in {timeout_s:.3f} s") from exc
        except OSError as exc:
            raise TransportError(f"read from {self.name} failed: {exc}") from exc

    async def discard_input(self) -> int:
        dropped = 0
        while not self._closed:
            try:
                chunk = await self.read(4096, timeout_s=0.001)
            except TransportTimeout:
                break
            if not chunk:
                break
            dropped += len(chunk)
        return dropped

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        with contextlib.suppress(OSError):  # the peer already reset the connection
            await self._writer.wait_closed()
