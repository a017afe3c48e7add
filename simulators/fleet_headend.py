"""The head-end of ``amigw bench e2e``: real servers and programs, each its own process.

:class:`HeadEnd` starts, in a run directory it owns:

* a real mosquitto (:class:`~simulators.servers.Mosquitto`) with the queue, size and session
  settings the head-end ships (``ingest.broker.limits()``, docs/broker.md) and persistence on,
  so queued QoS 1 messages of persistent sessions survive a restart (up to the last autosave
  after a SIGKILL);
* a real influxd (:class:`~simulators.servers.Influxd`) and the run's database;
* ``workers`` ingest workers, each ``amigw ingest --config ingest.toml --worker-index i`` as its
  own process (not ``--workers N``, whose supervisor would restart a worker the harness means to
  stop for good): worker ``i`` is MQTT session ``bench-ingest-<i>`` in the shared subscription,
  metrics on ``metrics_port + i``; they share the run's dedup, loss, run-state and dead-letter
  SQLite files (one "machine"). With ``state_url`` (a PostgreSQL database, ``[state] url``,
  docs/shared-state.md) each worker is a "machine" of its own instead: a working directory and a
  config file of its own (``ingest-<i>/ingest.toml``, no file shared with another worker), the
  state in that one database;
* fee control (``amigw feectl``) when :class:`FeectlSetup` is given, its ledger in the run dir.

Each program's output goes to ``logs/<name>.log``. :meth:`HeadEnd.check` raises
:class:`HarnessError` naming a program that exited without being told to (with its log tail):
the harness watches them on every progress tick.

The fault hooks are here too: :meth:`kill_worker` (SIGKILL), :meth:`start_worker`,
:meth:`stop_worker` (SIGTERM, and ending the worker's broker session the way an operator removes
a worker at once, docs/broker.md), the servers' own ``stop``/``kill``/``start``. Readers:
:meth:`worker_metrics` (Prometheus text, summed per name), :meth:`dead_letters` (the dead-letter
store, by reason), :meth:`loss_account` (``amigw ingest --loss --json``), :func:`rss_kib`.

The programs run the same code as the harness: the directory holding this package is put first
on their ``PYTHONPATH``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from protocols.errors import AmigwError
from simulators.servers import Influxd, Mosquitto, free_port

__all__ = [
    "DATABASE",
    "INGEST_CLIENT_ID",
    "FeectlSetup",
    "HarnessError",
    "HeadEnd",
    "HeadEndSettings",
    "ledger_charges",
    "rss_kib",
]

DATABASE = "amigw_bench"
INGEST_CLIENT_ID = "bench-ingest"
_READY_LINE = b"ingest worker started"
_START_TIMEOUT_S = 600.0  # a first start compiles the numba kernels (cached afterwards)
_SOURCE_ROOT = Path(__file__).resolve().parents[1]


class HarnessError(AmigwError):
    """The bench cannot go on: a program exited, a server did not come back, a step timed out."""


@dataclass(frozen=True, slots=True)
class FeectlSetup:
    """Fee control's configuration: ``toml`` is the service file's text without ``[service.mqtt]``
    and ``[service.http]`` (the harness adds those: the broker's URL, a free port, ``token_file``);
    ``files`` are written beside it (keys, tariffs), relative names."""

    toml: str
    files: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HeadEndSettings:
    workers: int = 2
    interval_s: int = 900
    session_expiry_s: int = 3600  # ingest [mqtt] session_expiry_s
    queue_max: int = 16
    autosave_interval_s: int = 5  # mosquitto: what a SIGKILL can lose (re-sent by the edges)
    rollup_delay_s: float = 3.0
    rollup_check_s: float = 1.0
    registry_toml: str = ""  # the fleet's meter registry ("": none)
    tariff_toml: str = ""  # a tariff document whose calendar is ingest's tariff_calendar ("": built-in)
    ingest_extra: str = ""  # TOML appended to [pipeline] (e.g. validation thresholds of the fleet)
    feectl: FeectlSetup | None = None
    state_url: str = ""  # ingest [state] url: each worker a machine of its own ("": one machine)


@dataclass(slots=True)
class _Program:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    stopped: bool = False  # told to stop (or killed on purpose): its exit is not a failure
    starts: int = 0
    cwd: Path | None = None  # its working directory (default: the logs')


def rss_kib(pid: int | None) -> int:
    """Resident memory of ``pid`` (``VmRSS`` from ``/proc``), 0 when it is gone."""
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def ledger_charges(path: Path) -> dict[str, int]:
    """Fen charged per meter by fee control's charge-type journal rows (``charge``, ``trueup``,
    ``reprice``; docs/feectl.md, TOU-06; the journal posts them as debits, negative), read-only
    from its SQLite ledger."""
    if not path.exists():
        return {}
    uri = f"file:{path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
        rows = db.execute(
            "SELECT meter, -sum(amount_fen) FROM journal"
            " WHERE kind IN ('charge', 'trueup', 'reprice') GROUP BY meter"
        ).fetchall()
    return {str(meter): int(fen) for meter, fen in rows}


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text[-lines:]) or "    (empty log)"


class HeadEnd:
    """The servers and programs of one bench run (see the module docstring)."""

    def __init__(self, run_dir: Path, settings: HeadEndSettings) -> None:
        if settings.workers < 1:
            raise ValueError("workers: at least 1")
        self.dir = run_dir.resolve()
        self.settings = settings
        self.logs = self.dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        from ingest.broker import limits

        self.broker = Mosquitto(
            self.dir / "mqtt", settings=limits(), autosave_interval_s=settings.autosave_interval_s
        )
        # influxd refuses a tag's 100,001st value by default (max-values-per-tag): a fleet of more
        # than 100,000 meters needs the limit off, as a production head-end does (docs/ingest.md)
        self.influx = Influxd(self.dir / "influx", data={"max-values-per-tag": "0"})
        self.metrics_port = _free_port_block(settings.workers)
        self.feectl_port = free_port()
        self.feectl_token = "bench-e2e-token-" + os.urandom(8).hex()
        self.workers: list[_Program] = []
        self._written: dict[tuple[int, int], int] = {}  # (worker, pid): batches it wrote, last seen
        self.feectl: _Program | None = None
        self.ingest_config = self.dir / "ingest" / "ingest.toml"

    # -- paths -------------------------------------------------------------------------------
    @property
    def dead_letter_path(self) -> Path:
        return self.dir / "ingest" / "deadletter.sqlite"

    def worker_config(self, i: int) -> Path:
        """Worker ``i``'s config file: the one shared file, or its machine's own (``state_url``)."""
        if self.settings.state_url:
            return self.dir / f"ingest-{i}" / "ingest.toml"
        return self.ingest_config

    @property
    def ledger_path(self) -> Path | None:
        return None if self.feectl is None else self.dir / "feectl" / "ledger.sqlite"

    # -- start and stop ------------------------------------------------------------------------
    def start(self) -> None:
        """Broker, influxd and the database, the ingest workers, fee control; returns when every
        worker has subscribed and fee control answers.

        Raises:
            HarnessError: a program exited or did not come up in time.
            ServiceError: a server did not start.
        """
        self.broker.start()
        self.influx.start()
        self.influx.create_database(DATABASE)
        self._write_ingest_configs()
        self.workers = [
            _Program(
                f"ingest-{i}",
                self._worker_argv(i),
                self.logs / f"ingest-{i}.log",
                cwd=self.worker_config(i).parent,
            )
            for i in range(self.settings.workers)
        ]
        for i in range(len(self.workers)):
            self.start_worker(i, wait=False)
        for i in range(len(self.workers)):
            self.wait_worker(i)
        if self.settings.feectl is not None:
            self._start_feectl(self.settings.feectl)

    def close(self) -> None:
        """Stop every program (SIGTERM, then SIGKILL), then influxd and mosquitto."""
        programs = [*self.workers, *([self.feectl] if self.feectl else [])]
        for prog in programs:
            prog.stopped = True
            if prog.proc is not None and prog.proc.poll() is None:
                prog.proc.send_signal(signal.SIGTERM)
        for prog in programs:
            if prog.proc is not None:
                try:
                    prog.proc.wait(20)
                except subprocess.TimeoutExpired:
                    prog.proc.kill()
                    prog.proc.wait(10)
        self.influx.stop()
        self.broker.stop()

    def check(self) -> None:
        """Raise :class:`HarnessError` for the first program that exited on its own."""
        for prog in [*self.workers, *([self.feectl] if self.feectl else [])]:
            if prog.proc is not None and not prog.stopped and prog.proc.poll() is not None:
                raise HarnessError(
                    f"{prog.name} exited with code {prog.proc.returncode}; the end of {prog.log}:\n"
                    f"{_tail(prog.log)}"
                )

    # -- ingest workers ----------------------------------------------------------------------
    def worker_pid(self, i: int) -> int | None:
        proc = self.workers[i].proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def live_workers(self) -> list[int]:
        return [i for i in range(len(self.workers)) if self.worker_pid(i) is not None]

    def start_worker(self, i: int, *, wait: bool = True) -> int:
        """(Re)start worker ``i``; with ``wait``, return once it has subscribed. Its pid."""
        prog = self.workers[i]
        proc = self._spawn(prog)  # replaces the dead process first: check() must not see it unstopped
        prog.stopped = False
        if wait:
            self.wait_worker(i)
        return proc.pid

    def wait_worker(self, i: int) -> None:
        prog = self.workers[i]
        deadline = time.monotonic() + _START_TIMEOUT_S
        while _log_count(prog.log, _READY_LINE) < prog.starts:
            self.check()
            if prog.stopped:  # the run is closing (or the worker was stopped meanwhile)
                raise HarnessError(f"{prog.name} stopped while starting")
            if time.monotonic() > deadline:
                raise HarnessError(f"{prog.name} did not subscribe within {_START_TIMEOUT_S:.0f} s")
            time.sleep(0.1)

    def kill_worker(self, i: int) -> int:
        """SIGKILL worker ``i`` (its unacknowledged messages wait at the broker); its old pid."""
        self.note_written()
        return self._end(self.workers[i], signal.SIGKILL)

    def stop_worker(self, i: int) -> int:
        """Scale-down: stop worker ``i`` for good (SIGTERM) and end its broker session, as an
        operator removes a worker at once (MQTT 5 clean start + session expiry 0, docs/broker.md).
        What its session still held is dropped by the broker; the edges re-send what the head-end
        has not confirmed, to the live workers. Its old pid."""
        self.note_written()
        pid = self._end(self.workers[i], signal.SIGTERM)
        _end_session(self.broker, f"{INGEST_CLIENT_ID}-{i}")
        return pid

    def stop_feectl(self) -> None:
        """Stop fee control (SIGTERM), if it runs."""
        if self.feectl is not None and self.feectl_pid is not None:
            self._end(self.feectl, signal.SIGTERM)

    def worker_metrics(self, i: int) -> dict[str, float]:
        """Worker ``i``'s Prometheus samples, summed per metric name ({} when it does not answer)."""
        return _summed(f"http://127.0.0.1:{self.metrics_port + i}/metrics")

    def note_written(self) -> None:
        """Read the batches each live worker has written (``amigw_ingest_batches_total``), for
        :meth:`written_by_worker`; the harness calls it on every progress tick, and it is called
        before a worker is stopped or killed."""
        for i in self.live_workers():
            pid = self.worker_pid(i)
            n = self.labelled_metric(i, "amigw_ingest_batches_total").get('result="written"')
            if pid is not None and n is not None:
                self._written[(i, pid)] = max(self._written.get((i, pid), 0), int(n))

    def written_by_worker(self) -> list[int]:
        """Batches each worker wrote, summed over its processes, as last read by
        :meth:`note_written` (a lower bound: a killed process's last writes may not be seen)."""
        out = [0] * len(self.workers)
        for (i, _pid), n in self._written.items():
            out[i] += n
        return out

    def feectl_metrics(self) -> dict[str, float]:
        """Fee control's Prometheus samples (its HTTP API's ``/metrics``), summed per metric name
        ({} when it does not answer)."""
        return _summed(f"http://127.0.0.1:{self.feectl_port}/metrics")

    def labelled_metric(self, i: int, name: str) -> dict[str, float]:
        """Worker ``i``'s samples of ``name`` by their label text (e.g. ``result="duplicate"``)."""
        out: dict[str, float] = {}
        for line in _exposition(f"http://127.0.0.1:{self.metrics_port + i}/metrics").splitlines():
            if line.startswith(name + "{"):
                sample, _, value = line.rpartition(" ")
                out[sample[len(name) + 1 : -1]] = float(value)
        return out

    def dead_letters(self) -> dict[str, int]:
        """Entries in the dead-letter store, by reason (durable, shared by the workers)."""
        if self.settings.state_url:
            from ingest.pipeline.deadletter import DeadLetterStore

            with DeadLetterStore(self.dead_letter_path, url=self.settings.state_url) as store:
                return store.count_by_reason()
        if not self.dead_letter_path.exists():
            return {}
        uri = f"file:{self.dead_letter_path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
            rows = db.execute("SELECT reason, count(*) FROM dead_letter GROUP BY reason").fetchall()
        return {str(reason): int(n) for reason, n in rows}

    def loss_account(self) -> dict[str, object]:
        """``amigw ingest --loss --json``: ``missing`` and ``lost`` batches, per gateway.

        Raises:
            HarnessError: the command failed.
        """
        proc = subprocess.run(
            [*_amigw(), "ingest", "--config", str(self.worker_config(0)), "--loss", "--json"],
            capture_output=True, env=_env(), cwd=self.worker_config(0).parent, timeout=120, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise HarnessError(f"amigw ingest --loss failed: {proc.stderr.decode(errors='replace')[-2000:]}")
        doc: dict[str, object] = json.loads(proc.stdout)
        return doc

    # -- fee control ---------------------------------------------------------------------------
    @property
    def feectl_pid(self) -> int | None:
        proc = self.feectl.proc if self.feectl else None
        return proc.pid if proc is not None and proc.poll() is None else None

    def _start_feectl(self, setup: FeectlSetup) -> None:
        d = self.dir / "feectl"
        d.mkdir(parents=True, exist_ok=True)
        for name, text in setup.files.items():
            (d / name).write_text(text)
        (d / "payments.token").write_text(self.feectl_token)
        (d / "feectl.toml").write_text(
            setup.toml
            + f'\n[service.mqtt]\nurl = "{self.broker.url}"\nclient_id = "bench-feectl"\n'
            + f'\n[service.http]\nenabled = true\nport = {self.feectl_port}\ntoken_file = "payments.token"\n'
        )
        self.feectl = self._program("feectl", [*_amigw(), "feectl", "--config", str(d / "feectl.toml")])
        self._spawn(self.feectl)
        deadline = time.monotonic() + 120
        while not self._feectl_healthy():
            self.check()
            if time.monotonic() > deadline:
                raise HarnessError(f"fee control did not answer within 120 s:\n{_tail(self.feectl.log)}")
            time.sleep(0.2)
        time.sleep(0.5)  # its consumer's SUBACK comes after the publisher's CONNACK

    def _feectl_healthy(self) -> bool:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.feectl_port}/healthz",
            headers={"Authorization": f"Bearer {self.feectl_token}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                return bool(json.loads(resp.read()).get("mqtt_publisher"))
        except (OSError, ValueError):
            return False

    # -- internals ---------------------------------------------------------------------------
    def _write_ingest_configs(self) -> None:
        configs = {self.worker_config(i) for i in range(self.settings.workers)}
        for path in sorted(configs):
            self._write_ingest_config(path)

    def _write_ingest_config(self, config: Path) -> None:
        s = self.settings
        d = config.parent
        d.mkdir(parents=True, exist_ok=True)
        registry = ""
        if s.registry_toml:
            (d / "registry.toml").write_text(s.registry_toml)
            registry = f'registry = "{d / "registry.toml"}"\n'
        if s.tariff_toml:
            (d / "tariff.toml").write_text(s.tariff_toml)
            registry += f'tariff_calendar = "{d / "tariff.toml"}"\n'
        state = f"[state]\nurl = {json.dumps(s.state_url)}\n" if s.state_url else ""
        config.write_text(
            f"{registry}metrics_listen = '127.0.0.1:{self.metrics_port}'\n"
            f"[mqtt]\nurl = {json.dumps(self.broker.url)}\nclient_id = '{INGEST_CLIENT_ID}'\n"
            f"session_expiry_s = {s.session_expiry_s}\nqueue_max = {s.queue_max}\n"
            f"[influx]\nurl = {json.dumps(self.influx.url)}\napi = 'v1'\ndatabase = '{DATABASE}'\n"
            f"{state}[dead_letter]\npath = {json.dumps(str(d / 'deadletter.sqlite'))}\n"
            f"[dedup]\npath = {json.dumps(str(d / 'dedup.sqlite'))}\n"
            f"[loss]\npath = {json.dumps(str(d / 'loss.sqlite'))}\n"
            f"[pipeline]\ninterval_s = {s.interval_s}\nrollup_delay_s = {s.rollup_delay_s}\n"
            f"rollup_check_s = {s.rollup_check_s}\nretry_max_s = 2.0\n{s.ingest_extra}\n"
        )

    def _worker_argv(self, i: int) -> list[str]:
        return [*_amigw(), "ingest", "--config", str(self.worker_config(i)), "--worker-index", str(i)]

    def _program(self, name: str, argv: list[str]) -> _Program:
        return _Program(name, argv, self.logs / f"{name}.log")

    def _spawn(self, prog: _Program) -> subprocess.Popen[bytes]:
        with prog.log.open("ab") as out:
            prog.proc = subprocess.Popen(
                prog.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(),
                cwd=prog.cwd or prog.log.parent, start_new_session=True,
            )  # fmt: skip
        prog.starts += 1
        return prog.proc

    @staticmethod
    def _end(prog: _Program, sig: signal.Signals) -> int:
        proc = prog.proc
        if proc is None or proc.poll() is not None:
            raise HarnessError(f"{prog.name} is not running")
        prog.stopped = True
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        return proc.pid


def _exposition(url: str) -> str:
    """The Prometheus text at ``url`` ("" when it does not answer)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())
    except (OSError, ValueError):
        return ""


def _summed(url: str) -> dict[str, float]:
    """The Prometheus samples at ``url``, summed per metric name ({} when it does not answer)."""
    out: dict[str, float] = {}
    for line in _exposition(url).splitlines():
        if line and not line.startswith("#"):
            sample, _, value = line.rpartition(" ")
            name = sample.partition("{")[0]
            with contextlib.suppress(ValueError):
                out[name] = out.get(name, 0.0) + float(value)
    return out


def _amigw() -> list[str]:
    return [sys.executable, "-m", "gateway.cli"]


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(_SOURCE_ROOT), path) if p),
    }


def _log_count(path: Path, line: bytes) -> int:
    try:
        return path.read_bytes().count(line)
    except OSError:
        return 0


def _free_port_block(n: int) -> int:
    """A port p such that p .. p + n - 1 are free on loopback now (worker i serves on p + i)."""
    import socket

    for _ in range(200):
        base = free_port()
        if base + n >= 65536:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for p in range(base, base + n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise HarnessError(f"no block of {n} free ports")


def _end_session(broker: Mosquitto, client_id: str) -> None:
    """Connect as ``client_id`` with a clean start and session expiry 0, then disconnect: the
    broker drops the session, its subscriptions and what it had queued for it."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    client.connect(broker.host, broker.port, clean_start=True, properties=props)
    client.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not client.is_connected():
            if time.monotonic() > deadline:
                raise HarnessError(f"could not connect as {client_id} to end its session")
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
