"""YAML with line numbers, so every error can say `file:line: field: why` — and the one guarded loader for
everything wecast parses as YAML: campaign files, config.yaml and campaign text posted to the API.

`read_text(path)` reads a YAML file; `load(text, file)` returns the data plus a `Lines` map from field paths
(tuples of keys and indexes) to the 1-based line where that field's value (or key) stands. `located(errors,
...)` turns pydantic validation errors into messages that name the file, line and dotted field path.

What the loader refuses, each with a `YamlError` naming the line, quickly and within bounded memory:

* files that are not regular files (a FIFO, a device: never opened), over `MAX_BYTES`, not UTF-8, or binary
  (NUL bytes); text over `MAX_BYTES` posted to the API;
* control characters (C0 except tab and newlines, DEL, C1), written raw or as escapes ("\\x1b");
* nesting deeper than `MAX_DEPTH` (`[[[[...]]]]`, `- - - - x`), which would exhaust Python's recursion;
* a document that expands to more than `MAX_VALUES` values or `MAX_CHARS` characters through aliases or merge
  keys — the "billion laughs": a few hundred bytes whose anchors repeat each other into billions of values —
  weighed on the node graph before anything is built;
* integers outside 64 bits (a number with thousands of digits), floats that are not finite (`.inf`,
  `1e999`), dates that do not exist (`2026-02-30`, year 0) or lie outside the years 1900 to 9998 (where time
  zone arithmetic overflows), mapping keys that are not plain values,
  duplicate keys, and tags beyond YAML's plain types (`!!binary`, `!!set`, `!!python/...`).

Parsing is pure Python and CPU-bound: callers on an event loop run it in a thread.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from engine.durations import check_date_range
from engine.errors import Location
from engine.i18n import tr
from engine.validation_words import pydantic_words

Path_ = tuple[str | int, ...]

MAX_BYTES = 128 * 1024  # a campaign or config file is a few KB; a 32K-character template inside one fits
MAX_DEPTH = 50  # nested collections (rules nest a few levels)
# The document once every alias and merge key is expanded: values, and characters in its scalars (pydantic
# copies every string it reads). A MAX_BYTES file without aliases holds at most ~65,500 values (`a,` is one
# value in two bytes) and 128K characters; only expansion goes past these.
MAX_VALUES = 80_000
MAX_CHARS = 500_000
_INT64 = 2**63
_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(f"{_TAG}{name}" for name in ("str", "int", "float", "bool", "null", "timestamp"))
# C0 controls but tab, LF and CR; DEL; C1 controls. (PyYAML's reader refuses some raw, escapes make any.)
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # but tab, line feed, carriage return


@dataclass
class Lines:
    """Field path -> line number (1-based). Falls back to the nearest known parent."""

    file: str
    by_path: dict[Path_, int] = field(default_factory=dict)

    def line(self, path: Sequence[str | int]) -> int | None:
        p = tuple(path)
        while True:
            if p in self.by_path:
                return self.by_path[p]
            if not p:
                return None
            p = p[:-1]

    def at(self, path: Sequence[str | int]) -> Location:
        return Location(file=self.file, line=self.line(path), field=dotted(path) or None)


def dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _too_deep_words() -> str:
    return tr("nesting deeper than {n} levels", n=MAX_DEPTH)


def _tag_words(tag: str) -> str:
    return tr("the YAML tag {tag} is not supported here", tag=tag.replace(_TAG, "!!"))


class YamlError(ValueError):
    """A YAML source wecast cannot use; `line` is where (None: the file as a whole)."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


