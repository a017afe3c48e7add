"""Bus: serialised transactions, guard times, adaptive timeouts, the exchange loop (over a seam fake)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from drivers.bus import Bus, ResponseTimeout, frame_gap_s
from drivers.transport import Transport, exchange
from protocols.errors import TransportError, TransportTimeout
from protocols.modbus.rtu import RegistersReply, ResponseDecoder, encode_registers_reply


class ScriptedTransport(Transport):
    """A seam fake: answers each write with the next scripted reply, split into chunks."""

    def __init__(self, replies: list[list[bytes]] | None = None) -> None:
        self.replies = list(replies or [])
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.written: list[bytes] = []
        self.discarded = 0

    async def write(self, data: bytes) -> None:
        self.written.append(data)
        for chunk in self.replies.pop(0) if self.replies else []:
            self.inbox.put_nowait(chunk)

    async def read(self, max_bytes: int, *, timeout_s: float) -> bytes:
        try:
            return await asyncio.wait_for(self.inbox.get(), timeout_s)
        except TimeoutError:
            raise TransportTimeout("fake timeout") from None

    async def discard_input(self) -> int:
        while not self.inbox.empty():
            self.discarded += len(self.inbox.get_nowait())
        return self.discarded

    async def aclose(self) -> None:
        self._closed = True


def test_frame_gap() -> None:
    assert frame_gap_s(9600) == pytest.approx(3.5 * 11 / 9600)  # 4.01 ms
    assert frame_gap_s(2400) == pytest.approx(0.016041666)
    assert frame_gap_s(19200) == pytest.approx(3.5 * 11 / 19200)
    assert frame_gap_s(38400) == 0.00175
    assert frame_gap_s(None) == 0.0


def test_response_timeout_adapts_within_bounds() -> None:
    t = ResponseTimeout(initial_s=1.0, min_s=0.1, max_s=2.0, k=3.0, alpha=0.5)
    assert t.value_s == 1.0
    t.observe(0.01)
    assert t.value_s == 0.1  # clamped to min
    t.observe(0.2)
    assert t.value_s == pytest.approx(3 * 0.105)
    for _ in range(20):
        t.observe_timeout()
    assert t.value_s == 2.0  # clamped to max
    with pytest.raises(ValueError):
        ResponseTimeout(initial_s=5, max_s=3)


async def test_transactions_never_overlap_and_keep_the_guard_time() -> None:
    bus = Bus(ScriptedTransport(), baud=2400)  # guard 16 ms: large enough to measure
    loop = asyncio.get_running_loop()
    spans: list[tuple[float, float]] = []

    async def one(i: int) -> None:
        async with bus.transaction(device=i):
            start = loop.time()
            await asyncio.sleep(0.005)
            spans.append((start, loop.time()))

    await asyncio.gather(*(one(i) for i in range(6)))
    spans.sort()
    assert len(spans) == 6 and bus.transactions == 6
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end + bus.guard_s * 0.95, "guard time not respected or transactions overlapped"


async def test_per_device_min_gap() -> None:
    bus = Bus(ScriptedTransport(), baud=38400)
    bus.configure_device("slow", min_gap_s=0.05)
    loop = asyncio.get_running_loop()
    async with bus.transaction(device="fast"):
        pass
    end = loop.time()
    async with bus.transaction(device="slow"):
        assert loop.time() - end >= 0.045


async def test_exchange_through_bus_records_response_time() -> None:
    reply = encode_registers_reply(1, 3, [1, 2])
    transport = ScriptedTransport([[b"\x55", reply[:3], reply[3:]]])
    transport.inbox.put_nowait(b"stale")
    bus = Bus(transport, baud=9600)
    bus.configure_device(1, timeout=ResponseTimeout(initial_s=1.0, min_s=0.05, max_s=2.0))
    async with bus.transaction(device=1) as tx:
        frame = await tx.exchange(b"req", ResponseDecoder(1, 3, 2))
    assert frame == RegistersReply(1, 3, (1, 2))
    assert transport.discarded == len(b"stale") and transport.written == [b"req"]
    assert bus.response_timeout_s(1) == 0.05  # a fast answer shrinks the timeout to its floor


async def test_exchange_timeout_raises_and_grows_timeout() -> None:
    bus = Bus(ScriptedTransport([[]]), baud=9600)
    bus.configure_device(1, timeout=ResponseTimeout(initial_s=0.05, min_s=0.05, max_s=0.5))
    async with bus.transaction(device=1) as tx:
        with pytest.raises(TransportTimeout, match="no answer"):
            await tx.exchange(b"req", ResponseDecoder(1, 3, 2))
    assert bus.response_timeout_s(1) > 0.05


async def test_incomplete_answer_times_out_on_inter_byte_gap() -> None:
    reply = encode_registers_reply(1, 3, [1, 2])
    transport = ScriptedTransport([[reply[:4]]])
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TransportTimeout, match="incomplete answer after 4 bytes"):
        await exchange(transport, b"r", ResponseDecoder(1, 3, 2), timeout_s=5.0, inter_byte_timeout_s=0.05)
    assert loop.time() - start < 1.0


async def test_eof_mid_answer_is_transport_error() -> None:
    transport = ScriptedTransport([[b"\x01", b""]])
    with pytest.raises(TransportError, match="end of stream"):
        await exchange(transport, b"r", ResponseDecoder(1, 3, 2), timeout_s=1.0)
