"""Regular expressions run in bounded time on what customers write (engine.patterns): a pattern that backtracks
without end (`^(\\w+\\s?)+$`, `^(a|aa)+$`) meets a customer's message or nickname that sets it off, and the search
stops after its timeout — a keyword is then no match, an audience rule leaves the contact out (also under `not`) —
while `wecast serve` keeps answering and the next customer still gets their reply."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from web_harness import LiveServer, login, make_settings

from engine.audience import parse_rules
from engine.gateways.sandbox import SandboxGateway
from engine.journeys.conditions import Facts, parse_condition
from engine.keywords import Matcher
from engine.patterns import TIMEOUT, PatternError, compile_pattern

BACKTRACKS = r"^(\w+\s?)+$"  # written in good faith: "words separated by single spaces"
HOSTILE = "a" * 33 + "!"  # 2**33 ways to split the a's before the "!" fails
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def test_a_keyword_that_backtracks_is_no_match_after_its_timeout() -> None:
    """The hostile message is no match, in about the timeout, and the same pattern still matches sound text."""
    matcher = Matcher.build([BACKTRACKS, "价格"], "regex")
    started = time.process_time()
    assert matcher.find(HOSTILE) is None
    assert time.process_time() - started < 10 * TIMEOUT
    assert matcher.find(HOSTILE + " 价格") == "价格"  # the next keyword is still tried
    assert matcher.find("hello world") == BACKTRACKS


@pytest.mark.parametrize(
    ("rules", "decided_name"),
    [
        ({"name": {"matches": r"^(a|aa)+$"}}, "aaaa"),
        ({"not": {"name": {"matches": r"^(a|aa)+$"}}}, "bbbb"),  # undecided is not "does not match"
        ({"any": [{"city": "杭州"}, {"name": {"matches": r"^(a|aa)+$"}}]}, "aa"),
    ],
)
def test_an_audience_rule_that_runs_out_of_time_leaves_the_contact_out(rules: object, decided_name: str) -> None:
    """A contact whose nickname sets the pattern off is left out with the reason, whatever combinator stands around
    the rule; a contact the pattern decides quickly is selected as the rule says."""
    rule = parse_rules(rules)
    hostile = {"id": "c1", "name": "a" * 40 + "b", "city": "上海", "tags": frozenset()}
    started = time.process_time()
    reason = rule(hostile, NOW)
    assert time.process_time() - started < 10 * TIMEOUT
    assert reason is not None and "could not be decided in time" in reason
    assert rule({"id": "c2", "name": decided_name, "city": "上海", "tags": frozenset()}, NOW) is None


def test_a_journey_condition_that_runs_out_of_time_holds_neither_way() -> None:
    """`if: {not: {name: {matches: ...}}}` on the hostile nickname does not hold (the else branch), as the rule
    itself does not."""
    contact = {"id": "c1", "name": "a" * 40 + "b", "tags": frozenset()}
    facts = Facts(contact=contact, now=NOW)
    assert not parse_condition({"name": {"matches": r"^(a|aa)+$"}}).holds(facts)
    assert not parse_condition({"not": {"name": {"matches": r"^(a|aa)+$"}}}).holds(facts)


def test_what_re_takes_is_taken_and_what_it_refuses_is_refused() -> None:
    """The syntax is Python's `re` (Unicode classes included: \\w matches Chinese); a broken pattern is an error."""
    assert compile_pattern(r"^\w{2,4}$").search("王小明")
    assert compile_pattern(r"(?<=价)格").search("价格")
    with pytest.raises(PatternError):
        compile_pattern("(unclosed")


JOURNEY = """kind: journey
id: reply
name: 问候回复
trigger:
  message:
    keywords: ['^(\\w+\\s?)+$']
    match: regex
entry: every_time
quiet_hours: false
frequency_cap: false
steps:
  - send: {template: "您好"}
    transactional: true
"""


def test_serve_keeps_answering_after_a_message_that_sets_a_pattern_off(tmp_path: Path) -> None:
    """A journey keyed on a backtracking pattern, a customer writes the message that sets it off: /healthz answers
    at once meanwhile, that message triggers nothing, and the next customer's "hello" is replied to."""
    settings = make_settings(tmp_path)
    (tmp_path / "campaigns" / "reply.yaml").write_text(JOURNEY, encoding="utf-8")
    with LiveServer(settings) as server:
        login(server.client)
        server.client.post("/api/v1/contacts/sync").raise_for_status()
        first, second = (c["id"] for c in server.client.post("/get-all-user", json={"pageSize": 2}).json()["datas"])
        hostile = {"action": "message", "contact_id": first, "text": HOSTILE}
        assert server.client.post("/api/v1/sandbox/events", json=hostile).status_code == 200
        for _ in range(3):
            started = time.monotonic()
            assert server.client.get("/healthz", timeout=5).status_code == 200
            assert time.monotonic() - started < 2
            time.sleep(0.3)
        sound = {"action": "message", "contact_id": second, "text": "hello"}
        assert server.client.post("/api/v1/sandbox/events", json=sound).status_code == 200
        gateway = server.app.gateway
        assert isinstance(gateway, SandboxGateway)
        deadline = time.monotonic() + 20
        while not gateway.outbox_messages(second) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [m.text for m in gateway.outbox_messages(second)] == ["您好"]
        assert gateway.outbox_messages(first) == []
