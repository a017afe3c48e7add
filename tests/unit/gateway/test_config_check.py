"""``amigw config check FILE`` is each service's own ``--check-config``, the kind told by the keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import SAMPLE
from simulators.servers import Influxd, free_port

EDGE_MODBUS_WITHOUT_THE_REGISTER = (
    SAMPLE.replace('protocol = "dlt645-2007"\n', 'protocol = "modbus"\n', 1)
    .replace('address = "000012345678"\n', 'address = "3"\nmodel = "ddsu666"\n', 1)
    .replace('plans = ["registers", "instant"]', 'plans = ["registers"]', 1)
)


def _amigw(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *argv], capture_output=True, text=True, timeout=120
    )


def _ingest_sample() -> str:
    out = _amigw("config", "sample", "ingest")
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize(
    ("kind", "text", "returncode"),
    [
        ("edge", "KEYED_SAMPLE", 0),
        ("edge", EDGE_MODBUS_WITHOUT_THE_REGISTER, 2),
        ("edge", SAMPLE.replace('gateway_id = "gw-1"', 'gateway_id = "agg"'), 2),
        ("ingest", "[influx]\nurl = 3\n", 2),
        ("feectl", "[feectl]\n[service]\ndb_path = 5\n", 2),
    ],
)
def test_config_check_agrees_with_the_services_own_check(
    tmp_path: Path, kind: str, text: str, returncode: int
) -> None:
    key = tmp_path / "gw.key"
    key.write_text("ab" * 16)
    if text == "KEYED_SAMPLE":
        text = SAMPLE
    text = text.replace('"/etc/amigw/gw-1.key"', f'"{key}"')
    path = tmp_path / "service.toml"
    path.write_text(text)
    own = _amigw(kind, "--config", str(path), "--check-config")
    check = _amigw("config", "check", str(path))
    assert own.returncode == returncode, own.stderr
    assert (check.returncode, check.stdout, check.stderr) == (own.returncode, own.stdout, own.stderr)


@pytest.mark.parametrize(
    ("server", "returncode", "says"),
    [
        ("database", 0, "accepts writes"),
        ("no-database", 2, "influx.database"),
        ("unreachable", 1, "unreachable"),
    ],
)
def test_the_ingest_check_probes_influxdb_and_both_checks_agree(
    tmp_path: Path, influx_db: tuple[Influxd, str], server: str, returncode: int, says: str
) -> None:
    """The shipped sample, pointed at a real influxd: ok with the database there, a ConfigError
    naming the key when it is missing (exit 2), exit 1 when nothing listens at the url."""
    influxd, database = influx_db
    url = influxd.url if server != "unreachable" else f"http://127.0.0.1:{free_port()}"
    text = _ingest_sample().replace('url = "http://127.0.0.1:8086"', f'url = "{url}"', 1)
    if server != "no-database":
        text = text.replace('database = "amigw"', f'database = "{database}"', 1)
    path = tmp_path / "ingest.toml"
    path.write_text(text)
    own = _amigw("ingest", "--config", str(path), "--check-config")
    check = _amigw("config", "check", str(path))
    assert own.returncode == returncode, own.stderr
    assert says in own.stdout + own.stderr
    assert (check.returncode, check.stdout, _untimed(check.stderr)) == (
        own.returncode,
        own.stdout,
        _untimed(own.stderr),
    )


def _untimed(log: str) -> str:
    """Log lines without their leading timestamp."""
    return "\n".join(line.partition(" ")[2] for line in log.splitlines())


def test_the_kind_can_be_named_and_an_undecidable_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(SAMPLE)
    named = _amigw("config", "check", str(path), "--kind", "ingest")
    assert named.returncode == 2 and "amigw ingest: configuration error" in named.stderr
    bare = tmp_path / "mqtt-only.toml"
    bare.write_text('[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n')
    out = _amigw("config", "check", str(bare))
    assert out.returncode == 2 and "name it with --kind" in out.stderr
    both = tmp_path / "both.toml"
    both.write_text('gateway_id = "gw-1"\n[influx]\nurl = "http://x"\n')
    out = _amigw("config", "check", str(both))
    assert out.returncode == 2 and "edge and ingest" in out.stderr
