"""Alarms for the ops API: one bounded listing over the places alarms are stored, each with a
stable id, and a small SQLite store of operators' acknowledgements merged into it.

Contract
--------
* :func:`alarms` lists the alarms stamped in ``[start_ms, end_ms)`` (at most
  :data:`~ingest.ops.views.MAX_RANGE_DAYS` days), newest first, at most ``limit``
  (``truncated`` says there were more). Kinds and their sources (``docs/ops-views.md``):

  ============================  ==============================================================
  kind                          source
  ============================  ==============================================================
  ``area_outage``               ``alarms`` measurement, written by the worker (OUT-02)
  ``line_loss``                 ``alarms`` measurement, written by the daily report (LL-02)
  ``seq_gap``, ``seq_reset``    ``alarms`` measurement, written from the loss account
  ``invalid_intervals``         ``daily_tou`` rows with ``invalid > 0`` (a meter-day with
                                intervals the validation rules took out of billing)
  ``tou_mismatch``              ``daily_tou`` rows with ``tou_mismatch > 0`` (VEE-15)
  ``command_failed``            the ``failed_commands`` callable (fee control's ledger), if given
  ============================  ==============================================================

* An alarm's ``id`` is derived from what identifies its stored record (kind, subject, time), so
  it is the same on every listing, and an alarm rewritten in place (an outage that grows) keeps
  it.
* :class:`AlarmAcks` stores acknowledgements by alarm id. :meth:`AlarmAcks.ack` is idempotent:
  the first acknowledgement is kept, a repeat returns it with ``created`` false. It does not
  check that the alarm exists (alarms live in InfluxDB; the caller may).
* Raises :class:`~ingest.ops.views.BadArgument` for bad arguments (before any query) and
  :class:`~protocols.errors.SinkError` when InfluxDB is unreachable or refuses a query.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ingest.ops.views import check_range
from ingest.sinks.influx.lines import unescape_stored
from ingest.sinks.influx.query import InfluxQuery, quote_str
from protocols.errors import BadArgument

__all__ = [
    "ALARM_KINDS",
    "MAX_LIMIT",
    "AlarmAcks",
    "FailedCommands",
    "alarm_id",
    "alarms",
]

STORED_KINDS = ("area_outage", "line_loss", "seq_gap", "seq_reset")  # the ``alarms`` measurement
DAY_KINDS = ("invalid_intervals", "tou_mismatch")  # from ``daily_tou``
ALARM_KINDS = (*STORED_KINDS, *DAY_KINDS, "command_failed")
MAX_LIMIT = 5000
_DETAIL = {  # the fields of each stored kind
    "area_outage": ("events",),
    "line_loss": ("class", "rate_bp"),
    "seq_gap": ("gaps", "missing", "first", "last"),
    "seq_reset": ("gaps", "missing", "first", "last"),
}

FailedCommands = Callable[[int, int, int], Awaitable[Sequence[Mapping[str, Any]]]]
"""``(start_ms, end_ms, limit)`` -> failed command records, each with ``id`` (str) and ``ts_ms``
(int), optionally ``gateway`` and ``meter``; every other key goes to the alarm's ``detail``."""


def alarm_id(kind: str, subject: str, ts_ms: int) -> str:
    """A stable, URL-safe id: the kind and 16 hex digits of a hash of what identifies the record."""
    digest = hashlib.sha256(f"{kind}\x1f{subject}\x1f{ts_ms}".encode()).hexdigest()[:16]
    return f"{kind}-{digest}"