def read_text(path: Path) -> str:
    """The text of a YAML file: a regular file of at most MAX_BYTES of UTF-8 text. Raises FileNotFoundError
    (for the caller to word), or YamlError."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise YamlError(tr("cannot read the file: {why}", why=exc.strerror), None) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise YamlError(tr("this is a folder, not a YAML file"), None)
        if not stat.S_ISREG(info.st_mode):
            raise YamlError(tr("not a regular file (a FIFO, socket or device)"), None)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise YamlError(tr("the file is larger than {size} KiB", size=MAX_BYTES // 1024), None)
    if b"\x00" in data:
        raise YamlError(tr("the file is binary (it contains NUL bytes), not YAML text"), None)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlError(tr("the file is not UTF-8 text"), data.count(b"\n", 0, exc.start) + 1) from None


class _MergeGuard:
    """Merge keys (<<) expanded as YAML says — the mapping's own keys win, then the merged mappings in order —
    with every pair copied counted, and nesting bounded."""

    merge_budget = MAX_VALUES  # pairs that merge keys may copy, in the whole document (set per loader)

    def flatten_mapping(self, node: yaml.MappingNode, depth: int = 0) -> None:
        if depth > MAX_DEPTH:  # merges of merges ..., or a mapping that merges itself
            raise YamlError(_too_deep_words(), node.start_mark.line + 1)
        own: list[tuple[yaml.Node, yaml.Node]] = []
        sources: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == f"{_TAG}merge":
                sources.extend(value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node])
            else:
                own.append((key_node, value_node))
        if not sources:
            return
        taken = {_key_of(key) for key, _ in own}
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                raise YamlError(
                    tr("a merge key (<<) takes a mapping or a list of mappings"), source.start_mark.line + 1
                )
            self.flatten_mapping(source, depth + 1)
            self.merge_budget -= len(source.value)
            if self.merge_budget < 0:
                raise _expands(source)
            for pair in source.value:
                key = _key_of(pair[0])
                if key not in taken:
                    taken.add(key)
                    merged.append(pair)
        node.value = merged + own


def _key_of(node: yaml.Node) -> object:
    """What makes two mapping keys the same key (scalars by their text; others are refused later)."""
    return (node.tag, node.value) if isinstance(node, yaml.ScalarNode) else id(node)


class _PythonLoader(_MergeGuard, yaml.SafeLoader):
    """PyYAML's pure-Python loader, for when it was built without libyaml: its scanner refuses deep nesting as
    it reads (the composer recurses, and the scanner slows down with every open bracket). About 9x slower."""

    def _too_deep(self) -> YamlError:
        return YamlError(_too_deep_words(), self.get_mark().line + 1)

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        if self.flow_level >= MAX_DEPTH:
            raise self._too_deep()
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column: int) -> bool:
        added = bool(super().add_indent(column))
        if added and len(self.indents) > MAX_DEPTH:
            raise self._too_deep()
        return added


if yaml.__with_libyaml__:
    # libyaml scans and composes in C (a 256 KiB file of tiny values in 0.4 s instead of 3.6 s) and stops
    # nesting at 1,000 levels itself; _weigh holds the document to MAX_DEPTH.
    LOADER: type[_MergeGuard] = type("_LibyamlLoader", (_MergeGuard, yaml.CSafeLoader), {})
else:  # pragma: no cover - PyYAML's wheels include libyaml; tests run the fallback by replacing LOADER
    LOADER = _PythonLoader


def _scalar(node: yaml.ScalarNode, loader: Any) -> Any:
    line = node.start_mark.line + 1
    if node.tag not in _SCALAR_TAGS:
        raise YamlError(_tag_words(node.tag), line)
    if node.tag == f"{_TAG}int" and len(node.value) > 40:  # before int() spends time on thousands of digits
        raise YamlError(tr("integer out of range (at most 64 bits)"), line)
    if node.tag == f"{_TAG}str":  # most values: what PyYAML's constructor would return, without its overhead
        value = node.value
    else:
        try:
            value = loader.construct_object(node, deep=True)
        except (ValueError, OverflowError) as exc:  # dates that do not exist, numbers Python refuses
            raise YamlError(tr("invalid value {value}: {why}", value=repr(node.value[:40]), why=exc), line) from None
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -_INT64 <= value < _INT64:
        raise YamlError(tr("integer out of range (at most 64 bits)"), line)
    if isinstance(value, float) and not math.isfinite(value):
        raise YamlError(tr("{value} is not a finite number", value=repr(node.value[:40])), line)
    if isinstance(value, date):
        try:
            check_date_range(value)
        except ValueError as exc:
            raise YamlError(str(exc), line) from None
    if isinstance(value, str):
        bad = CONTROL_CHARACTERS.search(value)
        if bad:
            raise YamlError(
                tr("control character {char} in a value", char="U+" + format(ord(bad.group()), "04X")), line
            )
    return value


def _expands(node: yaml.Node) -> YamlError:
    return YamlError(
        tr(
            "the document expands to more than {values} values or {chars} characters (aliases and merge keys repeat "
            "what their anchors hold)",
            values=format(MAX_VALUES, ","),
            chars=format(MAX_CHARS, ","),
        ),
        node.start_mark.line + 1,
    )


def _weigh(root: yaml.Node, loader: _MergeGuard) -> None:
    """Expand merge keys, and weigh the document as if every alias were expanded — on the node graph, each node
    once — so an alias bomb (a few hundred bytes that expand to billions of values) is refused before anything
    is built, and nesting through aliases is caught like nesting in the text."""
    weights: dict[int, tuple[int, int, int]] = {}  # id(node) -> (values, characters, height)

    def weigh(node: yaml.Node, depth: int) -> tuple[int, int, int]:
        known = weights.get(id(node))
        if known is None:
            if depth > MAX_DEPTH:  # also ends an alias that refers to its own anchor
                raise YamlError(_too_deep_words(), node.start_mark.line + 1)
            values, chars, height = 1, 0, 0
            if isinstance(node, yaml.ScalarNode):
                chars = len(node.value)
            else:
                if isinstance(node, yaml.MappingNode):
                    loader.flatten_mapping(node)
                    children = [child for pair in node.value for child in pair]
                else:
                    children = list(node.value)
                for child in children:
                    v, c, h = weigh(child, depth + 1)
                    values, chars, height = values + v, chars + c, max(height, h + 1)
            known = weights[id(node)] = (values, chars, height)
            if values > MAX_VALUES or chars > MAX_CHARS:
                raise _expands(node)
        if depth + known[2] > MAX_DEPTH:
            raise YamlError(_too_deep_words(), node.start_mark.line + 1)
        return known

    weigh(root, 0)


def _build(node: yaml.Node, path: Path_, lines: dict[Path_, int], loader: Any) -> Any:
    """The data of a weighed document (see `_weigh`), recording the line of every field."""
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode):
        return _scalar(node, loader)
    if isinstance(node, yaml.MappingNode):
        if node.tag != f"{_TAG}map":
            raise YamlError(_tag_words(node.tag), node.start_mark.line + 1)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlError(tr("mapping keys must be plain values"), line)
            key = _scalar(key_node, loader)
            if key in out:
                raise YamlError(tr("duplicate key {key}", key=repr(key)), line)
            child: Path_ = (*path, str(key))
            lines[child] = line
            out[key] = _build(value_node, child, lines, loader)
        return out
    if isinstance(node, yaml.SequenceNode):
        if node.tag != f"{_TAG}seq":
            raise YamlError(_tag_words(node.tag), node.start_mark.line + 1)
        return [_build(item, (*path, i), lines, loader) for i, item in enumerate(node.value)]
    raise YamlError("unsupported YAML node", node.start_mark.line + 1)  # pragma: no cover - PyYAML has no others


def _syntax_error(exc: yaml.MarkedYAMLError, text: str) -> YamlError:
    """PyYAML's and libyaml's parse errors, mapped to one wording at one place."""
    mark = exc.problem_mark or exc.context_mark
    problem = str(exc.problem or exc)
    if "maximum nesting depth" in problem:  # libyaml's own limit (1,000 levels), reached before ours is checked
        return YamlError(_too_deep_words(), mark.line + 1 if mark else None)
    if exc.context_mark is not None and "quoted scalar" in str(exc.context):
        # An unclosed quote is found at the end of the file; point at where it opened.
        mark, problem = exc.context_mark, tr("unclosed quote ({problem})", problem=problem)
    elif problem == "found character that cannot start any token" and mark is not None:
        lines = text.splitlines()  # libyaml does not say which character (PyYAML does)
        if mark.line < len(lines) and mark.column < len(lines[mark.line]):
            problem = tr("found character {char} that cannot start any token", char=repr(lines[mark.line][mark.column]))
    return YamlError(tr("invalid YAML: {problem}", problem=problem), mark.line + 1 if mark else None)


def load(text: str, file: str) -> tuple[Any, Lines]:
    """Parse one YAML document, keeping the line of every field. Raises YamlError."""
    lines: dict[Path_, int] = {}
    if len(text) > MAX_BYTES or len(text.encode("utf-8")) > MAX_BYTES:
        raise YamlError(tr("the YAML text is larger than {size} KiB", size=MAX_BYTES // 1024), None)
    bad = CONTROL_CHARACTERS.search(text)
    if bad:
        at = text.count("\n", 0, bad.start()) + 1
        raise YamlError(
            tr("control character {char} is not allowed in YAML text", char="U+" + format(ord(bad.group()), "04X")), at
        )
    try:
        loader: Any = LOADER(text)  # type: ignore[call-arg]
    except yaml.reader.ReaderError as exc:  # the reader rejects other unprintable characters before parsing
        at = text.count("\n", 0, exc.position) + 1
        raise YamlError(
            tr("invalid YAML: character {char} is not allowed", char="#x" + format(exc.character, "04x")), at
        ) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None, Lines(file, lines)
        _weigh(node, loader)
        data = _build(node, (), lines, loader)
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc, text) from None
    except yaml.YAMLError as exc:
        raise YamlError(tr("invalid YAML: {problem}", problem=exc), None) from None
    except RecursionError:  # pragma: no cover - MAX_DEPTH keeps every recursion well inside Python's limit
        raise YamlError(_too_deep_words(), None) from None
    finally:
        loader.dispose()
    return data, Lines(file, lines)


class Reference(Enum):
    """Which reference an unknown field sends the reader to (the sections of the 中文 guide, docs/guide.zh.md)."""

    CAMPAIGN = "campaign"
    CONFIG = "config"


def describe_pydantic_error(err: dict[str, Any], reference: Reference = Reference.CAMPAIGN) -> str:
    """A short human reason for one pydantic error entry."""
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        if reference is Reference.CONFIG:
            return tr("unknown field (check the spelling; see the config.yaml reference in docs/guide.zh.md)")
        return tr("unknown field (check the spelling; see the campaign reference in docs/guide.zh.md)")
    if kind == "missing":
        return tr("required field is missing")
    msg = str(err.get("msg", "invalid value"))
    return pydantic_words(err) or msg.removeprefix("Value error, ")  # a validator's own reason is already translated


_SCALAR_BRANCHES = frozenset({"bool", "int", "float", "str", "none"})


def _is_branch(part: str | int, path: Path_, lines: Lines) -> bool:
    """Whether a pydantic loc part names a union branch (`bool`, `FrequencyCap`, ...) rather than a key."""
    if not isinstance(part, str):
        return False
    if "[" in part or part.startswith("function-"):
        return True
    return (part in _SCALAR_BRANCHES or part[:1].isupper()) and (*path, part) not in lines.by_path


def located(
    exc: ValidationError, lines: Lines, prefix: Path_ = (), reference: Reference = Reference.CAMPAIGN
) -> list[tuple[Location, str]]:
    """Each pydantic error as (location, reason), with union-branch noise removed from the path.

    For a field like `bool | QuietHours`, a mapping fails the `bool` branch too; that error is dropped
    when another branch explains what is wrong with the mapping."""
    out: list[tuple[Location, str]] = []
    noise: list[tuple[Location, str]] = []
    for err in exc.errors():
        path: Path_ = prefix
        in_branch = False
        for part in err["loc"]:
            if _is_branch(part, path, lines):
                in_branch = True
            else:
                path = (*path, part)
        item = (lines.at(path), describe_pydantic_error(dict(err), reference))
        kind = str(err.get("type", ""))
        scalar_miss = kind.endswith(("_type", "_parsing")) and kind != "model_type"
        if in_branch and isinstance(err.get("input"), dict) and scalar_miss:
            noise.append(item)
        else:
            out.append(item)
    return out or noise
