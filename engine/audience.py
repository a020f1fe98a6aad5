"""Who is picked, and why everyone else is not.

An audience is `(ids, or every contact) ∩ tag filters ∩ rules − exclusions`, then `limit`. Contacts that
can never receive a message (not a friend, a coworker unless `include_coworkers`) are excluded too. Every
excluded contact gets a reason in words, which the preview shows.

Rules (under `audience.rules`; a list means all must hold):

    - city: [上海, 杭州]              # shorthand: a list means "one of", a scalar means "equals"
    - gender: female                  # male / female / unknown (or 男 / 女 / 1 / 2 / 0)
    - phone: {present: true}          # operators: eq ne in not_in contains not_contains startswith
    - name: {matches: "^王"}          #   endswith matches gt gte lt lte present
    - added_within: 30d               # the customer added us within 30 days (also added_over: 90d,
    - tag: 护肤                       #   added_after: 2026-01-01, added_before: ...)
    - any: [{city: 上海}, {tag: VIP}] # combinators: all, any, not
    - not: {province: 广东}

Rules are compiled once into predicates that return None (pass) or the reason a contact fails.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from enum import StrEnum
from typing import Any

from engine.durations import parse_duration
from engine.gateways.base import ContactRecord

ContactView = Mapping[str, Any]
Check = Callable[[ContactView, datetime], str | None]

# Fields a rule can test: the contact payload (see `ContactRecord`), plus `phone` (the first phone) and `tags`.
FIELDS = (
    *(f.name for f in dataclasses.fields(ContactRecord) if f.name not in ("tag_ids", "additional_info")),
    "phone",
    "tags",
)
ALIASES = {
    "realName": "real_name",
    "corpId": "corp_id",
    "addedAt": "added_at",
    "tag": "tags",
    "remark": "alias",
    "备注": "alias",
    "城市": "city",
    "省份": "province",
    "性别": "gender",
}
GENDERS = {"male": 1, "m": 1, "男": 1, "1": 1, "female": 2, "f": 2, "女": 2, "2": 2, "unknown": 0, "未知": 0, "0": 0}
GENDER_NAMES = {0: "unknown", 1: "male", 2: "female"}
OPS = (
    "eq",
    "ne",
    "in",
    "not_in",
    "contains",
    "not_contains",
    "startswith",
    "endswith",
    "matches",
    "gt",
    "gte",
    "lt",
    "lte",
    "present",
)


class RuleError(ValueError):
    """A rule is malformed; `path` is relative to `audience.rules`."""

    def __init__(self, reason: str, path: Sequence[str | int] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = tuple(path)


@dataclass(frozen=True)
class Rule:
    check: Check
    text: str
    fields: frozenset[str] = frozenset()  # contact fields the rule reads (so planning loads only those)

    def __call__(self, contact: ContactView, now: datetime) -> str | None:
        return self.check(contact, now)


def _reads(field: str) -> frozenset[str]:
    return frozenset({"phones" if field == "phone" else field})


def _field(name: str, path: tuple[str | int, ...]) -> str:
    field = ALIASES.get(name, name)
    if field not in FIELDS:
        raise RuleError(f"unknown contact field {name!r}; known fields: {', '.join(FIELDS)}", path)
    return field


def _value(contact: ContactView, field: str) -> Any:
    if field == "phone":
        phones = contact.get("phones") or ()
        return phones[0] if phones else ""
    if field == "gender":
        return contact.get("gender") or 0
    return contact.get(field)


def _show(value: Any) -> str:
    if value is None or value == "":
        return "empty"
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ", ".join(sorted(str(v) for v in value)) + "]" if value else "none"
    if isinstance(value, datetime):
        return value.date().isoformat()
    return str(value)


def _norm(field: str, value: Any, path: tuple[str | int, ...]) -> Any:
    if field == "gender":
        key = str(value).strip().lower()
        if key not in GENDERS:
            raise RuleError(f"gender must be male, female or unknown (or 男/女), not {value!r}", path)
        return GENDERS[key]
    if field in ("friend", "coworker", "star") and not isinstance(value, bool):
        raise RuleError(f"{field} is true or false, not {value!r}", path)
    if field == "added_at":
        return _moment(value, path)
    if isinstance(value, list | dict):
        raise RuleError(f"expected a single value, got {type(value).__name__}", path)
    return value


def _moment(value: Any, path: tuple[str | int, ...]) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime.combine(value, time.min, tzinfo=UTC)
    raise RuleError(f"expected a date like 2026-01-31, got {value!r}", path)


def _compare(field: str, op: str, arg: Any, path: tuple[str | int, ...]) -> Rule:
    label = field if field != "gender" else "gender"

    def shown(v: Any) -> str:
        return GENDER_NAMES.get(v, str(v)) if field == "gender" else _show(v)

    if op == "present":
        if not isinstance(arg, bool):
            raise RuleError("present is true or false", path)

        def present(c: ContactView, _now: datetime) -> str | None:
            v = _value(c, field)
            has = v not in (None, "", 0) if field != "gender" else v != 0
            if isinstance(v, list | tuple | set | frozenset):
                has = bool(v)
            if has == arg:
                return None
            return f"{label} is empty" if arg else f"{label} is set ({shown(v)})"

        return Rule(present, f"{label} {'is set' if arg else 'is empty'}", _reads(field))

    if op in ("in", "not_in"):
        if not isinstance(arg, list) or not arg:
            raise RuleError(f"{op} takes a non-empty list", path)
        values = frozenset(_norm(field, v, (*path, i)) for i, v in enumerate(arg))
        listed = ", ".join(shown(v) for v in sorted(values, key=str))
        want = op == "in"

        def member(c: ContactView, _now: datetime) -> str | None:
            v = _value(c, field)
            hit = bool(v & values) if isinstance(v, frozenset | set) else v in values
            if hit == want:
                return None
            return f"{label} is {shown(v)}, " + (f"not one of {listed}" if want else f"which is excluded ({listed})")

        return Rule(member, f"{label} {'in' if want else 'not in'} [{listed}]", _reads(field))

    if op in ("contains", "not_contains", "startswith", "endswith", "matches"):
        if not isinstance(arg, str):
            raise RuleError(f"{op} takes text", path)
        pattern: re.Pattern[str] | None = None
        if op == "matches":
            try:
                pattern = re.compile(arg)
            except re.error as exc:
                raise RuleError(f"invalid regular expression {arg!r}: {exc}", path) from None

        def text_op(c: ContactView, _now: datetime) -> str | None:
            v = _value(c, field)
            if isinstance(v, frozenset | set | list | tuple):
                ok = (
                    arg in v
                    if op in ("contains", "not_contains")
                    else any(_text_ok(op, str(x), arg, pattern) for x in v)
                )
                ok = not ok if op == "not_contains" else ok
            else:
                ok = _text_ok(op, "" if v is None else str(v), arg, pattern)
            return None if ok else f"{label} {_show(v)} does not satisfy {op} {arg!r}"

        return Rule(text_op, f"{label} {op} {arg!r}", _reads(field))

    if op in ("eq", "ne", "gt", "gte", "lt", "lte"):
        target = _norm(field, arg, path)
        if op in ("gt", "gte", "lt", "lte") and not isinstance(target, int | float | datetime):
            raise RuleError(f"{op} compares numbers or dates, not {arg!r}", path)
        compare: Callable[[Any, Any], bool] = {
            "eq": lambda a, b: a == b,
            "ne": lambda a, b: a != b,
            "gt": lambda a, b: a > b,
            "gte": lambda a, b: a >= b,
            "lt": lambda a, b: a < b,
            "lte": lambda a, b: a <= b,
        }[op]
        symbol = {"eq": "=", "ne": "≠", "gt": ">", "gte": "≥", "lt": "<", "lte": "≤"}[op]

        def cmp(c: ContactView, _now: datetime) -> str | None:
            v = _value(c, field)
            if isinstance(v, frozenset | set):
                ok = (target in v) if op == "eq" else (target not in v) if op == "ne" else False
            else:
                try:
                    # A missing value is "not equal" to anything, as with `not_in` and `not`.
                    ok = compare(v, target) if op == "ne" else v is not None and compare(v, target)
                except TypeError:
                    ok = False
            return None if ok else f"{label} is {shown(v)}, not {symbol} {shown(target)}"

        return Rule(cmp, f"{label} {symbol} {shown(target)}", _reads(field))

    raise RuleError(f"unknown operator {op!r}; use one of {', '.join(OPS)}", path)


def _text_ok(op: str, value: str, arg: str, pattern: re.Pattern[str] | None) -> bool:
    if op == "contains":
        return arg in value
    if op == "not_contains":
        return arg not in value
    if op == "startswith":
        return value.startswith(arg)
    if op == "endswith":
        return value.endswith(arg)
    assert pattern is not None
    return pattern.search(value) is not None


def _added(kind: str, arg: Any, path: tuple[str | int, ...]) -> Rule:
    if kind in ("added_within", "added_over"):
        try:
            span = parse_duration(arg)
        except ValueError as exc:
            raise RuleError(str(exc), path) from None
        within = kind == "added_within"

        def by_age(c: ContactView, now: datetime) -> str | None:
            added = c.get("added_at")
            if added is None:
                return "added date unknown"
            recent = added >= now - span
            if recent == within:
                return None
            days = max(0, (now - added).days)
            return f"added {days} days ago ({added.date().isoformat()})"

        return Rule(by_age, f"added {'within' if within else 'more than'} {arg} ago", frozenset({"added_at"}))
    moment = _moment(arg, path)
    after = kind == "added_after"

    def by_date(c: ContactView, _now: datetime) -> str | None:
        added = c.get("added_at")
        if added is None:
            return "added date unknown"
        ok = added >= moment if after else added < moment
        return None if ok else f"added on {added.date().isoformat()}"

    return Rule(by_date, f"{kind.replace('_', ' ')} {moment.date().isoformat()}", frozenset({"added_at"}))


def parse_rules(raw: Any, path: tuple[str | int, ...] = ()) -> Rule:
    """Compile a rule (or list of rules, meaning all) into a predicate. Raises RuleError with a path."""
    if isinstance(raw, list):
        if not raw:
            raise RuleError("an empty list of rules; remove `rules:` or add a rule", path)
        return _all([parse_rules(r, (*path, i)) for i, r in enumerate(raw)])
    if not isinstance(raw, dict) or len(raw) != 1:
        raise RuleError("each rule is a mapping with one key, like `city: [上海]` or `all: [...]`", path)
    ((key, arg),) = raw.items()
    key = str(key)
    here = (*path, key)
    if key in ("all", "any"):
        if not isinstance(arg, list) or not arg:
            raise RuleError(f"{key} takes a non-empty list of rules", here)
        parts = [parse_rules(r, (*here, i)) for i, r in enumerate(arg)]
        return _all(parts) if key == "all" else _any(parts)
    if key == "not":
        inner = parse_rules(arg, here)

        def negate(c: ContactView, now: datetime) -> str | None:
            return f"matches excluded rule: {inner.text}" if inner(c, now) is None else None

        return Rule(negate, f"not ({inner.text})", inner.fields)
    if key in ("added_within", "added_over", "added_after", "added_before"):
        return _added(key, arg, here)
    field = _field(key, here)
    if isinstance(arg, dict):
        if not arg:
            raise RuleError("an empty operator mapping", here)
        ops = [_compare(field, str(op), value, (*here, str(op))) for op, value in arg.items()]
        for op in arg:
            if op not in OPS:
                raise RuleError(f"unknown operator {op!r}; use one of {', '.join(OPS)}", (*here, str(op)))
        return _all(ops)
    if field == "tags":
        if isinstance(arg, list):
            return _compare(field, "in", arg, here)
        return _compare(field, "eq", arg, here)
    if field == "added_at":
        raise RuleError("use added_within / added_over / added_after / added_before for the added date", here)
    if isinstance(arg, list):
        return _compare(field, "in", arg, here)
    return _compare(field, "eq", arg, here)


def _all(parts: list[Rule]) -> Rule:
    if len(parts) == 1:
        return parts[0]

    def check(c: ContactView, now: datetime) -> str | None:
        for part in parts:
            reason = part(c, now)
            if reason is not None:
                return reason
        return None

    return Rule(check, " and ".join(p.text for p in parts), frozenset().union(*(p.fields for p in parts)))


def _any(parts: list[Rule]) -> Rule:
    def check(c: ContactView, now: datetime) -> str | None:
        reasons = []
        for part in parts:
            reason = part(c, now)
            if reason is None:
                return None
            reasons.append(reason)
        return "matches none of: " + "; ".join(reasons)

    return Rule(
        check, "any of (" + "; ".join(p.text for p in parts) + ")", frozenset().union(*(p.fields for p in parts))
    )


class ExclusionCategory(StrEnum):
    """Why a contact is left out of a run, as a kind (the reason says it in words)."""

    AUDIENCE = "audience"  # the targeting does not select them (tags, rules): not part of the run at all
    EXCLUSION = "exclusion"  # selected, but excluded: exclude_ids, tags_none, not a friend, a coworker, the limit
    DEDUPE = "dedupe"  # already got this campaign (this run, ever, or within the window)
    FREQUENCY_CAP = "frequency_cap"  # got as many marketing messages as the shared cap allows
    MISSING_FIELD = "missing_field"  # lacks a field the template uses (on_missing_field: skip)
    OPTED_OUT = "opted_out"  # on the suppression list (wrote an opt-out keyword such as TD; storage.optouts)

    @property
    def recorded(self) -> bool:
        """Whether a planned run records the contact as a skipped delivery (everyone the audience named)."""
        return self is not ExclusionCategory.AUDIENCE


OPTED_OUT_REASON = "opted out"  # the reason, in words, for ExclusionCategory.OPTED_OUT


@dataclass(frozen=True)
class Exclusion:
    contact_id: str
    name: str
    reason: str
    category: ExclusionCategory


@dataclass
class Selection:
    recipients: list[ContactView]
    excluded: list[Exclusion]
    unknown_ids: list[str]
    unknown_tags: list[str]


def select(
    contacts: Iterable[ContactView],
    *,
    ids: Sequence[str] = (),
    tags_any: Sequence[str] = (),
    tags_all: Sequence[str] = (),
    tags_none: Sequence[str] = (),
    rules: Rule | None = None,
    exclude_ids: Sequence[str] = (),
    limit: int | None = None,
    include_coworkers: bool = False,
    now: datetime,
    known_tags: Iterable[str] = (),
) -> Selection:
    """Apply an audience to contacts (each a mapping with the contact fields and `tags`, a set of tag
    names and ids). Recipients keep the input order; `limit` keeps the first N."""
    id_set = frozenset(ids)
    excl = frozenset(exclude_ids)
    t_any, t_all, t_none = frozenset(tags_any), frozenset(tags_all), frozenset(tags_none)
    recipients: list[ContactView] = []
    excluded: list[Exclusion] = []
    seen_ids: set[str] = set()
    for c in contacts:
        cid = c["id"]
        if id_set:
            if cid not in id_set:
                continue  # not a candidate at all: ids narrow the audience, silently
            seen_ids.add(cid)
        reason: str | None = None
        category = ExclusionCategory.EXCLUSION
        tags: frozenset[str] = c.get("tags") or frozenset()
        if cid in excl:
            reason = "listed in exclude_ids"
        elif not c.get("friend", True):
            reason = "not a friend of this account (cannot receive messages)"
        elif c.get("coworker") and not include_coworkers:
            reason = "coworker, not a customer"
        elif t_none and tags & t_none:
            reason = f"has excluded tag {', '.join(sorted(tags & t_none))}"
        else:
            category = ExclusionCategory.AUDIENCE
            if t_any and not tags & t_any:
                reason = f"has none of the tags {', '.join(sorted(t_any))}"
            elif t_all and not t_all <= tags:
                reason = f"lacks tag {', '.join(sorted(t_all - tags))}"
            elif rules is not None:
                reason = rules(c, now)
        if reason is None and limit is not None and len(recipients) >= limit:
            reason, category = f"over the audience limit of {limit}", ExclusionCategory.EXCLUSION
        if reason is None:
            recipients.append(c)
        else:
            excluded.append(Exclusion(cid, str(c.get("name") or ""), reason, category))
    known = frozenset(known_tags)
    wanted = t_any | t_all | t_none
    return Selection(
        recipients,
        excluded,
        unknown_ids=sorted(id_set - seen_ids),
        unknown_tags=sorted(wanted - known) if known else [],
    )
