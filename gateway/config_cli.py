"""``amigw config sample [edge|ingest|feectl|mosquitto|mosquitto-acl]`` and ``amigw config check
FILE [--kind K]``.

Samples are the commented defaults of each program (the same text its unit test loads); the
broker's configuration and ACL (``ingest.broker``) are samples only, mosquitto checks them. The
head-end's samples are looked up by module name, like the subcommands themselves, so this
module does not import ``ingest`` (it is not installed on a concentrator).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from protocols.errors import ConfigError

# kind -> (module, sample attribute, loader function taking a path; "" for a sample only)
KINDS: dict[str, tuple[str, str, str]] = {
    "edge": ("gateway.config", "SAMPLE", "load_config"),
    "ingest": ("ingest.config", "SAMPLE", "load_config"),
    "feectl": ("ingest.feectl.config", "SAMPLE", "load_config"),
    "mosquitto": ("ingest.broker", "SAMPLE", ""),
    "mosquitto-acl": ("ingest.broker", "ACL", ""),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    sample = sub.add_parser("sample", help="print a commented sample configuration")
    sample.add_argument("kind", nargs="?", default="edge", choices=sorted(KINDS))
    check = sub.add_parser("check", help="validate a configuration file")
    check.add_argument("file")
    checkable = sorted(kind for kind, (_, _, loader) in KINDS.items() if loader)
    check.add_argument("--kind", default="edge", choices=checkable)


def _module(kind: str):  # type: ignore[no-untyped-def]
    module_name, _, _ = KINDS[kind]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError("kind", f"{kind} configuration needs {exc.name}: install amigw[ingest]") from None


def run(args: argparse.Namespace) -> int:
    module = _module(args.kind)
    if args.action == "sample":
        print(getattr(module, KINDS[args.kind][1]), end="")
        return 0
    getattr(module, KINDS[args.kind][2])(Path(args.file))
    print(f"{args.file}: ok")
    return 0
