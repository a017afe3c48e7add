"""The shipped broker configuration (ingest/broker, docs/broker.md) against the installed mosquitto:
the whole file starts it (every option name and value is valid for this version), its size limits
match the pipeline's, and its ACL keeps gateways out of the head-end's topics."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.broker import ACL, SAMPLE
from protocols.payload import MAX_PAYLOAD_BYTES
from simulators.servers import Mosquitto
from tests.integration.test_services import NOT_AUTHORIZED, Peer, Received, _connected

pytestmark = pytest.mark.integration


class ShippedMosquitto(Mosquitto):
    """mosquitto run from the shipped file itself; only the site's paths and the port differ."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, secure=True, acl=ACL)

    def _write_config(self) -> None:
        tls = self._tls()
        site = {
            "pid_file": f"pid_file {self.workdir / 'mosquitto.pid'}",
            "persistence_location": f"persistence_location {self.workdir}/",
            "log_dest": "log_dest stderr",
            "listener": f"listener {self.port} {self.host}",
            "cafile": f"cafile {tls.ca_file}",
            "certfile": f"certfile {tls.certfile}",
            "keyfile": f"keyfile {tls.keyfile}",
            "password_file": f"password_file {self.workdir / 'passwd'}",
            "acl_file": f"acl_file {self.workdir / 'acl'}",
        }
        lines = []
        for line in SAMPLE.splitlines():
            key = line.split(" ", 1)[0]
            lines.append(site.pop(key) if key in site else line)
        assert not site, f"the shipped file lacks {sorted(site)}"
        if os.geteuid() == 0:
            lines.append("user root")
        self.config_file.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = ShippedMosquitto(tmp_path_factory.mktemp("shipped-mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def peers() -> Iterator[object]:
    made: list[Peer] = []

    def make(broker: Mosquitto, **kwargs: object) -> Peer:
        peer = Peer(broker, **kwargs)  # type: ignore[arg-type]
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def test_the_shipped_file_runs_and_takes_payloads_up_to_the_pipelines_bound(
    shipped: Mosquitto, peers
) -> None:  # type: ignore[no-untyped-def]
    headend = _connected(peers(shipped, user="headend"))
    assert headend.subscribe("$share/ingest/ami/v1/+/up/readings").value == 1
    gw1 = _connected(peers(shipped, user="gw-1"))
    assert gw1.publish("ami/v1/gw-1/up/readings", b"x" * MAX_PAYLOAD_BYTES).value == 0
    got = headend.next_message()
    assert (got.topic, len(got.payload)) == ("ami/v1/gw-1/up/readings", MAX_PAYLOAD_BYTES)
    # One byte more: refused by message_size_limit (MQTT 5 PUBACK 0x95 "packet too large", which
    # paho takes for a protocol error: it reconnects and tries again), never forwarded.
    big = _connected(peers(shipped, user="gw-2"))
    big.client.publish("ami/v1/gw-2/up/readings", b"x" * (MAX_PAYLOAD_BYTES + 1), qos=1)
    time.sleep(1.0)
    big.close()
    assert gw1.publish("ami/v1/gw-1/up/readings", b"marker").value == 0
    assert headend.next_message() == Received("ami/v1/gw-1/up/readings", b"marker", 1)


@pytest.mark.parametrize(
    "topic",
    ["ami/v1/gw-1/down/ack", "ami/v1/gw-1/down/cmd", "ami/v1/agg/intervals/gw-1", "ami/v1/gw-2/status"],
)
def test_a_gateway_cannot_publish_confirmations_commands_aggregates_or_for_others(  # type: ignore[no-untyped-def]
    mosquitto_secure: Mosquitto, peers, topic: str
) -> None:
    # A forged confirmation would make the edge drop batches the head-end never stored.
    headend = _connected(peers(mosquitto_secure, user="headend"))
    headend.subscribe(topic)
    headend.subscribe("ami/v1/gw-1/up/events")
    gw1 = _connected(peers(mosquitto_secure, user="gw-1"))
    assert gw1.publish(topic, b"forged").value == NOT_AUTHORIZED
    assert gw1.publish("ami/v1/gw-1/up/events", b"marker").value == 0
    assert headend.next_message() == Received("ami/v1/gw-1/up/events", b"marker", 1)  # not the forgery
    assert headend.messages.empty()


def test_a_gateway_publishes_its_status_and_reads_its_confirmations(
    mosquitto_secure: Mosquitto, peers
) -> None:  # type: ignore[no-untyped-def]
    gw1 = _connected(peers(mosquitto_secure, user="gw-1"))
    assert gw1.subscribe("ami/v1/gw-1/down/#").value == 1
    assert not gw1.publish("ami/v1/gw-1/status", b"online").is_failure  # 0x10: no subscribers
    headend = _connected(peers(mosquitto_secure, user="headend"))
    assert headend.publish("ami/v1/gw-1/down/ack", b"confirmed").value == 0
    assert gw1.next_message() == Received("ami/v1/gw-1/down/ack", b"confirmed", 1)
