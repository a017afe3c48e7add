"""Remote prepaid fee control (DESIGN §7; ``docs/rules.md`` FC-01…FC-14, TOU-03…TOU-06): the pure core.

A ledger per account (integer money, an append-only journal, balances derived from it), tariffs
(:mod:`ingest.model.tariff`, the one TOU model), exactly-once interval charging, decisions as a
pure function of state and ``now_ms``,
and the relay-command lifecycle persisted beside the ledger. MQTT wiring and command signing are
not here: commands leave as plain fields (:meth:`RelayOrder.fields`), results come back as
:class:`RelayOrderResult`.

Modules: :mod:`~.model` (accounts, balances, decisions' vocabulary), :mod:`~.lifecycle` (relay
orders and their states), :mod:`~.engine` (:class:`~.engine.FeeController`: charging, payments,
results), :mod:`~.decide` (the pure decision), :mod:`~.store` and :mod:`~.sqlite_store` (the
ledger), :mod:`~.config`. The running service around the core (``amigw feectl``: MQTT, signing,
hosting the ops HTTP API of :mod:`ingest.ops`) is :class:`~.service.FeeControlService`;
importing the core never imports paho-mqtt. Names are imported from the module that defines them.
"""
