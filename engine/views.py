"""One JSON shape per object: what `--json` prints and what the HTTP API answers are the same models.

Each view is a pydantic model built from the engine's or storage's typed value (`from_…`); the CLI prints its
`model_dump_json()`, and the API routes declare it as their `response_model`, so the OpenAPI schema documents
exactly what both say. Keys are stable English names; times are ISO 8601 with their offset (UTC as stored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

import pydantic_core
from pydantic import BaseModel, ConfigDict

from engine.audience import ExclusionCategory, ReasonCode
from engine.dispatch import RunSummary
from engine.errors import CampaignError
from engine.messages import Message
from engine.plan import Preview
from storage.contacts import ContactRow
from storage.deliveries import DeliveryRow, PartState
from storage.models import DeliveryStatus, PartStatus, RunStatus
from storage.runs import RunRow


class View(BaseModel):
    model_config = ConfigDict(frozen=True)


class Problem(View):
    """One problem in a campaign file: where (file, line, field) and why."""

    file: str | None
    line: int | None
    field: str | None
    message: str
    text: str  # the whole `file:line: field: message` line

    @classmethod
    def from_error(cls, e: CampaignError) -> Problem:
        return cls(file=e.location.file, line=e.location.line, field=e.location.field, message=e.reason, text=str(e))

    @classmethod
    def all_of(cls, errors: list[CampaignError]) -> list[Problem]:
        return [cls.from_error(p) for e in errors for p in e.problems]


class PreviewRecipient(View):
    id: str
    name: str
    message: str  # the text part ('' when the message has none)
    parts: list[dict[str, Any]]  # every part, with all its fields (engine.messages.Message.to_json)


class PreviewExcluded(View):
    id: str
    name: str
    category: ExclusionCategory
    reason_code: ReasonCode  # the stable code scripts read (the reason is for people, in their language)
    reason: str


class PreviewCounts(View):
    contacts: int
    recipients: int
    excluded: int
    distinct_messages: int
    by_category: dict[ExclusionCategory, int]


class PreviewView(View):
    """A dry run: who would get which message, who is left out and why (`wecast preview --json`,
    GET /api/v1/campaigns/{id}/preview). `recipients` and `excluded` may be a sample (`counts` has the totals)."""

    campaign: str
    name: str
    run_key: str
    timezone: str
    now: datetime
    already_planned: bool
    existing_run: int | None
    counts: PreviewCounts
    recipients: list[PreviewRecipient]
    excluded: list[PreviewExcluded]
    problems: list[str]
    unknown_ids: list[str]
    unknown_tags: list[str]
    next_fires: list[datetime]
    # Task-based gateways (the official API): 群发 tasks each staff member must confirm ('' = no staff member), and
    # what to know before sending (a personalised message making one task per customer). None / [] otherwise.
    tasks: dict[str, int] | None = None
    warnings: list[str] = []

    @classmethod
    def from_preview(cls, p: Preview, *, sample: int | None = None) -> PreviewView:
        """`sample`: list at most this many recipients and exclusions (None: all)."""
        return cls(
            campaign=p.campaign.id,
            name=p.campaign.name,
            run_key=p.run_key,
            timezone=p.campaign.timezone,
            now=p.now,
            already_planned=p.existing_run is not None,
            existing_run=p.existing_run.id if p.existing_run else None,
            counts=PreviewCounts(
                contacts=p.total_contacts,
                recipients=p.recipient_count,
                excluded=p.excluded_count,
                distinct_messages=p.distinct_messages,
                by_category=dict(p.excluded_by_category()),
            ),
            recipients=[
                PreviewRecipient(id=r.contact_id, name=r.name, message=r.text, parts=r.full_message().to_json())
                for r in p.recipients[:sample]
            ],
            excluded=[
                PreviewExcluded(id=e.contact_id, name=e.name, category=e.category, reason_code=e.code, reason=e.reason)
                for e in p.excluded[:sample]
            ],
            problems=[str(x) for x in p.problems()],
            unknown_ids=p.unknown_ids,
            unknown_tags=p.unknown_tags,
            next_fires=p.next_fires,
            tasks=p.tasks.by_staff if p.tasks else None,
            warnings=p.tasks.warnings() if p.tasks else [],
        )


class RunView(View):
    """A run with its delivery counts (`wecast runs --json`, /api/v1/runs). The dispatcher's identity is left out."""

    id: int
    campaign_id: str
    run_key: str
    trigger: str
    status: RunStatus
    timezone: str
    campaign_file: str
    campaign_hash: str
    settings: dict[str, Any]
    scheduled_for: datetime | None
    created_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    error: str
    planned: int
    skipped_at_plan: int
    counts: dict[DeliveryStatus, int]
    dispatching: bool | None = None  # being sent by this server now (the API knows; the CLI does not)

    @classmethod
    def from_row(cls, run: RunRow, counts: dict[DeliveryStatus, int], *, dispatching: bool | None = None) -> RunView:
        values = {k: v for k, v in asdict(run).items() if k != "owner"}
        return cls(**values, counts=counts, dispatching=dispatching)


