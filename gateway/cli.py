"""The ``amigw`` command: one entry point, subcommands loaded lazily by name.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``. The registry below maps names to modules as *strings*, so that
``amigw --help`` and the edge-side subcommands never import the head-end's numpy/numba code,
and an edge-only install answers ``amigw ingest`` with "install amigw[ingest]" instead of a
traceback. (``gateway`` never imports ``ingest`` in code; the registry only names it.)

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from protocols.errors import AmigwError, ConfigError

__all__ = ["SUBCOMMANDS", "main"]

# name -> (module, one-line help, extra that provides it)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "read": ("gateway.read_cli", "read a meter once (field technician's tool)", "edge"),
    "edge": ("gateway.agent_cli", "run the edge agent: poll meters, publish over MQTT", "edge"),
    "sim": ("simulators.cli", "run a DL/T 645 or Modbus meter simulator", "edge"),
    "ingest": ("ingest.cli", "run the head-end ingest pipeline: MQTT -> validation -> InfluxDB", "ingest"),
    "feectl": ("ingest.feectl.cli", "run remote prepaid fee control", "ingest"),
    "config": ("gateway.config_cli", "print sample configuration, check a config file", "edge"),
    "demo": ("simulators.demo", "end-to-end demo on simulated meters", "all"),
    "bench": ("simulators.bench_e2e", "fleet bench: generator -> head-end with faults, checked (e2e)", "all"),
}


def _version() -> str:
    try:
        return version("amigw")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0+unknown"


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<8} {help_}" for name, (_, help_, _) in SUBCOMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog="amigw",
        description="Smart-meter (AMI) edge and ingestion gateway.",
        epilog="subcommands:\n" + "\n".join(lines) + "\n\nRun 'amigw SUBCOMMAND --help' for its options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"amigw {_version()}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    parser.add_argument("subcommand", choices=sorted(SUBCOMMANDS), metavar="SUBCOMMAND")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser().parse_args(argv)
    from gateway.logs import configure_logging

    configure_logging(top.log_level)
    module_name, help_, extra = SUBCOMMANDS[top.subcommand]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top_pkg = (exc.name or "").split(".")[0]
        if top_pkg in {"gateway", "drivers", "protocols", "ingest", "simulators"}:
            print(f"amigw {top.subcommand}: not available in this version ({exc.name})", file=sys.stderr)
        else:
            print(
                f"amigw {top.subcommand}: needs the '{exc.name}' package; install amigw[{extra}]",
                file=sys.stderr,
            )
        return 2
    sub = argparse.ArgumentParser(prog=f"amigw {top.subcommand}", description=help_)
    module.add_arguments(sub)
    args = sub.parse_args(top.rest)
    try:
        return int(module.run(args) or 0)
    except ConfigError as exc:
        print(f"amigw {top.subcommand}: configuration error: {exc}", file=sys.stderr)
        return 2
    except AmigwError as exc:
        logging.getLogger("amigw").error("%s failed: %s", top.subcommand, exc)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
