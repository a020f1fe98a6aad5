"""click's own words — its usage errors and the labels of its help — in wecast's language.

click translates with the standard library's `gettext` (each of its modules binds `_` and `ngettext` at import), which
reads the process locale and a `messages` catalog that does not exist: so `wecast --lang zh preview --shwo 3` said
"Error: No such option '--shwo'." and every `--help` "[default: 20]" in the middle of Chinese. `install()` points
those names at wecast's catalogs (the language in force when click speaks, see engine.i18n), and the messages below
are in them. A message of click's not listed here stays English. Where click always fills in an English word of
its own (a number type's name, "file" or "directory"), the translation leaves it out with an empty format,
`{number_type:.0}`, which keeps the catalog check's placeholders equal.
"""

from __future__ import annotations

import importlib

from engine.i18n import N_, current, translations

# The modules of click that translate (`from gettext import gettext as _`, `from gettext import ngettext`) when
# it speaks. Not click.decorators: its words are options' help, fixed when an option is made (and `--help`'s is
# made once per command and kept), so they stay the English msgid and are translated when help is shown (cli.py).
_MODULES = ("core", "exceptions", "formatting", "parser", "termui", "types", "utils")

# What click says, as its source spells it (the same text is the msgid here; plurals as (singular, plural)).
# TRANSLATORS: these are click's placeholders, kept as click writes them ({name!r} shows the value in quotes).
WORDS = (
    N_("Aborted!"),
    N_("Commands"),
    N_("Options"),
    N_("Positional arguments"),
    N_("Usage:"),
    N_("Missing command."),
    N_("default: {default}"),
    N_("env var: {var}"),
    N_("required"),
    N_("(dynamic)"),
    N_("Error: {message}"),
    N_("Try '{command} {option}' for help."),
    N_("Invalid value: {message}"),
    N_("Invalid value for {param_hint}: {message}"),
    N_("Missing argument"),
    N_("Missing option"),
    N_("Missing parameter"),
    N_("Missing {param_type}"),
    N_("Missing parameter: {param_name}"),
    N_("No such option {name!r}."),
    N_("No such command {name!r}."),
    N_("unknown error"),
    N_("Could not open file {filename!r}: {message}"),
    N_("Option {name!r} does not take a value."),
    N_("Argument {name!r} takes {nargs} values."),
    N_("{value!r} is not a valid {number_type}."),
    N_("{value} is not in the range {range}."),
    N_("{value!r} is not a valid boolean. Recognized values: {states}"),
    N_("file"),
    N_("directory"),
    N_("path"),
    N_("{name} {filename!r} does not exist."),
    N_("{name} {filename!r} is a file."),
    N_("{name} {filename!r} is a directory."),
    N_("{name} {filename!r} is not readable."),
    N_("{name} {filename!r} is not writable."),
    N_("Show the version and exit."),
    N_("Show this message and exit."),
    N_("Repeat for confirmation"),
    N_("Error: The two entered values do not match."),
    N_("Error: invalid input"),
)


def _plurals() -> None:  # never called: marks click's plural messages for extraction (ntr's keyword)
    from engine.i18n import ntr

    ntr("Got unexpected extra argument ({args})", "Got unexpected extra arguments ({args})", 1)
    ntr("Takes {nargs} values but 1 was given.", "Takes {nargs} values but {len} were given.", 1)
    ntr("Did you mean {possibility}?", "(Did you mean one of: {possibilities}?)", 1)
    ntr("Option {name!r} requires an argument.", "Option {name!r} requires {nargs} arguments.", 1)
    ntr("{value!r} is not {choice}.", "{value!r} is not one of {choices}.", 1)


def gettext(message: str) -> str:
    """click's `_`: the message in the language in force (click formats it itself)."""
    return translations(current()).gettext(message)


def ngettext(singular: str, plural: str, n: int) -> str:
    """click's `ngettext`: the form for `n` in the language in force."""
    return translations(current()).ngettext(singular, plural, n)


def install() -> None:
    """Make click speak through wecast's catalogs (idempotent; call it before click parses or formats)."""
    for name in _MODULES:
        module = importlib.import_module(f"click.{name}")
        if hasattr(module, "_"):
            module._ = gettext  # type: ignore[attr-defined]
        if hasattr(module, "ngettext"):
            module.ngettext = ngettext  # type: ignore[attr-defined]
