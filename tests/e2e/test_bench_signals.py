"""``amigw bench e2e`` stopped by SIGTERM or SIGINT closes its head-end: no server, ingest worker
or fee control of the run is left running, and the report says the run did not complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _programs_of(run_dir: Path) -> list[str]:
    """Command lines of the live processes that name the run directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(x for x in (entry / "status").read_text().splitlines() if x.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if str(run_dir) in argv and "zombie" not in state:
            found.append(argv)
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_closes_the_head_end(tmp_path: Path, sig: signal.Signals) -> None:
    run_dir = tmp_path / "run"
    argv = [
        sys.executable, "-m", "gateway.cli", "bench", "e2e", "--gateways", "2", "--meters", "8",
        "--hours", "1", "--speed", "1", "--workers", "2", "--run-dir", str(run_dir),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        assert proc.stderr is not None
        for line in proc.stderr:  # the run is under way once its gateways connect
            if "connecting 2 gateways" in line or time.monotonic() > deadline:
                break
        before = _programs_of(run_dir)
        # mosquitto, influxd, 2 workers, fee control (each names a file in the run directory)
        assert len(before) >= 5, before
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    assert f"stopped by {sig.name}" in out
    assert _programs_of(run_dir) == []
