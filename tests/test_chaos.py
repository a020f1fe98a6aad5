"""The chaos suite (issue 7 item 9, issue 10's kill -9 in the middle of multi-part messages): a real `wecast` killed
with `kill -9` at seeded random moments — while it syncs the contacts, right after it plans, while it sends — with
the sandbox injecting faults on 30 % of the sends (transient errors, timeouts whose outcome is unknown, rate limits),
each trial then resumed to the end; and two processes racing on one database (SQLite and PostgreSQL): a fresh
database, the first sync at once, two frequency-capped campaigns sent at once.

Everything is counted at the sandbox's outbox — what customers received — against the ledger (`chaos_harness`):
0 duplicates (no part of a delivery received twice), 0 recipients lost (every customer the campaign is for has a
delivery in a final state: none missing, none skipped for lack of a contact list), 0 deliveries misreported
(`sent` ⇔ every part is in the outbox; `failed` / `skipped` ⇒ nothing the ledger does not record as delivered;
no outbox row without its delivery), 0 over the cap, 0 left neither final nor resumable. The module prints one line
with the figures (`chaos: trials=… duplicates=… lost=… misreported=… over_cap=… unresolved=…`).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from chaos_harness import (
    Tally,
    _query,
    finish,
    kill_9,
    ledger,
    outbox_parts,
    start,
    wait_until,
)
from sqlalchemy import create_engine, text

from engine.gateways.demo_data import demo_contacts
from engine.messages import part_key

pytestmark = pytest.mark.slow

POSTER = Path(__file__).parent / "cases" / "messages" / "valid" / "media" / "poster.png"
FAULTS = "{latency_ms: 2, latency_jitter_ms: 4, error_rate: 0.24, timeout_rate: 0.05, rate_limit_rate: 0.01}"
TEXT = """id: {id}
name: 双十二预告
audience: {audience}
message: {{template: '{{{{ display_name }}}}您好，双十二大促预告：全场满300减50。'}}
frequency_cap: {cap}
quiet_hours: false
throttle: {{per_second: 800}}
"""
RICH = """id: {id}
name: 双十二海报
audience: {audience}
message:
  parts:
    - image: poster.png
    - text: "{{{{ display_name }}}}您好，双十二海报请查收"
    - link: {{url: "https://mall.example.com/1212?c={{{{ id }}}}", title: 双十二会场}}
