"""``amigw feectl --config feectl.toml [--check-config]``: run the fee-control service.

Loads the whole configuration once (``[feectl]`` and ``[service]``, with its key, token and
tariff files), so a bad file is a :class:`~protocols.errors.ConfigError` at start (exit 2 from
``amigw``), never later. ``--check-config`` stops there and prints a summary. SIGTERM and SIGINT
stop the service cleanly: the subscribing session is closed without acknowledging anything
unfinished, and the ledger is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from ._log import kv
from .config import ServiceConfig, load_config

__all__ = ["add_arguments", "load", "run"]

log = logging.getLogger("amigw.feectl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="the service's TOML file")
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")


def load(path: Path) -> ServiceConfig:
    """Raises: ConfigError (including an unreadable file)."""
    return load_config(path)


def run(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    if args.check_config:
        svc = cfg.service
        print(
            f"{args.config}: ok: db={cfg.db_path} mqtt={svc.mqtt.url} client_id={svc.mqtt.client_id} "
            f"http={'off' if not svc.http.enabled else f'{svc.http.host}:{svc.http.port}'} "
            f"gateways={len(cfg.command_keys)} tariffs={len(cfg.tariffs)} accounts={len(cfg.accounts)}"
        )
        return 0
    asyncio.run(_main(cfg))
    return 0


async def _main(cfg: ServiceConfig) -> None:
    from .service import FeeControlService, install_signal_handlers

    service = FeeControlService(cfg)
    install_signal_handlers(service)
    log.info("feectl starting", extra=kv(db=cfg.db_path, mqtt=cfg.service.mqtt.url))
    await service.run()
    log.info("feectl stopped")
