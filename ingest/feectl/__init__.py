"""Remote prepaid fee control (DESIGN §7; ``docs/rules.md`` FC-01…FC-14, TOU-03…TOU-06): the pure core.

A ledger per account (integer money, an append-only journal, balances derived from it), tariffs
(:mod:`ingest.model.tariff`, the one TOU model), exactly-once interval charging, decisions as a
pure function of state and ``now_ms``,
and the relay-command lifecycle persisted beside the ledger. MQTT wiring and command signing are
not here: commands leave as plain fields (:meth:`RelayOrder.fields`), results come back as
:class:`RelayOrderResult`.

The running service around the core (``amigw feectl``: MQTT, signing, the payments HTTP API) is
:class:`~.service.FeeControlService` and :class:`~.api.PaymentsApi`, exported lazily so that
importing the core never imports paho-mqtt.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import (
    FeeControlConfig,
    NoTripWindows,
    ServiceConfig,
    ServiceSettings,
    load_feectl_config,
    load_service_config,
)
from .decide import AccountSnapshot, Evaluation, MeterSnapshot, decide, level_of
from .engine import AuditResult, Evaluated, FeeController, ResultOutcome
from .lifecycle import (
    TRANSITIONS,
    CommandEvent,
    CommandState,
    InvalidTransitionError,
    RelayOrder,
    RelayOrderResult,
    next_state,
)
from .model import (
    Account,
    Balance,
    ChargeResult,
    ChargeStatus,
    Decision,
    DecisionKind,
    EstimatePolicy,
    FeeControlError,
    Level,
    MeterRef,
    PaymentResult,
    RelayState,
    round_half_up,
)
from .sqlite_store import SqliteLedgerStore
from .store import ConsistencyReport, Hold, IntervalRow, JournalEntry, JournalKind, LedgerStore

__all__ = [
    "TRANSITIONS",
    "Account",
    "AccountSnapshot",
    "AuditResult",
    "Balance",
    "ChargeResult",
    "ChargeStatus",
    "CommandEvent",
    "CommandState",
    "ConsistencyReport",
    "Decision",
    "DecisionKind",
    "EstimatePolicy",
    "Evaluated",
    "Evaluation",
    "FeeControlConfig",
    "FeeControlError",
    "FeeControlService",
    "FeeController",
    "Hold",
    "IntervalRow",
    "InvalidTransitionError",
    "JournalEntry",
    "JournalKind",
    "LedgerStore",
    "Level",
    "MeterRef",
    "MeterSnapshot",
    "NoTripWindows",
    "PaymentResult",
    "PaymentsApi",
    "RelayOrder",
    "RelayOrderResult",
    "RelayState",
    "ResultOutcome",
    "ServiceConfig",
    "ServiceSettings",
    "SqliteLedgerStore",
    "decide",
    "level_of",
    "load_feectl_config",
    "load_service_config",
    "next_state",
    "round_half_up",
]

_LAZY = {"FeeControlService": ".service", "PaymentsApi": ".api"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
