"""Real mosquitto, influxd and PostgreSQL servers as child processes, for tests and the demo (DESIGN §8).

Each class starts one server on free 127.0.0.1 ports (bound to port 0 and read back, STYLE H11)
with its configuration, data and log in a working directory the caller owns:

    broker = Mosquitto(tmp / "mqtt")             # or Mosquitto(tmp / "mqtts", secure=True)
    broker.start(); ...; broker.stop(); broker.start()   # a restart keeps the port and the data
    db = Influxd(tmp / "influx"); db.start(); db.create_database("x"); db.query("SELECT ...", db="x")
    pg = Postgres(tmp / "pg"); pg.start(); url = pg.create_database("state")   # postgresql://...

Contract:
- The ports are chosen once, in the constructor, and never change: ``stop()``/``kill()`` then
  ``start()`` brings the same server back on the same ports with the same data. Only the very
  first start, if it loses the tiny race for its port ("address already in use"), retries once
  on fresh ports.
- ``start()`` returns only when the server answers (mosquitto: TCP connect and its "running" log
  line; influxd: ``/ping`` answers 204) and raises ``ServiceError`` with the tail of the server's
  log otherwise. ``stop()`` is SIGTERM (a clean shutdown: mosquitto saves its persistence file),
  then SIGKILL after a grace period; ``kill()`` is SIGKILL. Both are idempotent.
- Every child is killed at interpreter exit (atexit) and, on Linux, when the thread that started
  it dies (PR_SET_PDEATHSIG), so a crashed or killed test run leaves no servers behind. Start
  servers from the main thread: a worker thread's exit would kill them.
- A missing binary raises ``ServiceNotInstalledError`` naming the setup command. Nothing is skipped.

Only the standard library is used, so ``amigw demo`` and the test fixtures share it
(``tests/services.py`` re-exports it for the tests).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from protocols import topics

__all__ = [
    "GATEWAY_USERS",
    "HEADEND_USER",
    "InfluxError",
    "Influxd",
    "Mosquitto",
    "Postgres",
    "ServiceError",
    "ServiceNotInstalledError",
    "TlsFiles",
    "VictoriaMetrics",
    "free_port",
    "free_ports",
    "make_tls_files",
]

LOOPBACK = "127.0.0.1"
GATEWAY_USERS = ("gw-1", "gw-2")
HEADEND_USER = "headend"
SETUP_HINT = "run `bash .ci/bootstrap setup`"


class ServiceError(RuntimeError):
    """A test server failed to start, stop or answer. The message carries the server's log tail."""


class ServiceNotInstalledError(ServiceError, FileNotFoundError):
    """The server's executable is not installed."""


class InfluxError(ServiceError):
    """influxd answered a query or write with an error (HTTP status and influxd's own message)."""

    def __init__(self, message: str, *, status: int, error: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error


# ---------------------------------------------------------------------------------------------
# ports, binaries, process hygiene


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct free TCP ports: bind port 0 (all held at once), read back, release."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


def free_port(host: str = LOOPBACK) -> int:
    return free_ports(1, host)[0]


def find_binary(name: str, *fallbacks: str) -> str:
    """Path of executable ``name`` on PATH or at one of ``fallbacks`` (sbin is often not on PATH).

    Raises:
        ServiceNotInstalledError: nowhere to be found.
    """
    for candidate in (shutil.which(name), *fallbacks):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ServiceNotInstalledError(f"{name} not found: {SETUP_HINT}")


_LIVE: dict[int, subprocess.Popen[bytes]] = {}
_LIVE_LOCK = threading.Lock()


@atexit.register
def _kill_all_children() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
        _LIVE.clear()
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def _die_with_parent_preexec() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when the starting thread dies, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None  # PR_SET_PDEATHSIG fires when the *thread* exits, which would surprise callers
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return preexec


def _read_tail(path: Path, lines: int, start_offset: int = 0) -> str:
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(start_offset, size - 64 * 1024))
            data = fh.read()
    except FileNotFoundError:
        return "<no log written>"
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# the process lifecycle shared by both servers


