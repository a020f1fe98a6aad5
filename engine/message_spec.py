"""The message a campaign (or a journey's send step) sends: its YAML spec, checked and compiled once
(`compile_message`), then rendered into one `engine.messages.Message` per recipient (`render_messages`).

    message:
      template: "{{ display_name }}您好……"       # a text-only message (or template_file: templates/x.j2); or
      parts:                                      # the parts, sent in this order:
        - image: images/poster.png                #   a JPG/PNG under campaigns/ (≤ 10 MB), or an https URL
        - text: "{{ display_name }}您好……"        #   at most one text: a template, or {template_file: x.j2}
        - link:                                   #   a link card; every field is a template
            url: "https://mall.example.com/1111?c={{ id }}"   # https, ≤ 2048 bytes
            title: 双十一主会场                    #   ≤ 128 bytes (WeCom's limit; a Chinese character is 3)
            description: 满300减50                 #   optional, ≤ 512 bytes
            thumbnail: https://mall.example.com/t.jpg        # optional, https
        - miniprogram:                            #   a mini-program card
            appid: wx1234567890abcdef
            title: 领取会员券                      #   ≤ 64 bytes; a template
            page: "pages/coupon/index?c={{ id }}"  #   the page path and query; a template
            thumbnail: images/cover.png           #   the cover (WeCom requires one): a JPG/PNG file or https URL
            username: gh_0123456789ab             #   optional: the original id the WorkPro puppet carries
        - file: files/价目表.pdf                   #   any file ≤ 20 MB, or an https URL
      max_length: 2000                            # the text's limit, in characters
      on_missing_field: error                     # or skip: recipients lacking a field are left out

At most one text and nine attachments, as WeCom's 群发 allows. What is checked, each problem at its file, line and
field (`message.parts[2].link.title`):

* when the file is loaded: the shape above; files confined to the campaigns directory (`engine.paths`), present,
  within WeCom's size limits, images JPG or PNG by their content (`engine.media`); URLs https; an appid; fields
  without template syntax checked as they are (empty, too long, not https); every template compiled and given a
  trial render in the sandbox (`engine.render`); and the parts the configured gateway can send
  (`Capabilities.supports`): a part it cannot send is a validation error for that gateway, not a failed send.
* for each recipient, when the audience is rendered (preview, planning): templated fields that render empty, a
  title over its byte limit or a URL that is no longer https — reported per field with how many recipients,
  and they stop the run as a field a recipient lacks does.

A campaign's message and a journey step's are the same `MessageSpec` checked by the same `compile_message`, and
rendered by the same `render_messages` (one recipient: `render_message`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from engine import yamlsrc
from engine.errors import CampaignError, Location, TemplateError, WecastError
from engine.i18n import ntr, tr
from engine.media import MediaError, MediaStore, check_type, describe, max_bytes
from engine.messages import (
    LINK_DESC_MAX,
    LINK_TITLE_MAX,
    MAX_ATTACHMENTS,
    MINIPROGRAM_TITLE_MAX,
    FilePart,
    ImagePart,
    LinkPart,
    Media,
    Message,
    MiniProgramPart,
    Part,
    PartKind,
    TextPart,
)
from engine.paths import MAX_TEMPLATE_BYTES, CampaignFileError, campaign_root, resolve_campaign_file
from engine.render import CompiledTemplate, MissingField, compile_template, render_each
from engine.settings import Settings, Strict

URL_MAX = 2048  # WeCom: link.url and link.picurl ≤ 2048 bytes
_TEMPLATE_SYNTAX = re.compile(r"\{[{%#]")


# -- the YAML ---------------------------------------------------------------------------------------------


class TextSpec(Strict):
    """`- text: {template_file: templates/x.j2}` (or `{template: ...}`; a bare string is the template)."""

    template: str | None = None
    template_file: str | None = None

    @model_validator(mode="after")
    def _one(self) -> TextSpec:
        if (self.template is None) == (self.template_file is None):
            raise ValueError(tr("give exactly one of template (inline) or template_file (a path)"))
        return self


class LinkSpec(Strict):
    url: str
    title: str
    description: str = ""
    thumbnail: str = ""


class MiniProgramSpec(Strict):
    appid: str
    title: str
    page: str
    thumbnail: str
    username: str = ""


class PartSpec(Strict):
    """One part: a mapping with exactly one of its keys."""

    text: str | TextSpec | None = None
    image: str | None = None
    link: LinkSpec | None = None
    miniprogram: MiniProgramSpec | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one(self) -> PartSpec:
        given = [k.value for k in PartKind if getattr(self, k.value) is not None]
        if len(given) != 1:
            raise ValueError(tr("a part is one of text:, image:, link:, miniprogram: or file:") + _found(given))
        return self

    @property
    def kind(self) -> PartKind:
        return next(k for k in PartKind if getattr(self, k.value) is not None)


def _found(given: list[str]) -> str:
    return tr(" (found {keys})", keys=", ".join(given)) if given else ""


class MessageSpec(Strict):
    """What is sent (see the module docstring): a text template, or a list of parts."""

    template: str | None = None
    template_file: str | None = None
    parts: list[PartSpec] | None = Field(default=None, min_length=1)
    max_length: int = Field(default=2000, ge=1, le=10000)
    on_missing_field: Literal["error", "skip"] = "error"
    type: str | None = None  # 0.1's `type: text`; a message's kinds now come from its parts

    @field_validator("type")
    @classmethod
    def _type(cls, value: str | None) -> str | None:
        if value not in (None, "text"):
            raise ValueError(
                tr(
                    "message type {value!r}: `type` is not used any more; list the message's parts under parts: "
                    "(text, image, link, miniprogram, file)",
                    value=value,
                )
            )
        return value

    @model_validator(mode="after")
    def _shape(self) -> MessageSpec:
        given = [k for k in ("template", "template_file", "parts") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                tr("give exactly one of template (inline), template_file (a path) or parts (a list)") + _found(given)
            )
        return self


# -- compiled -----------------------------------------------------------------------------------------------


class Check(StrEnum):
    """What a rendered field may fail, for one recipient."""

    EMPTY = "renders empty"
    TOO_LONG = "is too long"
    NOT_HTTPS = "is not an https URL"


@dataclass(frozen=True)
class TemplatedField:
    """A field of the message that is a template (a text, a link's title, a mini-program's page ...), with what
    its rendered value must satisfy."""

    path: str  # dotted, as in the file: message.parts[2].link.title
    template: CompiledTemplate
    required: bool = True  # it may not render empty
    max_bytes: int | None = None  # UTF-8 bytes (WeCom's limits are in bytes)
    max_chars: int | None = None  # characters (the text's max_length)
    https: bool = False

    def check(self, value: str | None) -> Check | None:
        """What is wrong with this rendered value (None: nothing; a value of None passed the renderer's size cap)."""
        if value is None:
            return Check.TOO_LONG
        if not value:
            return Check.EMPTY if self.required else None
        if self.max_chars is not None and len(value) > self.max_chars:
            return Check.TOO_LONG
        if self.max_bytes is not None and len(value.encode()) > self.max_bytes:
            return Check.TOO_LONG
        if self.https and not _is_https(value):
            return Check.NOT_HTTPS
        return None

    def limit(self) -> str:
        """The field's limit in words of the reader's language ("2000 characters", "128 bytes")."""
        if self.max_chars is not None:
            return ntr("{n} character", "{n} characters", self.max_chars)
        return ntr("{n} byte", "{n} bytes", self.max_bytes or 0)


@dataclass(frozen=True)
class Slot:
    """A string field of a part: a constant, or the index of a templated field's rendered value."""

    value: str = ""
    index: int | None = None

    def get(self, values: Sequence[str]) -> str:
        return self.value if self.index is None else values[self.index]


@dataclass(frozen=True)
class PartTemplate:
    """How one part is built from the rendered values: a fixed part (an image, a file), or slots."""

    kind: PartKind
    fixed: Part | None = None
    slots: tuple[Slot, ...] = ()
    media: Media | None = None  # a mini-program's cover
    constants: tuple[str, ...] = ()  # a mini-program's appid and username

    def build(self, values: Sequence[str]) -> Part:
        if self.fixed is not None:
            return self.fixed
        got = [s.get(values) for s in self.slots]
        if self.kind is PartKind.TEXT:
            return TextPart(got[0])
        if self.kind is PartKind.LINK:
            return LinkPart(url=got[0], title=got[1], description=got[2], thumb_url=got[3])
        appid, username = self.constants
        return MiniProgramPart(appid=appid, title=got[0], page=got[1], thumb=self.media, username=username)


@dataclass(frozen=True)
class CompiledMessage:
    """A checked message spec: its parts, and the templated fields they are built from."""

    parts: tuple[PartTemplate, ...]
    fields: tuple[TemplatedField, ...]
    origin: Location  # where the message (its text, when it has one) is written
    source: str  # the templates and media hashes it is made of: part of the campaign's content hash

    @property
    def names(self) -> frozenset[str]:
        """Every name the message's templates use."""
        return frozenset().union(*(f.template.names for f in self.fields))

    @property
    def kinds(self) -> frozenset[PartKind]:
        return frozenset(p.kind for p in self.parts)

    @property
    def plain_text(self) -> bool:
        """One text part and nothing else: the ledger stores such a message as its text alone."""
        return len(self.parts) == 1 and self.parts[0].kind is PartKind.TEXT

    @property
    def text(self) -> TemplatedField | None:
        """The text's field (None when the message has no text)."""
        for part in self.parts:
            if part.kind is PartKind.TEXT and part.slots[0].index is not None:
                return self.fields[part.slots[0].index]
        return None

    def for_zone(self, tz: str) -> CompiledMessage:
        """The same message with its templates in the zone `tz` (dates and `now`)."""
        fields = tuple(replace(f, template=f.template.for_zone(tz)) for f in self.fields)
        return replace(self, fields=fields)

    def build(self, values: Sequence[str]) -> Message:
        return Message(tuple(p.build(values) for p in self.parts))

    def media(self) -> list[Media]:
        """Every file or URL the message carries (images, files, covers)."""
        out: list[Media] = []
        for p in self.parts:
            if isinstance(p.fixed, ImagePart | FilePart):
                out.append(p.fixed.media)
            if p.media is not None:
                out.append(p.media)
        return out


# -- compiling --------------------------------------------------------------------------------------------


def compile_message(
    message: MessageSpec,
    path: tuple[str | int, ...],
    text: str,
    file: Path,
    lines: yamlsrc.Lines,
    settings: Settings,
) -> tuple[CompiledMessage | None, list[CampaignError]]:
    """Check and compile the message spec found at `path` (`("message",)`, or a journey step's) in the campaign or
    journey `file` whose YAML `text` and `lines` are given: (the compiled message, or None when there are problems;
    every problem found). Campaigns and journey `send` steps share it, so a step's message is checked exactly as
    a campaign's."""
    c = _Compiler(message, path, text, file, lines, settings)
    if message.parts is None:
        c.text_part(path, TextSpec(template=message.template, template_file=message.template_file), bare=False)
    else:
        c.all_parts(message.parts)
    if c.problems:
        return None, c.problems
    first_text = next((f for f in c.fields if f.max_chars is not None), None)
    origin = first_text.template.origin if first_text else lines.at(path)
    return CompiledMessage(tuple(c.parts), tuple(c.fields), origin, "\n".join(c.source)), []


class _Compiler:
    """The state of compiling one message spec."""

    def __init__(
        self,
        spec: MessageSpec,
        path: tuple[str | int, ...],
        text: str,
        file: Path,
        lines: yamlsrc.Lines,
        settings: Settings,
    ) -> None:
        self.spec, self.path, self.text, self.file, self.lines, self.settings = spec, path, text, file, lines, settings
        self.parts: list[PartTemplate] = []
        self.fields: list[TemplatedField] = []
        self.problems: list[CampaignError] = []
        self.source: list[str] = []
        self.root = campaign_root(settings.campaigns_dir, file)
        self.local_covers = True  # all_parts asks the configured gateway

    def error(self, where: tuple[str | int, ...], reason: str) -> None:
        self.problems.append(CampaignError(reason, self.lines.at(where)))

    def all_parts(self, parts: list[PartSpec]) -> None:
        from engine.gateways.registry import gateway_capabilities

        capabilities = gateway_capabilities(self.settings)
        supports = capabilities.supports
        self.local_covers = capabilities.local_covers
        texts = 0
        attachments = 0
        for i, part in enumerate(parts):
            here = (*self.path, "parts", i)
            kind = part.kind
            if kind is PartKind.TEXT:
                texts += 1
                if texts > 1:
                    self.error((*here, "text"), tr("a message has at most one text part (WeCom's 群发 allows one)"))
                    continue
            else:
                attachments += 1
                if attachments > MAX_ATTACHMENTS:
                    self.error(
                        here, tr("a message has at most {n} attachments besides its text (WeCom)", n=MAX_ATTACHMENTS)
                    )
                    continue
            if kind not in supports:
                self.error((*here, kind.value), _cannot_send(self.settings.gateway, kind, supports))
                continue
            if part.text is not None:
                bare = isinstance(part.text, str)
                spec = TextSpec(template=part.text) if isinstance(part.text, str) else part.text
                self.text_part((*here, "text"), spec, bare=bare)
            elif part.image is not None:
                self.media_part((*here, "image"), part.image, PartKind.IMAGE)
            elif part.file is not None:
                self.media_part((*here, "file"), part.file, PartKind.FILE)
            elif part.link is not None:
                self.link_part((*here, "link"), part.link)
            elif part.miniprogram is not None:
                self.miniprogram_part((*here, "miniprogram"), part.miniprogram)

    # -- text --------------------------------------------------------------------------------------------
    def text_part(self, here: tuple[str | int, ...], spec: TextSpec, *, bare: bool) -> None:
        """The text: `message.template` / `template_file` (the message is that text), or a text part — `bare` when
        written as `- text: "..."`, its template standing at `here` itself."""
        template_text: str
        origin: Location
        if spec.template_file is not None:
            origin = Location(str(self.file.parent / spec.template_file), 1, None)
            try:
                template_text = self._read_template_file(spec.template_file)
            except CampaignFileError as exc:
                self.error((*here, "template_file"), str(exc))
                return  # a refused file is reported once, not again as an empty template
        else:
            template_text = spec.template or ""
            key = here if bare else (*here, "template")
            key_line = self.lines.line(key) or 1
            # A block scalar (|) starts on the line after its key; an inline one on the key's line.
            first = key_line + 1 if text_has_block(self.text, key_line) else key_line
            origin = Location(str(self.file), first, yamlsrc.dotted(key))
        try:
            compiled = compile_template(template_text, origin)
        except TemplateError as exc:
            self.problems.append(exc)
            return
        self.source.append(template_text)
        index = self._field(yamlsrc.dotted(here), compiled, max_chars=self.spec.max_length)
        self.parts.append(PartTemplate(PartKind.TEXT, slots=(Slot(index=index),)))

    def _read_template_file(self, name: str) -> str:
        checked = resolve_campaign_file(
            self.root, self.file.parent, name, kind="template", max_bytes=MAX_TEMPLATE_BYTES
        )
        return checked.read_text()

    def _field(self, path: str, template: CompiledTemplate, **checks: Any) -> int:
        self.fields.append(TemplatedField(path, template, **checks))
        return len(self.fields) - 1

    # -- images and files --------------------------------------------------------------------------------
    def media_part(self, here: tuple[str | int, ...], value: str, kind: PartKind) -> None:
        media = self.media(here, value, kind)
        if media is not None:
            self.parts.append(PartTemplate(kind, fixed=ImagePart(media) if kind is PartKind.IMAGE else FilePart(media)))

    def media(self, here: tuple[str | int, ...], value: str, kind: PartKind) -> Media | None:
        """The Media a part names: an https URL, or a file under the campaigns directory (checked and hashed)."""
        value = value.strip()
        if "://" in value or value.lower().startswith(("http:", "https:")):
            if not _is_https(value):
                self.error(
                    here,
                    tr(
                        "{url} is not an https URL; give https://… or a file under the campaigns folder",
                        url=repr(value),
                    ),
                )
                return None
            if len(value.encode()) > URL_MAX:
                self.error(here, tr("the URL is longer than {n} bytes (WeCom's limit)", n=URL_MAX))
                return None
            self.source.append(value)
            name = urlsplit(value).path.rsplit("/", 1)[-1] or kind.value
            return Media(name=name, url=value)
        what = "image" if kind is not PartKind.FILE else "file"
        try:
            checked = resolve_campaign_file(self.root, self.file.parent, value, kind=what, max_bytes=max_bytes(kind))
            media = describe(checked, kind)
        except (CampaignFileError, MediaError) as exc:
            self.error(here, str(exc))
            return None
        self.source.append(f"{value}:{media.sha256}")
        return media

    # -- cards -------------------------------------------------------------------------------------------
    def link_part(self, here: tuple[str | int, ...], link: LinkSpec) -> None:
        slots = (
            self.slot((*here, "url"), link.url, required=True, max_bytes=URL_MAX, https=True),
            self.slot((*here, "title"), link.title, required=True, max_bytes=LINK_TITLE_MAX),
            self.slot((*here, "description"), link.description, required=False, max_bytes=LINK_DESC_MAX),
            self.slot((*here, "thumbnail"), link.thumbnail, required=False, max_bytes=URL_MAX, https=True),
        )
        if all(s is not None for s in slots):
            self.parts.append(PartTemplate(PartKind.LINK, slots=tuple(s for s in slots if s is not None)))

    def miniprogram_part(self, here: tuple[str | int, ...], mini: MiniProgramSpec) -> None:
        appid = mini.appid.strip()
        ok = True
        if not appid:
            self.error((*here, "appid"), tr("the appid is empty; give the mini-program's AppID (wx…)"))
            ok = False
        elif _TEMPLATE_SYNTAX.search(appid) or not re.fullmatch(r"[A-Za-z0-9_]{1,64}", appid):
            self.error(
                (*here, "appid"),
                tr("{appid} is not an AppID (letters and digits, like wx1234567890abcdef)", appid=repr(appid)),
            )
            ok = False
        title = self.slot((*here, "title"), mini.title, required=True, max_bytes=MINIPROGRAM_TITLE_MAX)
        page = self.slot((*here, "page"), mini.page, required=True, max_bytes=URL_MAX)
        thumb = self.media((*here, "thumbnail"), mini.thumbnail, PartKind.IMAGE)
        if thumb is not None and thumb.url is None and not self.local_covers:
            self.error((*here, "thumbnail"), _no_local_cover(self.settings.gateway, thumb.name))
            thumb = None
        if ok and title is not None and page is not None and thumb is not None:
            self.source.append(f"{appid}|{mini.username}")
            self.parts.append(
                PartTemplate(
                    PartKind.MINIPROGRAM, slots=(title, page), media=thumb, constants=(appid, mini.username.strip())
                )
            )

    def slot(self, here: tuple[str | int, ...], value: str, **checks: Any) -> Slot | None:
        """A string field of a card: a constant checked now, or a template checked per recipient."""
        dotted = yamlsrc.dotted(here)
        if not _TEMPLATE_SYNTAX.search(value):
            constant = value.strip()
            problem = TemplatedField(dotted, _CONSTANT, **checks).check(constant)
            if problem is not None:
                self.error(here, _describe_check(problem, TemplatedField(dotted, _CONSTANT, **checks), constant))
                return None
            self.source.append(constant)
            return Slot(value=constant)
        if checks.get("https") and not value.lstrip().lower().startswith("https://"):
            self.error(here, tr("a URL must start with https:// (the template may fill in what follows)"))
            return None
        line = self.lines.line(here) or 1
        origin = Location(str(self.file), line + 1 if text_has_block(self.text, line) else line, dotted)
        try:
            compiled = compile_template(value, origin)
        except TemplateError as exc:
            self.problems.append(exc)
            return None
        self.source.append(value)
        return Slot(index=self._field(dotted, compiled, **checks))


# A stand-in template for checking constants with TemplatedField.check (never rendered).
_CONSTANT = CompiledTemplate("", Location(), frozenset())


def _is_https(value: str) -> bool:
    parts = urlsplit(value.strip())
    return parts.scheme == "https" and bool(parts.netloc) and not any(ch.isspace() for ch in value.strip())


def _describe_check(problem: Check, f: TemplatedField, value: str = "") -> str:
    what = f.path.rsplit(".", 1)[-1]
    if problem is Check.EMPTY:
        return tr("the {what} is empty", what=what)
    if problem is Check.TOO_LONG:
        size = len(value) if f.max_chars is not None else len(value.encode())
        return tr("the {what} is longer than {limit} ({size}; WeCom's limit)", what=what, limit=f.limit(), size=size)
    return tr("{url} is not an https URL", url=repr(value))


def text_has_block(text: str, key_line: int) -> bool:
    """Whether the YAML line `key_line` ends in a block-scalar indicator (| or >)."""
    lines = text.splitlines()
    if not 0 < key_line <= len(lines):
        return False
    return bool(re.search(r":\s*[|>][+-]?\d*\s*(#.*)?$", lines[key_line - 1]))


# -- rendering ---------------------------------------------------------------------------------------------


@dataclass
class RenderedMessages:
    """The message of every recipient, and who could not get one and why."""

    texts: dict[str, str]  # contact id -> the text part ('' when the message has none)
    messages: dict[str, Message]  # contact id -> the message, when it is more than a text (a plain text is its text)
    missing: dict[str, list[str]]  # field -> contact ids lacking it
    too_long: list[str]  # contact ids whose text is over max_length
    failed: dict[tuple[int, Check], list[str]] = field(default_factory=dict)  # (field index, check) -> contact ids

    def message(self, contact_id: str) -> Message:
        found = self.messages.get(contact_id)
        return found if found is not None else Message.of_text(self.texts[contact_id])


def render_messages(
    compiled: CompiledMessage,
    recipients: Iterable[Mapping[str, Any]],
    *,
    campaign: Mapping[str, Any],
    now: datetime,
) -> RenderedMessages:
    """Render the message for every recipient (every templated field in the same context and sandbox). Recipients
    lacking a field, or with a field that fails its check, get no message and are reported."""
    fields = compiled.fields
    plain = compiled.plain_text
    text_slot = next((p.slots[0].index for p in compiled.parts if p.kind is PartKind.TEXT), None)
    texts: dict[str, str] = {}
    messages: dict[str, Message] = {}
    missing: dict[str, list[str]] = {}
    too_long: list[str] = []
    failed: dict[tuple[int, Check], list[str]] = {}
    templates = [f.template for f in fields]
    outcomes = render_each(templates, recipients, campaign=campaign, now=now)
    if plain:  # one text field (most messages): the same as below, without the per-field loop
        only = fields[0]
        check = only.check
        for contact, values, lacking in outcomes:
            cid = str(contact["id"])
            if values is None:
                for name in lacking:
                    missing.setdefault(name, []).append(cid)
                continue
            value = values[0]
            problem = check(value)
            if problem is None:
                texts[cid] = value or ""  # (None never passes its check)
            elif problem is Check.TOO_LONG and only.max_chars is not None:
                too_long.append(cid)
            else:
                failed.setdefault((0, problem), []).append(cid)
        return RenderedMessages(texts, messages, missing, too_long, failed)
    for contact, values, lacking in outcomes:
        cid = str(contact["id"])
        if values is None:
            for name in lacking:
                missing.setdefault(name, []).append(cid)
            continue
        ok = True
        for i, f in enumerate(fields):
            problem = f.check(values[i])
            if problem is None:
                continue
            ok = False
            if problem is Check.TOO_LONG and f.max_chars is not None:
                too_long.append(cid)
            else:
                failed.setdefault((i, problem), []).append(cid)
        if not ok:
            continue
        got = [v or "" for v in values]  # every value passed its checks: none is over the size cap
        texts[cid] = got[text_slot] if text_slot is not None else ""
        messages[cid] = compiled.build(got)
    return RenderedMessages(texts, messages, missing, too_long, failed)


def render_message(
    compiled: CompiledMessage, contact: Mapping[str, Any], *, campaign: Mapping[str, Any], now: datetime
) -> Message:
    """The message of one recipient. Raises MissingField for a field the contact lacks, TemplateError for a field
    that fails its check (or a template the sandbox refuses)."""
    rendered = render_messages(compiled, [contact], campaign=campaign, now=now)
    if rendered.missing:
        raise MissingField(next(iter(rendered.missing)))
    problems = describe_problems(compiled, rendered.too_long, rendered.failed, total=1)
    if problems:
        raise problems[0]
    return rendered.message(str(contact["id"]))


def describe_problems(
    compiled: CompiledMessage,
    too_long: Sequence[str],
    failed: Mapping[tuple[int, Check], Sequence[str]],
    *,
    total: int,
) -> list[TemplateError]:
    """The per-recipient checks that failed (`RenderedMessages.too_long` and `.failed`), one error per field and
    check, at the field's file and line; `total`: how many recipients were rendered."""
    return describe_problem_counts(compiled, len(too_long), {k: len(ids) for k, ids in failed.items()}, total=total)


def describe_problem_counts(
    compiled: CompiledMessage, too_long: int, failed: Mapping[tuple[int, Check], int], *, total: int
) -> list[TemplateError]:
    """`describe_problems` from counts: how many recipients' texts are too long, and how many failed each check."""
    out: list[TemplateError] = []
    text = compiled.text
    if too_long and text is not None:
        out.append(
            TemplateError(
                ntr(
                    "the message is longer than message.max_length ({max}) for {n} recipient",
                    "the message is longer than message.max_length ({max}) for {n} recipients",
                    too_long,
                    max=text.max_chars,
                ),
                text.template.origin,
            )
        )
    for (index, problem), n in failed.items():
        f = compiled.fields[index]
        what = f.path.rsplit(".", 1)[-1]
        if problem is Check.EMPTY:
            reason = tr("the {what} renders empty for {n} of {total} recipients", what=what, n=n, total=total)
        elif problem is Check.TOO_LONG:
            reason = tr(
                "the {what} is longer than {limit} (WeCom's limit) for {n} of {total} recipients",
                what=what,
                limit=f.limit(),
                n=n,
                total=total,
            )
        else:
            reason = tr("the {what} is not an https URL for {n} of {total} recipients", what=what, n=n, total=total)
        out.append(TemplateError(reason, f.template.origin))
    return out


# -- messages given whole (the HTTP API, `wecast send`) ------------------------------------------------------


class ImageAttachment(Strict):
    """An image: a file uploaded with POST /api/v1/media (`media_id`), or an https `url`."""

    kind: Literal["image"]
    media_id: str | None = None
    url: str | None = None


class FileAttachment(Strict):
    """A file: uploaded with POST /api/v1/media?kind=file (`media_id`), or an https `url`."""

    kind: Literal["file"]
    media_id: str | None = None
    url: str | None = None


class LinkAttachment(Strict):
    """A link card (title ≤ 128 bytes, description ≤ 512 bytes, https url and thumbnail)."""

    kind: Literal["link"]
    url: str
    title: str
    description: str = ""
    thumbnail: str = ""


class MiniProgramAttachment(Strict):
    """A mini-program card: appid, title (≤ 64 bytes), page, and a cover (`thumbnail_media_id` or `thumbnail_url`)."""

    kind: Literal["miniprogram"]
    appid: str
    title: str
    page: str
    thumbnail_media_id: str | None = None
    thumbnail_url: str | None = None
    username: str = ""


Attachment = Annotated[
    ImageAttachment | FileAttachment | LinkAttachment | MiniProgramAttachment, Field(discriminator="kind")
]


class PartError(WecastError):
    """A message given whole (not from a campaign file) has a part that cannot be sent; `field` names it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def direct_message(
    text: str | None,
    attachments: Sequence[Attachment],
    *,
    store: MediaStore,
    supports: frozenset[PartKind],
    gateway: str,
    local_covers: bool = True,
) -> Message:
    """A message given whole — its text, then its attachments — checked as a campaign's message is: at most nine
    attachments, media that exist in `store` and are of the right kind, https URLs, WeCom's lengths, and only
    parts the gateway can send. Raises PartError naming the field (`attachments[2].title`)."""
    parts: list[Part] = []
    if text is not None and text.strip():
        parts.append(TextPart(text))
    if len(attachments) > MAX_ATTACHMENTS:
        raise PartError("attachments", tr("at most {n} attachments (WeCom's 群发 limit)", n=MAX_ATTACHMENTS))
    for i, a in enumerate(attachments):
        here = f"attachments[{i}]"
        kind = PartKind(a.kind)
        if kind not in supports:
            raise PartError(here, _cannot_send(gateway, kind, supports))
        if isinstance(a, ImageAttachment | FileAttachment):
            media = _given_media(here, a.media_id, a.url, kind, store)
            parts.append(ImagePart(media) if kind is PartKind.IMAGE else FilePart(media))
        elif isinstance(a, LinkAttachment):
            parts.append(
                LinkPart(
                    url=_given(f"{here}.url", a.url, required=True, max_bytes=URL_MAX, https=True),
                    title=_given(f"{here}.title", a.title, required=True, max_bytes=LINK_TITLE_MAX),
                    description=_given(f"{here}.description", a.description, required=False, max_bytes=LINK_DESC_MAX),
                    thumb_url=_given(f"{here}.thumbnail", a.thumbnail, required=False, max_bytes=URL_MAX, https=True),
                )
            )
        else:
            appid = a.appid.strip()
            if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", appid):
                raise PartError(f"{here}.appid", tr("give the mini-program's AppID (letters and digits, like wx12…)"))
            thumb = _given_media(f"{here}.thumbnail", a.thumbnail_media_id, a.thumbnail_url, PartKind.IMAGE, store)
            if thumb.url is None and not local_covers:
                raise PartError(f"{here}.thumbnail", _no_local_cover(gateway, thumb.name))
            parts.append(
                MiniProgramPart(
                    appid=appid,
                    title=_given(f"{here}.title", a.title, required=True, max_bytes=MINIPROGRAM_TITLE_MAX),
                    page=_given(f"{here}.page", a.page, required=True, max_bytes=URL_MAX),
                    thumb=thumb,
                    username=a.username.strip(),
                )
            )
    if not parts:
        raise PartError("message", tr("give the text to send (message), attachments, or both"))
    return Message(tuple(parts))


def _cannot_send(gateway: str, kind: PartKind, supports: frozenset[PartKind]) -> str:
    can = ", ".join(sorted(k.value for k in supports))
    return tr(
        "the {gateway} gateway cannot send {kind} parts (it sends: {can})", gateway=gateway, kind=kind.value, can=can
    )


def _no_local_cover(gateway: str, name: str) -> str:
    return tr(
        "the {gateway} gateway takes a mini-program cover by https URL only, and {name} is a local file: "
        "give the cover as an https URL",
        gateway=gateway,
        name=repr(name),
    )


def _given(path: str, value: str, **checks: Any) -> str:
    value = value.strip()
    f = TemplatedField(path, _CONSTANT, **checks)
    problem = f.check(value)
    if problem is not None:
        raise PartError(path, _describe_check(problem, f, value))
    return value


def _given_media(path: str, media_id: str | None, url: str | None, kind: PartKind, store: MediaStore) -> Media:
    if (media_id is None) == (url is None):
        raise PartError(path, tr("give media_id (from POST /api/v1/media) or url, one of them"))
    if url is not None:
        url = _given(path, url, required=True, max_bytes=URL_MAX, https=True)
        return Media(name=urlsplit(url).path.rsplit("/", 1)[-1] or kind.value, url=url)
    assert media_id is not None
    try:
        media = store.get(media_id)
        check_type(kind, media.mime, media.name)
    except MediaError as exc:
        raise PartError(path, str(exc)) from None
    return media
