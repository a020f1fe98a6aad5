"""Tables. Times are stored as UTC and always come back timezone-aware (see `UTCDateTime`).

Delivery states (the only ones; every delivery ends in a terminal one):

    pending ──claim──> claimed ──mark──> sending ──> sent
       ^                  │                 ├────> failed     (permanent error, or retries exhausted)
       └──── retry ───────┴─────────────────┤────> unknown    (may have been delivered; never retried silently)
                                            └────> submitted  (batch gateways: a task staff must confirm) -> sent/failed
    skipped   (decided at plan or dispatch time: dedupe, frequency cap, rule, missing data; `reason` says which)

A delivery is `in_doubt` once an attempt may have reached the customer but its outcome is not known (a crash caught
it `sending`, and the gateway's idempotency key lets it be sent again): whatever later attempts run into, it ends
`sent` or `unknown`, never `failed` or `skipped`, and the frequency cap counts it meanwhile.

A message of several parts (text, image, link, ...) is one delivery, sent part by part; each part the dispatcher
hands to the gateway has a `delivery_parts` row, written before the call, so a crash between two parts resends
only the parts not sent (see `PartStatus`). A plain text message has no part rows: the delivery is its one part.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index, String, Table, Text, UniqueConstraint, false, text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

SCHEMA_VERSION = 6
# The largest id of every table: PostgreSQL's integer (SQLite's ids go further). An id beyond it names no row; asked
# for, it is refused where it comes in (a 422, a usage error), as PostgreSQL would refuse the query.
MAX_ID = 2**31 - 1
# The length of the key columns (deliveries.dedupe_key, customer_events.key, enrolments.trigger_key): keys made of
# campaign or journey ids, run keys, contact ids and message ids. A longer key is stored as `fit_key` makes it, on
# both databases (PostgreSQL would refuse it, SQLite keep it whole).
KEY_LENGTH = 300
# The longest run key a person or client may give (`wecast run --run-key`, the API's Idempotency-Key): refused beyond
# it where it comes in (a usage error, a 422). Keys are fitted anyway; this keeps them whole in every key's head.
MAX_RUN_KEY = 200
# What separates the parts of a delivery's key (`{campaign}|{run key}|{contact}`). Campaign ids cannot hold it and a
# run key a person or client gives may not (`run_key_problem`), so a key names one run and one contact: run key
# `a|b` for contact `c` and run key `a` for contact `b|c` were one key, the second send wrongly "already sent".
KEY_SEPARATOR = "|"
# How much of a long key `fit_key` keeps as it is: room for `#` and the sha256 (64 hex digits).
KEY_HEAD = KEY_LENGTH - 65


def fit_key(key: str) -> str:
    """`key` as a key column stores it: itself when it fits (nearly always), otherwise its first KEY_HEAD characters,
    `#` and the sha256 of the whole key. The head keeps what lookups find keys by (a campaign's keys start with
    `<campaign id>|`); the hash keeps two long keys that differ only after the head two keys. Of a key that fits
    it is the key itself, so fitting twice changes nothing."""
    if len(key) <= KEY_LENGTH:
        return key
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{key[:KEY_HEAD]}#{digest}"


class UTCDateTime(TypeDecorator[datetime]):
    """Stores aware datetimes as naive UTC; returns them aware (UTC). Naive input is rejected."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: wecast stores only timezone-aware times")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


