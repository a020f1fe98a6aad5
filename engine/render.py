"""Sandboxed Jinja message templates.

* `BoundedEnvironment` (engine.jinja_limits: Jinja's `ImmutableSandboxedEnvironment` within bounds on
  size, steps and CPU time per render) + `StrictUndefined`: a template cannot reach Python internals nor
  run away with time or memory, and a field a recipient lacks is an error (naming the field), never a
  silent blank — unless the template says what to use instead (`{{ city | default("您所在的城市") }}` or
  `{% if city is defined %}`).
* A template is one file: `{% include %}`, `{% import %}` and `{% extends %}` are refused when it is
  checked, and it is at most `MAX_TEMPLATE_CHARS` long. Checking includes a trial render over sample values,
  so a template the sandbox refuses whatever the contact is a validation error at its line.
* Contact values are data: they are passed in as values, never parsed as templates, so a remark that
  reads `{{ 7*7 }}` arrives as exactly that text.
* A field is "missing" for a contact when it is empty; empty fields are left out of the context.

Names a template can use: every contact field (`name`, `alias`, `city`, `phone`, ...), `display_name`
(the remark if set, else the name), `honorific` (先生/女士, when gender is known), `tags` (tag names),
`contact` (the same fields as an object), `campaign` (`id`, `name`), `now` (the run's time, in the
campaign's zone). Filters beyond Jinja's own: `datefmt` (default `%Y年%m月%d日`, in the campaign's zone)
and `days_since`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, NoReturn
from zoneinfo import ZoneInfo

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import new_context

from engine.errors import Location, TemplateError
from engine.gateways.base import ContactRecord
from engine.i18n import tr
from engine.jinja_limits import (
    BoundedEnvironment,
    RenderedTextTooLong,
    TemplateLimitError,
    begin_render,
    bounded_text,
    current_budget,
)

# Names a template can use for a contact: the contact payload (see `ContactRecord`), plus derived names.
CONTACT_FIELDS = (
    *(f.name for f in dataclasses.fields(ContactRecord) if f.name != "tag_ids"),
    "phone",
    "display_name",
    "honorific",
)
GLOBAL_NAMES = ("contact", "tags", "campaign", "now")
KNOWN_NAMES = frozenset(CONTACT_FIELDS) | frozenset(GLOBAL_NAMES)
# A message is at most 10,000 characters; a template several times that is not a message template, and
# compiling one costs time in proportion to its size.
MAX_TEMPLATE_CHARS = 32_768


class MissingField(UndefinedError):
    """A template used a field this recipient does not have."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name!r} is undefined")
        self.field = name


class _Strict(StrictUndefined):
    def _fail_with_undefined_error(self, *args: Any, **kwargs: Any) -> NoReturn:
        if self._undefined_exception is SecurityError:  # the sandbox refused an attribute: not a missing field
            raise SecurityError(self._undefined_hint or "unsafe access")
        raise MissingField(str(self._undefined_name or "?"))

    __str__ = __iter__ = __len__ = __bool__ = __eq__ = __ne__ = __hash__ = _fail_with_undefined_error
    __add__ = __radd__ = __mul__ = __rmul__ = __lt__ = __le__ = __gt__ = __ge__ = _fail_with_undefined_error
    __int__ = __float__ = __contains__ = __getitem__ = _fail_with_undefined_error


def _env(tz: ZoneInfo) -> BoundedEnvironment:
    env = BoundedEnvironment(
        undefined=_Strict, autoescape=False, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False
    )

    def datefmt(value: Any, fmt: str = "%Y年%m月%d日") -> str:
        if isinstance(value, datetime):
            if value.tzinfo is not None:
                value = value.astimezone(tz)
            return str(value.strftime(fmt))
        if isinstance(value, date):
            return value.strftime(fmt)
        raise TypeError(tr("datefmt expects a date, got {kind}", kind=type(value).__name__))

    def days_since(value: Any, now: datetime | None = None) -> int:
        if not isinstance(value, datetime):
            raise TypeError(tr("days_since expects a date and time, got {kind}", kind=type(value).__name__))
        ref = now or datetime.now(value.tzinfo)
        return max(0, (ref - value).days)

    env.filters["datefmt"] = datefmt
    env.filters["days_since"] = days_since
    env.guard_filters()
    return env


_ENVS: dict[str, BoundedEnvironment] = {}


def environment(tz: str) -> BoundedEnvironment:
    env = _ENVS.get(tz)
    if env is None:
        env = _ENVS[tz] = _env(ZoneInfo(tz))
    return env


