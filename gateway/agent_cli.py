"""``amigw edge --config edge.toml [--check-config]``: run (or only validate) the edge agent.

SIGTERM and SIGINT stop the agent cleanly: the current transaction finishes, the outbox is
closed, the broker gets an offline status. Whatever is in the outbox is published on the next
start, so a stop (or a crash) loses nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from importlib.metadata import PackageNotFoundError, version

from gateway.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="edge configuration file (TOML)")
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")


def _version() -> str:
    try:
        return version("amigw")
    except PackageNotFoundError:
        return ""


async def _run(args: argparse.Namespace) -> int:
    from gateway.agent import EdgeAgent

    cfg = load_config(args.config)
    agent = EdgeAgent(cfg, version=_version())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.stop)
    await agent.run()
    return 0


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.check_config:
        cfg.key_bytes()  # the key file must be readable too
        print(f"{args.config}: ok ({len(cfg.buses)} buses, {len(cfg.meters)} meters)")
        return 0
    return asyncio.run(_run(args))