def _ts(nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    SENDING = "sending"
    SUBMITTED = "submitted"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"
    UNKNOWN = "unknown"


# Every delivery is in exactly one of these two sets: it ends in a terminal state; until then it is open
# (still to be sent, being sent, or waiting for staff to confirm a 群发 task).
TERMINAL_STATUSES = frozenset(
    {DeliveryStatus.SENT, DeliveryStatus.FAILED, DeliveryStatus.SKIPPED, DeliveryStatus.UNKNOWN}
)
OPEN_STATUSES = frozenset(
    {DeliveryStatus.PENDING, DeliveryStatus.CLAIMED, DeliveryStatus.SENDING, DeliveryStatus.SUBMITTED}
)
# Open deliveries not handed to the gateway yet: a run's queue.
QUEUED_STATUSES = frozenset({DeliveryStatus.PENDING, DeliveryStatus.CLAIMED})
# Deliveries that count against the per-contact frequency cap: anything that reached (or may have
# reached) the gateway, plus what is about to.
CAP_COUNTED_STATUSES = frozenset(
    {DeliveryStatus.SENDING, DeliveryStatus.SUBMITTED, DeliveryStatus.SENT, DeliveryStatus.UNKNOWN}
)


class PartStatus(StrEnum):
    """The state of one part of a multi-part message (a `delivery_parts` row)."""

    SENDING = "sending"  # being handed to the gateway (written before the call): it may have arrived
    SENT = "sent"  # the gateway accepted it (`gateway_message_id`)
    FAILED = "failed"  # refused, or an error before it left: not delivered; a retry of the delivery sends it again
    UNKNOWN = "unknown"  # it may or may not have arrived; never sent again


class RunStatus(StrEnum):
    RUNNING = "running"  # planned; deliveries are being dispatched (or wait for login / quiet hours)
    PAUSED = "paused"  # too many errors, or paused by a person; resume explicitly
    COMPLETED = "completed"  # every delivery is in a terminal state
    CANCELLED = "cancelled"  # stopped by a person; unsent deliveries were skipped


class Meta(SQLModel, table=True):
    """Key/value facts about the database itself (schema_version)."""

    __tablename__ = "wecast_meta"
    key: str = Field(primary_key=True)
    value: str


class Contact(SQLModel, table=True):
    """A customer as the gateway reports it, with every field of the source document's payload."""

    __tablename__ = "contacts"
    id: str = Field(primary_key=True)
    name: str = ""
    alias: str = ""
    avatar: str = ""
    gender: int = 0  # 0 unknown, 1 male, 2 female (puppet ContactGender)
    city: str = ""
    province: str = ""
    address: str = ""
    corporation: str = ""
    title: str = ""
    phones: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    weixin: str = ""
    description: str = ""
    signature: str = ""
    friend: bool = False
    coworker: bool = False
    star: bool = False
    type: int = 0  # 1 personal WeChat, 2 official account, 3 WeCom, 4 app
    real_name: str = ""
    aka: str = ""
    additional_info: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    corp_id: str = ""
    # The contact's tag ids, also kept here (beside contact_tags) so planning reads one table.
    tag_ids: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # The staff members (WeCom userids) who have the customer as a contact, the one a 群发 task goes out from first
    # (the official API's tasks are per staff member; the puppets' contacts have none).
    follow_user_ids: list[str] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default=text("'[]'"))
    )
    added_at: datetime | None = _ts(index=True)  # when the customer added us (additionalInfo.addContactTime)
    created_at: datetime | None = _ts()  # first seen by wecast
    updated_at: datetime | None = _ts()  # last changed by a sync
    removed_at: datetime | None = _ts()  # no longer in the gateway's list


class ContactSync(SQLModel, table=True):
    """One contact sync. Pages are committed one by one (100,000 contacts are never one transaction), so a sync that
    was killed leaves a list that is only partly updated: the contact list is whole when its latest sync finished
    (`finished_at`), and planning refuses it otherwise (`engine.contacts`)."""

    __tablename__ = "contact_syncs"
    # The generation: one more than the sync before it, so of two processes starting a sync at once one wins the key.
    id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    owner: str = ""  # host:pid of the process syncing
    started_at: datetime | None = _ts()
    heartbeat_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()
    seen: int = 0  # contacts the gateway listed (when finished)


class Tag(SQLModel, table=True):
    __tablename__ = "tags"
    id: str = Field(primary_key=True)
    name: str = Field(index=True)
    group_name: str = ""
    type: int = 0  # 1 personal, 2 corporate


class ContactTag(SQLModel, table=True):
    __tablename__ = "contact_tags"
    contact_id: str = Field(primary_key=True, foreign_key="contacts.id")
    tag_id: str = Field(primary_key=True, foreign_key="tags.id", index=True)