class SummaryView(View):
    """What sending a run came to (`wecast run --json`)."""

    run_id: int
    status: RunStatus
    counts: dict[DeliveryStatus, int]
    message: str
    recovered: dict[str, int]

    @classmethod
    def from_summary(cls, s: RunSummary) -> SummaryView:
        return cls(run_id=s.run_id, status=s.status, counts=s.counts, message=s.message, recovered=s.recovered)


class PartView(View):
    """One part of a multi-part delivery as the ledger has it: which part, how far it got, the gateway's id."""

    index: int
    kind: str
    content_hash: str
    status: PartStatus
    gateway_message_id: str
    error: str
    sent_at: datetime | None

    @classmethod
    def from_state(cls, p: PartState) -> PartView:
        return cls(
            index=p.part_index,
            kind=p.kind,
            content_hash=p.content_hash,
            status=p.status,
            gateway_message_id=p.gateway_message_id,
            error=p.error,
            sent_at=p.sent_at,
        )


class DeliveryView(View):
    """One delivery (`wecast log --json`, /api/v1/deliveries). The dispatcher's claim token is left out. `message`:
    every part of a multi-part message (None for a plain text, which is `text`); `parts`: how far each got."""

    id: int
    run_id: int
    campaign_id: str
    contact_id: str
    contact_name: str
    text: str
    message: list[dict[str, Any]] | None
    parts: list[PartView]
    dedupe_key: str | None
    status: DeliveryStatus
    reason_code: str  # skipped deliveries: a ReasonCode (or an exclusion category, for older runs); else empty
    reason: str
    attempts: int
    last_error: str
    capped: bool
    gateway_message_id: str
    gateway_task_id: str
    next_attempt_at: datetime | None
    created_at: datetime | None
    updated_at: datetime | None
    sent_at: datetime | None

    @classmethod
    def from_row(cls, d: DeliveryRow, parts: Sequence[PartState] = ()) -> DeliveryView:
        code, reason = split_reason(d.reason)
        values = {k: v for k, v in asdict(d).items() if k not in ("claim_token", "message", "reason")}
        message = Message.loads(d.message).to_json() if d.message is not None else None
        return cls(
            **values, reason_code=code, reason=reason, message=message, parts=[PartView.from_state(p) for p in parts]
        )


_CODES = frozenset(ReasonCode) | frozenset(ExclusionCategory)


def split_reason(stored: str) -> tuple[str, str]:
    """A stored reason as (code, words): skips are recorded as `code: words` (`plan.Excluded.stored_reason`);
    a reason without a known code (a gateway's error, a cancel) has the code ''."""
    code, sep, words = stored.partition(": ")
    if sep and code in _CODES:
        # Runs planned before reason codes repeated the category in the words ("frequency_cap: frequency cap: …").
        return code, words.removeprefix(code.replace("_", " ") + ": ")
    return "", stored


class ContactView(View):
    """A contact with the source document's field names (the WorkPro/wechaty contact payload), as
    /get-all-user, /api/v1/contacts and `wecast contacts list --json` show it (camelCase as the document has it)."""

    id: str
    handle: str
    name: str
    alias: str
    avatar: str
    gender: int
    city: str
    province: str
    address: str
    corporation: str
    title: str
    phone: list[str]
    weixin: str
    description: str
    signature: str
    friend: bool
    coworker: bool
    star: bool
    type: int
    realName: str
    aka: str
    additionalInfo: dict[str, Any]
    corpId: str
    tags: list[str]
    tagIds: list[str]
    addedAt: datetime | None

    @classmethod
    def from_row(cls, row: ContactRow) -> ContactView:
        return cls(**contact_fields(row))


class ListedContactView(ContactView):
    """`wecast contacts list --json`: a contact and whether they opted out, and since when (the `opted_out` and
    `opted_out_at` of /api/v1/contacts/{id}/optout), since a script picking recipients needs to know."""

    opted_out: bool = False
    opted_out_at: datetime | None = None


def contact_fields(row: ContactRow) -> dict[str, Any]:
    """A contact's `ContactView` fields (typed values)."""
    return {
        "id": row.id,
        "handle": row.id,
        "name": row.name,
        "alias": row.alias,
        "avatar": row.avatar,
        "gender": row.gender,
        "city": row.city,
        "province": row.province,
        "address": row.address,
        "corporation": row.corporation,
        "title": row.title,
        "phone": list(row.phones),
        "weixin": row.weixin,
        "description": row.description,
        "signature": row.signature,
        "friend": row.friend,
        "coworker": row.coworker,
        "star": row.star,
        "type": row.type,
        "realName": row.real_name,
        "aka": row.aka,
        "additionalInfo": row.additional_info,
        "corpId": row.corp_id,
        "tags": [name for _, name in row.tags],
        "tagIds": [tid for tid, _ in row.tags],
        "addedAt": row.added_at,
    }


def json_page(key: str, items: bytes, rest: dict[str, Any]) -> bytes:
    """A page's JSON object: `key` first, its value the JSON array `items` (written already, see
    `storage.contacts.page_contacts_json`), then `rest`."""
    return b'{"' + key.encode() + b'":' + items + (b"," + json_bytes(rest)[1:] if rest else b"}")


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON, written by pydantic's own serializer (what a response model would write; several times
    faster than `json.dumps` for a page of contacts)."""
    return pydantic_core.to_json(value)