frequency_cap: false
quiet_hours: false
throttle: {{per_second: 800}}
"""

TALLY = Tally()
# What an `unknown` delivery's reason says when an attempt may have reached the customer: the gateway's answer was
# lost after the request left (the sandbox's injected timeout, the send timeout), or a crash caught it sending.
DOUBT = ("timeout after the request was sent", "no answer from the gateway", "may have been delivered", "interrupted")
RUN_KEY = ("--run-key", "chaos")  # every command of a chain means the same run (the default key is the day's)


@pytest.fixture(scope="module", autouse=True)
def summary(request: pytest.FixtureRequest) -> Iterator[None]:
    """One line with the figures of the whole module, for the lead to quote."""
    started = time.monotonic()
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    line = f"{TALLY.line()} wall={time.monotonic() - started:.1f}s"
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown whatever the capture mode, passed or not
            reporter.write_line("")
            reporter.write_line(line)
    else:  # pragma: no cover - without pytest's terminal
        print(line)


@dataclass(frozen=True)
class Chain:
    """One folder: a sandbox of `contacts` customers, campaign c1 (multi-part when `rich`) and c2 (text), and a
    sequence of wecast commands each killed at a seeded random moment, then resumed to the end."""

    name: str
    seed: int
    contacts: int
    rich: bool
    idempotent: bool
    steps: tuple[tuple[str, ...], ...]  # the commands killed, in order (`wecast run c1` resumes c1's run)
    pick: int = 0  # > 0: the campaigns are for this many customers spread over the whole book (its last page too)

    def audience(self) -> list[str]:
        """The ids the campaigns name (empty: everyone)."""
        book = [c.id for c in demo_contacts(self.contacts, self.seed)]
        return book[:: max(1, len(book) // self.pick)] + book[-3:] if self.pick else []

    def expected(self) -> set[str]:
        """The customers each campaign is for, from the sandbox's own book (not from what wecast synced): its
        friends that are not coworkers, among the ids named."""
        named = set(self.audience())
        return {
            c.id
            for c in demo_contacts(self.contacts, self.seed)
            if c.friend and not c.coworker and (not named or c.id in named)
        }


CHAINS = [
    Chain(
        "text-fresh", 101, 80, False, True, (("run", "c1"), ("run", "c1"), ("run", "c1"), ("run", "c2"), ("run", "c2"))
    ),
    Chain(
        "rich-fresh", 202, 70, True, True, (("run", "c1"), ("run", "c1"), ("run", "c1"), ("run", "c2"), ("run", "c2"))
    ),
    Chain(
        "rich-no-key", 303, 70, True, False, (("run", "c1"), ("run", "c1"), ("run", "c2"), ("run", "c1"), ("run", "c2"))
    ),
    Chain(
        "text-no-key",
        404,
        80,
        False,
        False,
        (("run", "c1"), ("run", "c2"), ("run", "c1"), ("run", "c2"), ("run", "c2")),
    ),
    Chain(
        "sync-heavy",
        505,
        2500,
        False,
        True,
        (("contacts", "sync"), ("contacts", "sync"), ("run", "c1"), ("run", "c1"), ("run", "c2")),
        pick=60,
    ),
]


def _folder(tmp: Path, chain: Chain) -> Path:
    (tmp / "campaigns").mkdir(parents=True)
    shutil.copy(POSTER, tmp / "campaigns" / "poster.png")
    audience = json.dumps({"ids": chain.audience()} if chain.pick else {})
    (tmp / "campaigns" / "c1.yaml").write_text(
        (RICH if chain.rich else TEXT).format(id="c1", cap="false", audience=audience), encoding="utf-8"
    )
    (tmp / "campaigns" / "c2.yaml").write_text(TEXT.format(id="c2", cap="false", audience=audience), encoding="utf-8")
    cfg = tmp / "config.yaml"
    cfg.write_text(
        "version: 1\n"
        f"database_url: sqlite:///{tmp}/wecast.sqlite\n"
        f"campaigns_dir: {tmp}/campaigns\n"
        "sending: {concurrency: 8, retry: {max_attempts: 3, base_delay: 0.05s, max_delay: 0.3s}}\n"
        f"sandbox: {{contacts: {chain.contacts}, seed: {chain.seed}, state_file: {tmp}/sandbox.sqlite, "
        f"honor_idempotency_key: {str(chain.idempotent).lower()}, faults: {FAULTS}}}\n",
        encoding="utf-8",
    )
    return cfg


def _sync_open(db: Path) -> bool:
    rows = _query(db, "SELECT finished_at FROM contact_syncs ORDER BY id DESC LIMIT 1")
    return bool(rows) and rows[0][0] is None


def _sync_done(db: Path) -> bool:
    rows = _query(db, "SELECT finished_at FROM contact_syncs ORDER BY id DESC LIMIT 1")
    return bool(rows) and rows[0][0] is not None


def _arrived(state: Path, campaign: str) -> int:
    """Parts of `campaign`'s messages in the outbox (its deliveries' keys start with the campaign's id)."""
    rows = _query(state, "SELECT COUNT(*) FROM outbox WHERE idempotency_key LIKE ?", (f"{campaign}|%",))
    return int(str(rows[0][0])) if rows else 0


def _planned(db: Path, campaign: str) -> bool:
    return bool(_query(db, "SELECT id FROM campaign_runs WHERE campaign_id = ?", (campaign,)))


def _phase(db: Path, step: tuple[str, ...], want: str) -> str:
    """What the killed process was doing, as the database shows it."""
    if not _sync_done(db) or step[0] == "contacts":
        return "sync"
    if not _planned(db, step[1]) or want == "plan":
        return "plan"
    return "dispatch"


