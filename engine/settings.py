"""config.yaml + environment -> one `Settings` object, loaded once and passed down.

The file is strict: `version: 1`, unknown keys rejected, every error names file, line and field.
Secrets (API key, WorkPro token, the WeCom credentials) may be written as `${ENV_NAME}` or left out and given
in the environment (`WECAST_API_KEY`, `WECAST_WORKPRO_TOKEN`, `WECAST_WECOM_*`, see `_SECRET_ENV`); they are
`SecretStr`, so they never show in logs, errors or `repr`. `WECAST_DATABASE_URL` and `WECAST_GATEWAY` override the file.
Relative paths are relative to the config file's folder.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from engine import yamlsrc
from engine.durations import Duration
from engine.errors import ConfigError, Location
from engine.i18n import Language, ntr, tr
from engine.keywords import KeywordSpec, MatchKind, normalize

DEFAULT_TIMEZONE = "Asia/Shanghai"
GatewayName = Literal["sandbox", "workpro", "wecom"]


class Strict(BaseModel):
    # allow_inf_nan=False: "1e999" or .nan would pass every `gt=0` check (and mean "no throttle").
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def check_database_url(value: str) -> str:
    """A database wecast can keep its ledger in: SQLite or PostgreSQL, with its driver installed. Anything else was
    an "internal error" at the first command (`mysql://…`: ModuleNotFoundError; `not a url`: SQLAlchemy's
    ArgumentError); storage's SQL (ON CONFLICT, unnest) is written for these two."""
    from storage.db import UrlProblem, url_problem

    example = "sqlite:///data/wecast.sqlite, postgresql+psycopg://user@host/wecast"
    found = url_problem(value)
    if found is None:
        return value
    problem, name = found
    if problem is UrlProblem.UNPARSABLE:
        words = tr("{value} is not a database URL; write one like {example}", value=repr(value), example=example)
    elif problem is UrlProblem.BACKEND:
        words = tr(
            "wecast keeps its data in SQLite or PostgreSQL, not {backend}; write a URL like {example}",
            backend=name,
            example=example,
        )
    else:
        words = tr(
            "the database driver {driver} is not installed; use postgresql+psycopg://… (installed with wecast)",
            driver=repr(name),
        )
    raise ValueError(words)


def check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            tr("unknown time zone {value}; use an IANA name such as Asia/Shanghai", value=repr(value))
        ) from None
    return value


_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


def parse_hhmm(value: Any) -> time:
    if isinstance(value, time):
        return value
    if isinstance(value, int) and not isinstance(value, bool):  # YAML 1.1 reads 21:00 as 1260 (sexagesimal)
        value = f"{value // 60:02d}:{value % 60:02d}"
    match = _HHMM.match(str(value))
    if not match:
        raise ValueError(tr("{value} is not a time of day; write it like 21:00", value=repr(value)))
    return time(int(match.group(1)), int(match.group(2)))


class Throttle(Strict):
    """How fast to send. Both limits apply when both are set."""

    per_second: float | None = Field(default=None, gt=0)
    per_minute: float | None = Field(default=None, gt=0)

    @property
    def interval(self) -> float:
        """Seconds between two sends (0: unlimited)."""
        gaps = [1.0 / self.per_second] if self.per_second else []
        if self.per_minute:
            gaps.append(60.0 / self.per_minute)
        return max(gaps, default=0.0)


def _local_midnight(day: datetime, tz: ZoneInfo) -> datetime:
    """Midnight of `day`'s date in `tz`, re-resolved through the zone (so a DST change is handled)."""
    return datetime(day.year, day.month, day.day, tzinfo=tz)


