"""The workpro gateway against juzi's own open-source puppet server (npm @juzi/wechaty-puppet-service's
PuppetServer, in Node) around a WorkPro-like puppet (`tests/juzi/server.mjs`): the real server's auth, event
stream, upload registry and error texts, which the fake puppet only imitates.

It needs Node and the npm packages, pinned in `.ci/juzi/package.json` and its lock, which `.ci/run` installs
into `.ci/juzi/node_modules` (gitignored) and points WECAST_JUZI_SERVER_DIR at; the tests never fetch. By hand:

    npm ci --prefix .ci/juzi && pytest tests/test_workpro_juzi.py

WECAST_JUZI_SERVER_DIR (default: `.ci/juzi`) names another folder holding the packages. Without them the tests
skip, except under CI (`CI` set), where they fail: a green CI has run them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from engine import i18n
from engine.errors import AuthError, LoginError, PermanentError, TransientError
from engine.gateways.base import EventKind, LoginState
from engine.gateways.workpro import WorkproGateway
from engine.messages import FilePart, ImagePart, LinkPart, Media, MiniProgramPart
from engine.settings import WorkproSettings

pytestmark = pytest.mark.anyio

TOKEN = "puppet_workpro_4f1d2c3b5a69788776"
SELF_ID = "1688000000000001"
CODE = "123456"
SCRIPT = Path(__file__).parent / "juzi" / "server.mjs"
SERVER_DIR = Path(os.environ.get("WECAST_JUZI_SERVER_DIR") or Path(__file__).parents[1] / ".ci" / "juzi")


def _server_dir() -> Path:
    if shutil.which("node") is None or not (SERVER_DIR / "node_modules/@juzi/wechaty-puppet-service").is_dir():
        message = f"no node, or no @juzi/wechaty-puppet-service installed in {SERVER_DIR} (see this file's docstring)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message + " (CI is set: .ci/run installs it)", pytrace=False)
        pytest.skip(message)
    return SERVER_DIR


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class JuziServer:
    process: subprocess.Popen[str]
    port: int
    tls: bool
    lines: list[dict[str, Any]] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def sends(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("ev") == "send"]

    def alive(self) -> bool:
        return self.process.poll() is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(tls: bool, port: int = 0) -> JuziServer:
    folder = _server_dir()
    script = folder / "wecast-juzi-server.mjs"  # beside node_modules, so its imports resolve
    shutil.copyfile(SCRIPT, script)
    port = port or _free_port()
    args = ["node", str(script), str(port), TOKEN, *(["tls"] if tls else [])]
    env = {**os.environ, "WECHATY_LOG": "silent"}
    process = subprocess.Popen(args, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    server = JuziServer(process, port, tls)

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("{"):
                server.lines.append(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 30
    while not any(line.get("ev") == "listening" for line in server.lines):
        assert process.poll() is None and time.monotonic() < deadline, "the juzi server did not start"
        time.sleep(0.05)
    return server


def _stop(server: JuziServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture
def juzi() -> Iterator[JuziServer]:
    server = _start(tls=False)
    yield server
    _stop(server)


@pytest.fixture
async def gateways() -> AsyncIterator[list[WorkproGateway]]:
    made: list[WorkproGateway] = []
    yield made
    for gateway in made:
        await gateway.close()


async def connect(gateways: list[WorkproGateway], server: JuziServer, **settings: Any) -> WorkproGateway:
    values: dict[str, Any] = {"token": SecretStr(TOKEN), "endpoint": server.endpoint, "call_timeout": "10s"}
    gateway = WorkproGateway(WorkproSettings.model_validate({**values, **settings}))
    gateways.append(gateway)
    await gateway.start()
    return gateway


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def log_in(gateway: WorkproGateway) -> None:
    await gateway.start_login()
    await until(lambda: gateway._login.state is LoginState.WAITING_VERIFY_CODE)
    assert (await gateway.submit_verify_code(f" {CODE}\n")).logged_in


async def test_login_with_wrong_codes_then_the_new_qr(juzi: JuziServer, gateways: list[WorkproGateway]) -> None:
    """QR → VERIFY_CODE (id = the QR's key) → two wrong codes (tries left) → the third: the dead QR is dropped,
    the server's new QR shown → its code logs in, named; logout, then a new QR."""
    gateway = await connect(gateways, juzi)
    first = (await gateway.start_login()).qrcode_key
    assert first and len(first) == 32
    await until(lambda: gateway._login.state is LoginState.WAITING_VERIFY_CODE)
    for left in (2, 1):
        with pytest.raises(LoginError) as wrong:
            await gateway.submit_verify_code("000000")
        assert wrong.value.tries_left == left
    with pytest.raises(LoginError, match="scan the new QR"):
        await gateway.submit_verify_code("000000")
    await until(lambda: gateway._login.qr_key not in (None, first))
    await until(lambda: gateway._login.state is LoginState.WAITING_VERIFY_CODE)
    status = await gateway.submit_verify_code(CODE)
    assert status.logged_in and status.account_id == SELF_ID and status.account_name == "客服小王"
    await until(lambda: [line["id"] for line in juzi.lines if line.get("ev") == "enterVerifyCode"][-1] != first)
    status = await gateway.logout()
    assert status.state is not LoginState.LOGGED_IN
    await until(lambda: gateway._login.qr_key is not None)


async def test_sync_and_every_kind_of_send(juzi: JuziServer, gateways: list[WorkproGateway], tmp_path: Path) -> None:
    """Contacts (the account itself left out, tags named), then a text, an uploaded image and file, a link card
    and a mini-program card, each reaching the puppet once, whole; a customer's answer is a MESSAGE event, our own
    echo is not; tags on and off. The server is still running afterwards (an empty upload request ended it)."""
    gateway = await connect(gateways, juzi)
    await log_in(gateway)
    page = await gateway.list_contacts()
    assert page.total == 25 and SELF_ID not in [c.id for c in page.contacts]
    assert [t.name for t in await gateway.list_tags()] == ["VIP"]
    contact = page.contacts[3].id
    image = tmp_path / "poster.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2000)  # 512 KiB: several upload chunks
    (tmp_path / "价目表.pdf").write_bytes(b"%PDF-1.4 " * 100)
    await gateway.send_text(contact, "ECHO", idempotency_key="t")
    await gateway.send_part(contact, ImagePart(Media("poster.png", image)), idempotency_key="i")
    await gateway.send_part(contact, FilePart(Media("价目表.pdf", tmp_path / "价目表.pdf")), idempotency_key="f")
    await gateway.send_part(contact, LinkPart(url="https://example.com/s", title="店庆"), idempotency_key="l")
    await gateway.send_part(contact, MiniProgramPart(appid="wx1", title="领券", page="p/i"), idempotency_key="m")
    await until(lambda: len(juzi.sends()) == 5)  # the server's stdout is read by a thread
    got = [(s["kind"], s.get("name"), s.get("size")) for s in juzi.sends()]
    assert got == [
        ("text", None, None),
        ("file", "poster.png", image.stat().st_size),
        ("file", "价目表.pdf", 900),
        ("url", None, None),
        ("mini", None, None),
    ]
    await until(lambda: any(e.kind is EventKind.MESSAGE for e in gateway.events))
    assert [e.data["text"] for e in gateway.events if e.kind is EventKind.MESSAGE] == ["价格多少"]
    await gateway.add_contact_tags(contact, ["t1"])
    await until(lambda: any(e.kind is EventKind.CONTACT_CHANGED for e in gateway.events))
    assert "t1" in (await gateway.get_contact(contact) or page.contacts[0]).tag_ids
    await gateway.remove_contact_tags(contact, ["t1"])
    with pytest.raises(PermanentError, match="contact nobody not found"):
        await gateway.send_text("nobody", "hi", idempotency_key="n")
    assert juzi.alive()


async def test_a_second_client_on_the_token_works(juzi: JuziServer, gateways: list[WorkproGateway]) -> None:
    """juzi's server refuses a second event stream: a second process still sends, logged in by CurrentUser."""
    first = await connect(gateways, juzi)
    await log_in(first)
    second = await connect(gateways, juzi)
    assert (await second.login_status()).account_id == SELF_ID
    await second.send_text("c0002", "from the second process", idempotency_key="s")
    await until(lambda: bool(juzi.sends()))
    assert [s["text"] for s in juzi.sends()] == ["from the second process"]


async def test_tls_with_juzis_built_in_certificate(gateways: list[WorkproGateway]) -> None:
    """juzi's server with TLS on and no certificate of its own: the token's name fails with a hint, the name
    `insecure` (its built-in certificate's) with the embedded Wechaty root CA logs in and sends."""
    server = _start(tls=True)
    try:
        with pytest.raises(TransientError, match=r"set workpro\.tls_server_name"):
            await connect(gateways, server, tls=True)
        with pytest.raises(TransientError, match=r"set workpro\.tls: true"):
            await connect(gateways, server)
        gateway = await connect(gateways, server, tls=True, tls_server_name="insecure")
        await log_in(gateway)
        await gateway.send_text("c0001", "over TLS", idempotency_key="t")
        await until(lambda: bool(server.sends()))
        assert [s["text"] for s in server.sends()] == ["over TLS"]
    finally:
        _stop(server)


async def test_contacts_come_in_pages_each_id_once(juzi: JuziServer, gateways: list[WorkproGateway]) -> None:
    """25 contacts in pages of 10: cursors 10, 20, then none; every customer once, the account itself never."""
    gateway = await connect(gateways, juzi)
    await log_in(gateway)
    seen: list[str] = []
    cursors: list[str | None] = []
    cursor: str | None = None
    while True:
        page = await gateway.list_contacts(cursor, page_size=10)
        assert page.total == 25
        seen += [c.id for c in page.contacts]
        cursor = page.next_cursor
        cursors.append(cursor)
        if cursor is None:
            break
    assert cursors == ["10", "20", None]
    assert seen == [f"c{i:04d}" for i in range(25)]
    assert {c.name for c in (await gateway.list_contacts(None, page_size=1)).contacts} == {"客户c0000"}


async def test_a_token_the_server_rejects(
    juzi: JuziServer, gateways: list[WorkproGateway], caplog: pytest.LogCaptureFixture
) -> None:
    """juzi's server refuses another token: connecting fails with an error that says the token is wrong, and
    neither the error nor the log shows the token."""
    wrong = "puppet_workpro_0badc0ffee0badc0ffee"
    caplog.set_level("DEBUG")
    with pytest.raises(AuthError, match="token") as refused:
        await connect(gateways, juzi, token=SecretStr(wrong))
    assert wrong not in str(refused.value) and wrong[15:] not in str(refused.value)
    assert wrong[15:] not in caplog.text
    assert not juzi.sends() and juzi.alive()


CAMPAIGN = """\
id: juzi_away
name: 店庆
audience: {}
message:
  template: "{{ name }}您好，店庆八折"
quiet_hours: false
frequency_cap: false
throttle: {per_second: 20}
"""


async def test_the_server_going_away_mid_run(tmp_path: Path) -> None:
    """A 25-recipient run whose juzi server is killed after 5 sends: the run stops with the rest recorded pending,
    no attempt used (before, each burnt its retries on "failed to connect" and ended `failed` for good); a new
    server on the same address, a new login, and the resumed run sends each of the others once — no customer
    gets the message twice across the two servers."""
    from engine.service import Wecast
    from engine.spec import load_campaign
    from storage.deliveries import list_deliveries
    from storage.models import DeliveryStatus, RunStatus

    try:
        from web_harness import make_settings
    except ImportError:  # pragma: no cover - if tests/ becomes a package
        from tests.web_harness import make_settings

    first = _start(tls=False)
    workpro = {
        "endpoint": first.endpoint,
        "token": TOKEN,
        "call_timeout": "5s",
        "reconnect_delay": "0.05s",
        "reconnect_max_delay": "0.2s",
    }
    retry = {"max_attempts": 3, "base_delay": "0.05s", "max_delay": "0.1s"}
    settings = make_settings(tmp_path, gateway="workpro", workpro=workpro, sending={"concurrency": 2, "retry": retry})
    (tmp_path / "campaigns" / "juzi_away.yaml").write_text(CAMPAIGN, encoding="utf-8")
    app = Wecast(settings)
    gateway = app.gateway
    assert isinstance(gateway, WorkproGateway)
    second: JuziServer | None = None
    try:
        await app.start()
        await log_in(gateway)
        assert (await app.sync()).seen == 25
        campaign = load_campaign(tmp_path / "campaigns" / "juzi_away.yaml", settings)
        run = asyncio.create_task(app.run_campaign(campaign, login_wait=1))
        await until(lambda: len(first.sends()) >= 5)
        first.process.kill()
        first.process.wait(10)
        outcome = await asyncio.wait_for(run, 30)
        assert outcome.summary is not None and outcome.summary.status is RunStatus.RUNNING
        assert "not logged in" in outcome.summary.message
        status = await gateway.login_status()
        assert not status.logged_in and status.message == "WorkPro cannot be reached: sends wait until it answers again"
        with i18n.use_language(i18n.Language.ZH):
            assert (await gateway.login_status()).message == "无法连接 WorkPro：发送会等它恢复后再继续"
        rows = list_deliveries(app.db, run_id=outcome.plan.run_id, limit=100)
        by_status = {s: {r.contact_id for r in rows if r.status is s} for s in DeliveryStatus}
        assert {s for s, ids in by_status.items() if ids} <= {"sent", "pending", "unknown"}
        assert len(by_status[DeliveryStatus.UNKNOWN]) <= 2  # a send in flight when the server died, if any
        assert by_status[DeliveryStatus.SENT] <= {s["conversationId"] for s in first.sends()}
        assert len(by_status[DeliveryStatus.PENDING]) >= 25 - len(first.sends()) - 2

        second = _start(tls=False, port=first.port)
        await until(lambda: gateway._login.qr_key is not None and not gateway._login.logged_in, timeout=20)
        await log_in(gateway)
        [summary] = await app.resume(outcome.plan.run_id, login_wait=5)
        assert summary.status is RunStatus.COMPLETED
    finally:
        await app.close()
        for server in (first, second):
            if server is not None and server.alive():
                _stop(server)
    assert second is not None
    rows = list_deliveries(app.db, run_id=outcome.plan.run_id, limit=100)
    assert sorted(s["conversationId"] for s in second.sends()) == sorted(by_status[DeliveryStatus.PENDING])
    received = Counter(s["conversationId"] for s in first.sends() + second.sends())
    assert max(received.values()) == 1
    assert {r.contact_id for r in rows if r.status is DeliveryStatus.SENT} | by_status[DeliveryStatus.UNKNOWN] == {
        f"c{i:04d}" for i in range(25)
    }
