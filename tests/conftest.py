"""Real-service fixtures for the whole suite (DESIGN §8): mosquitto and influxd as child processes.

- ``mosquitto``: plain broker, anonymous, ``.url`` is ``mqtt://127.0.0.1:<port>`` (session).
- ``mosquitto_secure``: TLS + password file + the shipped ACL (see ``services.Mosquitto``) (session).
- Both brokers run with the queue and size limits of the shipped broker configuration
  (``ingest.broker.limits()``, docs/broker.md); only ports, paths, logging and the autosave
  interval (5 s, so that SIGKILL tests stay short) are the fixture's own.
- ``influxd``: InfluxDB 1.x (session); ``influx_db``: ``(influxd, fresh database name)`` per test.
- ``influxd_auth``: InfluxDB 1.x with ``auth-enabled = true`` and the admin ``INFLUX_ADMIN``
  (session), for refused credentials and privileges.
- ``postgres``: PostgreSQL (session, ``services.Postgres``); ``postgres_url``: the URL of a fresh
  schema of its ``postgres`` database per test (``options=-csearch_path=...``), for the head-end's
  shared state; ``state_url``: the state stores' tests run once on SQLite (``""``) and once on
  that fresh PostgreSQL schema.

The servers are shared by the session, so tests use their own client ids, topics and databases.
A test may stop or kill a server (to test outages); after that test it is started again, on the
same port, so one failing outage test does not cascade. A missing binary is a setup *error* with
the install command, never a skip: CI installs both servers.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from ingest.broker import ACL, limits
from simulators.servers import (
    Influxd,
    Mosquitto,
    Postgres,
    ServiceNotInstalledError,
    VictoriaMetrics,
)

SERVICE_FIXTURES = (
    "mosquitto",
    "mosquitto_secure",
    "influxd",
    "influxd_auth",
    "postgres",
    "victoria_metrics",
)
INFLUX_ADMIN = ("admin", "admin-secret")
S = TypeVar("S", Mosquitto, Influxd, Postgres, VictoriaMetrics)


def _started(service_factory: Callable[[Path], S], workdir: Path) -> S:
    try:
        service = service_factory(workdir)
    except ServiceNotInstalledError as exc:
        missing = str(exc)  # fail outside the except block: one clean line, no exception chain
    else:
        service.start()
        return service
    pytest.fail(missing, pytrace=False)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = _started(lambda d: Mosquitto(d, settings=limits()), tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def mosquitto_secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = _started(
        lambda d: Mosquitto(d, secure=True, settings=limits(), acl=ACL),
        tmp_path_factory.mktemp("mosquitto-secure"),
    )
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Influxd]:
    server = _started(Influxd, tmp_path_factory.mktemp("influxd"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def influxd_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Influxd]:
    server = _started(lambda d: Influxd(d, admin=INFLUX_ADMIN), tmp_path_factory.mktemp("influxd-auth"))
    yield server
    server.stop()


@pytest.fixture
def influx_db(influxd: Influxd, request: pytest.FixtureRequest) -> Iterator[tuple[Influxd, str]]:
    """A fresh database named after the test, dropped afterwards."""
    name = f"t_{re.sub(r'[^A-Za-z0-9]+', '_', request.node.name)[:40]}_{uuid.uuid4().hex[:8]}"
    influxd.create_database(name)
    yield influxd, name
    if not influxd.running:
        influxd.start()
    influxd.drop_database(name)


@pytest.fixture(autouse=True)
def _restart_stopped_services(request: pytest.FixtureRequest) -> Iterator[None]:
    used = [request.getfixturevalue(name) for name in SERVICE_FIXTURES if name in request.fixturenames]
    yield
    for service in used:
        if not service.running:
            service.start()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    server = _started(Postgres, tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres: Postgres) -> str:
    """A fresh, empty schema of the server's ``postgres`` database, as a URL that selects it."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{postgres.url}?options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def state_url(request: pytest.FixtureRequest) -> str:
    """``[state] url`` for a store test: "" (SQLite files) or a fresh PostgreSQL schema."""
    return "" if request.param == "sqlite" else str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def victoria_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    """A single-node VictoriaMetrics (session), started with the sink's flags."""
    server = _started(VictoriaMetrics, tmp_path_factory.mktemp("victoria-metrics"))
    yield server
    server.stop()


@pytest.fixture
def victoria_db(
    victoria_metrics: VictoriaMetrics, request: pytest.FixtureRequest
) -> tuple[VictoriaMetrics, str]:
    """The server and a ``db`` label value no other test writes (VictoriaMetrics has no
    databases: the label separates the tests' data)."""
    return (
        victoria_metrics,
        f"t_{re.sub(r'[^A-Za-z0-9]+', '_', request.node.name)[:40]}_{uuid.uuid4().hex[:8]}",
    )
