"""The faults ``amigw bench e2e`` injects during a run, and the evidence that each happened.

Every fault is an ``async`` function of a :class:`FaultContext` that does the damage, waits for
its direct effect, and returns :class:`Check` items proving that it really happened (a pid that
changed, a dead-letter count that rose by exactly the flood). Whether anything was lost or
stored twice is not a fault's business: the run's final check against the ground truth covers
every fault at once (every reading exactly once, every charge once, the loss counter at 0).

========================  ====================================================================
``broker-restart``        mosquitto stopped with SIGTERM (clean shutdown: it saves its
                          persistence file) and started again on the same port
``broker-kill``           mosquitto SIGKILLed and started again: what arrived since its last
                          autosave is gone from the broker, the edges re-send it
``influx-outage``         influxd stopped for ``influx_outage_s`` (SIGTERM), then started again:
                          ingest holds back its acknowledgements and confirmations meanwhile
``worker-kill``           ingest worker 0 SIGKILLed and restarted (its session and what it had
                          not acknowledged wait at the broker)
``worker-stop``           scale-down: the last ingest worker stopped for good (SIGTERM) and its
                          broker session ended; the other workers take its share, the edges
                          re-send what it had taken but not confirmed
``replay``                the first gateway re-publishes its batches of the last ``replay_s``
                          simulated seconds (the generator's ``replay_payloads``: byte-identical,
                          same seqs, already confirmed): ingest must recognise every one as a
                          duplicate (nothing stored or charged twice)
``flood``                 ``flood_count`` malformed payloads on the last gateway's readings topic:
                          each dead-lettered, no worker crashes, that gateway's good batches
                          beside them are stored as usual
``clock-jump``            the middle gateway's clock jumps ``clock_jump_s`` seconds (the
                          generator's ``jump_clock``); the ground truth says what ingest must flag
========================  ====================================================================

Server restarts run in a worker thread (``asyncio.to_thread``) so the edges' connections keep
being served meanwhile.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from protocols import topics
from protocols.payload import decode
from simulators.fleet_headend import HeadEnd
from simulators.fleet_publish import EdgeFleet, RawClient

__all__ = ["FAULTS", "Check", "FaultContext", "FaultResult", "garbage_payloads", "inject"]


@dataclass(frozen=True, slots=True)
class Check:
    """One verdict of the run: what was checked, whether it held, and the numbers."""

    name: str
    ok: bool
    detail: str = ""


@dataclass(slots=True)
class FaultContext:
    headend: HeadEnd
    edges: EdgeFleet
    gateways: tuple[str, ...]
    sim_ms: Callable[[], int]  # the simulated time now (the point of the boundary about to be published)
    replay_payloads: Callable[[str, int, int], list[tuple[str, bytes]]] | None = None
    jump_clock: Callable[[str, int], object] | None = None
    influx_outage_s: float = 60.0
    flood_count: int = 1000
    replay_s: int = 3600
    clock_jump_s: int = 3600
    settle_timeout_s: float = 120.0
    seed: int = 1


@dataclass(slots=True)
class FaultResult:
    name: str
    boundary: int
    started_s: float  # seconds since the run started
    duration_s: float = 0.0
    evidence: dict[str, object] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "boundary": self.boundary, "started_s": round(self.started_s, 1),
            "duration_s": round(self.duration_s, 1), "ok": self.ok, "evidence": self.evidence,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
        }  # fmt: skip


_Fault = Callable[[FaultContext, FaultResult], Awaitable[None]]


async def _broker(ctx: FaultContext, res: FaultResult, *, kill: bool) -> None:
    broker = ctx.headend.broker
    before = broker.pid
    await asyncio.to_thread(broker.kill if kill else broker.stop)
    await asyncio.to_thread(broker.start)
    after = broker.pid
    res.evidence.update(pid_before=before, pid_after=after)
    res.checks.append(
        Check(
            "broker restarted", before is not None and after not in (None, before), f"pid {before} -> {after}"
        )
    )
    await _wait_reconnected(ctx, res)


async def broker_restart(ctx: FaultContext, res: FaultResult) -> None:
    await _broker(ctx, res, kill=False)


async def broker_kill(ctx: FaultContext, res: FaultResult) -> None:
    await _broker(ctx, res, kill=True)


async def _wait_reconnected(ctx: FaultContext, res: FaultResult) -> None:
    deadline = time.monotonic() + ctx.settle_timeout_s
    while ctx.edges.stats().connected < len(ctx.gateways) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    connected = ctx.edges.stats().connected
    res.checks.append(
        Check(
            "every gateway reconnected", connected == len(ctx.gateways), f"{connected} of {len(ctx.gateways)}"
        )
    )


async def influx_outage(ctx: FaultContext, res: FaultResult) -> None:
    influx = ctx.headend.influx
    before = influx.pid
    await asyncio.to_thread(influx.stop)
    down_at = time.monotonic()
    backlog_before = ctx.edges.stats().backlog
    await asyncio.sleep(ctx.influx_outage_s)
    backlog_during = ctx.edges.stats().backlog
    await asyncio.to_thread(influx.start)
    down_s = time.monotonic() - down_at
    after = influx.pid
    res.evidence.update(pid_before=before, pid_after=after, down_s=round(down_s, 1),
                        backlog_at_stop=backlog_before, backlog_at_restart=backlog_during)  # fmt: skip
    res.checks.append(
        Check(
            "influxd down and back",
            after not in (None, before) and down_s >= ctx.influx_outage_s,
            f"pid {before} -> {after}, down {down_s:.1f} s",
        )
    )
    res.checks.append(
        Check(
            "nothing confirmed while influxd was down",
            backlog_during > 0,
            f"{backlog_during} batches unconfirmed at its restart",
        )
    )


async def worker_kill(ctx: FaultContext, res: FaultResult) -> None:
    he = ctx.headend
    before = he.kill_worker(0)
    after = await asyncio.to_thread(he.start_worker, 0)
    res.evidence.update(worker=0, pid_before=before, pid_after=after)
    res.checks.append(
        Check(
            "worker 0 SIGKILLed and restarted",
            after != before and he.worker_pid(0) == after,
            f"pid {before} -> {after}",
        )
    )


async def worker_stop(ctx: FaultContext, res: FaultResult) -> None:
    he = ctx.headend
    i = len(he.workers) - 1
    if i == 0:
        res.checks.append(Check("a worker stopped for good", False, "needs at least 2 workers"))
        return
    pid = await asyncio.to_thread(he.stop_worker, i)
    live = he.live_workers()
    res.evidence.update(worker=i, pid=pid, live_workers=live)
    res.checks.append(
        Check(
            f"worker {i} stopped for good",
            i not in live and len(live) == len(he.workers) - 1,
            f"pid {pid} gone, live workers {live}",
        )
    )


def _duplicates(he: HeadEnd) -> int:
    return int(
        sum(
            he.labelled_metric(i, "amigw_ingest_batches_total").get('result="duplicate"', 0.0)
            for i in he.live_workers()
        )
    )


async def replay(ctx: FaultContext, res: FaultResult) -> None:
    gw = ctx.gateways[0]
    now = ctx.sim_ms()
    if ctx.replay_payloads is None:
        res.checks.append(Check("old batches replayed", False, "the generator has no replay_payloads"))
        return
    items = ctx.replay_payloads(gw, now - ctx.replay_s * 1000, now - 1)
    res.evidence.update(gateway=gw, replayed=len(items))
    if not items:
        res.checks.append(Check("old batches replayed", False, f"{gw} has no confirmed batch to replay yet"))
        return
    # Only batches the head-end has confirmed: a replay overtaking its original would be written
    # first and the original, confirmed meanwhile, never sent (no duplicate to count).
    seqs = [decode(p, check_meter_indices=False).seq for _, p in items]
    await _until(ctx, lambda: all(ctx.edges.confirmed(gw, s) for s in seqs))
    before = _duplicates(ctx.headend)
    async with RawClient(ctx.edges.broker_url, f"bench-replay-{gw}") as raw:
        await raw.publish_all(items)
    seen = await _until(ctx, lambda: _duplicates(ctx.headend) - before >= len(items))
    res.evidence["duplicates_counted"] = _duplicates(ctx.headend) - before
    res.checks.append(
        Check(
            "every replayed batch recognised as a duplicate",
            seen,
            f"{res.evidence['duplicates_counted']} of {len(items)}",
        )
    )


def garbage_payloads(count: int, seed: int) -> list[bytes]:
    """``count`` malformed payloads of several kinds (random bytes, broken JSON, a binary
    header with nothing after it, empty), reproducible from ``seed``."""
    rng = random.Random(seed)
    kinds: list[Callable[[], bytes]] = [
        lambda: rng.randbytes(rng.randint(1, 2048)),
        lambda: b'{"v": 1, "type": "readings", "gateway": ' + rng.randbytes(8).hex().encode(),
        lambda: b"\x92\x01" + rng.randbytes(rng.randint(0, 64)),
        lambda: b"",
    ]
    return [kinds[i % len(kinds)]() for i in range(count)]


async def flood(ctx: FaultContext, res: FaultResult) -> None:
    he = ctx.headend
    gw = ctx.gateways[-1]
    topic = topics.readings(gw)
    pids = {i: he.worker_pid(i) for i in he.live_workers()}
    before = sum(he.dead_letters().values())
    items = [(topic, p) for p in garbage_payloads(ctx.flood_count, ctx.seed)]
    async with RawClient(ctx.edges.broker_url, f"bench-flood-{gw}") as raw:
        await raw.publish_all(items)
    await _until(ctx, lambda: sum(he.dead_letters().values()) - before >= len(items))
    await asyncio.sleep(1.0)  # a few more would show up now if any payload was counted twice
    added = sum(he.dead_letters().values()) - before
    after = {i: he.worker_pid(i) for i in pids}
    res.evidence.update(gateway=gw, published=len(items), dead_lettered=added, by_reason=he.dead_letters())
    res.checks.append(
        Check(
            "every malformed payload dead-lettered once",
            added == len(items),
            f"{added} dead letters for {len(items)} payloads",
        )
    )
    res.checks.append(Check("no worker crashed", after == pids, f"worker pids {pids} -> {after}"))


async def clock_jump(ctx: FaultContext, res: FaultResult) -> None:
    gw = ctx.gateways[len(ctx.gateways) // 2]
    res.evidence.update(gateway=gw, seconds=ctx.clock_jump_s)
    if ctx.jump_clock is None:
        res.checks.append(Check("gateway clock jumped", False, "the generator has no jump_clock"))
        return
    ctx.jump_clock(gw, ctx.clock_jump_s)
    res.checks.append(
        Check("gateway clock jumped", True, f"{gw} by {ctx.clock_jump_s} s from the next upload")
    )


async def _until(ctx: FaultContext, cond: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + ctx.settle_timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        ctx.headend.check()
        await asyncio.sleep(0.2)
    return True


FAULTS: dict[str, tuple[_Fault, str]] = {
    "broker-restart": (broker_restart, "mosquitto SIGTERM + start"),
    "broker-kill": (broker_kill, "mosquitto SIGKILL + start"),
    "influx-outage": (influx_outage, "influxd stopped for --influx-outage-s"),
    "worker-kill": (worker_kill, "ingest worker 0 SIGKILLed and restarted"),
    "worker-stop": (worker_stop, "the last ingest worker stopped for good (scale-down)"),
    "replay": (replay, "a gateway re-publishes --replay-s of confirmed batches byte-identical"),
    "flood": (flood, "--flood-count malformed payloads on a gateway's readings topic"),
    "clock-jump": (clock_jump, "a gateway's clock jumps --clock-jump-s"),
}


async def inject(name: str, ctx: FaultContext, boundary: int, run_started: float) -> FaultResult:
    """Run fault ``name`` now; its result.

    Raises:
        KeyError: unknown fault name.
        HarnessError: a program exited meanwhile. ServiceError: a server did not come back.
    """
    fn, _ = FAULTS[name]
    t0 = time.monotonic()
    res = FaultResult(name, boundary, t0 - run_started)
    await fn(ctx, res)
    res.duration_s = time.monotonic() - t0
    return res
