"""``amigw ingest --workers N``'s supervisor (``ingest.cli._supervise``) and its signals, with
stand-in workers (no MQTT, no InfluxDB): SIGHUP is passed on to every worker and does not end the
supervisor; SIGTERM ends the workers and then the supervisor with exit code 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]

# A stand-in worker: notes every SIGHUP in hup-<i>, exits 0 on SIGTERM; ready-<i> holds its pid
# once both handlers are installed.
STAND_IN = """
import os, signal, sys, time
from pathlib import Path
d, i = Path(sys.argv[1]), sys.argv[2]
def hup(_sig, _frame):
    with open(d / f"hup-{i}", "a") as f:
        f.write("hup\\n")
signal.signal(signal.SIGHUP, hup)
signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(0))
(d / f"ready-{i}.tmp").write_text(str(os.getpid()))
os.replace(d / f"ready-{i}.tmp", d / f"ready-{i}")
while True:
    time.sleep(0.05)
"""

SUPERVISOR = """
import sys
from pathlib import Path
import ingest.cli as cli
d = sys.argv[1]
cli._worker_argv = lambda config, index: [sys.executable, "-c", sys.argv[2], d, str(index)]
sys.exit(cli._supervise(Path("unused.toml"), 2))
"""


def wait_until(pred: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sighup_reaches_every_worker_and_sigterm_ends_the_supervisor_with_0(tmp_path: Path) -> None:
    sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path), STAND_IN], cwd=ROOT)
    pids: list[int] = []
    try:
        wait_until(lambda: all((tmp_path / f"ready-{i}").exists() for i in (0, 1)))
        pids = [int((tmp_path / f"ready-{i}").read_text()) for i in (0, 1)]
        sup.send_signal(signal.SIGHUP)
        wait_until(lambda: all((tmp_path / f"hup-{i}").exists() for i in (0, 1)) or sup.poll() is not None)
        assert sup.poll() is None, f"the supervisor died of SIGHUP: rc={sup.returncode}"
        assert [(tmp_path / f"hup-{i}").read_text() for i in (0, 1)] == ["hup\n", "hup\n"]
        time.sleep(0.5)  # a worker killed by the signal would be restarted: same pids, still running
        assert sup.poll() is None
        assert [int((tmp_path / f"ready-{i}").read_text()) for i in (0, 1)] == pids
        assert all(alive(p) for p in pids)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=20) == 0
        assert not any(alive(p) for p in pids)  # the supervisor waited for (and reaped) them
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