def _kill_at_random_moment(tmp: Path, chain: Chain, step: tuple[str, ...], rng: random.Random) -> str:
    """Start `wecast step`, kill it -9 at a seeded moment; return the phase it was in ('' if it ended first)."""
    db, state = tmp / "wecast.sqlite", tmp / "sandbox.sqlite"
    proc = start(tmp / "config.yaml", *step, *RUN_KEY[: 2 if step[0] == "run" else 0])
    # Drawn before anything is timed, so a seed always gives the same plan (which phase, how far into the sends).
    want = rng.choice(["sync", "plan", "dispatch", "dispatch"])
    nap, share = rng.uniform(0, 0.15), rng.uniform(0.05, 0.6)
    synced, planned = _sync_done(db), step[0] == "run" and _planned(db, step[1])
    if step[0] == "contacts":
        want = "sync"
    elif (want == "sync" and synced) or (want == "plan" and planned):
        want = "dispatch"
    if want == "sync":
        # A small book syncs in one page: if it is already whole when looked at, the kill lands in planning.
        ok = wait_until(proc, lambda: _sync_open(db) or _sync_done(db))
        if ok and _sync_open(db):
            time.sleep(nap)
    elif want == "plan" and not synced:
        # The contact list just became whole: this process is planning now.
        ok = wait_until(proc, lambda: _sync_done(db))
    elif want == "plan":
        # The plan just committed: killed before (or as) its first sends go out.
        ok = wait_until(proc, lambda: _planned(db, step[1]))
    else:
        # Killed once a seeded share of the campaign's parts arrived (at least one more than before).
        campaign = step[1]
        total = len(chain.expected()) * (3 if chain.rich and campaign == "c1" else 1)
        goal = max(_arrived(state, campaign) + 1, round(share * total))
        ok = wait_until(proc, lambda: _arrived(state, campaign) >= goal)
    if not ok:
        finish(proc)
        return ""
    phase = _phase(db, step, want)
    kill_9(proc)
    return phase


def _audit(tmp: Path, chain: Chain, campaigns: tuple[str, ...]) -> Tally:
    """Compare the outbox with the ledger (see the module docstring)."""
    tally = Tally()
    url = f"sqlite:///{tmp}/wecast.sqlite"
    rows = ledger(url)
    delivered = _parts_by_status(url, "sent")
    doubtful = _parts_by_status(url, "unknown")
    received = Counter(key for _, key, _ in outbox_parts(tmp / "sandbox.sqlite"))
    tally.duplicates += sum(n - 1 for n in received.values() if n > 1)
    keys: set[str] = set()
    for d in rows:
        parts = [part_key(d.key, i, d.parts) for i in range(d.parts)]
        keys.update(parts)
        have = [received[k] > 0 for k in parts]
        if d.status == "sent" and not all(have):
            tally.misreported += 1
            tally.notes.append(f"{chain.name}: {d.contact_id} sent but parts {have} in the outbox")
        elif d.status in ("failed", "skipped") and any(
            h and i not in delivered.get(d.id, set()) for i, h in enumerate(have)
        ):
            tally.misreported += 1
            tally.notes.append(f"{chain.name}: {d.contact_id} {d.status} ({d.reason}) but parts {have} arrived")
        elif d.status == "unknown" and not doubtful.get(d.id) and not any(w in d.reason for w in DOUBT):
            tally.misreported += 1  # `unknown` only where an attempt may have reached the customer
            tally.notes.append(f"{chain.name}: {d.contact_id} unknown without doubt: {d.reason}")
        elif d.status not in ("sent", "failed", "skipped", "unknown"):
            tally.unresolved += 1
            tally.notes.append(f"{chain.name}: {d.contact_id} left {d.status}")
    strays = [k for k in received if k not in keys]
    tally.misreported += len(strays)
    tally.notes += [f"{chain.name}: outbox part {k} has no delivery" for k in strays[:5]]
    expected = chain.expected()
    for campaign in campaigns:
        final = {d.contact_id: d for d in rows if d.campaign == campaign and d.status != "skipped"}
        missing = expected - set(final)
        tally.lost += len(missing)
        tally.notes += [f"{chain.name}/{campaign}: {c} has no delivery" for c in sorted(missing)[:5]]
    return tally


