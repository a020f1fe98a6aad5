"""config.yaml loading: strict, located errors; environment overrides; secrets that never show; paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from engine.cli import main
from engine.errors import ConfigError
from engine.settings import load_settings

SECRET = "s3cr3t-Zq9-do-not-print"
ENV_NAMES = (
    "WECAST_CONFIG",
    "WECAST_API_KEY",
    "WECAST_WORKPRO_TOKEN",
    "WECAST_WECOM_SECRET",
    "WECAST_DATABASE_URL",
    "WECAST_GATEWAY",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


MISTAKES = [
    ("version: 1\nsendng:\n  concurrency: 4\n", 2, "sendng", "unknown field"),
    (
        "version: 1\nsending:\n  throttle: {per_second: 5, per_hour: 9}\n",
        3,
        "sending.throttle.per_hour",
        "unknown field",
    ),
    ("version: 1\ngateway: sandbox\nsending:\n  concurrency: many\n", 4, "sending.concurrency", "valid integer"),
    ("version: 1\napi:\n  port: 70000\n", 3, "api.port", "less than or equal to 65535"),
    ("version: 1\ngateway: wechat\n", 2, "gateway", "'sandbox', 'workpro' or 'wecom'"),
    ("# 配置\nversion: 2\n", 2, "version", "Input should be 1"),
    ("version: 1\ntimezone: Asia/Beijing\n", 2, "timezone", "unknown time zone 'Asia/Beijing'"),
    ("version: 1\nscheduler:\n  grace: 1 hour\n", 3, "scheduler.grace", "'1 hour' is not a duration"),
    ("version: 1\nsending:\n  retry: {base_delay: 5x}\n", 3, "sending.retry.base_delay", "not a duration"),
    (
        "version: 1\nsending:\n  quiet_hours: {start: '25:00', end: '09:00'}\n",
        3,
        "sending.quiet_hours.start",
        "not a time of day",
    ),
    (
        "version: 1\nsandbox:\n  faults: {error_rate: 1.5}\n",
        3,
        "sandbox.faults.error_rate",
        "less than or equal to 1",
    ),
    ("gateway: sandbox\ntimezone: UTC\n", 1, "version", "missing `version: 1`"),
    ("version: 1\ndatabase_url: 'mysql://u@h/db'\n", 2, "database_url", "in SQLite or PostgreSQL, not mysql"),
    ("version: 1\ndatabase_url: not a url\n", 2, "database_url", "'not a url' is not a database URL"),
    ("version: 1\ndatabase_url: 'postgresql+psycopg2://u@h/db'\n", 2, "database_url", "'psycopg2' is not installed"),
    ("version: 1\nsending: {throttle: {per_second: -5}}\n", 2, "sending.throttle.per_second", "greater than 0"),
    ("version: 1\nsending: [1, 2]\n", 2, "sending", "valid dictionary or instance of Sending"),
    ("version: 1\nsending: {quiet_hours: {start: '09:00', end: '09:00'}}\n", 2, "sending.quiet_hours", "same time"),
    ("version: 1\napi: {key: '  '}\n", 2, "api.key", "only whitespace"),
    ("version: 1\ngateway: sandbx\n", 2, "gateway", "Input should be 'sandbox', 'workpro' or 'wecom'"),
]


@pytest.mark.parametrize(("body", "line", "field", "reason"), MISTAKES)
def test_config_error_names_file_line_and_field(tmp_path: Path, body: str, line: int, field: str, reason: str) -> None:
    """Each kind of config.yaml mistake is a ConfigError starting `file:line: field:` with the reason."""
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{path}:{line}: {field}: "), first
    assert reason in first


@pytest.mark.parametrize(("body", "line", "field", "reason"), MISTAKES)
def test_config_errors_speak_chinese(tmp_path: Path, body: str, line: int, field: str, reason: str) -> None:
    """Under zh each mistake says why in Chinese after the same `file:line: field:` (a wrong database_url was an
    "internal error", the time zone, quiet hours, API key and pydantic's checks were English)."""
    import re

    from engine.i18n import Language, use_language

    path = write(tmp_path, body)
    with use_language(Language.ZH), pytest.raises(ConfigError) as info:
        load_settings(path)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{path}:{line}: {field}: "), first
    assert re.search(r"[\u4e00-\u9fff]", first.removeprefix(f"{path}:{line}: {field}: ")), first


def test_config_reports_every_problem(tmp_path: Path) -> None:
    """Several mistakes in one file are all reported, each on its own line with its location."""
    path = write(tmp_path, "version: 1\ntimezone: Nowhere/City\nsendng: {}\napi: {port: x}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    for where in (f"{path}:2: timezone:", f"{path}:3: sendng:", f"{path}:4: api.port:"):
        assert where in message


def test_yaml_syntax_error_in_config_names_the_line(tmp_path: Path) -> None:
    """Broken YAML in config.yaml is reported with file and line."""
    path = write(tmp_path, "version: 1\nsending:\n\tconcurrency: 2\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}:3: invalid YAML")


def test_config_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    """A config file holding a list instead of a mapping is a located error."""
    path = write(tmp_path, "- version: 1\n")
    with pytest.raises(ConfigError, match="must be a mapping") as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}:1")


def test_explicit_config_file_must_exist(tmp_path: Path) -> None:
    """Naming a config file that does not exist is an error, not a silent fall-back to defaults."""
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "missing.yaml")


