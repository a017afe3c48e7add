"""Structured logging: one ``key=value`` line per event, set up once by the ``amigw`` entry point.

Call sites pass structured fields through ``extra={"kv": {...}}`` or just format ``key=value``
pairs into the message; :class:`KeyValueFormatter` renders both the same way,
``ts level logger "msg" k=v ...``: the text before the first ``key=`` of the message is the
message, each pair after it is a field (its value runs to the next `` key=``, quoted when it has
spaces). So every service started by ``amigw`` (edge, ingest and its workers, fee control) logs
one layout, and a dead-lettered payload or a bad frame can be found from its log line (STYLE H12).
"""

from __future__ import annotations

import logging
import re
import sys
import time

__all__ = ["KeyValueFormatter", "configure_logging", "kv", "split_pairs"]


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


_KEY = re.compile(r"(?:^|(?<=\s))([A-Za-z_][\w.]*)=")


def split_pairs(message: str) -> tuple[str, list[tuple[str, str]]]:
    """The text and the ``key=value`` pairs of a message::

    "command sent id=c-1 reason=no key" -> ("command sent", [("id", "c-1"), ("reason", "no key")])
    """
    keys = list(_KEY.finditer(message))
    if not keys:
        return message, []
    pairs = [
        (m.group(1), message[m.end() : nxt.start() if nxt else len(message)].rstrip())
        for m, nxt in zip(keys, [*keys[1:], None], strict=True)
    ]
    return message[: keys[0].start()].rstrip(), pairs


def kv(**fields: object) -> dict[str, dict[str, object]]:
    """``log.info("read failed", extra=kv(meter=m, bus=b))``"""
    return {"kv": fields}


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        text, pairs = split_pairs(record.getMessage())
        parts = [ts, record.levelname.lower(), record.name, _quote(text)]
        parts.extend(f"{k}={_quote(v)}" for k, v in pairs)
        fields = getattr(record, "kv", None)
        if isinstance(fields, dict):
            parts.extend(f"{k}={_quote(v)}" for k, v in fields.items())
        if record.exc_info:
            parts.append("exc=" + _quote(self.formatException(record.exc_info)))
        return " ".join(parts)


def configure_logging(level: str = "INFO") -> None:
    """Install the key/value formatter on the root logger (stderr). Idempotent."""
    root = logging.getLogger()
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    root.setLevel(numeric)
    for handler in root.handlers:
        if isinstance(handler.formatter, KeyValueFormatter):
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root.addHandler(handler)
