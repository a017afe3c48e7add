"""SerialTransport on a real pseudo-terminal, TcpTransport on a real loopback socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import AsyncIterator, Iterator

import pytest

from drivers.bus import Bus
from drivers.serial_transport import SerialTransport
from drivers.tcp_transport import TcpTransport
from drivers.transport import Transport
from protocols.errors import TransportError, TransportTimeout
from protocols.modbus.rtu import RegistersReply, ResponseDecoder, encode_registers_reply

pytestmark = pytest.mark.integration


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    yield master, path
    for fd in (master, slave):
        with contextlib.suppress(OSError):
            os.close(fd)


async def _master_read(master: int, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = b""
    while len(out) < n:
        await asyncio.sleep(0.005)
        with contextlib.suppress(BlockingIOError):
            out += os.read(master, n - len(out))
        if loop.time() > 1e12:  # pragma: no cover
            break
    return out


async def test_serial_roundtrip_timeout_and_discard(pty_pair: tuple[int, str]) -> None:
    master, path = pty_pair
    os.set_blocking(master, False)
    async with SerialTransport(path, baud=9600) as t:
        await t.write(b"\x01\x03ping")
        assert await _master_read(master, 6) == b"\x01\x03ping"
        with pytest.raises(TransportTimeout):
            await t.read(10, timeout_s=0.05)
        os.write(master, b"stale bytes")
        await asyncio.sleep(0.02)
        assert await t.discard_input() == len(b"stale bytes")
        with pytest.raises(TransportTimeout):
            await t.read(10, timeout_s=0.02)
        os.write(master, b"fresh")
        assert await t.read(10, timeout_s=1.0) == b"fresh"


async def test_serial_eof_when_the_other_end_hangs_up(pty_pair: tuple[int, str]) -> None:
    master, path = pty_pair
    t = SerialTransport(path)
    try:
        os.close(master)
        assert await t.read(10, timeout_s=1.0) == b""
    finally:
        await t.aclose()
    with pytest.raises(TransportError):
        await t.read(1, timeout_s=0.1)


async def test_serial_echo_suppression(pty_pair: tuple[int, str]) -> None:
    master, path = pty_pair
    os.set_blocking(master, False)
    async with SerialTransport(path, baud=9600, echo=True) as t:

        async def adapter_echo(extra: bytes) -> None:  # the "adapter" echoes what was sent, then answers
            data = await _master_read(master, 4)
            os.write(master, data + extra)

        echo_task = asyncio.create_task(adapter_echo(b"answer"))
        await t.write(b"abcd")
        await echo_task
        assert await t.read(16, timeout_s=1.0) == b"answer"

        async def collision() -> None:
            await _master_read(master, 4)
            os.write(master, b"abXY")

        task = asyncio.create_task(collision())
        with pytest.raises(TransportError, match="echo mismatch"):
            await t.write(b"abcd")
        await task


async def test_serial_open_failure_is_transport_error() -> None:
    with pytest.raises(TransportError, match="cannot open"):
        SerialTransport("/dev/does-not-exist-amigw")


async def test_rtu_exchange_over_pty_bus(pty_pair: tuple[int, str]) -> None:
    master, path = pty_pair
    os.set_blocking(master, False)
    reply = encode_registers_reply(5, 4, [10, 20])

    async def meter() -> None:
        await _master_read(master, 3)
        os.write(master, b"\x00\x99" + reply[:4])  # line noise, then the answer in two pieces
        await asyncio.sleep(0.01)
        os.write(master, reply[4:])

    async with Bus(SerialTransport(path, baud=9600), baud=9600) as bus:
        task = asyncio.create_task(meter())
        async with bus.transaction(device=5) as tx:
            frame = await tx.exchange(b"req", ResponseDecoder(5, 4, 2))
        await task
    assert frame == RegistersReply(5, 4, (10, 20))


@pytest.fixture
async def tcp_peer() -> AsyncIterator[tuple[int, asyncio.Queue[asyncio.StreamWriter], list[bytes]]]:
    writers: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await writers.put(writer)
        while data := await reader.read(100):
            received.append(data)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield port, writers, received
    server.close()
    await server.wait_closed()


async def test_tcp_roundtrip_timeout_discard_eof(
    tcp_peer: tuple[int, asyncio.Queue[asyncio.StreamWriter], list[bytes]],
) -> None:
    port, writers, received = tcp_peer
    t: Transport = await TcpTransport.connect("127.0.0.1", port)
    async with t:
        peer = await writers.get()
        await t.write(b"hello")
        with pytest.raises(TransportTimeout):
            await t.read(10, timeout_s=0.05)
        peer.write(b"stale")
        await peer.drain()
        await asyncio.sleep(0.02)
        assert await t.discard_input() == 5
        peer.write(b"fresh")
        await peer.drain()
        assert await t.read(10, timeout_s=1.0) == b"fresh"
        assert b"".join(received) == b"hello"
        peer.close()
        assert await t.read(10, timeout_s=1.0) == b""


async def test_tcp_connect_refused() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(TransportError, match="connect to"):
        await TcpTransport.connect("127.0.0.1", port)