class _ChildServer:
    """Start/stop/kill of one server process whose stdout and stderr go to ``log_file``."""

    name: ClassVar[str] = "server"
    start_timeout_s: ClassVar[float] = 30.0
    stop_timeout_s: ClassVar[float] = 15.0

    def __init__(self, workdir: str | os.PathLike[str], host: str) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.log_file = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._started_once = False

    # subclasses provide these
    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _answers(self) -> bool:
        raise NotImplementedError

    def _pick_new_ports(self) -> None:
        raise NotImplementedError

    def _write_config(self) -> None:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _process_options(self) -> dict[str, Any]:
        """Further ``subprocess.Popen`` arguments (a server that must not run as root sets
        ``user``, ``group`` and a ``cwd`` that user can enter)."""
        return {"cwd": self.workdir}

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log (all its runs), for failure messages."""
        return _read_tail(self.log_file, lines)

    def start(self) -> None:
        """Start the server and wait until it answers; a restart keeps the ports and data.

        Raises:
            ServiceError: already running, exited early or not answering in time (with log tail).
            ServiceNotInstalledError: the executable is not installed.
        """
        if self.running:
            raise ServiceError(f"{self!r} is already running")
        try:
            self._start_and_wait()
        except ServiceError:
            if not self._lost_port_race():
                raise
            # Someone took our port between bind-0 and the server's bind: retry once. On a first
            # start fresh ports are fine; on a restart the port must stay, so just try it again.
            if not self._started_once:
                self._pick_new_ports()
            time.sleep(0.5)
            self._start_and_wait()
        self._started_once = True

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM (clean shutdown), then SIGKILL if still alive after ``timeout_s``."""
        self._end(signal.SIGTERM, self.stop_timeout_s if timeout_s is None else timeout_s)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown (mosquitto loses what it had not autosaved)."""
        self._end(signal.SIGKILL, 10.0)

    def __enter__(self) -> _ChildServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _start_and_wait(self) -> None:
        self._write_config()
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log:
            proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,  # a Ctrl-C on the test run must not kill servers mid-test
                preexec_fn=_die_with_parent_preexec(),
                **self._process_options(),
            )
        self._proc = proc
        with _LIVE_LOCK:
            _LIVE[id(self)] = proc
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._forget()
                raise self._error(f"exited with status {proc.returncode} while starting")
            if self._answers() and proc.poll() is None:
                return
            time.sleep(0.05)
        self.kill()
        raise self._error(f"did not answer within {self.start_timeout_s:.0f} s")

    def _end(self, sig: signal.Signals, timeout_s: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._forget()

    def _forget(self) -> None:
        with _LIVE_LOCK:
            _LIVE.pop(id(self), None)
        self._proc = None

    def _this_run_log(self) -> str:
        return _read_tail(self.log_file, 10_000, self._log_offset)

    def _lost_port_race(self) -> bool:
        return "address already in use" in self._this_run_log().lower()

    def _error(self, what: str) -> ServiceError:
        return ServiceError(f"{self!r} {what}; log tail ({self.log_file}):\n{self.log_tail()}")


# ---------------------------------------------------------------------------------------------
# TLS material for the secure broker


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: a test CA, a server certificate it signed, and an unrelated CA."""

    ca_file: Path
    certfile: Path
    keyfile: Path
    wrong_ca_file: Path


