"""``amigw ingest --replay-dead-letters``: dead-lettered payloads back through the pipeline.

Contract
--------
* Takes the dead-letter store's ``payload`` entries (undecodable or refused messages, with their
  topic), oldest first, optionally only those received in ``[since, until)`` and of one
  ``reason``, and puts each through the worker's own intake and commit code
  (:meth:`ingest.pipeline.worker.IngestWorker.replay`: decode, dedup, transform, write, publish intervals,
  dedup mark), once the cause is fixed (a registry or config change, a new release).
* Idempotent: an entry that lands is removed from the store, so a second replay writes nothing
  new; a batch that is already durable (same gateway, seq and digest) is a duplicate and is
  removed too. An entry refused again stays, with the same id and time, under its new reason.
* A truncated entry (only a prefix of an oversized payload was kept) cannot be replayed: it is
  skipped and left in the store.
* The sink (InfluxDB) or the broker unavailable or refusing us stops the replay at that entry (it stays as it
  was); run it again once fixed. Running workers may go on meanwhile: the dedup store is shared.
* Output: one line per entry (``replayed``, ``already landed``, ``still failing``, ``skipped``),
  then a summary line. :func:`exit_status`: 0 when no entry is still failing and the replay was
  not stopped, else 1.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TextIO

from ingest.config import IngestConfig
from ingest.pipeline.deadletter import DeadLetter
from protocols.errors import ConfigError, SinkError, TransportError

__all__ = ["ReplaySummary", "exit_status", "parse_time_ms", "replay_dead_letters"]

_PAGE = 100  # entries read from the store at a time


@dataclass(slots=True)
class ReplaySummary:
    replayed: int = 0
    duplicate: int = 0
    failing: int = 0
    skipped: int = 0
    stopped: str = ""  # why the replay stopped early ("" when it went through)

    def line(self) -> str:
        total = self.replayed + self.duplicate + self.failing + self.skipped
        text = (
            f"replay: {self.replayed} replayed, {self.duplicate} already landed, "
            f"{self.failing} still failing, {self.skipped} skipped of {total} dead-lettered payloads"
        )
        return text + (f"; stopped: {self.stopped}" if self.stopped else "")


def exit_status(summary: ReplaySummary) -> int:
    return 1 if summary.failing or summary.stopped else 0


def parse_time_ms(option: str, text: str | None) -> int | None:
    """An ISO 8601 date or time as epoch ms (no UTC offset given: UTC). Raises: ConfigError."""
    if text is None:
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(option, f"expected an ISO 8601 date or time, got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


async def replay_dead_letters(
    cfg: IngestConfig,
    out: TextIO,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    reason: str | None = None,
) -> ReplaySummary:
    """Replay the selected entries (see the module contract), printing to ``out``."""
    from ingest.pipeline.worker import IngestWorker

    summary = ReplaySummary()
    worker = IngestWorker(cfg)
    async with worker.replaying() as store:
        last = 0
        while page := store.select(
            kind="payload", reason=reason, since_ms=since_ms, until_ms=until_ms, after_id=last, limit=_PAGE
        ):
            for entry in page:
                last = entry.id
                if entry.truncated or entry.topic is None:
                    summary.skipped += 1
                    print(f"skipped id={entry.id} topic={entry.topic}: {_why_skipped(entry)}", file=out)
                    continue
                try:
                    outcome, why = await worker.replay(entry)
                except (SinkError, TransportError) as exc:
                    summary.stopped = f"at id={entry.id}: {exc}; run the replay again once it is fixed"
                    print(summary.line(), file=out)
                    return summary
                if outcome == "failing":
                    summary.failing += 1
                    print(f"still failing id={entry.id} topic={entry.topic}: {why[:300]}", file=out)
                elif outcome == "duplicate":
                    summary.duplicate += 1
                    print(f"already landed id={entry.id} topic={entry.topic}", file=out)
                else:
                    summary.replayed += 1
                    print(f"replayed id={entry.id} topic={entry.topic}", file=out)
    print(summary.line(), file=out)
    return summary


def _why_skipped(entry: DeadLetter) -> str:
    if entry.topic is None:
        return "no topic recorded"
    return (
        f"truncated: {len(entry.payload)} of {entry.size} bytes kept (sha256 {entry.digest}), "
        "cannot be replayed"
    )
