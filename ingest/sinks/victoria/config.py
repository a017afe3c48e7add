"""The ``[victoriametrics]`` section: where the readings and intervals go when it is enabled.

:class:`VictoriaConfig` is validated at construction (``ValueError`` naming the key, which the
config loader turns into ``ConfigError("victoriametrics.<key>", ...)``). ``url`` serves a single
node for both directions; ``write_url`` / ``read_url`` override it for a cluster (vminsert's
``/insert/<account>/influx``, vmselect's ``/select/<account>/prometheus``).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from ingest.sinks.influx.http import SinkConfig

__all__ = ["VictoriaConfig"]


def _check_url(key: str, url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{key}: expected an http:// or https:// URL, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"{key}: a base URL takes no query or fragment, got {url!r}")


@dataclass(frozen=True, slots=True)
class VictoriaConfig:
    """``[victoriametrics]``. ``database``: the value of the ``db`` label every sample carries
    (VictoriaMetrics' ``-influxDBLabel``, sent as ``?db=``), so several pipelines can share a
    server. The batching keys mean what they mean in ``[influx]``."""

    enabled: bool = False
    url: str = "http://127.0.0.1:8428"
    write_url: str = ""
    read_url: str = ""
    database: str = "amigw"
    ca_file: str | None = None
    gzip: bool = True
    gzip_level: int = 1
    max_batch_lines: int = 5000
    max_batch_bytes: int = 4 * 1024 * 1024
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _check_url("url", self.url)
        for key in ("write_url", "read_url"):
            if getattr(self, key):
                _check_url(key, getattr(self, key))
        if not self.database:
            raise ValueError("database: the db label value cannot be empty")
        if self.max_batch_lines < 1 or self.max_batch_bytes < 1:
            raise ValueError("max_batch_lines: and max_batch_bytes must be positive")
        if not 0 <= self.gzip_level <= 9:
            raise ValueError(f"gzip_level: expected 0..9, got {self.gzip_level}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {self.timeout_s}")

    @property
    def writes_to(self) -> str:
        """The base URL writes go to (``<it>/write``)."""
        return (self.write_url or self.url).rstrip("/")

    @property
    def reads_from(self) -> str:
        """The base URL reads go to (``<it>/api/v1/export``)."""
        return (self.read_url or self.url).rstrip("/")

    def writer_config(self) -> SinkConfig:
        """The line-protocol writer's settings: VictoriaMetrics takes InfluxDB 1.x's ``/write``
        (``db`` becomes the label, ``precision=ms``)."""
        return SinkConfig(
            url=self.writes_to, api="v1", database=self.database, ca_file=self.ca_file,
            gzip=self.gzip, gzip_level=self.gzip_level, max_batch_lines=self.max_batch_lines,
            max_batch_bytes=self.max_batch_bytes, timeout_s=self.timeout_s,
        )  # fmt: skip
