"""Pure parts of the ingest pipeline: config, transform determinism, vectorised checks, escaping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ingest.cli import add_arguments
from ingest.config import SAMPLE, load_config, parse_config
from ingest.metrics import IngestMetrics
from ingest.pipeline.rollup import day_rows, hour_rows
from ingest.pipeline.transform import BatchOutput, Settings, split_foreign, transform
from ingest.sinks.base import Rollup
from ingest.sinks.influx.lines import (
    TagCache,
    encode_batch,
    event_line,
    rollup_lines,
    stored_tag,
    unescape_tag,
)
from ingest.sinks.influx.query import quote_str
from protocols.aggregates import decode_intervals
from protocols.errors import ConfigError, PayloadError
from protocols.flags import Flag
from protocols.payload import BatchBuilder, Event, ReadingBatch, decode, encode

Q = 900_000
T0 = 1_710_000_000_000  # 2024-03-10 00:00 at UTC+8


def settings(**kw: object) -> Settings:
    return Settings.from_config(parse_config(SAMPLE, **kw))  # type: ignore[arg-type]


def stored_lines(out: BatchOutput) -> bytes:
    """What the InfluxDB sink stores of ``out`` (wide readings, the sample's schema)."""
    return encode_batch(out.columns, TagCache(), wide=True)


def rolled_lines(out: BatchOutput, s: Settings | None = None) -> bytes:
    """The ``daily_tou`` and ``hourly`` rows a rollup writes when ``out``'s intervals are all the
    stored intervals of their periods."""
    s = s or settings()
    meters = s.registry.params(out.meter_ids)
    made = [("day", day_rows(out.iv, meters, s)), ("hour", hour_rows(out.iv, s))]
    cache = TagCache()
    gw, ids = out.columns.gateway, out.meter_ids
    return b"".join(rollup_lines(Rollup(gw, ids, k, p), cache) for k, p in made if p is not None)  # type: ignore[arg-type]


def batch(seq: int = 1, k0: int = 0, n: int = 4, gw: str = "gw-1") -> ReadingBatch:
    b = BatchBuilder()
    b.set_prev("M1", 1, 1000 + 25 * k0, T0 + k0 * Q)
    for k in range(k0 + 1, k0 + n + 1):
        b.add("M1", T0 + k * Q, 1, 1000 + 25 * k)
        b.add("M1", T0 + k * Q, 30, 2200)
    return b.build(gw, seq, sent_ms=T0 + (k0 + n) * Q)


def test_sample_loads_with_the_documented_defaults() -> None:
    cfg = parse_config(SAMPLE)
    assert cfg.pipeline.schema == "wide" and cfg.mqtt.queue_max == 16
    assert cfg.mqtt.consumer(2).client_id == "amigw-ingest-2"
    assert cfg.mqtt.consumer(0).topics[0] == "$share/ingest/ami/v1/+/up/readings"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[pipeline]\nschema = 'tall'\n", "pipeline.schema"),
        ("[influx]\nurll = 'http://x'\n", "influx.urll"),
        ("[mqtt]\nqueue_max = 0\n", "mqtt.queue_max"),
        ("[pipeline]\ninterval_s = 7\n", "pipeline.interval_s"),
        ("registry = '/nonexistent/meters.toml'\n", "registry"),
        ("metrics_listen = 'nope'\n", "metrics_listen"),
    ],
)
def test_bad_keys_are_named(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert err.value.key_path.startswith(key)


def test_time_and_size_bounds_default_to_2000_and_the_payload_bound() -> None:
    cfg = parse_config(SAMPLE)
    assert cfg.pipeline.min_ts_ms == 946_684_800_000 and cfg.mqtt.consumer(0).max_payload_bytes == 16 << 20
    cfg = parse_config("[pipeline]\nmin_ts = '2020-06-01T00:00:00+08:00'\n[mqtt]\nmax_payload_bytes = 1024\n")
    assert cfg.pipeline.min_ts_ms == 1_590_940_800_000 and cfg.mqtt.consumer(3).max_payload_bytes == 1024
    for text, key, why in (
        ("[pipeline]\nmin_ts = 'last tuesday'\n", "pipeline.min_ts", "ISO date"),
        ("[pipeline]\nmin_ts = '1969-12-31'\n", "pipeline.min_ts", "before 1970"),
        ("[mqtt]\nmax_payload_bytes = 0\n", "mqtt.max_payload_bytes", ">= 1"),
    ):
        with pytest.raises(ConfigError, match=why) as err:
            parse_config(text)
        assert err.value.key_path.startswith(key)


def test_relative_paths_come_from_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "ingest.toml").write_text("[dedup]\npath = 'd.sqlite'\n")
    assert load_config(tmp_path / "ingest.toml").dedup.path == str(tmp_path / "d.sqlite")


