"""The scale table (issue 13): every figure on SQLite and on PostgreSQL, as medians of interleaved runs, each run in a
fresh process (so peak memory, ru_maxrss, belongs to that run alone):

* plan 100k / 1M  select + render + record every recipient of the bench campaign: seconds and peak RSS, and for
                  100k the ratio to the floor measured in the same session, the runs paired (plan, floor, plan, ...)
* floor           what planning cannot go below: the driver's own bulk insert of the very rows the plan wrote into
                  the same table and indexes (SQLite: sqlite3 executemany and COMMIT with wecast's pragmas;
                  PostgreSQL: psycopg COPY), plus jinja2's `Template.render` of the bench template (a plain
                  Environment, the same options) over the same contexts; `root` also shows the template's bare
                  compiled function alone (no `render` wrapper), the strictest floor
* dispatch        10,000 deliveries on the sandbox, no latency, no throttle: deliveries/s
* rate            200 sends configured at 20/s, each taking 200 ms: achieved / configured, busiest 1 s window
* sync            100,000 contacts from the sandbox into the database (the real sync path): seconds
* get-all-user    `wecast serve` with 100,000 contacts, 16 keep-alive connections asking random pages (pageSize 20):
                  requests/s, p50, p99; and p50 of page 1 against the last page, alone
* send-message    200 concurrent POST /send-message (one per contact, each with its Idempotency-Key) on the
                  sandbox: sends/s, p50, p99, and the messages each contact got, counted in the sandbox's outbox

PostgreSQL: a server at WECAST_BENCH_PG (default postgres@127.0.0.1:5432, trust auth), in a database made for the
session and dropped after it (`--backend sqlite` skips it). Use `python -m bench.run table` (all rows) or name rows:
`python -m bench.run table --rows plan100k,getalluser --backend sqlite --repeat 5`.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("WECAST_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
BACKENDS = ("sqlite", "postgresql")
PAGE_SIZE = 20  # contacts per /get-all-user page in the benchmark
CONNECTIONS = 16  # keep-alive connections asking /get-all-user at once
SENDS = 200  # concurrent /send-message calls
TEMPLATE = (
    '{{ display_name }}{{ honorific | default("") }}您好！{{ city | default("全国") }}门店本周会员日，\n'
    '全场8折{% if "VIP" in tags %}，VIP再享95折{% endif %}。回复TD退订。\n'
)
CAMPAIGN = """
id: bench
name: 压测活动
schedule: {cron: "0 10 * * 1"}
audience:
  tags_none: [勿扰]%(limit)s
message:
  template: |
    {{ display_name }}{{ honorific | default("") }}您好！{{ city | default("全国") }}门店本周会员日，
    全场8折{% if "VIP" in tags %}，VIP再享95折{% endif %}。回复TD退订。
