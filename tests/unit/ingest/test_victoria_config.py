"""``[victoriametrics]``: validated at load with the bad key named, and the sink it selects."""

from __future__ import annotations

import pytest

from ingest.config import SAMPLE, parse_config
from ingest.sinks.configured import configured_sink
from ingest.sinks.influx.sink import InfluxSink
from ingest.sinks.victoria.sink import VictoriaSink
from protocols.errors import ConfigError


def with_section(body: str) -> str:
    return f"[victoriametrics]\n{body}\n"


def test_the_sample_keeps_influxdb_and_enabled_selects_the_victoria_sink() -> None:
    cfg = parse_config(SAMPLE)
    assert not cfg.victoriametrics.enabled and isinstance(configured_sink(cfg), InfluxSink)
    cfg = parse_config(
        with_section(
            'enabled = true\nurl = "http://vm:8428"\nread_url = "http://vmselect:8481/select/0/prometheus"'
        )
    )
    sink = configured_sink(cfg)
    assert isinstance(sink, VictoriaSink) and isinstance(sink.records, InfluxSink)
    assert cfg.victoriametrics.writes_to == "http://vm:8428"
    assert cfg.victoriametrics.reads_from == "http://vmselect:8481/select/0/prometheus"
    assert sink.writer.config.api == "v1" and sink.writer.config.database == "amigw"


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('enabled = true\nurl = "vm:8428"', "victoriametrics.url"),
        ('enabled = true\nurl = "http://vm:8428"\nwrite_url = "ftp://x"', "victoriametrics.write_url"),
        ('enabled = true\nurl = "http://vm:8428"\nread_url = "http://x/?a=1"', "victoriametrics.read_url"),
        ('enabled = "yes"\nurl = "http://vm:8428"', "victoriametrics.enabled"),
        ('enabled = true\nurl = "http://vm:8428"\nstore = "vm"', "victoriametrics.store"),
    ],
)
def test_a_bad_key_is_named(body: str, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(with_section(body))
    assert error.value.key_path == key
