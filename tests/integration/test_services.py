"""The service fixtures are real and behave as the rest of the suite assumes (DESIGN §8).

Each check has a positive control where the negative could pass vacuously (a denied message is
proven absent by a later marker message on the same connection, a refused TLS connection next to
an accepted one).
"""

from __future__ import annotations

import os
import queue
import socket
import ssl
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from simulators.servers import (
    Influxd,
    InfluxError,
    Mosquitto,
    ServiceError,
    ServiceNotInstalledError,
    find_binary,
)

pytestmark = pytest.mark.integration

TIMEOUT_S = 5.0
V5, V311 = mqtt.MQTTv5, mqtt.MQTTv311
NOT_AUTHORIZED = 0x87


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    payload: bytes
    qos: int


class Peer:
    """A paho client driven synchronously: connect() waits for CONNACK, publish() for PUBACK."""

    def __init__(self, broker: Mosquitto, *, protocol: int = V5, user: str | None = None,
                 password: str | None = None, ca_file: Path | None = None, client_id: str = "",
                 clean: bool = True) -> None:  # fmt: skip
        self.broker = broker
        self.protocol = protocol
        self.clean = clean
        self.client_id = client_id or f"t-{uuid.uuid4().hex[:10]}"
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            clean_session=None if protocol == V5 else clean,
        )
        if user is not None:
            self.client.username_pw_set(user, password if password is not None else broker.passwords[user])
        if broker.secure:
            self.client.tls_set(ca_certs=str(ca_file or broker.ca_file))
        self.messages: queue.Queue[Received] = queue.Queue()
        self._acks: dict[int, ReasonCode] = {}
        self._cond = threading.Condition()
        self.connacks: list[tuple[ReasonCode, bool]] = []
        self.disconnects = 0
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=1)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_ack
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        with self._cond:
            self.connacks.append((reason_code, bool(flags.session_present)))
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        with self._cond:
            self.disconnects += 1
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        self.messages.put(Received(msg.topic, msg.payload, msg.qos))

    def _on_ack(self, client, userdata, mid, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        with self._cond:
            self._acks[mid] = reason_code
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        self._on_ack(client, userdata, mid, reason_codes[0], properties)

    def _wait(self, predicate):  # type: ignore[no-untyped-def]
        with self._cond:
            assert self._cond.wait_for(predicate, TIMEOUT_S), (
                f"timed out; broker log:\n{self.broker.log_tail()}"
            )
            return predicate()

    def connect(self) -> tuple[ReasonCode, bool]:
        """(CONNACK reason code, session present)."""
        properties = None
        if self.protocol == V5 and not self.clean:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 300
        kwargs = {"clean_start": self.clean, "properties": properties} if self.protocol == V5 else {}
        self.client.connect(self.broker.host, self.broker.port, keepalive=30, **kwargs)
        self.client.loop_start()
        return self._wait(lambda: self.connacks and self.connacks[0])  # type: ignore[no-any-return]

    def subscribe(self, topic: str) -> ReasonCode:
        _, mid = self.client.subscribe(topic, qos=1)
        return self._wait(lambda: self._acks.get(mid))  # type: ignore[no-any-return]

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        mid = self.client.publish(topic, payload, qos=1).mid
        return self._wait(lambda: self._acks.get(mid))  # type: ignore[no-any-return]

    def next_message(self) -> Received:
        try:
            return self.messages.get(timeout=TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"no message within {TIMEOUT_S} s; log:\n{self.broker.log_tail()}") from None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers():  # type: ignore[no-untyped-def]
    made: list[Peer] = []

    def make(broker: Mosquitto, **kwargs: object) -> Peer:
        peer = Peer(broker, **kwargs)  # type: ignore[arg-type]
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def _connected(peer: Peer) -> Peer:
    reason, _ = peer.connect()
    assert not reason.is_failure, reason
    return peer


# --------------------------------------------------------------------------------------------
# plain broker


@pytest.mark.parametrize("protocol", [V5, V311], ids=["mqtt5", "mqtt311"])
def test_plain_broker_qos1_round_trip(mosquitto: Mosquitto, peers, protocol: int) -> None:  # type: ignore[no-untyped-def]
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    topic = f"test/round-trip/{uuid.uuid4().hex}"
    sub = _connected(peers(mosquitto, protocol=protocol))
    assert sub.subscribe(topic).value == 1  # granted QoS 1
    pub = _connected(peers(mosquitto, protocol=protocol))

    assert pub.publish(topic, b"\x00reading\xff").value == 0
    assert sub.next_message() == Received(topic, b"\x00reading\xff", 1)


@pytest.mark.parametrize("protocol", [V5, V311], ids=["mqtt5", "mqtt311"])
def test_restart_on_same_port_keeps_queued_qos1_message(mosquitto: Mosquitto, peers, protocol: int) -> None:  # type: ignore[no-untyped-def]
    topic = f"test/persist/{uuid.uuid4().hex}"
    client_id = f"persistent-{uuid.uuid4().hex[:8]}"
    sub = _connected(peers(mosquitto, protocol=protocol, client_id=client_id, clean=False))
    sub.subscribe(topic)
    sub.close()  # session stays on the broker; what arrives now is queued for it
    pub = _connected(peers(mosquitto, protocol=protocol))
    assert not pub.publish(topic, b"queued while offline").is_failure
    pub.close()
    port, old_pid = mosquitto.port, mosquitto.pid
    assert old_pid is not None

    mosquitto.stop()
    assert not mosquitto.running
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)
    mosquitto.start()

    assert (mosquitto.port, mosquitto.running) == (port, True)
    again = peers(mosquitto, protocol=protocol, client_id=client_id, clean=False)
    reason, session_present = again.connect()
    assert (reason.is_failure, session_present) == (False, True)
    assert again.next_message() == Received(topic, b"queued while offline", 1)