def test_transform_is_deterministic_and_independent_of_other_batches() -> None:
    s = settings()
    a = transform(decode(encode(batch(2, 4))), s)
    transform(decode(encode(batch(1, 0))), s)
    b = transform(decode(encode(batch(2, 4), "json")), s)
    assert stored_lines(a) == stored_lines(b) and a.interval_records() == b.interval_records()
    assert [(r.start_ms, r.energy) for r in a.interval_records()] == [(T0 + k * Q, 25) for k in range(4, 8)]
    assert stored_lines(a).count(b"\nmeter_reading,") + stored_lines(a).startswith(b"meter_reading,") == 4


def test_meter_index_out_of_range_is_a_payload_error() -> None:
    good = batch()
    bad = ReadingBatch(good.gateway, 1, good.meters, np.array([0, 1], np.uint32), np.array([T0, T0], np.int64),
                       np.array([1, 1], np.uint16), np.array([1, 2], np.int64), np.zeros(2, np.uint32))  # fmt: skip
    with pytest.raises(PayloadError, match="outside"):
        transform(bad, settings())


def test_duplicates_go_to_their_own_measurement_and_never_overwrite() -> None:
    b = BatchBuilder()
    b.add("M1", T0 + Q, 1, 1025)
    b.add("M1", T0 + Q, 1, 9999)
    out = transform(b.build("gw", 1, sent_ms=T0 + Q), settings())
    main = [ln for ln in stored_lines(out).split(b"\n") if ln.startswith(b"meter_reading")]
    dup = [ln for ln in stored_lines(out).split(b"\n") if ln.startswith(b"reading_duplicate")]
    assert main == [b"meter_reading,meter=M1,gateway=gw energy_fwd_active_total=10.25 %d" % (T0 + Q)]
    assert len(dup) == 1 and b"value=99.99" in dup[0] and b"flags=%di" % Flag.DUPLICATE in dup[0]


def test_collapsed_voltage_becomes_an_event(tmp_path: Path) -> None:
    reg = tmp_path / "m.toml"
    reg.write_text('[meters."M1"]\nvoltage_v = 220\nimax_a = 60\nphases = 1\narea = "A"\n')
    s = Settings.from_config(parse_config(f"registry = '{reg}'\n"))
    b = BatchBuilder()
    b.add("M1", T0 + Q, 30, 120)  # 12.0 V of 220 V
    b.add("M1", T0 + 2 * Q, 30, 2200)
    out = transform(b.build("gw", 1, sent_ms=T0 + 2 * Q), s)
    assert out.outage_events == 1 and out.outage_ts == (T0 + Q, T0 + Q)
    assert b"events,gateway=gw,meter=M1,kind=voltage_collapsed" in stored_lines(out)


