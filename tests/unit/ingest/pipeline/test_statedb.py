"""``[state]``: the URL is checked at load with errors naming ``state.url``; passwords are redacted."""

from __future__ import annotations

import pytest

from ingest.config import parse_config
from ingest.pipeline.statedb import StateConfig, redact
from protocols.errors import ConfigError


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("mysql://u:p@h/db", "scheme"),
        ("postgresql:///db", "no host"),
        ("postgresql://u:p@h:5432", "no database"),
        ("postgresql://u:p@h:99999/db", "bad port"),
    ],
)
def test_a_bad_url_is_a_config_error_naming_the_key(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as info:
        parse_config(f'[state]\nurl = "{url}"\n')
    assert info.value.key_path == "state.url"


def test_the_default_keeps_the_sqlite_files_and_a_url_shares_them() -> None:
    assert not parse_config("").state.shared
    cfg = parse_config('[state]\nurl = "postgresql://amigw:s3cret@db:5432/amigw"\n')
    assert cfg.state.shared and cfg.state.url.endswith("/amigw")
    with pytest.raises(ConfigError) as info:
        parse_config("[state]\nconnect_timeout_s = 0\n")
    assert info.value.key_path == "state.connect_timeout_s"
    assert StateConfig().connect_timeout_s == 5.0


def test_the_password_never_shows() -> None:
    assert redact("postgresql://amigw:s3cret@db:5432/amigw") == "postgresql://amigw:***@db:5432/amigw"
    assert redact("postgresql://db/amigw") == "postgresql://db/amigw"
