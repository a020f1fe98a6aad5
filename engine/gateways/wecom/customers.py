"""WeCom's customers (客户) and corp tags -> the gateway contract's ContactRecord and TagRecord. Pure functions.

WeCom lists a customer once per staff member who added them (`batch/get_by_user`: one `follow_info` per item;
`externalcontact/get`: a `follow_user` array); wecast has one contact per customer, so the follows are merged:

* `follow_user_ids` — the staff members, the one who added the customer first leading (the sender of 群发 tasks
  unless a campaign says otherwise), then by add time;
* `tag_ids` — the union of the corp (and rule-group) tags every follow carries (tags are per staff member and
  customer in WeCom; personal tags have no id and are not synced);
* `alias` / `description` — the leading follow's remark and description; `phones` — every remark mobile;
* `added_at` — the earliest add; `additional_info["follows"]` — each follow as WeCom gave it (add way, state …).

Parsing is lenient, as the reference asks (§2.4: numbers may come as strings, fields as null): a field of the
wrong shape becomes its empty value, never an exception. What an answer is made of is not: a list item that is not
an object, an item without its id (a customer without `external_userid`, a follow without `userid`), a cursor that
is not text or comes back again — each a `WecomAnswerError` naming the API and the field (`items`, `ident`,
`next_cursor`), so a sync fails rather than leaving out customers it could not read (they would be marked removed).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from engine.gateways.base import ContactRecord, TagRecord
from engine.gateways.wecom.errors import WecomAnswerError

JSON = dict[str, Any]


def text(value: object) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def number(value: object) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return 0


def strings(value: object) -> list[str]:
    if not isinstance(value, list):
        return []
    return [v for v in (text(x) for x in value) if v]


def obj(value: object) -> JSON:
    return value if isinstance(value, dict) else {}


def items(api: str, data: JSON, name: str) -> list[JSON]:
    """The objects of the list `name` of an answer of `api` (WecomAnswerError if it is no list, or an item is not an
    object)."""
    value = data.get(name)
    if not isinstance(value, list):
        raise WecomAnswerError(f"WeCom {api}: {name} is not a list: the answer is not used", api, name)
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            what = "null" if item is None else type(item).__name__
            raise WecomAnswerError(
                f"WeCom {api}: {name}[{i}] is {what}, not an object: the answer is not used", api, f"{name}[{i}]"
            )
    return value


def ident(api: str, value: object, name: str) -> str:
    """An id an answer must carry (a string, or a number WeCom sent as one); WecomAnswerError if it is missing,
    empty or of another type."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    what = "missing" if value is None else "empty" if value == "" else f"a {type(value).__name__}"
    raise WecomAnswerError(f"WeCom {api}: {name} is {what}: the answer is not used", api, name)


def optional_list(api: str, value: object, name: str) -> None:
    """A list an item may leave out (a follow's `tag_id` or `tags`): absent or null is no items; anything but a list
    is a WecomAnswerError — read as no tags, a customer would lose the tag that keeps them out of a campaign."""
    if value is not None and not isinstance(value, list):
        raise WecomAnswerError(f"WeCom {api}: {name} is a {type(value).__name__}, not a list", api, name)


def id_list(api: str, data: JSON, name: str) -> list[str]:
    """A list of ids (`follow_user`): every one checked as `ident`."""
    value = data.get(name)
    if not isinstance(value, list):
        raise WecomAnswerError(f"WeCom {api}: {name} is not a list: the answer is not used", api, name)
    return [ident(api, v, f"{name}[{i}]") for i, v in enumerate(value)]


def next_cursor(api: str, data: JSON, seen: set[str]) -> str:
    """The `next_cursor` of a page ('' or absent: the last page), remembered in `seen`. A cursor that is not text,
    or one given before (the same page again: an endless loop), is a WecomAnswerError."""
    value = data.get("next_cursor")
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise WecomAnswerError(f"WeCom {api}: next_cursor is a {type(value).__name__}, not text", api, "next_cursor")
    if value in seen:
        raise WecomAnswerError(
            f"WeCom {api}: next_cursor {value[:40]!r} came back again (the same page twice): paging stopped",
            api,
            "next_cursor",
        )
    seen.add(value)
    return value


