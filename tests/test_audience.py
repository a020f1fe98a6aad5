"""Audience selection: rule operators and shorthands, combinators, tag filters, ids, exclusions, limit,
and the reasons given for everyone left out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.audience import RuleError, parse_rules, select

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def contact(cid: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": cid,
        "name": cid,
        "alias": "",
        "gender": 0,
        "city": "",
        "province": "",
        "phones": [],
        "friend": True,
        "coworker": False,
        "star": False,
        "type": 1,
        "corporation": "",
        "title": "",
        "added_at": None,
        "tags": frozenset(),
    }
    tags = fields.pop("tags", ())
    base.update(fields)
    base["tags"] = frozenset(tags)
    return base


PEOPLE = [
    contact(
        "wang",
        name="王芳",
        gender=2,
        city="上海",
        province="上海",
        phones=["13800000001"],
        tags={"VIP", "护肤"},
        added_at=NOW - timedelta(days=3),
        star=True,
        type=1,
    ),
    contact(
        "li",
        name="李强",
        gender=1,
        city="杭州",
        province="浙江",
        tags={"新客"},
        added_at=NOW - timedelta(days=40),
        type=2,
    ),
    contact(
        "zhang",
        name="张伟",
        gender=0,
        city="北京",
        province="北京",
        phones=["13900000002"],
        tags={"VIP", "勿扰"},
        added_at=NOW - timedelta(days=200),
        type=1,
        alias="张总",
    ),
    contact("chen", name="陈静", gender=2, city="", province="广东", added_at=None, type=3),
]


def chosen(rule: Any, people: list[dict[str, Any]] = PEOPLE, now: datetime = NOW) -> list[str]:
    """Ids the rule selects among `people`."""
    compiled = parse_rules(rule)
    return [c["id"] for c in people if compiled(c, now) is None]


@pytest.mark.parametrize(
    ("rule", "ids"),
    [
        ({"city": "上海"}, ["wang"]),  # scalar shorthand: equals
        ({"city": ["上海", "杭州"]}, ["wang", "li"]),  # list shorthand: one of
        ({"城市": "北京"}, ["zhang"]),  # Chinese alias
        ({"city": {"eq": "杭州"}}, ["li"]),
        ({"city": {"ne": "杭州"}}, ["wang", "zhang", "chen"]),
        ({"city": {"in": ["北京", "杭州"]}}, ["li", "zhang"]),
        ({"city": {"not_in": ["北京", "杭州"]}}, ["wang", "chen"]),
        ({"name": {"contains": "芳"}}, ["wang"]),
        ({"name": {"not_contains": "王"}}, ["li", "zhang", "chen"]),
        ({"name": {"startswith": "张"}}, ["zhang"]),
        ({"name": {"endswith": "静"}}, ["chen"]),
        ({"name": {"matches": "^(王|李)"}}, ["wang", "li"]),
        ({"type": {"gt": 1}}, ["li", "chen"]),
        ({"type": {"gte": 2}}, ["li", "chen"]),
        ({"type": {"lt": 2}}, ["wang", "zhang"]),
        ({"type": {"lte": 1}}, ["wang", "zhang"]),
        ({"type": {"gte": 2, "lt": 3}}, ["li"]),  # several operators: all hold
        ({"phone": {"present": True}}, ["wang", "zhang"]),
        ({"phone": {"present": False}}, ["li", "chen"]),
        ({"phone": {"startswith": "139"}}, ["zhang"]),
        ({"city": {"present": False}}, ["chen"]),
        ({"alias": {"present": True}}, ["zhang"]),
        ({"备注": "张总"}, ["zhang"]),
        ({"gender": "female"}, ["wang", "chen"]),
        ({"gender": "女"}, ["wang", "chen"]),
        ({"gender": "male"}, ["li"]),
        ({"gender": "男"}, ["li"]),
        ({"gender": 1}, ["li"]),
        ({"gender": "unknown"}, ["zhang"]),
        ({"gender": {"in": ["male", "female"]}}, ["wang", "li", "chen"]),
        ({"gender": {"present": True}}, ["wang", "li", "chen"]),
        ({"star": True}, ["wang"]),
        ({"tag": "VIP"}, ["wang", "zhang"]),
        ({"tag": ["新客", "护肤"]}, ["wang", "li"]),
        ({"tags": {"contains": "勿扰"}}, ["zhang"]),
        ({"tags": {"not_contains": "VIP"}}, ["li", "chen"]),
        ({"tags": {"ne": "VIP"}}, ["li", "chen"]),
        ({"tags": {"present": False}}, ["chen"]),
        ({"tags": {"matches": "^护"}}, ["wang"]),
        ({"added_within": "7d"}, ["wang"]),
        ({"added_within": "60d"}, ["wang", "li"]),
        ({"added_over": "30d"}, ["li", "zhang"]),
        ({"added_after": datetime(2026, 1, 1, tzinfo=UTC)}, ["wang", "li"]),
        ({"added_before": datetime(2026, 1, 1).date()}, ["zhang"]),
        ({"addedAt": {"gte": datetime(2026, 1, 1, tzinfo=UTC)}}, ["wang", "li"]),
        ({"addedAt": {"gte": datetime(2026, 2, 1, tzinfo=UTC)}}, ["wang"]),
    ],
)
def test_operator_and_shorthand(rule: dict[str, Any], ids: list[str]) -> None:
    """Each operator and shorthand selects exactly the contacts it describes."""
    assert chosen(rule) == ids


@pytest.mark.parametrize(
    ("rule", "ids"),
    [
        ([{"tag": "VIP"}, {"city": "北京"}], ["zhang"]),  # a list means all
        ({"all": [{"tag": "VIP"}, {"gender": "female"}]}, ["wang"]),
        ({"any": [{"city": "杭州"}, {"province": "广东"}]}, ["li", "chen"]),
        ({"not": {"tag": "VIP"}}, ["li", "chen"]),
        ({"not": [{"tag": "VIP"}, {"city": "上海"}]}, ["li", "zhang", "chen"]),  # not (all of a list)
        ({"not": {"not": {"city": "上海"}}}, ["wang"]),
        ({"any": [{"all": [{"tag": "VIP"}, {"star": True}]}, {"not": {"added_within": "365d"}}]}, ["wang", "chen"]),
    ],
)
def test_combinators(rule: Any, ids: list[str]) -> None:
    """all / any / not (and a bare list meaning all) combine rules as boolean logic does."""
    assert chosen(rule) == ids


def test_added_rules_use_the_injected_now() -> None:
    """added_within / added_over are measured from the `now` passed in, not the wall clock."""
    later = NOW + timedelta(days=10)
    assert chosen({"added_within": "7d"}, now=NOW) == ["wang"]
    assert chosen({"added_within": "7d"}, now=later) == []
    assert chosen({"added_over": "10d"}, now=later) == ["wang", "li", "zhang"]


def test_added_date_unknown_fails_both_directions_with_reason() -> None:
    """A contact without an added date matches neither added_within nor added_over, and says why."""
    chen = PEOPLE[3]
    for kind in ("added_within", "added_over", "added_after", "added_before"):
        arg = "7d" if kind in ("added_within", "added_over") else datetime(2026, 1, 1, tzinfo=UTC)
        assert parse_rules({kind: arg})(chen, NOW) == "added date unknown"


@pytest.mark.parametrize(
    ("rule", "cid", "words"),
    [
        ({"city": ["上海", "杭州"]}, "zhang", ["city", "北京", "上海", "杭州"]),
        ({"city": "上海"}, "chen", ["city", "empty"]),
        ({"gender": "female"}, "li", ["gender", "male", "female"]),
        ({"name": {"startswith": "王"}}, "li", ["name", "李强", "startswith", "王"]),
        ({"type": {"gt": 2}}, "li", ["type", "2", ">"]),
        ({"phone": {"present": True}}, "li", ["phone", "empty"]),
        ({"added_within": "7d"}, "li", ["added", "40 days ago"]),
        ({"not": {"tag": "VIP"}}, "wang", ["excluded rule", "VIP"]),
        ({"any": [{"city": "杭州"}, {"tag": "新客"}]}, "wang", ["none of", "上海", "杭州", "新客"]),
    ],
)
def test_rule_reasons_say_why(rule: Any, cid: str, words: list[str]) -> None:
    """The reason a contact fails a rule names the field, its value and what was wanted."""
    person = next(c for c in PEOPLE if c["id"] == cid)
    reason = parse_rules(rule)(person, NOW)
    assert reason is not None
    for word in words:
        assert word in reason, (word, reason)


@pytest.mark.parametrize(
    ("rule", "path", "words"),
    [
        ({"cty": "上海"}, ("cty",), "unknown contact field"),
        ({"city": {"like": "上"}}, ("city", "like"), "unknown operator"),
        ({"city": {}}, ("city",), "empty operator mapping"),
        ([], (), "empty list"),
        ({"city": "上海", "gender": "male"}, (), "one key"),
        ("city", (), "one key"),
        ({"any": []}, ("any",), "non-empty list"),
        ({"all": {"city": "上海"}}, ("all",), "non-empty list"),
        ({"not": [{"city": {"in": "上海"}}]}, ("not", 0, "city", "in"), "non-empty list"),
        ([{"tag": "VIP"}, {"any": [{"gender": "二"}]}], (1, "any", 0, "gender"), "gender must be"),
        ({"name": {"matches": "("}}, ("name", "matches"), "invalid regular expression"),
        ({"name": {"gt": "王"}}, ("name", "gt"), "compares numbers or dates"),
        ({"star": "yes"}, ("star",), "true or false"),
        ({"added_within": "soon"}, ("added_within",), "not a duration"),
        ({"added_after": "last year"}, ("added_after",), "expected a date"),
        ({"added_at": "2026-01-01"}, ("added_at",), "added_within"),
        ({"phone": {"present": "yes"}}, ("phone", "present"), "true or false"),
        ({"city": {"contains": 3}}, ("city", "contains"), "takes text"),
        ({"city": {"eq": ["上海"]}}, ("city", "eq"), "single value"),
    ],
)
def test_malformed_rules_raise_with_a_path(rule: Any, path: tuple[str | int, ...], words: str) -> None:
    """A malformed rule raises RuleError whose path points at the offending part of the rule."""
    with pytest.raises(RuleError) as info:
        parse_rules(rule)
    assert info.value.path == path
    assert words in info.value.reason


# -- select ------------------------------------------------------------------------------------------


def ids_of(rows: list[Any]) -> list[str]:
    return [r["id"] if isinstance(r, dict) else r.contact_id for r in rows]


def reasons(selection: Any) -> dict[str, str]:
    return {e.contact_id: e.reason for e in selection.excluded}


def test_tags_any_all_none() -> None:
    """tags_any needs one of the tags, tags_all every tag, tags_none none of them; each says why."""
    s = select(PEOPLE, tags_any=["VIP", "新客"], now=NOW)
    assert ids_of(s.recipients) == ["wang", "li", "zhang"]
    assert "none of the tags" in reasons(s)["chen"]
    s = select(PEOPLE, tags_all=["VIP", "护肤"], now=NOW)
    assert ids_of(s.recipients) == ["wang"]
    assert "lacks tag 护肤" in reasons(s)["zhang"]
    s = select(PEOPLE, tags_none=["勿扰"], now=NOW)
    assert ids_of(s.recipients) == ["wang", "li", "chen"]
    assert "excluded tag 勿扰" in reasons(s)["zhang"]


def test_tags_match_by_id_as_well_as_name() -> None:
    """Contacts carry tag ids next to names, so an audience may name a tag by either."""
    people = [contact("a", tags={"VIP", "tag_vip_01"}), contact("b", tags={"新客", "tag_new_02"})]
    assert ids_of(select(people, tags_any=["tag_vip_01"], now=NOW).recipients) == ["a"]


def test_ids_narrow_the_audience_silently_and_report_unknown_ids() -> None:
    """With ids, other contacts are not candidates at all (not excluded), and unknown ids are reported."""
    s = select(PEOPLE, ids=["li", "chen", "ghost"], tags_any=["新客"], now=NOW)
    assert ids_of(s.recipients) == ["li"]
    assert ids_of(s.excluded) == ["chen"]
    assert s.unknown_ids == ["ghost"]


def test_exclude_ids() -> None:
    """exclude_ids removes those contacts with a reason naming exclude_ids."""
    s = select(PEOPLE, exclude_ids=["wang", "zhang"], now=NOW)
    assert ids_of(s.recipients) == ["li", "chen"]
    assert all("exclude_ids" in r for r in reasons(s).values())


def test_limit_keeps_the_first_n_in_input_order() -> None:
    """limit keeps the first N matching contacts; the rest are excluded as over the limit."""
    s = select(PEOPLE, limit=2, now=NOW)
    assert ids_of(s.recipients) == ["wang", "li"]
    assert reasons(s) == {"zhang": "over the audience limit of 2", "chen": "over the audience limit of 2"}


def test_limit_counts_only_matching_contacts() -> None:
    """Contacts that fail the audience do not use up the limit."""
    s = select(PEOPLE, tags_any=["VIP"], limit=1, now=NOW)
    assert ids_of(s.recipients) == ["wang"]
    assert "limit" in reasons(s)["zhang"]
    assert "none of the tags" in reasons(s)["li"]


def test_coworkers_and_non_friends_are_excluded() -> None:
    """Coworkers are left out unless include_coworkers; non-friends are always left out."""
    people = [
        *PEOPLE,
        contact("cw", coworker=True),
        contact("gone", friend=False),
        contact("cw_gone", coworker=True, friend=False),
    ]
    s = select(people, now=NOW)
    assert "cw" not in ids_of(s.recipients)
    assert "coworker" in reasons(s)["cw"]
    assert "not a friend" in reasons(s)["gone"]
    s = select(people, include_coworkers=True, now=NOW)
    assert "cw" in ids_of(s.recipients)
    assert "not a friend" in reasons(s)["gone"]
    assert "not a friend" in reasons(s)["cw_gone"]


@pytest.mark.parametrize(
    ("rule", "zh", "en", "passes"),
    [
        ({"tag": "彩妆"}, "缺少标签 彩妆", "lacks tag 彩妆", True),
        ({"tag": ["彩妆", "新客"]}, "没有标签 彩妆, 新客", "has none of the tags 彩妆, 新客", True),
        ({"tags": {"ne": "VIP"}}, "有排除标签 VIP", "has excluded tag VIP", True),
        ({"tags": {"not_in": ["VIP", "彩妆"]}}, "有排除标签 VIP", "has excluded tag VIP", False),
        ({"tags": {"contains": "彩妆"}}, "缺少标签 彩妆", "lacks tag 彩妆", True),
    ],
)
def test_tag_rules_say_which_tag_not_the_whole_tag_set(rule: Any, zh: str, en: str, passes: bool) -> None:
    """A `tag:` rule's reason names the tag wanted, as the tag filters do — not the contact's whole tag set, ids and
    all (`tags is [VIP, tag-vip, 护肤, …], not = 彩妆`); its text reads the same way (a journey's exit_when)."""
    from engine.i18n import Language, use_language

    person = contact("wang", tags={"VIP", "tag-vip", "护肤", "tag-skincare"})
    compiled = parse_rules(rule)
    assert compiled(person, NOW) == en
    with use_language(Language.ZH):
        assert compiled(person, NOW) == zh
    assert (compiled(contact("other", tags={"彩妆", "新客"}), NOW) is None) is passes
    assert parse_rules({"tag": "已购"}).text == "has tag 已购"
    with use_language(Language.ZH):
        assert parse_rules({"tag": "已购"}).text == "有标签 已购"


def test_rules_apply_after_tag_filters_with_rule_reason() -> None:
    """A contact passing the tag filters but failing a rule is excluded with the rule's reason."""
    s = select(PEOPLE, tags_any=["VIP"], rules=parse_rules({"city": "上海"}), now=NOW)
    assert ids_of(s.recipients) == ["wang"]
    assert "北京" in reasons(s)["zhang"]
    assert "none of the tags" in reasons(s)["li"]


def test_unknown_tags_are_reported_only_when_tags_are_known() -> None:
    """Tags the audience names that the account does not have are listed (a likely typo)."""
    s = select(PEOPLE, tags_any=["VIP", "VPI"], tags_none=["勿扰"], now=NOW, known_tags=["VIP", "勿扰", "新客"])
    assert s.unknown_tags == ["VPI"]
    assert select(PEOPLE, tags_any=["VPI"], now=NOW).unknown_tags == []


# -- properties --------------------------------------------------------------------------------------

CITIES = ["上海", "杭州", "北京", "", None]
TAGS = ["VIP", "新客", "勿扰", "护肤"]

contacts_st = st.lists(
    st.builds(
        dict,
        city=st.sampled_from(CITIES),
        gender=st.sampled_from([0, 1, 2]),
        star=st.booleans(),
        type=st.integers(0, 3),
        name=st.sampled_from(["王芳", "李强", "", "张{{ 7*7 }}"]),
        phones=st.sampled_from([[], ["13800000000"]]),
        tags=st.frozensets(st.sampled_from(TAGS)),
        added_at=st.one_of(st.none(), st.integers(0, 400).map(lambda d: NOW - timedelta(days=d))),
        friend=st.booleans(),
        coworker=st.booleans(),
    ),
    max_size=25,
).map(lambda rows: [{"id": f"c{i}", **row} for i, row in enumerate(rows)])

leaf_rules = st.sampled_from(
    [
        {"city": "上海"},
        {"city": ["杭州", "北京"]},
        {"city": {"ne": "北京"}},
        {"city": {"present": True}},
        {"gender": "female"},
        {"star": True},
        {"type": {"gte": 2}},
        {"tag": "VIP"},
        {"tag": ["新客", "勿扰"]},
        {"name": {"startswith": "王"}},
        {"name": {"contains": "{{"}},
        {"phone": {"present": True}},
        {"added_within": "30d"},
        {"added_over": "100d"},
    ]
)
rules_st = st.recursive(
    leaf_rules,
    lambda inner: st.one_of(
        st.builds(lambda r: {"not": r}, inner),
        st.lists(inner, min_size=1, max_size=3).map(lambda rs: {"any": rs}),
        st.lists(inner, min_size=1, max_size=3).map(lambda rs: {"all": rs}),
    ),
    max_leaves=6,
)
fast = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(people=contacts_st, rule=rules_st)
def test_not_partitions_the_candidates(people: list[dict[str, Any]], rule: Any) -> None:
    """Among contacts that can be messaged, a rule and its `not` select disjoint sets that cover them all."""
    yes = set(ids_of(select(people, rules=parse_rules(rule), now=NOW).recipients))
    no = set(ids_of(select(people, rules=parse_rules({"not": rule}), now=NOW).recipients))
    reachable = {c["id"] for c in people if c["friend"] and not c["coworker"]}
    assert yes.isdisjoint(no)
    assert yes | no == reachable


@fast
@given(people=contacts_st, a=rules_st, b=rules_st)
def test_any_is_union_and_all_is_intersection(people: list[dict[str, Any]], a: Any, b: Any) -> None:
    """`any` selects the union of its rules' selections and `all` their intersection."""
    one, two = set(chosen(a, people)), set(chosen(b, people))
    assert set(chosen({"any": [a, b]}, people)) == one | two
    assert set(chosen({"all": [a, b]}, people)) == one & two
    assert set(chosen([a, b], people)) == one & two


@fast
@given(people=contacts_st)
def test_ne_agrees_with_not_eq(people: list[dict[str, Any]]) -> None:
    """`city: {ne: X}` selects exactly what `not: {city: X}` selects, including contacts with no city."""
    assert chosen({"city": {"ne": "上海"}}, people) == chosen({"not": {"city": "上海"}}, people)
    assert chosen({"city": {"not_in": ["上海"]}}, people) == chosen({"not": {"city": ["上海"]}}, people)


@fast
@given(
    people=contacts_st,
    rule=rules_st,
    limit=st.one_of(st.none(), st.integers(1, 10)),
    tags_any=st.lists(st.sampled_from(TAGS), max_size=2),
    tags_none=st.lists(st.sampled_from(TAGS), max_size=1),
)
def test_every_contact_is_accounted_for_once(
    people: list[dict[str, Any]], rule: Any, limit: int | None, tags_any: list[str], tags_none: list[str]
) -> None:
    """Each contact is either a recipient or excluded with a non-empty reason, never both or neither;
    recipients keep input order, and a limit keeps a prefix of the unlimited selection."""
    kwargs: dict[str, Any] = {"rules": parse_rules(rule), "tags_any": tags_any, "tags_none": tags_none, "now": NOW}
    s = select(people, limit=limit, **kwargs)
    got, out = ids_of(s.recipients), ids_of(s.excluded)
    assert sorted(got + out) == sorted(c["id"] for c in people)
    assert all(e.reason for e in s.excluded)
    order = [c["id"] for c in people]
    assert got == [cid for cid in order if cid in set(got)]
    unlimited = ids_of(select(people, **kwargs).recipients)
    assert got == (unlimited[:limit] if limit else unlimited)


def test_each_exclusion_carries_its_category_whatever_its_wording() -> None:
    """Who the targeting does not select is an `audience` mismatch and who it selects but leaves out an
    `exclusion` — decided where the decision is made, not read back from the reason's wording: a rule
    `{coworker: true}` fails customers with a reason that starts like the coworker exclusion, yet they are
    audience mismatches (not recorded in a run)."""
    from engine.audience import ExclusionCategory

    people = [
        contact("customer"),
        contact("staff", coworker=True),
        contact("listed"),
        contact("stranger", friend=False),
        contact("dnd", tags={"勿扰"}),
        contact("extra", coworker=True),
    ]
    result = select(
        people,
        rules=parse_rules([{"coworker": True}]),
        include_coworkers=True,
        exclude_ids=["listed"],
        tags_none=["勿扰"],
        limit=1,
        now=NOW,
    )
    assert [c["id"] for c in result.recipients] == ["staff"]
    got = {e.contact_id: (e.category, e.reason) for e in result.excluded}
    assert got["customer"] == (ExclusionCategory.AUDIENCE, "coworker is False, not = True")
    assert got["listed"][0] is ExclusionCategory.EXCLUSION
    assert got["stranger"][0] is ExclusionCategory.EXCLUSION
    assert got["dnd"][0] is ExclusionCategory.EXCLUSION
    assert got["extra"] == (ExclusionCategory.EXCLUSION, "over the audience limit of 1")
    assert not ExclusionCategory.AUDIENCE.recorded and ExclusionCategory.EXCLUSION.recorded