def test_readings_before_min_ts_are_stored_flagged_and_make_no_daily_row() -> None:
    # An edge with an unset clock (1970-01-01 00:15, 00:30; 1969-12-31 23:45), beside a good meter.
    b = BatchBuilder()
    b.set_prev("M1", 1, 1000, 0)
    b.add("M1", Q, 1, 1025)
    b.add("M1", 2 * Q, 1, 1050)
    b.set_prev("M3", 1, 1000, -2 * Q)
    b.add("M3", -Q, 1, 1025)
    b.set_prev("M2", 1, 1000, T0)
    b.add("M2", T0 + Q, 1, 1075)
    out = transform(decode(encode(b.build("gw", 1, sent_ms=T0 + Q))), settings())
    readings = [
        ln
        for ln in stored_lines(out).split(b"\n")
        if ln.startswith((b"meter_reading,meter=M1", b"meter_reading,meter=M3"))
    ]
    flags = [int(ln.split(b"_flags=")[1].split(b"i")[0]) for ln in readings]
    assert len(flags) == 3 and all(f & Flag.BEFORE_MIN_TIME for f in flags)  # stored, flagged
    assert b"1970-01-01" not in stored_lines(out) and b"1969-12-31" not in stored_lines(
        out
    )  # no daily/hourly row
    assert [(r.meter, r.energy) for r in out.interval_records()] == [("M2", 75)]


def test_energy_of_2_62_is_flagged_and_in_no_interval_daily_row_or_published_aggregate() -> None:
    b = BatchBuilder()
    b.set_prev("M1", 1, 1_000, T0)
    b.add("M1", T0 + Q, 1, 2**62)  # a register no meter holds, between two good ones
    b.add("M1", T0 + 2 * Q, 1, 1_050)
    b.set_prev("M2", 1, 2**62, T0)  # a previous register no meter holds
    b.add("M2", T0 + Q, 1, 5)
    out = transform(decode(encode(b.build("gw", 1, sent_ms=T0 + 2 * Q))), settings())
    assert int(out.flags[0]) & Flag.OUT_OF_RANGE
    assert [(r.meter, r.energy) for r in out.interval_records()] == [("M1", 25), ("M1", 25)]
    assert b"daily_tou" not in stored_lines(out)  # totals are rolled up per closed period
    daily = [ln for ln in rolled_lines(out).split(b"\n") if ln.startswith(b"daily_tou")]
    assert len(daily) == 1 and b"meter=M1" in daily[0] and b",total=50i," in daily[0]
    assert decode_intervals(out.intervals_payload("gw", 1))[2] == out.interval_records()


def test_split_foreign_takes_out_the_readings_of_meters_bound_elsewhere(tmp_path: Path) -> None:
    reg = tmp_path / "m.toml"
    reg.write_text(
        "".join(
            f'[meters."{m}"]\nvoltage_v = 220\nimax_a = 60\nphases = 1\ngateway = "{gw}"\n'
            for m, gw in (("A1", "gw-a"), ("B1", "gw-b"))
        )
    )
    s = Settings.from_config(parse_config(f"registry = '{reg}'\n"))
    b = BatchBuilder()
    for m in ("A1", "B1", "U1"):  # U1: not in the registry, accepted from any gateway
        b.set_prev(m, 1, 1000, T0)
        b.add(m, T0 + Q, 1, 1025)
        b.add(m, T0 + 2 * Q, 1, 1050)
    whole = decode(encode(b.build("gw-a", 7, sent_ms=T0 + 2 * Q)))
    own, foreign = split_foreign(whole, s)
    assert foreign is not None and (foreign.gateway, foreign.seq, foreign.sent_ms) == ("gw-a", 7, T0 + 2 * Q)
    assert {own.meters[i] for i in own.meter} == {"A1", "U1"} and len(own) == 4 and len(own.prev) == 2
    assert (
        {foreign.meters[i] for i in foreign.meter} == {"B1"} and len(foreign) == 2 and len(foreign.prev) == 1
    )
    assert decode(encode(foreign)) == foreign  # stored as a payload of its own, replayable
    assert b"meter=B1" not in stored_lines(transform(own, s))
    assert split_foreign(decode(encode(b.build("gw-b", 8))), s)[1] is not None  # A1 is foreign there
    unbound = decode(encode(b.build("gw-c", 9)))
    assert split_foreign(unbound, s)[0] is not unbound  # both A1 and B1 are bound elsewhere


