"""A journey's steps as the console draws them: a tree (branches of `if` and of a wait's timeout nested under their
step), each step with how many contacts stand at it now and how many have passed it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.journeys.preview import Counts, describe_wait
from engine.journeys.spec import ExitStep, GotoStep, IfStep, Journey, SendStep, Step, TagStep, WaitStep
from engine.web.console.templating import N_


@dataclass(frozen=True)
class Branch:
    """The steps under a step: `label` is the branch's name (then, else, on timeout)."""

    label: str
    nodes: list[Node]


@dataclass(frozen=True)
class Node:
    """One step: what it does (`kind`, a msgid; `text`, the file's own words), and its counts."""

    id: str
    kind: str
    text: str
    here: int  # open enrolments standing at this step
    passed: int  # times enrolments left this step (any outcome)
    branches: list[Branch] = field(default_factory=list)


JourneyCounts = Counts  # the console's tree counts are the preview's (engine.journeys.preview.Counts)


def tree(journey: Journey, counts: JourneyCounts) -> list[Node]:
    """The journey's steps as nodes, in file order, branches nested."""
    return _nodes(journey.steps, counts)


def _nodes(steps: Sequence[Step], counts: JourneyCounts) -> list[Node]:
    return [_node(step, counts) for step in steps]


def _node(step: Step, counts: JourneyCounts) -> Node:
    here, passed = counts.at_step.get(step.id, 0), counts.passed.get(step.id, 0)
    if isinstance(step, SendStep):
        kind = N_("Send (transactional)") if step.transactional else N_("Send")
        text = step.compiled.text
        attachments = sorted(k.value for k in step.compiled.kinds if k.value != "text")
        words = (text.template.source.strip() if text else "") + (
            f" [+{', '.join(attachments)}]" if attachments else ""
        )
        return Node(step.id, kind, words, here, passed)
    if isinstance(step, WaitStep):
        branches = [Branch(N_("on timeout"), _nodes(step.on_timeout, counts))] if step.on_timeout else []
        return Node(step.id, N_("Wait"), describe_wait(step), here, passed, branches)
    if isinstance(step, IfStep):
        branches = [Branch(N_("then"), _nodes(step.then, counts)), Branch(N_("else"), _nodes(step.otherwise, counts))]
        return Node(step.id, N_("If"), step.condition.text, here, passed, branches)
    if isinstance(step, TagStep):
        changes = [f"+{t}" for t in step.add] + [f"−{t}" for t in step.remove]
        return Node(step.id, N_("Tag"), " ".join(changes), here, passed)
    if isinstance(step, GotoStep):
        return Node(step.id, N_("Go to journey"), step.journey, here, passed)
    assert isinstance(step, ExitStep)
    return Node(step.id, N_("Exit"), step.reason, here, passed)
