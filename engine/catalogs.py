"""Keep the message catalogs in step with the code (Babel; a development tool, not used at run time).

    python -m engine.catalogs update     extract the messages of engine/ into engine/locale/wecast.pot, merge them
                                         into each language's .po (the English catalog repeats the msgid), compile
                                         every .mo
    python -m engine.catalogs check      list what is wrong (exit 1): a message the code uses that a catalog lacks
                                         or leaves untranslated or fuzzy, placeholders that differ between msgid
                                         and translation, a .mo that is not the compiled .po

Translators edit `engine/locale/zh_CN/LC_MESSAGES/wecast.po` and run `update` (which also compiles). The keywords
are engine.i18n's: `tr(msg)`, `ntr(singular, plural, n)`, `N_(msg)`; extraction options are in babel.cfg.
"""

from __future__ import annotations

import io
import string
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from babel.messages.catalog import Catalog, Message
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.mofile import read_mo, write_mo
from babel.messages.pofile import read_po, write_po

from engine.i18n import DOMAIN, LOCALE_DIR, Language

ROOT = LOCALE_DIR.parent.parent
KEYWORDS = {"tr": None, "ntr": (1, 2), "N_": None}
MAPPING = ROOT / "babel.cfg"  # which files to read, as pybabel's -F takes it
HEADER = "wecast's user-facing text. Source strings are English; see engine/i18n.py."


def po_path(lang: Language) -> Path:
    return LOCALE_DIR / lang.value / "LC_MESSAGES" / f"{DOMAIN}.po"


def mo_path(lang: Language) -> Path:
    return po_path(lang).with_suffix(".mo")


def extract() -> Catalog:
    """Every message the code marks, with where it is used."""
    template = Catalog(project="wecast", domain=DOMAIN, header_comment=f"# {HEADER}", fuzzy=False)
    template.creation_date = datetime(2026, 1, 1, tzinfo=UTC)  # fixed: the .pot changes only when messages do
    with MAPPING.open(encoding="utf-8") as fp:
        method_map, options_map = parse_mapping_cfg(fp)  # type: ignore[no-untyped-call]  # Babel leaves it bare
    for filename, lineno, message, comments, context in extract_from_dir(
        str(ROOT), method_map, options_map, keywords=KEYWORDS, comment_tags=("TRANSLATORS:",), strip_comment_tags=True
    ):
        template.add(message, None, [(filename, lineno)], auto_comments=comments, context=context)
    return template


def _read(path: Path, lang: Language) -> Catalog:
    if not path.exists():
        return Catalog(locale=lang.value, domain=DOMAIN, project="wecast", fuzzy=False)
    with path.open("rb") as fp:
        return read_po(fp, locale=lang.value, domain=DOMAIN)


def update() -> None:
    """Extract, merge into every language's catalog, compile."""
    template = extract()
    LOCALE_DIR.mkdir(parents=True, exist_ok=True)
    with (LOCALE_DIR / f"{DOMAIN}.pot").open("wb") as fp:
        write_po(fp, template, width=120, sort_output=True, include_lineno=False)
    for lang in Language:
        catalog = _read(po_path(lang), lang)
        catalog.update(template, update_header_comment=False, no_fuzzy_matching=True)
        if lang is Language.EN:  # the source text is English: the English catalog says the same
            for message in catalog:
                if message.id and not _translated(message):
                    message.string = message.id
        catalog.revision_date = template.creation_date
        catalog.fuzzy = False
        po_path(lang).parent.mkdir(parents=True, exist_ok=True)
        with po_path(lang).open("wb") as fp:
            write_po(fp, catalog, width=120, ignore_obsolete=True, sort_output=True, include_lineno=False)
        compile_catalog(lang)


def compile_catalog(lang: Language) -> None:
    with mo_path(lang).open("wb") as fp:
        fp.write(_compiled(_read(po_path(lang), lang)))


def _compiled(catalog: Catalog) -> bytes:
    buffer = io.BytesIO()
    write_mo(buffer, catalog, use_fuzzy=False)
    return buffer.getvalue()


def _translated(message: Message) -> bool:
    strings = message.string if isinstance(message.string, tuple | list) else (message.string,)
    return all(strings)


def placeholders(text: str) -> set[str]:
    """The `{name}` fields of a message (str.format syntax; `{{` is a literal brace)."""
    try:
        return {name for _lit, name, _spec, _conv in string.Formatter().parse(text) if name is not None}
    except ValueError:
        return {"<unbalanced braces>"}


def _ids(message: Message) -> tuple[str, ...]:
    return tuple(message.id) if isinstance(message.id, tuple | list) else (message.id,)


def _strings(message: Message) -> tuple[str, ...]:
    value = message.string
    return tuple(s or "" for s in value) if isinstance(value, tuple | list) else (value or "",)


def problems(template: Catalog | None = None) -> list[str]:
    """What is wrong with the catalogs, one line each (empty: all good)."""
    template = template if template is not None else extract()
    found: list[str] = []
    for lang in Language:
        path = po_path(lang)
        rel = path.relative_to(ROOT)
        if not path.exists():
            found.append(f"{rel}: missing (run `python -m engine.catalogs update`)")
            continue
        catalog = _read(path, lang)
        for wanted in template:
            if not wanted.id:
                continue
            have = catalog.get(wanted.id, wanted.context)
            where = f"{rel}: {_ids(wanted)[0]!r}"
            if have is None:
                found.append(f"{where}: not in the catalog (used at {_locations(wanted.locations)})")
            elif have.fuzzy or not _translated(have):
                found.append(f"{where}: not translated" + (" (fuzzy)" if have.fuzzy else ""))
            else:
                forms = [placeholders(i) for i in _ids(wanted)]
                expected = set().union(*forms)
                # A plural's form may have the fields of either msgid form or of both (click's "Did you mean
                # {possibility}?" / "(… one of: {possibilities}?)"), and may leave out {n} ("一条" for one); it may
                # never invent a field or drop one that both forms have.
                allowed = [expected] if len(forms) == 1 else [*forms, expected]
                allowed += [] if len(forms) == 1 else [a - {"n"} for a in allowed]
                for text in _strings(have):
                    got = placeholders(text)
                    if got not in allowed:
                        found.append(
                            f"{where}: placeholders differ: msgid has {sorted(expected)}, translation {sorted(got)}"
                        )
        mo = mo_path(lang)
        if not mo.exists():
            found.append(f"{mo.relative_to(ROOT)}: missing (run `python -m engine.catalogs update`)")
        elif _messages(mo.read_bytes()) != _messages(_compiled(catalog)):
            found.append(f"{mo.relative_to(ROOT)}: not the compiled .po (run `python -m engine.catalogs update`)")
    return found


def _messages(mo: bytes) -> dict[tuple[str, ...], tuple[str, ...]]:
    return {_ids(m): _strings(m) for m in read_mo(io.BytesIO(mo)) if m.id}


def _locations(locations: Iterable[tuple[str, int | None]]) -> str:
    return ", ".join(f"{file}:{line}" for file, line in list(locations)[:3])


def main(argv: list[str]) -> int:
    if argv == ["update"]:
        update()
        return 0
    if argv == ["check"]:
        found = problems()
        for line in found:
            print(line)
        return 1 if found else 0
    print(__doc__)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
