"""A poison command stream against a running edge agent (real mosquitto, a simulated meter on TCP).

Hypothesis generates more than 10,000 messages for ``ami/v1/<gw>/down/cmd`` -- correctly signed
commands with wrong-typed or unknown params, extreme and wrong-typed fields, unknown meters,
other gateways, bad and missing signatures, other spellings of signed commands (BOM, UTF-16/32,
whitespace, unsorted or duplicate keys, other escapes), garbage bytes, JSON that is not a
command, deep nesting and oversized messages -- mixed with a few valid commands and replays of
them. They go through the broker to ``amigw edge`` running as its own process; each one must be
answered, in order, with the expected signed result:

* every valid command ``done`` exactly once (the simulated meter obeys it), every replay
  ``rejected``/``replayed``, every bad message ``rejected`` with its reason;
* the process never exits, and ``amigw_command_errors_total{reason}`` counts exactly the
  rejections;
* stopped, sent more poison (among it the message that used to crash it: a signed ``read_now``
  whose ``params`` is a list) and restarted on the same broker session, it answers those too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from protocols.commands import ACTIONS, RELAY_ACTIONS, Command, decode_result, encode, signed_json
from protocols.quantities import QUANTITIES
from simulators.dlt645_sim import Dlt645Simulator
from simulators.servers import free_port
from tests.e2e.edge_helpers import KEY, MqttRecorder, edge_toml

pytestmark = pytest.mark.integration

GW = "gw-poison"
METER = "000000000901"
EXAMPLES, PER_EXAMPLE = 190, 55  # 10,450 messages, one valid command and one replay per example
NAMES = sorted(q.name for q in QUANTITIES)
DAY_MS = 24 * 3600 * 1000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- the messages ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Poison:
    """A message to build at send time (ids are fresh, windows relative to the clock then)."""

    build: Callable[[str, int], bytes]  # (id, now_ms) -> payload
    status: str
    reason: str | None


def _doc(cid: str, now: int, **fields: Any) -> dict[str, Any]:
    return Command(cid, GW, METER, "trip", now, now + 600_000).to_dict() | fields


def _signed(**fields: Any) -> Callable[[str, int], bytes]:
    return lambda cid, now: signed_json(_doc(cid, now, **fields), KEY)


def _rejected(reason: str) -> Callable[[Callable[[str, int], bytes]], Poison]:
    return lambda build: Poison(build, "rejected", reason)


json_leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.text(max_size=12))
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
not_a_name = st.text(max_size=16).filter(lambda n: n not in NAMES)
bad_quantities = st.one_of(
    json_values.filter(lambda v: not isinstance(v, list)),
    st.just([]),
    st.lists(json_values.filter(lambda v: not isinstance(v, str)), min_size=1, max_size=3),
    st.lists(not_a_name, min_size=1, max_size=3),
    st.sampled_from(NAMES).map(lambda n: [n, n]),
    st.lists(st.sampled_from(NAMES), min_size=65, max_size=70),
)
bad_params = st.one_of(
    st.tuples(st.sampled_from(sorted(ACTIONS)), json_values.filter(lambda v: not isinstance(v, dict))),
    st.tuples(
        st.sampled_from(sorted(ACTIONS)),
        st.dictionaries(
            st.text(max_size=8).filter(lambda k: k != "quantities"), json_values, min_size=1, max_size=3
        ),
    ),
    st.tuples(st.just("read_now"), bad_quantities.map(lambda q: {"quantities": q})),
    st.tuples(
        st.sampled_from(sorted(ACTIONS - {"read_now"})),
        st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True).map(
            lambda q: {"quantities": q}
        ),
    ),
).map(lambda ap: _rejected("malformed")(_signed(action=ap[0], params=ap[1])))

wrong_typed_fields = st.one_of(
    st.tuples(
        st.just("id"), st.one_of(st.integers(), st.none(), st.just(""), st.text(min_size=129, max_size=300))
    ),
    st.tuples(
        st.just("meter"), st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2))
    ),
    st.tuples(st.just("gateway"), st.one_of(st.integers(), st.none())),
    st.tuples(
        st.just("action"), st.one_of(st.text(max_size=12).filter(lambda a: a not in ACTIONS), st.integers())
    ),
    st.tuples(
        st.sampled_from(["issued_ms", "expires_ms"]), st.one_of(st.booleans(), st.text(max_size=8), st.none())
    ),
    st.tuples(st.just("params"), st.none()),
).map(lambda kv: _rejected("malformed")(_signed(**{kv[0]: kv[1]})))

# A float cannot be signed (the canonical encoding refuses it): sent with a made-up signature.
with_floats = st.tuples(
    st.sampled_from(["issued_ms", "expires_ms", "params"]), st.floats(allow_nan=False, allow_infinity=False)
).map(
    lambda kv: _rejected("malformed")(
        lambda cid, now: json.dumps(
            _doc(cid, now, **{kv[0]: kv[1] if kv[0] != "params" else {"x": kv[1]}}, sig="00" * 32),
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
    )
)

extreme = st.one_of(
    st.integers(1, 10**30).map(  # a validity window longer than a day
        lambda d: _rejected("malformed")(
            lambda cid, now: signed_json(_doc(cid, now, expires_ms=now + DAY_MS + d), KEY)
        )
    ),
    st.integers(-(10**30), -1).map(
        lambda v: _rejected("malformed")(_signed(issued_ms=v, expires_ms=v + 1000))
    ),
    st.integers(10_000, 10**30).map(  # issued far ahead: beyond the 60 s skew
        lambda d: _rejected("not_yet_valid")(
            lambda cid, now: signed_json(
                _doc(cid, now, issued_ms=now + 60_000 + d, expires_ms=now + 61_000 + d), KEY
            )
        )
    ),
    st.integers(10_000, 10**12).map(
        lambda d: _rejected("expired")(
            lambda cid, now: signed_json(_doc(cid, now, issued_ms=now - d - 1000, expires_ms=now - d), KEY)
        )
    ),
)

other_addressee = st.one_of(
    st.from_regex(r"0000000[0-9]{5}", fullmatch=True)
    .filter(lambda m: m != METER)
    .map(lambda m: _rejected("unknown_meter")(_signed(meter=m))),
    st.sampled_from(["gw-other", "agg", GW.upper()]).map(
        lambda g: _rejected("malformed")(_signed(gateway=g))
    ),
)

bad_signature = st.one_of(
    st.binary(min_size=16, max_size=32).map(
        lambda k: _rejected("bad_signature")(lambda cid, now: signed_json(_doc(cid, now), k + b"!"))
    ),
    st.just(_rejected("bad_signature")(lambda cid, now: encode(_doc(cid, now)))),  # unsigned
    st.one_of(st.text(max_size=70), st.integers(), st.none(), st.booleans()).map(
        lambda sig: _rejected("bad_signature")(lambda cid, now: encode(_doc(cid, now, sig=sig)))
    ),
    st.just(_rejected("bad_signature")(lambda cid, now: _upper_sig(signed_json(_doc(cid, now), KEY)))),
)


def _upper_sig(raw: bytes) -> bytes:
    i = raw.index(b'"sig":"') + 7
    return raw[:i] + raw[i : i + 64].upper() + raw[i + 64 :]


def _reorder(raw: bytes) -> bytes:
    return json.dumps(dict(reversed(json.loads(raw).items())), separators=(",", ":")).encode()


RESPELLINGS: dict[str, Callable[[bytes], bytes]] = {
    "bom": lambda r: b"\xef\xbb\xbf" + r,
    "utf16": lambda r: r.decode().encode("utf-16"),
    "utf16be": lambda r: r.decode().encode("utf-16-be"),
    "utf32": lambda r: r.decode().encode("utf-32"),
    "spaces": lambda r: json.dumps(json.loads(r), sort_keys=True).encode(),
    "indent": lambda r: json.dumps(json.loads(r), sort_keys=True, indent=1).encode(),
    "newline": lambda r: r + b"\n",
    "unsorted": _reorder,
    "duplicate_key": lambda r: r.replace(b'{"action":"', b'{"action":"alarm","action":"'),
    "escaped_char": lambda r: r.replace(b'"p-', b'"\\u0070-'),
}
# Another spelling of a correctly signed, otherwise valid command: never executed.
respelt = st.tuples(st.sampled_from(sorted(RESPELLINGS)), st.sampled_from(sorted(RELAY_ACTIONS))).map(
    lambda sa: _rejected("malformed")(
        lambda cid, now: RESPELLINGS[sa[0]](signed_json(_doc(cid, now, action=sa[1]), KEY))
    )
)

garbage = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=100).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(2, 40_000).map(lambda n: b"[" * n),
    st.integers(2, 40_000).map(lambda n: b'{"a":' * n),
    st.sampled_from([2, 0, "1", True]).map(lambda v: signed_json({"v": v, "type": "command"}, KEY)),
    st.sampled_from(["event", "cmd-result", "status", ""]).map(
        lambda t: encode(Command("x", GW, METER, "trip", 0, 1).to_dict() | {"type": t})
    ),
    st.integers(65 * 1024, 80 * 1024).map(lambda n: b'{"pad":"' + b"x" * n + b'"}'),  # oversized
).map(lambda raw: _rejected("malformed")(lambda cid, now: raw))

deep_params = st.integers(20, 400).map(
    lambda depth: _rejected("malformed")(
        lambda cid, now: signed_json(_doc(cid, now, action="read_now", params=_nested(depth)), KEY)
    )
)


def _nested(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for _ in range(depth):
        doc = {"quantities": doc}
    return doc


poison = st.one_of(
    bad_params,
    wrong_typed_fields,
    with_floats,
    extreme,
    other_addressee,
    bad_signature,
    respelt,
    garbage,
    deep_params,
)
VALID_ACTIONS = ["trip", "close_allowed", "direct_close", "alarm", "alarm_release", "read_now", "time_sync"]


# -- the running pieces ------------------------------------------------------------------------


class SimulatorThread:
    """A DL/T 645 simulator serving TCP from its own event loop thread (the test body is sync)."""

    def __init__(self, meters: list[str]) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="simulator", daemon=True)
        self._thread.start()
        self.sim: Dlt645Simulator = self.call(self._start(meters))
        self.port: int = self.call(self.sim.serve_tcp())

    async def _start(self, meters: list[str]) -> Dlt645Simulator:
        return Dlt645Simulator(meters, load_kw=20.0)

    def call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(15)

    def close(self) -> None:
        self.call(self.sim.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class Agent:
    """``amigw edge`` as its own process."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "edge", "--config", str(self.config)],
                stdout=out,
                stderr=out,
                env=os.environ.copy(),
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def stack(mosquitto, tmp_path: Path) -> Iterator[tuple[SimulatorThread, Agent, MqttRecorder, int]]:  # type: ignore[no-untyped-def]
    sim = SimulatorThread([METER])
    metrics_port = free_port()
    text = edge_toml(
        str(tmp_path),
        GW,
        mosquitto.url,
        f'[[buses]]\nname = "b"\nport = "tcp://127.0.0.1:{sim.port}"\nbaud = 9600\n',
        f'[[meters]]\nid = "{METER}"\nbus = "b"\naddress = "{METER}"\nplans = ["slow"]\n',
        '[[plans]]\nname = "slow"\nquantities = ["energy_fwd_active_total"]\ninterval_s = 60\n',
        extra="[clock]\nutc_offset_min = 480\n",
    ).replace('metrics_listen = ""', f'metrics_listen = "127.0.0.1:{metrics_port}"')
    config = tmp_path / "edge.toml"
    config.write_text(text)
    rec = MqttRecorder(
        mosquitto.host,
        mosquitto.port,
        [f"ami/v1/{GW}/up/cmd-result", f"ami/v1/{GW}/status"],
        client_id="rec-poison",
    )
    agent = Agent(config, tmp_path / "agent.log")
    agent.start()
    try:
        yield sim, agent, rec, metrics_port
    finally:
        if agent.alive():
            agent.stop()
        rec.close()
        sim.close()