class CampaignRun(SQLModel, table=True):
    """One firing of a campaign (scheduled, manual or an API send). `run_key` identifies the slot."""

    __tablename__ = "campaign_runs"
    __table_args__ = (UniqueConstraint("campaign_id", "run_key", name="uq_run_campaign_key"),)
    id: int | None = Field(default=None, primary_key=True)
    campaign_id: str = Field(index=True)
    run_key: str
    trigger: str = "manual"  # schedule | manual | api
    status: str = Field(default=RunStatus.RUNNING, index=True)
    timezone: str = "Asia/Shanghai"
    campaign_file: str = ""
    campaign_hash: str = ""
    settings: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    scheduled_for: datetime | None = _ts()
    created_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()
    owner: str = ""  # host:pid of the process dispatching it
    heartbeat_at: datetime | None = _ts()
    error: str = ""
    planned: int = 0
    skipped_at_plan: int = 0


class Delivery(SQLModel, table=True):
    """One message to one contact in one run. The unique `dedupe_key` makes planning idempotent."""

    __tablename__ = "deliveries"
    __table_args__ = (
        # Few indexes on purpose: a 100,000-recipient plan writes every one of them.
        # (contact_id, run_id) also serves "this contact's deliveries" (frequency cap at send time);
        # dedupe keys start with the campaign id, so their index also serves "this campaign's deliveries".
        UniqueConstraint("contact_id", "run_id", name="uq_delivery_contact_run"),
        UniqueConstraint("dedupe_key", name="uq_delivery_dedupe_key"),
        Index("ix_delivery_dispatch", "run_id", "status", "next_attempt_at"),
        Index(
            "ix_delivery_sent_at",
            "sent_at",
            sqlite_where=text("sent_at IS NOT NULL"),
            postgresql_where=text("sent_at IS NOT NULL"),
        ),
    )
    id: int | None = Field(default=None, primary_key=True)
    # A foreign key on SQLite; on PostgreSQL a check once a statement, as strict and far cheaper (storage.db).
    run_id: int = Field(foreign_key="campaign_runs.id")
    campaign_id: str
    contact_id: str
    contact_name: str = ""
    text: str = Field(default="", sa_column=Column(Text, nullable=False))  # the message's text part
    # The whole message as JSON (engine.messages.Message.dumps) when it is more than a text; NULL for a plain text
    # message, which `text` is (most messages: planning 100,000 of them writes nothing more).
    message: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # Code-point order on PostgreSQL too, so the index serves the per-campaign key ranges (queries._campaign_range).
    dedupe_key: str | None = Field(
        default=None,
        sa_column=Column(
            String(KEY_LENGTH).with_variant(String(KEY_LENGTH, collation="C"), "postgresql"), nullable=True
        ),
    )
    status: str = Field(default=DeliveryStatus.PENDING)  # indexed with run_id in ix_delivery_dispatch
    # Server defaults let a big plan insert only the columns that vary (fewer bound values per row).
    reason: str = Field(default="", sa_column_kwargs={"server_default": ""})  # why skipped/failed/unknown
    attempts: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    last_error: str = Field(default="", sa_column_kwargs={"server_default": ""})
    capped: bool = True  # counts toward the shared per-contact frequency cap
    # An earlier attempt may have reached the customer (see the module docstring): never reported as not delivered.
    in_doubt: bool = Field(default=False, sa_column_kwargs={"server_default": false()})
    gateway_message_id: str = Field(default="", sa_column_kwargs={"server_default": ""})
    gateway_task_id: str = Field(default="", sa_column_kwargs={"server_default": ""})
    claim_token: str = Field(default="", sa_column_kwargs={"server_default": ""})
    next_attempt_at: datetime | None = _ts()
    created_at: datetime | None = _ts()
    updated_at: datetime | None = _ts()
    sent_at: datetime | None = _ts()  # when handed to the gateway (last attempt), then when accepted


