"""The typed TOML loader: unknown keys, wrong types and bad values name their key path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from protocols import ConfigError
from protocols.config import load, loads_toml


@dataclass(frozen=True, slots=True)
class Bus:
    port: str
    baud: int = 2400
    parity: Literal["N", "E", "O"] = "E"
    timeout_s: float = 1.0

    def __post_init__(self) -> None:
        if self.baud not in (1200, 2400, 4800, 9600, 19200):
            raise ValueError(f"baud: {self.baud} is not a standard RS-485 rate")


@dataclass(frozen=True, slots=True)
class Top:
    gateway: str
    buses: tuple[Bus, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    key: str | None = None


def test_loads_defaults_and_nested() -> None:
    cfg = loads_toml(
        Top,
        'gateway = "gw-1"\n[[buses]]\nport = "/dev/ttyS0"\n[[buses]]\nport = "tcp://h:1"\nbaud = 9600\ntimeout_s = 2\n',
    )
    assert cfg == Top("gw-1", (Bus("/dev/ttyS0"), Bus("tcp://h:1", 9600, "E", 2.0)))


@pytest.mark.parametrize(
    ("text", "key_path", "reason"),
    [
        (
            'gateway = "g"\n[[buses]]\nport = "p"\n[[buses]]\nport = "q"\nbaud = "fast"\n',
            "buses[1].baud",
            "expected int, got str 'fast'",
        ),
        ('gateway = "g"\n[[buses]]\nport = "p"\nbuad = 9600\n', "buses[0].buad", "unknown key"),
        ('[[buses]]\nport = "p"\n', "gateway", "required key is missing"),
        (
            'gateway = "g"\n[[buses]]\nport = "p"\nbaud = 1234\n',
            "buses[0].baud",
            "not a standard RS-485 rate",
        ),
        ('gateway = "g"\n[[buses]]\nport = "p"\nparity = "X"\n', "buses[0].parity", "expected one of"),
        ('gateway = "g"\n[[buses]]\nport = "p"\nbaud = true\n', "buses[0].baud", "expected int, got bool"),
        ('gateway = "g"\ntags = { a = 1 }\n', "tags.a", "expected str"),
        ("gateway = 5\n", "gateway", "expected str"),
    ],
)
def test_errors_name_the_key(text: str, key_path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        loads_toml(Top, text)
    assert err.value.key_path == key_path
    assert reason in err.value.reason


def test_invalid_toml_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        loads_toml(Top, "gateway = \n", source="edge.toml")


def test_optional_and_table_type_errors() -> None:
    assert load(Top, {"gateway": "g", "key": None}).key is None
    with pytest.raises(ConfigError) as err:
        load(Top, {"gateway": "g", "buses": {"port": "p"}})
    assert err.value.key_path == "buses" and "expected a list" in err.value.reason