@dataclass
class CompiledTemplate:
    source: str
    origin: Location
    names: frozenset[str]
    tz: str = "Asia/Shanghai"
    # The environment's globals the template names (`range`, `namespace` ...): only those go into its contexts.
    globals_used: frozenset[str] = frozenset()
    _templates: dict[str, Any] = field(default_factory=dict, repr=False)

    def template(self) -> Any:
        compiled = self._templates.get(self.tz)
        if compiled is None:
            compiled = self._templates[self.tz] = environment(self.tz).from_string(self.source)
        return compiled

    def for_zone(self, tz: str) -> CompiledTemplate:
        return CompiledTemplate(self.source, self.origin, self.names, tz, self.globals_used)

    def render(self, context: Mapping[str, Any], *, prepared: bool = False) -> str:
        """Render for one recipient, within the bounds of engine.jinja_limits. Raises MissingField, or
        TemplateError for other failures (TemplateRefused for a bound).

        `prepared`: the context already holds the template's globals (see `render_all`); Jinja can then
        use it as is instead of copying its globals into a new dict on every call."""
        template = self.template()
        begin_render()
        try:
            if prepared:
                ctx = new_context(template.environment, template.name, template.blocks, dict(context), shared=True)
            else:
                ctx = template.new_context(dict(context))
            return str(template.environment.concat(template.root_render_func(ctx))).strip()
        except MissingField:
            raise
        except Exception as exc:
            raise self.failure(exc) from None

    def failure(self, exc: Exception) -> MissingField | TemplateError:
        """What a render's exception means for the user: a missing field, or a TemplateError at the template
        line where it happened."""
        if isinstance(exc, MissingField):
            return exc
        if isinstance(exc, UndefinedError) and not isinstance(exc, SecurityError):
            return MissingField(_undefined_name(str(exc)))  # an attribute of a present value that does not exist
        where = self._line_of_error(exc)
        if isinstance(exc, TemplateLimitError):
            return TemplateRefused(tr("the template goes over a limit: {why}", why=exc), where)
        if isinstance(exc, SecurityError):
            return TemplateRefused(tr("the template tried something not allowed: {why}", why=exc), where)
        return TemplateError(tr("the template failed: {why}", why=type(exc).__name__ + ": " + str(exc)), where)

    def _line_of_error(self, exc: BaseException) -> Location:
        """The origin, moved to the template line of the innermost template frame in the traceback."""
        compiled = self.template()
        line = None
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "<template>":
                line = compiled.get_corresponding_lineno(tb.tb_lineno)
            tb = tb.tb_next
        return _at(self.origin, line) if line else self.origin


class TemplateRefused(TemplateError):
    """The sandbox refused a template while rendering it: it went over a bound on time, steps or size
    (engine.jinja_limits), or tried something not allowed (a private attribute, a method off the allowlist)."""


def _undefined_name(message: str) -> str:
    m = re.search(r"has no attribute '([^']+)'|'([^']+)' is undefined", message)
    return (m.group(1) or m.group(2)) if m else message


def _line_of(source: str, name: str) -> int:
    for i, line in enumerate(source.splitlines(), 1):
        if re.search(rf"\b{re.escape(name)}\b", line):
            return i
    return 1


def _at(origin: Location, template_line: int) -> Location:
    line = (origin.line or 1) + template_line - 1
    return Location(origin.file, line, origin.field)


_FILE_TAGS: dict[type[nodes.Node], str] = {
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "from ... import",
    nodes.Extends: "extends",
}


def compile_template(source: str, origin: Location, tz: str = "Asia/Shanghai") -> CompiledTemplate:
    """Parse and check a template: size, syntax, the names it uses, and a trial render within the bounds of
    engine.jinja_limits. Raises TemplateError."""
    if not source.strip():
        raise TemplateError(tr("the message template is empty"), origin)
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateError(
            tr(
                "the template is longer than {n} characters (a message is at most 10,000)",
                n=format(MAX_TEMPLATE_CHARS, ","),
            ),
            origin,
        )
    env = environment(tz)
    try:
        ast, names = _checked_tree(env, source, origin)
        used = frozenset(n.name for n in ast.find_all(nodes.Name) if n.name in env.globals)
        compiled = CompiledTemplate(source, origin, frozenset(names), tz, used)
        compiled._templates[tz] = env.from_string(ast)
    except TemplateSyntaxError as exc:
        raise TemplateError(tr("template syntax error: {why}", why=exc.message), _at(origin, exc.lineno)) from None
    except (RecursionError, SyntaxError):
        # Jinja's parser and code generator recurse, and Python compiles at most 20 nested loops.
        raise TemplateError(
            tr("the template nests too deeply (brackets, or loops and blocks inside each other)"), origin
        ) from None
    _trial_render(compiled)
    return compiled


