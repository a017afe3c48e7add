"""The amigw entry point: --help lists the subcommands, --version, clear errors."""

from __future__ import annotations

import subprocess
import sys

from gateway.cli import SUBCOMMANDS


def _amigw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_help_lists_every_subcommand() -> None:
    out = _amigw("--help")
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert f"  {name} " in out.stdout


def test_version() -> None:
    out = _amigw("--version")
    assert out.returncode == 0 and out.stdout.startswith("amigw ")


def test_unknown_subcommand_is_a_usage_error() -> None:
    out = _amigw("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr
