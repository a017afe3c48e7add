"""The README's first command runs `amigw demo`: it must tell its whole story on this machine."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[2]


def test_demo_tells_the_whole_story(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--meters", "3", "--duration-s", "30", "--interval-s", "2",
         "--workdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )  # fmt: skip
    text = out.stdout
    assert out.returncode == 0, text[-4000:] + out.stderr[-3000:]
    # ingest and fee control subscribed before the meters and the edge started
    assert text.index("ingest subscribed after") < text.index("DL/T 645-2007 on a pseudo-terminal"), text
    assert text.index("payments API at") < text.index("5/6 edge agent"), text
    # the prepaid account: low-balance notices, a trip by fee control read at the meter, a payment
    # through the API, a restore read at the meter
    for kind in ("ALARM1", "ZERO_NOTICE", "TRIP_ISSUED", "RESTORE_ISSUED"):
        assert f"notification to acc-demo: {kind}" in text, (kind, text)
    assert "fee control tripped meter 000000000003 (relay read at the meter: open)" in text, text
    assert re.search(r"payment recorded: balance \d+ fen; fee control decided: .*RESTORE_ISSUED", text), text
    assert "supply restored: meter 000000000003's relay is closed again" in text, text
    # the meter that stopped answering: its gap estimated
    assert re.search(
        r"estimation filled it: \d+ intervals of meter 000000000001 flagged GAP_BEFORE\+ESTIMATED", text
    )
    rows = re.findall(r"^\s+(\d{12}|sdm630-1)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+(\d+)$", text, re.M)
    assert [r[0] for r in rows] == ["000000000001", "000000000002", "000000000003", "sdm630-1"], text
    assert all(int(readings) >= 5 and int(intervals) >= 3 for _, _, readings, intervals, _ in rows), rows
    assert int(rows[0][4]) >= 1 and int(rows[1][4]) == 0, rows  # estimated: only the faulty meter
    # the ledger agrees with InfluxDB, and nothing was lost
    charged = re.search(r"([\d.]+) kWh charged = ([\d.]+) kWh of meter 000000000003's intervals", text)
    assert charged is not None and charged.group(1) == charged.group(2) and float(charged.group(1)) > 0, text
    assert "ingest's loss account: 0 batches missing" in text, text
