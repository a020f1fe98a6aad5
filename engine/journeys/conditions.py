"""Conditions of `if:` steps and `exit_when:`: the audience rules, plus what a journey knows about a contact.

    if: {tag: 已购}                          # any audience rule (engine.audience): tags, fields, added_within, ...
    if: {replied: true}                      # the contact wrote to us since entering this journey
    if: {received: welcome}                  # the message of step `welcome` reached them (delivery sent)
    if: {opted_out: true}                    # on the suppression list (replied TD, or set by a person)
    if: {removed: true}                      # no longer a contact (deleted us, or we them)
    if: {message: {keywords: [价格], match: contains}}   # the message that started this journey
    if: {any: [{tag: VIP}, {replied: true}]} # combinators all / any / not, as in audience rules; a list = all

A condition is compiled once into a predicate over `Facts` that returns None when it holds and otherwise the
reason it does not, like `engine.audience.Rule`; previews print the reasons ("took else: lacks tag 已购").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from engine.audience import RuleError, Undecided, parse_rules
from engine.i18n import N_, tr
from engine.keywords import KeywordSpec

JOURNEY_LEAVES = ("replied", "received", "opted_out", "removed", "message")


@dataclass(frozen=True)
class Facts:
    """What a condition may look at for one enrolled contact, at one moment."""

    contact: Mapping[str, Any]  # the contact view (fields, `tags` with names and ids), as audience rules read it
    now: datetime
    replied: bool = False  # a message from the contact since the enrolment began
    received: frozenset[str] = frozenset()  # step ids whose delivery in this enrolment was sent
    opted_out: bool = False
    removed: bool = False
    message_text: str = ""  # the message that triggered the enrolment ("" for other triggers)


Test = Callable[[Facts], str | None]


@dataclass(frozen=True)
class Condition:
    """A compiled condition: `test(facts)` is None when it holds, else the reason it does not."""

    test: Test
    text: str
    fields: frozenset[str] = frozenset()  # contact columns it reads
    steps: frozenset[str] = field(default_factory=frozenset)  # step ids named by `received`

    def holds(self, facts: Facts) -> bool:
        return self.test(facts) is None


def parse_condition(raw: Any, path: tuple[str | int, ...] = ()) -> Condition:
    """Compile a condition (a list means all of them). Raises RuleError with a path relative to `raw`."""
    if isinstance(raw, list):
        if not raw:
            raise RuleError(tr("an empty list of conditions"), path)
        return _all([parse_condition(r, (*path, i)) for i, r in enumerate(raw)])
    if not isinstance(raw, dict) or len(raw) != 1:
        raise RuleError(
            tr("a condition is a mapping with one key, like `tag: 已购`, `replied: true` or `any: [...]`"), path
        )
    ((key, arg),) = raw.items()
    key = str(key)
    here = (*path, key)
    if key in ("all", "any"):
        if not isinstance(arg, list) or not arg:
            raise RuleError(tr("{key} takes a non-empty list of conditions", key=key), here)
        parts = [parse_condition(r, (*here, i)) for i, r in enumerate(arg)]
        return _all(parts) if key == "all" else _any(parts)
    if key == "not":
        inner = parse_condition(arg, here)

        def negate(f: Facts) -> str | None:
            reason = inner.test(f)
            if isinstance(reason, Undecided):  # a pattern out of time holds neither way (engine.patterns)
                return reason
            if reason is not None:
                return None
            return tr("matches excluded condition: {condition}", condition=inner.text)

        return Condition(negate, tr("not ({condition})", condition=inner.text), inner.fields, inner.steps)
    if key in ("replied", "opted_out", "removed"):
        return _flag(key, arg, here)
    if key == "received":
        return _received(arg, here)
    if key == "message":
        return _message(arg, here)
    rule = parse_rules(raw, path)
    return Condition(lambda f: rule(f.contact, f.now), rule.text, rule.fields)


def _flag(key: str, arg: Any, path: tuple[str | int, ...]) -> Condition:
    if not isinstance(arg, bool):
        raise RuleError(tr("{key} is true or false, not {value!r}", key=key, value=arg), path)
    words = {
        "replied": (N_("replied since entering"), N_("has not replied since entering")),
        "opted_out": (N_("opted out"), N_("has not opted out")),
        "removed": (N_("no longer a contact"), N_("still a contact")),
    }[key]
    yes, no = tr(words[0]), tr(words[1])

    def test(f: Facts) -> str | None:
        value: bool = getattr(f, key)
        if value == arg:
            return None
        return no if arg else yes

    return Condition(test, yes if arg else no)


def _received(arg: Any, path: tuple[str | int, ...]) -> Condition:
    if not isinstance(arg, str) or not arg:
        raise RuleError(tr("received names a send step by its id, like `received: welcome`"), path)

    def test(f: Facts) -> str | None:
        return None if arg in f.received else tr("did not receive step {step}", step=arg)

    return Condition(test, tr("received step {step}", step=arg), steps=frozenset({arg}))


def _message(arg: Any, path: tuple[str | int, ...]) -> Condition:
    if isinstance(arg, str | list):
        arg = {"keywords": [arg] if isinstance(arg, str) else arg}
    try:
        spec = KeywordSpec.model_validate(arg)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = tuple(str(p) for p in first["loc"])
        raise RuleError(str(first["msg"]).removeprefix("Value error, "), (*path, *where)) from None
    matcher = spec.matcher()
    if not spec.keywords:
        raise RuleError(tr("message takes keywords, like `message: {keywords: [价格]}`"), path)

    def test(f: Facts) -> str | None:
        return None if matcher(f.message_text) else tr("the message does not match ({words})", words=matcher.describe())

    return Condition(test, matcher.describe())


def _all(parts: list[Condition]) -> Condition:
    if len(parts) == 1:
        return parts[0]

    def test(f: Facts) -> str | None:
        for part in parts:
            reason = part.test(f)
            if reason is not None:
                return reason
        return None

    return Condition(
        test,
        tr(" and ").join(p.text for p in parts),
        frozenset().union(*(p.fields for p in parts)),
        frozenset().union(*(p.steps for p in parts)),
    )


def _any(parts: list[Condition]) -> Condition:
    def test(f: Facts) -> str | None:
        reasons = []
        for part in parts:
            reason = part.test(f)
            if reason is None:
                return None
            reasons.append(reason)
        return tr("matches none of: {reasons}", reasons="; ".join(reasons))

    return Condition(
        test,
        tr("any of ({conditions})", conditions="; ".join(p.text for p in parts)),
        frozenset().union(*(p.fields for p in parts)),
        frozenset().union(*(p.steps for p in parts)),
    )
