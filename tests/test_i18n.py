"""Two languages, Chinese first: the catalogs are complete and compiled, and the language is chosen as documented
(`--lang`, then config.yaml, then the locale; per request on the web side)."""

from __future__ import annotations

import ast
import asyncio
import contextvars
import threading
from pathlib import Path

import pytest

from engine import catalogs, i18n
from engine.i18n import Language, choose, from_environment, negotiate, ntr, tr, use_language

ROOT = Path(__file__).resolve().parent.parent


def test_catalogs_have_every_message_translated_and_compiled() -> None:
    """Each catalog holds every message the code marks, translated, with the msgid's placeholders, and its .mo is
    the compiled .po (`python -m engine.catalogs update` fixes the last)."""
    assert catalogs.problems() == []


def test_check_reports_a_missing_message_and_a_placeholder_mismatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalog check fails on a message the catalog lacks and on a translation whose placeholders differ."""
    from babel.messages.catalog import Catalog

    template = Catalog(domain="wecast")
    template.add("recipients {n}")
    template.add("brand new message")
    template.add(("Did you mean {one}?", "(one of: {many}?)"))  # click's: each form its own field
    zh = Catalog(locale="zh_CN", domain="wecast")
    zh.add("recipients {n}", "收件人 {count}")
    zh.add(("Did you mean {one}?", "(one of: {many}?)"), ("是不是 {many}？{who}",))
    en = Catalog(locale="en", domain="wecast")
    en.add("recipients {n}", "recipients {n}")
    en.add("brand new message", "brand new message")
    en.add(("Did you mean {one}?", "(one of: {many}?)"), ("Did you mean {one}?", "(one of: {many}?)"))
    folder = tmp_path / "engine" / "locale"
    monkeypatch.setattr(catalogs, "LOCALE_DIR", folder)
    monkeypatch.setattr(catalogs, "ROOT", tmp_path)
    from babel.messages.pofile import write_po

    for lang, catalog in ((Language.ZH, zh), (Language.EN, en)):
        path = catalogs.po_path(lang)
        path.parent.mkdir(parents=True)
        with path.open("wb") as fp:
            write_po(fp, catalog)
        catalogs.compile_catalog(lang)
    found = catalogs.problems(template)
    assert any("'brand new message': not in the catalog" in line and "zh_CN" in line for line in found), found
    assert any("placeholders differ" in line and "['n']" in line and "['count']" in line for line in found), found
    assert any("placeholders differ" in line and "['many', 'who']" in line for line in found), found  # invented
    assert not any("en/" in line for line in found), found


def test_check_reports_a_stale_mo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .po edited without recompiling is reported: the shipped .mo would still say the old words."""
    from babel.messages.catalog import Catalog
    from babel.messages.pofile import write_po

    template = Catalog(domain="wecast")
    template.add("hello")
    monkeypatch.setattr(catalogs, "LOCALE_DIR", tmp_path / "engine" / "locale")
    monkeypatch.setattr(catalogs, "ROOT", tmp_path)
    for lang in Language:
        path = catalogs.po_path(lang)
        path.parent.mkdir(parents=True)
        catalog = Catalog(locale=lang.value, domain="wecast")
        catalog.add("hello", "你好" if lang is Language.ZH else "hello")
        with path.open("wb") as fp:
            write_po(fp, catalog)
        catalogs.compile_catalog(lang)
    assert catalogs.problems(template) == []
    catalog = Catalog(locale="zh_CN", domain="wecast")
    catalog.add("hello", "您好")
    with catalogs.po_path(Language.ZH).open("wb") as fp:
        write_po(fp, catalog)
    assert any("not the compiled .po" in line for line in catalogs.problems(template))


MARKERS = {"tr": 1, "ntr": 2, "N_": 1}


def _unextractable() -> list[str]:
    """tr/ntr/N_ calls whose message Babel cannot read: not a string literal, or written inside an f-string."""
    found = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        if "proto" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_fstring: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                in_fstring |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in MARKERS:
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if path.name == "i18n.py":
                    continue
                literal = all(
                    isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args[: MARKERS[node.func.id]]
                )
                if id(node) in in_fstring and literal:  # tr(NAME) in an f-string is fine: NAME was marked with N_
                    found.append(f"{where}: {node.func.id}() inside an f-string")
                elif not literal and not _is_table_lookup(node):
                    found.append(f"{where}: {node.func.id}() of something that is not a string literal")
    return found


def _is_table_lookup(node: ast.Call) -> bool:
    """`tr(NAMES[key])` / `tr(self.help)`: translating text marked elsewhere with N_ (allowed for tr only)."""
    return (
        isinstance(node.func, ast.Name)
        and node.func.id == "tr"
        and isinstance(node.args[0], ast.Subscript | ast.Attribute | ast.Name)
    )


