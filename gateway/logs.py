"""Structured logging: one ``key=value`` line per event, set up once by the ``amigw`` entry point.

Call sites pass structured fields through ``extra={"kv": {...}}`` or just format ``key=value``
pairs into the message; :class:`KeyValueFormatter` renders ``ts level logger msg k=v ...``
so that a dead-lettered payload or a bad frame can be found from its log line (STYLE H12).
"""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["KeyValueFormatter", "configure_logging", "kv"]


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def kv(**fields: object) -> dict[str, dict[str, object]]:
    """``log.info("read failed", extra=kv(meter=m, bus=b))``"""
    return {"kv": fields}


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [ts, record.levelname.lower(), record.name, _quote(record.getMessage())]
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