dedupe: run
frequency_cap: true
quiet_hours: false
throttle: {per_second: %(rate)s}
max_errors: 0
"""


# -- databases ----------------------------------------------------------------------------------------------


def _pg_url(database: str, schema: str | None = None) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(PG_ADMIN).set(database=database)
    if schema is not None:
        url = url.set(query={"options": f"-c search_path={schema}"})
    return url.render_as_string(hide_password=False)


def _pg_admin(database: str = "postgres") -> Any:
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(PG_ADMIN).set(drivername="postgresql", database=database)
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)


@contextmanager
def pg_database() -> Iterator[str]:
    """A database for the session on the PostgreSQL server, dropped afterwards."""
    name = f"wecast_bench_{uuid.uuid4().hex[:10]}"
    with _pg_admin() as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with _pg_admin() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def new_schema(database: str) -> str:
    schema = f"s_{uuid.uuid4().hex[:10]}"
    with _pg_admin(database) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return schema


@contextmanager
def store(backend: str, folder: Path, database: str | None) -> Iterator[str]:
    """A fresh, empty wecast database: a SQLite file in `folder`, or a schema of its own in the session's
    PostgreSQL database (dropped afterwards)."""
    if backend == "sqlite":
        yield f"sqlite:///{folder}/wecast.sqlite"
        return
    assert database is not None
    schema = new_schema(database)
    try:
        yield _pg_url(database, schema)
    finally:
        with _pg_admin(database) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _config(
    folder: Path, url: str, *, contacts: int = 200, latency_ms: float = 0, concurrency: int = 64, extra: str = ""
) -> Path:
    cfg = folder / "config.yaml"
    cfg.write_text(
        "version: 1\n"
        f"database_url: '{url}'\n"
        f"campaigns_dir: {folder}/campaigns\n"
        f"sending: {{concurrency: {concurrency}, quiet_hours: null}}\n"
        f"sandbox: {{contacts: {contacts}, state_file: {folder}/sandbox.sqlite, "
        f"faults: {{latency_ms: {latency_ms}}}}}\n"
        f"{extra}",
        encoding="utf-8",
    )
    (folder / "campaigns").mkdir(exist_ok=True)
    return cfg


def _campaign(folder: Path, settings: Any, rate: float, limit: int | None = None) -> Any:
    from engine.spec import load_campaign

    path = folder / "campaigns" / "bench.yaml"
    text = CAMPAIGN.replace("%(rate)s", str(rate)).replace("%(limit)s", f"\n  limit: {limit}" if limit else "")
    path.write_text(text, encoding="utf-8")
    return load_campaign(path, settings)


def _wipe_runs(db: Any) -> None:
    """Forget every run (a plan measured again starts from the seeded contacts alone). On PostgreSQL the deleted
    rows are vacuumed away too, so a plan finds the tables as SQLite's plan finds its copy of the seeded file: the
    runs before it left nothing (else each new row's unique-index check visits the dead row of the run before,
    which had the same dedupe key: about 0.3 s of server time a 100,000-row plan that no real plan pays)."""
    tables = ("delivery_parts", "deliveries", "campaign_runs")
    with db.begin() as conn:
        for table in tables:
            conn.exec_driver_sql(f"DELETE FROM {table}")
    if db.dialect.name == "postgresql":
        with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM {', '.join(tables)}")


# -- seeding ------------------------------------------------------------------------------------------------


def seed(url: str, n: int) -> dict[str, float]:
    """n demo contacts (the sandbox's generator, a page at a time) written with the driver's bulk paths, with a
    finished sync: a database as a finished sync of n contacts leaves it (bench only: `sync` measures the real
    sync path)."""
    from engine.contacts import record_to_row, tag_to_row
    from engine.gateways.demo_data import demo_tags, iter_demo_contacts
    from storage.contacts import upsert_tags
    from storage.db import make_db_engine

    db = make_db_engine(url)
    now = datetime.now(UTC)
    upsert_tags(db, [tag_to_row(t) for t in demo_tags()])
    columns = [
        "id", "name", "alias", "avatar", "gender", "city", "province", "address", "corporation", "title", "phones",
        "weixin", "description", "signature", "friend", "coworker", "star", "type", "real_name", "aka",
        "additional_info", "corp_id", "tag_ids", "follow_user_ids", "added_at", "created_at", "updated_at",
    ]  # fmt: skip
    pg = db.dialect.name == "postgresql"
    stamp: Any = now.replace(tzinfo=None) if pg else now.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    t0 = time.perf_counter()
    page: list[tuple[Any, ...]] = []
    links: list[tuple[str, str]] = []

    def flush(conn: Any) -> None:
        cursor = conn.connection.cursor()
        if pg:
            with cursor.copy(f"COPY contacts ({', '.join(columns)}) FROM STDIN") as copy:
                for row in page:
                    copy.write_row(row)
            with cursor.copy("COPY contact_tags (contact_id, tag_id) FROM STDIN") as copy:
                for link in links:
                    copy.write_row(link)
        else:
            marks = ", ".join("?" * len(columns))
            cursor.executemany(f"INSERT INTO contacts ({', '.join(columns)}) VALUES ({marks})", page)
            cursor.executemany("INSERT INTO contact_tags (contact_id, tag_id) VALUES (?, ?)", links)
        page.clear()
        links.clear()

    with db.begin() as conn:
        for record in iter_demo_contacts(n, 7, now=datetime(2026, 11, 1, tzinfo=UTC)):
            c = record_to_row(record)
            added = c.added_at.astimezone(UTC).replace(tzinfo=None) if c.added_at else None
            page.append(
                (
                    c.id, c.name, c.alias, c.avatar, c.gender, c.city, c.province, c.address, c.corporation, c.title,
                    json.dumps(list(c.phones)), c.weixin, c.description, c.signature, c.friend, c.coworker, c.star,
                    c.type, c.real_name, c.aka, json.dumps(c.additional_info), c.corp_id,
                    json.dumps(sorted(set(c.tag_ids))), json.dumps(list(c.follow_user_ids)),
                    added if pg or added is None else added.strftime("%Y-%m-%d %H:%M:%S.%f"), stamp, stamp,
                )
            )  # fmt: skip
            links += [(c.id, t) for t in sorted(set(c.tag_ids))]
            if len(page) >= 10_000:
                flush(conn)
        flush(conn)
        conn.exec_driver_sql(
            "INSERT INTO contact_syncs (id, owner, started_at, heartbeat_at, finished_at, seen) VALUES (1, '', "
            + ("%(t)s, %(t)s, %(t)s, %(n)s)" if pg else ":t, :t, :t, :n)"),
            {"t": stamp, "n": n},
        )
    if pg:
        with db.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
    db.dispose()
    return {"contacts": n, "seconds": time.perf_counter() - t0}


def _fresh_copy(seeded: str, url: str, folder: Path) -> str:
    """The database a plan runs on: a copy of the seeded SQLite file (the same pages, the same state), or the
    seeded PostgreSQL schema with every run removed."""
    if seeded:
        target = folder / "wecast.sqlite"
        shutil.copy(seeded, target)
        return f"sqlite:///{target}"
    from storage.db import make_db_engine

    db = make_db_engine(url)
    _wipe_runs(db)
    db.dispose()
    return url


# -- one measurement each (in a fresh process) -----------------------------------------------------------------


def one_plan(seeded: str, url: str, dump: str) -> dict[str, float]:
    """Plan every contact of a seeded database; time and peak RSS of this process. `dump`: also write the rows it
    planned to this file (for the floor)."""
    from engine.plan import plan_run
    from engine.settings import load_settings
    from storage.db import make_db_engine

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        target = _fresh_copy(seeded, url, folder)
        settings = load_settings(_config(folder, target))
        db = make_db_engine(settings.database_url)
        campaign = _campaign(folder, settings, 1000)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        c0, t0 = time.process_time(), time.perf_counter()
        result = plan_run(db, campaign, now=datetime.now(UTC))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if dump:
            _dump_rows(db, result.run_id, Path(dump))
        db.dispose()
    return {
        "seconds": elapsed,
        "cpu": cpu,
        "planned": result.planned,
        "skipped": result.skipped,
        "peak_rss_mb": peak / 1024,
        "rss_before_mb": rss_before / 1024,
    }


PENDING_COLUMNS = (
    "run_id", "campaign_id", "contact_id", "contact_name", "text", "dedupe_key", "status", "capped",
    "created_at", "updated_at",
)  # fmt: skip


def _dump_rows(db: Any, run_id: int, path: Path) -> None:
    """The rows a plan wrote, as its insert sent them (pending ones without a reason, skipped ones with one)."""
    with db.connect() as conn:
        cols = ", ".join(PENDING_COLUMNS)
        rows = conn.exec_driver_sql(f"SELECT {cols}, reason FROM deliveries WHERE run_id = {int(run_id)} ORDER BY id")
        data = [tuple(r) for r in rows]
    pending = [r[:-1] for r in data if r[6] == "pending"]
    skipped = [r for r in data if r[6] == "skipped"]
    path.write_bytes(pickle.dumps({"pending": pending, "skipped": skipped}))


def _contexts(url: str, ids: list[str]) -> list[dict[str, Any]]:
    """The bench template's context for each of these contacts, as wecast's renderer gives it (untimed)."""
    from storage.contacts import load_contact_views
    from storage.db import make_db_engine

    db = make_db_engine(url)
    views = {v["id"]: v for v in load_contact_views(db, columns={"id", "name", "alias", "gender", "city"})}
    db.dispose()
    out = []
    for cid in ids:
        v = views[cid]
        ctx: dict[str, Any] = {"display_name": v["alias"] or v["name"]}
        if v["gender"]:
            ctx["honorific"] = "先生" if v["gender"] == 1 else "女士"
        if v["city"]:
            ctx["city"] = v["city"]
        ctx["tags"] = sorted(v["tags_named"])
        out.append(ctx)
    return out


def one_floor(seeded: str, url: str, dump: str) -> dict[str, float]:
    """The floor: the driver's bulk insert of the dumped rows (in a fresh copy of the same database) and jinja2's
    render of the bench template over the same contexts."""
    import jinja2
    from jinja2.runtime import new_context

    rows = pickle.loads(Path(dump).read_bytes())
    pending, skipped = rows["pending"], rows["skipped"]
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        target = _fresh_copy(seeded, url, folder)
        contexts = _contexts(target, [r[2] for r in pending])
        run_row = (pending or skipped)[0][0]
        if seeded:
            import sqlite3

            from storage.db import CACHE_KIB

            conn = sqlite3.connect(target.removeprefix("sqlite:///"), isolation_level=None)
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", f"cache_size=-{CACHE_KIB}"):
                conn.execute(f"PRAGMA {pragma}")
            conn.execute(
                "INSERT INTO campaign_runs (id, campaign_id, run_key, trigger, status, timezone, campaign_file, "
                "campaign_hash, settings, owner, error, planned, skipped_at_plan) "
                "VALUES (?, 'bench', 'floor', 'manual', 'running', 'Asia/Shanghai', '', '', '{}', '', '', 0, 0)",
                (run_row,),
            )
            marks = ", ".join("?" * len(PENDING_COLUMNS))
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                f"INSERT INTO deliveries ({', '.join(PENDING_COLUMNS)}) VALUES ({marks}) ON CONFLICT DO NOTHING",
                pending,
            )
            conn.executemany(
                f"INSERT INTO deliveries ({', '.join(PENDING_COLUMNS)}, reason) VALUES ({marks}, ?) "
                "ON CONFLICT DO NOTHING",
                skipped,
            )
            conn.execute("COMMIT")
            insert = time.perf_counter() - t0
            conn.close()
        else:
            import psycopg
            from sqlalchemy.engine import make_url

            parsed = make_url(target)
            conn_pg = psycopg.connect(
                parsed.set(drivername="postgresql", query={}).render_as_string(hide_password=False),
                options=parsed.query["options"],
            )
            with conn_pg.cursor() as cur:
                cur.execute(
                    "INSERT INTO campaign_runs (id, campaign_id, run_key, trigger, status, timezone, campaign_file, "
                    "campaign_hash, settings, owner, error, planned, skipped_at_plan) "
                    "VALUES (%s, 'bench', 'floor', 'manual', 'running', 'Asia/Shanghai', '', '', '{}', '', '', 0, 0)",
                    (run_row,),
                )
            conn_pg.commit()
            t0 = time.perf_counter()
            with conn_pg.cursor() as cur:
                with cur.copy(f"COPY deliveries ({', '.join(PENDING_COLUMNS)}) FROM STDIN") as copy:
                    for row in pending:
                        copy.write_row(row)
                with cur.copy(f"COPY deliveries ({', '.join(PENDING_COLUMNS)}, reason) FROM STDIN") as copy:
                    for row in skipped:
                        copy.write_row(row)
            conn_pg.commit()
            insert = time.perf_counter() - t0
            conn_pg.close()
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(TEMPLATE)
    t0 = time.perf_counter()
    for ctx in contexts:
        template.render(ctx)
    render = time.perf_counter() - t0
    t0 = time.perf_counter()
    root, name, blocks, concat = template.root_render_func, template.name, template.blocks, env.concat
    for ctx in contexts:
        concat(root(new_context(env, name, blocks, ctx, shared=True)))
    bare = time.perf_counter() - t0
    return {"seconds": insert + render, "insert": insert, "render": render, "root": bare, "rows": len(rows)}


def one_dispatch(url: str, n: int) -> dict[str, float]:
    """Plan then dispatch n deliveries on the sandbox with no latency and no throttle."""
    from engine.service import Wecast
    from engine.settings import load_settings

    async def go(folder: Path) -> dict[str, float]:
        settings = load_settings(_config(folder, url, contacts=n))
        async with Wecast(settings) as app:
            await app.sync()
            plan = app.plan(_campaign(folder, settings, 1_000_000))
            t0, cpu0 = time.perf_counter(), time.process_time()
            summary = await app.dispatcher.run(plan.run_id)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            outbox = app.gateway.store.count()  # type: ignore[attr-defined]
        return {
            "seconds": elapsed,
            "sent": summary.sent,
            "per_second": summary.sent / elapsed,
            "outbox": outbox,
            "cpu_ms": cpu / max(summary.sent, 1) * 1000,  # this process's CPU (every thread) per delivery
        }

    with tempfile.TemporaryDirectory() as d:
        return asyncio.run(go(Path(d)))


def one_rate(url: str, n: int, rate: float, latency_ms: float) -> dict[str, float]:
    """Dispatch n deliveries at `rate`/s when each send takes `latency_ms`; the achieved rate over the sends' start
    times, and the busiest 1-second window."""
    from engine.service import Wecast
    from engine.settings import load_settings

    async def go(folder: Path) -> dict[str, float]:
        cfg = _config(folder, url, contacts=int(n * 1.3) + 20, latency_ms=latency_ms, concurrency=16)
        settings = load_settings(cfg)
        async with Wecast(settings) as app:
            await app.sync()
            plan = app.plan(_campaign(folder, settings, rate, limit=n))
            assert plan.planned == n, plan
            starts: list[float] = []
            gw = app.gateway
            original = gw.send_text

            async def timed(contact_id: str, text: str, *, idempotency_key: str) -> Any:
                starts.append(time.perf_counter())
                return await original(contact_id, text, idempotency_key=idempotency_key)

            gw.send_text = timed  # type: ignore[method-assign]
            summary = await app.dispatcher.run(plan.run_id)
        starts.sort()
        achieved = (len(starts) - 1) / (starts[-1] - starts[0])  # (n - 1) gaps between the first and last start
        busiest = max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)
        return {"achieved": achieved, "ratio": achieved / rate, "max_in_any_1s": busiest, "sent": summary.sent}

    with tempfile.TemporaryDirectory() as d:
        return asyncio.run(go(Path(d)))


def one_sync(url: str, n: int) -> dict[str, float]:
    """Sync n contacts from the sandbox into an empty database (the sandbox's list is made before the clock starts)."""
    from engine.service import Wecast
    from engine.settings import load_settings

    async def go(folder: Path) -> dict[str, float]:
        settings = load_settings(_config(folder, url, contacts=n))
        async with Wecast(settings) as app:
            await app.gateway.list_contacts(None, 1)
            t0 = time.perf_counter()
            result = await app.sync()
            elapsed = time.perf_counter() - t0
        return {"seconds": elapsed, "seen": result.seen, "added": result.added}

    with tempfile.TemporaryDirectory() as d:
        return asyncio.run(go(Path(d)))


# -- wecast serve and a lean HTTP/1.1 client ------------------------------------------------------------------


@contextmanager
def serving(folder: Path, url: str, *, contacts: int, extra: str = "") -> Iterator[tuple[str, int, int]]:
    """`wecast serve` in a subprocess on a free loopback port; yields (host, port, pid) once /healthz answers."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = _config(
        folder,
        url,
        contacts=contacts,
        extra="scheduler: {contacts_sync: null}\nlog_level: WARNING\n" + extra,
    )
    log = (folder / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "-c", str(cfg), "serve", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("wecast serve did not start:\n" + (folder / "serve.log").read_text())
            time.sleep(0.1)
        yield "127.0.0.1", port, server.pid
    finally:
        server.terminate()
        server.wait(60)
        log.close()


class Client:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads the answer (Content-Length bodies): a client
    that costs next to nothing beside the server it measures (both share these two cores)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> Client:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}")

    async def post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        payload = json.dumps(body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n{extra}\r\n".encode()
            + payload
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) a process has used so far: what a request costs the server, which
    the machine's other load changes far less than it changes wall-clock figures."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def one_getalluser(seeded: str, url: str, seconds: float) -> dict[str, float]:
    """/get-all-user on `wecast serve` over a seeded database: CONNECTIONS connections asking random pages for
    `seconds`; then page 1 and the last page alone, 200 times each."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        target = _fresh_copy(seeded, url, folder)
        with serving(folder, target, contacts=200) as (host, port, pid):

            async def go() -> dict[str, float]:
                probe = await Client.open(host, port)
                status, body = await probe.post("/get-all-user", {"pageSize": PAGE_SIZE, "page": 1})
                assert status == 200, body[:300]
                total = json.loads(body)["total"]
                last = -(-total // PAGE_SIZE)
                latencies: list[float] = []
                rng = random.Random(13)
                stop = time.perf_counter() + seconds

                async def worker() -> None:
                    client = await Client.open(host, port)
                    try:
                        while time.perf_counter() < stop:
                            t0 = time.perf_counter()
                            status, _ = await client.post(
                                "/get-all-user", {"pageSize": PAGE_SIZE, "page": rng.randint(1, last)}
                            )
                            latencies.append(time.perf_counter() - t0)
                            assert status == 200
                    finally:
                        client.close()

                t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
                await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
                elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0

                async def alone(page: int) -> tuple[float, list[str]]:
                    times = []
                    for _ in range(200):
                        t1 = time.perf_counter()
                        _, body = await probe.post("/get-all-user", {"pageSize": PAGE_SIZE, "page": page})
                        times.append(time.perf_counter() - t1)
                    return statistics.median(times), [c["id"] for c in json.loads(body)["datas"]]

                probe.close()  # idle through the load phase, past the server's keep-alive timeout: a fresh one
                probe = await Client.open(host, port)
                first_ms, first_ids = await alone(1)
                last_ms, last_ids = await alone(last)
                probe.close()
                return {
                    "per_second": len(latencies) / elapsed,
                    "p50_ms": _pct(latencies, 0.5) * 1000,
                    "p99_ms": _pct(latencies, 0.99) * 1000,
                    "requests": len(latencies),
                    "server_cpu_ms": cpu / len(latencies) * 1000,
                    "first_page_ms": first_ms * 1000,
                    "last_page_ms": last_ms * 1000,
                    "total": total,
                    "last_page_contacts": len(last_ids),
                    "pages_differ": float(first_ids != last_ids),
                }

            return asyncio.run(go())


def one_sendmessage(url: str) -> dict[str, float]:
    """SENDS concurrent /send-message calls (each its own contact and Idempotency-Key) on the sandbox, logged in;
    then the messages each of those contacts got, counted in the sandbox's own outbox."""
    import sqlite3

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        with serving(folder, url, contacts=1000, extra="api: {sandbox_auto_login: true}\n") as (host, port, pid):

            async def go() -> dict[str, Any]:
                probe = await Client.open(host, port)
                ids: list[str] = []
                page = 1
                while len(ids) < SENDS:
                    _, body = await probe.post("/get-all-user", {"pageSize": 100, "page": page})
                    ids += [c["id"] for c in json.loads(body)["datas"] if c["friend"] and not c["coworker"]]
                    page += 1
                probe.close()
                ids = ids[:SENDS]
                clients = [await Client.open(host, port) for _ in ids]
                latencies: list[float] = []
                answers: list[dict[str, Any]] = []

                async def send(client: Client, cid: str) -> None:
                    t0 = time.perf_counter()
                    status, body = await client.post(
                        "/send-message",
                        {"id": cid, "message": "您好，您的订单已发货"},
                        {"Idempotency-Key": f"bench-{cid}"},
                    )
                    latencies.append(time.perf_counter() - t0)
                    answers.append({**json.loads(body), "http": status})  # the body has a "status" of its own

                t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
                await asyncio.gather(*(send(c, cid) for c, cid in zip(clients, ids, strict=True)))
                elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
                for c in clients:
                    c.close()
                return {"ids": ids, "elapsed": elapsed, "cpu": cpu, "latencies": latencies, "answers": answers}

            got = asyncio.run(go())
        with sqlite3.connect(folder / "sandbox.sqlite") as outbox:
            tables = [r[0] for r in outbox.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            table = next(t for t in tables if "outbox" in t)
            counts = dict(outbox.execute(f"SELECT contact_id, count(*) FROM {table} GROUP BY contact_id").fetchall())
    received = [counts.get(cid, 0) for cid in got["ids"]]
    return {
        "per_second": SENDS / got["elapsed"],
        "p50_ms": _pct(got["latencies"], 0.5) * 1000,
        "p99_ms": _pct(got["latencies"], 0.99) * 1000,
        "server_cpu_ms": got["cpu"] / SENDS * 1000,
        "ok": sum(1 for a in got["answers"] if a["http"] == 200 and a.get("sent") == 1),
        "duplicates": sum(1 for n in received if n > 1),
        "missing": sum(1 for n in received if n == 0),
    }


# -- the table ------------------------------------------------------------------------------------------------


def _sub(kind: str, *args: str) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scale", kind, *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark {kind} {' '.join(args)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


def _med(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


Row = tuple[str, str, str, str, str]  # benchmark, backend, measured, target, verdict


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


class _Databases:
    """One backend's databases for a session: seeded ones (made once, reused by every run that reads them) and
    fresh empty ones."""

    def __init__(self, backend: str, workdir: Path, database: str | None) -> None:
        self.backend, self.workdir, self.database = backend, workdir, database
        self.seeds: dict[int, tuple[str, str]] = {}

    def seeded(self, n: int) -> tuple[str, str]:
        """(the seeded SQLite file each run copies, or '' on PostgreSQL; the database's URL), n contacts."""
        if n not in self.seeds:
            url = self.fresh(f"seed{n}")
            _sub("seed", url, str(n))
            source = url.removeprefix("sqlite:///") if self.backend == "sqlite" else ""
            self.seeds[n] = (source, url)
        return self.seeds[n]

    def fresh(self, tag: str) -> str:
        folder = self.workdir / f"{self.backend}-{tag}-{uuid.uuid4().hex[:6]}"
        folder.mkdir()
        if self.backend == "sqlite":
            return f"sqlite:///{folder}/wecast.sqlite"
        assert self.database is not None
        return _pg_url(self.database, new_schema(self.database))


def report(rows: list[str], backends: list[str], repeat: int) -> None:
    """Measure the chosen rows on the chosen backends and print them as one table."""
    table: list[Row] = []
    print(f"scale table (issue 13): medians of {repeat} interleaved runs, fresh process each; {_load()}", flush=True)

    def note(row: Row) -> None:
        table.append(row)
        print("  " + " | ".join(row), flush=True)

    plan_seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as work, _maybe_pg(backends) as database:
        for backend in backends:
            dbs = _Databases(backend, Path(work), database)
            for name in rows:
                for row in MEASURE[name](dbs, repeat, plan_seconds):
                    note(row)
    print()
    width = [max(len(r[i]) for r in table) for i in range(5)] if table else []
    header = ("benchmark", "backend", "measured", "target", "")
    for row in (header, *table):
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, width, strict=True)).rstrip())
    print(f"({_load()} at the end)")


def _plan100k(dbs: _Databases, repeat: int, plan_seconds: dict[str, float]) -> list[Row]:
    source, url = dbs.seeded(100_000)
    dump = str(dbs.workdir / f"{dbs.backend}-rows.pickle")
    plans, floors = [], []
    for i in range(repeat):  # interleaved: each plan beside a floor measured under the same load
        plans.append(_sub("plan", source, url, dump if i == 0 else ""))
        floors.append(_sub("floor", source, url, dump))
    pairs = list(zip(plans, floors, strict=True))
    ratio = statistics.median(p["seconds"] / f["seconds"] for p, f in pairs)
    strict = statistics.median(p["seconds"] / (f["insert"] + f["root"]) for p, f in pairs)
    secs = _med(plans, "seconds")
    plan_seconds[dbs.backend] = secs
    floor: Row = (
        "floor 100k (bulk insert + jinja2 render)",
        dbs.backend,
        f"{_med(floors, 'seconds'):.2f} s (insert {_med(floors, 'insert'):.2f} + render {_med(floors, 'render'):.2f}; "
        f"the bare root function {_med(floors, 'root'):.2f})",
        "",
        "",
    )
    if dbs.backend == "sqlite":
        target, ok, versus = "≤ 1.5× floor", ratio <= 1.5, ""
    else:
        sqlite = plan_seconds.get("sqlite")
        target = "≤ 1.3× SQLite's plan"
        ok = sqlite is not None and secs <= 1.3 * sqlite
        versus = f"; {secs / sqlite:.2f}× SQLite" if sqlite else "; SQLite not measured"
    plan: Row = (
        "plan 100k",
        dbs.backend,
        f"{secs:.2f} s = {ratio:.2f}× floor ({strict:.2f}× with the bare root function){versus}; peak RSS "
        f"{_med(plans, 'peak_rss_mb'):.0f} MB; runs " + ", ".join(f"{p['seconds']:.2f}" for p in plans),
        target,
        _verdict(ok),
    )
    return [floor, plan]


def _plan1m(dbs: _Databases, repeat: int, plan_seconds: dict[str, float]) -> list[Row]:
    source, url = dbs.seeded(1_000_000)
    plans = [_sub("plan", source, url, "") for _ in range(repeat)]
    rss = _med(plans, "peak_rss_mb")
    return [
        (
            "plan 1M",
            dbs.backend,
            f"{_med(plans, 'seconds'):.1f} s, peak RSS {rss:.0f} MB ({plans[0]['rss_before_mb']:.0f} MB before "
            f"planning), planned {plans[0]['planned']:,.0f}",
            "< 300 MB peak RSS",
            _verdict(rss < 300),
        )
    ]


def _dispatch(dbs: _Databases, repeat: int, plan_seconds: dict[str, float]) -> list[Row]:
    runs = [_sub("dispatch", dbs.fresh("dispatch"), "10000") for _ in range(repeat)]
    rate = _med(runs, "per_second")
    want = 5000 if dbs.backend == "sqlite" else 3000
    measured = f"{rate:,.0f} deliveries/s; runs " + ", ".join(f"{r['per_second']:,.0f}" for r in runs)
    measured += f"; wecast's CPU {_med(runs, 'cpu_ms'):.2f} ms a delivery"
    return [("dispatch 10k, no latency", dbs.backend, measured, f"≥ {want:,}/s", _verdict(rate >= want))]


def _rate(dbs: _Databases, repeat: int, plan_seconds: dict[str, float]) -> list[Row]:
    runs = [_sub("rate", dbs.fresh("rate"), "200", "20", "200") for _ in range(repeat)]
    ratio = _med(runs, "ratio")
    busiest = max(r["max_in_any_1s"] for r in runs)
    measured = f"{ratio:.3f} of configured, busiest 1 s window {busiest:.0f} sends"
    ok = ratio >= 0.95 and busiest <= 20
    return [("rate fidelity (20/s, 200 ms sends)", dbs.backend, measured, "≥ 0.95, never above", _verdict(ok))]


def _sync(dbs: _Databases, repeat: int, plan_seconds: dict[str, float]) -> list[Row]:
    runs = [_sub("sync", dbs.fresh("sync"), "100000") for _ in range(repeat)]
    secs = _med(runs, "seconds")
    return [("contact sync 100k", dbs.backend, f"{secs:.1f} s ({100_000 / secs:,.0f} contacts/s)", "", "")]


def _getalluser(dbs: _Databases, repeat: int, plan_seconds: dict[str, float]) -> list[Row]:
    source, url = dbs.seeded(100_000)
    runs = [_sub("getalluser", source, url, "6") for _ in range(repeat)]
    rps, p99 = _med(runs, "per_second"), _med(runs, "p99_ms")
    first, last = _med(runs, "first_page_ms"), _med(runs, "last_page_ms")
    measured = (
        f"{rps:,.0f} req/s, p50 {_med(runs, 'p50_ms'):.1f} ms, p99 {p99:.1f} ms; alone: page 1 {first:.1f} ms, "
        f"last page {last:.1f} ms (p50); server CPU {_med(runs, 'server_cpu_ms'):.2f} ms a request"
    )
    ok = rps >= 500 and p99 < 50 and last <= first * 1.25 + 1
    target = "≥ 500 req/s, p99 < 50 ms, last page = first"
    return [(f"/get-all-user, 100k contacts, {CONNECTIONS} conns", dbs.backend, measured, target, _verdict(ok))]


def _sendmessage(dbs: _Databases, repeat: int, plan_seconds: dict[str, float]) -> list[Row]:
    runs = [_sub("sendmessage", dbs.fresh("send")) for _ in range(repeat)]
    rate, p99 = _med(runs, "per_second"), _med(runs, "p99_ms")
    dups = sum(r["duplicates"] for r in runs)
    missing = sum(r["missing"] for r in runs)
    measured = (
        f"{rate:,.0f} sends/s, p50 {_med(runs, 'p50_ms'):.0f} ms, p99 {p99:.0f} ms; duplicates {dups}, missing "
        f"{missing}, answered sent {min(r['ok'] for r in runs):.0f}/{SENDS}; server CPU "
        f"{_med(runs, 'server_cpu_ms'):.2f} ms a send"
    )
    ok = rate >= 500 and p99 < 500 and dups == 0 and missing == 0
    target = "≥ 500/s, p99 < 500 ms, 0 duplicates"
    return [(f"{SENDS} concurrent /send-message", dbs.backend, measured, target, _verdict(ok))]


MEASURE: dict[str, Callable[[_Databases, int, dict[str, float]], list[Row]]] = {
    "plan100k": _plan100k,
    "plan1m": _plan1m,
    "dispatch": _dispatch,
    "rate": _rate,
    "sync": _sync,
    "getalluser": _getalluser,
    "sendmessage": _sendmessage,
}


@contextmanager
def _maybe_pg(backends: list[str]) -> Iterator[str | None]:
    if "postgresql" not in backends:
        yield None
        return
    with pg_database() as name:
        yield name


ONE: dict[str, Callable[..., dict[str, float]]] = {
    "seed": lambda url, n: seed(url, int(n)),
    "plan": one_plan,
    "floor": one_floor,
    "dispatch": lambda url, n: one_dispatch(url, int(n)),
    "rate": lambda url, n, rate, latency: one_rate(url, int(n), float(rate), float(latency)),
    "sync": lambda url, n: one_sync(url, int(n)),
    "getalluser": lambda source, url, seconds: one_getalluser(source, url, float(seconds)),
    "sendmessage": one_sendmessage,
}


if __name__ == "__main__":  # one measurement: python -m bench.scale KIND ARGS... (run by `report`)
    print(json.dumps(ONE[sys.argv[1]](*sys.argv[2:])))
