"""Sandboxed message templates: escapes blocked, contact data kept literal, missing fields counted per
field, defaults, dates in the campaign's zone, derived names, length limit."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from engine.errors import Location, TemplateError
from engine.render import compile_template, contact_context, describe_missing, render_all

ORIGIN = Location("c.yaml", 10, "message.template")
NOW = datetime(2026, 1, 1, 2, 0, tzinfo=UTC)


def person(cid: str = "a", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": cid,
        "name": "王芳",
        "alias": "",
        "gender": 0,
        "city": "",
        "phones": [],
        "friend": True,
        "coworker": False,
        "star": False,
        "tags_named": (),
    }
    base.update(fields)
    return base


def render(source: str, *people: dict[str, Any], tz: str = "Asia/Shanghai", max_length: int = 2000) -> Any:
    template = compile_template(source, ORIGIN, tz)
    return render_all(
        template, list(people) or [person()], campaign={"id": "vip", "name": "每周VIP"}, now=NOW, max_length=max_length
    )


def one(source: str, contact: dict[str, Any] | None = None, **kw: Any) -> str:
    result = render(source, contact or person(), **kw)
    assert result.missing == {}
    return str(result.texts[(contact or person())["id"]])


# -- sandbox -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ name.__class__ }}",
        "{{ contact.__init__ }}",
        "{{ lipsum.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "第一行\n{{ campaign._secret }}",
    ],
)
def test_underscore_attributes_are_rejected_at_compile_time(source: str) -> None:
    """Attributes starting with `_` are refused when the template is checked, with file and line."""
    with pytest.raises(TemplateError, match="is not allowed in templates") as info:
        compile_template(source, ORIGIN)
    assert info.value.location.file == "c.yaml"
    assert info.value.location.line == 10 + source.count("\n")


@pytest.mark.parametrize(
    "source",
    [
        "{{ name | attr('__class__') }}",
        "{{ '{0.__class__}'.format(name) }}",
        "{{ name.format_map({}).__class__ if false else ('{0.__init__}'.format(name)) }}",
    ],
)
def test_runtime_escapes_are_blocked_by_the_sandbox(source: str) -> None:
    """Escapes that only show at render time raise TemplateError instead of reaching Python internals."""
    with pytest.raises(TemplateError, match="not allowed"):
        render(source)


@pytest.mark.parametrize("source", ["{{ range(10**9) | length }}", "{% for i in range(10**9) %}{% endfor %}x"])
def test_huge_ranges_are_blocked(source: str) -> None:
    """`range(10**9)` is refused when the template is checked (quickly, without building the range)."""
    with pytest.raises(TemplateError, match=r"range\(\) may have at most 10,000 items"):
        compile_template(source, ORIGIN)


# -- contact data is data ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "{{ 7*7 }}",
        "{% raw %}",
        "{% endraw %}{{ name }}",
        "{# 注释 #}",
        "{{ ''.__class__ }}",
        "{% for x in range(10**9) %}",
    ],
)
def test_contact_values_stay_literal(value: str) -> None:
    """Template syntax inside contact values is output as-is, never evaluated."""
    c = person(name=value, alias=value, city=value)
    assert one("{{ name }}|{{ display_name }}|{{ city }}|{{ contact.city }}", c) == "|".join([value] * 4)


# -- missing fields ----------------------------------------------------------------------------------


def test_missing_field_is_counted_per_field() -> None:
    """Each field a recipient lacks is counted once for them, and such recipients get no text."""
    people = [
        person("a", city="上海", phones=["138"]),
        person("b", city="", phones=["139"]),
        person("c", city="", phones=[]),
        person("d", city="杭州", phones=[]),
    ]
    result = render("{{ city }} {{ phone }}", *people)
    assert result.missing == {"city": ["b", "c"], "phone": ["c", "d"]}
    assert set(result.texts) == {"a"}
    assert result.failed_ids == {"b", "c", "d"}


def test_two_missing_fields_for_one_contact_are_both_counted() -> None:
    """A contact lacking two fields is counted under both, not just the first one hit."""
    result = render("{{ city }}{{ alias }}{{ contact.province }}", person("x"))
    assert result.missing == {"city": ["x"], "alias": ["x"], "province": ["x"]}


def test_missing_attribute_counts_the_recipient_once() -> None:
    """An attribute that no placeholder can supply is reported once per recipient, not repeatedly."""
    result = render("{{ name.nickname }}", person("a"), person("b"))
    assert result.missing == {"nickname": ["a", "b"]}


def test_describe_missing_names_field_and_count() -> None:
    """The message for missing fields names each field, how many lack it, and suggests a default."""
    text = describe_missing({"city": ["a", "b"], "phone": ["c"]}, 5)
    assert "'city' is missing for 2 of 5 recipients" in text
    assert "'phone' is missing for 1 of 5 recipients" in text
    assert "default" in text


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ city | default('您所在的城市') }}", "您所在的城市"),
        ("{{ contact.city | default('本地') }}", "本地"),
        ("{% if city is defined %}{{ city }}{% else %}全国{% endif %}", "全国"),
        ("{% if city is not defined %}无{% endif %}", "无"),
        ("{{ honorific | default('') }}您好", "您好"),
    ],
)
def test_default_and_is_defined_avoid_the_error(source: str, expected: str) -> None:
    """`default(...)` and `is defined` let a template handle a missing field without an error."""
    assert one(source, person(city="")) == expected


def test_empty_values_count_as_missing() -> None:
    """Empty strings and empty lists are missing, so a default applies to them too."""
    assert one("{{ city | default('无') }}{{ phone | default('无') }}", person(city="", phones=[])) == "无无"


# -- dates, names, tags, length ------------------------------------------------------------------------


def test_datefmt_renders_in_the_campaign_zone() -> None:
    """`datefmt` converts to the campaign's zone: 2026-01-01T17:00Z is already 1月2日 in Shanghai."""
    c = person(added_at=datetime(2026, 1, 1, 17, 0, tzinfo=UTC))
    assert one("{{ added_at | datefmt }}", c, tz="Asia/Shanghai") == "2026年01月02日"
    assert one("{{ added_at | datefmt }}", c, tz="UTC") == "2026年01月01日"
    assert one("{{ added_at | datefmt('%H:%M') }}", c, tz="America/New_York") == "12:00"


