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
import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from enum import StrEnum
from typing import Any

from engine.durations import parse_duration
from engine.gateways.base import ContactRecord
from engine.i18n import N_, tr
from engine.patterns import Pattern, PatternError, PatternTimeout, compile_pattern

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


class Undecided(str):
    """The reason a rule could not be decided for a contact (a `matches` pattern ran out of time on their text,
    engine.patterns): the contact is left out, and `not` keeps it so instead of letting them in."""

    __slots__ = ()


@dataclass(frozen=True)
class Rule:
    check: Check
    describe: Callable[[], str]  # the rule in words, in the language in force when asked
    fields: frozenset[str] = frozenset()  # contact fields the rule reads (so planning loads only those)

    def __call__(self, contact: ContactView, now: datetime) -> str | None:
        return self.check(contact, now)

    @property
    def text(self) -> str:
        return self.describe()


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """` (did you mean city?)` when `name` looks like a misspelling of a known name, else empty."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    if not close:
        return ""
    return tr(" (did you mean {names}?)", names=tr(" or ").join(close))


def _reads(field: str) -> frozenset[str]:
    return frozenset({"phones" if field == "phone" else field})


def _field(name: str, path: tuple[str | int, ...]) -> str:
    field = ALIASES.get(name, name)
    if field not in FIELDS:
        raise RuleError(
            tr("unknown contact field {name!r}{hint}; known fields: {fields}").format(
                name=name, hint=did_you_mean(name, (*FIELDS, *ALIASES)), fields=", ".join(FIELDS)
            ),
            path,
        )
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
        return tr("empty")
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ", ".join(sorted(str(v) for v in value)) + "]" if value else tr("none")
    if isinstance(value, datetime):
        return value.date().isoformat()
    return str(value)


def _norm(field: str, value: Any, path: tuple[str | int, ...]) -> Any:
    if field == "gender":
        key = str(value).strip().lower()
        if key not in GENDERS:
            raise RuleError(
                tr("gender must be male, female or unknown (or 男/女), not {value!r}").format(value=value), path
            )
        return GENDERS[key]
    if field in ("friend", "coworker", "star") and not isinstance(value, bool):
        raise RuleError(tr("{field} is true or false, not {value!r}").format(field=field, value=value), path)
    if field == "added_at":
        return _moment(value, path)
    if isinstance(value, list | dict):
        raise RuleError(tr("expected a single value, got {kind}", kind=type(value).__name__), path)
    return value


def _moment(value: Any, path: tuple[str | int, ...]) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime.combine(value, time.min, tzinfo=UTC)
    raise RuleError(tr("expected a date like 2026-01-31, got {value!r}").format(value=value), path)


def _compare(field: str, op: str, arg: Any, path: tuple[str | int, ...]) -> Rule:
    if field == "tags" and op in _TAG_OPS:
        return _tag_rule(op, arg, path)
    label = field if field != "gender" else "gender"

    def shown(v: Any) -> str:
        return GENDER_NAMES.get(v, str(v)) if field == "gender" else _show(v)

    if op == "present":
        if not isinstance(arg, bool):
            raise RuleError(tr("present is true or false"), path)

        def present(c: ContactView, _now: datetime) -> str | None:
            v = _value(c, field)
            has = v not in (None, "", 0) if field != "gender" else v != 0
            if isinstance(v, list | tuple | set | frozenset):
                has = bool(v)
            if has == arg:
                return None
            return (
                tr("{field} is empty", field=label)
                if arg
                else tr("{field} is set ({value})", field=label, value=shown(v))
            )

        return Rule(
            present,
            lambda: tr("{field} is set", field=label) if arg else tr("{field} is empty", field=label),
            _reads(field),
        )

    if op in ("in", "not_in"):
        if not isinstance(arg, list) or not arg:
            raise RuleError(tr("{op} takes a non-empty list", op=op), path)
        values = frozenset(_norm(field, v, (*path, i)) for i, v in enumerate(arg))
        listed = ", ".join(shown(v) for v in sorted(values, key=str))
        want = op == "in"

        def member(c: ContactView, _now: datetime) -> str | None:
            v = _value(c, field)
            hit = bool(v & values) if isinstance(v, frozenset | set) else v in values
            if hit == want:
                return None
            if want:
                return tr("{field} is {value}, not one of {values}", field=label, value=shown(v), values=listed)
            return tr("{field} is {value}, which is excluded ({values})", field=label, value=shown(v), values=listed)

        return Rule(
            member,
            lambda: (tr("{field} in [{values}]") if want else tr("{field} not in [{values}]")).format(
                field=label, values=listed
            ),
            _reads(field),
        )

    if op in ("contains", "not_contains", "startswith", "endswith", "matches"):
        if not isinstance(arg, str):
            raise RuleError(tr("{op} takes text", op=op), path)
        pattern: Pattern | None = None
        if op == "matches":
            try:
                pattern = compile_pattern(arg)
            except PatternError as exc:
                raise RuleError(
                    tr("invalid regular expression {arg!r}: {error}").format(arg=arg, error=exc), path
                ) from None

        def text_op(c: ContactView, _now: datetime) -> str | None:
            v = _value(c, field)
            try:
                if isinstance(v, frozenset | set | list | tuple):
                    ok = (
                        arg in v
                        if op in ("contains", "not_contains")
                        else any(_text_ok(op, str(x), arg, pattern) for x in v)
                    )
                    ok = not ok if op == "not_contains" else ok
                else:
                    ok = _text_ok(op, "" if v is None else str(v), arg, pattern)
            except PatternTimeout:
                return Undecided(
                    tr("{field} {op} {arg!r} could not be decided in time").format(field=label, op=op, arg=arg)
                )
            if ok:
                return None
            return tr("{field} {value} does not satisfy {op} {arg!r}").format(
                field=label, value=_show(v), op=op, arg=arg
            )

        return Rule(text_op, lambda: f"{label} {op} {arg!r}", _reads(field))

    if op in ("eq", "ne", "gt", "gte", "lt", "lte"):
        target = _norm(field, arg, path)
        if op in ("gt", "gte", "lt", "lte") and not isinstance(target, int | float | datetime):
            raise RuleError(tr("{op} compares numbers or dates, not {arg!r}").format(op=op, arg=arg), path)
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
            if ok:
                return None
            return tr(
                "{field} is {value}, not {symbol} {target}",
                field=label,
                value=shown(v),
                symbol=symbol,
                target=shown(target),
            )

        return Rule(cmp, lambda: f"{label} {symbol} {shown(target)}", _reads(field))

    raise RuleError(_unknown_operator(op), path)


# `tag: 彩妆` and the like, said as the tag filters say it ("没有标签 彩妆"), not as a comparison of the contact's
# whole tag set, ids and all ("tags 是 [VIP, tag-baby, tag-skincare, …]，不满足 = 彩妆").
_TAG_OPS = {"eq": "eq", "contains": "eq", "ne": "ne", "not_contains": "ne", "in": "in", "not_in": "not_in"}


def _tag_rule(op: str, arg: Any, path: tuple[str | int, ...]) -> Rule:
    kind = _TAG_OPS[op]
    if kind in ("in", "not_in"):
        if not isinstance(arg, list) or not arg:
            raise RuleError(tr("{op} takes a non-empty list", op=op), path)
        wanted = frozenset(str(_norm("tags", v, (*path, i))) for i, v in enumerate(arg))
    else:
        wanted = frozenset({str(_norm("tags", arg, path))})
    listed = ", ".join(sorted(wanted))

    def has(c: ContactView) -> frozenset[str]:
        tags: frozenset[str] = c.get("tags") or frozenset()
        return tags & wanted

    if kind in ("eq", "in"):
        lacking = N_("lacks tag {tags}") if kind == "eq" else N_("has none of the tags {tags}")

        def check(c: ContactView, _now: datetime) -> str | None:
            return None if has(c) else tr(lacking, tags=listed)

        described = N_("has tag {tags}") if kind == "eq" else N_("has one of the tags {tags}")
        return Rule(check, lambda: tr(described, tags=listed), _reads("tags"))

    def check_not(c: ContactView, _now: datetime) -> str | None:
        found = has(c)
        return tr("has excluded tag {tags}", tags=", ".join(sorted(found))) if found else None

    return Rule(check_not, lambda: tr("has none of the tags {tags}", tags=listed), _reads("tags"))


def _unknown_operator(op: str) -> str:
    return tr("unknown operator {op!r}{hint}; use one of {ops}").format(
        op=op, hint=did_you_mean(op, OPS), ops=", ".join(OPS)
    )


def _text_ok(op: str, value: str, arg: str, pattern: Pattern | None) -> bool:
    if op == "contains":
        return arg in value
    if op == "not_contains":
        return arg not in value
    if op == "startswith":
        return value.startswith(arg)
    if op == "endswith":
        return value.endswith(arg)
    assert pattern is not None
    return pattern.search(value)


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
                return tr("added date unknown")
            recent = added >= now - span
            if recent == within:
                return None
            days = max(0, (now - added).days)
            return tr("added {days} days ago ({date})", days=days, date=added.date().isoformat())

        return Rule(
            by_age,
            lambda: (tr("added within {span}") if within else tr("added more than {span} ago")).format(span=arg),
            frozenset({"added_at"}),
        )
    moment = _moment(arg, path)
    after = kind == "added_after"

    def by_date(c: ContactView, _now: datetime) -> str | None:
        added = c.get("added_at")
        if added is None:
            return tr("added date unknown")
        ok = added >= moment if after else added < moment
        return None if ok else tr("added on {date}", date=added.date().isoformat())

    day = moment.date().isoformat()
    return Rule(
        by_date,
        lambda: tr("added on or after {date}", date=day) if after else tr("added before {date}", date=day),
        frozenset({"added_at"}),
    )


def parse_rules(raw: Any, path: tuple[str | int, ...] = ()) -> Rule:
    """Compile a rule (or list of rules, meaning all) into a predicate. Raises RuleError with a path."""
    if isinstance(raw, list):
        if not raw:
            raise RuleError(tr("an empty list of rules; remove `rules:` or add a rule"), path)
        return _all([parse_rules(r, (*path, i)) for i, r in enumerate(raw)])
    if not isinstance(raw, dict) or len(raw) != 1:
        raise RuleError(tr("each rule is a mapping with one key, like `city: [上海]` or `all: [...]`"), path)
    ((key, arg),) = raw.items()
    key = str(key)
    here = (*path, key)
    if key in ("all", "any"):
        if not isinstance(arg, list) or not arg:
            raise RuleError(tr("{key} takes a non-empty list of rules", key=key), here)
        parts = [parse_rules(r, (*here, i)) for i, r in enumerate(arg)]
        return _all(parts) if key == "all" else _any(parts)
    if key == "not":
        inner = parse_rules(arg, here)

        def negate(c: ContactView, now: datetime) -> str | None:
            reason = inner(c, now)
            if isinstance(reason, Undecided):  # not decided is not "does not match": left out either way
                return reason
            return tr("matches excluded rule: {rule}", rule=inner.text) if reason is None else None

        return Rule(negate, lambda: tr("not ({rule})", rule=inner.text), inner.fields)
    if key in ("added_within", "added_over", "added_after", "added_before"):
        return _added(key, arg, here)
    field = _field(key, here)
    if isinstance(arg, dict):
        if not arg:
            raise RuleError(tr("an empty operator mapping"), here)
        ops = [_compare(field, str(op), value, (*here, str(op))) for op, value in arg.items()]
        for op in arg:
            if op not in OPS:
                raise RuleError(_unknown_operator(str(op)), (*here, str(op)))
        return _all(ops)
    if field == "tags":
        if isinstance(arg, list):
            return _compare(field, "in", arg, here)
        return _compare(field, "eq", arg, here)
    if field == "added_at":
        raise RuleError(tr("use added_within / added_over / added_after / added_before for the added date"), here)
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

    return Rule(check, lambda: tr(" and ").join(p.text for p in parts), frozenset().union(*(p.fields for p in parts)))


def _any(parts: list[Rule]) -> Rule:
    def check(c: ContactView, now: datetime) -> str | None:
        reasons = []
        for part in parts:
            reason = part(c, now)
            if reason is None:
                return None
            reasons.append(reason)
        return tr("matches none of: {reasons}", reasons="; ".join(reasons))

    return Rule(
        check,
        lambda: tr("any of ({rules})", rules="; ".join(p.text for p in parts)),
        frozenset().union(*(p.fields for p in parts)),
    )


class ExclusionCategory(StrEnum):
    """Why a contact is left out of a run, as a kind (the reason says it in words; `ReasonCode` says which rule)."""

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


OPTED_OUT_REASON = N_("opted out")  # the reason, in words (tr() it when shown or stored), for ReasonCode.OPTED_OUT


class ReasonCode(StrEnum):
    """Why exactly a contact is left out: a stable machine code (`reason_code` in JSON and the API; scripts
    read this, never the words), finer than its category."""

    TAGS_ANY = "tags_any"  # has none of audience.tags_any
    TAGS_ALL = "tags_all"  # lacks a tag of audience.tags_all
    RULE = "rule"  # an audience rule does not hold (the reason says which)
    EXCLUDE_IDS = "exclude_ids"  # listed in audience.exclude_ids
    TAGS_NONE = "tags_none"  # has a tag of audience.tags_none
    NOT_FRIEND = "not_friend"  # not (or no longer) a friend of the account: cannot receive messages
    COWORKER = "coworker"  # a coworker, and include_coworkers is false
    LIMIT = "limit"  # over audience.limit
    DEDUPE = "dedupe"  # already in this run (or, with dedupe: once, in any run)
    DEDUPE_WINDOW = "dedupe_window"  # got this campaign within the dedupe window
    FREQUENCY_CAP = "frequency_cap"  # the shared marketing cap is reached
    MISSING_FIELD = "missing_field"  # lacks a field the template uses (on_missing_field: skip)
    OPTED_OUT = "opted_out"  # on the suppression list (storage.optouts)

    @property
    def category(self) -> ExclusionCategory:
        return _CATEGORY.get(self, ExclusionCategory.EXCLUSION)


_CATEGORY = {
    ReasonCode.TAGS_ANY: ExclusionCategory.AUDIENCE,
    ReasonCode.TAGS_ALL: ExclusionCategory.AUDIENCE,
    ReasonCode.RULE: ExclusionCategory.AUDIENCE,
    ReasonCode.DEDUPE: ExclusionCategory.DEDUPE,
    ReasonCode.DEDUPE_WINDOW: ExclusionCategory.DEDUPE,
    ReasonCode.FREQUENCY_CAP: ExclusionCategory.FREQUENCY_CAP,
    ReasonCode.MISSING_FIELD: ExclusionCategory.MISSING_FIELD,
    ReasonCode.OPTED_OUT: ExclusionCategory.OPTED_OUT,
}


@dataclass(frozen=True)
class Exclusion:
    contact_id: str
    name: str
    reason: str  # in words, in the language in force when the audience was selected
    code: ReasonCode

    @property
    def category(self) -> ExclusionCategory:
        return self.code.category


@dataclass
class Selection:
    recipients: list[ContactView]
    excluded: list[Exclusion]
    unknown_ids: list[str]
    unknown_tags: list[str]


class Selector:
    """An audience applied to contacts a chunk at a time (planning streams them in id order): `limit` and the
    listed ids carry over from one chunk to the next, so the chunks together decide exactly what one pass over all
    the contacts would (`select`)."""

    def __init__(
        self,
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
    ) -> None:
        self.id_set = frozenset(ids)
        self.excl = frozenset(exclude_ids)
        self.t_any, self.t_all, self.t_none = frozenset(tags_any), frozenset(tags_all), frozenset(tags_none)
        self.rules = rules
        self.limit = limit
        self.include_coworkers = include_coworkers
        self.now = now
        self.selected = 0  # recipients so far, over every chunk (for `limit`)
        self.seen_ids: set[str] = set()
        known = frozenset(known_tags)
        wanted = self.t_any | self.t_all | self.t_none
        self.unknown_tags = sorted(wanted - known) if known else []
        # The texts that do not depend on the contact, translated once (a plan may hold 100,000 exclusions).
        self._listed = tr("listed in exclude_ids")
        self._not_friend = tr("not a friend of this account (cannot receive messages)")
        self._coworker = tr("coworker, not a customer")
        self._none_of = tr("has none of the tags {tags}", tags=", ".join(sorted(self.t_any))) if self.t_any else ""
        self._reasons: dict[tuple[str, frozenset[str]], str] = {}  # reasons naming tags, once per set of tags

    @property
    def unknown_ids(self) -> list[str]:
        """Listed ids no contact seen so far has (all the contacts seen: every id that is not a contact)."""
        return sorted(self.id_set - self.seen_ids)

    def _naming(self, words: str, tags: frozenset[str]) -> str:
        """`words` (translated) about these tags: made once per set of tags, however many contacts have them."""
        reason = self._reasons.get((words, tags))
        if reason is None:
            reason = self._reasons[(words, tags)] = tr(words, tags=", ".join(sorted(tags)))
        return reason

    def take(self, contacts: Iterable[ContactView]) -> tuple[list[ContactView], list[Exclusion]]:
        """The recipients among the next contacts (in their order) and why each of the others is left out."""
        id_set, excl, rules, now = self.id_set, self.excl, self.rules, self.now
        t_any, t_all, t_none = self.t_any, self.t_all, self.t_none
        include_coworkers, limit = self.include_coworkers, self.limit
        recipients: list[ContactView] = []
        excluded: list[Exclusion] = []
        for c in contacts:
            cid = c["id"]
            if id_set:
                if cid not in id_set:
                    continue  # not a candidate at all: ids narrow the audience, silently
                self.seen_ids.add(cid)
            reason: str | None = None
            code = ReasonCode.RULE
            tags: frozenset[str] = c.get("tags") or frozenset()
            if cid in excl:
                reason, code = self._listed, ReasonCode.EXCLUDE_IDS
            elif not c.get("friend", True):
                reason, code = self._not_friend, ReasonCode.NOT_FRIEND
            elif c.get("coworker") and not include_coworkers:
                reason, code = self._coworker, ReasonCode.COWORKER
            elif t_none and not t_none.isdisjoint(tags):  # (no set made for the contacts it passes)
                reason, code = self._naming(N_("has excluded tag {tags}"), tags & t_none), ReasonCode.TAGS_NONE
            elif t_any and t_any.isdisjoint(tags):
                reason, code = self._none_of, ReasonCode.TAGS_ANY
            elif t_all and not t_all <= tags:
                reason, code = self._naming(N_("lacks tag {tags}"), t_all - tags), ReasonCode.TAGS_ALL
            elif rules is not None:
                reason = rules(c, now)
            if reason is None and limit is not None and self.selected >= limit:
                reason, code = tr("over the audience limit of {limit}", limit=limit), ReasonCode.LIMIT
            if reason is None:
                recipients.append(c)
                self.selected += 1
            else:
                excluded.append(Exclusion(cid, str(c.get("name") or ""), reason, code))
        return recipients, excluded


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
    selector = Selector(
        ids=ids,
        tags_any=tags_any,
        tags_all=tags_all,
        tags_none=tags_none,
        rules=rules,
        exclude_ids=exclude_ids,
        limit=limit,
        include_coworkers=include_coworkers,
        now=now,
        known_tags=known_tags,
    )
    recipients, excluded = selector.take(contacts)
    return Selection(recipients, excluded, unknown_ids=selector.unknown_ids, unknown_tags=selector.unknown_tags)