class DeliveryPart(SQLModel, table=True):
    """One part of a multi-part delivery that was handed to the gateway: which part (index, kind, content hash),
    how it went, and the gateway's message id for it."""

    __tablename__ = "delivery_parts"
    delivery_id: int = Field(primary_key=True, foreign_key="deliveries.id")
    part_index: int = Field(primary_key=True)
    kind: str  # engine.messages.PartKind
    content_hash: str  # engine.messages.Message.part_hashes
    status: str = Field(default=PartStatus.SENDING)
    gateway_message_id: str = ""
    error: str = ""
    sent_at: datetime | None = _ts()  # when handed to the gateway (last attempt)
    updated_at: datetime | None = _ts()


class ScheduleState(SQLModel, table=True):
    """Last fire time the scheduler handled per campaign, so missed fires can be caught up after downtime."""

    __tablename__ = "schedule_state"
    campaign_id: str = Field(primary_key=True)
    last_fire_at: datetime | None = _ts()
    updated_at: datetime | None = _ts()


class GatewayEvent(SQLModel, table=True):
    """Login lifecycle and other gateway events, for the log and the API."""

    __tablename__ = "gateway_events"
    id: int | None = Field(default=None, primary_key=True)
    at: datetime | None = _ts(index=True)
    gateway: str = ""
    kind: str = ""
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


# The tables as SQLAlchemy Core objects, typed (SQLModel's `__table__` is not visible to type checkers).
CONTACTS: Table = Contact.__table__  # type: ignore[attr-defined]
CONTACT_SYNCS: Table = ContactSync.__table__  # type: ignore[attr-defined]
TAGS: Table = Tag.__table__  # type: ignore[attr-defined]
CONTACT_TAGS: Table = ContactTag.__table__  # type: ignore[attr-defined]
RUNS: Table = CampaignRun.__table__  # type: ignore[attr-defined]
DELIVERIES: Table = Delivery.__table__  # type: ignore[attr-defined]
DELIVERY_PARTS: Table = DeliveryPart.__table__  # type: ignore[attr-defined]
META: Table = Meta.__table__  # type: ignore[attr-defined]
SCHEDULE_STATE: Table = ScheduleState.__table__  # type: ignore[attr-defined]
GATEWAY_EVENTS: Table = GatewayEvent.__table__  # type: ignore[attr-defined]


# -- journeys (engine.journeys) --------------------------------------------------------------------------------
#
# Customer events go into an inbox before anything acts on them; an enrolment is one contact's way through one
# journey (entry N); each step it took is logged. A journey's sends are ordinary deliveries (dedupe key
# journey|contact|entry|step), so the ledger above keeps them exactly-once.
#
#     customer_events ──enter──> enrolments ──step──> enrolment_steps (path)
#                                    └── send step ──> deliveries (run per journey step, entry and day)


class CustomerEventKind(StrEnum):
    CONTACT_ADDED = "contact_added"
    CONTACT_REMOVED = "contact_removed"
    TAG_ADDED = "tag_added"
    TAG_REMOVED = "tag_removed"
    MESSAGE = "message"


class EnrolmentStatus(StrEnum):
    ACTIVE = "active"  # at `step`, due at `due_at` (a wait ends, a send is due, a retry)
    SENDING = "sending"  # at a send step whose delivery (`delivery_key`) is not in a terminal state yet
    COMPLETED = "completed"  # ran off the end of its steps (or a goto took it elsewhere)
    EXITED = "exited"  # left early: exit step, exit_when, opted out, removed; `reason` says which


OPEN_ENROLMENT_STATUSES = frozenset({EnrolmentStatus.ACTIVE, EnrolmentStatus.SENDING})


