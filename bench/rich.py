"""Rich messages' memory: a 1,000-recipient campaign with a 5 MB image beside the same campaign as text only.

    python -m bench.rich [--repeat 3] [--n 1000] [--image-mb 5] [--gateways sandbox,workpro]
                         [--workpro-uploads ok|unimplemented]
    python -m bench.run rich                  # the same, with bench.run's --repeat

Each run is a fresh process that syncs the contacts, plans the campaign and dispatches it to the end; its peak
resident memory (`ru_maxrss`) is the figure, the median of `--repeat` runs. The target (issue 10): the image run
stays within 50 MB of the text-only run — the poster is read and hashed once, never held per recipient.

* sandbox: the simulated account in the process (it keeps each image's hash and size in its outbox).
* workpro: the gateway against the fake WorkPro puppet on loopback gRPC. The fake runs in a process of its own,
  so its memory is not counted; it reports what it received, which is checked: every recipient got the image
  once, with the content's sha256. The image goes as juzi's client sends it: read once, streamed with `Upload`
  for each send, then a FileBox naming the upload (`--workpro-uploads unimplemented`: a
  server without Upload, where it goes inline as base64, encoded once).

The image is a real PNG of random pixels (it does not compress), made once per benchmark with Pillow.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGET_MB = 50
CAMPAIGN = """
id: rich_bench
name: 海报压测
audience:
  limit: %(n)s
message:
  parts:%(image)s
    - text: |
        {{ display_name }}您好！双十一会员日，全场满300减50，海报请查收。回复TD退订。