def _parts_by_status(url: str, status: str) -> dict[int, set[int]]:
    """The parts of each multi-part delivery the ledger records with `status` (sent: delivered; unknown: an
    attempt at that part may have reached the customer)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            found: dict[int, set[int]] = {}
            for delivery, index in conn.execute(
                text("SELECT delivery_id, part_index FROM delivery_parts WHERE status = :s"), {"s": status}
            ):
                found.setdefault(int(delivery), set()).add(int(index))
            return found
    finally:
        engine.dispose()


def _run_chain(root: Path, chain: Chain) -> tuple[Tally, list[str], Counter[str]]:
    tmp = root / chain.name
    _folder(tmp, chain)
    rng = random.Random(chain.seed)
    phases = [_kill_at_random_moment(tmp, chain, step, rng) for step in chain.steps]
    for campaign in ("c1", "c2"):
        done = finish(start(tmp / "config.yaml", "run", campaign, *RUN_KEY), timeout=240)
        # Exit 1 only for deliveries that failed after every retry (recorded, with the reason).
        assert done.code in (0, 1), (chain.name, done.code, done.err[-3000:])
        assert "Traceback" not in done.err and "internal error" not in done.err, done.err[-3000:]
    tally = _audit(tmp, chain, ("c1", "c2"))
    tally.trials = len([p for p in phases if p])
    return tally, phases, Counter(d.status for d in ledger(f"sqlite:///{tmp}/wecast.sqlite"))


@pytest.mark.timeout(600)  # ~60 s on a quiet machine; a loaded one (the suite beside other work) takes longer
def test_kill_9_at_random_moments_with_faults_then_resume(tmp_path: Path) -> None:
    """≥ 20 seeded kill -9 trials (sync, planning, dispatch; text and text+image+link messages; gateways that do
    and do not recognise idempotency keys; 30 % of sends faulted), each resumed to the end: counted at the outbox,
    nothing duplicated, lost, misreported or left open."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda c: _run_chain(tmp_path, c), CHAINS))
    tally = Tally()
    phases: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    for t, p, s in results:
        tally.add(t)
        phases.update(x for x in p if x)
        statuses.update(s)
    TALLY.add(tally)
    print(tally.line(), dict(phases), dict(statuses))
    assert tally.clean, tally.notes[:20]
    assert tally.trials >= 20, phases
    # The trials hit every phase, and the faults really happened (retries, unknowns after timeouts).
    # (A sync kill needs the process caught before its sync ends: on a quiet machine one of the two planned may
    # find it already whole, so one is required.)
    assert phases["sync"] >= 1 and phases["dispatch"] >= 8, phases
    assert statuses["sent"] > 0 and statuses["unknown"] > 0, statuses


def _race_config(tmp: Path, db_url: str, contacts: int) -> Path:
    (tmp / "campaigns").mkdir()
    for name in ("capa", "capb"):
        (tmp / "campaigns" / f"{name}.yaml").write_text(
            TEXT.format(id=name, cap="{max: 1, per: day}", audience="{}"), encoding="utf-8"
        )
    cfg = tmp / "config.yaml"
    cfg.write_text(
        "version: 1\n"
        f"database_url: '{db_url}'\n"
        f"campaigns_dir: {tmp}/campaigns\n"
        "sending: {concurrency: 8}\n"
        f"sandbox: {{contacts: {contacts}, seed: 77, state_file: {tmp}/sandbox.sqlite, "
        "faults: {latency_ms: 1, latency_jitter_ms: 3}}\n",
        encoding="utf-8",
    )
    return cfg


@pytest.mark.timeout(300)
def test_two_processes_race_on_a_fresh_database_with_capped_campaigns(tmp_path: Path, db_url: str) -> None:
    """Two `wecast run` at once on a fresh database (SQLite file, PostgreSQL): both sync first — at once — and
    send a campaign each under the shared cap of one a day. No crash; each customer gets exactly one message
    (0 over the cap, 0 lost), and the ledger agrees with the outbox."""
    contacts = 300
    cfg = _race_config(tmp_path, db_url, contacts)
    procs = [start(cfg, "run", name) for name in ("capa", "capb")]
    results = [finish(p, timeout=240) for p in procs]
    for done in results:
        assert done.code == 0, done.err[-3000:]
        assert "Traceback" not in done.err, done.err[-3000:]
    rows = ledger(db_url)
    received = [(c, k) for c, k, _ in outbox_parts(tmp_path / "sandbox.sqlite")]
    per_contact = Counter(c for c, _ in received)
    expected = {c.id for c in demo_contacts(contacts, 77) if c.friend and not c.coworker}
    tally = Tally(
        duplicates=sum(n - 1 for n in Counter(k for _, k in received).values() if n > 1),
        over_cap=sum(1 for n in per_contact.values() if n > 1),
        lost=len(expected - set(per_contact)),
    )
    by_key = {d.key: d for d in rows}
    tally.misreported = sum(1 for _, k in received if k not in by_key or by_key[k].status != "sent")
    tally.misreported += sum(1 for d in rows if d.status == "sent" and d.key not in {k for _, k in received})
    tally.unresolved = sum(1 for d in rows if d.status not in ("sent", "skipped", "failed", "unknown"))
    TALLY.add(tally)
    print(f"race on {db_url.split(':')[0]}: {tally.line()}", json.dumps(Counter(d.status for d in rows)))
    assert tally.clean, (tally.line(), Counter(d.reason.split(":")[0] for d in rows if d.status == "skipped"))
    # Both campaigns sent: the cap decided per contact, not one process taking everything by luck of timing.
    assert {d.campaign for d in rows if d.status == "sent"} <= {"capa", "capb"}
    assert set(per_contact) == expected