def _metrics(port: int) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.findall(
        r'^amigw_(command_errors|commands)_total\{(?:reason|status)="([a-z_]+)"\} (\S+)$', text, re.M
    )
    return {(name, label): float(value) for name, label, value in found}


def test_poison_command_stream(stack: tuple[SimulatorThread, Agent, MqttRecorder, int]) -> None:
    sim, agent, rec, metrics_port = stack
    ids = (f"p-{n}" for n in itertools.count())
    sent_valid: list[tuple[str, bytes]] = []
    expected: Counter[tuple[str, str | None]] = Counter()
    total = 0

    def results() -> list[bytes]:
        return rec.snapshot("/up/cmd-result")

    # subscribed once it says it is online (it subscribes first)
    rec.wait_for(
        lambda: any(json.loads(p)["online"] for p in rec.snapshot("/status")) or not agent.alive(), 30
    )
    assert agent.alive(), agent.tail()

    def send(batch: list[tuple[str, bytes, str, str | None]]) -> None:
        """Publish, wait for one result per message, and check each against its expectation."""
        nonlocal total
        before = len(results())
        for _, payload, _, _ in batch:
            rec.client.publish(f"ami/v1/{GW}/down/cmd", payload, qos=1)
        try:
            rec.wait_for(lambda: len(results()) >= before + len(batch) or not agent.alive(), 60)
        except AssertionError:
            raise AssertionError(
                f"{len(results()) - before} of {len(batch)} answered\n{agent.tail()}"
            ) from None
        assert agent.alive(), agent.tail()
        got = [decode_result(p, KEY) for p in results()[before:]]
        assert len(got) == len(batch)
        for (cid, payload, status, reason), res in zip(batch, got, strict=True):
            assert (res.status, res.reason) == (status, reason), (payload[:200], res)
            if status == "done":
                assert res.id == cid
            expected[(status, reason)] += 1
        total += len(batch)

    def valid(action: str) -> tuple[str, bytes, str, str | None]:
        cid, now = next(ids), now_ms()
        params = {"quantities": ["voltage_a"]} if action == "read_now" else {}
        payload = Command(cid, GW, METER, action, now, now + 600_000, params).signed(KEY)
        sent_valid.append((cid, payload))
        return cid, payload, "done", None

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        bad=st.lists(poison, min_size=PER_EXAMPLE - 2, max_size=PER_EXAMPLE - 2),
        action=st.sampled_from(VALID_ACTIONS),
        valid_at=st.integers(0, PER_EXAMPLE - 2),
        replay_at=st.integers(0, PER_EXAMPLE - 1),
    )
    def stream(bad: list[Poison], action: str, valid_at: int, replay_at: int) -> None:
        now = now_ms()
        batch = [(cid := next(ids), p.build(cid, now), p.status, p.reason) for p in bad]
        batch.insert(valid_at, valid(action))
        if replay_at <= valid_at and len(sent_valid) > 1:  # a replay of the previous example's
            replayed_id, replayed = sent_valid[-2]
        else:  # a replay of this example's valid command, after it
            replayed_id, replayed = sent_valid[-1]
            replay_at = max(replay_at, valid_at + 1)
        batch.insert(replay_at, (replayed_id, replayed, "rejected", "replayed"))
        send(batch)

    stream()
    assert total >= 10_000, total
    assert expected[("done", None)] >= 150  # the valid ones were executed, once each

    # One time sync, checked on the meter: it keeps local time (UTC+8 in this configuration).
    send([valid("time_sync")])
    skew = sim.call(_meter_time(sim.sim)) - (dt.datetime.utcnow() + dt.timedelta(hours=8))
    assert abs(skew.total_seconds()) < 5, skew

    metrics = _metrics(metrics_port)
    for (status, reason), n in expected.items():
        if status != "done":
            assert metrics[("command_errors", str(reason))] == n, (reason, n, metrics)
    assert metrics[("commands", "rejected")] == sum(n for (s, _), n in expected.items() if s == "rejected")

    # Stopped, sent the message that used to crash it (and more) on its persistent session,
    # restarted: it answers them all and stays up.
    assert agent.stop() == 0, agent.tail()
    crash_id, now = next(ids), now_ms()
    crash = Command(crash_id, GW, METER, "read_now", now, now + 600_000).to_dict() | {"params": ["voltage_a"]}
    queued = [
        (crash_id, signed_json(crash, KEY), "rejected", "malformed"),
        (sent_valid[-1][0], sent_valid[-1][1], "rejected", "replayed"),
        (next(ids), b'{"v":1,"type":"command","id":"x","params":[', "rejected", "malformed"),
        valid("trip"),
    ]
    before = len(results())
    for _, payload, _, _ in queued:
        rec.publish(f"ami/v1/{GW}/down/cmd", payload)
    agent.start()
    rec.wait_for(lambda: len(results()) >= before + len(queued), 60)
    got = [decode_result(p, KEY) for p in results()[before:]]
    assert [(r.status, r.reason) for r in got] == [(s, r) for _, _, s, r in queued]
    assert agent.alive(), agent.tail()
    assert sim.sim.meter(METER).relay_open


async def _meter_time(sim: Dlt645Simulator) -> dt.datetime:
    return sim.meter(METER).local_time()