@pytest.mark.parametrize("text", ['a b,c=d"e', "x\\y\nz%", "表计"])
def test_stored_tag_round_trips(text: str) -> None:
    assert unescape_tag(stored_tag(text)) == text


def test_event_line_escapes_strings() -> None:
    ev = Event('id "1"\\', "g w", "relay_changed", 5, "m,1", {"from": 0, "to": 1})
    assert event_line(ev) == (
        b'events,gateway=g\\ w,meter=m\\,1,kind=relay_changed id="id \\"1\\"\\\\",detail="{\\"from\\":0,\\"to\\":1}" 5\n'
    )
    assert quote_str("o'k\\") == "'o\\'k\\\\'"


def test_flag_metrics_count_per_bit() -> None:
    m = IngestMetrics()
    m.count_flags(np.array([0, Flag.SPIKE, Flag.SPIKE | Flag.GAP_BEFORE], np.uint32))
    assert m.flagged.labels("SPIKE")._value.get() == 2 and m.flagged.labels("GAP_BEFORE")._value.get() == 1


def test_cli_arguments() -> None:
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--config", "x.toml", "--workers", "3", "--completeness", "M1", "2024-03-10"])
    assert args.workers == 3 and args.completeness == ["M1", "2024-03-10"]


def test_fast_aggregate_payloads_equal_the_protocol_encoders() -> None:
    from protocols.aggregates import decode_intervals, encode_intervals

    b = BatchBuilder()
    b.set_prev('m "1"\\ü', 1, 1000, T0)
    b.add('m "1"\\ü', T0 + 3 * Q, 1, 1090)  # a gap: estimated rows
    out = transform(b.build('g"w', 4, sent_ms=T0 + 3 * Q), settings())
    assert out.intervals_payload('g"w', 4) == encode_intervals('g"w', 4, out.interval_records())
    binary = out.intervals_payload('g"w', 4, "binary")
    assert decode_intervals(binary) == ('g"w', 4, out.interval_records()) and len(out.interval_records()) == 3


def _reference_daily_lines(out_lines: bytes) -> list[bytes]:
    return [ln for ln in out_lines.split(b"\n") if ln.startswith(b"daily_tou")]


def test_daily_rows_are_the_documented_points() -> None:
    # Two days (a batch crossing local midnight), estimated rows and the billable split.
    b = BatchBuilder()
    b.set_prev("M 1", 1, 1000, T0 - 2 * Q)
    for k in (-1, 1, 2):  # the gap at k=0 is estimated; (T0 - Q, T0] belongs to the first day
        b.add("M 1", T0 + k * Q, 1, 1000 + 25 * (k + 2))
    out = transform(b.build("g,w", 3, sent_ms=T0 + 2 * Q), settings())
    lines = _reference_daily_lines(rolled_lines(out))
    assert lines == [
        b'daily_tou,meter=M\\ 1,gateway=g\\,w day="2024-03-09",total=50i,sharp=0i,peak=0i,flat=0i,valley=50i,'
        b"intervals=2i,estimated=1i,invalid=0i,reg_sharp=0i,reg_peak=0i,reg_flat=0i,reg_valley=0i,"
        b"tou_mismatch=0i %d" % (T0 - 86_400_000),
        b'daily_tou,meter=M\\ 1,gateway=g\\,w day="2024-03-10",total=50i,sharp=0i,peak=0i,flat=0i,valley=50i,'
        b"intervals=2i,estimated=1i,invalid=0i,reg_sharp=0i,reg_peak=0i,reg_flat=0i,reg_valley=0i,"
        b"tou_mismatch=0i %d" % T0,
    ]
    assert out.periods == (("day", T0 - 86_400_000), ("day", T0))


