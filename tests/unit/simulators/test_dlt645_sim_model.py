"""The DL/T 645 simulator's meter model and request handling, without any I/O (handle() on frames)."""

from __future__ import annotations

import datetime as dt

from protocols.dlt645 import (
    ErrorBits,
    Password,
    RelayCode,
    decode_frame,
    decode_read_response,
    decode_value,
    parse_response,
    read_address_request,
    read_followup_request,
    read_request,
    relay_control_request,
    time_sync_request,
)
from protocols.errors import MeterErrorReply
from simulators.dlt645_sim import Dlt645Simulator

A1, A2 = "000000000001", "000000000002"
START = dt.datetime(2026, 3, 2, 7, 30).timestamp()  # 07:30 local: valley (tariff 4) until 08:00


class Clock:
    def __init__(self) -> None:
        self.t = START

    def __call__(self) -> float:
        return self.t


def _sim(**kw: object) -> tuple[Dlt645Simulator, Clock]:
    clock = Clock()
    return Dlt645Simulator([A1, A2], clock=clock, load_kw=2.0, **kw), clock  # type: ignore[arg-type]


def _ask(sim: Dlt645Simulator, wire: bytes) -> bytes | None:
    reply, _ = sim.handle(decode_frame(wire))
    return reply


def _read(sim: Dlt645Simulator, address: str, di: int, edition: int = 2007) -> object:
    reply = _ask(sim, read_request(address, di, edition=edition))
    assert reply is not None
    return decode_value(di, decode_read_response(decode_frame(reply), di=di).data)


def test_energy_splits_by_time_of_use_across_a_boundary() -> None:
    sim, clock = _sim()
    clock.t += 3600  # 07:30-08:00 valley, 08:00-08:30 flat at 2 kW
    assert _read(sim, A1, 0x0001FF00) == (200, 0, 0, 100, 100)
    assert sim.meter(A1).energy("energy_fwd_active_t4") == 100


def test_time_varying_load_and_speed_factor() -> None:
    clock = Clock()
    sim = Dlt645Simulator([A1], clock=clock, speed=60.0, load_kw=lambda t: 1.0 if (t - START) < 1800 else 3.0)
    clock.t += 60  # one clock minute = one simulated hour: 0.5 h at 1 kW + 0.5 h at 3 kW
    assert sim.meter(A1).energy() == 200


def test_export_goes_to_the_reverse_register() -> None:
    sim, clock = _sim()
    sim.meter(A1).set_load(-1.0)
    clock.t += 3600
    assert sim.meter(A1).energy("energy_rev_active_total") == 100 and sim.meter(A1).energy() == 0
    assert _read(sim, A1, 0x02030000) == -10000  # signed power: exporting


def test_rollover_and_replacement() -> None:
    sim, clock = _sim()
    sim.meter(A1).set_energy(99_999_950)
    clock.t += 3600
    assert _read(sim, A1, 0x00010000) == 150
    sim.meter(A1).replace(initial=3)
    assert _read(sim, A1, 0x00010000) == 3


def test_relay_trip_with_password_stops_energy_and_wrong_password_is_refused() -> None:
    sim, clock = _sim()
    until = dt.datetime(2026, 3, 2, 8, 0)
    bad = _ask(sim, relay_control_request(A1, RelayCode.TRIP, Password(2, "111111"), valid_until=until))
    assert bad is not None
    try:
        parse_response(decode_frame(bad))
        raise AssertionError("expected an error reply")
    except MeterErrorReply as exc:
        assert exc.error_code == ErrorBits.UNAUTHORIZED
    ok = _ask(sim, relay_control_request(A1, RelayCode.TRIP, Password(2, "000000"), valid_until=until))
    assert ok is not None and decode_frame(ok).control == 0x9C
    assert _read(sim, A1, 0x04000503) == 0x50  # bit 4 open, bit 6 trip commanded
    clock.t += 3600
    assert sim.meter(A1).energy() == 0 and sim.meter(A2).energy() == 200
    assert _read(sim, A1, 0x02020100) == 0  # no current through an open relay