def _checked_tree(env: BoundedEnvironment, source: str, origin: Location) -> tuple[nodes.Template, set[str]]:
    """The parsed template and the names it uses, after checking tags, filters, tests, names and attributes."""
    ast = env.parse(source)
    # No loader is configured, and these are refused outright: a message template never reads another file.
    for reader in ast.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        raise TemplateError(
            tr(
                "{tag} is not allowed: a message template is one file and cannot read others",
                tag="{% " + _FILE_TAGS[type(reader)] + " %}",
            ),
            _at(origin, reader.lineno),
        )
    for modifier in ast.find_all(nodes.EvalContextModifier):
        raise TemplateError(
            tr("{tag} is not supported: messages are plain text", tag="{% autoescape %}"), _at(origin, modifier.lineno)
        )
    for filt in ast.find_all(nodes.Filter):  # before find_undeclared_variables, which fails on them
        if filt.name not in env.filters:
            raise TemplateError(tr("unknown filter {name}", name=repr(filt.name)), _at(origin, filt.lineno))
    for test in ast.find_all(nodes.Test):  # Jinja defers unknown tests in `if` to render time
        if test.name not in env.tests:
            raise TemplateError(tr("unknown test {name}", name=repr(test.name)), _at(origin, test.lineno))
    try:
        names = meta.find_undeclared_variables(ast)
    except TemplateSyntaxError as exc:  # e.g. an unknown test (`is foo`)
        raise TemplateError(tr("template error: {why}", why=exc.message), _at(origin, exc.lineno or 1)) from None
    for name in sorted(names):
        if name not in KNOWN_NAMES:
            raise TemplateError(
                tr(
                    "unknown field {name} in the template; contact fields are: {fields}",
                    name=repr(name),
                    fields=", ".join(CONTACT_FIELDS),
                ),
                _at(origin, _line_of(source, name)),
            )
    for node in ast.find_all(nodes.Getattr):
        if node.attr.startswith("_"):
            raise TemplateError(
                tr("attribute {name} is not allowed in templates", name=repr(node.attr)), _at(origin, node.lineno)
            )
        if isinstance(node.node, nodes.Name) and node.node.name == "contact" and node.attr not in CONTACT_FIELDS:
            raise TemplateError(
                tr("unknown field {name} in the template", name=repr("contact." + node.attr)), _at(origin, node.lineno)
            )
    return ast, names


def _sample_context() -> dict[str, Any]:
    """A value of the right type for every name a template can use, for the trial render."""
    now = datetime(2026, 1, 1, 10, 0, tzinfo=ZoneInfo("UTC"))
    by_annotation: dict[str, Any] = {"int": 1, "bool": True, "tuple[str, ...]": ("示例",), "datetime | None": now}
    fields = {f.name: by_annotation.get(str(f.type), "示例") for f in dataclasses.fields(ContactRecord)}
    fields.update(phone="13800000000", display_name="示例", honorific="先生")
    return {
        **fields,
        "contact": dict(fields),
        "tags": ["示例"],
        "campaign": {"id": "sample", "name": "示例"},
        "now": now,
    }


SAMPLE_CONTEXT = _sample_context()


def _trial_render(compiled: CompiledTemplate) -> None:
    """Render once over sample values, so a template the sandbox refuses whatever the contact (a loop bomb, a
    huge string, a forbidden call) is a validation error at its line, not a surprise while planning. Other
    failures depend on real contact data and are left to preview and planning."""
    try:
        compiled.render(SAMPLE_CONTEXT)
    except TemplateRefused:
        raise
    except (TemplateError, MissingField):
        pass


