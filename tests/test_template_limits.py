"""Templates run in bounded time and memory (engine.jinja_limits): ordinary templates render as before, a
template over a bound is a TemplateError at its line (at validation when it is over whatever the contact, at
planning when a contact's data takes it over), budgets are per render and per thread, and the time budget
works in worker threads. The hostile inputs themselves are in tests/cases/hostile/templates/."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engine.errors import CampaignError, Location, TemplateError
from engine.jinja_limits import MAX_STEPS
from engine.render import TemplateRefused, compile_template, render_all
from engine.settings import Settings
from engine.spec import load_campaign

ORIGIN = Location("c.yaml", 10, "message.template")
NOW = datetime(2026, 3, 4, 2, 0, tzinfo=UTC)
# CPU seconds a refusal may take (the time budget is 0.5 s of the rendering thread's CPU). CPU time, not wall
# time: a loaded machine stretches the wall clock, not the work.
GENEROUS = 2.0


def contact(cid: str = "a", **fields: Any) -> dict[str, Any]:
    return {"id": cid, "name": "王芳", "gender": 2, "city": "上海", "tags_named": ("VIP", "新客"), **fields}


def render_one(source: str, person: dict[str, Any] | None = None) -> str:
    person = person or contact()
    result = render_all(
        compile_template(source, ORIGIN), [person], campaign={"id": "c", "name": "活动"}, now=NOW, max_length=10_000
    )
    assert result.missing == {} and result.too_long == []
    return result.texts[person["id"]]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{% for t in tags %}{{ loop.index }}.{{ t }}{{ loop.cycle('、', '') }}{% endfor %}", "1.VIP、2.新客"),
        ("{% macro hi(n) %}{{ n }}您好{% endmacro %}{{ hi(name) }}{{ hi('x') | length }}", "王芳您好3"),
        ("{{ tags | join('/') }} {{ name | center(6) | length }} {{ 'a-b' | replace('-', '+') }}", "VIP/新客 6 a+b"),
        ("{{ '%05.1f|%-4s|' % (3.14159, 'ab') }}{{ '%s=%d' | format('n', 7) }}", "003.1|ab  |n=7"),
        ("{{ '[{:>4}]{}'.format(1, name) }} {{ '{x}'.format_map({'x': city}) }}", "[   1]王芳 上海"),
        ("{{ 'ab'.zfill(4) }} {{ 'a b'.split() }} {{ name.upper() ~ city.strip() }}", "00ab ['a', 'b'] 王芳上海"),
        ("{{ range(1, 4)|sum }} {{ [1, 2, 3, 4]|batch(3)|list|length }} {{ 2**10 }} {{ 7 * 6 }}", "6 2 1024 42"),
        ("{{ [3, 1] | sort | first }}{{ range(5) | slice(2) | list | length }}{{ {'a': 1} | tojson }}", '12{"a": 1}'),
        ("{% set ns = namespace(n=0) %}{% for t in tags %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}", "2"),
        ("{% set c = cycler('甲', '乙') %}{{ c.next() }}{{ c.next() }}{{ c.next() }}", "甲乙甲"),
        ("{% filter upper %}vip {{ name }}{% endfilter %}{% set b %}x{{ city }}{% endset %}{{ b }}", "VIP 王芳x上海"),
        ("{{ now.strftime('%m-%d') }} {{ now|datefmt('%Y') }} {{ dict(a=1).items()|list }}", "03-04 2026 [('a', 1)]"),
        ("{{ lipsum(1, false, 5, 6) | wordcount }} {{ 'x' ~ 1 ~ none }} {{ 'aa' * 3 }}", "5 x1None aaaaaa"),
        ("{% for i in range(3) recursive %}{{ i }}{% if i == 0 %}[{{ loop([9]) }}]{% endif %}{% endfor %}", "0[9]12"),
        ("{{ ('好' * 9000) | length }} {% for i in range(9000) %}{% endfor %}done", "9000 done"),
    ],
)
def test_ordinary_templates_render_as_before(source: str, expected: str) -> None:
    """Loops, macros, filters, formatting and string methods a message uses all work within the bounds."""
    assert render_one(source) == expected


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}", "10,000 steps"),
        (
            "{% for i in range(9000) %}{{ 'a' * 90000 in 'b' * 90000 or 'a' * 90000 in 'b' * 90000 "
            "or 'a' * 90000 in 'b' * 90000 or 'a' * 90000 in 'b' * 90000 }}{% endfor %}",
            "0.5 s to render",
        ),
        ("{{ 'a' * 99999 ~ 'b' * 99999 }}", "larger than 100,000 characters"),
        ("{{ 'x' | center(10**9) }}", "center width 1,000,000,000 is more than 100,000"),
        ("{{ 2 ** 5000 }}", "more than 4,096 bits"),
    ],
)
def test_a_template_over_a_bound_fails_validation_quickly(source: str, words: str) -> None:
    """A template over a bound whatever the contact is refused when it is checked, within the time budget."""
    started = time.process_time()
    with pytest.raises(TemplateRefused, match="goes over a limit") as info:
        compile_template(source, ORIGIN)
    assert time.process_time() - started < GENEROUS
    assert words in str(info.value)
    assert info.value.location == ORIGIN


def test_the_error_names_the_template_line_of_the_bound() -> None:
    """The error's line is the file line of the template line that went over the bound."""
    with pytest.raises(TemplateRefused) as info:
        compile_template("你好\n{{ name }}\n{{ 'x'.ljust(10**7) }}", ORIGIN)
    assert info.value.location == Location("c.yaml", 12, "message.template")


