"""What marketers see of running journeys: each journey with its counts, one journey's tree with the contacts at
each step, and a contact's path through every journey (the steps passed, when, and what was sent).

The same views answer `wecast journeys [--json]` and /api/v1/journeys: stable English keys; `text` fields are
words for people (the file's own words, the engine's reasons).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.engine import Engine

from engine.journeys.preview import Counts, StepNode, View, describe_entry, describe_trigger, tree
from engine.journeys.runtime import dedupe_key
from engine.journeys.spec import Journey
from storage import deliveries as deliveries_db
from storage import journeys as store
from storage import optouts as optouts_db
from storage.models import EnrolmentStatus

RECENT = 20


class JourneySummary(View):
    """A journey as listed: its trigger and entry policy (`trigger` / `entry`: stable keys, `*_text`: words), the
    contacts in it now (`active`, and `at_step` by step), those who finished by status (`finished`), and how often
    each step was passed (`passed`)."""

    id: str
    name: str
    description: str
    file: str
    enabled: bool
    timezone: str
    trigger: str
    trigger_text: str
    entry: str
    entry_text: str
    active: int
    finished: dict[str, int]
    at_step: dict[str, int]
    passed: dict[str, int]

    @classmethod
    def of(cls, journey: Journey, counts: Counts) -> JourneySummary:
        return cls(
            id=journey.id,
            name=journey.name,
            description=journey.description,
            file=str(journey.file),
            enabled=journey.enabled,
            timezone=journey.timezone,
            trigger=journey.trigger.kind.value,
            trigger_text=describe_trigger(journey),
            entry=journey.entry.kind.value,
            entry_text=describe_entry(journey),
            active=counts.active,
            finished=counts.ended,
            at_step=counts.at_step,
            passed=counts.passed,
        )


class EnrolmentView(View):
    """One entry of a contact into a journey, where it stands (`step`, `status`, `due_at`) and why it ended."""

    id: int
    journey: str
    contact: str
    entry: int
    status: EnrolmentStatus
    step: str
    reason: str
    entered_at: datetime | None
    due_at: datetime | None
    ended_at: datetime | None

    @classmethod
    def of(cls, e: store.EnrolmentRow) -> EnrolmentView:
        return cls(
            id=e.id,
            journey=e.journey_id,
            contact=e.contact_id,
            entry=e.entry,
            status=e.status,
            step=e.step,
            reason=e.reason,
            entered_at=e.entered_at,
            due_at=e.due_at,
            ended_at=e.ended_at,
        )


class JourneyDetail(JourneySummary):
    """A journey with its steps as a tree, each with its counts, and its most recent entries."""

    exit_when: list[str]
    steps: list[StepNode]
    recent: list[EnrolmentView]


def summaries(db: Engine, journeys: list[Journey]) -> list[JourneySummary]:
    return [JourneySummary.of(j, Counts.of(db, j.id)) for j in sorted(journeys, key=lambda j: j.id)]


def detail(db: Engine, journey: Journey, *, recent: int = RECENT) -> JourneyDetail:
    counts = Counts.of(db, journey.id)
    return JourneyDetail(
        **JourneySummary.of(journey, counts).model_dump(),
        exit_when=[c.text for c in journey.exit_when],
        steps=tree(journey, counts),
        recent=[EnrolmentView.of(e) for e in store.enrolments(db, journey_id=journey.id, limit=recent)],
    )


class PathStep(View):
    """One step a contact passed: when, with which outcome (a stable key: waited, then, else, event, timeout,
    sent, skipped, failed, unknown, tagged, goto, exit, completed, exited ...), and for a send what was sent."""

    step: str
    outcome: str
    detail: str
    at: datetime | None
    message: str | None = None
    delivery_status: str | None = None
    sent_at: datetime | None = None


class EnrolmentPath(EnrolmentView):
    name: str
    path: list[PathStep]


class ContactJourneys(View):
    """A contact's path through each journey, newest entry first, and whether they opted out."""

    contact: str
    opted_out: bool
    journeys: list[EnrolmentPath]


def contact_journeys(
    db: Engine, contact_id: str, names: dict[str, str] | None = None, *, limit: int = 100
) -> ContactJourneys:
    """Every entry of `contact_id` into a journey (`names`: journey id -> name, for the ones loaded)."""
    names = names or {}
    rows = store.enrolments(db, contact_id=contact_id, limit=limit)
    path = store.contact_path(db, contact_id)
    sent = {
        d.dedupe_key: d
        for d in deliveries_db.list_deliveries(db, contact_id=contact_id, limit=5000)
        if d.dedupe_key is not None
    }
    out: list[EnrolmentPath] = []
    for e in rows:
        steps: list[PathStep] = []
        for p in path:
            if p.enrolment_id != e.id:
                continue
            extra: dict[str, Any] = {}
            d = sent.get(dedupe_key(e.journey_id, contact_id, e.entry, p.step))
            if d is not None and p.outcome == d.status.value:
                extra = {"message": d.text, "delivery_status": d.status.value, "sent_at": d.sent_at}
            steps.append(PathStep(step=p.step, outcome=p.outcome, detail=p.detail, at=p.at, **extra))
        out.append(
            EnrolmentPath(**EnrolmentView.of(e).model_dump(), name=names.get(e.journey_id, e.journey_id), path=steps)
        )
    return ContactJourneys(
        contact=contact_id, opted_out=contact_id in optouts_db.opted_out(db, [contact_id]), journeys=out
    )
