"""Signed commands: canonical form, signature on the bytes received, params per action,
validity window, results."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from protocols import CommandRejected, PayloadError
from protocols.commands import (
    Command,
    CommandResult,
    canonical,
    decode_result,
    encode,
    sign,
    signed_json,
    verify_command,
)

KEY = b"k" * 32
NOW = 1_700_000_000_000


def _cmd(**kw: object) -> Command:
    fields = {
        "id": "c-1",
        "gateway": "gw-1",
        "meter": "000012345678",
        "action": "trip",
        "issued_ms": NOW,
        "expires_ms": NOW + 600_000,
    }
    fields.update(kw)
    return Command(**fields)  # type: ignore[arg-type]


def test_valid_command_verifies() -> None:
    assert verify_command(_cmd().signed(KEY), KEY, NOW + 1000, gateway="gw-1") == _cmd()


def test_canonical_form_is_key_order_independent_and_refuses_floats() -> None:
    assert canonical({"b": 1, "a": "é"}) == b'{"a":"\\u00e9","b":1}'
    assert sign({"a": 1, "b": 2}, KEY) == sign({"b": 2, "a": 1}, KEY)
    with pytest.raises(ValueError, match="floats"):
        canonical({"a": 1.5})


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.update(action="close_allowed"), "bad_signature"),  # forged: changed after signing
        (lambda d: d.update(meter="000000000001"), "bad_signature"),
        (lambda d: d.pop("sig"), "bad_signature"),  # unsigned
        (lambda d: d.update(sig="00" * 32), "bad_signature"),
    ],
)
def test_forged_and_unsigned_commands_are_rejected(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(_cmd().signed(KEY))
    mutate(doc)
    with pytest.raises(CommandRejected) as err:
        verify_command(encode(doc), KEY, NOW, gateway="gw-1")
    assert err.value.reason == reason and err.value.command_id == "c-1"


def test_wrong_key_expired_future_and_wrong_gateway() -> None:
    with pytest.raises(CommandRejected, match="bad_signature"):
        verify_command(_cmd().signed(b"other"), KEY, NOW, gateway="gw-1")
    with pytest.raises(CommandRejected) as err:
        verify_command(_cmd().signed(KEY), KEY, NOW + 600_001, gateway="gw-1")
    assert err.value.reason == "expired"
    with pytest.raises(CommandRejected) as err:
        verify_command(_cmd().signed(KEY), KEY, NOW - 60_001, gateway="gw-1")
    assert err.value.reason == "not_yet_valid"
    with pytest.raises(CommandRejected) as err:
        verify_command(_cmd(gateway="gw-2").signed(KEY), KEY, NOW, gateway="gw-1")
    assert err.value.reason == "malformed"


def test_malformed_and_overlong_validity() -> None:
    with pytest.raises(CommandRejected) as err:
        verify_command(b"not json", KEY, NOW, gateway="gw-1")
    assert err.value.reason == "malformed"
    doc = _cmd().to_dict()
    doc["expires_ms"] = NOW + 3 * 24 * 3600 * 1000
    with pytest.raises(CommandRejected) as err:
        verify_command(signed_json(doc, KEY), KEY, NOW, gateway="gw-1")
    assert err.value.reason == "malformed" and "validity" in err.value.detail
    with pytest.raises(ValueError, match="action"):
        _cmd(action="explode")


def test_result_round_trip_and_signature() -> None:
    res = CommandResult("c-1", "gw-1", "000012345678", "trip", "done", NOW, relay_state=1)
    assert decode_result(res.signed(KEY), KEY) == res
    with pytest.raises(PayloadError, match="signature"):
        decode_result(res.signed(b"other"), KEY)
    doc = json.loads(res.signed(KEY))
    doc["id"] = "c-2"  # a result re-pointed at another command
    with pytest.raises(PayloadError, match="signature"):
        decode_result(encode(doc), KEY)


# -- the bytes received must be the canonical encoding -----------------------------------------

SIGNED = _cmd(id="c-\u00e9").signed(KEY)  # an id with a non-ASCII character, escaped as \u00e9
SIG = b'"sig":"'


def _reorder(raw: bytes) -> bytes:
    return json.dumps(dict(reversed(json.loads(raw).items())), separators=(",", ":")).encode()


def _sig_at(raw: bytes) -> int:
    return raw.index(SIG) + len(SIG)


def _escape_sig_char(raw: bytes) -> bytes:
    i = _sig_at(raw)
    return raw[:i] + b"\\u%04x" % raw[i] + raw[i + 1 :]


def _upper_sig(raw: bytes) -> bytes:
    i = _sig_at(raw)
    return raw[:i] + raw[i : i + 64].upper() + raw[i + 64 :]


# Other spellings of a signed message. Each parses to the object that was signed (for the
# duplicate keys: the last value wins and is the signed one), so a check on a re-serialisation
# of the parsed object accepts them all.
VARIANTS: dict[str, Callable[[bytes], bytes]] = {
    "duplicate_key_last_wins": lambda r: r.replace(b'{"action":"', b'{"action":"alarm","action":"'),
    "duplicate_key_same_value": lambda r: r.replace(b'"meter":', b'"gateway":"gw-1","meter":'),
    "bom": lambda r: b"\xef\xbb\xbf" + r,
    "utf16": lambda r: r.decode().encode("utf-16"),
    "utf16_be_no_bom": lambda r: r.decode().encode("utf-16-be"),
    "utf32": lambda r: r.decode().encode("utf-32"),
    "spaces": lambda r: json.dumps(json.loads(r), sort_keys=True).encode(),
    "trailing_newline": lambda r: r + b"\n",
    "leading_space": lambda r: b" " + r,
    "unsorted_keys": _reorder,
    "upper_case_hex_escape": lambda r: r.replace(b"\\u00e9", b"\\u00E9"),
    "raw_utf8_instead_of_escape": lambda r: r.replace(b"\\u00e9", "\u00e9".encode()),
    "escaped_ascii": lambda r: r.replace(b'"c-', b'"\\u0063-'),
    "escaped_signature_character": _escape_sig_char,
    "upper_case_signature": _upper_sig,
}


def test_the_signed_wire_form_is_canonical_and_verifies() -> None:
    assert encode(json.loads(SIGNED)) == SIGNED
    assert verify_command(SIGNED, KEY, NOW, gateway="gw-1").id == "c-\u00e9"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_other_spelling_of_a_signed_command_is_refused(name: str) -> None:
    raw = VARIANTS[name](SIGNED)
    assert raw != SIGNED
    with pytest.raises(CommandRejected) as err:
        verify_command(raw, KEY, NOW, gateway="gw-1")
    # an upper-case signature is a well-formed message whose signature does not match exactly
    expected = "bad_signature" if name == "upper_case_signature" else "malformed"
    assert err.value.reason == expected, err.value


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_other_spelling_of_a_signed_result_is_refused(name: str) -> None:
    res = CommandResult("c-\u00e9", "gw-1", "000012345678", "trip", "done", NOW, relay_state=1)
    signed = res.signed(KEY)
    assert decode_result(signed, KEY) == res
    raw = VARIANTS[name](signed)
    assert raw != signed
    with pytest.raises(PayloadError):
        decode_result(raw, KEY)


def test_unknown_and_missing_top_level_keys_are_malformed() -> None:
    doc = _cmd().to_dict() | {"note": "x"}
    with pytest.raises(CommandRejected, match="unknown keys") as err:
        verify_command(signed_json(doc, KEY), KEY, NOW, gateway="gw-1")
    assert err.value.reason == "malformed"
    doc = _cmd().to_dict()
    del doc["params"]
    with pytest.raises(CommandRejected, match="missing keys"):
        verify_command(signed_json(doc, KEY), KEY, NOW, gateway="gw-1")


# -- params, per action ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "params", "message"),
    [
        ("read_now", [], "expected an object"),
        ("read_now", ["voltage_a"], "expected an object"),
        ("read_now", "quantities", "expected an object"),
        ("read_now", None, "expected an object"),
        ("read_now", {"quantities": "voltage_a"}, "list of"),
        ("read_now", {"quantities": []}, "list of"),
        ("read_now", {"quantities": [1]}, "quantity name"),
        ("read_now", {"quantities": [["voltage_a"]]}, "quantity name"),
        ("read_now", {"quantities": ["no_such_quantity"]}, "unknown quantity"),
        ("read_now", {"quantities": ["voltage_a", "voltage_a"]}, "repeat"),
        ("read_now", {"quantities": ["voltage_a"] * 65}, "list of"),
        ("read_now", {"quantity": ["voltage_a"]}, "takes no quantity"),
        ("trip", {"quantities": ["voltage_a"]}, "trip takes no quantities"),
        ("time_sync", {"epoch_ms": 1}, "time_sync takes no epoch_ms"),
        ("close_allowed", {"force": True}, "takes no force"),
    ],
)
def test_bad_params_are_malformed_before_anything_runs(action: str, params: object, message: str) -> None:
    doc = _cmd(action="read_now").to_dict() | {"action": action, "params": params}
    with pytest.raises(CommandRejected) as err:
        verify_command(signed_json(doc, KEY), KEY, NOW, gateway="gw-1")
    assert err.value.reason == "malformed" and message in err.value.detail, err.value.detail
    assert err.value.command_id == "c-1"


def test_good_params() -> None:
    for action, params in [
        ("read_now", {}),
        ("read_now", {"quantities": ["voltage_a", "energy_fwd_active_total"]}),
        ("time_sync", {}),
        ("trip", {}),
    ]:
        cmd = _cmd(action=action, params=params)
        assert verify_command(cmd.signed(KEY), KEY, NOW, gateway="gw-1") == cmd


def test_result_reason_goes_with_its_status() -> None:
    CommandResult("c", "g", "m", "trip", "failed", NOW, "meter_error")
    CommandResult("c", "g", "m", "trip", "rejected", NOW, "malformed")
    for status, reason in [("done", "meter_error"), ("failed", "malformed"), ("rejected", "deadline")]:
        with pytest.raises(ValueError, match="reason"):
            CommandResult("c", "g", "m", "trip", status, NOW, reason)
    with pytest.raises(ValueError, match="ts_ms"):
        CommandResult("c", "g", "m", "trip", "done", True)  # type: ignore[arg-type]


@pytest.mark.parametrize("sig", ["\u00e9" * 64, "\ud800", "x", ""])
def test_a_non_ascii_or_short_signature_is_a_bad_signature_not_a_crash(sig: str) -> None:
    raw = encode(_cmd().to_dict() | {"sig": sig})
    with pytest.raises(CommandRejected) as err:
        verify_command(raw, KEY, NOW, gateway="gw-1")
    assert err.value.reason == "bad_signature"
    result = encode(CommandResult("c-1", "gw-1", "m", "trip", "done", NOW).to_dict() | {"sig": sig})
    with pytest.raises(PayloadError, match="signature"):
        decode_result(result, KEY)
