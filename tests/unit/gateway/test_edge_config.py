"""Edge config: the sample loads; every error names its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import SAMPLE, load_config, parse_config
from protocols import ConfigError


def test_sample_loads_and_has_defaults() -> None:
    cfg = parse_config(SAMPLE)
    assert cfg.gateway_id == "gw-1"
    assert cfg.buses[0].baud == 2400 and cfg.buses[0].kind == "serial"
    assert cfg.meters[0].plans == ("registers", "instant")
    assert {p.name: p.interval_s for p in cfg.plans} == {"registers": 900, "instant": 60}
    assert cfg.outbox.policy == "shed_by_kind"
    assert (cfg.outbox.confirm, cfg.outbox.ack_timeout_s) == ("head-end", 60.0)
    assert cfg.mqtt.payload_version == 1  # v2 only once every ingest reads it


def test_payload_version_2_is_accepted() -> None:
    cfg = parse_config(_with("payload_version = 1", "payload_version = 2"))
    assert cfg.mqtt.payload_version == 2


def _with(replace: str, by: str) -> str:
    assert replace in SAMPLE
    return SAMPLE.replace(replace, by, 1)


def _modbus(model: str, plans: str) -> str:
    """The sample with its meter made a Modbus meter of ``model`` following ``plans``."""
    return (
        _with('protocol = "dlt645-2007"\n', 'protocol = "modbus"\n')
        .replace('address = "000012345678"\n', f'address = "3"\nmodel = "{model}"\n', 1)
        .replace('plans = ["registers", "instant"]', f"plans = {plans}", 1)
    )


def test_a_modbus_meter_whose_model_has_every_planned_quantity_loads() -> None:
    cfg = parse_config(_modbus("sdm630", '["instant"]'))
    assert cfg.meters[0].model == "sdm630"


@pytest.mark.parametrize(
    ("text", "key_path", "reason"),
    [
        (_with("baud = 2400", "baud = 2401"), "buses[0].baud", "not a standard rate"),
        (_with("baud = 2400", 'baud = "fast"'), "buses[0].baud", "expected int, got str 'fast'"),
        (_with('bus = "rs485-1"', 'bus = "rs485-9"'), "meters[0].bus", "no bus named 'rs485-9'"),
        (_with('address = "000012345678"', 'address = "12345"'), "meters[0].address", "12 digits"),
        (
            _with('plans = ["registers", "instant"]', 'plans = ["hourly"]'),
            "meters[0].plans[0]",
            "no plan named",
        ),
        (
            _with('"voltage_a", "current_a"', '"voltage_x", "current_a"'),
            "plans[1].quantities",
            "unknown quantity 'voltage_x'",
        ),
        (_with("interval_s = 900", "interval_s = 7"), "plans[0].interval_s", "must divide a day"),
        (_with('url = "mqtt://127.0.0.1:1883"', 'url = "http://x"'), "mqtt.url", "expected mqtt://"),
        (_with("max_inflight = 256", "max_inflight = 70000"), "outbox.max_inflight", "16-bit"),
        (_with('confirm = "head-end"', 'confirm = "ingest"'), "outbox.confirm", "expected one of"),
        (_with("ack_timeout_s = 60.0", "ack_timeout_s = 0"), "outbox.ack_timeout_s", "0.1..86400"),
        (_with("resend_max_s = 600.0", "resend_max_s = 0"), "outbox.resend_max_s", "0.1..86400"),
        (_with("keepalive_s = 30", "keepalive_s = 30\nkeep_alive = 3"), "mqtt.keep_alive", "unknown key"),
        (_with("payload_version = 1", "payload_version = 3"), "mqtt.payload_version", "expected one of 1, 2"),
        (_with("payload_version = 1", 'payload_version = "2"'), "mqtt.payload_version", "expected one of"),
        (_with("payload_version = 1", "payload_version = true"), "mqtt.payload_version", "expected one of"),
        (_with('command_key_file = "/etc/amigw/gw-1.key"', ""), "command_key_file", "required"),
        (_with('gateway_id = "gw-1"', 'gateway_id = "agg"'), "gateway_id", "reserved topic level"),
        (_with('gateway_id = "gw-1"', 'gateway_id = "Down"'), "gateway_id", "reserved topic level"),
        (
            _with('protocol = "dlt645-2007"', 'protocol = "dlt645-1997"').replace(
                '["voltage_a", "current_a"', '["current_n", "current_a"'
            ),
            "meters[0].plans[1]",
            "plan 'instant': no DL/T 645-1997 data identifier for quantity 'current_n'",
        ),
        (
            _modbus("sdm120", '["registers", "instant"]'),
            "meters[0].plans[0]",
            "plan 'registers': model sdm120 has no register for 'energy_fwd_active_t1'",
        ),
        (_modbus("sdm999", '["instant"]'), "meters[0].model", "no register map for 'sdm999'"),
    ],
)
def test_errors_name_the_key(text: str, key_path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert err.value.key_path == key_path
    assert reason in err.value.reason


def test_duplicate_meter_ids(tmp_path: Path) -> None:
    meter = SAMPLE[SAMPLE.index("\n[[meters]]") : SAMPLE.index("# Read plans")]
    with pytest.raises(ConfigError, match=r"meters\[1\].id: duplicate"):
        parse_config(SAMPLE + "\n" + meter)


def test_key_file(tmp_path: Path) -> None:
    key = tmp_path / "gw.key"
    key.write_text("00" * 32 + "\n")
    cfg = parse_config(_with('"/etc/amigw/gw-1.key"', f'"{key}"'))
    assert cfg.key_bytes() == bytes(32)
    key.write_text("zz")
    with pytest.raises(ConfigError, match="command_key_file"):
        cfg.key_bytes()


def test_cli_sample_and_check(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "config", "sample"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout == SAMPLE
    good = tmp_path / "edge.toml"
    good.write_text(SAMPLE)
    assert load_config(good).gateway_id == "gw-1"
    bad = tmp_path / "bad.toml"
    bad.write_text(_with("baud = 2400", "baud = 3"))
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "config", "check", str(bad)], capture_output=True, text=True
    )
    assert out.returncode == 2 and "buses[0].baud" in out.stderr


def test_edge_check_config_cli(tmp_path: Path) -> None:
    key = tmp_path / "gw.key"
    key.write_text("ab" * 16)
    good = tmp_path / "edge.toml"
    good.write_text(_with('"/etc/amigw/gw-1.key"', f'"{key}"'))
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "edge", "--config", str(good), "--check-config"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "1 buses, 1 meters" in out.stdout
    missing_key = tmp_path / "nokey.toml"
    missing_key.write_text(SAMPLE)  # names /etc/amigw/gw-1.key, which does not exist here
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "edge", "--config", str(missing_key), "--check-config"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "command_key_file" in out.stderr


def test_check_config_catches_a_quantity_the_modbus_model_lacks(tmp_path: Path) -> None:
    key = tmp_path / "gw.key"
    key.write_text("ab" * 16)
    bad = tmp_path / "edge.toml"
    bad.write_text(_modbus("ddsu666", '["registers"]').replace('"/etc/amigw/gw-1.key"', f'"{key}"'))
    for argv in (["edge", "--config", str(bad), "--check-config"], ["config", "check", str(bad)]):
        out = subprocess.run([sys.executable, "-m", "gateway.cli", *argv], capture_output=True, text=True)
        assert out.returncode == 2, out
        assert "meters[0].plans[0]: plan 'registers': model ddsu666 has no register" in out.stderr