def test_every_marked_message_is_extractable() -> None:
    """Every message passed to tr/ntr/N_ is a literal Babel can extract (an f-string message would silently stay
    English)."""
    assert _unextractable() == []


# The errors a person reads as they are (the CLI's one line, an API answer's `error`, validation's file:line: field:).
# Not GatewayError's branches: those are a delivery's recorded reason, kept as the gateway said it.
USER_ERRORS = {
    "ConfigError",
    "CampaignError",
    "TemplateError",
    "AudienceError",
    "NotFoundError",
    "LoginError",
    "RuleError",
    "WecastError",
    "UsageError",
    "BadParameter",
}


VALIDATORS = {"field_validator", "model_validator"}  # pydantic shows what these raise as the field's reason


def _name(node: ast.expr) -> str:
    target = node.func if isinstance(node, ast.Call) else node
    return target.id if isinstance(target, ast.Name) else target.attr if isinstance(target, ast.Attribute) else ""


def _bare(node: ast.expr) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def _raises_bare(node: ast.Raise) -> bool:
    return isinstance(node.exc, ast.Call) and bool(node.exc.args) and _bare(node.exc.args[0])


def _untranslated_errors() -> list[str]:
    """User-facing errors made from a bare string or f-string instead of tr/ntr/Lazy (English in Chinese output):
    the user-facing exception classes anywhere, and anything a pydantic validator raises."""
    found = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        if "proto" in path.parts or "console" in path.parts:  # the console has its own catalog and extraction
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_validator: set[int] = set()
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and VALIDATORS & {_name(d) for d in fn.decorator_list}:
                in_validator |= {id(n) for n in ast.walk(fn) if isinstance(n, ast.Raise)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args and _name(node) in USER_ERRORS and _bare(node.args[0]):
                found.append(
                    f"{path.relative_to(ROOT)}:{node.lineno}: {_name(node)}({ast.unparse(node.args[0])[:60]}…)"
                )
            elif isinstance(node, ast.Raise) and id(node) in in_validator and _raises_bare(node):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: a validator raises {ast.unparse(node)[:60]}…")
    return found


def test_errors_people_read_come_from_the_catalogs() -> None:
    """A user-facing error (config, campaign, journey, not found, login, usage) is made from tr/ntr/Lazy, so
    `wecast --lang zh` never answers `gateway workpro needs a token` or `wrong verification code; 2 tries left`."""
    assert _untranslated_errors() == []


def test_login_errors_speak_the_language_in_force(tmp_path: Path) -> None:
    """The sandbox's wrong-code answer (what /submit-verify-code and `wecast login` show) is in the caller's
    language, plural and all."""
    from engine.clock import FakeClock
    from engine.errors import LoginError
    from engine.gateways.sandbox import SandboxGateway
    from engine.settings import SandboxSettings

    async def wrong_code(lang: Language) -> str:
        gateway = SandboxGateway(
            SandboxSettings(state_file=tmp_path / f"{lang.value}.sqlite", auto_login=False, scan_delay="1h"),
            FakeClock(),
        )
        await gateway.start()
        try:
            await gateway.start_login(schedule_phone=False)
            await gateway.sandbox_scan(quiet=True)
            code = gateway.sandbox_phone_code()
            assert code is not None
            with use_language(lang), pytest.raises(LoginError) as caught:
                await gateway.submit_verify_code("000000" if code != "000000" else "111111")
            return str(caught.value)
        finally:
            await gateway.close()

    assert asyncio.run(wrong_code(Language.ZH)) == "验证码错误；还可以尝试 2 次"
    assert asyncio.run(wrong_code(Language.EN)) == "wrong verification code; 2 tries left"


def test_the_sandbox_phone_logs_its_code_in_the_process_language(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`wecast login` on the sandbox: the only place the code shows is the simulated phone's log line, in the
    language the CLI chose (it was English under `--lang zh`), even when a request in another language scanned."""
    import logging

    from engine.clock import FakeClock
    from engine.gateways.sandbox import SandboxGateway
    from engine.settings import SandboxSettings

    async def scan() -> str | None:
        gateway = SandboxGateway(
            SandboxSettings(state_file=tmp_path / "s.sqlite", auto_login=False, scan_delay="1h"), FakeClock()
        )
        await gateway.start()
        try:
            await gateway.start_login(schedule_phone=False)
            with use_language(Language.EN):  # e.g. POST /api/v1/sandbox/scan?lang=en
                await gateway.sandbox_scan()
            return gateway.sandbox_phone_code()
        finally:
            await gateway.close()

    before = i18n.process_language()
    i18n.set_language(Language.ZH)
    try:
        with caplog.at_level(logging.WARNING, "wecast.sandbox"):
            code = asyncio.run(scan())
    finally:
        i18n.set_language(before)
    assert next(r.getMessage() for r in caplog.records if r.name == "wecast.sandbox").startswith(
        f"沙箱手机：企业微信显示验证码 {code}（二维码 "
    )


@pytest.mark.parametrize(
    ("cli", "config", "env", "expected"),
    [
        ("en", "zh_CN", {"LANG": "zh_CN.UTF-8"}, Language.EN),
        ("zh", None, {"LANG": "C.UTF-8"}, Language.ZH),
        (None, "zh_CN", {"LANG": "en_US.UTF-8"}, Language.ZH),
        (None, "en", {"LANG": "zh_CN.UTF-8"}, Language.EN),
        (None, None, {"LANG": "zh_CN.UTF-8"}, Language.ZH),
        (None, None, {"LC_ALL": "zh_TW.UTF-8", "LANG": "en_US.UTF-8"}, Language.ZH),
        (None, None, {"LC_ALL": "C", "LANG": "zh_CN.UTF-8"}, Language.EN),
        (None, None, {"LANGUAGE": "zh_CN:en"}, Language.ZH),
        (None, None, {}, Language.EN),
    ],
)
def test_language_order(cli: str | None, config: str | None, env: dict[str, str], expected: Language) -> None:
    """--lang wins over config.yaml's language, which wins over the locale (LC_ALL, then LANG); English last."""
    assert choose(cli=cli, config=config, environ=env) is expected


def test_environment_reads_posix_precedence() -> None:
    """LC_ALL decides before LANG; an empty variable does not count."""
    assert from_environment({"LC_ALL": "", "LANG": "zh_CN.UTF-8"}) is Language.ZH
    assert from_environment({"LC_ALL": "en_US.UTF-8", "LANG": "zh_CN.UTF-8"}) is Language.EN


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("zh-CN,zh;q=0.9,en;q=0.8", Language.ZH),
        ("en-US,en;q=0.9,zh-CN;q=0.8", Language.EN),
        ("fr-FR, zh;q=0.5, en;q=0.4", Language.ZH),
        ("fr-FR, de", None),
        ("zh;q=0, en", Language.EN),
        ("", None),
        (None, None),
    ],
)
def test_accept_language(header: str | None, expected: Language | None) -> None:
    """The best-ranked language wecast speaks wins; q=0 means never; none spoken: None (the config decides)."""
    assert negotiate(header) is expected


