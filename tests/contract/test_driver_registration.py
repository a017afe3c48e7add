"""A protocol added without touching ``gateway/``: a toy driver registered from the test is
validated by the edge config, polled by the edge agent (its batches arriving on the real
mosquitto broker) and read by ``amigw read`` -- the gateway asks the driver, never the name."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.base import DRIVERS
from gateway.agent import EdgeAgent
from gateway.cli import main
from gateway.config import parse_config
from protocols.errors import ConfigError
from protocols.payload import decode
from protocols.quantities import by_name
from tests.contract.toy_driver import PROTOCOL, ToyMeters
from tests.e2e.edge_helpers import MqttRecorder, edge_toml

pytestmark = pytest.mark.integration

VOLTAGE, ENERGY = by_name("voltage_a"), by_name("energy_fwd_active_total")


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Iterator[ToyMeters]:
    monkeypatch.setitem(DRIVERS, PROTOCOL, ("tests.contract.toy_driver", "ToyDriver"))
    meters = ToyMeters({"7": {VOLTAGE.code: 2301, ENERGY.code: 1234567}})
    yield meters
    meters.close()


def _config(tmp: Path, url: str, port: int, *, address: str = "7", plan: str = "voltage_a") -> str:
    return edge_toml(
        str(tmp),
        "gw-toy",
        url,
        f'[[buses]]\nname = "line"\nport = "tcp://127.0.0.1:{port}"\nbaud = 9600\n',
        f'[[meters]]\nid = "toy-7"\nbus = "line"\nprotocol = "{PROTOCOL}"\naddress = "{address}"\nplans = ["fast"]\n',
        f'[[plans]]\nname = "fast"\nquantities = ["{plan}", "energy_fwd_active_total"]\ninterval_s = 1\n',
    )


def test_the_edge_config_asks_the_registered_driver(toy: ToyMeters, tmp_path: Path) -> None:
    url = "mqtt://127.0.0.1:1883"
    assert parse_config(_config(tmp_path, url, toy.port)).meters[0].protocol == PROTOCOL
    with pytest.raises(ConfigError) as err:
        parse_config(_config(tmp_path, url, toy.port, address="x7"))
    assert (err.value.key_path, err.value.reason) == (
        "meters[0].address",
        "a toy address is digits, got 'x7'",
    )
    with pytest.raises(ConfigError) as err:
        parse_config(_config(tmp_path, url, toy.port, plan="frequency"))
    assert err.value.key_path == "meters[0].plans[0]" and "no quantity 'frequency'" in err.value.reason
    modbus_tcp = _config(tmp_path, url, toy.port).replace("tcp://", "modbus-tcp://")
    with pytest.raises(ConfigError, match="a toy meter runs over a serial server"):
        parse_config(modbus_tcp)


async def test_the_edge_agent_polls_a_registered_protocol(toy: ToyMeters, mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rec = MqttRecorder(mosquitto.host, mosquitto.port, ["ami/v1/gw-toy/#"], client_id="rec-toy")
    try:
        agent = EdgeAgent(parse_config(_config(tmp_path, mosquitto.url, toy.port)), status_interval_s=0.5)
        task = asyncio.create_task(agent.run())
        await asyncio.to_thread(rec.wait_for, lambda: len(rec.snapshot("/up/readings")) >= 2, 30)
        agent.stop()
        await asyncio.wait_for(task, 10)
        batch = decode(rec.snapshot("/up/readings")[0])
        assert batch.meters == ("toy-7",)
        assert dict(zip(batch.quantity, batch.value, strict=True)) == {
            VOLTAGE.code: 2301,
            ENERGY.code: 1234567,
        }
    finally:
        rec.close()


def test_amigw_read_reads_a_registered_protocol(toy: ToyMeters, capsys: pytest.CaptureFixture[str]) -> None:
    port = f"tcp://127.0.0.1:{toy.port}"
    argv = ["read", "--protocol", PROTOCOL, "--port", port, "--address", "7", "--quantity", "voltage_a"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == ["voltage_a = 230.1 V"]
    assert (
        main(["read", "--protocol", PROTOCOL, "--port", port, "--address", "x", "--quantity", "voltage_a"])
        == 2
    )
    assert "--address: a toy address is digits" in capsys.readouterr().err
    assert main(["read", "--protocol", PROTOCOL, "--port", port, "--address", "8", "--timeout", "0.2",
                 "--retries", "0", "--quantity", "voltage_a"]) == 1  # fmt: skip
    assert "timeout" in capsys.readouterr().err


def test_amigw_read_takes_the_raw_options_the_driver_declares(
    toy: ToyMeters, capsys: pytest.CaptureFixture[str]
) -> None:
    port = f"tcp://127.0.0.1:{toy.port}"
    argv = ["read", "--protocol", PROTOCOL, "--port", port, "--address", "7", "--json"]
    assert main([*argv, "--toy-code", str(VOLTAGE.code), "--toy-code", "99"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [
        {"meter": "7", "code": str(VOLTAGE.code), "value": "2301", "unit": ""},
        {"meter": "7", "code": "99", "value": "refused", "unit": ""},
    ]
    assert main(["read", "--protocol", PROTOCOL, "--port", port, "--toy-code", "1"]) == 2
    assert "--toy-code: needs the meter: --address" in capsys.readouterr().err
    # each protocol's raw options are refused for the others, before the port is opened
    assert main([*argv, "--di", "00010000"]) == 2
    assert "--di is a DL/T 645 option, not one of toy" in capsys.readouterr().err
    assert main(["read", "--port", port, "--address", "000000000001", "--toy-code", "1"]) == 2
    assert "--toy-code is a toy option, not one of dlt645-2007" in capsys.readouterr().err