def test_daily_rows_cross_check_the_calendar_split_with_the_tariff_registers() -> None:
    """VEE-15 through transform: the built-in calendar puts 00:00-08:00 in valley. Meter OK's T4
    (valley) register agrees with its total; meter BAD's energy lands on T2 (peak) instead, more
    than the largest interval away from the calendar's peak of 0, so its day counts a mismatch."""
    b = BatchBuilder()
    for m, q_tariff in (("OK", 5), ("BAD", 3)):
        for q in (1, q_tariff):
            b.set_prev(m, q, 1000, T0)
            for k in range(1, 5):
                b.add(m, T0 + k * Q, q, 1000 + 25 * k)
    out = transform(b.build("gw", 1, sent_ms=T0 + 4 * Q), settings())
    fields = {
        line.split(b",", 2)[1]: dict(kv.split(b"=") for kv in line.split(b" ")[1].split(b",")[1:])
        for line in _reference_daily_lines(rolled_lines(out))
    }
    ok, bad = fields[b"meter=OK"], fields[b"meter=BAD"]
    assert (ok[b"valley"], ok[b"reg_valley"], ok[b"reg_peak"], ok[b"tou_mismatch"]) == (
        b"100i",
        b"100i",
        b"0i",
        b"0i",
    )
    assert (bad[b"valley"], bad[b"peak"], bad[b"reg_peak"], bad[b"tou_mismatch"]) == (
        b"100i",
        b"0i",
        b"100i",
        b"1i",
    )


def test_hourly_rows_split_the_intervals_at_local_hours() -> None:
    # prev at 00:30; reads 00:45 .. 01:45 (local): 2 intervals in hour 00, 3 in hour 01, one of
    # them estimated (the 01:15 read is missing: the 01:30 delta is spread over both intervals,
    # VEE-20) and the 01:45 one went backwards (not billable).
    b = BatchBuilder()
    b.set_prev("M 1", 1, 1000, T0 + 2 * Q)
    for k, v in ((3, 1025), (4, 1050), (6, 1100), (7, 1090)):
        b.add("M 1", T0 + k * Q, 1, v)
    out = transform(b.build("g", 1, sent_ms=T0 + 7 * Q), settings())
    assert [ln for ln in rolled_lines(out).split(b"\n") if ln.startswith(b"hourly")] == [
        b'hourly,meter=M\\ 1,gateway=g hour="2024-03-10T00",total=50i,intervals=2i,estimated=0i,invalid=0i %d'
        % T0,
        b'hourly,meter=M\\ 1,gateway=g hour="2024-03-10T01",total=50i,intervals=2i,estimated=2i,invalid=1i %d'
        % (T0 + 4 * Q),
    ]


FLAT_ALL_DAY = """utc_offset_minutes = %d
[seasons.all]
months = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
workday = "flat"
[profiles.flat]
segments = [["00:00", "24:00", "flat"]]
"""


def _registry_with_tariffs(tmp_path: Path) -> None:
    rows = {"A": 'tariff = "commercial"', "B": 'tariff = "residential"', "C": ""}
    (tmp_path / "meters.toml").write_text(
        "".join(f'[meters."{m}"]\nvoltage_v = 220\nimax_a = 60\nphases = 1\n{t}\n' for m, t in rows.items())
    )


def test_meters_on_a_listed_tariff_get_their_own_tou_calendar(tmp_path: Path) -> None:
    """Registry tariff "commercial" has a calendar (flat all day); "residential" is not listed and
    C has no tariff: both use the default calendar, where 00:00-01:00 is valley."""
    _registry_with_tariffs(tmp_path)
    (tmp_path / "commercial.toml").write_text(FLAT_ALL_DAY % 480)
    text = 'registry = "meters.toml"\n[tariff_calendars]\ncommercial = "commercial.toml"\n'
    s = Settings.from_config(parse_config(text, base_dir=tmp_path))
    b = BatchBuilder()
    for m in ("A", "B", "C"):
        b.set_prev(m, 1, 1000, T0)
        for k in range(1, 5):
            b.add(m, T0 + k * Q, 1, 1000 + 25 * k)
    out = transform(b.build("gw", 1, sent_ms=T0 + 4 * Q), s)
    split = {
        line.split(b",", 2)[1]: [
            kv for kv in line.split(b" ")[1].split(b",") if kv.split(b"=")[0] in (b"flat", b"valley")
        ]
        for line in _reference_daily_lines(rolled_lines(out, s))
    }
    assert split == {
        b"meter=A": [b"flat=100i", b"valley=0i"],
        b"meter=B": [b"flat=0i", b"valley=100i"],
        b"meter=C": [b"flat=0i", b"valley=100i"],
    }


