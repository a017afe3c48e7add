"""``amigw config sample [edge|ingest|feectl|mosquitto|mosquitto-acl]`` and ``amigw config check
FILE [--kind K]``.

Samples are the commented defaults of each program (the same text its unit test loads); the
broker's configuration and ACL (``ingest.broker``) are samples only, mosquitto checks them. The
head-end's samples are looked up by module name, like the subcommands themselves, so this
module does not import ``ingest`` (it is not installed on a concentrator).

``config check`` is the service's own check: it runs ``amigw KIND --config FILE
--check-config`` (through the same lazy dispatcher as ``amigw KIND``), so both always agree,
output and exit status included. KIND is told by the file's top-level keys (:data:`MARKERS`)
unless ``--kind`` names it.
"""

from __future__ import annotations

import argparse
import importlib
import tomllib
from pathlib import Path

from protocols.errors import ConfigError

# kind -> (module, sample attribute)
KINDS: dict[str, tuple[str, str]] = {
    "edge": ("gateway.config", "SAMPLE"),
    "ingest": ("ingest.config", "SAMPLE"),
    "feectl": ("ingest.feectl.config", "SAMPLE"),
    "mosquitto": ("ingest.broker", "SAMPLE"),
    "mosquitto-acl": ("ingest.broker", "ACL"),
}


# Top-level keys that only one kind of configuration has: how ``config check`` tells the kind.
MARKERS: dict[str, frozenset[str]] = {
    "edge": frozenset(
        {"gateway_id", "command_key", "command_key_file", "state_dir", "buses", "meters", "plans",
         "outbox", "clock"}
    ),
    "ingest": frozenset(
        {"influx", "pipeline", "dedup", "dead_letter", "registry", "line_loss", "tariff_calendar",
         "tariff_calendars"}
    ),
    "feectl": frozenset({"feectl", "service"}),
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    sample = sub.add_parser("sample", help="print a commented sample configuration")
    sample.add_argument("kind", nargs="?", default="edge", choices=sorted(KINDS))
    check = sub.add_parser("check", help="validate a configuration file")
    check.add_argument("file")
    check.add_argument(
        "--kind", choices=sorted(MARKERS), help="the configuration's program (default: told by its keys)"
    )


def _module(kind: str):  # type: ignore[no-untyped-def]
    module_name, _ = KINDS[kind]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError("kind", f"{kind} configuration needs {exc.name}: install amigw[ingest]") from None


def kind_of(path: Path) -> str:
    """Which program's configuration ``path`` is, by its top-level keys. Raises ConfigError."""
    try:
        keys = set(tomllib.loads(path.read_text(encoding="utf-8")))
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"{path}: invalid TOML: {exc}") from None
    kinds = sorted(kind for kind, markers in MARKERS.items() if keys & markers)
    if len(kinds) != 1:
        found = " and ".join(kinds) if kinds else "none of them"
        raise ConfigError(
            "--kind", f"cannot tell from its keys whether {path} is an edge, ingest or feectl "
            f"configuration (found keys of {found}); name it with --kind"
        )  # fmt: skip
    return kinds[0]


def run(args: argparse.Namespace) -> int:
    if args.action == "sample":
        print(getattr(_module(args.kind), KINDS[args.kind][1]), end="")
        return 0
    from gateway.cli import main

    kind = args.kind or kind_of(Path(args.file))
    return main([kind, "--config", args.file, "--check-config"])
