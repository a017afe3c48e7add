"""The key=value log layout's fields (``gateway.logs.KeyValueFormatter``, installed by ``amigw``;
``ingest`` may not import ``gateway``): ``log.info("command sent", extra=kv(id=..., meter=...))``."""

from __future__ import annotations

__all__ = ["kv"]


def kv(**fields: object) -> dict[str, dict[str, object]]:
    return {"kv": fields}