def follow_from_batch(info: object) -> JSON:
    """A `batch/get_by_user` item's `follow_info` in the shape wecast keeps (tag ids only)."""
    f = obj(info)
    return {
        "userid": text(f.get("userid")),
        "remark": text(f.get("remark")),
        "description": text(f.get("description")),
        "createtime": number(f.get("createtime")),
        "tag_ids": strings(f.get("tag_id")),
        "remark_corp_name": text(f.get("remark_corp_name")),
        "remark_mobiles": strings(f.get("remark_mobiles")),
        "oper_userid": text(f.get("oper_userid")),
        "add_way": number(f.get("add_way")),
        "state": text(f.get("state")),
    }


def follow_from_detail(item: object) -> JSON:
    """An `externalcontact/get` `follow_user` item in the same shape (its tags are objects; personal tags, type 2,
    have no id and are left out)."""
    f = obj(item)
    tags = [obj(t) for t in f.get("tags") or [] if isinstance(t, dict)]
    return follow_from_batch({**f, "tag_id": [t.get("tag_id") for t in tags if t.get("tag_id")]})


def contact_fields(contact: object) -> JSON:
    """The `external_contact` object, with the fields wecast uses, typed."""
    c = obj(contact)
    return {
        "external_userid": text(c.get("external_userid")),
        "name": text(c.get("name")),
        "avatar": text(c.get("avatar")),
        "type": number(c.get("type")),
        "gender": number(c.get("gender")),
        "unionid": text(c.get("unionid")),
        "position": text(c.get("position")),
        "corp_name": text(c.get("corp_name")),
        "corp_full_name": text(c.get("corp_full_name")),
    }


def _at(seconds: int) -> datetime | None:
    return datetime.fromtimestamp(seconds, UTC) if seconds > 0 else None


def merge(contact: JSON, follows: Sequence[JSON]) -> ContactRecord:
    """One customer with all of their follows (see the module docstring)."""
    ordered = sorted((f for f in follows if f.get("userid")), key=lambda f: (f.get("createtime") or 0, f["userid"]))
    lead = ordered[0] if ordered else {}
    tag_ids = sorted({t for f in ordered for t in f.get("tag_ids", [])})
    phones = list(dict.fromkeys(p for f in ordered for p in f.get("remark_mobiles", [])))
    added = [f["createtime"] for f in ordered if f.get("createtime")]
    info: JSON = {"follows": [{k: v for k, v in f.items() if k != "remark_mobiles"} for f in ordered]}
    if contact.get("unionid"):
        info["unionid"] = contact["unionid"]
    gender = contact.get("gender", 0)
    return ContactRecord(
        id=contact["external_userid"],
        name=contact.get("name", ""),
        alias=text(lead.get("remark")),
        avatar=contact.get("avatar", ""),
        gender=gender if gender in (0, 1, 2) else 0,
        corporation=contact.get("corp_full_name") or contact.get("corp_name") or text(lead.get("remark_corp_name")),
        title=contact.get("position", ""),
        phones=tuple(phones),
        description=text(lead.get("description")),
        friend=bool(ordered),
        type=contact.get("type", 0),
        additional_info=info,
        added_at=_at(min(added)) if added else None,
        tag_ids=tuple(tag_ids),
        follow_user_ids=tuple(f["userid"] for f in ordered),
    )


def from_detail(data: JSON) -> ContactRecord | None:
    """The answer of `externalcontact/get` (None when it names no customer)."""
    contact = contact_fields(data.get("external_contact"))
    if not contact["external_userid"]:
        return None
    follows = [follow_from_detail(f) for f in data.get("follow_user") or []]
    return merge(contact, follows)


def tags_from_groups(groups: Iterable[object]) -> list[TagRecord]:
    """`get_corp_tag_list`'s tag groups -> tags (corporate, type 2), deleted ones left out, in WeCom's order
    (larger `order` first)."""
    out: list[tuple[int, int, TagRecord]] = []
    for g in groups:
        group = obj(g)
        if group.get("deleted") is True:
            continue
        for t in group.get("tag") or []:
            tag = obj(t)
            if tag.get("deleted") is True or not text(tag.get("id")):
                continue
            record = TagRecord(text(tag.get("id")), text(tag.get("name")), text(group.get("group_name")), 2)
            out.append((-number(group.get("order")), -number(tag.get("order")), record))
    return [record for *_, record in sorted(out, key=lambda x: (x[0], x[1]))]
