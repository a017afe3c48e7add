"""The demo's guards: a missing extra is named before anything starts, a dead child stops it."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

from simulators import demo


def test_an_edge_only_install_is_told_which_extra_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("numpy", "numba") else real(name, *a)
    )
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    code = demo.run(parser.parse_args([]))
    err = capsys.readouterr().err
    assert code == 2
    assert "numpy (amigw[ingest])" in err and "numba (amigw[ingest])" in err, err
    assert "install amigw[all]" in err


def test_nothing_is_missing_here() -> None:
    assert demo.missing_extras() == []


def test_a_child_that_exits_stops_the_demo_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "ingest.log"
    log.write_text("starting\namigw ingest: needs the 'numpy' package; install amigw[ingest]\n")
    with ExitStack() as stack:
        children = demo._Children(stack)
        proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
        children.add("ingest", proc, log)
        proc.wait(30)
        with pytest.raises(demo.DemoError) as info:
            children.check()
    text = str(info.value)
    assert "ingest exited with code 2" in text
    assert "install amigw[ingest]" in text


def test_a_running_child_passes_the_check(tmp_path: Path) -> None:
    with ExitStack() as stack:
        children = demo._Children(stack)
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        children.add("edge", proc, tmp_path / "edge.log")
        children.check()  # still running: no error
    assert proc.poll() is not None  # the stack stopped it