def test_unset_env_reference_names_the_variable(tmp_path: Path) -> None:
    """`${NAME}` for an unset variable is an error naming the variable, the file, line and field."""
    path = write(tmp_path, "version: 1\napi:\n  key: ${WECAST_TEST_UNSET_KEY}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}:3: api.key: environment variable WECAST_TEST_UNSET_KEY is not set"


def test_env_reference_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`${NAME}` takes the variable's value (here a secret and a plain field)."""
    monkeypatch.setenv("MY_TOKEN", SECRET)
    monkeypatch.setenv("MY_BASE_URL", "http://127.0.0.1:9899")
    path = write(tmp_path, "version: 1\nworkpro:\n  token: ${MY_TOKEN}\nwecom:\n  base_url: ${MY_BASE_URL}\n")
    settings = load_settings(path)
    assert settings.workpro.token is not None
    assert settings.workpro.token.get_secret_value() == SECRET
    assert settings.wecom.base_url == "http://127.0.0.1:9899"


def test_env_overrides_database_url_and_api_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WECAST_DATABASE_URL and WECAST_API_KEY win over the values in config.yaml."""
    path = write(tmp_path, "version: 1\ndatabase_url: sqlite:///data/file.sqlite\napi:\n  key: from-file\n")
    before = load_settings(path)
    assert before.api.key is not None
    assert before.api.key.get_secret_value() == "from-file"
    monkeypatch.setenv("WECAST_DATABASE_URL", "postgresql+psycopg://u@db.example/wecast")
    monkeypatch.setenv("WECAST_API_KEY", SECRET)
    monkeypatch.setenv("WECAST_GATEWAY", "workpro")
    after = load_settings(path)
    assert after.database_url == "postgresql+psycopg://u@db.example/wecast"
    assert after.api.key is not None
    assert after.api.key.get_secret_value() == SECRET
    assert after.gateway == "workpro"


def test_a_bad_value_from_the_environment_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WECAST_GATEWAY=foo is reported at WECAST_GATEWAY, not at config.yaml's `gateway:` line (which may be right), and
    the choices are joined in the reader's language (no English "or" in Chinese)."""
    from engine.i18n import Language, use_language

    path = write(tmp_path, "version: 1\ngateway: sandbox\ndatabase_url: sqlite:///data/w.sqlite\n")
    monkeypatch.setenv("WECAST_GATEWAY", "foo")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert (
        str(info.value)
        == "environment variable WECAST_GATEWAY: gateway: Input should be 'sandbox', 'workpro' or 'wecom'"
    )
    with use_language(Language.ZH), pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == "环境变量 WECAST_GATEWAY: gateway: 应为 'sandbox'、'workpro' 或 'wecom'"
    monkeypatch.delenv("WECAST_GATEWAY")
    monkeypatch.setenv("WECAST_DATABASE_URL", "mysql://u@h/db")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith("environment variable WECAST_DATABASE_URL: database_url: "), info.value
    monkeypatch.setenv("WECAST_DATABASE_URL", "sqlite:///data/env.sqlite")
    path.write_text("version: 1\ngateway: sandbx\n", encoding="utf-8")  # the file's own mistake keeps its line
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}:2: gateway: "), info.value