class CustomerEvent(SQLModel, table=True):
    """The inbox: a customer event, recorded before it is acted on. `key` is unique, so the same event seen by
    the gateway stream and by the next contact sync is recorded once."""

    __tablename__ = "customer_events"
    __table_args__ = (
        UniqueConstraint("key", name="uq_event_key"),
        Index("ix_event_contact", "contact_id", "kind", "occurred_at"),
        Index(
            "ix_event_unprocessed",
            "id",
            sqlite_where=text("processed_at IS NULL"),
            postgresql_where=text("processed_at IS NULL"),
        ),
    )
    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(sa_column=Column(String(KEY_LENGTH), nullable=False))  # fit_key
    kind: str
    contact_id: str
    source: str = ""  # stream | sync | journey | sandbox | api
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    occurred_at: datetime | None = _ts()
    recorded_at: datetime | None = _ts()
    processed_at: datetime | None = _ts()


class Enrolment(SQLModel, table=True):
    """One contact's way through one journey: entry number `entry`, now at `step`."""

    __tablename__ = "enrolments"
    __table_args__ = (
        UniqueConstraint("journey_id", "contact_id", "entry", name="uq_enrolment_entry"),
        # What entered it (an event, a schedule slot, a date, a backfill, a goto): one trigger enters once.
        UniqueConstraint("journey_id", "contact_id", "trigger_key", name="uq_enrolment_trigger"),
        Index("ix_enrolment_due", "status", "due_at"),
        Index("ix_enrolment_contact", "contact_id", "status"),
    )
    id: int | None = Field(default=None, primary_key=True)
    journey_id: str
    contact_id: str
    entry: int = 1
    trigger_key: str = Field(sa_column=Column(String(KEY_LENGTH), nullable=False))  # fit_key
    event_id: int | None = None
    status: str = EnrolmentStatus.ACTIVE
    step: str = ""
    due_at: datetime | None = _ts()
    step_started_at: datetime | None = _ts()  # when the current step began, as scheduled (waits count from it)
    delivery_key: str = ""  # the delivery a SENDING enrolment waits for
    attempts: int = 0  # tries of the current step (tag actions retried after gateway errors)
    version: int = 0  # bumped on every move: a move is `UPDATE … WHERE version = v`, so two workers never both win
    reason: str = ""
    entered_at: datetime | None = _ts()
    updated_at: datetime | None = _ts()
    ended_at: datetime | None = _ts()


class EnrolmentStep(SQLModel, table=True):
    """The path: every step an enrolment took, with its outcome (sent, skipped, waited, then/else, ...)."""

    __tablename__ = "enrolment_steps"
    __table_args__ = (Index("ix_enrolment_step_enrolment", "enrolment_id"),)
    id: int | None = Field(default=None, primary_key=True)
    enrolment_id: int
    journey_id: str
    contact_id: str
    step: str
    outcome: str
    detail: str = ""
    at: datetime | None = _ts()


class OptOut(SQLModel, table=True):
    """The suppression list: contacts who opted out (wrote TD, or a person put them here). Campaigns and
    journeys skip them with the reason "opted out"."""

    __tablename__ = "opt_outs"
    contact_id: str = Field(primary_key=True)
    opted_out_at: datetime | None = _ts()
    source: str = ""  # keyword | cli | api
    keyword: str = ""  # what they wrote
    confirmed_at: datetime | None = _ts()  # when the one confirmation was planned (never twice)
    note: str = ""


class JourneyState(SQLModel, table=True):
    """When the engine first ran a journey (events before it do not enter), and its backfill."""

    __tablename__ = "journey_state"
    journey_id: str = Field(primary_key=True)
    activated_at: datetime | None = _ts()
    content_hash: str = ""
    backfilled_at: datetime | None = _ts()


CUSTOMER_EVENTS: Table = CustomerEvent.__table__  # type: ignore[attr-defined]
ENROLMENTS: Table = Enrolment.__table__  # type: ignore[attr-defined]
ENROLMENT_STEPS: Table = EnrolmentStep.__table__  # type: ignore[attr-defined]
OPT_OUTS: Table = OptOut.__table__  # type: ignore[attr-defined]
JOURNEY_STATE: Table = JourneyState.__table__  # type: ignore[attr-defined]
JOURNEY_TABLES = (CUSTOMER_EVENTS, ENROLMENTS, ENROLMENT_STEPS, OPT_OUTS, JOURNEY_STATE)
