"""`RunSettings`: how a run is sent, fixed when it is planned and stored with it.

The planner writes it once (`engine.plan`), as JSON in the run's `settings` column; the dispatcher reads it back
(validated: a damaged or foreign value is a clear error naming the run) and sends by it, so a run resumed after a
restart, or after its campaign file was edited, behaves exactly as planned. Nothing else rebuilds it.

It is a frozen, versioned model of value objects (`QuietHours`, `FrequencyCap` with their own methods), so what
later features need is added as fields with defaults, old rows still reading: a journey step's origin and its
transactional sends (exempt from the marketing cap: `frequency_cap: None` already means exempt and not counted),
or a rich message's parts (which belong to each delivery, not to the run).
"""

from __future__ import annotations

from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import Field, ValidationError, field_validator, model_validator

from engine.errors import WecastError
from engine.i18n import tr
from engine.settings import FrequencyCap, QuietHours, Strict, check_timezone


class RunNotify(Strict):
    """Who hears of the run when it finishes (a campaign's `notify:` resolved against config.yaml's). Never a
    secret: a robot is named by where its URL is (config.yaml's `notify.robot`, or the environment variable a
    campaign's `${NAME}` names), read when the summary is sent."""

    staff: list[str] = []  # WeCom userids (message/send: gateway wecom)
    config_robot: bool = False  # config.yaml's notify.robot
    robot_env: str | None = None  # the environment variable holding the campaign's own robot URL

    @property
    def anyone(self) -> bool:
        return bool(self.staff or self.config_robot or self.robot_env)


class RunSettings(Strict):
    """How one run is sent (see the module docstring)."""

    version: Literal[1] = 1
    name: str = ""  # the campaign's name (or the API send's), for people
    timezone: str  # quiet hours and the frequency cap's calendar are in this zone
    interval: float = Field(default=0.0, ge=0)  # seconds between two sends (0: unthrottled)
    max_errors: int = Field(default=0, ge=0)  # pause the run after this many failed deliveries (0: never)
    frequency_cap: FrequencyCap | None = None  # None: these sends are exempt from the cap and not counted by it
    quiet_hours: QuietHours | None = None  # None: send at any hour
    # True for replies to a customer's own message (an opt-out confirmation, a keyword journey's transactional
    # send): they go out even to a contact on the suppression list. Everything else skips opted-out contacts.
    opt_out_exempt: bool = False
    notify: RunNotify | None = None  # a campaign run's summary when it finishes (None: nobody is told)

    _tz = field_validator("timezone")(lambda v: check_timezone(v))

    @model_validator(mode="before")
    @classmethod
    def _from_release_0_1(cls, data: Any) -> Any:
        """Runs planned by wecast 0.1 stored an untyped dict (no `version`, `campaign_name`, the throttle's
        per_second/per_minute beside the interval they give): read them, so a run interrupted before an
        upgrade still resumes as it was planned."""
        if not isinstance(data, dict) or "version" in data:
            return data
        old = dict(data)
        old.pop("per_second", None)
        old.pop("per_minute", None)
        if "campaign_name" in old:
            old["name"] = old.pop("campaign_name")
        return {**old, "version": 1}

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def capped(self) -> bool:
        """Whether the run's sends count against (and are checked by) the shared frequency cap."""
        return self.frequency_cap is not None

    def to_json(self) -> dict[str, Any]:
        """The value stored in the run's `settings` column."""
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, value: Any, *, run_id: int) -> RunSettings:
        """Read a run's stored settings; anything unreadable is a WecastError naming the run and the field."""
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
            raise WecastError(
                tr(
                    "run {run}: its stored settings are unreadable ({where}: {why}); it was written by another "
                    "program or a newer wecast: cancel it (`wecast cancel {run}`) and plan the campaign again",
                    run=run_id,
                    where=where,
                    why=first.get("msg", "invalid"),
                )
            ) from None