def test_secret_env_vars_fill_missing_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WECAST_WORKPRO_TOKEN and WECAST_WECOM_SECRET apply even when their sections are absent."""
    monkeypatch.setenv("WECAST_WORKPRO_TOKEN", "tok-" + SECRET)
    monkeypatch.setenv("WECAST_WECOM_SECRET", "sec-" + SECRET)
    settings = load_settings(write(tmp_path, "version: 1\n"))
    assert isinstance(settings.workpro.token, SecretStr)
    assert isinstance(settings.wecom.secret, SecretStr)
    assert settings.workpro.token.get_secret_value() == "tok-" + SECRET
    assert settings.wecom.secret.get_secret_value() == "sec-" + SECRET


def test_secrets_are_secretstr_and_hidden_in_repr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """API key, WorkPro token and WeCom secret are SecretStr and never appear in repr or str of Settings."""
    monkeypatch.setenv("TOKEN_VAR", "tok-" + SECRET)
    path = write(
        tmp_path,
        "version: 1\napi: {key: key-" + SECRET + "}\nworkpro:\n  token: ${TOKEN_VAR}\n"
        "wecom: {secret: sec-" + SECRET + "}\n",
    )
    settings = load_settings(path)
    for value in (settings.api.key, settings.workpro.token, settings.wecom.secret):
        assert isinstance(value, SecretStr)
    for shown in (repr(settings), str(settings), repr(settings.api), settings.model_dump_json()):
        assert SECRET not in shown


def test_secrets_never_appear_in_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config error elsewhere in a file with secrets does not print them."""
    monkeypatch.setenv("WECAST_API_KEY", SECRET)
    path = write(
        tmp_path,
        "version: 1\nworkpro: {token: tok-" + SECRET + ", endpont: x}\napi: {key: key-" + SECRET + ", port: nope}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "workpro.endpont" in str(info.value)
    assert "api.port" in str(info.value)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


def test_wecast_config_hides_secrets(tmp_path: Path) -> None:
    """`wecast config` shows the effective settings with secrets and database passwords hidden."""
    path = write(tmp_path, "version: 1\napi: {key: key-" + SECRET + "}\n")
    env = {
        "WECAST_WECOM_SECRET": "sec-" + SECRET,
        "WECAST_DATABASE_URL": f"postgresql+psycopg://wecast:{SECRET}@db.example:5432/wecast",
    }
    result = CliRunner().invoke(main, ["-c", str(path), "config"], env=env)
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    body = json.loads(result.stdout.split("\n", 1)[1])
    assert body["database_url"] == "postgresql+psycopg://wecast:***@db.example:5432/wecast"
    assert body["api"]["key"] == "**********"
    assert body["wecom"]["secret"] == "**********"


def test_wecast_config_error_is_one_located_line(tmp_path: Path) -> None:
    """A bad config.yaml makes any command exit non-zero with the located message on stderr."""
    path = write(tmp_path, "version: 1\napi: {key: key-" + SECRET + ", prot: 1}\n")
    result = CliRunner().invoke(main, ["-c", str(path), "config"])
    assert result.exit_code != 0
    assert f"{path}:2: api.prot:" in result.stderr
    assert SECRET not in result.output
    assert "Traceback" not in result.output


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """database_url, campaigns_dir and sandbox.state_file are relative to config.yaml, not the cwd."""
    folder = tmp_path / "deploy"
    folder.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(
        folder,
        "version: 1\ndatabase_url: sqlite:///data/w.sqlite\ncampaigns_dir: my_campaigns\n"
        "sandbox:\n  state_file: state/s.sqlite\n",
    )
    settings = load_settings(path)
    base = folder.resolve()
    assert settings.database_url == f"sqlite:///{base / 'data' / 'w.sqlite'}"
    assert settings.campaigns_dir == base / "my_campaigns"
    assert settings.sandbox.state_file == base / "state" / "s.sqlite"


def test_absolute_paths_and_other_urls_are_kept(tmp_path: Path) -> None:
    """Absolute paths, in-memory SQLite and non-SQLite URLs are not rewritten."""
    absolute = tmp_path / "abs" / "w.sqlite"
    path = write(tmp_path, f"version: 1\ndatabase_url: sqlite:///{absolute}\ncampaigns_dir: {tmp_path / 'c'}\n")
    settings = load_settings(path)
    assert settings.database_url == f"sqlite:///{absolute}"
    assert settings.campaigns_dir == tmp_path / "c"
    for url in ("sqlite:///:memory:", "postgresql+psycopg://u:p@h/db"):
        assert load_settings(write(tmp_path, f"version: 1\ndatabase_url: '{url}'\n")).database_url == url


def test_the_postgresql_driver_installs_with_wecast(tmp_path: Path) -> None:
    """The driver a wrong database_url is pointed to ("use postgresql+psycopg://… (installed with wecast)") is one of
    wecast's own dependencies, not only the tests': after the README's `pip install -e .` a PostgreSQL URL works."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert any(dep.replace(" ", "").startswith("psycopg[binary]") for dep in project["dependencies"]), project
    with pytest.raises(ConfigError, match=r"installed with wecast"):
        load_settings(write(tmp_path, "version: 1\ndatabase_url: 'postgresql+pg8000://u@h/db'\n"))


def test_shipped_config_loads() -> None:
    """The repository's config.yaml is valid and uses the documented defaults."""
    root = Path(__file__).resolve().parent.parent
    settings = load_settings(root / "config.yaml")
    assert settings.version == 1
    assert settings.timezone == "Asia/Shanghai"
    assert settings.gateway == "sandbox"
    assert settings.campaigns_dir == root / "campaigns"