_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = amigw-test
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def make_tls_files(directory: str | os.PathLike[str], *, days: int = 7) -> TlsFiles:
    """Generate a CA, a server certificate for 127.0.0.1/localhost and a wrong CA (openssl CLI).

    Raises:
        ServiceNotInstalledError: no ``openssl``.
        ServiceError: openssl failed (with its output).
    """
    openssl = find_binary("openssl", "/usr/bin/openssl")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "openssl.cnf").write_text(_OPENSSL_CNF)
    tag, serial = secrets.token_hex(4), secrets.randbits(63)
    ec_key = "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out"
    self_signed = f"req -config openssl.cnf -new -x509 -sha256 -days {days} -extensions ca_ext"
    steps = (
        f"{ec_key} ca.key",
        f"{self_signed} -key ca.key -subj /CN=amigw-test-ca-{tag} -out ca.crt",
        f"{ec_key} wrong-ca.key",
        f"{self_signed} -key wrong-ca.key -subj /CN=amigw-unrelated-ca-{tag} -out wrong-ca.crt",
        f"{ec_key} server.key",
        "req -config openssl.cnf -new -key server.key -subj /CN=127.0.0.1 -out server.csr",
        f"x509 -req -sha256 -days {days} -in server.csr -CA ca.crt -CAkey ca.key -set_serial {serial}"
        " -extfile openssl.cnf -extensions server_ext -out server.crt",
    )
    for step in steps:  # relative names (cwd=out): a directory with spaces needs no quoting
        proc = subprocess.run([openssl, *step.split()], capture_output=True, cwd=out, check=False)
        if proc.returncode != 0:
            raise ServiceError(f"openssl {step!r} failed: {proc.stderr.decode(errors='replace')}")
    return TlsFiles(out / "ca.crt", out / "server.crt", out / "server.key", out / "wrong-ca.crt")


# ---------------------------------------------------------------------------------------------
# mosquitto


