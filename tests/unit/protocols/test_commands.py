"""Signed commands: canonical form, signature, validity window, results."""

from __future__ import annotations

import json

import pytest

from protocols import CommandRejected, PayloadError
from protocols.commands import Command, CommandResult, canonical, decode_result, sign, verify_command

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
        verify_command(json.dumps(doc).encode(), KEY, NOW, gateway="gw-1")
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
    doc["sig"] = sign(doc, KEY)
    with pytest.raises(CommandRejected) as err:
        verify_command(json.dumps(doc).encode(), KEY, NOW, gateway="gw-1")
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
        decode_result(json.dumps(doc).encode(), KEY)