dedupe: run
frequency_cap: false
quiet_hours: false
throttle: {per_second: 100000}
max_errors: 0
"""
IMAGE_PART = "\n    - image: poster.png"


def make_image(path: Path, mb: float) -> None:
    """A PNG of about `mb` MB of random pixels (random data does not compress, so the file is that big)."""
    from PIL import Image

    width = 1250
    height = int(mb * 1_000_000 / (width * 3)) + 1
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(path, compress_level=1)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- the fake puppet's process ------------------------------------------------------------------------------


def puppet_main(contacts: int, uploads: str = "ok") -> None:
    """Serve a FakePuppet; print `port N`, then `code XXXXXX` when the phone shows one; answer `count` on stdin
    with what it received (JSON: parts by kind, images and their distinct sha256)."""
    from engine.gateways.fake_puppet import FakePuppet

    async def go() -> None:
        fake = FakePuppet(contacts=contacts, auto_scan_after=0.05, uploads=uploads)  # type: ignore[arg-type]
        port = await fake.start()
        print(f"port {port}", flush=True)
        loop = asyncio.get_running_loop()
        shown = None

        async def codes() -> None:
            nonlocal shown
            while True:
                code = fake.phone_code()
                if code and code != shown:
                    shown = code
                    print(f"code {code}", flush=True)
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(codes())
        try:
            while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
                if line == "count":
                    images = [s for s in fake.sends if s.kind.value == "image"]
                    kinds: dict[str, int] = {}
                    for s in fake.sends:
                        kinds[s.kind.value] = kinds.get(s.kind.value, 0) + 1
                    answer = {
                        "kinds": kinds,
                        "image_recipients": len({s.contact_id for s in images}),
                        "image_hashes": sorted({s.sha256 for s in images}),
                    }
                    print(json.dumps(answer), flush=True)
        finally:
            watcher.cancel()
            await fake.stop()

    asyncio.run(go())


class Puppet:
    """The fake puppet in a child process, spoken to over its stdin and stdout."""

    def __init__(self, contacts: int, uploads: str = "ok") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.rich", "_puppet", str(contacts), uploads],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = int(self._line("port"))

    def _line(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            if line.startswith(prefix + " "):
                return line.split(" ", 1)[1].strip()
        raise SystemExit(f"the fake puppet stopped before printing {prefix!r}")

    def code(self) -> str:
        return self._line("code")

    def count(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- one measured run ---------------------------------------------------------------------------------------


def one(gateway: str, kind: str, image: str, n: int, uploads: str = "ok") -> dict[str, Any]:
    """Sync, plan and dispatch the campaign (`kind`: text or image) to n recipients on `gateway`, in this (fresh)
    process; its peak RSS and what the gateway received."""
    from engine.service import Wecast
    from engine.settings import load_settings
    from engine.spec import load_campaign

    contacts = int(n * 1.3) + 20  # some demo contacts are coworkers or not friends: enough for n recipients
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if kind == "image":
            shutil.copyfile(image, tmp / "poster.png")
        (tmp / "campaign.yaml").write_text(
            CAMPAIGN.replace("%(n)s", str(n)).replace("%(image)s", IMAGE_PART if kind == "image" else ""),
            encoding="utf-8",
        )
        puppet = Puppet(contacts, uploads) if gateway == "workpro" else None
        extra = (
            "gateway: workpro\n"
            f"workpro: {{endpoint: '127.0.0.1:{puppet.port}', token: puppet_workpro_fake0123456789abcdef, "
            "call_timeout: 120s, qr_wait: 10s}\n"
            if puppet
            else ""
        )
        cfg = tmp / "config.yaml"
        cfg.write_text(
            "version: 1\n"
            f"database_url: sqlite:///{tmp}/wecast.sqlite\n"
            f"campaigns_dir: {tmp}\n"
            "log_level: WARNING\n"
            "sending: {quiet_hours: null, frequency_cap: null}\n"  # the default concurrency (8 sends at once)
            f"sandbox: {{contacts: {contacts}, state_file: {tmp}/sandbox.sqlite}}\n" + extra,
            encoding="utf-8",
        )
        settings = load_settings(cfg)

        async def go() -> dict[str, Any]:
            async with Wecast(settings) as app:
                gw: Any = app.gateway
                if puppet is not None:
                    await gw.start_login()
                    code = puppet.code()
                    deadline = time.monotonic() + 20
                    while not (await gw.submit_verify_code(code)).logged_in:
                        assert time.monotonic() < deadline, "the login did not finish"
                        await asyncio.sleep(0.05)
                await app.sync()
                campaign = load_campaign(tmp / "campaign.yaml", settings)
                before = _peak_mb()
                plan = app.plan(campaign)
                assert plan.planned == n, f"planned {plan.planned}, wanted {n}"
                t0 = time.perf_counter()
                summary = await app.dispatcher.run(plan.run_id)
                seconds = time.perf_counter() - t0
                peak = _peak_mb()  # before the outbox is read back to check it
                reads = gw.files.reads + (gw.contents.reads if puppet is not None else 0)  # workpro: raw + base64
                uploads = getattr(gw, "uploads", 0)
                received = _sandbox_received(gw) if puppet is None else {}
            return {
                "peak_mb": peak,
                "before_plan_mb": before,
                "seconds": seconds,
                "sent": summary.sent,
                "counts": {str(k): v for k, v in summary.counts.items()},
                "file_reads": reads,
                "uploads": uploads,
                "received": received,
            }

        try:
            result = asyncio.run(go())
            if puppet is not None:
                result["received"] = puppet.count()
        finally:
            if puppet is not None:
                puppet.close()
    return result


def _sandbox_received(gateway: Any) -> dict[str, Any]:
    recipients: set[str] = set()
    hashes: set[str] = set()
    for m in gateway.store.messages():
        if m.kind == "image":
            recipients.add(m.contact_id)
            hashes.add(m.content_hash)
    return {"image_recipients": len(recipients), "image_hashes": sorted(hashes)}


# -- the report ---------------------------------------------------------------------------------------------


def _sub(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.rich", "_one", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"bench.rich {' '.join(args)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def report(
    repeat: int = 3,
    n: int = 1000,
    image_mb: float = 5,
    gateways: tuple[str, ...] = ("sandbox", "workpro"),
    uploads: str = "ok",
) -> bool:
    """Print the figures; True when every gateway is within the target."""
    print(f"rich messages – {n:,} recipients, a {image_mb:g} MB image vs text only; peak RSS, median of {repeat} runs")
    ok = True
    with tempfile.TemporaryDirectory() as d:
        image = Path(d) / "poster.png"
        make_image(image, image_mb)
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        size_mb = image.stat().st_size / 1_000_000
        for gateway in gateways:
            runs: dict[str, list[dict[str, Any]]] = {"text": [], "image": []}
            for _ in range(repeat):  # interleaved, so a noisy minute hits both
                for kind in ("text", "image"):
                    r = _sub(gateway, kind, str(image), str(n), uploads)
                    assert r["sent"] == n, r
                    runs[kind].append(r)
            for r in runs["image"]:
                got = r["received"]
                assert got["image_recipients"] == n and got["image_hashes"] == [digest], (gateway, got)
            text = statistics.median(r["peak_mb"] for r in runs["text"])
            img = statistics.median(r["peak_mb"] for r in runs["image"])
            within = img - text <= TARGET_MB
            ok &= within
            print(
                f"  {gateway:8} text-only {text:6.1f} MB, with the {size_mb:.1f} MB image {img:6.1f} MB: "
                f"+{img - text:.1f} MB (target ≤ {TARGET_MB} MB) {'ok' if within else 'OVER'}; "
                f"image read whole {statistics.median(r['file_reads'] for r in runs['image']):.0f}x, "
                f"uploaded {statistics.median(r['uploads'] for r in runs['image']):.0f}x for {n:,} recipients; "
                f"dispatch {statistics.median(r['seconds'] for r in runs['text']):.1f} s text, "
                f"{statistics.median(r['seconds'] for r in runs['image']):.1f} s image; "
                f"runs (text/image MB): "
                + ", ".join(
                    f"{t['peak_mb']:.0f}/{i['peak_mb']:.0f}" for t, i in zip(runs["text"], runs["image"], strict=True)
                )
            )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--image-mb", type=float, default=5)
    parser.add_argument("--gateways", default="sandbox,workpro")
    parser.add_argument("--workpro-uploads", choices=("ok", "unimplemented"), default="ok", help="the fake's Upload")
    args = parser.parse_args()
    if args.which and args.which[0] == "_one":
        gateway, kind, image, n, uploads = args.which[1:6]
        print(json.dumps(one(gateway, kind, image, int(n), uploads)))
        return
    if args.which and args.which[0] == "_puppet":
        puppet_main(int(args.which[1]), args.which[2])
        return
    gateways = tuple(g for g in args.gateways.split(",") if g)
    ok = report(args.repeat, args.n, args.image_mb, gateways, args.workpro_uploads)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
