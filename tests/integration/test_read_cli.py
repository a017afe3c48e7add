"""``amigw read`` end to end: the real command in a subprocess against running simulators.

The simulators run in this test's event loop (so faults can be injected), the command in its own
process on the simulator's pseudo-terminal or TCP port.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator

import pytest

from protocols.dlt645 import ErrorBits
from simulators.dlt645_sim import Dlt645Simulator
from simulators.modbus_sim import ModbusSimulator
from simulators.servers import free_port

pytestmark = pytest.mark.integration

A1 = "000000000001"


async def amigw(*args: str, timeout_s: float = 30.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "read",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def dlt645_pty() -> AsyncIterator[tuple[Dlt645Simulator, str]]:
    sim = Dlt645Simulator([A1], load_kw=2.0)
    sim.meter(A1).set_energy(1_234_567)
    path = await sim.serve_pty()
    yield sim, path
    await sim.aclose()


async def test_quantities_print_with_units(dlt645_pty: tuple[Dlt645Simulator, str]) -> None:
    _, path = dlt645_pty
    rc, out, err = await amigw(
        "--port",
        path,
        "--address",
        A1,
        "--quantity",
        "energy_fwd_active_total",
        "--quantity",
        "voltage_a",
        "--quantity",
        "relay_state",
    )
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("energy_fwd_active_total = 12345.6") and lines[0].endswith(" kWh")
    assert lines[1:] == ["voltage_a = 220.0 V", "relay_state = 0"]


async def test_json_lines_for_quantities_and_raw_dis(dlt645_pty: tuple[Dlt645Simulator, str]) -> None:
    _, path = dlt645_pty
    rc, out, err = await amigw(
        "--port",
        path,
        "--address",
        A1,
        "--json",
        "--quantity",
        "voltage_a",
        "--di",
        "02800002",
        "--di",
        "04000503",
    )
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows == [
        {"meter": A1, "quantity": "voltage_a", "value": "220.0", "unit": "V"},
        {"meter": A1, "di": "02800002", "value": "50.00", "unit": "Hz"},
        {"meter": A1, "di": "04000503", "value": "0", "unit": ""},
    ]


async def test_discover_finds_the_lone_meter_over_tcp() -> None:
    sim = Dlt645Simulator(["123456789012"])
    port = await sim.serve_tcp()
    try:
        rc, out, err = await amigw("--port", f"tcp://127.0.0.1:{port}", "--discover", "--json")
        assert rc == 0, err
        assert json.loads(out) == {
            "meter": "123456789012",
            "quantity": "address",
            "value": "123456789012",
            "unit": "",
        }
    finally:
        await sim.aclose()


async def test_wire_errors_are_named_and_exit_1(dlt645_pty: tuple[Dlt645Simulator, str]) -> None:
    sim, path = dlt645_pty
    rc, _, err = await amigw(
        "--port", path, "--address", "000000000009", "--quantity", "voltage_a", "--timeout", "0.3"
    )
    assert rc == 1 and "timeout" in err and "000000000009" in err
    sim.meter(A1).inject("bad_checksum")
    rc, _, err = await amigw("--port", path, "--address", A1, "--di", "02010100", "--timeout", "0.3")
    assert rc == 1 and "ChecksumError" in err and "raw=68 01 00 00 00 00 00 68 91" in err
    sim.meter(A1).clear_faults()
    sim.meter(A1).inject("error_reply", dis=[0x02800002], error=int(ErrorBits.NO_DATA | ErrorBits.OTHER))
    rc, out, err = await amigw(
        "--port", path, "--address", A1, "--json", "--quantity", "voltage_a", "--quantity", "frequency"
    )
    assert rc == 1 and "no requested data" in err and "other error" in err
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0]["value"] == "220.0" and rows[1]["error_code"] == 0x03


async def test_usage_errors_exit_2(dlt645_pty: tuple[Dlt645Simulator, str]) -> None:
    _, path = dlt645_pty
    assert (await amigw("--port", path, "--quantity", "voltage_a"))[0] == 2  # no address
    assert (await amigw("--port", path, "--address", A1, "--quantity", "no_such_thing"))[0] == 2
    assert (await amigw("--port", path, "--address", A1))[0] == 2  # nothing to read


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--address", "00000000000X", "--quantity", "voltage_a"], "--address"),
        (["--address", "1234567890123", "--quantity", "voltage_a"], "--address"),
        (["--address", A1, "--di", "0001000G"], "--di '0001000G'"),
        (["--address", A1, "--di", "100000000"], "is 8 hex digits"),
        (["--address", A1, "--di", "0x10"], "is 8 hex digits"),
        (["--protocol", "dlt645-1997", "--address", A1, "--di", "00010000"], "is 4 hex digits"),
        (["--address", A1, "--quantity", "no_such_thing"], "--quantity"),
        (["--protocol", "dlt645-1997", "--address", A1, "--quantity", "current_n"], "1997 data identifier"),
        (["--protocol", "modbus", "--unit", "0", "--register", "0"], "--unit 0"),
        (["--protocol", "modbus", "--unit", "300", "--register", "0"], "--unit 300"),
        (["--protocol", "modbus", "--unit", "1", "--model", "nope", "--quantity", "voltage_a"], "--model"),
        (
            [
                "--protocol",
                "modbus",
                "--unit",
                "1",
                "--model",
                "ddsu666",
                "--quantity",
                "energy_fwd_active_t1",
            ],
            "model ddsu666 has no register",
        ),
        (["--protocol", "modbus", "--unit", "1", "--register", "0xZZ"], "--register '0xZZ'"),
        (["--protocol", "modbus", "--unit", "1", "--register", "70000"], "--register '70000'"),
        (["--protocol", "modbus", "--unit", "1", "--register", "0:int16", "--probe-order"], "32-bit"),
        (["--protocol", "modbus", "--discover", "--units", "5-x"], "--units '5-x'"),
        (["--protocol", "modbus", "--discover", "--units", "0-300"], "--units '0-300'"),
        (["--protocol", "modbus", "--unit", "1", "--probe-order"], "--probe-order: needs a --register"),
        (["--protocol", "modbus", "--register", "0"], "--register: needs the unit"),
        (["--di", "00010000"], "--di: needs the meter: --address"),
        (["--address", A1], "nothing to read: give --quantity, --discover, --di"),
        # a raw option is its protocol's own: refused for another
        (
            ["--protocol", "modbus", "--unit", "1", "--di", "00010000"],
            "--di is a DL/T 645 option, not one of modbus",
        ),
        (["--address", A1, "--register", "0"], "--register is a Modbus option, not one of dlt645-2007"),
        (["--address", A1, "--di", "00010000", "--units", "1-3"], "--units is a Modbus option"),
    ],
)
@pytest.mark.parametrize("port", ["/dev/ttyUSB-missing", "tcp"])
async def test_bad_options_exit_2_before_the_port_is_opened(args: list[str], message: str, port: str) -> None:
    # Nothing is at either port: opening it would fail with exit 1 ("cannot open" / "connect ...
    # failed"), so exit 2 with the option's message shows the port was never opened.
    where = port if port.startswith("/") else f"tcp://127.0.0.1:{free_port()}"
    rc, _, err = await amigw("--port", where, *args)
    assert (rc, "cannot open" in err, "failed" in err) == (2, False, False), err
    assert message in err, err


@pytest.fixture
async def modbus_tcp() -> AsyncIterator[str]:
    async with ModbusSimulator("sdm630", unit=1) as sim:
        yield f"tcp://127.0.0.1:{sim.port}"


async def test_modbus_quantities_and_probe_order(modbus_tcp: str) -> None:
    rc, out, err = await amigw(
        "--protocol",
        "modbus",
        "--port",
        modbus_tcp,
        "--unit",
        "1",
        "--model",
        "sdm630",
        "--quantity",
        "voltage_a",
        "--quantity",
        "energy_fwd_active_total",
    )
    assert rc == 0, err
    assert out.splitlines() == ["voltage_a = 230.1 V", "energy_fwd_active_total = 12345.67 kWh"]
    rc, out, err = await amigw(
        "--protocol",
        "modbus",
        "--port",
        modbus_tcp,
        "--unit",
        "1",
        "--register",
        "0x0000:float32",
        "--probe-order",
    )
    assert rc == 0, err
    marked = [line for line in out.splitlines() if "<- plausible" in line]
    assert len(marked) == 1 and marked[0].strip().startswith("ABCD = 230.1")


async def test_modbus_discover_scans_unit_ids(modbus_tcp: str) -> None:
    rc, out, err = await amigw(
        "--protocol",
        "modbus",
        "--port",
        modbus_tcp,
        "--discover",
        "--units",
        "1-3",
        "--timeout",
        "0.3",
        "--json",
    )
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    # unit 1 answers normally; pymodbus' simulator server answers unknown ids with exception 4
    # (instead of staying silent), which the scan reports as "answers with an exception"
    assert rows[0] == {"meter": "1", "quantity": "unit", "value": "1", "unit": ""}
    assert all(row.get("exception") == 4 for row in rows[1:])


async def test_modbus_exceptions_are_reported_by_code_and_name() -> None:
    async with ModbusSimulator("sdm630", unit=1) as sim:
        sim.set_fault("exception", code=2, quantity="frequency")
        port = f"tcp://127.0.0.1:{sim.port}"
        rc, out, err = await amigw(
            "--protocol", "modbus", "--port", port, "--unit", "1", "--model", "sdm630", "--json",
            "--quantity", "voltage_a", "--quantity", "frequency",
        )  # fmt: skip
        assert rc == 1, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert rows[0]["value"] == "230.1"
        assert rows[1]["quantity"] == "frequency" and rows[1]["error_code"] == 2
        assert "0x02: illegal_data_address" in rows[1]["error"] and "illegal_data_address" in err
        sim.set_fault("exception", code=3)  # every read refused, the raw register path too
        rc, out, err = await amigw(
            "--protocol", "modbus", "--port", port, "--unit", "1", "--json",
            "--register", "0x0000:float32", "--register", "0x0006:float32",
        )  # fmt: skip
        assert rc == 1, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert [r["error_code"] for r in rows] == [3, 3], rows
        assert all("illegal_data_value" in r["error"] for r in rows)
