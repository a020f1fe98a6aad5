"""Contacts and tags: the gateway's customer list as synced, read for planning, listing and the API.

A sync writes page by page (`upsert_contacts`), each page one transaction, and is recorded as a generation in
`contact_syncs` (`begin_sync` … `finish_sync`): the list is whole when its latest sync finished. The writes are
safe when two processes sync at once (they insert the same new contacts and tags: conflicts update, never fail).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pydantic_core
from sqlalchemy import ColumnElement, String, and_, cast, delete, event, func, or_, select, update
from sqlalchemy.engine import Connection

from storage._sql import (
    DB,
    aware,
    chunks,
    db_time,
    dbapi_cursor,
    decode_json,
    insert_fast,
    insert_ignore,
    reading,
    serialize,
    upsert,
    writing,
)
from storage.models import CONTACT_SYNCS, CONTACT_TAGS, CONTACTS, TAGS

_C = CONTACTS.c
_T = TAGS.c
_CT = CONTACT_TAGS.c
_S = CONTACT_SYNCS.c
CONTACT_COLUMNS = tuple(c.name for c in CONTACTS.columns)

# A contact as planning reads it: its columns by name (only those asked for), plus `tags` (a frozenset of tag
# names and ids, for rules) and `tags_named` (tag names, for templates). A mapping, not a class, because
# audience rules and templates address fields by the names users write in campaign files.
ContactView = dict[str, Any]


@dataclass(frozen=True, slots=True)
class TagRow:
    id: str
    name: str
    group_name: str = ""
    type: int = 0  # 1 personal, 2 corporate


@dataclass(frozen=True, slots=True)
class TagCount:
    """A tag and how many (not removed) contacts have it."""

    id: str
    name: str
    group_name: str
    type: int
    contacts: int


@dataclass(frozen=True, slots=True)
class ContactRow:
    """One contact with every column (see `storage.models.Contact`). `tags` (id, name) pairs are filled when
    read for a page."""

    id: str
    name: str = ""
    alias: str = ""
    avatar: str = ""
    gender: int = 0
    city: str = ""
    province: str = ""
    address: str = ""
    corporation: str = ""
    title: str = ""
    phones: tuple[str, ...] = ()
    weixin: str = ""
    description: str = ""
    signature: str = ""
    friend: bool = False
    coworker: bool = False
    star: bool = False
    type: int = 0
    real_name: str = ""
    aka: str = ""
    additional_info: dict[str, Any] = field(default_factory=dict)
    corp_id: str = ""
    tag_ids: tuple[str, ...] = ()
    follow_user_ids: tuple[str, ...] = ()
    added_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    removed_at: datetime | None = None
    tags: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ContactFilter:
    """Which contacts a page lists (all conditions must hold; removed contacts never appear)."""

    ids: Sequence[str] = ()  # only these
    tags_all: Sequence[str] = ()  # has every one of these tags (names or ids)
    tags_any: Sequence[str] = ()  # has at least one of these
    city: str | None = None
    province: str | None = None
    gender: int | None = None
    friend: bool | None = None
    coworker: bool | None = None
    star: bool | None = None
    text: str | None = None  # in name, alias (the remark), real name or a phone number


@dataclass(frozen=True, slots=True)
class ContactsPage:
    rows: list[ContactRow]
    total: int
    has_next: bool
    next_cursor: str | None
    # The latest contact sync as the page's own transaction read it (None: never synced): whether the list the page
    # came from was whole, without asking the database again (see `engine.contacts.list_state_of`).
    latest_sync: SyncRow | None = None


# -- sync ---------------------------------------------------------------------------------------------


def upsert_tags(db: DB, tags: Sequence[TagRow]) -> None:
    """Insert new tags and update the names and groups of known ones."""
    if not tags:
        return
    with writing(db) as conn:
        serialize(conn, _SYNC_LOCK)
        unique = {t.id: dataclasses.asdict(t) for t in tags}
        upsert(conn, TAGS, list(unique.values()), ("id",))
        changed(conn)


# Two processes syncing at once write the same rows: on PostgreSQL their page transactions take turns (on SQLite
# writers always do), so neither deadlocks on the other's rows.
_SYNC_LOCK = "wecast-contacts"


_SYNCED = [
    f.name for f in dataclasses.fields(ContactRow) if f.name not in ("created_at", "updated_at", "removed_at", "tags")
]


def _columns(c: ContactRow) -> dict[str, Any]:
    values = {name: getattr(c, name) for name in _SYNCED}
    values["phones"] = list(c.phones)
    values["tag_ids"] = list(c.tag_ids)
    values["follow_user_ids"] = list(c.follow_user_ids)
    values["additional_info"] = dict(c.additional_info)
    return values


_JSON_COLUMNS = frozenset({"phones", "tag_ids", "follow_user_ids", "additional_info"})
_TIME_COLUMNS = frozenset({"added_at", "created_at", "updated_at", "removed_at"})


def _insert_new(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Contacts new to the database, through the driver's bulk path (`insert_fast`: COPY on PostgreSQL; a first
    sync of a big account is all new rows). Should a writer outside the sync have added one of them since they
    were read, they all go through the upsert instead: the same values, none lost."""
    columns = list(rows[0])

    def plain(column: str, value: Any) -> Any:
        if column in _JSON_COLUMNS:
            return json.dumps(value, ensure_ascii=False)
        return db_time(conn, value) if column in _TIME_COLUMNS else value

    values = [tuple(plain(c, row[c]) for c in columns) for row in rows]
    if insert_fast(conn, CONTACTS, values, columns) < len(rows):
        upsert(conn, CONTACTS, rows, ("id",))