def test_for_zone_switches_the_zone_of_a_compiled_template() -> None:
    """A template compiled in one zone renders dates in another after `for_zone`."""
    template = compile_template("{{ added_at | datefmt('%d日%H点') }}", ORIGIN, "UTC")
    c = person(added_at=datetime(2026, 1, 1, 17, 0, tzinfo=UTC))
    shanghai = template.for_zone("Asia/Shanghai")
    assert render_all(template, [c], campaign={}, now=NOW).texts["a"] == "01日17点"
    assert render_all(shanghai, [c], campaign={}, now=NOW).texts["a"] == "02日01点"


def test_days_since_filter() -> None:
    """`days_since(now)` counts whole days between a date and the run's time."""
    c = person(added_at=datetime(2025, 12, 22, 2, 0, tzinfo=UTC))
    assert one("{{ added_at | days_since(now) }}", c) == "10"


@pytest.mark.parametrize(("gender", "honorific"), [(1, "先生"), (2, "女士")])
def test_honorific_from_gender(gender: int, honorific: str) -> None:
    """`honorific` is 先生 for men and 女士 for women."""
    assert one("{{ name }}{{ honorific }}", person(gender=gender)) == f"王芳{honorific}"


def test_honorific_missing_when_gender_unknown() -> None:
    """With gender unknown there is no honorific: using it bare is a missing field."""
    result = render("{{ honorific }}", person(gender=0))
    assert result.missing == {"honorific": ["a"]}


def test_display_name_prefers_the_remark() -> None:
    """`display_name` is the remark (alias) when set, else the name."""
    assert one("{{ display_name }}", person(alias="王姐")) == "王姐"
    assert one("{{ display_name }}", person(alias="")) == "王芳"


def test_contact_context_derives_fields() -> None:
    """The context has phone from phones, flags as booleans, and drops empty values."""
    ctx = contact_context(person(phones=["13800000000", "139"], gender=2, city="", star=1))
    assert ctx["phone"] == "13800000000"
    assert ctx["honorific"] == "女士"
    assert ctx["star"] is True
    assert "city" not in ctx


def test_campaign_now_and_tags_are_available() -> None:
    """Templates can use campaign fields, the run's time and the contact's tag names."""
    c = person(tags_named=("VIP", "新客"))
    text = one("{{ campaign.name }} {{ now.year }} {{ tags | join(',') }} {{ 'VIP' in tags }}", c)
    assert text == "每周VIP 2026 VIP,新客 True"


def test_truncate_filter_is_available() -> None:
    """Jinja's own filters, such as truncate, work in templates."""
    assert one("{{ name | truncate(5, true, '…', 0) }}", person(name="一二三四五六七八")) == "一二三四…"


def test_max_length() -> None:
    """Messages longer than max_length are held back and listed, others are rendered."""
    result = render("{{ name }}", person("short", name="短"), person("long", name="长" * 11), max_length=10)
    assert result.too_long == ["long"]
    assert set(result.texts) == {"short"}
    assert result.failed_ids == {"long"}


def test_output_is_stripped() -> None:
    """Rendered text is stripped of surrounding blank lines."""
    result = render("\n  你好{{ '' }}  \n", person("a"), person("b"))
    assert result.texts == {"a": "你好", "b": "你好"}


@pytest.mark.parametrize(
    ("source", "line", "words"),
    [
        ("你好\n{{ nmae }}", 11, "unknown field 'nmae'"),
        ("{{ name | shout }}", 10, "unknown filter 'shout'"),
        ("\n\n{% if name is shiny %}x{% endif %}", 12, "unknown test 'shiny'"),
        ("a\nb\n{% if %}", 12, "syntax error"),
        ("   ", 10, "empty"),
    ],
)
def test_compile_errors_point_at_the_template_line(source: str, line: int, words: str) -> None:
    """Compile errors carry the origin's file and the line of the problem within the template."""
    with pytest.raises(TemplateError) as info:
        compile_template(source, ORIGIN)
    assert info.value.location == Location("c.yaml", line, "message.template")
    assert words in str(info.value)


def test_templates_cannot_build_huge_values() -> None:
    """`*` and `**` are capped in templates, so a template cannot exhaust memory; ordinary arithmetic works."""
    with pytest.raises(TemplateError, match="larger than 100,000 characters"):
        compile_template("{{ 'a' * 10**9 }}", Location("c.yaml", 3, "message.template"))
    fine = compile_template("{{ name * 2 }}{{ 3 * 4 }} {{ 2 ** 10 }}", Location("c.yaml", 3, "message.template"))
    assert fine.render({"name": "ab"}) == "abab12 1024"
