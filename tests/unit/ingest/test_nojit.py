"""Run the kernel-vs-reference tests with NUMBA_DISABLE_JIT=1 so coverage sees kernel bodies (H7)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_kernels_match_reference_without_jit() -> None:
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1", "INGEST_EXAMPLES": "25"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        str(ROOT / "tests/unit/ingest/test_kernels_vs_reference.py"),
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