def upsert_contacts(db: DB, contacts: Sequence[ContactRow], now: datetime) -> tuple[int, int]:
    """Insert or update contacts (a page of a sync) and replace their tag links; tag ids not known as tags
    are dropped. A contact seen again is no longer removed. Returns (added, updated)."""
    if not contacts:
        return 0, 0
    with writing(db) as conn:
        serialize(conn, _SYNC_LOCK)
        known = {r.id for r in conn.execute(select(_T.id))}
        fresh = [_columns(c) for c in contacts]
        for values in fresh:
            values["tag_ids"] = sorted(t for t in dict.fromkeys(values["tag_ids"]) if t in known)
        ids = [v["id"] for v in fresh]
        existing: dict[str, dict[str, Any]] = {}
        for part in chunks(ids):
            for row in conn.execute(select(CONTACTS).where(_C.id.in_(part))):
                existing[row.id] = dict(row._mapping)
        compared = [f for f in _SYNCED if f != "added_at"]
        new_rows, updated = [], []
        for values in fresh:
            old = existing.get(values["id"])
            if old is None:
                new_rows.append({**values, "created_at": now, "updated_at": now, "removed_at": None})
            elif (
                any(old.get(f) != values.get(f) for f in compared)
                or old.get("removed_at")
                or (values.get("added_at") and old.get("added_at") != values.get("added_at"))
            ):
                updated.append(values)
        if new_rows:
            _insert_new(conn, new_rows)
        if updated:  # every synced column of a changed contact, in one statement (its created_at kept)
            upsert(conn, CONTACTS, [{**v, "updated_at": now, "removed_at": None} for v in updated], ("id",))
        for part in chunks(ids):
            conn.execute(delete(CONTACT_TAGS).where(_CT.contact_id.in_(part)))
        links = [(v["id"], t) for v in fresh for t in v["tag_ids"]]
        insert_fast(conn, CONTACT_TAGS, links, ("contact_id", "tag_id"))
        changed(conn)
    return len(new_rows), len(updated)


