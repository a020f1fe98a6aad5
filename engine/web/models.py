"""Request bodies and response models of the HTTP API (the objects shared with the CLI are `engine.views`)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.gateways.base import LoginStatus
from engine.i18n import tr
from engine.message_spec import Attachment
from engine.settings import FrequencyCap, QuietHours, Throttle
from engine.views import ContactView, DeliveryView, Problem, RunView, View
from engine.yamlsrc import CONTROL_CHARACTERS

MAX_MESSAGE = 4000

# -- request bodies ---------------------------------------------------------------------------------------


class Legacy(BaseModel):
    """Bodies as the source document's clients send them: unknown keys ignored, numbers taken as text."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)


class VerifyCodeBody(Legacy):
    verifyCode: str = Field(description="the 6-digit code WeCom shows on the phone after the scan")
    qrcodeKey: str | None = Field(default=None, max_length=200, description="the key /goStart returned")

    @field_validator("verifyCode")
    @classmethod
    def _six_digits(cls, v: str) -> str:
        digits = re.sub(r"\s", "", v)
        if not re.fullmatch(r"\d{6}", digits):
            raise ValueError(tr("must be the 6 digits shown on the phone"))
        return digits


class GetAllUserBody(Legacy):
    pageSize: int = Field(default=100, ge=1, le=1000, description="contacts per page")
    page: int | None = Field(default=None, ge=1, le=1_000_000, description="1-based page number")
    cursor: str | None = Field(default=None, max_length=200, description="`nextCursor` of the previous page")


def _text(v: str) -> str:
    if not v.strip():
        raise ValueError(tr("must not be empty"))
    bad = CONTROL_CHARACTERS.search(v)
    if bad:  # NUL and the like: WeCom shows garbage, and PostgreSQL cannot store a NUL in a text column
        raise ValueError(tr("control character {char} in the text", char="U+" + format(ord(bad.group()), "04X")))
    return v


ATTACHMENTS_DOC = (
    "up to 9 parts sent after the text: {kind: image|file, media_id (POST /api/v1/media) | url}, "
    "{kind: link, url, title, description?, thumbnail?}, "
    "{kind: miniprogram, appid, title, page, thumbnail_media_id | thumbnail_url, username?}"
)


class Sendable(Legacy):
    """The message of a send: `message` (the text, as in the source document) and `attachments`."""

    message: str | None = Field(default=None, min_length=1, max_length=MAX_MESSAGE, description="the text to send")
    attachments: list[Attachment] = Field(default_factory=list, max_length=9, description=ATTACHMENTS_DOC)

    _nonblank = field_validator("message")(lambda v: v if v is None else _text(v))


class SendMessageBody(Sendable):
    id: str = Field(min_length=1, max_length=200, description="the contact id from /get-all-user")


class SendAllBody(Sendable):
    ids: list[str] | None = Field(default=None, max_length=100_000, description="contact ids")
    id: str | list[str] | None = Field(default=None, description="a contact id or a list (the document's name)")
    tag: str | list[str] | None = Field(default=None, description="a tag name or id, or a list: its contacts")
    tags: list[str] | None = Field(default=None, description="several tags (contacts with any of them)")

    def recipient_ids(self) -> list[str]:
        ids = list(self.ids or [])
        ids += [self.id] if isinstance(self.id, str) else list(self.id or [])
        return [i for i in dict.fromkeys(x.strip() for x in ids) if i]

    def tag_names(self) -> list[str]:
        tags = [self.tag] if isinstance(self.tag, str) else list(self.tag or [])
        return [t for t in dict.fromkeys(x.strip() for x in [*tags, *(self.tags or [])]) if t]


class TestSendBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    contacts: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1, max_length=50, description="contact ids: who gets the test (audience or not)"
    )


class ValidateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str = Field(max_length=200_000, description="the YAML text of one campaign file")
    filename: str = Field(
        default="campaign.yaml",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.ya?ml$",
        description="its file name (the id defaults to the name without .yaml)",
    )


# -- answers ----------------------------------------------------------------------------------------------


class LoginView(View):
    """Where the login stands (the source document's field names)."""

    state: str
    message: str
    qrcodeKey: str | None
    qrcodeUrl: str | None
    secondVerification: bool
    triesLeft: int | None
    accountId: str | None
    accountName: str | None
    qrcodePng: str | None

    @classmethod
    def from_status(cls, status: LoginStatus, message: str | None = None) -> LoginView:
        return cls(
            state=status.state.value,
            message=status.message if message is None else message,
            qrcodeKey=status.qrcode_key,
            qrcodeUrl=status.qr_url,
            secondVerification=status.second_verification,
            triesLeft=status.tries_left,
            accountId=status.account_id,
            accountName=status.account_name,
            qrcodePng="/api/v1/login/qr.png" if status.qr_url else None,
        )


