"""One RS-485 line: one transaction at a time, guard times between frames, adaptive timeouts.

The bus owns the transport, so meters of different protocols (DL/T 645 and Modbus RTU) can share
one line: every driver talks through ``async with bus.transaction(device=...) as tx``. Inside,
``tx.exchange(request, decoder)`` runs the one request/response loop with the device's current
response timeout and feeds the observed response time back into it.

Timing rules:

* **Guard time.** Before a transaction starts, the line must have been quiet for
  ``max(frame_gap_s(baud), device.min_gap_s)`` since the previous transaction ended. Modbus over
  Serial Line V1.02 §2.5.1.1: frames are separated by at least 3.5 character times (11 bits per
  character in RTU); above 19200 baud a fixed 1.750 ms is recommended. Slow DL/T 645 meters
  need a longer per-device gap, hence ``min_gap_s``.
* **Adaptive response timeout.** Per device: ``clamp(ewma(response time) * k, min_s, max_s)``,
  starting at ``initial_s``. A timeout counts as a response of the current timeout, so a meter
  that stops answering walks its timeout up to ``max_s``. The value in force is exposed by
  :meth:`Bus.response_timeout_s` for metrics.

The bus does not retry: the driver decides what is worth repeating (STYLE H4: bounded retries
live with the caller that knows whether a request is idempotent).

The transport can be replaced while the bus lives (:meth:`Bus.reopen`): a line that vanished or
was never there is reopened under the bus's lock, and the drivers and per-device timings that
hold the bus carry on with the new transport. A bus may start with a
:class:`~drivers.transport.ClosedTransport`: every transaction then fails with ``TransportError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from drivers.transport import ClosedTransport, StreamDecoder, Transport, exchange
from protocols.errors import TransportTimeout

__all__ = ["Bus", "BusTransaction", "DeviceTiming", "ResponseTimeout", "frame_gap_s"]


def frame_gap_s(baud: int | None) -> float:
    """3.5 character times at 11 bits per character; 1.75 ms above 19200 baud; 0 without a baud (TCP)."""
    if not baud:
        return 0.0
    return 0.00175 if baud > 19200 else 3.5 * 11 / baud


@dataclass(slots=True)
class ResponseTimeout:
    """``clamp(ewma * k, min_s, max_s)`` over observed response times."""

    initial_s: float = 1.0
    min_s: float = 0.1
    max_s: float = 3.0
    k: float = 3.0
    alpha: float = 0.2
    _ewma_s: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.min_s <= self.initial_s <= self.max_s:
            raise ValueError(
                f"need 0 < min_s <= initial_s <= max_s, got {self.min_s}, {self.initial_s}, {self.max_s}"
            )
        if self.k < 1 or not 0 < self.alpha <= 1:
            raise ValueError(f"need k >= 1 and 0 < alpha <= 1, got k={self.k} alpha={self.alpha}")

    @property
    def value_s(self) -> float:
        if self._ewma_s is None:
            return self.initial_s
        return min(self.max_s, max(self.min_s, self._ewma_s * self.k))

    def observe(self, elapsed_s: float) -> None:
        self._ewma_s = (
            elapsed_s if self._ewma_s is None else self.alpha * elapsed_s + (1 - self.alpha) * self._ewma_s
        )

    def observe_timeout(self) -> None:
        # Treat the miss as a response that took the whole timeout, and then some.
        self.observe(2 * self.value_s / self.k)


@dataclass(slots=True)
class DeviceTiming:
    min_gap_s: float = 0.0
    timeout: ResponseTimeout = field(default_factory=ResponseTimeout)


class BusTransaction:
    """What a driver holds inside ``bus.transaction()``: the transport, and timed exchanges."""

    def __init__(self, bus: Bus, device: Hashable) -> None:
        self.bus, self.device = bus, device
        self.transport: Transport = bus.transport

    @property
    def timeout_s(self) -> float:
        return self.bus.response_timeout_s(self.device)

    async def exchange(
        self, request: bytes, decoder: StreamDecoder, *, timeout_s: float | None = None
    ) -> object:
        """Write ``request`` and return the decoder's frame (see :func:`drivers.transport.exchange`).

        Updates the device's adaptive timeout.
        Raises ``TransportTimeout``, ``TransportError``, ``FrameError``."""
        loop = asyncio.get_running_loop()
        timing = self.bus.timing(self.device)
        start = loop.time()
        try:
            frame = await exchange(
                self.transport,
                request,
                decoder,
                timeout_s=timeout_s if timeout_s is not None else self.timeout_s,
            )
        except TransportTimeout:
            timing.timeout.observe_timeout()
            raise
        finally:
            self.bus._mark_activity()
        timing.timeout.observe(loop.time() - start)
        return frame


class Bus:
    """One half-duplex line. ``async with Bus(transport, baud=9600) as bus:`` closes the transport."""

    def __init__(
        self,
        transport: Transport,
        *,
        baud: int | None = None,
        name: str = "bus",
        timeout: ResponseTimeout | None = None,
    ) -> None:
        """``timeout`` is the response timeout a device starts with unless configured (a copy
        each, as each device adapts its own)."""
        self.transport, self.baud, self.name = transport, baud, name
        self._default_timeout = timeout or ResponseTimeout()
        self.guard_s = frame_gap_s(baud)
        self._lock = asyncio.Lock()
        self._devices: dict[Hashable, DeviceTiming] = {}
        self._last_activity = 0.0
        self.transactions = 0

    def configure_device(
        self, device: Hashable, *, min_gap_s: float = 0.0, timeout: ResponseTimeout | None = None
    ) -> None:
        self._devices[device] = DeviceTiming(min_gap_s, timeout or ResponseTimeout())

    def timing(self, device: Hashable) -> DeviceTiming:
        if device not in self._devices:
            self._devices[device] = DeviceTiming(timeout=dataclasses.replace(self._default_timeout))
        return self._devices[device]

    def response_timeout_s(self, device: Hashable) -> float:
        """The response timeout currently in force for ``device`` (exported as a metric)."""
        return self.timing(device).timeout.value_s

    def _mark_activity(self) -> None:
        self._last_activity = asyncio.get_running_loop().time()

    @contextlib.asynccontextmanager
    async def transaction(self, device: Hashable = None) -> AsyncIterator[BusTransaction]:
        """Hold the line for one request/answer (or a short sequence of them) with ``device``."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            gap = max(self.guard_s, self.timing(device).min_gap_s)
            wait = self._last_activity + gap - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.transactions += 1
            try:
                yield BusTransaction(self, device)
            finally:
                self._mark_activity()

    async def reopen(self, opener: Callable[[], Awaitable[Transport]]) -> None:
        """Close the transport and put ``await opener()`` in its place, holding the line meanwhile
        (a transaction in progress finishes first). If ``opener`` raises, the bus is left closed
        (a :class:`~drivers.transport.ClosedTransport`) and the error propagates."""
        async with self._lock:
            await self.transport.aclose()
            self.transport = ClosedTransport(self.name)
            self.transport = await opener()

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
