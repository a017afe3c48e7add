"""Helpers for edge-agent end-to-end tests: config text, an MQTT recorder on the real broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

KEY_HEX = "5a" * 32
KEY = bytes.fromhex(KEY_HEX)


class MqttRecorder:
    """Subscribes on the real broker and records (topic, payload) pairs, thread-safely."""

    def __init__(
        self, host: str, port: int, topics: list[str], *, client_id: str = "recorder", **tls: object
    ) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        if tls.get("username"):
            self.client.username_pw_set(str(tls["username"]), str(tls.get("password", "")))
        if tls.get("ca_file"):
            self.client.tls_set(ca_certs=str(tls["ca_file"]))

        def on_connect(client, userdata, flags, rc, props=None):  # type: ignore[no-untyped-def]
            for t in topics:
                client.subscribe(t, qos=1)
            self._ready.set()

        def on_message(client, userdata, msg):  # type: ignore[no-untyped-def]
            with self._lock:
                self.messages.append((msg.topic, bytes(msg.payload)))

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.connect(host, port)
        self.client.loop_start()
        assert self._ready.wait(10), "recorder could not connect"
        time.sleep(0.2)

    def snapshot(self, topic_suffix: str = "") -> list[bytes]:
        with self._lock:
            return [p for t, p in self.messages if t.endswith(topic_suffix)]

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError("timed out waiting for MQTT messages")

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def edge_toml(
    tmp: str, gateway: str, mqtt_url: str, buses: str, meters: str, plans: str, extra: str = ""
) -> str:
    return f'''
gateway_id = "{gateway}"
command_key = "{KEY_HEX}"
metrics_listen = ""
state_dir = "{tmp}/state"
{extra}
[mqtt]
url = "{mqtt_url}"
[outbox]
path = "{tmp}/outbox.sqlite"
max_inflight = 64
{buses}
{meters}
{plans}
'''
