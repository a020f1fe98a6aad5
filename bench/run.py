"""wecast benchmarks: `python -m bench.run` (or name some: `python -m bench.run table healthz`).

Prints, as medians of several runs (these machines are noisy), against their targets:

* table  – the scale table of issue 13 (bench/scale.py), each row on SQLite and PostgreSQL: plan 100k (as a ratio
  to the floor measured beside it) and 1M (peak memory), dispatch, rate fidelity, contact sync, /get-all-user with
  100,000 contacts, 200 concurrent /send-message. `--rows plan100k,plan1m,dispatch,rate,sync,getalluser,sendmessage`
  and `--backend sqlite,postgresql` pick a part; `plan`, `dispatch` and `rate` are those rows alone
* console – every web console page with 100,000 contacts and a 100,000-delivery run (p95 < 300 ms; bench/console.py)
* healthz – /healthz latency (p50, p99, max) of a real `wecast serve` while it plans a 100,000-recipient run
  for POST /api/v1/campaigns/{id}/run (target p99 < 100 ms: planning never blocks the event loop)
* rich   – a 1,000-recipient campaign with a 5 MB image vs the same text-only run: peak RSS on the sandbox and on
  workpro against the fake puppet (target: within 50 MB of text-only; bench/rich.py)
* wecom  – the official-API gateway against the fake WeCom server on loopback (issue 12): sync 10,000 customers
  of 20 staff members (every 7th followed by two), then a plain-text campaign to all of them as 群发 tasks
  (one per staff member), staff confirm, reconciliation to final states; seconds for each, calls made
* journeys – event -> send latency (p50, p99) at 100 events/s on the sandbox, and one journey tick with 100,000
  enrolled contacts of which 10,000 are due (targets p99 < 2 s, tick < 5 s; bench/journeys.py)

Each measurement runs in a fresh subprocess so peak memory (ru_maxrss) belongs to that measurement only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import scale

ROOT = Path(__file__).resolve().parent.parent
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


def _settings(tmp: Path, *, latency_ms: float = 0, concurrency: int = 64, contacts: int = 200):  # type: ignore[no-untyped-def]
    from engine.settings import load_settings

    cfg = tmp / "config.yaml"
    cfg.write_text(
        "version: 1\n"
        f"database_url: sqlite:///{tmp}/wecast.sqlite\n"
        f"campaigns_dir: {tmp}\n"
        f"sending: {{concurrency: {concurrency}, quiet_hours: null}}\n"
        f"sandbox: {{contacts: {contacts}, state_file: {tmp}/sandbox.sqlite, faults: {{latency_ms: {latency_ms}}}}}\n",
        encoding="utf-8",
    )
    return load_settings(cfg)


def _seed_contacts(db, n: int) -> None:  # type: ignore[no-untyped-def]
    from engine.contacts import record_to_row, tag_to_row
    from engine.gateways.demo_data import demo_contacts, demo_tags
    from storage.contacts import upsert_contacts, upsert_tags

    contacts = demo_contacts(n, 7, now=datetime(2026, 11, 1, tzinfo=UTC))
    now = datetime.now(UTC)
    upsert_tags(db, [tag_to_row(t) for t in demo_tags()])
    upsert_contacts(db, [record_to_row(c) for c in contacts], now)


def _campaign(tmp: Path, settings, rate: float, limit: int | None = None):  # type: ignore[no-untyped-def]
    from engine.spec import load_campaign

    path = tmp / "bench.yaml"
    text = CAMPAIGN.replace("%(rate)s", str(rate)).replace("%(limit)s", f"\n  limit: {limit}" if limit else "")
    path.write_text(text, encoding="utf-8")
    return load_campaign(path, settings)


def seed(folder: str, n: int) -> dict[str, float]:
    """Fill a database with n contacts (its own process, so planning's memory is measured alone)."""
    from storage.db import make_db_engine

    tmp = Path(folder)
    settings = _settings(tmp)
    db = make_db_engine(settings.database_url)
    _seed_contacts(db, n)
    return {"contacts": n}


def one_healthz(folder: str) -> dict[str, float]:
    """Start `wecast serve` on a seeded database, ask it to run the bench campaign (it plans every contact, then
    waits for a login that never comes: only planning loads it) and probe /healthz every 5 ms meanwhile."""
    import shutil
    import socket
    import threading

    import httpx

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "campaigns").mkdir()
        shutil.copy(Path(folder) / "wecast.sqlite", tmp / "wecast.sqlite")
        (tmp / "campaigns" / "bench.yaml").write_text(
            CAMPAIGN.replace("%(rate)s", "1000").replace("%(limit)s", ""), encoding="utf-8"
        )
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        (tmp / "config.yaml").write_text(
            "version: 1\n"
            f"database_url: sqlite:///{tmp}/wecast.sqlite\n"
            f"campaigns_dir: {tmp}/campaigns\n"
            f"sandbox: {{state_file: {tmp}/sandbox.sqlite}}\n"  # serve starts it logged out: nothing is sent
            "scheduler: {contacts_sync: null}\n"
            "log_level: WARNING\n",
            encoding="utf-8",
        )
        server = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "-c", str(tmp / "config.yaml"), "serve", "--port", str(port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=url, timeout=30) as client:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        if client.get("/healthz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"wecast serve did not start: {server.stderr.read() if server.stderr else ''}")
                    time.sleep(0.05)
                answer: dict[str, float] = {}

                def run_now() -> None:
                    t0 = time.perf_counter()
                    with httpx.Client(base_url=url, timeout=120) as c:
                        reply = c.post("/api/v1/campaigns/bench/run").json()
                    answer["seconds"] = time.perf_counter() - t0
                    answer["planned"] = reply["run"]["planned"]

                planner = threading.Thread(target=run_now)
                planner.start()
                latencies: list[float] = []
                while planner.is_alive():
                    t0 = time.perf_counter()
                    client.get("/healthz").raise_for_status()
                    latencies.append(time.perf_counter() - t0)
                    time.sleep(0.005)
                planner.join()
        finally:
            server.terminate()
            server.wait(30)
    latencies.sort()
    return {
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "max_ms": latencies[-1] * 1000,
        "probes": len(latencies),
        "plan_seconds": answer["seconds"],
        "planned": answer["planned"],
    }


def one_wecom(customers: int, staff: int) -> dict[str, float]:
    """Sync, submit and reconcile on the wecom gateway against the fake WeCom (see the module docstring)."""
    from engine.gateways.wecom.fake_server import FakeWecom, FakeWecomServer
    from engine.gateways.wecom.gateway import WecomGateway
    from engine.service import Wecast
    from engine.settings import load_settings
    from engine.spec import load_campaign

    async def go() -> dict[str, float]:
        fake = FakeWecom(customers=customers, staff=staff, shared_every=7)
        server = FakeWecomServer(fake)
        url = await server.start()
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            cfg = tmp / "config.yaml"
            cfg.write_text(
                "version: 1\ngateway: wecom\n"
                f"database_url: sqlite:///{tmp}/wecast.sqlite\ncampaigns_dir: {tmp}\n"
                f"wecom: {{corp_id: {fake.corp_id}, secret: {fake.secret}, base_url: '{url}', "
                f"state_file: {tmp}/wecom.sqlite}}\n",
                encoding="utf-8",
            )
            settings = load_settings(cfg)
            app = Wecast(settings, gateway=WecomGateway(settings.wecom))
            await app.start()
            try:
                t0 = time.perf_counter()
                synced = await app.sync()
                sync_s = time.perf_counter() - t0
                pages = fake.calls["externalcontact/batch/get_by_user"]
                plain = tmp / "member_day.yaml"  # one text for everyone: one task per staff member
                plain.write_text(
                    "id: member_day\nname: 会员日\naudience: {}\nmessage: {template: '本周六会员日，全场8折'}\n"
                    "frequency_cap: false\nquiet_hours: false\n",
                    encoding="utf-8",
                )
                campaign = load_campaign(plain, settings)
                t0 = time.perf_counter()
                outcome = await app.run_campaign(campaign, confirm_wait=0)
                submit_s = time.perf_counter() - t0
                assert outcome.summary is not None
                fake.confirm()
                t0 = time.perf_counter()
                [done] = await app.resume(outcome.summary.run_id, confirm_wait=0)
                reconcile_s = time.perf_counter() - t0
                return {
                    "customers": synced.seen,
                    "sync_seconds": sync_s,
                    "sync_pages": pages,
                    "planned": outcome.plan.planned,
                    "tasks": len(fake.tasks),
                    "submit_seconds": submit_s,
                    "reconcile_seconds": reconcile_s,
                    "sent": done.sent,
                    "received": len(fake.received),
                    "status_completed": float(done.status == "completed"),
                }
            finally:
                await app.close()
                await server.stop()

    return asyncio.run(go())


def _sub(kind: str, *args: str) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "_one", kind, *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark {kind} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", default=["table", "healthz", "console", "wecom", "journeys", "rich"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--plan-n", type=int, default=100_000)
    parser.add_argument("--rows", default=",".join(scale.MEASURE), help="rows of the scale table")
    parser.add_argument("--backend", default="sqlite,postgresql", help="sqlite, postgresql or both")
    args = parser.parse_args()
    if args.which and args.which[0] == "_one":
        kind = args.which[1]
        if kind == "seed":
            result = seed(args.which[2], int(args.which[3]))
        elif kind == "healthz":
            result = one_healthz(args.which[2])
        else:
            result = one_wecom(int(args.which[2]), int(args.which[3]))
        print(json.dumps(result))
        return
    rows = [r for r in args.rows.split(",") if r] if "table" in args.which else []
    rows += [r for name, r in (("plan", "plan100k"), ("dispatch", "dispatch"), ("rate", "rate")) if name in args.which]
    unknown = [r for r in rows if r not in scale.MEASURE]
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)}; rows are {', '.join(scale.MEASURE)}")
    if rows:
        scale.report(list(dict.fromkeys(rows)), [b for b in args.backend.split(",") if b], args.repeat)
    if {"healthz", "console", "wecom"} & set(args.which):
        print(f"wecast benchmarks – median of {args.repeat} runs each, fresh process per run")
    if "healthz" in args.which:
        with tempfile.TemporaryDirectory() as seeded:
            _sub("seed", seeded, str(args.plan_n))
            runs = [_sub("healthz", seeded) for _ in range(args.repeat)]
        p99 = statistics.median(r["p99_ms"] for r in runs)
        print(
            f"/healthz while `wecast serve` plans {runs[0]['planned']:,.0f} recipients: p99 {p99:.1f} ms "
            f"(target < 100 ms), p50 {statistics.median(r['p50_ms'] for r in runs):.1f} ms, worst "
            f"{max(r['max_ms'] for r in runs):.1f} ms over {sum(r['probes'] for r in runs):,.0f} probes; "
            "the run request took " + ", ".join(f"{r['plan_seconds']:.2f}s" for r in runs)
        )
    if "console" in args.which:  # the web console's pages with 100,000 contacts (bench/console.py)
        from bench import console

        console.report(args.plan_n)
    if "journeys" in args.which:  # event -> send latency and one tick at 100,000 enrolled (bench/journeys.py)
        from bench import journeys

        journeys.report(args.repeat)
    if "rich" in args.which:  # a 5 MB image to 1,000 recipients vs text only (bench/rich.py)
        from bench import rich

        rich.report(args.repeat)
    if "wecom" in args.which:
        runs = [_sub("wecom", "10000", "20") for _ in range(args.repeat)]
        r0 = runs[0]
        print(
            f"wecom on the fake server: sync {r0['customers']:,.0f} customers of 20 staff in "
            f"{statistics.median(r['sync_seconds'] for r in runs):.2f} s ({r0['sync_pages']:.0f} batch/get_by_user "
            f"pages); {r0['planned']:,.0f} deliveries as {r0['tasks']:.0f} 群发 tasks in "
            f"{statistics.median(r['submit_seconds'] for r in runs):.2f} s; after the staff confirm, reconciled in "
            f"{statistics.median(r['reconcile_seconds'] for r in runs):.2f} s: {r0['sent']:,.0f} sent, "
            f"{r0['received']:,.0f} received at the fake; runs (sync): "
            + ", ".join(f"{r['sync_seconds']:.2f}s" for r in runs)
        )


if __name__ == "__main__":
    main()
