"""Layout and import rules (STYLE H1), tested rather than just written."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EDGE_PACKAGES = ("protocols", "drivers", "gateway")
HEAVY = ("numpy", "numba", "influxdb_client")


def _modules(package: str) -> list[str]:
    pkg_dir = ROOT / package
    names = [package]
    for info in pkgutil.walk_packages([str(pkg_dir)], package + "."):
        names.append(info.name)
    return names


def test_fixed_top_level_layout() -> None:
    for name in (
        "gateway",
        "drivers",
        "protocols",
        "ingest",
        "simulators",
        "tests",
        "pyproject.toml",
        "README.md",
    ):
        assert (ROOT / name).exists(), name


def test_edge_packages_import_no_numpy_numba_or_influxdb_client() -> None:
    mods = [m for p in EDGE_PACKAGES for m in _modules(p)]
    assert len(mods) > 5
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        f"print(sorted(n for n in {HEAVY!r} if n in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


FORBIDDEN_IN_PROTOCOLS = {
    "asyncio",
    "socket",
    "serial",
    "numpy",
    "numba",
    "logging",
    "paho",
    "aiomqtt",
    "pymodbus",
    "influxdb_client",
    "threading",
    "subprocess",
}


def test_protocols_are_sans_io() -> None:
    offenders = []
    for path in (ROOT / "protocols").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [
                f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN_IN_PROTOCOLS
            ]
    assert offenders == []


def test_gateway_and_ingest_never_import_each_other() -> None:
    for src, other in (("gateway", "ingest"), ("ingest", "gateway")):
        for path in (ROOT / src).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    assert all(a.name.split(".")[0] != other for a in node.names), path
                elif isinstance(node, ast.ImportFrom) and node.module:
                    assert node.module.split(".")[0] != other, path
