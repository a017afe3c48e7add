"""The README's first command runs `amigw demo`: it must work end to end on this machine."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "demo",
            "--meters",
            "3",
            "--duration-s",
            "30",
            "--interval-s",
            "2",
            "--workdir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "trip: done (relay read back: open)" in text, text
    assert "close-allowed: done (relay read back: closed)" in text, text
    rows = re.findall(r"^\s+(\d{12})\s+([\d.]+)\s+(\d+)\s+(\d+)$", text, re.M)
    assert len(rows) == 3, text
    assert all(int(readings) >= 5 for _, _, readings, _ in rows), rows
    assert all(int(intervals) >= 3 for _, _, _, intervals in rows), (
        rows
    )  # validated intervals reached InfluxDB
    assert "ingest's loss account: 0 batches missing" in text, text
    # ingest subscribed before the meters and the edge started: nothing published is missed
    assert text.index("ingest subscribed after") < text.index("simulated DL/T 645-2007 meters"), text