# --------------------------------------------------------------------------------------------
# secure broker: TLS, passwords, ACL


def test_secure_gateway_publishes_under_its_prefix(mosquitto_secure: Mosquitto, peers) -> None:  # type: ignore[no-untyped-def]
    assert mosquitto_secure.url == f"mqtts://127.0.0.1:{mosquitto_secure.port}"
    headend = _connected(peers(mosquitto_secure, user="headend"))
    assert headend.subscribe("$share/ingest/ami/v1/+/up/readings").value == 1
    gw1 = _connected(peers(mosquitto_secure, user="gw-1"))

    assert gw1.publish("ami/v1/gw-1/up/readings", b"batch-1").value == 0
    assert headend.next_message() == Received("ami/v1/gw-1/up/readings", b"batch-1", 1)


@pytest.mark.parametrize(
    ("protocol", "expected_puback"),
    # Observed with mosquitto 2.0.11 (Debian 2.0.11-1.2+deb12u2): the broker answers PUBACK "Not
    # authorized" (0x87) -- 3.1.1 has no reason codes, so there the PUBACK looks like success --
    # and drops the message. It also closes the connection, but only when max_queued_messages is
    # 0 (unlimited): with the shipped limits the client stays connected.
    [(V5, NOT_AUTHORIZED), (V311, 0)],
    ids=["mqtt5", "mqtt311"],
)
def test_secure_gateway_cannot_publish_for_another_gateway(  # type: ignore[no-untyped-def]
    mosquitto_secure: Mosquitto, peers, protocol: int, expected_puback: int
) -> None:
    headend = _connected(peers(mosquitto_secure, user="headend"))
    # up/ only: other tests on this session broker leave retained ami/v1/gw-1/status messages
    headend.subscribe("ami/v1/+/up/#")
    gw1 = _connected(peers(mosquitto_secure, user="gw-1", protocol=protocol))

    assert gw1.publish("ami/v1/gw-2/up/readings", b"forged").value == expected_puback
    assert gw1.publish("ami/v1/gw-1/up/events", b"marker").value == 0
    # Same publisher, in order: had the forged message been routed, it would arrive first.
    assert headend.next_message() == Received("ami/v1/gw-1/up/events", b"marker", 1)
    assert headend.messages.empty()


def test_secure_gateway_reads_only_its_own_commands(mosquitto_secure: Mosquitto, peers) -> None:  # type: ignore[no-untyped-def]
    gw1 = _connected(peers(mosquitto_secure, user="gw-1"))
    gw1.subscribe("ami/v1/gw-1/down/#")
    gw1.subscribe("ami/v1/gw-2/down/#")
    headend = _connected(peers(mosquitto_secure, user="headend"))

    headend.publish("ami/v1/gw-2/down/cmd", b"not for gw-1")
    headend.publish("ami/v1/gw-1/down/cmd", b"for gw-1")
    assert gw1.next_message() == Received("ami/v1/gw-1/down/cmd", b"for gw-1", 1)
    assert gw1.messages.empty()


@pytest.mark.parametrize(
    ("user", "password"),
    [("gw-1", "wrong-password"), ("nobody", "x"), (None, None)],
    ids=["wrong-password", "unknown-user", "anonymous"],
)
def test_secure_broker_refuses_bad_credentials_at_connect(  # type: ignore[no-untyped-def]
    mosquitto_secure: Mosquitto, peers, user: str | None, password: str | None
) -> None:
    peer = peers(mosquitto_secure, user=user, password=password) if user else peers(mosquitto_secure)
    reason, _ = peer.connect()
    # mosquitto 2.0.11 answers both a bad password and a missing one with "Not authorized".
    assert (reason.is_failure, reason.value) == (True, NOT_AUTHORIZED), reason