def test_tariff_calendars_errors_name_the_tariff(tmp_path: Path) -> None:
    _registry_with_tariffs(tmp_path)
    text = 'registry = "meters.toml"\n[tariff_calendars]\ncommercial = "commercial.toml"\n'
    with pytest.raises(ConfigError) as missing:
        parse_config(text, base_dir=tmp_path)
    assert missing.value.key_path == "tariff_calendars.commercial"
    (tmp_path / "commercial.toml").write_text(FLAT_ALL_DAY % 0)  # UTC, the default is UTC+8
    with pytest.raises(ConfigError, match="utc_offset_minutes") as offset:
        parse_config(text, base_dir=tmp_path)
    assert offset.value.key_path == "tariff_calendars.commercial"


def test_sink_cuts_well_formed_bodies_like_the_line_splitter() -> None:
    import random

    from ingest.sinks.influx.http import _chunks, _cut, split_lines

    rng = random.Random(7)
    for _ in range(300):
        lines = [b"m%d f=%s" % (i, b"x" * rng.randint(1, 50)) for i in range(rng.randint(1, 60))]
        data = b"\n".join(lines) + b"\n"
        max_lines, max_bytes = rng.randint(1, 20), rng.randint(5, 400)
        expected = [(b"\n".join(c) + b"\n", len(c)) for c in _chunks(split_lines(data), max_lines, max_bytes)]
        assert _cut(data, max_lines, max_bytes) == expected
    for bad in (b"a\n\nb\n", b"a\r\n", b" a\n", b"a", b"a\n b\n", b"a\n\tb\n", b"\na\n", b""):
        assert _cut(bad, 10, 100) is None, bad  # the sink splits these line by line instead


def test_sink_warm_up_leaves_the_tag_cache_alone() -> None:
    from ingest.pipeline.transform import warm_up
    from ingest.sinks.influx.http import SinkConfig
    from ingest.sinks.influx.sink import InfluxSink

    sink = InfluxSink(SinkConfig())
    sink.warm_up(warm_up(settings()))
    assert not sink._tags._d


def test_warm_up_compiles_every_specialisation_a_wire_batch_needs() -> None:
    """A batch decoded off the wire has read-only columns (views of the payload), a numba type of
    its own: warm_up must load those specialisations too, or the first real message pays for it."""
    import numba

    from ingest.pipeline.transform import warm_up
    from ingest.rules import kernels, stages
    from ingest.sinks.influx import kernels as lp_kernels

    def signatures() -> dict[str, set[str]]:
        return {
            f"{mod.__name__}.{name}": {str(sig) for sig in fn.signatures}
            for mod in (kernels, stages, lp_kernels)
            for name, fn in vars(mod).items()
            if isinstance(fn, numba.core.registry.CPUDispatcher)
        }

    s = settings()
    sample = warm_up(s)
    encode_batch(sample.batches[0], TagCache(), wide=True)  # what InfluxSink.warm_up does
    for b in sample.batches:
        encode_batch(b, TagCache(), wide=True)
    before = signatures()
    for wire in (decode(encode(batch(seq=2))), decode(encode(batch(seq=3, k0=4, n=6)))):
        out = transform(wire, s)
        out.intervals_payload("gw-1", wire.seq)
        stored_lines(out)
    new = {k: v - before.get(k, set()) for k, v in signatures().items() if v - before.get(k, set())}
    assert not new, new