def test_a_campaign_whose_template_is_over_a_bound_is_invalid(tmp_path: Path) -> None:
    """`wecast validate` reports a template over a bound as file:line: message.template."""
    path = tmp_path / "bomb.yaml"
    path.write_text(
        "name: x\naudience: {}\nmessage:\n  template: |\n    hi\n"
        "    {% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}\n",
        encoding="utf-8",
    )
    with pytest.raises(CampaignError) as info:
        load_campaign(path, Settings(version=1, campaigns_dir=tmp_path))
    assert str(info.value).startswith(f"{path}:6: message.template: the template goes over a limit")


def test_contact_data_that_takes_a_template_over_a_bound_stops_planning_with_the_field() -> None:
    """A template within bounds for the sample contact but not for a real one is a TemplateError naming the
    field and line when the audience is rendered — never a hang."""
    source = "{% for a in name %}{% for b in name %}{% for c in name %}{% endfor %}{% endfor %}{% endfor %}"
    template = compile_template(source, ORIGIN)  # the sample name is short: fine at validation
    started = time.process_time()
    with pytest.raises(TemplateRefused) as info:
        render_all(template, [contact(name="名" * 100)], campaign={"id": "c", "name": "c"}, now=NOW)
    assert time.process_time() - started < GENEROUS
    assert info.value.location == ORIGIN
    assert "steps" in str(info.value)


def test_the_step_budget_is_per_render() -> None:
    """A template that uses most of the step budget renders for every recipient: budgets do not add up."""
    template = compile_template(f"{{% for i in range({MAX_STEPS - 10}) %}}{{% endfor %}}ok", ORIGIN)
    people = [contact(str(i)) for i in range(5)]
    result = render_all(template, people, campaign={"id": "c", "name": "c"}, now=NOW)
    assert result.texts == {str(i): "ok" for i in range(5)}


def test_budgets_are_per_thread_and_work_outside_the_main_thread() -> None:
    """A hostile render in one worker thread hits its time budget while a legit render in another thread
    finishes normally; neither depends on signals."""
    # Slow only when name and city differ (a long failed substring search per step): fine at validation.
    slow = compile_template(
        "{% for i in range(9000) %}{{ name * 9000 in city * 9000 or name * 9000 in city * 9000 "
        "or name * 9000 in city * 9000 or name * 9000 in city * 9000 }}{% endfor %}",
        ORIGIN,
    )
    legit = compile_template("{% for t in tags %}{{ t }}{% endfor %}", ORIGIN)
    outcomes: dict[str, object] = {}

    def hostile() -> None:
        started = time.process_time()
        try:
            render_all(slow, [contact(name="a" * 10, city="b" * 10)], campaign={"id": "c", "name": "c"}, now=NOW)
        except TemplateError as exc:
            outcomes["hostile"] = (str(exc), time.thread_time() - started)

    def friendly() -> None:
        texts = {}
        for _ in range(200):
            texts = render_all(legit, [contact()], campaign={"id": "c", "name": "c"}, now=NOW).texts
        outcomes["legit"] = texts

    threads = [threading.Thread(target=hostile), threading.Thread(target=friendly)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    message, seconds = outcomes["hostile"]  # type: ignore[misc]
    assert "0.5 s to render" in message and seconds < GENEROUS
    assert outcomes["legit"] == {"a": "VIP新客"}


@pytest.mark.parametrize(
    "source",
    [
        "{{ (1).to_bytes(10**6, 'big') }}",
        "{{ name.encode() }}",
        "{{ name.translate({}) }}",
        "{{ tags.copy() }}",
        "{{ now.astimezone().tzinfo }}",
    ],
)
def test_only_allowlisted_methods_can_be_called(source: str) -> None:
    """Methods outside the allowlist for strings, lists, dicts, numbers and dates are refused by name."""
    with pytest.raises(TemplateError, match=r"calling \w+\.\w+\(\) is not allowed in templates"):
        compile_template(source, ORIGIN)


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("{{ name | urlize }}", "unknown filter 'urlize'"),
        ("{% autoescape true %}{{ name }}{% endautoescape %}", "autoescape %} is not supported"),
        ("{{ " + "(" * 400 + "1" + ")" * 400 + " }}", "nests too deeply"),
        ("{% for a in tags %}" * 25 + "{% endfor %}" * 25, "nests too deeply"),
        ("{{ name }}" * 3300, "longer than 32,768 characters"),
    ],
)
def test_templates_the_bounds_cannot_run_are_refused_at_compile_time(source: str, words: str) -> None:
    """HTML-only filters, autoescape, nesting Jinja or Python cannot compile, and oversized templates are
    refused with a clear error instead of a RecursionError or a slow compile."""
    started = time.process_time()
    with pytest.raises(TemplateError) as info:
        compile_template(source, ORIGIN)
    assert time.process_time() - started < GENEROUS
    assert words in str(info.value)


def test_a_contact_whose_message_passes_the_size_cap_is_too_long_not_a_crash() -> None:
    """A contact whose data makes the text pass the size cap is listed as too long, like any long message; the
    other recipients are rendered."""
    template = compile_template("{{ name }}您好", ORIGIN)
    people = [contact("huge", name="名" * 150_000), contact("ok")]
    result = render_all(template, people, campaign={"id": "c", "name": "c"}, now=NOW)
    assert result.too_long == ["huge"]
    assert result.texts == {"ok": "王芳您好"}
