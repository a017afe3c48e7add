"""Layout and import rules (STYLE H1), tested rather than just written."""

from __future__ import annotations

import ast
import pkgutil
import re
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


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module and its classes and functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _literals(package: str, *, skip_assignments: tuple[str, ...] = ()) -> list[tuple[str, int, str]]:
    """(file, line, text) of every string literal in ``package`` but docstrings and the values
    assigned to the names in ``skip_assignments`` (sample text)."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id in skip_assignments for t in node.targets
            ):
                skip |= {id(n) for n in ast.walk(node.value)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                found.append((str(path.relative_to(ROOT)), node.lineno, node.value))
    return found


def test_the_gateway_names_no_protocol() -> None:
    """The driver registry is the only list of protocol names: the gateway asks the driver."""
    from drivers.base import DRIVERS

    families = {name.partition("-")[0] for name in DRIVERS}
    pattern = re.compile(rf"(?<![\w]){'|'.join(map(re.escape, sorted(families)))}")
    offenders = [
        f"{f}:{line}: {text!r}"
        for package in ("gateway", "ingest")
        for f, line, text in _literals(package, skip_assignments=("SAMPLE",))
        if pattern.search(text)
    ]
    assert offenders == []


def test_relay_actions_are_named_only_by_the_action_enum() -> None:
    """Relay actions are ``protocols.commands.Action`` members in the gateway and the drivers;
    each driver maps them to its own codes in one map (DL/T 645: ``RELAY_CODES``)."""
    from protocols.commands import RELAY_ACTIONS

    names = {a.value for a in RELAY_ACTIONS}
    offenders = [
        f"{f}:{line}: {text!r}"
        for package in ("gateway", "drivers", "ingest", "simulators")
        for f, line, text in _literals(package)
        if text in names
    ]
    assert offenders == []


def test_topics_are_spelt_only_in_the_contract_module() -> None:
    """Every MQTT topic and filter is built by ``protocols.topics``; no other code spells one."""
    offenders = [
        f"{f}:{line}: {text!r}"
        for package in ("protocols", "drivers", "gateway", "ingest", "simulators")
        for f, line, text in _literals(package, skip_assignments=("SAMPLE",))
        if "ami/v1" in text and f != "protocols/topics.py"
    ]
    assert offenders == []


def test_the_gateway_imports_no_protocol_driver_or_codec() -> None:
    """The gateway reaches a protocol only through the driver registry: no module of
    :data:`drivers.base.DRIVERS` and no protocol codec package (``protocols.<family>``) is
    imported anywhere in ``gateway/``, not even for type checking."""
    from drivers.base import DRIVERS

    families = {name.partition("-")[0] for name in DRIVERS}
    forbidden = {module for module, _ in DRIVERS.values()} | {f"protocols.{f}" for f in families}
    offenders = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno}: {n}"
                for n in names
                if any(n == m or n.startswith(m + ".") for m in forbidden)
            ]
    assert offenders == []