def follow_users(db: DB, ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The staff members who follow each of these contacts, the leading one first (contacts without any, or unknown,
    are left out)."""
    out: dict[str, tuple[str, ...]] = {}
    with reading(db) as conn:
        for part in chunks(list(ids)):
            for contact_id, follows in conn.execute(select(_C.id, _C.follow_user_ids).where(_C.id.in_(part))):
                users = tuple(decode_json(follows) if isinstance(follows, str) else follows or ())
                if users:
                    out[contact_id] = users
    return out


def unlisted(db: DB, seen_ids: set[str]) -> list[str]:
    """The contacts (not removed yet) that are not among `seen_ids`: those a sync no longer found."""
    with reading(db) as conn:
        current = {r.id for r in conn.execute(select(_C.id).where(_C.removed_at.is_(None)))}
    return sorted(current - seen_ids)


def mark_gone(db: DB, ids: Sequence[str], now: datetime) -> int:
    """These contacts are no longer in the gateway's list (a refresh found them gone): marked removed."""
    with writing(db) as conn:
        serialize(conn, _SYNC_LOCK)
        gone = 0
        for part in chunks(ids):
            gone += (
                conn.execute(
                    update(CONTACTS)
                    .where(_C.id.in_(part), _C.removed_at.is_(None))
                    .values(removed_at=now, updated_at=now)
                ).rowcount
                or 0
            )
        if gone:
            changed(conn)
    return gone


@dataclass(frozen=True, slots=True)
class SyncRow:
    """One contact sync (see `storage.models.ContactSync`)."""

    id: int
    owner: str
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    seen: int

    @property
    def finished(self) -> bool:
        return self.finished_at is not None


def latest_sync(db: DB) -> SyncRow | None:
    """The most recent sync (finished or not), or None when the list was never synced. Read through the driver's
    cursor: every /get-all-user asks (is the list whole?), and so does every contact page (its version)."""
    with reading(db) as conn:
        return _latest_sync(conn)


_LATEST_SYNC = (
    "SELECT id, owner, started_at, heartbeat_at, finished_at, seen FROM contact_syncs ORDER BY id DESC LIMIT 1"
)


def _latest_sync(conn: Connection) -> SyncRow | None:
    with dbapi_cursor(conn) as cursor:
        cursor.execute(_LATEST_SYNC)
        row = cursor.fetchone()
    if row is None:
        return None
    sync_id, owner, started, beat, finished, seen = row
    return SyncRow(int(sync_id), owner, aware(started), aware(beat), aware(finished), int(seen))


def ever_synced(db: DB) -> bool:
    """Whether any sync finished: the first one to finish is the baseline of the customer events."""
    with reading(db) as conn:
        return conn.execute(select(_S.id).where(_S.finished_at.is_not(None)).limit(1)).first() is not None


def begin_sync(db: DB, owner: str, now: datetime, *, after: int) -> SyncRow | None:
    """Start the sync after generation `after` (0 for the first) for `owner` — unless another process started that
    generation first (its key is taken): then None."""
    started = SyncRow(after + 1, owner, now, now, None, 0)
    with writing(db) as conn:
        if not insert_ignore(conn, CONTACT_SYNCS, [dataclasses.asdict(started)]):
            return None
    return started


def sync_heartbeat(db: DB, sync_id: int, now: datetime) -> None:
    """The sync's owner is alive (a stale heartbeat lets another process sync instead)."""
    with writing(db) as conn:
        conn.execute(update(CONTACT_SYNCS).where(_S.id == sync_id).values(heartbeat_at=now))


def abandon_sync(db: DB, sync_id: int) -> None:
    """The sync stopped before its end (an error): it has no owner any more, so the next sync need not wait for
    it. It stays unfinished: the list it leaves is not whole."""
    with writing(db) as conn:
        conn.execute(update(CONTACT_SYNCS).where(_S.id == sync_id, _S.finished_at.is_(None)).values(owner=""))


def finish_sync(db: DB, sync_id: int, seen: int, now: datetime) -> None:
    """The sync wrote every page and marked the contacts it no longer found: the list is whole (if it is the
    latest sync)."""
    with writing(db) as conn:
        conn.execute(update(CONTACT_SYNCS).where(_S.id == sync_id).values(finished_at=now, heartbeat_at=now, seen=seen))


# -- planning -----------------------------------------------------------------------------------------

_DECODERS: dict[str, Callable[[Any], Any]] = {
    "phones": decode_json,
    "follow_user_ids": decode_json,
    "additional_info": decode_json,
    "added_at": aware,
    "created_at": aware,
    "updated_at": aware,
    "removed_at": aware,
    "friend": bool,
    "coworker": bool,
    "star": bool,
}


# Contacts per step of a streamed read (planning): enough that each query's fixed cost is small beside its rows,
# few enough that a step's views, texts and insert batch stay a few megabytes whatever the audience.
VIEW_CHUNK = 5_000


class _Views:
    """Reads contact rows as views (see `ContactView`) on one connection: the SELECT of the asked columns, and the
    conversion of its rows (JSON and time columns decoded; each distinct tag list decoded once, since most contacts
    share their tag combination with many others)."""

    def __init__(self, conn: Connection, columns: Iterable[str] | None, include_removed: bool) -> None:
        asked = None if columns is None else set(columns)
        self.wanted = [c for c in CONTACT_COLUMNS if c != "tag_ids" and (asked is None or c in asked or c == "id")]
        self.pg = conn.dialect.name == "postgresql"
        self.mark = "%s" if self.pg else "?"
        # The tag list as its JSON text on every backend (no decode and re-encode of PostgreSQL's jsonb).
        tags = "tag_ids::text" if self.pg else "tag_ids"
        self.select = f"SELECT {', '.join(self.wanted)}, {tags} FROM contacts WHERE "
        self.select += "TRUE" if include_removed else "removed_at IS NULL"
        self.make = _view_maker(self.wanted)
        self.tag_name = {r[0]: r[1] for r in conn.exec_driver_sql("SELECT id, name FROM tags")}
        self.combos: dict[str | None, tuple[frozenset[str], tuple[str, ...]]] = {None: (frozenset(), ())}

    def convert(self, rows: Iterable[Sequence[Any]]) -> list[ContactView]:
        make, combos, n = self.make, self.combos, len(self.wanted)
        out: list[ContactView] = []
        append = out.append
        for row in rows:
            joined = row[n]
            combo = combos.get(joined)
            if combo is None:
                tag_ids = sorted(decode_json(joined) or ())
                named = tuple(self.tag_name[t] for t in tag_ids if t in self.tag_name)
                combo = combos[joined] = (frozenset(named).union(tag_ids), named)
            append(make(row, combo))
        return out


_MAKERS: dict[tuple[str, ...], Callable[[Sequence[Any], tuple[frozenset[str], tuple[str, ...]]], ContactView]] = {}


def _view_maker(
    columns: Sequence[str],
) -> Callable[[Sequence[Any], tuple[frozenset[str], tuple[str, ...]]], ContactView]:
    """A function making the view of one row of these columns (then the tag list) and its tags: one dict display,
    `{"id": row[0], "friend": bool(row[5]), ..., "tags": combo[0], "tags_named": combo[1]}`, generated once per
    column set (like `collections.namedtuple`'s methods; the names are the table's own, never input). A plan makes
    100,000 views: half the time of filling each dict column by column."""
    key = tuple(columns)
    maker = _MAKERS.get(key)
    if maker is None:
        if not set(key) <= set(CONTACT_COLUMNS):  # pragma: no cover - `_Views` asks for the table's columns only
            raise ValueError(f"not contact columns: {key!r}")
        scope: dict[str, Any] = {}
        items = []
        for i, name in enumerate(key):
            if name in _DECODERS:
                scope[f"_{name}"] = _DECODERS[name]
                items.append(f"{name!r}: _{name}(row[{i}])")
            else:
                items.append(f"{name!r}: row[{i}]")
        source = f"def view(row, combo):\n    return {{{', '.join(items)}, 'tags': combo[0], 'tags_named': combo[1]}}\n"
        exec(compile(source, f"<contact view {len(key)} columns>", "exec"), scope)  # the names: see above
        maker = _MAKERS[key] = scope["view"]
    return maker


def contact_view_chunks(
    db: DB, *, columns: Iterable[str] | None = None, include_removed: bool = False, chunk: int = VIEW_CHUNK
) -> Iterator[list[ContactView]]:
    """Contacts as views, in id order (the database's), `chunk` at a time: each chunk is one keyset query (the ids
    after the last one read), so memory is bounded by the chunk, not the contact list. Read inside a caller's
    transaction (`storage.db.snapshot` or `transaction`), the chunks are one consistent snapshot.

    `columns` limits what is read (planning reads only the fields the audience and the template use); `id` is
    always included. Rows come through the DB-API cursor, not the ORM: this is the hot path of planning."""
    with reading(db) as conn:
        views = _Views(conn, columns, include_removed)
        first = f"{views.select} ORDER BY id LIMIT {int(chunk)}"
        after = f"{views.select} AND id > {views.mark} ORDER BY id LIMIT {int(chunk)}"
        with dbapi_cursor(conn) as cursor:
            last: str | None = None
            while True:
                if last is None:
                    cursor.execute(first)
                else:
                    cursor.execute(after, (last,))
                # Row by row off the cursor: no list of the chunk's rows beside its views (fewer objects alive
                # at once: fewer runs of the garbage collector).
                out = views.convert(cursor)  # type: ignore[arg-type]  # a DB-API cursor iterates its rows
                if not out:
                    return
                last = out[-1]["id"]
                yield out
                if len(out) < chunk:
                    return


def load_contact_views(
    db: DB, *, include_removed: bool = False, columns: Iterable[str] | None = None, ids: Sequence[str] | None = None
) -> list[ContactView]:
    """Contacts as views (see `contact_view_chunks`) — every one, or only `ids` — ordered by id in code point
    order (the same on every backend, so `limit` always keeps the same contacts)."""
    if ids is None:
        out = [v for views in contact_view_chunks(db, columns=columns, include_removed=include_removed) for v in views]
    else:
        out = []
        with reading(db) as conn:
            reader = _Views(conn, columns, include_removed)
            for part in chunks(sorted(set(ids))):
                marks = ", ".join([reader.mark] * len(part))
                rows = conn.exec_driver_sql(f"{reader.select} AND id IN ({marks})", tuple(part)).fetchall()
                out += reader.convert(rows)
    out.sort(key=lambda v: v["id"])
    return out


def tag_names(db: DB) -> list[str]:
    """Every tag name, by group then name."""
    with reading(db) as conn:
        return [r.name for r in conn.execute(select(_T.name).order_by(_T.group_name, _T.name))]


def tag_keys(db: DB) -> set[str]:
    """Every tag id and tag name (what a user may write to name a tag)."""
    with reading(db) as conn:
        return {key for row in conn.execute(select(_T.id, _T.name)) for key in row}


def tags_with_counts(db: DB) -> list[TagCount]:
    """Every tag with how many contacts (not removed) have it, by group then name."""
    with reading(db) as conn:
        counts: dict[str, int] = {
            tag_id: int(n)
            for tag_id, n in conn.execute(
                select(_CT.tag_id, func.count())
                .join(CONTACTS, _C.id == _CT.contact_id)
                .where(_C.removed_at.is_(None))
                .group_by(_CT.tag_id)
            )
        }
        rows = conn.execute(select(TAGS).order_by(_T.group_name, _T.name)).all()
    return [TagCount(r.id, r.name, r.group_name, r.type, counts.get(r.id, 0)) for r in rows]


# -- listing ------------------------------------------------------------------------------------------


def count_contacts(db: DB) -> int:
    """How many contacts are synced (not removed): counted once per version of the list (see `page_contacts`)."""
    with reading(db) as conn:
        return _index(conn, ContactFilter(), _latest_sync(conn)).total


def _has_tag(names: Sequence[str]) -> ColumnElement[bool]:
    """Contacts having any of these tags (by name or id)."""
    tagged = select(_CT.contact_id).join(TAGS, _T.id == _CT.tag_id).where(or_(_T.name.in_(names), _T.id.in_(names)))
    return _C.id.in_(tagged)


def _conditions(f: ContactFilter) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = [_C.removed_at.is_(None)]
    if f.ids:
        conds.append(_C.id.in_(list(f.ids)))
    conds += [_has_tag([t]) for t in f.tags_all]
    if f.tags_any:
        conds.append(_has_tag(list(f.tags_any)))
    for column, value in (
        (_C.city, f.city),
        (_C.province, f.province),
        (_C.gender, f.gender),
        (_C.friend, f.friend),
        (_C.coworker, f.coworker),
        (_C.star, f.star),
    ):
        if value is not None:
            conds.append(column == value)
    if f.text:
        pattern = f"%{f.text}%"
        conds.append(
            or_(
                _C.name.like(pattern),
                _C.alias.like(pattern),
                _C.real_name.like(pattern),
                cast(_C.phones, String).like(pattern),  # the JSON text of the list: digits match as typed
            )
        )
    return conds


def page_contacts(
    db: DB, where: ContactFilter, *, limit: int, offset: int = 0, cursor: str | None = None
) -> ContactsPage:
    """One page of contacts by id: after `cursor` (the last id of the previous page) or at `offset`, with
    their tags and the total that match.

    Every page costs about the same, the first or the thousandth: the total and the page anchors (`_Index`) are
    counted once per version of the contact list (see `changed`), and a page at an offset starts from the anchor
    before it (a keyset condition), so the database skips fewer than `ANCHOR_EVERY` rows, never `offset` rows.
    The page is read through the driver's cursor (the filter built and compiled once, its rows made into
    `ContactRow`s by position). `page_contacts_json` is the same page as the API writes it."""
    with reading(db) as conn:
        at = _page_at(conn, where, limit + 1, offset, cursor)
        rows: Sequence[Any] = []
        if not at.past_end:
            with dbapi_cursor(conn) as raw:
                raw.execute(f"SELECT {_ROW_COLUMNS} FROM contacts WHERE {at.clause} {at.window}", at.args)
                rows = raw.fetchall()
        more, rows = len(rows) > limit, rows[:limit]
        tags = _tags_of(conn, [r[0] for r in rows])
    return ContactsPage(
        rows=[_page_row(r, tags[r[0]]) for r in rows],
        total=at.total,
        has_next=more,
        next_cursor=rows[-1][0] if more and rows else None,
        latest_sync=at.latest,
    )


@dataclass(frozen=True, slots=True)
class JsonPage:
    """A page of contacts as the API writes it: `items` is the UTF-8 JSON array of their `ContactView` objects
    (the same values as `ContactView.from_row` of each `ContactRow`; tests/test_contact_pages.py checks); the rest as
    `ContactsPage`."""

    items: bytes
    total: int
    has_next: bool
    next_cursor: str | None
    latest_sync: SyncRow | None = None


def page_contacts_json(
    db: DB, where: ContactFilter, *, limit: int, offset: int = 0, cursor: str | None = None
) -> JsonPage:
    """`page_contacts` as the API writes it, written by the database itself: each contact's JSON object
    (SQLite's `json_object`, PostgreSQL's `json_build_object`, its tags aggregated beside it) and the page's array of
    them come back as one value of one row. The hot path of /get-all-user and /api/v1/contacts: no row, dict or
    serializer per contact in Python, and a page is three or four steps of the driver, not one per contact (each
    step lets the GIL go, and a worker thread that takes it back from a busy event loop a few dozen times per page
    cost more than the page itself)."""
    with reading(db) as conn:
        at = _page_at(conn, where, limit, offset, cursor)
        items, count, last = "[]", 0, None
        with dbapi_cursor(conn) as raw:
            if at.past_end:
                pass
            elif conn.dialect.name == "sqlite":
                raw.execute(_SQLITE_JSON_PAGE.replace("{clause}", at.clause).replace("{window}", at.window), at.args)
                items, count, last = raw.fetchall()[0]
            else:
                # PostgreSQL: the page's ids, then their objects. Its plan for a LIMIT and OFFSET given as
                # parameters is a fresh one each time (a generic one scans the whole table); planned each time, the
                # objects' long statement cost more than reading them, while by ids its generic plan, made once, is
                # the right one.
                raw.execute(f"SELECT contacts.id FROM contacts WHERE {at.clause} {at.window}", at.args)
                ids = [row[0] for row in raw.fetchall()]
                if ids:
                    raw.execute(_PG_JSON_PAGE, (ids,))
                    (items,) = raw.fetchall()[0]
                    count, last = len(ids), ids[-1]
            if cursor or not offset:  # whether a contact follows the page's last, read (by offset: counted already)
                more = count == limit and last is not None and _follows(raw, conn, where, last)
            else:
                more = offset + count < at.total
        # Ended in a commit, not the rollback SQLAlchemy would give it: psycopg forgets (and deallocates) every
        # statement it prepared on the connection at a ROLLBACK, and PostgreSQL would plan the page's statements
        # afresh every time. (Only here: with every read ending so, dispatch's statements were prepared too, and
        # their generic plans halved PostgreSQL's dispatch, 2,500 -> 1,700 deliveries/s.)
        conn.commit()
    return JsonPage(
        items=items.encode(),
        total=at.total,
        has_next=more,
        next_cursor=last if more else None,
        latest_sync=at.latest,
    )


@dataclass(frozen=True, slots=True)
class _PageAt:
    """Where a page starts, in one version of the list: the filter's clause with the keyset condition, its
    parameters with the window's, and the window (`ORDER BY id LIMIT … OFFSET …`); `past_end` when an offset lies
    beyond the list."""

    latest: SyncRow | None
    total: int
    clause: str
    args: _Args
    window: str
    past_end: bool


def _page_at(conn: Connection, where: ContactFilter, rows: int, offset: int, cursor: str | None) -> _PageAt:
    """The start of a page of `rows` rows after `cursor` or at `offset`, in `conn`'s transaction: from the anchor
    before the offset (see `page_contacts`)."""
    latest = _latest_sync(conn)
    index = _index(conn, where, latest)
    clause, args = _where(conn, where)
    start, skip = cursor, 0
    if not cursor and offset:
        if offset >= index.total:
            return _PageAt(latest, index.total, clause, args, "", past_end=True)
        anchor = min(offset // ANCHOR_EVERY, len(index.anchors) - 1)
        start, skip = index.anchors[anchor], offset - anchor * ANCHOR_EVERY
    if start is not None:
        clause += f" AND contacts.id {'>' if cursor else '>='} " + _mark(conn, "page_from")
        args = _with(args, "page_from", start)
    # The limit and the skip are parameters: one statement text for every page, which the drivers prepare once.
    window = f"ORDER BY contacts.id LIMIT {_mark(conn, 'page_limit')} OFFSET {_mark(conn, 'page_skip')}"
    args = _with(_with(args, "page_limit", int(rows)), "page_skip", int(skip))
    return _PageAt(latest, index.total, clause, args, window, past_end=False)


def _follows(raw: Any, conn: Connection, where: ContactFilter, last: str) -> bool:
    clause, args = _where(conn, where)
    raw.execute(
        f"SELECT 1 FROM contacts WHERE {clause} AND contacts.id > {_mark(conn, 'page_from')} LIMIT 1",
        _with(args, "page_from", last),
    )
    return raw.fetchone() is not None


# `ContactView`'s JSON keys but its tags and added time, in its order, each with its column and what kind of value
# that column holds for JSON: text and numbers as they are, JSON text, a boolean.
_JSON_FIELDS = (
    ("id", "id", ""), ("handle", "id", ""), ("name", "name", ""), ("alias", "alias", ""), ("avatar", "avatar", ""),
    ("gender", "gender", ""), ("city", "city", ""), ("province", "province", ""), ("address", "address", ""),
    ("corporation", "corporation", ""), ("title", "title", ""), ("phone", "phones", "json"),
    ("weixin", "weixin", ""), ("description", "description", ""), ("signature", "signature", ""),
    ("friend", "friend", "bool"), ("coworker", "coworker", "bool"), ("star", "star", "bool"), ("type", "type", ""),
    ("realName", "real_name", ""), ("aka", "aka", ""), ("additionalInfo", "additional_info", "json"),
    ("corpId", "corp_id", ""),
)  # fmt: skip
_TAGGED = "FROM contact_tags ct JOIN tags t ON t.id = ct.tag_id WHERE ct.contact_id = contacts.id"


def _json_object(dialect: str) -> str:
    """A contact's `ContactView` JSON object, as an expression over its row: the database's JSON object of its
    columns (its last value a string, so its text ends with `"}`), then its tags' names and ids (one pass over its
    tags, in `_tags_of`'s order: SQLite aggregates the rows in the order its subquery gives them) and its added time
    as pydantic writes a time (ISO 8601, UTC as Z, no fraction when it is zero)."""
    sqlite = dialect == "sqlite"
    values = []
    for key, column, kind in _JSON_FIELDS:
        value = f"contacts.{column}"
        if kind == "json" and sqlite:
            value = f"json({value})"  # (PostgreSQL's json columns go in as JSON already)
        elif kind == "bool" and sqlite:
            value = f"json(CASE WHEN {value} THEN 'true' ELSE 'false' END)"
        values.append(f"'{key}', {value}")
    added = "contacts.added_at"
    if sqlite:
        obj = f"json_object({', '.join(values)})"
        tags = (
            """(SELECT json_group_array(name) || ',"tagIds":' || json_group_array(id) """
            f"FROM (SELECT t.name, t.id {_TAGGED} ORDER BY t.group_name, t.name))"
        )
        # SQLAlchemy's text ('2026-01-02 03:04:05.000006', naive UTC); another text as SQLite reads it
        when = (
            f"CASE WHEN {added} IS NULL THEN 'null' "
            f"WHEN length({added}) = 26 AND substr({added}, 20, 7) = '.000000' "
            f"""THEN '"' || substr({added}, 1, 10) || 'T' || substr({added}, 12, 8) || 'Z"' """
            f"""WHEN length({added}) = 26 THEN '"' || substr({added}, 1, 10) || 'T' || substr({added}, 12) || 'Z"' """
            f"""ELSE coalesce('"' || strftime('%Y-%m-%dT%H:%M:%SZ', {added}) || '"', 'null') END"""
        )
    else:
        obj = f"json_build_object({', '.join(values)})::text"
        ordered = "ORDER BY t.group_name, t.name), '[]'::json)::text"
        tags = (
            f"""(SELECT coalesce(json_agg(t.name {ordered} || ',"tagIds":' || coalesce(json_agg(t.id {ordered} """
            f"{_TAGGED})"
        )
        when = (  # a naive UTC timestamp
            f"CASE WHEN {added} IS NULL THEN 'null' "
            f"""WHEN date_trunc('second', {added}) = {added} THEN '"' || to_char({added}, 'YYYY-MM-DD"T"HH24:MI:SS') """
            f"""|| 'Z"' ELSE '"' || to_char({added}, 'YYYY-MM-DD"T"HH24:MI:SS.US') || 'Z"' END"""
        )
    return f"""rtrim({obj}, '}}') || ',"tags":' || {tags} || ',"addedAt":' || {when} || '}}'"""


# `page_contacts_json`'s statements. SQLite's, its {clause} and {window} to fill with the filter's and the page's:
# one row of (the page's JSON array, how many contacts, the last one's id). PostgreSQL's: the JSON array of the
# contacts of a list of ids.
_SQLITE_JSON_PAGE = (
    "SELECT '[' || coalesce(group_concat(obj, ','), '') || ']', count(*), max(id) FROM ("
    f"SELECT contacts.id AS id, {_json_object('sqlite')} AS obj FROM contacts WHERE {{clause}} {{window}})"
)
_PG_JSON_PAGE = (
    "SELECT '[' || coalesce(string_agg(obj, ',' ORDER BY id), '') || ']' FROM ("
    f"SELECT contacts.id AS id, {_json_object('postgresql')} AS obj FROM contacts WHERE contacts.id = ANY(%s)) page"
)


# A page's columns are ContactRow's fields in their order (all but `tags`, read beside them): a row becomes a
# ContactRow by position, its few typed columns converted in place.
_PAGE_FIELDS = tuple(f.name for f in dataclasses.fields(ContactRow) if f.name != "tags")
_ROW_COLUMNS = ", ".join(_PAGE_FIELDS)
_KNOWN_LISTS: dict[str, tuple[str, ...]] = {"[]": ()}
_KNOWN_LISTS_KEPT = 4096


def _page_json(value: Any) -> Any:
    """A JSON column of a page row: text on SQLite, parsed by pydantic's parser (several times faster than the
    standard library's, the same values; the standard library's for what it refuses: a lone surrogate escape);
    decoded already on PostgreSQL."""
    if not isinstance(value, str):
        return value
    try:
        return pydantic_core.from_json(value)
    except ValueError:
        return json.loads(value)


def _json_tuple(value: Any) -> tuple[str, ...]:
    """A JSON list column (phones, tag ids, the users a contact follows) as a tuple. Its JSON text decoded once
    while it repeats (most contacts share their tags and followers with many others; empty lists are most
    phones); on PostgreSQL the driver decoded it already."""
    if not isinstance(value, str):
        return tuple(value or ())
    found = _KNOWN_LISTS.get(value)
    if found is None:
        found = tuple(_page_json(value) or ())
        if len(_KNOWN_LISTS) >= _KNOWN_LISTS_KEPT:
            _KNOWN_LISTS.clear()
            _KNOWN_LISTS["[]"] = ()
        _KNOWN_LISTS[value] = found
    return found


def _json_dict(value: Any) -> dict[str, Any]:
    """The extra-info column as a dict of its own (a fresh one each row: the caller may change it)."""
    if value == "{}" or value is None:
        return {}
    return _page_json(value) or {}


_PAGE_DECODERS: list[tuple[int, Callable[[Any], Any]]] = [
    (i, {"phones": _json_tuple, "tag_ids": _json_tuple, "follow_user_ids": _json_tuple, "additional_info": _json_dict}
     .get(name) or _DECODERS[name])
    for i, name in enumerate(_PAGE_FIELDS)
    if name in _DECODERS or name == "tag_ids"
]  # fmt: skip
_Args = tuple[Any, ...] | dict[str, Any]


def _page_row(row: Sequence[Any], tags: list[tuple[str, str]]) -> ContactRow:
    values = list(row)
    for i, fn in _PAGE_DECODERS:
        values[i] = fn(values[i])
    values.append(tuple(tags))
    return ContactRow(*values)


def _mark(conn: Connection, name: str) -> str:
    return f"%({name})s" if conn.dialect.paramstyle == "pyformat" else "?"


def _with(args: _Args, name: str, value: Any) -> _Args:
    return {**args, name: value} if isinstance(args, dict) else (*args, value)


_WHERE_KEPT = 256
_wheres: OrderedDict[tuple[str, tuple[Any, ...]], tuple[str, _Args]] = OrderedDict()


def _where(conn: Connection, where: ContactFilter) -> tuple[str, _Args]:
    """The filter's conditions as the driver's SQL and parameters (built and compiled by SQLAlchemy once per
    filter)."""
    key = (conn.dialect.name, _filter_key(where))
    with _lock:
        found = _wheres.get(key)
    if found is not None:
        return found
    compiled = and_(*_conditions(where)).compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    params = compiled.construct_params()
    args: _Args = tuple(params[name] for name in compiled.positiontup or ()) if compiled.positional else dict(params)
    made = (compiled.string, args)
    with _lock:
        _wheres[key] = made
        while len(_wheres) > _WHERE_KEPT:
            _wheres.popitem(last=False)
    return made


# -- the listing index: how many contacts a filter matches, and where its pages start ---------------------

# A page at an offset starts from the id at the anchor before it: one anchor every this many contacts (a 1,000,000
# contact list keeps 5,000 ids; a page skips at most this many rows).
ANCHOR_EVERY = 200
# Indexes kept, over every database (the filters the API and the console were asked for lately).
INDEXES_KEPT = 64


@dataclass(frozen=True, slots=True)
class _Index:
    """What a filter matches in one version of the contact list: how many, and the id at every ANCHOR_EVERY-th
    position (by id)."""

    total: int
    anchors: tuple[str, ...]


_ListVersion = tuple[int, Any]  # (writes seen by this process, the latest sync as the database has it)
_lock = threading.Lock()
_writes: dict[str, int] = {}  # database -> contact writes this process made there
_indexes: OrderedDict[tuple[str, tuple[Any, ...]], tuple[_ListVersion, _Index]] = OrderedDict()
_CHANGED = "wecast_contacts_changed"


def _database(db: DB) -> str:
    return db.engine.url.render_as_string(hide_password=True)


def changed(conn: Connection) -> None:
    """The caller's transaction changed contacts, their tags or tag names: the totals and page anchors counted
    before it are stale. Counted now and again when the connection goes back to the pool (after its commit or
    rollback), so an index counted while the transaction was open is never taken for the committed list.

    Writes by another process are seen at its next sync (a sync's pages and its finish change `contact_syncs`,
    which is part of every version): cached until the next sync, as the listing promises."""
    key = _database(conn)
    _bump(key)
    engine = conn.engine
    if not event.contains(engine, "checkin", _on_checkin):
        event.listen(engine, "checkin", _on_checkin)
    conn.connection.info[_CHANGED] = key


def _bump(key: str) -> None:
    with _lock:
        _writes[key] = _writes.get(key, 0) + 1


def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
    key = record.info.pop(_CHANGED, None) if record is not None else None
    if key is not None:
        _bump(key)


_FILTER_FIELDS = tuple(f.name for f in dataclasses.fields(ContactFilter))


def _filter_key(where: ContactFilter) -> tuple[Any, ...]:
    """The filter as a hashable key (its lists as tuples; not `dataclasses.astuple`, which deep-copies)."""
    return tuple(tuple(v) if isinstance(v, list | tuple) else v for v in map(where.__getattribute__, _FILTER_FIELDS))


def _index(conn: Connection, where: ContactFilter, latest: SyncRow | None) -> _Index:
    """The filter's total and anchors in the contact list's current version (`latest`: its latest sync, read in
    `conn`'s transaction): cached, counted when missing."""
    database = _database(conn)
    with _lock:
        writes = _writes.get(database, 0)
    version: _ListVersion = (writes, latest)
    key = (database, _filter_key(where))
    if not where.ids:  # a lookup by ids is cheap to count and rarely asked twice
        with _lock:
            found = _indexes.get(key)
            if found is not None and found[0] == version:
                _indexes.move_to_end(key)
                return found[1]
    total, anchors = 0, []
    for (cid,) in conn.execute(select(_C.id).where(*_conditions(where)).order_by(_C.id)):
        if total % ANCHOR_EVERY == 0:
            anchors.append(cid)
        total += 1
    index = _Index(total, tuple(anchors))
    if not where.ids:
        with _lock:
            _indexes[key] = (version, index)
            _indexes.move_to_end(key)
            while len(_indexes) > INDEXES_KEPT:
                _indexes.popitem(last=False)
    return index


def _tags_of(conn: Connection, ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {i: [] for i in ids}
    mark = "%s" if conn.dialect.paramstyle in ("pyformat", "format") else "?"
    with dbapi_cursor(conn) as raw:
        for part in chunks(ids):
            raw.execute(
                "SELECT ct.contact_id, t.id, t.name FROM contact_tags ct JOIN tags t ON t.id = ct.tag_id "
                f"WHERE ct.contact_id IN ({', '.join([mark] * len(part))}) ORDER BY t.group_name, t.name",
                tuple(part),
            )
            for cid, tid, name in raw.fetchall():
                out[cid].append((tid, name))
    return out


def contact_names(db: DB, ids: Sequence[str]) -> dict[str, str]:
    """id -> name of those of `ids` that are synced contacts (not removed)."""
    names: dict[str, str] = {}
    with reading(db) as conn:
        for part in chunks(ids):
            for cid, name in conn.execute(select(_C.id, _C.name).where(_C.id.in_(part), _C.removed_at.is_(None))):
                names[cid] = name
    return names


def customers_tagged(db: DB, tags: Sequence[str]) -> list[str]:
    """Ids of the friends (not coworkers, not removed) having any of `tags` (names or ids), by id."""
    stmt = (
        select(_C.id)
        .where(_C.removed_at.is_(None), _C.friend.is_(True), _C.coworker.is_(False), _has_tag(list(tags)))
        .order_by(_C.id)
    )
    with reading(db) as conn:
        return [row.id for row in conn.execute(stmt)]