def test_tls_handshake_needs_the_right_ca(mosquitto_secure: Mosquitto) -> None:
    address = (mosquitto_secure.host, mosquitto_secure.port)
    good = ssl.create_default_context(cafile=str(mosquitto_secure.ca_file))
    with (
        socket.create_connection(address, timeout=TIMEOUT_S) as raw,
        good.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() in {"TLSv1.2", "TLSv1.3"}

    wrong = ssl.create_default_context(cafile=str(mosquitto_secure.wrong_ca_file))
    with (
        socket.create_connection(address, timeout=TIMEOUT_S) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"),
    ):
        wrong.wrap_socket(raw, server_hostname="127.0.0.1")


def test_paho_with_wrong_ca_fails_at_handshake(mosquitto_secure: Mosquitto, peers) -> None:  # type: ignore[no-untyped-def]
    peer = peers(mosquitto_secure, user="gw-1", ca_file=mosquitto_secure.wrong_ca_file)
    with pytest.raises(ssl.SSLCertVerificationError):
        peer.connect()


# MQTT 3.1.1 CONNECT, clean session, keepalive 30, client id "probe"
_RAW_CONNECT = b"\x10\x11\x00\x04MQTT\x04\x02\x00\x1e\x00\x05probe"


def _raw_connect_answer(broker: Mosquitto) -> bytes:
    with socket.create_connection((broker.host, broker.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(_RAW_CONNECT)
        try:
            return sock.recv(4)
        except ConnectionResetError:
            return b""


def test_plain_mqtt_to_the_tls_port_fails(mosquitto: Mosquitto, mosquitto_secure: Mosquitto) -> None:
    assert _raw_connect_answer(mosquitto) == b"\x20\x02\x00\x00"  # control: CONNACK accepted
    assert _raw_connect_answer(mosquitto_secure) == b""  # closed, no CONNACK


# --------------------------------------------------------------------------------------------
# influxd


def test_influx_write_then_query_returns_tags_and_fields(influx_db: tuple[Influxd, str]) -> None:
    influxd, db = influx_db
    assert db in influxd.databases()
    influxd.write(
        # a tag value with an escaped space and comma; integer, boolean and string fields
        'reading,meter=M\\ 001\\,A,quantity=fwd_active value=123456i,flags=0i,ok=true,note="a b" '
        "1700000000000\n"
        'reading,meter=M2,quantity=fwd_active value=7i,flags=4i,ok=false,note="" 1700000900000\n',
        db=db,
    )

    rows = influxd.query('SELECT * FROM "reading" WHERE "meter" = \'M 001,A\'', db=db)
    assert rows == [
        {"time": 1700000000000, "flags": 0, "meter": "M 001,A", "note": "a b", "ok": True,
         "quantity": "fwd_active", "value": 123456},
    ]  # fmt: skip
    grouped = influxd.query('SELECT sum("value") FROM "reading" GROUP BY "meter"', db=db)
    assert sorted((r["meter"], r["sum"]) for r in grouped) == [("M 001,A", 123456), ("M2", 7)]


def test_influx_restart_keeps_data_and_ports(influx_db: tuple[Influxd, str]) -> None:
    influxd, db = influx_db
    influxd.write(b"energy,meter=m1 value=42i 1700000000000", db=db, precision="ms")
    ports = (influxd.port, influxd.rpc_port)

    influxd.stop()
    assert not influxd.running
    with pytest.raises(ServiceError, match="unreachable"):
        influxd.query("SHOW DATABASES")
    influxd.start()

    assert (influxd.port, influxd.rpc_port) == ports
    assert influxd.query('SELECT "value" FROM "energy"', db=db) == [{"time": 1700000000000, "value": 42}]


def test_influx_errors_are_clear_exceptions(influx_db: tuple[Influxd, str]) -> None:
    influxd, db = influx_db
    with pytest.raises(InfluxError, match="error parsing query") as syntax:
        influxd.query("SELEC * FORM nowhere", db=db)
    assert syntax.value.status == 400
    with pytest.raises(InfluxError, match="database not found") as missing:
        influxd.query("SELECT * FROM x", db=f"{db}_missing")
    assert "SELECT * FROM x" in str(missing.value)
    with pytest.raises(InfluxError, match="unable to parse") as bad_line:
        influxd.write("no fields here 123", db=db)
    assert bad_line.value.status == 400


# --------------------------------------------------------------------------------------------
# process hygiene


def test_kill_leaves_no_process_and_restart_works(tmp_path) -> None:  # type: ignore[no-untyped-def]
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        pid = broker.pid
        assert pid is not None
        broker.kill()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert broker.pid is None
        broker.start()
        assert broker.running and broker.pid != pid
        assert "running" in broker.log_tail()
    finally:
        broker.stop()
    assert not broker.running


def test_missing_binary_names_the_setup_command() -> None:
    with pytest.raises(
        ServiceNotInstalledError, match=r"no-such-server not found: run `bash \.ci/bootstrap setup`"
    ):
        find_binary("no-such-server", "/nonexistent/no-such-server")
