"""RS-485 through pyserial, non-blocking on the event loop (``add_reader``/``add_writer``; no threads).

pyserial sets the line up (baud, parity, stop bits) and opens the device non-blocking; the bytes
then move with ``os.read``/``os.write`` on its file descriptor whenever the loop says the fd is
ready. Works on real ttys, USB adapters and pseudo-terminals (``os.openpty`` + ``os.ttyname``).

Echo suppression (``echo=True``): some RS-485 adapters hear their own transmission. After each
write the same number of bytes is read back and compared; a mismatch means another station
talked at the same time (``TransportError``). A hang-up (``EIO`` on a pty whose master closed) is
end of stream. Exceptions: ``serial.SerialException``/``OSError`` -> ``TransportError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import termios

import serial

from drivers.transport import Transport
from protocols.errors import TransportError, TransportTimeout

__all__ = ["SerialTransport"]

_PARITY = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}
_HANGUP = {errno.EIO, errno.ENXIO}


class SerialTransport(Transport):
    def __init__(
        self,
        port: str,
        *,
        baud: int = 9600,
        parity: str = "N",
        stop_bits: int = 1,
        byte_size: int = 8,
        inter_byte_timeout_s: float | None = None,
        echo: bool = False,
    ) -> None:
        if parity not in _PARITY:
            raise ValueError(f"parity {parity!r} not one of N, E, O")
        try:
            self._serial = serial.Serial(
                port, baudrate=baud, parity=_PARITY[parity], stopbits=stop_bits, bytesize=byte_size, timeout=0
            )
        except (serial.SerialException, OSError, ValueError, termios.error) as exc:
            # termios.error is not an OSError: pyserial raises it when a pty refuses its settings
            raise TransportError(f"cannot open {port}: {exc}") from exc
        self._opened = True
        self.port, self.baud, self.echo = port, baud, echo
        self._fd = self._serial.fileno()
        os.set_blocking(self._fd, False)
        # VMIN=1: an empty non-blocking read is EAGAIN, so a 0-byte read really means hang-up.
        try:
            attrs = termios.tcgetattr(self._fd)
            attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
            termios.tcsetattr(self._fd, termios.TCSANOW, attrs)
        except termios.error as exc:
            self._serial.close()
            raise TransportError(f"cannot configure {port}: {exc}") from exc
        self.char_time_s = (1 + byte_size + (parity != "N") + stop_bits) / baud
        # Modbus RTU ends a frame after 1.5 character times of silence; a loaded OS needs slack.
        self.inter_byte_timeout_s = (
            inter_byte_timeout_s if inter_byte_timeout_s is not None else max(0.05, 20 * self.char_time_s)
        )

    async def _wait(self, writer: bool, timeout_s: float | None) -> bool:
        """Wait until the fd is readable (or writable); False on timeout."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        (loop.add_writer if writer else loop.add_reader)(self._fd, wake)
        try:
            await asyncio.wait_for(ready, timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            (loop.remove_writer if writer else loop.remove_reader)(self._fd)

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"{self.port} is closed")

    async def write(self, data: bytes) -> None:
        self._check_open()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                await self._wait(True, None)
            except OSError as exc:
                raise TransportError(f"write to {self.port} failed: {exc}") from exc
        if self.echo:
            await self._swallow_echo(data)

    async def _swallow_echo(self, sent: bytes) -> None:
        echoed = b""
        timeout_s = 0.1 + len(sent) * self.char_time_s * 2
        while len(echoed) < len(sent):
            chunk = await self.read(len(sent) - len(echoed), timeout_s=timeout_s)
            if not chunk:
                raise TransportError(f"{self.port} hung up while reading the echo")
            echoed += chunk
        if echoed != sent:
            raise TransportError(
                f"echo mismatch on {self.port} (collision?): sent {sent.hex()} heard {echoed.hex()}"
            )

    async def read(self, max_bytes: int, *, timeout_s: float) -> bytes:
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                return os.read(self._fd, max_bytes)  # b"" only at EOF
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno in _HANGUP:
                    return b""
                raise TransportError(f"read from {self.port} failed: {exc}") from exc
            remaining = deadline - loop.time()
            if remaining <= 0 or not await self._wait(False, remaining):
                raise TransportTimeout(f"no bytes from {self.port} in {timeout_s:.3f} s")

    async def discard_input(self) -> int:
        self._check_open()
        dropped = 0
        while True:
            try:
                chunk = os.read(self._fd, 4096)
            except (BlockingIOError, OSError):
                return dropped
            if not chunk:
                return dropped
            dropped += len(chunk)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # closing a line that already failed: nothing left to release
        with contextlib.suppress(serial.SerialException, OSError):
            self._serial.close()