def contact_context(contact: Mapping[str, Any], names: frozenset[str] | None = None) -> dict[str, Any]:
    """The template fields of one contact: non-empty values only, plus derived names (only `names`,
    when given)."""
    if names is not None and "contact" not in names:
        out = {}
        for name in names:
            if name in GLOBAL_NAMES:
                continue
            value = _derive(contact, name)
            if value is not None and value != "" and value != [] and value != {}:
                out[name] = value
        return out
    ctx = {k: v for k, v in contact.items() if v not in (None, "", [], (), {}) and k not in ("tags", "tags_named")}
    phones = contact.get("phones") or ()
    if phones:
        ctx["phone"] = phones[0]
    gender = contact.get("gender") or 0
    ctx.pop("gender", None)
    if gender:
        ctx["gender"] = gender
        ctx["honorific"] = "先生" if gender == 1 else "女士"
    display = contact.get("alias") or contact.get("name")
    if display:
        ctx["display_name"] = display
    for flag in ("friend", "coworker", "star"):
        ctx[flag] = bool(contact.get(flag))
    return ctx


def _display_name(contact: Mapping[str, Any]) -> Any:
    return contact.get("alias") or contact.get("name")


def _honorific(contact: Mapping[str, Any]) -> Any:
    gender = contact.get("gender") or 0
    return ("先生" if gender == 1 else "女士") if gender else None


def _phone(contact: Mapping[str, Any]) -> Any:
    phones = contact.get("phones") or ()
    return phones[0] if phones else None


def _gender(contact: Mapping[str, Any]) -> Any:
    return contact.get("gender") or None


def _flag(name: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda contact: bool(contact.get(name))


# Template names computed from the contact's columns (every other name is a column, read as it is). One small
# function each: this runs for every recipient and name (the hot loop of rendering 100,000 messages).
_DERIVERS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "display_name": _display_name,
    "honorific": _honorific,
    "phone": _phone,
    "gender": _gender,
    "friend": _flag("friend"),
    "coworker": _flag("coworker"),
    "star": _flag("star"),
}


def _derive(contact: Mapping[str, Any], name: str) -> Any:
    derive = _DERIVERS.get(name)
    return contact.get(name) if derive is None else derive(contact)


@dataclass
class Rendered:
    texts: dict[str, str]  # contact id -> message
    missing: dict[str, list[str]]  # field -> contact ids lacking it
    too_long: list[str]  # contact ids whose message exceeds max_length

    @property
    def failed_ids(self) -> set[str]:
        out = set(self.too_long)
        for ids in self.missing.values():
            out.update(ids)
        return out


def render_all(
    template: CompiledTemplate,
    recipients: Iterable[Mapping[str, Any]],
    *,
    campaign: Mapping[str, Any],
    now: datetime,
    max_length: int = 2000,
) -> Rendered:
    """Render one template for every recipient. Recipients lacking a field are reported per field (all fields they
    lack, not just the first), not rendered."""
    texts: dict[str, str] = {}
    missing: dict[str, list[str]] = {}
    too_long: list[str] = []
    for contact, values, lacking in render_each((template,), recipients, campaign=campaign, now=now):
        cid = str(contact["id"])
        if values is None:
            for name in lacking:
                missing.setdefault(name, []).append(cid)
        elif values[0] is None or len(values[0]) > max_length:
            too_long.append(cid)
        else:
            texts[cid] = values[0]
    return Rendered(texts, missing, too_long)


# (contact, each template's text — None when over the size cap — or None when fields are lacking, the lacking fields)
Outcome = tuple[Mapping[str, Any], list[str | None] | None, Sequence[str]]
NOTHING_LACKING: tuple[str, ...] = ()