class FrequencyCap(Strict):
    """At most `max` capped messages per contact per `per` (calendar day/week in the campaign's zone)."""

    max: int = Field(default=1, ge=1)
    per: Literal["day", "week", "month"] = "day"

    def window(self, now: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
        """The calendar day / week (from Monday) / month containing `now` in zone `tz`, as UTC bounds [start, end)."""
        local = now.astimezone(tz)
        if self.per == "week":
            first = local - timedelta(days=local.weekday())
            start, end = _local_midnight(first, tz), _local_midnight(first + timedelta(days=7), tz)
        elif self.per == "month":
            start = _local_midnight(local.replace(day=1), tz)
            end = _local_midnight((local.replace(day=1) + timedelta(days=32)).replace(day=1), tz)
        else:
            start, end = _local_midnight(local, tz), _local_midnight(local + timedelta(days=1), tz)
        return start.astimezone(UTC), end.astimezone(UTC)

    def reached(self, count: int) -> bool:
        """Whether a contact who got `count` capped messages in the window may get no more."""
        return count >= self.max

    def reason(self, count: int) -> str:
        """Why a contact is held back, in words: 今天已收到 1 条营销消息（上限 1 条）."""
        if self.per == "week":
            return ntr(
                "already got {n} marketing message this week (max {max})",
                "already got {n} marketing messages this week (max {max})",
                count,
                max=self.max,
            )
        if self.per == "month":
            return ntr(
                "already got {n} marketing message this month (max {max})",
                "already got {n} marketing messages this month (max {max})",
                count,
                max=self.max,
            )
        return ntr(
            "already got {n} marketing message today (max {max})",
            "already got {n} marketing messages today (max {max})",
            count,
            max=self.max,
        )


class QuietHours(Strict):
    """No sends from `start` to `end` local time (may cross midnight); sends wait for the window to open."""

    start: time
    end: time

    _parse = field_validator("start", "end", mode="before")(lambda v: parse_hhmm(v))

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHours:
        if self.start == self.end:
            raise ValueError(tr("quiet hours start and end are the same time"))
        return self

    @field_serializer("start", "end", when_used="json")
    def _hhmm(self, value: time) -> str:
        return value.strftime("%H:%M")

    def __str__(self) -> str:
        return f"{self:%H:%M}"

    def __format__(self, spec: str) -> str:
        """`f"{q}"` reads 21:00–09:00; a time format applies to both ends."""
        spec = spec or "%H:%M"
        return f"{self.start.strftime(spec)}–{self.end.strftime(spec)}"

    def contains(self, t: time) -> bool:
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def seconds_until_open(self, now: datetime, tz: ZoneInfo) -> float:
        """0 when `now` is outside the quiet hours (in zone `tz`); else the seconds until they end (at least 1)."""
        local = now.astimezone(tz)
        if not self.contains(local.time()):
            return 0.0
        opens = datetime(local.year, local.month, local.day, self.end.hour, self.end.minute, tzinfo=tz)
        if opens <= local:
            opens = _local_midnight(local + timedelta(days=1), tz).replace(hour=self.end.hour, minute=self.end.minute)
        return max(1.0, (opens - now).total_seconds())


class Retry(Strict):
    max_attempts: int = Field(default=4, ge=1, le=20)
    base_delay: Duration = timedelta(seconds=1)
    max_delay: Duration = timedelta(seconds=60)


class Sending(Strict):
    throttle: Throttle = Throttle(per_second=10)
    concurrency: int = Field(default=8, ge=1, le=256)
    retry: Retry = Retry()
    send_timeout: Duration = timedelta(seconds=30)
    frequency_cap: FrequencyCap | None = FrequencyCap()
    quiet_hours: QuietHours | None = QuietHours(start=time(21, 0), end=time(9, 0))
    max_errors: int = Field(default=50, ge=0)  # a run pauses after this many failed deliveries; 0 = never
    login_wait: Duration = timedelta(minutes=10)  # how long `wecast run` waits for a login before leaving sends pending


class Faults(Strict):
    """Sandbox fault injection. Rates are probabilities per send (0..1)."""

    latency_ms: float = Field(default=0, ge=0)
    latency_jitter_ms: float = Field(default=0, ge=0)
    error_rate: float = Field(default=0, ge=0, le=1)
    rate_limit_rate: float = Field(default=0, ge=0, le=1)
    timeout_rate: float = Field(default=0, ge=0, le=1)


class SandboxSettings(Strict):
    contacts: int = Field(default=200, ge=0, le=1_000_000)  # demo customers generated (and held) at start
    seed: int = 2024
    auto_login: bool = True
    scan_delay: Duration = timedelta(seconds=3)  # the simulated phone scans the QR this long after it shows
    second_verification: bool = False  # after login, ask for WeCom's "new device" QR once
    state_file: Path = Path("data/sandbox.sqlite")
    honor_idempotency_key: bool = True
    # direct: one text per customer, delivered at once (like workpro). batch: 群发 tasks like the official
    # API (one text for many customers, delivered when staff confirm, `confirm_delay` after submission).
    mode: Literal["direct", "batch"] = "direct"
    confirm_delay: Duration = timedelta(0)
    faults: Faults = Faults()
    # The message parts this account can send (all by default): fewer simulates a gateway that sends text only,
    # so validation refuses a campaign's other parts for it, and a send of one is refused for good.
    supports: list[Literal["text", "image", "link", "miniprogram", "file"]] = Field(
        default=["text", "image", "link", "miniprogram", "file"], min_length=1
    )

    @field_validator("supports")
    @classmethod
    def _text_always(cls, value: list[str]) -> list[str]:
        if "text" not in value:
            raise ValueError(tr("every gateway sends text: keep text in the list"))
        return value


class WorkproSettings(Strict):
    token: SecretStr | None = None
    endpoint: str | None = None  # host:port skips discovery
    # WorkPro serves plaintext; juzi's open-source PuppetServer serves TLS unless told not to (workpro/tls.py).
    tls: bool = False
    tls_server_name: str | None = None  # the name on the server's certificate (default: the token's prefix)
    tls_ca_cert: Path | None = None  # PEM of the CA that signed it (default: the Wechaty community root CA)
    discovery_authorities: list[str] = ["token-service-discovery-test.juzibot.com", "api.chatie.io"]
    ding_interval: Duration = timedelta(seconds=60)
    call_timeout: Duration = timedelta(seconds=30)
    contact_batch_size: int = Field(default=100, ge=1, le=1000)
    reconnect_delay: Duration = timedelta(seconds=1)  # first wait after the event stream drops; doubles
    reconnect_max_delay: Duration = timedelta(seconds=60)  # ... up to this (jittered)
    qr_wait: Duration = timedelta(seconds=10)  # how long start_login waits for the QR to arrive
    ready_wait: Duration = timedelta(seconds=30)  # after a login, how long a contact list waits for READY
    stop_on_close: bool = False  # call Stop on close (stops the account on the puppet)
    throttle_backoff: Duration = timedelta(seconds=30)  # sends pause this long after WorkproErrorCode 20001

    @field_validator("endpoint")
    @classmethod
    def _endpoint_shape(cls, value: str | None) -> str | None:
        return check_endpoint(value)


_GRPC_TARGET = re.compile(r"^(dns|ipv4|ipv6|unix|unix-abstract|vsock):", re.IGNORECASE)
_URL_SCHEME = re.compile(r"^(grpcs?|https?)://", re.IGNORECASE)


def check_endpoint(value: str | None) -> str | None:
    """The puppet's address as gRPC takes it: host:port. A URL's scheme and a trailing slash are dropped (gRPC took
    `http://1.2.3.4:8788` for a host name, and a missing port for 443); gRPC's own target forms (dns:, ipv4:,
    unix:, ...) pass as they are; anything else is an error at the config's line."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if _GRPC_TARGET.match(text):
        return text
    text = _URL_SCHEME.sub("", text).rstrip("/")
    host, colon, port = text.rpartition(":")
    if not colon or not host or "/" in text or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            tr("the puppet's address is host:port (for example 1.2.3.4:8788), with the port and without a path")
        )
    return text


_AES_KEY = re.compile(r"^[A-Za-z0-9]{43}$")


class WecomLimits(Strict):
    """The client-side limiter, per API (see docs: WeCom's per-corp limits are 10,000 calls a minute and 150,000
    an hour for each API, shared by every app of the corp; 45033 answers too many concurrent calls)."""

    per_minute: int = Field(default=10_000, ge=1)
    per_hour: int = Field(default=150_000, ge=1)
    concurrency: int = Field(default=5, ge=1, le=100)


class WecomSettings(Strict):
    """The official WeCom server API (gateway `wecom`). The four credentials are secrets: give them as `${ENV}` or
    in the environment (`WECAST_WECOM_CORP_ID`, `WECAST_WECOM_SECRET`, `WECAST_WECOM_CALLBACK_TOKEN`,
    `WECAST_WECOM_AES_KEY`); they never show in logs, errors, `wecast config` or `/metrics`."""

    corp_id: SecretStr | None = None
    secret: SecretStr | None = None  # the secret of the self-built app in 客户联系 → 可调用接口的应用
    callback_token: SecretStr | None = None  # 接收事件服务器: Token
    encoding_aes_key: SecretStr | None = None  # 接收事件服务器: EncodingAESKey (43 characters)
    agent_id: int | None = None  # the app's AgentId, for run summaries to staff through message/send
    webhook_key: SecretStr | None = None  # a group robot's key, for run summaries through its webhook
    base_url: str = "https://qyapi.weixin.qq.com"
    staff: list[str] = []  # only these members' customers (default: every member with customer contact)
    state_file: Path = Path("data/wecom.sqlite")  # 群发 task ledger, media ids, contact sync snapshots
    call_timeout: Duration = timedelta(seconds=15)
    limits: WecomLimits = WecomLimits()
    max_retries: int = Field(default=3, ge=0, le=20)  # -1 / 45009 / 45033 retried this often inside one call
    retry_delay: Duration = timedelta(seconds=1)  # first wait after -1 or 45033 (doubles, jittered)
    rate_limit_wait: Duration = timedelta(seconds=60)  # after 45009: WeCom blocks a minute limit for 60 s
    callback_max_age: Duration = timedelta(minutes=5)  # older (or replayed) callbacks are refused
    media_ttl: Duration = timedelta(days=3) - timedelta(hours=1)  # media/upload ids last 3 days: re-upload before
    customer_limit: Literal["month", "week", "day"] = "month"  # WeCom's per-customer 群发 limit (the corp's rule)

    @field_validator("encoding_aes_key")
    @classmethod
    def _aes_key_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _AES_KEY.match(value.get_secret_value()):
            raise ValueError(tr("the EncodingAESKey is 43 letters and digits (as the WeCom admin console shows it)"))
        return value


class ApiSettings(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=9898, ge=1, le=65535)
    key: SecretStr | None = None
    send_wait: Duration = timedelta(seconds=30)  # an API send answers 202 (still sending) after this long
    shutdown_timeout: Duration = timedelta(seconds=10)  # on stop, wait this long for in-flight sends
    sandbox_auto_login: bool = False  # `wecast serve` on the sandbox logs in by itself (else: POST /goStart)

    @field_validator("key")
    @classmethod
    def _real_key(cls, v: SecretStr | None) -> SecretStr | None:
        """A key of spaces (an empty `${ENV}`, a stray newline from a secrets file) would be no key at all: refused.
        Surrounding whitespace is dropped, as the Authorization header's is."""
        if v is None:
            return None
        key = v.get_secret_value().strip()
        if not key:
            raise ValueError(tr("the API key is empty or only whitespace; set a real key, or leave api.key out"))
        return SecretStr(key)


_USERID = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def check_robot_url(value: str) -> str:
    """A group robot's webhook URL: https (plain http only to this machine, for tests and local relays)."""
    parts = urlsplit(value.strip())
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if not parts.hostname or parts.scheme not in ("https", "http") or (parts.scheme == "http" and not loopback):
        raise ValueError(
            tr(
                "a group robot's webhook URL is https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=... "
                "(the URL WeCom shows when the robot is added to the group)"
            )
        )
    return value.strip()


def check_userids(value: list[str]) -> list[str]:
    for userid in value:
        if not _USERID.match(userid):
            raise ValueError(
                tr(
                    "{userid} is not a WeCom userid (letters, digits, _ . @ -; as in the admin console)",
                    userid=repr(userid),
                )
            )
    return value


class NotifySettings(Strict):
    """Run summaries for people (`notify:`): when a campaign's run finishes, its counts go to these staff members
    (WeCom userids, as an application message through `message/send`: gateway wecom only, with `wecom.agent_id`)
    and/or to a group robot's webhook (any gateway). The webhook URL carries the robot's key: give it as `${ENV}`.
    A campaign may turn them off (`notify: false`) or name its own (`engine.spec`)."""

    staff: list[str] = []
    robot: SecretStr | None = None

    _staff = field_validator("staff")(lambda v: check_userids(v))

    @field_validator("robot")
    @classmethod
    def _robot(cls, v: SecretStr | None) -> SecretStr | None:
        return None if v is None else SecretStr(check_robot_url(v.get_secret_value()))


class SchedulerSettings(Strict):
    catch_up: Literal["skip", "once", "all"] = "once"
    grace: Duration = timedelta(hours=1)  # a missed fire is caught up only if this recent
    contacts_sync: Duration | None = timedelta(hours=6)
    reload_interval: Duration = timedelta(seconds=5)


class OptOutSettings(Strict):
    """Opt-out by keyword: a customer who writes one is put on the suppression list, gets one confirmation, and
    every campaign and journey skips them ("opted out") until they write an opt-in keyword."""

    keywords: list[str] = ["TD", "退订", "取消订阅"]
    match: MatchKind = "exact"  # exact: the whole message (give or take punctuation); contains; regex
    reply: str = "您已成功退订，我们将不再向您推送营销消息。如需恢复接收，请回复“订阅”。"
    opt_in_keywords: list[str] = ["订阅", "恢复订阅"]
    opt_in_reply: str = "您已恢复订阅，感谢您的支持！"

    @model_validator(mode="after")
    def _distinct(self) -> OptOutSettings:
        KeywordSpec(keywords=self.keywords, match=self.match)
        KeywordSpec(keywords=self.opt_in_keywords, match=self.match)
        both = {normalize(k) for k in self.keywords} & {normalize(k) for k in self.opt_in_keywords}
        if both:
            raise ValueError(tr("{words} is both an opt-out and an opt-in keyword", words=", ".join(sorted(both))))
        return self


class Settings(Strict):
    version: Literal[1]
    gateway: GatewayName = "sandbox"
    timezone: str = DEFAULT_TIMEZONE
    database_url: str = "sqlite:///data/wecast.sqlite"
    _database = field_validator("database_url")(lambda v: check_database_url(v))
    # SQLite: how long a write waits for another process's lock before it fails (a clear error; the run resumes).
    database_busy_timeout: Duration = timedelta(seconds=30)
    campaigns_dir: Path = Path("campaigns")
    media_dir: Path = Path("data/media")  # uploaded images and files (POST /api/v1/media, `wecast send --image`)
    sending: Sending = Sending()
    sandbox: SandboxSettings = SandboxSettings()
    workpro: WorkproSettings = WorkproSettings()
    wecom: WecomSettings = WecomSettings()
    api: ApiSettings = ApiSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    opt_out: OptOutSettings = OptOutSettings()
    notify: NotifySettings = NotifySettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # zh_CN or en: the language of the CLI, the API's messages and the console (`--lang` and `?lang=` override it);
    # left out: the locale's (LANG starting with zh: Chinese), else English.
    language: Language | None = None
    # Where the settings came from (not a config key).
    source: str = Field(default="<defaults>", exclude=True)

    _tz = field_validator("timezone")(lambda v: check_timezone(v))

    @field_validator("language", mode="before")
    @classmethod
    def _language(cls, v: Any) -> Language | None:
        if v is None:
            return None
        lang = Language.parse(str(v))
        if lang is None:
            raise ValueError(tr("language must be zh_CN (中文) or en (English), not {value!r}").format(value=v))
        return lang

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


_ENV_REF = re.compile(r"^\$\{([A-Z_][A-Z0-9_]*)\}$")
_SECRET_ENV = {
    ("api", "key"): "WECAST_API_KEY",
    ("workpro", "token"): "WECAST_WORKPRO_TOKEN",
    ("wecom", "secret"): "WECAST_WECOM_SECRET",
    ("wecom", "corp_id"): "WECAST_WECOM_CORP_ID",
    ("wecom", "callback_token"): "WECAST_WECOM_CALLBACK_TOKEN",
    ("wecom", "encoding_aes_key"): "WECAST_WECOM_AES_KEY",
    ("wecom", "webhook_key"): "WECAST_WECOM_WEBHOOK_KEY",
    ("notify", "robot"): "WECAST_NOTIFY_ROBOT",
}


def _expand_env(data: Any, lines: yamlsrc.Lines, path: tuple[str | int, ...] = ()) -> Any:
    if isinstance(data, dict):
        return {k: _expand_env(v, lines, (*path, k)) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand_env(v, lines, (*path, i)) for i, v in enumerate(data)]
    if isinstance(data, str):
        match = _ENV_REF.match(data.strip())
        if match:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(tr("environment variable {name} is not set", name=name), lines.at(path))
            return os.environ[name]
    return data


def load_settings(path: str | Path | None = None, *, overrides: dict[str, Any] | None = None) -> Settings:
    """Load config.yaml (or `$WECAST_CONFIG`, or defaults if there is no file) plus the environment."""
    env_path = os.environ.get("WECAST_CONFIG")
    config_path = Path(path) if path else Path(env_path) if env_path else Path("config.yaml")
    explicit = path is not None or env_path is not None
    data: dict[str, Any] = {"version": 1}
    lines = yamlsrc.Lines(str(config_path))
    if config_path.exists():
        try:
            raw, lines = yamlsrc.load(yamlsrc.read_text(config_path), str(config_path))
        except FileNotFoundError:  # removed since exists(): as if it had not been there
            raise ConfigError(tr("config file not found: {path}", path=config_path)) from None
        except yamlsrc.YamlError as exc:
            raise ConfigError(str(exc), Location(str(config_path), exc.line)) from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(tr("config must be a mapping of keys to values"), Location(str(config_path), 1))
        if "version" not in raw:
            raise ConfigError(tr("missing `version: 1` at the top"), Location(str(config_path), 1, "version"))
        data = _expand_env(raw, lines)
    elif explicit:
        raise ConfigError(tr("config file not found: {path}", path=config_path))
    base = config_path.resolve().parent
    from_env: dict[str, str] = {}  # field -> the environment variable its value came from
    for (section, key), env in _SECRET_ENV.items():
        if os.environ.get(env):
            data.setdefault(section, {})
            if isinstance(data[section], dict):
                data[section] = {**data[section], key: os.environ[env]}
                from_env[f"{section}.{key}"] = env
    for key, env in (("database_url", "WECAST_DATABASE_URL"), ("gateway", "WECAST_GATEWAY")):
        if os.environ.get(env):
            data[key] = os.environ[env]
            from_env[key] = env
    for key, value in (overrides or {}).items():
        data[key] = value
        from_env.pop(key, None)
    try:
        settings = Settings.model_validate({**data, "source": str(config_path)})
    except ValidationError as exc:
        problems = [
            (_env_location(loc, from_env), reason)
            for loc, reason in yamlsrc.located(exc, lines, reference=yamlsrc.Reference.CONFIG)
        ]
        first_loc, first_reason = problems[0]
        more = "".join(f"\n  {loc}: {reason}" for loc, reason in problems[1:])
        raise ConfigError(first_reason + more, first_loc) from None
    if settings.notify.staff and settings.gateway != "wecom":
        raise ConfigError(
            tr(
                "staff are notified through WeCom's message/send, which needs gateway wecom; "
                "on this gateway use notify.robot (a group robot's webhook)"
            ),
            lines.at(("notify", "staff")),
        )
    return _resolve_paths(settings, base)


def _env_location(location: Location, from_env: dict[str, str]) -> Location:
    """Where a bad value came from: the environment variable that set it (`WECAST_GATEWAY=foo` is not a mistake at
    config.yaml's `gateway:` line, which may say `sandbox`), else the file's line."""
    field = location.field or ""
    for name, env in from_env.items():
        if field == name or field.startswith(name + "."):
            return Location(tr("environment variable {name}", name=env), None, field)
    return location


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    def rel(p: Path) -> Path:
        return p if p.is_absolute() else base / p

    url = settings.database_url
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and ":memory:" not in url:
        url = "sqlite:///" + str(rel(Path(url.removeprefix("sqlite:///"))))
    sandbox = settings.sandbox.model_copy(update={"state_file": rel(settings.sandbox.state_file)})
    wecom = settings.wecom.model_copy(update={"state_file": rel(settings.wecom.state_file)})
    ca_cert = settings.workpro.tls_ca_cert
    workpro = settings.workpro.model_copy(update={"tls_ca_cert": rel(ca_cert) if ca_cert else None})
    return settings.model_copy(
        update={
            "database_url": url,
            "campaigns_dir": rel(settings.campaigns_dir),
            "media_dir": rel(settings.media_dir),
            "sandbox": sandbox,
            "wecom": wecom,
            "workpro": workpro,
        }
    )


def redact_url(url: str) -> str:
    """A database URL with any password hidden, for logs and CLI output."""
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)
