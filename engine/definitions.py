"""The files in `campaigns/`: campaigns and journeys, loaded together.

`engine.spec` reads campaigns and `engine.journeys.spec` journeys; this module loads a folder of both, checks what
spans files — ids unique across both kinds, every `goto` naming a journey, no endless ring of gotos — and finds
one definition by path or id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import CampaignError
from engine.i18n import tr
from engine.journeys.spec import EntryKind, GotoStep, Journey, load_journey_data
from engine.settings import Settings
from engine.spec import Campaign, JourneyFileError, find, load_campaign, load_campaigns, parse_campaign

Definition = Campaign | Journey


@dataclass
class Definitions:
    campaigns: list[Campaign] = field(default_factory=list)
    journeys: list[Journey] = field(default_factory=list)
    errors: list[CampaignError] = field(default_factory=list)

    def journey(self, journey_id: str) -> Journey | None:
        return next((j for j in self.journeys if j.id == journey_id), None)


def load_definition(path: Path, settings: Settings) -> Definition:
    """One file: a campaign or a journey. Raises CampaignError."""
    try:
        return load_campaign(path, settings)
    except JourneyFileError as exc:
        return load_journey_data(exc.data, exc.lines, exc.text, path, settings)


def parse_definition(text: str, file: Path, settings: Settings) -> Definition:
    """Text (from the API) as a campaign or a journey. Raises CampaignError."""
    try:
        return parse_campaign(text, file, settings)
    except JourneyFileError as exc:
        return load_journey_data(exc.data, exc.lines, exc.text, file, settings)


def load_definitions(paths: list[Path], settings: Settings) -> Definitions:
    """Load many files of both kinds; collects errors instead of stopping."""
    result = load_campaigns(paths, settings)
    out = Definitions(campaigns=result.campaigns, errors=list(result.errors))
    seen: dict[str, Path] = {c.id: c.file for c in result.campaigns}
    for file in result.journey_files:
        try:
            journey = load_definition(file, settings)
        except CampaignError as exc:
            out.errors.append(exc)
            continue
        assert isinstance(journey, Journey)
        if journey.id in seen:
            out.errors.append(
                CampaignError(
                    tr("id {id} is already used by {file}", id=repr(journey.id), file=seen[journey.id]),
                    journey.location("id"),
                )
            )
            continue
        seen[journey.id] = file
        out.journeys.append(journey)
    _check_gotos(out)
    return out


def _check_gotos(defs: Definitions) -> None:
    """Every `goto` names another journey that loaded; a journey with a bad goto is not run at all."""
    ids = {j.id for j in defs.journeys}
    campaign_ids = {c.id for c in defs.campaigns}
    broken: list[Journey] = []
    for journey in defs.journeys:
        for step, _ in journey.walk():
            if not isinstance(step, GotoStep):
                continue
            if step.journey == journey.id:
                why = tr("a journey cannot goto itself (use entry: every_time and a trigger to start again)")
            elif step.journey in campaign_ids:
                why = tr("{name} is a campaign; goto names a journey", name=repr(step.journey))
            elif step.journey not in ids:
                why = tr("no journey {name} in the campaigns folder", name=repr(step.journey))
            else:
                continue
            defs.errors.append(CampaignError(why, journey.location(*step.path, "goto")))
            broken.append(journey)
    defs.journeys = [j for j in defs.journeys if j not in broken]
    _check_goto_loops(defs)


def _check_goto_loops(defs: Definitions) -> None:
    """A ring of journeys that goto each other, all of them `entry: every_time`, would send a contact round it
    without end, as fast as the engine ticks (two such journeys sent one contact 335 messages in 20 s): like a goto
    to itself, it is refused, and its journeys are not run. A journey entered once (or again only after a while)
    breaks the ring, and so does one that is not enabled."""
    looping = {j.id: j for j in defs.journeys if j.enabled and j.entry.kind is EntryKind.EVERY_TIME}
    targets = {
        jid: [(s, s.journey) for s, _ in j.walk() if isinstance(s, GotoStep) and s.journey in looping]
        for jid, j in looping.items()
    }
    broken: set[str] = set()
    for jid, journey in looping.items():
        for step, target in targets[jid]:
            ring = _path(targets, target, jid)
            if ring is None:
                continue
            loop = " → ".join([jid, *ring])
            why = tr(
                "goto {target} closes a loop of journeys that all have entry: every_time ({loop}): a contact would "
                "go round it without end; give one of them entry: once or again_after",
                target=repr(target),
                loop=loop,
            )
            defs.errors.append(CampaignError(why, journey.location(*step.path, "goto")))
            broken.add(jid)
            break
    defs.journeys = [j for j in defs.journeys if j.id not in broken]


def _path(targets: dict[str, list[tuple[GotoStep, str]]], start: str, goal: str) -> list[str] | None:
    """The journeys from `start` to `goal` along gotos (both included; shortest), or None when there is no way."""
    came: dict[str, str | None] = {start: None}
    queue = [start]
    for here in queue:
        if here == goal:
            path = [here]
            while (back := came[path[-1]]) is not None:
                path.append(back)
            return path[::-1]
        for _, nxt in targets[here]:
            if nxt not in came:
                came[nxt] = here
                queue.append(nxt)
    return None


def find_definition(ref: str, settings: Settings) -> Definition:
    """A campaign or journey by file path, or by id among the files in campaigns_dir (see `engine.spec.find`)."""

    def load_all(files: list[Path]) -> tuple[list[Definition], list[CampaignError]]:
        defs = load_definitions(files, settings)
        return [*defs.campaigns, *defs.journeys], defs.errors

    return find(
        ref,
        settings,
        lambda path: load_definition(path, settings),
        load_all,
        lambda ref, folder: tr(
            "no campaign or journey {ref}: not a file, and no such id in {folder}", ref=repr(ref), folder=folder
        ),
    )