def render_each(
    templates: Sequence[CompiledTemplate],
    recipients: Iterable[Mapping[str, Any]],
    *,
    campaign: Mapping[str, Any],
    now: datetime,
) -> Iterator[Outcome]:
    """Render several templates (the templated fields of one message) for each recipient, in the same context:
    yields (contact, the rendered values in template order, ()) — or (contact, None, the fields it lacks, all of
    them, over every template) for a recipient lacking fields. Templates may differ only in their names and
    sources; they share the zone of the first."""
    if not templates:
        for contact in recipients:
            yield contact, [], []
        return
    first = templates[0].template()
    # Only the names the templates use go into their context, and nothing is copied per recipient that the
    # templates do not read: the environment's globals join a context only when a template names one, `campaign`
    # and `now` only when used. 100,000 renders are the bulk of planning a large run.
    used: frozenset[str] = frozenset().union(*(t.names for t in templates))
    base: dict[str, Any] = {g: first.globals[g] for g in frozenset().union(*(t.globals_used for t in templates))}
    if "campaign" in used:
        base["campaign"] = dict(campaign)
    if "now" in used:
        base["now"] = now
    wants_contact = "contact" in used
    wants_tags = "tags" in used
    compiled = [(t, t.template()) for t in templates]
    renderers = [(t, c.environment, c.name, c.blocks, c.root_render_func) for t, c in compiled]
    begin = current_budget().reset  # this thread's budget, looked up once

    def render_one(ctx: dict[str, Any]) -> list[str | None]:
        """CompiledTemplate.render, inlined (100,000 calls), for each template; None for a text that passes the
        size cap (it is then longer than any limit: that recipient's field is too long, like any other)."""
        out: list[str | None] = []
        for template, env, tname, blocks, root in renderers:
            begin()
            try:
                out.append(bounded_text(root(new_context(env, tname, blocks, ctx, shared=True))).strip())
            except MissingField:
                raise
            except RenderedTextTooLong:
                out.append(None)
            except Exception as exc:
                raise template.failure(exc) from None
        return out

    if len(renderers) == 1:  # a plain text message (most campaigns): the same, without the loop
        only, env, tname, blocks, root = renderers[0]

        def render_one(ctx: dict[str, Any]) -> list[str | None]:
            begin()
            try:
                return [bounded_text(root(new_context(env, tname, blocks, ctx, shared=True))).strip()]
            except MissingField:
                raise
            except RenderedTextTooLong:
                return [None]
            except Exception as exc:
                raise only.failure(exc) from None

    fields_used = [n for n in used if n not in GLOBAL_NAMES]
    plain = [n for n in fields_used if n not in _DERIVERS]  # read as they are (most names)
    derived = [(n, _DERIVERS[n]) for n in fields_used if n in _DERIVERS]
    sorted_tags: dict[tuple[str, ...], list[str]] = {}  # a contact's tag names, sorted once per combination
    for contact in recipients:
        if wants_contact:
            fields = contact_context(contact)
        else:
            fields = {}
            get = contact.get
            for n in plain:
                value = get(n)
                # Present: not empty (0 and False are values; None, "", [] and {} are missing).
                if value or (value is not None and value != "" and value != [] and value != {}):
                    fields[n] = value
            for n, derive in derived:
                value = derive(contact)
                if value or (value is not None and value != "" and value != [] and value != {}):
                    fields[n] = value
        ctx = fields if not wants_contact else {**fields, "contact": fields}
        if base:
            ctx.update(base)
        if wants_tags:
            named = contact.get("tags_named") or ()
            if type(named) is not tuple:
                named = tuple(named)
            listed = sorted_tags.get(named)
            if listed is None:
                listed = sorted_tags[named] = sorted(named)
            # One list shared by the contacts with these tags: the sandbox is immutable, no template can change it.
            ctx["tags"] = listed
        try:
            rendered = render_one(ctx)
        except MissingField:  # find every field this contact lacks (below), not just the first
            pass
        else:
            yield contact, rendered, NOTHING_LACKING  # the usual case: one render, nothing missing
            continue
        lacking: list[str] = []
        values: list[str | None] | None = None
        for _ in range(len(CONTACT_FIELDS) + 1):
            try:
                values = render_one(ctx)
                break
            except MissingField as exc:
                if exc.field in lacking:  # a placeholder did not help (an attribute, not a field): stop
                    break
                lacking.append(exc.field)
                # Fill the gap with a placeholder to find any other field this contact lacks.
                ctx = {**ctx, exc.field: "…"}
                if wants_contact:
                    ctx["contact"] = {**ctx["contact"], exc.field: "…"}
        else:  # pragma: no cover - a template cannot reference more names than exist
            lacking.append("?")
        yield contact, (None if lacking else values), lacking


def describe_missing(missing: Mapping[str, Sequence[str]], total: int) -> str:
    """The error for recipients lacking fields (field -> their ids), `total` recipients in all."""
    return describe_missing_counts({name: len(ids) for name, ids in missing.items()}, total)


def describe_missing_counts(missing: Mapping[str, int], total: int) -> str:
    """The error for recipients lacking fields (field -> how many lack it), `total` recipients in all."""
    ranked = sorted(missing.items(), key=lambda kv: -kv[1])
    parts = [
        tr("'{field}' is missing for {n} of {total} recipients", field=name, n=n, total=total) for name, n in ranked
    ]
    # The hint names the field that is missing (the one most recipients lack), never another one.
    example = "{{ " + ranked[0][0] + ' | default("") }}' if ranked else ""
    return tr("; ").join(parts) + tr(" – give a default in the template, e.g. {example}", example=example)
