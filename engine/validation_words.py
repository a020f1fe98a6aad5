"""pydantic's words for the mistakes people make, in the reader's language: a campaign or config file's values
(`engine.yamlsrc`) and an API request's fields (`engine.web.errors`) are checked by pydantic, whose messages are
English. The catalog's English msgid is pydantic's own text, so English output is unchanged; a message that reads
otherwise (another pydantic version, other details) is left as pydantic wrote it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.i18n import N_, tr

# The error type: the words, and which of the words' fields come from which key of the error's ctx.
WORDS: dict[str, tuple[str, dict[str, str]]] = {
    "finite_number": (N_("Input should be a finite number"), {}),
    "int_parsing": (N_("Input should be a valid integer, unable to parse string as an integer"), {}),
    "int_type": (N_("Input should be a valid integer"), {}),
    "int_from_float": (N_("Input should be a valid integer, got a number with a fractional part"), {}),
    "float_parsing": (N_("Input should be a valid number, unable to parse string as a number"), {}),
    "float_type": (N_("Input should be a valid number"), {}),
    "bool_parsing": (N_("Input should be a valid boolean, unable to interpret input"), {}),
    "bool_type": (N_("Input should be a valid boolean"), {}),
    "string_type": (N_("Input should be a valid string"), {}),
    "string_unicode": (N_("Input should be a valid string, unable to parse raw data as a unicode string"), {}),
    "list_type": (N_("Input should be a valid list"), {}),
    "dict_type": (N_("Input should be a valid dictionary"), {}),
    "model_type": (N_("Input should be a valid dictionary or instance of {name}"), {"name": "class_name"}),
    "literal_error": (N_("Input should be {expected}"), {"expected": "expected"}),
    "enum": (N_("Input should be {expected}"), {"expected": "expected"}),
    "less_than_equal": (N_("Input should be less than or equal to {n}"), {"n": "le"}),
    "less_than": (N_("Input should be less than {n}"), {"n": "lt"}),
    "greater_than_equal": (N_("Input should be greater than or equal to {n}"), {"n": "ge"}),
    "greater_than": (N_("Input should be greater than {n}"), {"n": "gt"}),
    "string_too_long": (N_("String should have at most {n} characters"), {"n": "max_length"}),
    "string_too_short": (N_("String should have at least {n} characters"), {"n": "min_length"}),
    "too_long": (
        N_("List should have at most {n} items after validation, not {found}"),
        {"n": "max_length", "found": "actual_length"},
    ),
}


def pydantic_words(error: Mapping[str, Any]) -> str | None:
    """One pydantic error entry's message in the current language, or None when it is not one of WORDS as
    pydantic words it (the caller keeps pydantic's message)."""
    known = WORDS.get(str(error.get("type", "")))
    if known is None:
        return None
    words, keys = known
    ctx = error.get("ctx") or {}
    fields = {name: _as_pydantic_shows(ctx[key]) for name, key in keys.items() if key in ctx}
    if len(fields) != len(keys) or words.format(**fields) != str(error.get("msg", "")):
        return None
    if "expected" in fields:
        fields["expected"] = _one_of(str(fields["expected"]))
    return tr(words, **fields)


def _one_of(expected: str) -> str:
    """pydantic's list of choices (`'sandbox', 'workpro' or 'wecom'`) joined in the current language: its English
    "or" was the one word left in Chinese (`应为 'sandbox', 'workpro' or 'wecom'`)."""
    head, sep, last = expected.rpartition(" or ")
    if not sep:
        return expected
    items = head.split(", ")
    joined = items[0]
    for item in items[1:]:
        joined = tr("{first}, {next}", first=joined, next=item)
    return tr("{first} or {last}", first=joined, last=last)


def _as_pydantic_shows(value: object) -> object:
    """A bound as pydantic's message prints it: `gt=0` on a float field is 0.0 in ctx and "0" in the words."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
