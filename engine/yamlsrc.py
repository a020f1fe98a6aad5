"""YAML with line numbers, so every error can say `file:line: field: why`.

`load(text, file)` returns the data plus a `Lines` map from field paths (tuples of keys and indexes) to
the 1-based line where that field's value (or key) stands. `located(errors, ...)` turns pydantic
validation errors into messages that name the file, line and dotted field path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from engine.errors import Location

Path_ = tuple[str | int, ...]


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


class YamlSyntaxError(ValueError):
    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


class _Loader(yaml.SafeLoader):
    pass


def _build(node: yaml.Node, path: Path_, lines: dict[Path_, int], loader: _Loader) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise YamlSyntaxError("mapping keys must be plain values", key_node.start_mark.line + 1)
            if key in out:
                raise YamlSyntaxError(f"duplicate key {key!r}", key_node.start_mark.line + 1)
            child: Path_ = (*path, str(key))
            lines[child] = key_node.start_mark.line + 1
            out[key] = _build(value_node, child, lines, loader)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), lines, loader) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def load(text: str, file: str) -> tuple[Any, Lines]:
    """Parse one YAML document, keeping the line of every field. Raises YamlSyntaxError."""
    lines: dict[Path_, int] = {}
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:  # the reader rejects control characters before any parsing
        at = text.count("\n", 0, exc.position) + 1
        raise YamlSyntaxError(f"invalid YAML: character #x{exc.character:04x} is not allowed", at) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None, Lines(file, lines)
        data = _build(node, (), lines, loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = str(exc.problem or exc)
        if exc.context_mark is not None and "quoted scalar" in str(exc.context):
            # An unclosed quote is found at the end of the file; point at where it opened.
            mark, problem = exc.context_mark, f"unclosed quote ({problem})"
        line = mark.line + 1 if mark else None
        raise YamlSyntaxError(f"invalid YAML: {problem}", line) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"invalid YAML: {exc}", None) from None
    finally:
        loader.dispose()
    return data, Lines(file, lines)


def describe_pydantic_error(err: dict[str, Any]) -> str:
    """A short human reason for one pydantic error entry."""
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown field (check the spelling; see the campaign reference in README.md)"
    if kind == "missing":
        return "required field is missing"
    msg = str(err.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")


_SCALAR_BRANCHES = frozenset({"bool", "int", "float", "str", "none"})


def _is_branch(part: str | int, path: Path_, lines: Lines) -> bool:
    """Whether a pydantic loc part names a union branch (`bool`, `FrequencyCap`, ...) rather than a key."""
    if not isinstance(part, str):
        return False
    if "[" in part or part.startswith("function-"):
        return True
    return (part in _SCALAR_BRANCHES or part[:1].isupper()) and (*path, part) not in lines.by_path


def located(exc: ValidationError, lines: Lines, prefix: Path_ = ()) -> list[tuple[Location, str]]:
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
        item = (lines.at(path), describe_pydantic_error(dict(err)))
        kind = str(err.get("type", ""))
        scalar_miss = kind.endswith(("_type", "_parsing")) and kind != "model_type"
        if in_branch and isinstance(err.get("input"), dict) and scalar_miss:
            noise.append(item)
        else:
            out.append(item)
    return out or noise