class VerifyAnswer(LoginView):
    verifyCode: str


class EventView(View):
    at: datetime | None
    gateway: str
    kind: str
    message: str
    data: dict[str, Any]


class LoginDetail(LoginView):
    gateway: str
    events: list[EventView]


class EventsView(View):
    events: list[EventView]


class AllUsersPage(View):
    """/get-all-user: a page of contacts in the source document's shape."""

    datas: list[ContactView]
    hasNextPage: bool
    nextCursor: str | None
    total: int
    page: int | None
    pageSize: int


class ContactsPageView(View):
    items: list[ContactView]
    total: int
    hasNextPage: bool
    nextCursor: str | None
    limit: int
    offset: int | None


class MediaView(View):
    """A file in the media store (POST /api/v1/media): send it as an attachment by its `id`."""

    id: str  # the sha256 of the content: `media_id` in an attachment
    name: str
    kind: str  # image | file
    mime: str  # read from the content
    size: int
    created: bool  # False: the same content was uploaded before (stored once)


class UnreadStaffView(View):
    staff_id: str
    reason: str


class SyncView(View):
    seen: int
    added: int
    updated: int
    removed: int
    tags: int
    kept: int = 0
    unread_staff: list[UnreadStaffView] = []


class TagView(View):
    id: str
    name: str
    group: str
    type: int
    contacts: int


class TagsView(View):
    tags: list[TagView]


class FireView(View):
    """One fire the scheduler acted on (or deliberately did not)."""

    campaign_id: str
    fire_time: datetime
    run_key: str
    action: str
    run_id: int | None
    reason: str


class CampaignView(View):
    id: str
    name: str
    description: str
    enabled: bool
    file: str
    timezone: str
    schedule: dict[str, Any] | None
    audience: dict[str, Any]
    dedupe: str
    frequency_cap: FrequencyCap | None
    quiet_hours: QuietHours | None
    throttle: Throttle
    content_hash: str
    next_fire: datetime | None = None
    # What the scheduler knows (absent without a scheduler):
    last_fire: datetime | None = None
    active_run: int | None = None
    waiting: bool | None = None
    history: list[FireView] | None = None


class CampaignDetail(CampaignView):
    runs: list[RunView]


class CampaignsView(View):
    campaigns: list[CampaignView]
    errors: list[Problem]


class ValidateView(View):
    valid: bool
    errors: list[Problem]
    id: str | None = None  # one posted campaign
    name: str | None = None
    next_fires: list[datetime] = []
    campaigns: list[str] | None = None  # every file of the folder


class RunNowView(View):
    message: str
    created: bool
    run: RunView


class TasksView(View):
    """What a look at (or an action on) a run's 群发 tasks found: POST /runs/{id}/reconcile | /remind."""

    tasks: int = Field(description="群发 tasks the run's deliveries waited in")
    sent: int = Field(0, description="deliveries that became sent")
    failed: int = Field(0, description="deliveries that became failed (WeCom's reason on each)")
    waiting: int = Field(0, description="deliveries still waiting for staff to confirm")
    reminded: int = Field(0, description="tasks whose staff were reminded (remind only)")
    problems: list[str] = Field(default_factory=list, description="tasks that could not be read or reminded, and why")
    run: RunView


class RunsView(View):
    runs: list[RunView]


class DeliveriesView(View):
    deliveries: list[DeliveryView]


class SyncState(View):
    last_sync_at: datetime | None
    syncing: bool
    last_error: str | None


class SchedulerCampaign(View):
    id: str
    next_fire: datetime | None
    last_fire: datetime | None
    active_run: int | None
    waiting: bool
    history: list[FireView]


class SchedulerView(View):
    enabled: bool
    dispatching: list[int]
    contacts: SyncState
    catch_up: str | None = None
    grace: float | None = None
    loaded_at: datetime | None = None
    campaigns: list[SchedulerCampaign] = []
    errors: list[Problem] = []
    recent_fires: list[FireView] = []


class SandboxScanView(LoginView):
    phoneCode: str | None


class SandboxPhoneView(View):
    verifyCode: str | None
    qrcodeKey: str | None
    state: str
    message: str


class OutboxMessageView(View):
    message_id: str
    contact_id: str
    text: str
    idempotency_key: str
    sent_at: str


class OutboxView(View):
    total: int
    messages: list[OutboxMessageView]


class SendResultItem(View):
    id: str
    name: str
    status: str
    reason: str
    messageId: str | None


class SendResult(View):
    """A direct send's outcome: counts and per-recipient results."""

    message: str
    runId: int
    runKey: str | None
    status: str | None
    sent: int
    failed: int
    pending: int
    counts: dict[str, int]
    results: list[SendResultItem]
    replayed: bool = False
    error: str | None = None