def _alarm(
    kind: str, ts_ms: int, subject: str, *, area: str | None = None, gateway: str | None = None,
    meter: str | None = None, detail: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    return {
        "id": alarm_id(kind, subject, ts_ms),
        "kind": kind,
        "ts_ms": ts_ms,
        "area": area,
        "gateway": gateway,
        "meter": meter,
        "detail": detail,
    }


async def alarms(
    query: InfluxQuery,
    start_ms: int,
    end_ms: int,
    kinds: Iterable[str] | None = None,
    limit: int = 200,
    *,
    acks: AlarmAcks | None = None,
    acked: bool | None = None,
    failed_commands: FailedCommands | None = None,
) -> dict[str, Any]:
    """The alarms of ``kinds`` (default: all of :data:`ALARM_KINDS`) stamped in
    ``[start_ms, end_ms)``, newest first, at most ``limit``; each carries ``ack``: None, or its
    acknowledgement in ``acks``; and ``acked`` keeps only acknowledged (True) or
    unacknowledged (False) ones. ``command_failed`` needs ``failed_commands``.

    Raises: BadArgument (range, kinds, limit), SinkError."""
    check_range(start_ms, end_ms)
    wanted = _kinds(kinds)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise BadArgument("limit", f"expected 1..{MAX_LIMIT}")
    if acked is not None and acks is None:
        raise BadArgument("acked", "no acknowledgement store")
    found: list[dict[str, Any]] = []
    stored = [k for k in STORED_KINDS if k in wanted]
    if stored:
        found += await _stored_alarms(query, start_ms, end_ms, stored, limit)
    day = [k for k in DAY_KINDS if k in wanted]
    if day:
        found += await _day_alarms(query, start_ms, end_ms, day, limit)
    if "command_failed" in wanted and failed_commands is not None:
        found += _command_alarms(await failed_commands(start_ms, end_ms, limit + 1))
    ack_state = acks.get([a["id"] for a in found]) if acks is not None else {}
    for a in found:
        a["ack"] = ack_state.get(a["id"])
    if acked is not None:
        found = [a for a in found if (a["ack"] is not None) == acked]
    found.sort(key=lambda a: (-int(a["ts_ms"]), str(a["id"])))
    return {
        "start_ms": start_ms,
        "end_ms": end_ms,
        "kinds": [k for k in ALARM_KINDS if k in wanted],
        "count": min(len(found), limit),
        "truncated": len(found) > limit,
        "alarms": found[:limit],
    }


def _kinds(kinds: Iterable[str] | None) -> set[str]:
    if kinds is None:
        return set(ALARM_KINDS)
    wanted = set(kinds)
    unknown = sorted(wanted - set(ALARM_KINDS))
    if unknown or not wanted:
        raise BadArgument("kinds", f"expected some of {list(ALARM_KINDS)}, got {unknown or 'none'}")
    return wanted


async def _stored_alarms(
    query: InfluxQuery, start_ms: int, end_ms: int, kinds: list[str], limit: int
) -> list[dict[str, Any]]:
    """One query over ``alarms`` (tags as columns, no GROUP BY: LIMIT bounds the whole answer)."""
    which = " OR ".join(f'"kind" = {quote_str(k)}' for k in kinds)
    rows = await query.rows(
        f'SELECT * FROM "alarms" WHERE time >= {start_ms}ms AND time < {end_ms}ms AND ({which}) '
        f"ORDER BY time DESC LIMIT {limit + 1}"
    )
    out = []
    for r in rows:
        kind = str(r.get("kind") or "")
        if kind not in _DETAIL:
            continue
        detail = {f: r.get(f) for f in _DETAIL[kind]}
        if r.get("area"):
            area = unescape_stored(str(r["area"]))
            out.append(_alarm(kind, int(r["time"]), f"area={area}", area=area, detail=detail))
        elif r.get("gateway"):
            gw = unescape_stored(str(r["gateway"]))
            out.append(_alarm(kind, int(r["time"]), f"gateway={gw}", gateway=gw, detail=detail))
    return out


async def _day_alarms(
    query: InfluxQuery, start_ms: int, end_ms: int, kinds: list[str], limit: int
) -> list[dict[str, Any]]:
    """Meter-days whose ``daily_tou`` row has invalid intervals or TOU-bucket mismatches."""
    cond = " OR ".join(f'"{"invalid" if k == "invalid_intervals" else k}" > 0' for k in kinds)
    rows = await query.rows(
        'SELECT "meter", "gateway", "day", "intervals", "estimated", "invalid", "tou_mismatch" '
        f'FROM "daily_tou" WHERE time >= {start_ms}ms AND time < {end_ms}ms AND ({cond}) '
        f"ORDER BY time DESC LIMIT {limit + 1}"
    )
    out = []
    for r in rows:
        if not r.get("meter") or not r.get("gateway"):
            continue
        meter, gw, ts = unescape_stored(str(r["meter"])), unescape_stored(str(r["gateway"])), int(r["time"])
        subject = f"meter={meter}\x1egateway={gw}"
        day = {"day": r.get("day"), "intervals": r.get("intervals"), "estimated": r.get("estimated")}
        if "invalid_intervals" in kinds and (r.get("invalid") or 0) > 0:
            detail = {**day, "invalid": r["invalid"]}
            out.append(_alarm("invalid_intervals", ts, subject, gateway=gw, meter=meter, detail=detail))
        if "tou_mismatch" in kinds and (r.get("tou_mismatch") or 0) > 0:
            detail = {**day, "tou_mismatch": r["tou_mismatch"]}
            out.append(_alarm("tou_mismatch", ts, subject, gateway=gw, meter=meter, detail=detail))
    return out


def _command_alarms(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for rec in records:
        cid, ts = rec.get("id"), rec.get("ts_ms")
        if not isinstance(cid, str) or isinstance(ts, bool) or not isinstance(ts, int):
            raise ValueError(
                f"failed_commands: a record needs 'id' (str) and 'ts_ms' (int), got {dict(rec)!r}"
            )
        gw, meter = rec.get("gateway"), rec.get("meter")
        detail = {k: v for k, v in rec.items() if k not in ("id", "ts_ms", "gateway", "meter")}
        out.append(
            _alarm(
                "command_failed",
                ts,
                f"command={cid}",
                gateway=gw,
                meter=meter,
                detail={"command": cid, **detail},
            )
        )
    return out


# -- acknowledgements ---------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS acks (
    alarm_id TEXT    NOT NULL PRIMARY KEY,
    by       TEXT    NOT NULL,
    note     TEXT    NOT NULL,
    ts_ms    INTEGER NOT NULL
) WITHOUT ROWID;
"""
MAX_ID_CHARS, MAX_BY_CHARS, MAX_NOTE_CHARS = 200, 200, 2000
_GET_CHUNK = 500  # ids per SELECT (below SQLite's bound on parameters)


class AlarmAcks:
    """Acknowledgements by alarm id in a SQLite file (module contract). Safe to share between
    threads (one connection behind a lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> AlarmAcks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def ack(self, alarm_id: str, by: str, note: str, now_ms: int) -> dict[str, Any]:
        """Acknowledge ``alarm_id``; returns the stored acknowledgement (``created``: this call
        made it; a repeat keeps the first one's ``by``, ``note`` and time).

        Raises: BadArgument for an empty or over-long id or ``by``, an over-long note."""
        _check_text("alarm_id", alarm_id, MAX_ID_CHARS, empty=False)
        _check_text("by", by, MAX_BY_CHARS, empty=False)
        _check_text("note", note, MAX_NOTE_CHARS, empty=True)
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO acks(alarm_id, by, note, ts_ms) VALUES (?,?,?,?)",
                (alarm_id, by, note, now_ms),
            )
            row = self._db.execute(
                "SELECT by, note, ts_ms FROM acks WHERE alarm_id = ?", (alarm_id,)
            ).fetchone()
        return {
            "alarm_id": alarm_id,
            "by": row[0],
            "note": row[1],
            "ts_ms": row[2],
            "created": cur.rowcount == 1,
        }

    def get(self, alarm_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The acknowledgements of those of ``alarm_ids`` that have one: ``{id: {by, note, ts_ms}}``."""
        out: dict[str, dict[str, Any]] = {}
        ids = list(dict.fromkeys(alarm_ids))
        with self._lock:
            for i in range(0, len(ids), _GET_CHUNK):
                chunk = ids[i : i + _GET_CHUNK]
                marks = ",".join("?" * len(chunk))
                for aid, by, note, ts in self._db.execute(
                    f"SELECT alarm_id, by, note, ts_ms FROM acks WHERE alarm_id IN ({marks})", chunk
                ):
                    out[aid] = {"by": by, "note": note, "ts_ms": ts}
        return out


def _check_text(param: str, value: str, max_chars: int, *, empty: bool) -> None:
    if not isinstance(value, str):
        raise BadArgument(param, "expected a string")
    if not value and not empty:
        raise BadArgument(param, "must not be empty")
    if len(value) > max_chars:
        raise BadArgument(param, f"at most {max_chars} characters")