def test_translation_and_plural() -> None:
    """tr and ntr speak the language in force, with their fields filled in."""
    with use_language(Language.ZH):
        assert tr("has none of the tags {tags}", tags="VIP") == "没有标签 VIP"
        assert (
            ntr(
                "already got {n} marketing message today (max {max})",
                "already got {n} marketing messages today (max {max})",
                1,
                max=1,
            )
            == "今天已收到 1 条营销消息（上限 1 条）"
        )
    with use_language(Language.EN):
        assert (
            ntr("{n} of {total} contacts match", "{n} of {total} contacts match", 2, total=3) == "2 of 3 contacts match"
        )


def test_language_is_per_context_not_global() -> None:
    """Two concurrent tasks (requests) each keep their own language; a thread started with a copied context keeps
    the caller's; the process default is untouched."""
    seen: dict[str, str] = {}

    async def request(lang: Language, name: str) -> None:
        with use_language(lang):
            await asyncio.sleep(0)  # let the other request run between setting and using the language
            seen[name] = tr("Recipients")
            seen[name + "-thread"] = await asyncio.to_thread(tr, "Recipients")

    async def both() -> None:
        await asyncio.gather(request(Language.ZH, "zh"), request(Language.EN, "en"))

    asyncio.run(both())
    assert seen == {"zh": "收件人", "zh-thread": "收件人", "en": "Recipients", "en-thread": "Recipients"}
    assert i18n.current() is Language.EN
    context = contextvars.copy_context()
    with use_language(Language.ZH):
        context = contextvars.copy_context()
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(context.run(tr, "Recipients")))
    thread.start()
    thread.join()
    assert result == ["收件人"]


def test_wheel_ships_the_compiled_catalogs() -> None:
    """The .mo files are package data, so a wheel (not only this checkout) carries them."""
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = data["tool"]["setuptools"]["package-data"]["engine"]
    assert any(p.endswith(".mo") and p.startswith("locale/") for p in patterns)
    for lang in Language:
        assert (ROOT / "engine" / "locale" / lang.value / "LC_MESSAGES" / "wecast.mo").is_file()


def test_demo_names_agree_with_genders() -> None:
    """No demo customer with a man's name is a woman, or the other way round (a 浩然 is never greeted 女士)."""
    from engine.gateways.demo_data import FEMALE_NAMES, MALE_NAMES, demo_contacts

    contacts = demo_contacts(2000)
    for c in contacts:
        words = {c.name, c.name[1:]}  # a nickname, or a one-character surname and the given name
        if c.gender == 1:
            assert not words & FEMALE_NAMES, c
        if c.gender == 2:
            assert not words & MALE_NAMES, c
    assert {c.gender for c in contacts} == {0, 1, 2}