def test_close_allowed_only_arms_without_auto_close() -> None:
    sim, _ = _sim(auto_close=False)
    until = dt.datetime(2026, 3, 2, 8, 0)
    for action in (RelayCode.TRIP, RelayCode.CLOSE_ALLOWED):
        _ask(sim, relay_control_request(A1, action, Password(2, "000000"), valid_until=until))
    assert _read(sim, A1, 0x04000503) == 0x10  # still open, no trip commanded: awaiting the customer
    sim.meter(A1).press_button()
    assert _read(sim, A1, 0x04000503) == 0


def test_clock_drift_and_bounded_broadcast_sync() -> None:
    sim, clock = _sim(drift_ppm=100.0, broadcast_sync_limit_s=300.0)
    clock.t += 10_000  # 100 ppm over 10,000 s: one second fast
    assert sim.meter(A1).local_time() == dt.datetime(2026, 3, 2, 10, 16, 41)
    assert _ask(sim, time_sync_request(dt.datetime(2026, 3, 2, 10, 16, 40))) is None  # broadcast: silent
    assert sim.meter(A2).local_time() == dt.datetime(2026, 3, 2, 10, 16, 40)
    _ask(sim, time_sync_request(dt.datetime(2026, 3, 2, 12, 0, 0)))  # beyond the bound: ignored
    assert sim.meter(A1).local_time().hour == 10
    assert sim.meter(A1).counters["time_set_count"] == 1


def test_wildcard_read_address_collides_with_two_meters() -> None:
    sim, _ = _sim()
    collided = _ask(sim, read_address_request())
    assert collided is not None and collided != _ask(Dlt645Simulator([A1]), read_address_request())
    lone = Dlt645Simulator([A2])
    reply = _ask(lone, read_address_request())
    assert reply is not None and decode_frame(reply).address == A2


def test_followups_split_a_long_answer() -> None:
    sim, clock = _sim()
    clock.t += 3600
    sim.meter(A1).max_payload = 12
    first = decode_read_response(decode_frame(_ask(sim, read_request(A1, 0x0001FF00)) or b""), di=0x0001FF00)
    assert first.more and len(first.data) == 8
    data, seq = first.data, 0
    while True:
        seq += 1
        part = decode_read_response(
            decode_frame(_ask(sim, read_followup_request(A1, 0x0001FF00, seq)) or b"")
        )
        assert part.seq == seq
        data += part.data
        if not part.more:
            break
    assert decode_value(0x0001FF00, data) == (200, 0, 0, 100, 100)


def test_faults_apply_per_di_and_count_down_and_reads_are_recorded() -> None:
    sim, _ = _sim()
    sim.meter(A1).inject("error_reply", dis=[0x02800002], error=2, times=1)
    assert _read(sim, A1, 0x02010100) == 2200
    err = _ask(sim, read_request(A1, 0x02800002))
    assert err is not None and decode_frame(err).control == 0xD1
    assert _read(sim, A1, 0x02800002) == 5000  # the fault was used up
    sim.meter(A2).inject("bad_checksum", times=1)
    _ask(sim, read_request(A2, 0x02010100))
    assert [(r.meter, r.di, r.value, r.fault) for r in sim.reads] == [
        (A1, 0x02010100, 2200, None),
        (A1, 0x02800002, 5000, None),
        (A2, 0x02010100, 2200, "bad_checksum"),
    ]
    assert sim.reads[0].ts == START


def test_power_down_is_silent_and_counted() -> None:
    sim, clock = _sim()
    sim.meter(A1).power_off()
    assert _ask(sim, read_request(A1, 0x00010000)) is None
    clock.t += 3600
    sim.meter(A1).power_on()
    assert _read(sim, A1, 0x03110000) == 1 and sim.meter(A1).energy() == 0


def test_1997_meter_answers_only_1997_reads_in_its_formats() -> None:
    clock = Clock()
    sim = Dlt645Simulator([A1], clock=clock, edition=1997, load_kw=2.0)
    assert _read(sim, A1, 0xB611, 1997) == 220  # XXX whole volts
    assert _ask(sim, read_request(A1, 0x02010100)) is None  # a 2007 request: not understood
    unknown = _ask(sim, read_request(A1, 0x9999, edition=1997))
    assert unknown is not None and decode_frame(unknown).control == 0xC1
