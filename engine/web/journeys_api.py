"""The journey routes of /api/v1 (registered by engine.web.api), same auth and errors as the rest:

journeys    GET /journeys (each with its counts, and the files that failed), GET /journeys/{id} (the tree with
            the contacts at each step, recent entries), GET /journeys/{id}/preview?contact=&assume= (who would
            enter now; with `contact` that contact's dry-run timeline; nothing is written)
contacts    GET /contacts/{id}/journeys (the contact's path through each journey), GET /optouts,
            GET | PUT | DELETE /contacts/{id}/optout (the opt-out state; put them on the list; take them off)
sandbox     POST /sandbox/events (simulated customers: add_contact, message, tag, untag, remove; sandbox only)

The answers are the views `wecast journeys --json` and `wecast preview JOURNEY --json` print.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field

from engine.errors import NotFoundError, WecastError
from engine.gateways.sandbox import SandboxGateway
from engine.i18n import Language, tr, use_language
from engine.journeys import overview
from engine.journeys import preview as pv
from engine.journeys.spec import Journey
from engine.optout_views import OptOutView, list_optouts, optout_state, set_optout
from engine.sandbox_events import SandboxEventBody, SimulatedEvent, simulate
from engine.views import Problem
from engine.web.context import WebContext

Lang = Annotated[str | None, Query(max_length=20, description="language of the words (zh, en); default: the server's")]
JourneyId = Annotated[str, PathParam(max_length=64, description="journey id")]
ContactId = Annotated[str, PathParam(max_length=200, description="contact id")]


class JourneysView(BaseModel):
    journeys: list[overview.JourneySummary]
    errors: list[Problem] = Field(description="files in the campaigns folder that did not load")


class JourneyPreviewView(BaseModel):
    """A journey's dry run: its steps, who would enter now, and (with `contact`) that contact's timeline."""

    journey: str
    name: str
    timezone: str
    trigger: str
    trigger_text: str
    entry: str
    entry_text: str
    exit_when: list[str]
    steps: list[pv.StepNode]
    enter_now: pv.EntryPreview
    timeline: pv.Timeline | None


class OptOutBody(BaseModel):
    note: str = Field(default="", max_length=500, description="why (kept with the opt-out)")


class OptOutsView(BaseModel):
    total: int
    optouts: list[OptOutView]


def journeys_of(ctx: WebContext) -> tuple[list[Journey], list[Problem]]:
    """The journeys the engine runs (loaded by the scheduler); without a scheduler, read from the folder."""
    _, errors = ctx.campaigns()
    if ctx.scheduler is not None:
        return list(ctx.app.journeys.journeys.values()), Problem.all_of(errors)
    from engine.definitions import load_definitions

    directory = ctx.app.settings.campaigns_dir
    defs = load_definitions([directory] if directory.is_dir() else [], ctx.app.settings)
    return defs.journeys, Problem.all_of(defs.errors)


def journey_of(ctx: WebContext, journey_id: str) -> Journey:
    found, _ = journeys_of(ctx)
    for j in found:
        if j.id == journey_id:
            return j
    raise NotFoundError(tr("no journey {id!r} in {folder}", id=journey_id, folder=ctx.app.settings.campaigns_dir))


def journey_preview(
    ctx: WebContext, journey: Journey, contact: str | None, assume: list[str], sample: int
) -> JourneyPreviewView:
    try:
        assumptions = [pv.Assumption.parse(a) for a in assume]
    except WecastError as exc:  # bad input: a 422 naming the parameter, as FastAPI's own checks answer
        raise RequestValidationError([{"loc": ("query", "assume"), "msg": str(exc), "type": "value_error"}]) from None
    now = ctx.app.clock.now()
    db = ctx.app.db
    return JourneyPreviewView(
        journey=journey.id,
        name=journey.name,
        timezone=journey.timezone,
        trigger=journey.trigger.kind.value,
        trigger_text=pv.describe_trigger(journey),
        entry=journey.entry.kind.value,
        entry_text=pv.describe_entry(journey),
        exit_when=[c.text for c in journey.exit_when],
        steps=pv.tree(journey),
        enter_now=pv.entry_preview(db, journey, now, sample=sample),
        timeline=(
            pv.timeline(db, journey, contact, now, assume=assumptions, journeys={j.id: j for j in journeys_of(ctx)[0]})
            if contact
            else None
        ),
    )


def router(ctx: WebContext) -> APIRouter:
    """The journey, opt-out and simulated-customer routes, bound to `ctx` (engine.web.api mounts them under /api/v1)."""
    r = APIRouter()
    app = ctx.app

    @r.get("/journeys", response_model=JourneysView, tags=["journeys"], summary="Journeys with their counts")
    def journeys(lang: Lang = None) -> JourneysView:
        with use_language(Language.parse(lang) if lang else None):
            found, errors = journeys_of(ctx)
            return JourneysView(journeys=overview.summaries(app.db, found), errors=errors)

    @r.get(
        "/journeys/{journey_id}",
        response_model=overview.JourneyDetail,
        tags=["journeys"],
        summary="One journey: its steps as a tree with the contacts at each step, recent entries",
    )
    def journey(journey_id: JourneyId, lang: Lang = None) -> overview.JourneyDetail:
        with use_language(Language.parse(lang) if lang else None):
            return overview.detail(app.db, journey_of(ctx, journey_id))

    @r.get(
        "/journeys/{journey_id}/preview",
        response_model=JourneyPreviewView,
        tags=["journeys"],
        summary="Dry run: who would enter now; with `contact`, that contact's timeline (nothing is written)",
    )
    def journey_preview_route(
        journey_id: JourneyId,
        contact: Annotated[str | None, Query(max_length=200, description="a contact id: its dry-run timeline")] = None,
        assume: Annotated[
            list[str],
            Query(
                description="what the customer does: replied, message:TEXT, tag:X, untag:X, optout, removed; "
                "@DURATION after entering (tag:已购@2d)",
            ),
        ] = [],  # noqa: B006 (FastAPI copies query defaults)
        sample: Annotated[int, Query(ge=0, le=500, description="how many entrants and exclusions to list")] = 20,
        lang: Lang = None,
    ) -> JourneyPreviewView:
        with use_language(Language.parse(lang) if lang else None):
            return journey_preview(ctx, journey_of(ctx, journey_id), contact, assume, sample)

    @r.get(
        "/contacts/{contact_id}/journeys",
        response_model=overview.ContactJourneys,
        tags=["contacts"],
        summary="A contact's path through each journey (steps passed, when, what was sent)",
    )
    def contact_journeys(contact_id: ContactId) -> overview.ContactJourneys:
        optout_state(app.db, contact_id)  # an unknown contact is a 404
        found, _ = journeys_of(ctx)
        return overview.contact_journeys(app.db, contact_id, {j.id: j.name for j in found})

    @r.get("/optouts", response_model=OptOutsView, tags=["contacts"], summary="The suppression list, newest first")
    def optouts() -> OptOutsView:
        rows = list_optouts(app.db)
        return OptOutsView(total=len(rows), optouts=rows)

    @r.get("/contacts/{contact_id}/optout", response_model=OptOutView, tags=["contacts"], summary="A contact's opt-out")
    def optout_get(contact_id: ContactId) -> OptOutView:
        return optout_state(app.db, contact_id)

    @r.put(
        "/contacts/{contact_id}/optout",
        response_model=OptOutView,
        tags=["contacts"],
        summary="Opt a contact out: no campaign or journey reaches them (replies to their own messages still do)",
    )
    def optout_put(contact_id: ContactId, body: Annotated[OptOutBody | None, Body()] = None) -> OptOutView:
        set_optout(app.db, contact_id, True, now=app.clock.now(), note=(body.note if body else ""))
        return optout_state(app.db, contact_id)

    @r.delete(
        "/contacts/{contact_id}/optout",
        response_model=OptOutView,
        tags=["contacts"],
        summary="Opt a contact back in",
    )
    def optout_delete(contact_id: ContactId) -> OptOutView:
        set_optout(app.db, contact_id, False, now=app.clock.now())
        return optout_state(app.db, contact_id)

    @r.post(
        "/sandbox/events",
        response_model=SimulatedEvent,
        tags=["sandbox"],
        summary="Sandbox: a simulated customer adds us, writes, is tagged or untagged, leaves",
    )
    async def sandbox_events(body: SandboxEventBody) -> SimulatedEvent:
        if not isinstance(app.gateway, SandboxGateway):
            raise NotFoundError(tr("sandbox endpoints exist only with `gateway: sandbox`"))
        done = await simulate(app.db, app.gateway, app.clock, body)
        app.journeys.poke()
        return done

    return r