class Mosquitto(_ChildServer):
    """A mosquitto broker on 127.0.0.1:<free port>, persistence in ``workdir``.

    Plain (``secure=False``): one listener, anonymous clients allowed.
    Secure (``secure=True``): one TLS listener (``.ca_file`` signs its certificate;
    ``.wrong_ca_file`` does not), anonymous clients refused, users from a ``mosquitto_passwd``
    file (``.passwords``: gw-1, gw-2, headend) and the mosquitto ACL text ``acl`` (by default: a
    gateway writes only under ``ami/v1/<its username>/`` and reads only
    ``ami/v1/<its username>/down/#``; the head-end reads and writes everything).

    ``settings`` are further ``mosquitto.conf`` directives (key -> value), e.g. the queue and size
    limits of the configuration the head-end ships (the test fixtures pass those). Without them
    offline queues are unbounded (``max_queued_messages 0``).

    Queued QoS 1 messages of persistent sessions survive ``stop()``/``start()`` (saved on clean
    shutdown) and, up to the last autosave (``autosave_interval_s``), ``kill()``.
    """

    name = "mosquitto"

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        secure: bool = False,
        host: str = LOOPBACK,
        autosave_interval_s: int = 5,
        settings: Mapping[str, str] | None = None,
        acl: str | None = None,
        log_types: tuple[str, ...] = ("error", "warning", "notice", "information"),
    ) -> None:
        self.binary = find_binary("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
        super().__init__(workdir, host)
        self.secure = secure
        self.autosave_interval_s = autosave_interval_s
        self.settings = dict(settings) if settings is not None else {"max_queued_messages": "0"}
        self.acl = acl
        self.log_types = log_types
        self.config_file = self.workdir / "mosquitto.conf"
        self.port = free_port(host)
        self.passwords: dict[str, str] = {}
        self.tls: TlsFiles | None = None
        if secure:
            self.passwords = {user: secrets.token_urlsafe(12) for user in (*GATEWAY_USERS, HEADEND_USER)}
            self._write_password_file()
            self._write_acl_file()
            self.tls = make_tls_files(self.workdir / "tls")

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.secure else 'mqtt'}://{self.host}:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self._tls().ca_file

    @property
    def wrong_ca_file(self) -> Path:
        return self._tls().wrong_ca_file

    def __repr__(self) -> str:
        return f"Mosquitto({self.url}, pid={self.pid})"

    def _tls(self) -> TlsFiles:
        if self.tls is None:
            raise AttributeError("only a Mosquitto(secure=True) has TLS files")
        return self.tls

    def _argv(self) -> list[str]:
        return [self.binary, "-c", str(self.config_file)]

    def _pick_new_ports(self) -> None:
        self.port = free_port(self.host)

    def _write_config(self) -> None:
        lines = [
            "per_listener_settings false",
            f"persistence true\npersistence_location {self.workdir}/\npersistence_file mosquitto.db",
            f"autosave_interval {self.autosave_interval_s}",
            *(f"{key} {value}" for key, value in self.settings.items()),
            "set_tcp_nodelay true",
            "log_dest stderr\nlog_timestamp_format %Y-%m-%dT%H:%M:%S",
            # "information" carries the "running" line that start() waits for
            *(f"log_type {t}" for t in dict.fromkeys((*self.log_types, "information"))),
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # as root, mosquitto would switch to 'mosquitto' and lose workdir
        lines.append(f"listener {self.port} {self.host}")
        if self.secure:
            tls = self._tls()
            lines += [
                "allow_anonymous false",
                f"password_file {self.workdir / 'passwd'}",
                f"acl_file {self.workdir / 'acl'}",
                f"cafile {tls.ca_file}\ncertfile {tls.certfile}\nkeyfile {tls.keyfile}",
            ]
        else:
            lines.append("allow_anonymous true")
        self.config_file.write_text("\n".join(lines) + "\n")

    def _write_password_file(self) -> None:
        tool = find_binary("mosquitto_passwd", "/usr/bin/mosquitto_passwd")
        path = self.workdir / "passwd"
        path.write_text("")
        for user, password in self.passwords.items():
            proc = subprocess.run([tool, "-b", str(path), user, password], capture_output=True, check=False)
            if proc.returncode != 0:
                raise ServiceError(f"mosquitto_passwd failed: {proc.stdout!r} {proc.stderr!r}")

    def _write_acl_file(self) -> None:
        (self.workdir / "acl").write_text(
            self.acl
            if self.acl is not None
            else "# the head-end reads and writes everything\n"
            f"user {HEADEND_USER}\ntopic readwrite #\n\n"
            "# every user (so each gateway) writes only under its own prefix, reads its commands\n"
            f"pattern write {topics.PREFIX}/%u/#\npattern read {topics.PREFIX}/%u/down/#\n"
        )

    def _answers(self) -> bool:
        if " running" not in self._this_run_log():  # "mosquitto version 2.0.11 running": listening
            return False
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                return True
        except OSError:
            return False


# ---------------------------------------------------------------------------------------------
# influxd 1.x


class Influxd(_ChildServer):
    """An InfluxDB 1.x server: HTTP on 127.0.0.1:<free port>, RPC on another, data in ``workdir``.

    ``query``/``write``/``create_database``/``drop_database`` talk to its HTTP API with urllib and
    raise ``InfluxError`` (with ``.status`` and influxd's ``.error``) on any error answer.

    ``admin=(user, password)`` enables authentication (``auth-enabled = true``): the first start
    creates that admin user (influxd allows it while no user exists), and the helpers above
    authenticate as it. ``create_user`` adds users with privileges, for tests of refusals.
    ``data`` adds settings to the ``[data]`` section (values as TOML, e.g. ``'"1s"'``).
    """

    name = "influxd"

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        host: str = LOOPBACK,
        admin: tuple[str, str] | None = None,
        data: dict[str, str] | None = None,
    ) -> None:
        self.binary = find_binary("influxd", "/usr/bin/influxd", "/usr/local/bin/influxd")
        super().__init__(workdir, host)
        self.config_file = self.workdir / "influxdb.conf"
        self.port, self.rpc_port = free_ports(2, host)
        self.admin = admin
        self.data = dict(data or {})

    def start(self) -> None:
        first = not self._started_once
        super().start()
        if self.admin is not None and first:  # influxd takes this one query while no admin exists
            user, password = self.admin
            self.query_raw(f"CREATE USER {quote_ident(user)} WITH PASSWORD {_quote_str(password)} "
                           "WITH ALL PRIVILEGES")  # fmt: skip

    def create_user(self, user: str, password: str, grants: dict[str, str] | None = None) -> None:
        """A non-admin user with ``{database: "READ" | "WRITE" | "ALL"}`` privileges."""
        self.query_raw(f"CREATE USER {quote_ident(user)} WITH PASSWORD {_quote_str(password)}")
        for db, privilege in (grants or {}).items():
            self.query_raw(f"GRANT {privilege} ON {quote_ident(db)} TO {quote_ident(user)}")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"Influxd({self.url}, pid={self.pid})"

    def _argv(self) -> list[str]:
        return [self.binary, "run", "-config", str(self.config_file)]

    def _env(self) -> dict[str, str]:
        # INFLUXDB_* variables override the config file; never let the caller's leak in.
        return {k: v for k, v in os.environ.items() if not k.startswith("INFLUXDB_")}

    def _pick_new_ports(self) -> None:
        self.port, self.rpc_port = free_ports(2, self.host)

    def _write_config(self) -> None:
        w = self.workdir
        disabled = "".join(
            f"[[{s}]]\n  enabled = false\n" for s in ("graphite", "collectd", "opentsdb", "udp")
        )
        self.config_file.write_text(
            f'reporting-disabled = true\nbind-address = "{self.host}:{self.rpc_port}"\n'
            f'[meta]\n  dir = "{w / "meta"}"\n'
            f'[data]\n  dir = "{w / "data"}"\n  wal-dir = "{w / "wal"}"\n'
            '  query-log-enabled = false\n  wal-fsync-delay = "0s"\n'
            + "".join(f"  {k} = {v}\n" for k, v in self.data.items())
            + "[monitor]\n  store-enabled = false\n"
            "[subscriber]\n  enabled = false\n"
            "[shard-precreation]\n  enabled = false\n"
            f'[http]\n  enabled = true\n  bind-address = "{self.host}:{self.port}"\n'
            f"  auth-enabled = {'true' if self.admin else 'false'}\n"
            "  log-enabled = true\n  write-tracing = false\n  pprof-enabled = false\n"
            f"{disabled}"
            '[logging]\n  format = "logfmt"\n  level = "info"\n'
        )

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1.0) as resp:
                return bool(resp.status == 204)
        except (OSError, urllib.error.URLError):
            return False

    # -- HTTP API --------------------------------------------------------------------------

    def query_raw(
        self, influxql: str, db: str | None = None, *, epoch: str | None = "ms"
    ) -> list[dict[str, Any]]:
        """POST /query; influxd's ``results`` list, one entry per statement.

        Raises:
            InfluxError: HTTP error, or an error in any statement's result.
        """
        params = {"q": influxql}
        if db is not None:
            params["db"] = db
        if epoch is not None:
            params["epoch"] = epoch
        form = urllib.parse.urlencode(params).encode()
        body = self._request("/query", form, influxql, "application/x-www-form-urlencoded")
        results: list[dict[str, Any]] = json.loads(body)["results"]
        for result in results:
            if "error" in result:
                raise InfluxError(
                    f"influxd rejected {influxql!r}: {result['error']}", status=200, error=result["error"]
                )
        return results

    def query(
        self, influxql: str, db: str | None = None, *, epoch: str | None = "ms"
    ) -> list[dict[str, Any]]:
        """Rows as ``{tag or column: value}`` over every series of every statement.

        Times are integers in ``epoch`` units (milliseconds by default; ``epoch=None`` gives
        RFC 3339 strings). A series' tags (from GROUP BY) are merged into each of its rows; the
        measurement name is not (use ``query_raw`` for it).

        Raises:
            InfluxError: see ``query_raw``.
        """
        return list(self._rows(self.query_raw(influxql, db, epoch=epoch)))

    def write(self, lines: str | bytes, db: str, *, precision: str = "ms", rp: str | None = None) -> None:
        """POST line protocol to /write; returns when influxd answered 204.

        Raises:
            InfluxError: influxd refused the write (e.g. 400 with the offending line).
        """
        params = {"db": db, "precision": precision}
        if rp is not None:
            params["rp"] = rp
        data = lines.encode() if isinstance(lines, str) else lines
        self._request(f"/write?{urllib.parse.urlencode(params)}", data, "write", "text/plain; charset=utf-8")

    def create_database(self, name: str) -> None:
        self.query_raw(f"CREATE DATABASE {quote_ident(name)}")

    def drop_database(self, name: str) -> None:
        self.query_raw(f"DROP DATABASE {quote_ident(name)}")

    def databases(self) -> list[str]:
        return [row["name"] for row in self.query("SHOW DATABASES")]

    @staticmethod
    def _rows(results: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for result in results:
            for series in result.get("series", ()):
                tags = series.get("tags") or {}
                for values in series.get("values", ()):
                    yield {**tags, **dict(zip(series["columns"], values, strict=True))}

    def _request(self, path: str, data: bytes, what: str, content_type: str) -> bytes:
        headers = {"Content-Type": content_type}
        if self.admin is not None:
            token = base64.b64encode(":".join(self.admin).encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        req = urllib.request.Request(f"{self.url}{path}", data=data, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", "replace")
            try:
                error = str(json.loads(body)["error"])
            except (ValueError, KeyError, TypeError):
                error = body.strip()
            raise InfluxError(
                f"influxd {exc.code} for {what!r}: {error}", status=exc.code, error=error
            ) from exc
        except OSError as exc:
            raise ServiceError(f"{self!r} unreachable for {what!r}: {exc}") from exc


def quote_ident(name: str) -> str:
    """An InfluxQL double-quoted identifier."""
    return '"' + re.sub(r'(["\\])', r"\\\1", name) + '"'


def _quote_str(text: str) -> str:
    """An InfluxQL single-quoted string literal."""
    return "'" + re.sub(r"(['\\])", r"\\\1", text) + "'"


# ---------------------------------------------------------------------------------------------
# PostgreSQL


PG_BIN_DIRS = tuple(f"/usr/lib/postgresql/{v}/bin" for v in (17, 16, 15, 14, 13))


class Postgres(_ChildServer):
    """A PostgreSQL server on 127.0.0.1:<free port> (TCP only, no Unix socket), a cluster made by
    ``initdb`` at the first start, with one superuser ``user`` who logs in with ``password``
    (scram-sha-256). ``url`` names the ``postgres`` database; :meth:`create_database` makes
    another and returns its URL.

    PostgreSQL refuses to run as root: under root the cluster belongs to the ``os_user`` system
    account (the Debian package's ``postgres``), in a directory of its own under the system's
    temporary directory (removed at exit), and initdb and the server run as that account. Not
    under root they run as the caller, with the cluster in ``workdir``. The log is ``workdir``'s.

    ``stop()`` is a fast shutdown (SIGINT: open sessions are ended, no wait for clients);
    ``kill()`` is SIGKILL, after which ``start()`` recovers the cluster from its WAL. For tests
    the cluster runs with ``fsync = off`` (a server process crash loses nothing; a machine crash
    would).
    """

    name = "postgres"

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        host: str = LOOPBACK,
        user: str = "amigw",
        password: str | None = None,
        os_user: str = "postgres",
    ) -> None:
        # the versioned directory holds the server and its tools (PATH often has only a wrapper)
        found = find_binary("initdb", *(f"{d}/initdb" for d in PG_BIN_DIRS))
        self.bin_dir = str(Path(os.path.realpath(found)).parent)
        super().__init__(workdir, host)
        self.user = user
        self.password = password or secrets.token_urlsafe(12)
        self.port = free_port(host)
        self._as_root = os.geteuid() == 0
        self.os_user = os_user if self._as_root else None
        if self._as_root:
            import pwd  # POSIX only, and only needed under root
            import tempfile

            try:
                account = pwd.getpwnam(os_user)
            except KeyError:
                raise ServiceNotInstalledError(
                    f"no {os_user!r} system user (postgresql): {SETUP_HINT}"
                ) from None
            self.base = Path(tempfile.mkdtemp(prefix="amigw-pg-"))
            os.chown(self.base, account.pw_uid, account.pw_gid)
            atexit.register(shutil.rmtree, self.base, True)
        else:
            self.base = self.workdir
        self.data_dir = self.base / "data"

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, database: str) -> str:
        user, password = urllib.parse.quote(self.user), urllib.parse.quote(self.password)
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{database}"

    def __repr__(self) -> str:
        return f"Postgres({self.host}:{self.port}, pid={self.pid})"

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name``; returns its URL. Raises: ServiceError (with the tool's message)."""
        self._client("createdb", name)
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        """``DROP DATABASE name`` (ending its sessions). Raises: ServiceError."""
        self._client("dropdb", "--force", name)

    def stop(self, timeout_s: float | None = None) -> None:
        """Fast shutdown (SIGINT), then SIGKILL if still alive after ``timeout_s``."""
        self._end(signal.SIGINT, self.stop_timeout_s if timeout_s is None else timeout_s)

    def _client(self, tool: str, *args: str) -> None:
        argv = [f"{self.bin_dir}/{tool}", "-h", self.host, "-p", str(self.port), "-U", self.user, *args]
        env = {**self._env(), "PGPASSWORD": self.password}
        proc = subprocess.run(argv, capture_output=True, env=env, check=False, timeout=60)
        if proc.returncode != 0:
            raise ServiceError(f"{tool} {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")

    def _process_options(self) -> dict[str, Any]:
        if self.os_user is None:
            return {"cwd": self.base}
        return {"cwd": self.base, "user": self.os_user, "group": self.os_user, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        # PG* variables steer the client tools and the server; never let the caller's leak in.
        return {k: v for k, v in os.environ.items() if not k.startswith("PG")}

    def _argv(self) -> list[str]:
        return [
            f"{self.bin_dir}/postgres", "-D", str(self.data_dir), "-h", self.host, "-p", str(self.port),
            "-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "max_connections=200",
            "-c", "listen_addresses=" + self.host,
        ]  # fmt: skip

    def _pick_new_ports(self) -> None:
        self.port = free_port(self.host)

    def _write_config(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        try:
            if self.os_user is not None:
                shutil.chown(pwfile, self.os_user, self.os_user)
            options = self._process_options()
            with self.log_file.open("ab") as log:
                proc = subprocess.run(
                    [f"{self.bin_dir}/initdb", "-D", str(self.data_dir), "-U", self.user,
                     f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=trust",
                     "-E", "UTF8", "--no-sync", "--no-instructions"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=self._env(), check=False, timeout=120, **options,
                )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise self._error(f"initdb exited with status {proc.returncode}")

    def _answers(self) -> bool:
        argv = [f"{self.bin_dir}/pg_isready", "-h", self.host, "-p", str(self.port), "-t", "1"]
        return subprocess.run(argv, capture_output=True, env=self._env(), check=False).returncode == 0


# ---------------------------------------------------------------------------------------------
# VictoriaMetrics, the store beyond one machine


class VictoriaMetrics(_ChildServer):
    """A single-node VictoriaMetrics: HTTP on 127.0.0.1:<free port>, data in ``workdir``.

    Started with the flags the VictoriaMetrics sink needs (docs/victoriametrics.md): a retention
    of ``retention`` (billing data is kept for years, and samples days old must be accepted),
    ``-search.latencyOffset=0s`` and ``-search.disableCache`` (a query sees what was written,
    not a cached answer). ``force_flush()`` makes everything written so far searchable at once
    (VictoriaMetrics otherwise needs about a second, and up to ~10 s for a new series).
    """

    name = "victoria-metrics"

    def __init__(
        self, workdir: str | os.PathLike[str], *, host: str = LOOPBACK, retention: str = "100y"
    ) -> None:
        self.binary = find_binary("victoria-metrics", "/usr/bin/victoria-metrics")
        super().__init__(workdir, host)
        self.port = free_port(host)
        self.retention = retention

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"VictoriaMetrics({self.url}, pid={self.pid})"

    def _argv(self) -> list[str]:
        return [
            self.binary,
            f"-httpListenAddr={self.host}:{self.port}",
            f"-storageDataPath={self.workdir / 'data'}",
            f"-retentionPeriod={self.retention}",
            "-search.latencyOffset=0s",
            "-search.disableCache",
            "-loggerLevel=WARN",
        ]

    def _pick_new_ports(self) -> None:
        self.port = free_port(self.host)

    def _write_config(self) -> None:
        pass  # flags only

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1.0) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def force_flush(self) -> None:
        """``/internal/force_flush``: what was written is searchable when this returns."""
        with urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=30.0) as resp:
            resp.read()

    def export(self, match: str) -> list[dict[str, Any]]:
        """``/api/v1/export`` of ``match`` (all time): one dict per exported line."""
        form = urllib.parse.urlencode({"match[]": match}).encode()
        with urllib.request.urlopen(f"{self.url}/api/v1/export", data=form, timeout=30.0) as resp:
            return [json.loads(line) for line in resp.read().splitlines() if line.strip()]
