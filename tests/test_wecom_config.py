"""The `wecom:` settings: the four credentials come from the environment or `${ENV}`, and never show in repr, JSON
dumps, config errors or `wecast config`; the EncodingAESKey's shape is checked; gateway wecom without credentials is
a clear configuration error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from engine.cli import main
from engine.errors import ConfigError
from engine.gateways.registry import build_gateway
from engine.settings import load_settings

CORP = "ww1a2b3c4d5e6f7a8b"
SECRET = "s3cr3t-VALUE-never-shown-Xq9"
TOKEN = "cbTOKENnever-shown"
AES = "Q8vQ2zJm4nE7rT1yU5iO9pA3sD6fG0hJ2kL4zX8cV1b"
ENV = {
    "WECAST_WECOM_CORP_ID": CORP,
    "WECAST_WECOM_SECRET": SECRET,
    "WECAST_WECOM_CALLBACK_TOKEN": TOKEN,
    "WECAST_WECOM_AES_KEY": AES,
}
SHOWN_NEVER = (CORP, SECRET, TOKEN, AES)


def write(tmp: Path, text: str) -> Path:
    path = tmp / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_credentials_from_the_environment_are_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WECAST_WECOM_* fill the wecom section as SecretStr; repr, str and the JSON dump hide every one of them."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(write(tmp_path, "version: 1\ngateway: wecom\n"))
    w = settings.wecom
    for field in (w.corp_id, w.secret, w.callback_token, w.encoding_aes_key):
        assert isinstance(field, SecretStr)
    assert w.corp_id is not None and w.corp_id.get_secret_value() == CORP
    assert w.encoding_aes_key is not None and w.encoding_aes_key.get_secret_value() == AES
    for shown in (repr(settings), str(settings), repr(w), settings.model_dump_json()):
        for value in SHOWN_NEVER:
            assert value not in shown


def test_env_references_fill_the_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`${NAME}` references in the wecom section are expanded like the other secrets."""
    monkeypatch.setenv("MY_CORP", CORP)
    monkeypatch.setenv("MY_SECRET", SECRET)
    path = write(tmp_path, "version: 1\nwecom:\n  corp_id: ${MY_CORP}\n  secret: ${MY_SECRET}\n  staff: [zhangwei]\n")
    w = load_settings(path).wecom
    assert w.secret is not None and w.secret.get_secret_value() == SECRET
    assert w.staff == ["zhangwei"]


def test_a_malformed_aes_key_is_a_located_error_without_the_value(tmp_path: Path) -> None:
    """An EncodingAESKey that is not 43 letters and digits fails at its line, and the message does not echo it."""
    bad = "short-key-" + SECRET
    path = write(tmp_path, f"version: 1\nwecom:\n  encoding_aes_key: {bad}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert f"{path}:3: wecom.encoding_aes_key" in str(info.value)
    assert "43" in str(info.value)
    assert SECRET not in str(info.value)


def test_wecast_config_hides_the_wecom_credentials(tmp_path: Path) -> None:
    """`wecast config` shows the wecom section with each credential as ********** and nothing of their values."""
    result = CliRunner().invoke(main, ["-c", str(write(tmp_path, "version: 1\n")), "config"], env=ENV)
    assert result.exit_code == 0, result.output
    for value in SHOWN_NEVER:
        assert value not in result.output
    body = json.loads(result.stdout.split("\n", 1)[1])
    for key in ("corp_id", "secret", "callback_token", "encoding_aes_key"):
        assert body["wecom"][key] == "**********"


def test_gateway_wecom_without_credentials_is_a_config_error(tmp_path: Path) -> None:
    """Choosing gateway wecom without a corp id and secret says which variables to set."""
    settings = load_settings(write(tmp_path, "version: 1\ngateway: wecom\n"))
    with pytest.raises(ConfigError, match="WECAST_WECOM_CORP_ID"):
        build_gateway(settings)


def test_the_state_file_is_relative_to_the_config(tmp_path: Path) -> None:
    """wecom.state_file resolves against the config file's folder, like the sandbox's."""
    settings = load_settings(write(tmp_path, "version: 1\nwecom: {state_file: state/w.sqlite}\n"))
    assert settings.wecom.state_file == tmp_path.resolve() / "state" / "w.sqlite"
