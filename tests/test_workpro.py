"""The workpro gateway against the fake WorkPro puppet on loopback: discovery, auth, login variants, faults,
reconnects, contact sync at scale, error mapping, and the token staying out of logs."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import random
import time
import tracemalloc
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from engine.errors import (
    AuthError,
    ConfigError,
    LoginError,
    NotLoggedInError,
    PermanentError,
    RateLimitedError,
    TransientError,
    UnknownOutcomeError,
)
from engine.gateways.base import EventKind, LoginState
from engine.gateways.fake_puppet import NEW_DEVICE_TEXT, SELF_ID, SELF_NAME, FakePuppet
from engine.gateways.proto import generate
from engine.gateways.proto import puppet_pb2 as pb
from engine.gateways.workpro import WorkproGateway
from engine.i18n import Language, use_language
from engine.messages import IMAGE_MAX_BYTES, FilePart, ImagePart, Media, PartKind
from engine.settings import WorkproSettings, load_settings

pytestmark = pytest.mark.anyio

TOKEN = "puppet_workpro_s3cr3t7f0e9d8c7b6a5"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings_for(fake: FakePuppet | None, **overrides: Any) -> WorkproSettings:
    values: dict[str, Any] = {
        "token": SecretStr(fake.token if fake else TOKEN),
        "endpoint": fake.endpoint if fake else None,
        "reconnect_delay": timedelta(seconds=0.05),
        "reconnect_max_delay": timedelta(seconds=0.2),
        "call_timeout": timedelta(seconds=5),
        "qr_wait": timedelta(seconds=3),
    }
    values.update(overrides)
    return WorkproSettings.model_validate(values)


Factory = Callable[..., Awaitable[Any]]


@pytest.fixture
async def make_fake() -> AsyncIterator[Factory]:
    fakes: list[FakePuppet] = []

    async def make(**kwargs: Any) -> FakePuppet:
        fake = FakePuppet(**{"token": TOKEN, "contacts": 40, **kwargs})
        await fake.start()
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        await fake.stop()


@pytest.fixture
async def make_gateway() -> AsyncIterator[Factory]:
    gateways: list[WorkproGateway] = []

    async def make(
        settings: WorkproSettings, http_client: httpx.AsyncClient | None = None, start: bool = True
    ) -> WorkproGateway:
        gateway = WorkproGateway(settings, http_client=http_client)
        gateways.append(gateway)
        if start:
            await gateway.start()
        return gateway

    yield make
    for gateway in gateways:
        await gateway.close()


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def login(gateway: WorkproGateway, fake: FakePuppet) -> None:
    status = await gateway.start_login()
    assert status.qrcode_key == fake.qr_key
    await fake.scan()
    await until(lambda: fake.phone_code() is not None)
    await until(lambda: gateway._login.state is LoginState.WAITING_VERIFY_CODE)
    code = fake.phone_code()
    assert code is not None
    status = await gateway.submit_verify_code(code)
    assert (await gateway.wait_for_login(5)).logged_in


def kinds(gateway: WorkproGateway, kind: EventKind) -> list[Any]:
    return [e for e in gateway.events if e.kind is kind]


# -- stubs ------------------------------------------------------------------------------------------
def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    """Regenerating the stubs from puppet.proto gives exactly the committed files."""
    pytest.importorskip("grpc_tools")
    for fresh in generate.generate(tmp_path):
        committed = generate.HERE / fresh.name
        assert committed.read_text(encoding="utf-8") == fresh.read_text(encoding="utf-8"), (
            f"{committed.name} is stale: run `python -m engine.gateways.proto.generate`"
        )


def test_proto_is_wire_compatible_with_juzi() -> None:
    """Service path, and the field numbers the fact sheet pins down."""
    service = pb.DESCRIPTOR.services_by_name["Puppet"]
    assert service.full_name == "wechaty.Puppet"
    assert {
        "Start",
        "Stop",
        "Logout",
        "Ding",
        "Event",
        "EnterVerifyCode",
        "RefreshQRCode",
        "ContactList",
        "ContactPayload",
        "BatchContactPayload",
        "MessageSendText",
        "MessageSendFile",
        "MessageSendUrl",
        "MessageSendMiniProgram",
        "MessagePayload",
        "FriendshipPayload",
        "TagContactTagAdd",
        "TagContactTagRemove",
        "TagTagAdd",
        "TagGroupAdd",
        "TagTagList",
        "TagPayload",
        "TagGroupPayload",
        "CurrentUser",
        "DirtyPayload",
    } <= set(service.methods_by_name)

    def numbers(message: Any) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(pb.EventRequest) == {"seq": 1, "account_id": 2}
    assert numbers(pb.EventResponse) == {"type": 1, "payload": 2, "seq": 3}
    assert numbers(pb.EnterVerifyCodeRequest) == {"id": 1, "code": 2}
    assert numbers(pb.MessageSendTextResponse) == {"id_string_value_deprecated": 1, "id": 2}
    contact = numbers(pb.ContactPayloadResponse)
    assert sorted(contact.values()) == list(range(1, 23))
    assert (contact["additional_info"], contact["tag_ids"], contact["real_name"], contact["aka"]) == (
        19,
        20,
        21,
        22,
    )
    # Rich messages and events (checked field by field against npm @juzi/wechaty-grpc 1.0.100's protos).
    assert numbers(pb.MessageSendFileRequest) == {"conversation_id": 1, "file_box": 2}
    assert numbers(pb.MessageSendUrlRequest) == {"conversation_id": 1, "url_link_deprecated": 2, "url_link": 3}
    assert numbers(pb.UrlLinkPayload) == {"description": 1, "thumbnail_url": 2, "title": 3, "url": 4}
    assert numbers(pb.MessageSendMiniProgramRequest) == {
        "conversation_id": 1,
        "mini_program_deprecated": 2,
        "mini_program": 3,
    }
    assert numbers(pb.MiniProgramPayload) == {
        "appid": 1,
        "description": 2,
        "page_path": 3,
        "icon_url": 4,
        "share_id": 5,
        "thumb_url": 6,
        "title": 7,
        "username": 8,
        "thumb_key": 9,
    }
    message = numbers(pb.MessagePayloadResponse)
    assert (message["text"], message["type"], message["talker_id"], message["room_id"]) == (3, 5, 6, 7)
    assert numbers(pb.FriendshipPayloadResponse)["contact_id"] == 2
    assert numbers(pb.FriendshipPayloadResponse)["type"] == 4
    assert (pb.FRIENDSHIP_TYPE_CONFIRM, pb.FRIENDSHIP_TYPE_DELETE, pb.FRIENDSHIP_TYPE_REMOVED) == (1, 4, 5)
    assert numbers(pb.TagTagAddRequest) == {"deprecated_tag_name": 1, "tag_group_id": 2, "tag_name": 3}
    assert numbers(pb.TagTagAddResponse) == {"deprecated_tag_id": 1, "tag_info": 2}
    assert numbers(pb.TagGroupAddResponse) == {"tag_group_id": 1}
    assert pb.EVENT_TYPE_VERIFY_CODE == 33
    assert pb.EVENT_TYPE_SCAN == 22
    assert pb.EVENT_TYPE_DIRTY == 27


# -- discovery --------------------------------------------------------------------------------------
def discovery(answers: dict[str, tuple[int, Any]], seen: list[str]) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        assert request.url.path == f"/v0/hosties/{TOKEN}"
        status, body = answers[request.url.host]
        if isinstance(body, Exception):
            raise body
        return httpx.Response(status, json=body)

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def test_discovery_tries_authorities_in_order(make_fake: Factory, make_gateway: Factory) -> None:
    """0.0.0.0/port 0 (HTTP 404 or 200) means "not here"; `ip` works as well as `host`."""
    fake = await make_fake()
    seen: list[str] = []
    answers = {
        "juzi.example": (404, {"host": "0.0.0.0", "ip": "0.0.0.0", "port": 0}),
        "zero.example": (200, {"host": "0.0.0.0", "port": 0}),
        "chatie.example": (200, {"ip": "127.0.0.1", "port": fake.port}),
    }
    async with discovery(answers, seen) as client:
        gateway = await make_gateway(settings_for(None, discovery_authorities=list(answers)), client)
        assert seen == ["juzi.example", "zero.example", "chatie.example"]
        assert (await gateway.start_login()).state is LoginState.WAITING_SCAN


async def test_discovery_prefers_host(make_fake: Factory, make_gateway: Factory) -> None:
    """Juzi answers with both `host` and `ip`; `host` is used."""
    fake = await make_fake()
    seen: list[str] = []
    answers = {"juzi.example": (200, {"host": "127.0.0.1", "ip": "10.255.255.1", "port": fake.port})}
    async with discovery(answers, seen) as client:
        gateway = await make_gateway(settings_for(None, discovery_authorities=["juzi.example"]), client)
        assert gateway._endpoint == f"127.0.0.1:{fake.port}"


async def test_discovery_not_found_and_unreachable(make_gateway: Factory) -> None:
    """Unknown everywhere: a permanent error; no discovery reachable: a transient one. No token shown."""
    seen: list[str] = []
    answers: dict[str, tuple[int, Any]] = {
        "a.example": (404, {"host": "0.0.0.0", "port": 0}),
        "b.example": (200, {"host": "0.0.0.0", "ip": "0.0.0.0", "port": 0}),
    }
    async with discovery(answers, seen) as client:
        with pytest.raises(PermanentError) as not_found:
            await make_gateway(settings_for(None, discovery_authorities=list(answers)), client)
    assert "not registered" in str(not_found.value)
    assert TOKEN not in str(not_found.value)
    down: dict[str, tuple[int, Any]] = {"a.example": (0, httpx.ConnectError("boom"))}
    async with discovery(down, seen) as client:
        with pytest.raises(TransientError) as unreachable:
            await make_gateway(settings_for(None, discovery_authorities=["a.example"]), client)
    assert TOKEN not in str(unreachable.value)
    assert "workpro.endpoint" in str(unreachable.value)  # the way around it, named
    # A discovery service that is down or busy says nothing about the token: transient, never "not registered"
    # (wechaty-token retries 5xx; only a 4xx or 0.0.0.0 / port 0 means not found).
    busy: dict[str, tuple[int, Any]] = {"a.example": (503, {"error": "busy"}), "b.example": (429, {})}
    async with discovery(busy, seen) as client:
        with pytest.raises(TransientError) as down_answer:
            await make_gateway(settings_for(None, discovery_authorities=list(busy)), client)
    text = str(down_answer.value)
    assert "HTTP 503" in text and "HTTP 429" in text and "workpro.endpoint" in text
    assert TOKEN not in text
    with use_language(Language.ZH):  # `wecast --lang zh login`
        async with discovery(answers, seen) as client:
            with pytest.raises(PermanentError) as not_found:
                await make_gateway(settings_for(None, discovery_authorities=list(answers)), client)
    assert str(not_found.value).startswith(
        "这个 WorkPro 令牌在所有服务发现地址上都没有登记（a.example：未登记（HTTP 404）"
    )
    assert TOKEN not in str(not_found.value)


@pytest.mark.parametrize(
    ("given", "taken"),
    [
        ("1.2.3.4:8788", "1.2.3.4:8788"),
        ("http://127.0.0.1:50051/", "127.0.0.1:50051"),
        ("grpc://puppet.example.com:443", "puppet.example.com:443"),
        ("[::1]:50051", "[::1]:50051"),
        ("dns:///puppet.example.com:8788", "dns:///puppet.example.com:8788"),
        ("  ", None),
    ],
)
def test_an_endpoint_is_taken_as_host_port(given: str, taken: str | None) -> None:
    """workpro.endpoint as gRPC wants it: a URL's scheme and trailing slash dropped (gRPC took `http://…` for a
    host name), gRPC's own target forms kept, blank meaning discovery."""
    assert WorkproSettings(endpoint=given).endpoint == taken


@pytest.mark.parametrize("given", ["127.0.0.1", "puppet:0", "puppet:99999", "1.2.3.4:8788/puppet", ":8788"])
def test_an_endpoint_without_a_port_is_a_config_error(given: str, tmp_path: Path) -> None:
    """No port (gRPC would quietly dial 443), a port out of range, or a path: an error at the config's line."""
    config = tmp_path / "config.yaml"
    config.write_text(f"version: 1\ngateway: workpro\nworkpro:\n  endpoint: '{given}'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"config.yaml:4: workpro.endpoint: the puppet's address is host:port"):
        load_settings(config)


async def test_explicit_endpoint_skips_discovery(make_fake: Factory, make_gateway: Factory) -> None:
    """workpro.endpoint wins: discovery is never asked."""
    fake = await make_fake()
    seen: list[str] = []
    async with discovery({}, seen) as client:
        await make_gateway(settings_for(fake), client)
    assert seen == []


# -- connection and auth ----------------------------------------------------------------------------
async def test_wrong_token_is_a_clear_error_without_the_token(
    make_fake: Factory, make_gateway: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """UNAUTHENTICATED becomes an AuthError about the token; the token is in neither error nor logs."""
    caplog.set_level(logging.DEBUG)
    fake = await make_fake()
    wrong = "puppet_workpro_wr0ng0000000000000"
    with pytest.raises(AuthError) as caught:
        await make_gateway(settings_for(fake, token=SecretStr(wrong)))
    assert "token" in str(caught.value).lower()
    assert wrong not in str(caught.value)
    assert wrong not in caplog.text
    assert fake.calls == ["Event"]  # Start is not even tried


async def test_token_and_login_errors_are_in_the_callers_language(make_fake: Factory, make_gateway: Factory) -> None:
    """`wecast --lang zh`: a rejected token and a send before login say so in Chinese (the token not shown),
    and so does the QR prompt; read in English, the same error and status are English."""
    fake = await make_fake()
    wrong = "puppet_workpro_wr0ng0000000000000"
    with use_language(Language.ZH), pytest.raises(AuthError) as caught:
        await make_gateway(settings_for(fake, token=SecretStr(wrong)))
    assert str(caught.value).startswith("WorkPro 服务拒绝了令牌（UNAUTHENTICATED）") and wrong not in str(caught.value)
    gateway = await make_gateway(settings_for(fake))
    with pytest.raises(NotLoggedInError) as held:
        await gateway.send_text("c1", "hi", idempotency_key="k")
    with use_language(Language.ZH):  # said in the language of whoever reads it (a request, the CLI)
        assert str(held.value).startswith("无法发送：WorkPro 账号未登录（")
    assert str(held.value).startswith("cannot send: the WorkPro account is not logged in (")
    with use_language(Language.ZH):
        assert (await gateway.start_login()).message == "请用手机企业微信扫描二维码"
    assert (await gateway.login_status()).message == "scan the QR code with WeCom on the phone"


@pytest.mark.parametrize("pasted", [f"{TOKEN}\n", f"  {TOKEN} ", f"\t{TOKEN}\r\n"])
async def test_a_pasted_token_with_spaces_around_works(pasted: str, make_fake: Factory, make_gateway: Factory) -> None:
    """A token from an env file or a chat with a newline or spaces around it is the same token (sent as it was,
    it is invalid gRPC metadata, or an unknown :authority to juzi's server)."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake, token=SecretStr(pasted)))
    await login(gateway, fake)


async def test_a_token_with_spaces_inside_is_refused_first(make_fake: Factory, make_gateway: Factory) -> None:
    """Spaces or control characters inside the token: a PermanentError saying so, nothing sent, the token not
    shown."""
    fake = await make_fake()
    broken = TOKEN[:20] + " \x00" + TOKEN[20:]
    with pytest.raises(PermanentError, match="spaces or control characters") as refused:
        await make_gateway(settings_for(fake, token=SecretStr(broken)))
    assert fake.calls == [] and "s3cr3t" not in str(refused.value)


async def test_connection_refused_is_transient(make_gateway: Factory) -> None:
    """Nothing listening: start raises TransientError quickly (and can be retried)."""
    started = time.monotonic()
    with pytest.raises(TransientError):
        await make_gateway(settings_for(None, endpoint="127.0.0.1:1"))
    assert time.monotonic() - started < 4


async def test_a_second_client_works_without_the_event_stream(make_fake: Factory, make_gateway: Factory) -> None:
    """Only one event stream per token (juzi's server answers a second one ALREADY_EXISTS), but a second client —
    a CLI command while `wecast serve` runs — still starts: it learns the login from CurrentUser, lists contacts
    and sends; and it takes the stream over once the first client lets it go (then events reach it)."""
    fake = await make_fake()
    first = await make_gateway(settings_for(fake))
    await login(first, fake)
    second = await make_gateway(settings_for(fake), start=False)
    second.first_event_wait = 0.5  # start() waits this long in case the other stream is a stale one
    await second.start()
    assert fake.calls.count("Event") >= 3 and not second._stream_up
    status = await second.login_status()
    assert status.logged_in and status.account_id == SELF_ID
    page = await second.list_contacts(page_size=10)
    assert len(page.contacts) == 10
    contact_id = fake.contact_ids()[3]
    await second.send_text(contact_id, "你好", idempotency_key="k")
    assert [s.text for s in fake.sent_to(contact_id)] == ["你好"]
    await first.close()
    await until(lambda: second._stream_up)
    fake.incoming_message(contact_id, "在吗")
    await until(lambda: any(e.data.get("text") == "在吗" for e in kinds(second, EventKind.MESSAGE)))


async def test_a_second_client_cannot_show_the_qr(make_fake: Factory, make_gateway: Factory) -> None:
    """The QR and the verify code go to the client holding the event stream: a second client asked to log in
    says so (a TransientError), instead of waiting for a QR that never comes to it."""
    fake = await make_fake()
    await make_gateway(settings_for(fake))
    second = await make_gateway(settings_for(fake), start=False)
    second.first_event_wait = 0.5
    await second.start()
    assert not (await second.login_status()).logged_in
    with pytest.raises(TransientError, match="gets its QR code"):
        await second.start_login()


async def test_start_login_when_already_logged_in_names_the_account(make_fake: Factory, make_gateway: Factory) -> None:
    """A new process finds the account logged in (the server replays LOGIN): `wecast login` answers "already
    logged in as <name>", not as the account's id, so start_login waits for the name's lookup."""
    fake = await make_fake()
    first = await make_gateway(settings_for(fake))
    await login(first, fake)
    await first.close()
    fake.self_payload_delay = 0.3  # the name's lookup is still under way when start() returns
    again = await make_gateway(settings_for(fake))
    status = await again.start_login()
    assert status.logged_in and status.account_name == SELF_NAME


async def test_closing_at_once_leaves_no_coroutine_never_awaited(make_fake: Factory, make_gateway: Factory) -> None:
    """Background work cancelled before it ran (a short CLI command closes right after start) is closed with its
    task: no "coroutine ... was never awaited" RuntimeWarning when it is collected."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gateway._spawn(gateway._check_current_user())
        await gateway.close()
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []


async def test_event_stream_first_then_start_and_ding(make_fake: Factory, make_gateway: Factory) -> None:
    """Event is opened before Start; Ding runs on its interval and the DONG is noted."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake, ding_interval=timedelta(seconds=0.05)))
    assert fake.calls[:2] == ["Event", "Start"]
    await until(lambda: gateway.last_dong is not None)
    assert "Ding" in fake.calls


# -- login ------------------------------------------------------------------------------------------
async def test_login_events_and_ready_once(make_fake: Factory, make_gateway: Factory) -> None:
    """QR → VERIFY_CODE (id = QR key) → LOGIN → READY once, though the server sends it twice."""
    fake = await make_fake(ready_twice=True)
    gateway = await make_gateway(settings_for(fake))
    status = await gateway.start_login()
    assert status.qr_url
    assert "crtx_auth?key=" in status.qr_url
    assert status.qrcode_key == fake.qr_key
    await login(gateway, fake)
    assert kinds(gateway, EventKind.VERIFY_CODE)[0].data["qrcode_key"] == status.qrcode_key
    await until(lambda: [e.type for e in fake.emitted].count(pb.EVENT_TYPE_READY) == 2)
    fake.emit(pb.EVENT_TYPE_DONG, {"data": "marker"})  # events arrive in order: once this is seen, so are both
    await until(lambda: gateway.last_dong is not None)
    assert len(kinds(gateway, EventKind.READY)) == 1
    assert len(kinds(gateway, EventKind.LOGIN)) == 1
    assert (await gateway.login_status()).account_id == SELF_ID


async def test_verify_code_answer_names_the_account(make_fake: Factory, make_gateway: Factory) -> None:
    """The answer to the right code says logged in, as whom (the account's own name, looked up after LOGIN), and
    no longer "waiting for WeCom to log in" although the server sent LOGIN before answering EnterVerifyCode."""
    fake = await make_fake()
    fake.self_payload_delay = 0.3  # the name lookup is still running when the LOGIN has arrived
    gateway = await make_gateway(settings_for(fake))
    await gateway.start_login()
    await fake.scan()
    await until(lambda: gateway._login.state is LoginState.WAITING_VERIFY_CODE)
    code = fake.phone_code()
    assert code is not None
    status = await gateway.submit_verify_code(code)
    assert status.logged_in
    assert status.account_id == SELF_ID
    assert status.account_name == SELF_NAME
    assert status.message == f"logged in as {SELF_NAME}"
    assert (await gateway.login_status()).message == f"logged in as {SELF_NAME}"


async def test_too_many_tries_message(make_fake: Factory, make_gateway: Factory) -> None:
    """The third wrong code is WeCom's threshold: the error tells the user to scan the new QR."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await gateway.start_login()
    await fake.scan()
    await until(lambda: gateway._login.state is LoginState.WAITING_VERIFY_CODE)
    for expected in (2, 1):
        with pytest.raises(LoginError, match="wrong verification code") as wrong:
            await gateway.submit_verify_code("000000" if fake.phone_code() != "000000" else "111111")
        assert wrong.value.tries_left == expected
    with pytest.raises(LoginError, match="scan the new QR") as final:
        await gateway.submit_verify_code("000000" if fake.phone_code() != "000000" else "111111")
    assert final.value.tries_left == 0


@pytest.mark.parametrize("server_pushes_a_qr", [True, False])
async def test_after_too_many_tries_the_dead_qr_is_dropped_and_a_new_one_shown(
    server_pushes_a_qr: bool, make_fake: Factory, make_gateway: Factory
) -> None:
    """After the third wrong code that QR is dead: the status stops asking for a code for it (a code typed
    then is refused here, not sent for the dead key) until the new QR comes — pushed by the server, or asked
    for with RefreshQRCode when none comes — with 3 tries again; its code logs in."""
    fake = await make_fake()
    fake.new_qr_after_tries = server_pushes_a_qr
    gateway = await make_gateway(settings_for(fake, qr_wait=timedelta(seconds=0.3)))
    first = (await gateway.start_login()).qrcode_key
    await fake.scan()
    await until(lambda: gateway._login.state is LoginState.WAITING_VERIFY_CODE)
    for _ in range(3):
        with pytest.raises(LoginError):
            await gateway.submit_verify_code("000000" if fake.phone_code() != "000000" else "111111")
    status = await gateway.login_status()
    if status.qrcode_key is None:  # the new QR has not come yet
        assert status.state is LoginState.LOGGED_OUT and "wait for the new QR" in status.message
        with pytest.raises(LoginError, match="no QR code is waiting"):
            await gateway.submit_verify_code("123456")
    await until(lambda: gateway._login.qr_key not in (None, first))
    assert ("RefreshQRCode" in fake.calls) is not server_pushes_a_qr
    status = await gateway.login_status()
    assert status.state is LoginState.WAITING_SCAN and status.tries_left == 3 and status.qrcode_key == fake.qr_key
    await fake.scan()
    await until(lambda: gateway._login.state is LoginState.WAITING_VERIFY_CODE)
    code = fake.phone_code()
    assert code is not None
    assert (await gateway.submit_verify_code(code)).logged_in


async def test_a_slider_check_is_reported(make_fake: Factory, make_gateway: Factory) -> None:
    """VERIFY_SLIDE after the scan (no RPC answers it): the login status and an ERROR event say so at once."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await gateway.start_login()
    await fake.scan()
    fake.ask_slider()
    await until(lambda: bool(kinds(gateway, EventKind.ERROR)))
    assert kinds(gateway, EventKind.ERROR)[0].data == {"verify_slide": True}
    assert "slider" in (await gateway.login_status()).message


async def test_second_verification_qr(make_fake: Factory, make_gateway: Factory) -> None:
    """After login WeCom may log out with the new-device text and show a secondaryEquipment QR; scanning it
    logs in again."""
    fake = await make_fake(second_verification=True)
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    await until(lambda: gateway._login.state is LoginState.WAITING_SCAN)
    status = await gateway.login_status()
    assert status.second_verification
    assert status.qrcode_key == fake.qr_key
    logout = kinds(gateway, EventKind.LOGOUT)[-1]
    assert logout.message == NEW_DEVICE_TEXT
    assert logout.data["second_verification"] is True
    assert kinds(gateway, EventKind.SECOND_VERIFICATION)
    await fake.scan()
    assert (await gateway.wait_for_login(5)).logged_in
    assert len(kinds(gateway, EventKind.LOGIN)) == 2


async def test_second_verification_without_marker_in_url(make_fake: Factory, make_gateway: Factory) -> None:
    """A plain QR right after the new-device LOGOUT, or one with type=2, is also the security QR."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    fake.emit(pb.EVENT_TYPE_LOGOUT, {"contactId": SELF_ID, "data": NEW_DEVICE_TEXT})
    fake.emit(
        pb.EVENT_TYPE_SCAN,
        {"status": 2, "qrcode": "https://wx.work.weixin.qq.com/cgi-bin/crtx_auth?key=AB&wx=1"},
    )
    await until(lambda: gateway._login.state is LoginState.WAITING_SCAN)
    assert (await gateway.login_status()).second_verification
    fake.emit(pb.EVENT_TYPE_SCAN, {"status": 2, "type": 2, "qrcode": "https://x.example/q?key=CD"})
    await until(lambda: gateway._login.qr_key == "CD")
    assert (await gateway.login_status()).second_verification
    fake.emit(pb.EVENT_TYPE_SCAN, {"status": 2, "qrcode": "https://x.example/q?key=EF"})
    await until(lambda: gateway._login.qr_key == "EF")
    assert not (await gateway.login_status()).second_verification


# -- reconnect --------------------------------------------------------------------------------------
async def test_dropped_stream_reconnects_and_keeps_the_login(make_fake: Factory, make_gateway: Factory) -> None:
    """A reset stream is re-opened with the last seq and account id; the replayed LOGIN changes nothing."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    fake.drop_event_stream()
    await until(lambda: len(fake.event_requests) == 2 and fake._stream is not None)
    await until(
        lambda: any(
            e.data.get("state") == "up" and "re-opened" in e.message for e in kinds(gateway, EventKind.CONNECTION)
        )
    )
    fake.emit(pb.EVENT_TYPE_DONG, {"data": "marker"})  # after the replayed LOGIN in stream order
    await until(lambda: gateway.last_dong is not None)
    seq, account = fake.event_requests[1]
    assert seq > 0
    assert account == SELF_ID
    assert (await gateway.login_status()).logged_in
    assert len(kinds(gateway, EventKind.LOGIN)) == 1
    receipt = await gateway.send_text(fake.contact_ids()[0], "still here", idempotency_key="r1")
    assert receipt.message_id == fake.sends[-1].message_id


async def test_reconnect_delay_uses_the_injected_random_source(make_fake: Factory) -> None:
    """The reconnect backoff draws its jitter from the gateway's injected random source (not the global one), so
    a seeded gateway waits exactly the delay the shared backoff formula gives for that seed."""
    import random

    from engine.backoff import backoff_delay

    fake = await make_fake()
    settings = settings_for(fake)
    gateway = WorkproGateway(settings, rng=random.Random(5))
    await gateway.start()
    try:
        await login(gateway, fake)
        fake.drop_event_stream()
        await until(lambda: any(e.data.get("state") == "reconnecting" for e in kinds(gateway, EventKind.CONNECTION)))
        [event] = [e for e in kinds(gateway, EventKind.CONNECTION) if e.data.get("state") == "reconnecting"]
        expected = backoff_delay(
            0,
            base=settings.reconnect_delay.total_seconds(),
            cap=settings.reconnect_max_delay.total_seconds(),
            rng=random.Random(5),
        )
        assert event.data["delay"] == round(expected, 3)
    finally:
        await gateway.close()


async def test_reconnect_does_not_need_seq(make_fake: Factory, make_gateway: Factory) -> None:
    """juzi's server always sends seq 0: the gateway neither requires nor invents one."""
    fake = await make_fake(zero_seq=True)
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    fake.drop_event_stream()
    await until(lambda: len(fake.event_requests) == 2)
    assert fake.event_requests[1] == (0, SELF_ID)
    await until(lambda: fake._stream is not None)
    assert (await gateway.login_status()).logged_in


async def test_a_silent_stream_is_given_up_and_reopened(make_fake: Factory, make_gateway: Factory) -> None:
    """A stream that stays open but delivers nothing (a connection a NAT forgot, no reset) is given up after
    three Ding intervals without an event, as juzi's client's watchdog does, and re-opened: the login holds and
    the customers' new messages arrive again."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake, ding_interval=timedelta(seconds=0.2)))
    await login(gateway, fake)
    customer = fake.contact_ids()[0]
    fake.stall_event_stream()
    fake.incoming_message(customer, "lost with the dead connection")
    await until(lambda: len(fake.event_requests) >= 2 and fake._stream is not None)
    lost = [e for e in kinds(gateway, EventKind.CONNECTION) if e.data.get("state") == "reconnecting"]
    assert lost and "no event for 0.6 s" in lost[0].message
    await until(lambda: gateway._stream_up)
    assert (await gateway.login_status()).logged_in
    assert len(kinds(gateway, EventKind.LOGIN)) == 1
    fake.incoming_message(customer, "在吗")
    await until(lambda: any(e.data.get("text") == "在吗" for e in kinds(gateway, EventKind.MESSAGE)))


async def test_the_resume_point_is_forgotten_after_a_logout(make_fake: Factory, make_gateway: Factory) -> None:
    """juzi's client resumes the stream with the last seq and account, but forgets both on LOGOUT (and a seq
    older than 2 minutes): after a logout the gateway asks for no account's cached events."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    gateway._last_event_at -= 600  # the last event was 10 minutes ago: its seq is not worth asking for
    fake.drop_event_stream()
    await until(lambda: len(fake.event_requests) == 2 and gateway._stream_up)
    assert fake.event_requests[1] == (0, SELF_ID)
    await until(lambda: gateway._last_seq > 0)  # the replayed events carry fresh seqs
    await gateway.logout()
    fake.drop_event_stream()
    await until(lambda: len(fake.event_requests) == 3)
    assert fake.event_requests[2][1] == ""


async def test_a_send_cut_by_a_server_restart_is_unknown_and_never_resent(
    make_fake: Factory, make_gateway: Factory
) -> None:
    """The puppet service restarts while a send is in flight: the message was delivered, so the send is an
    unknown outcome (never retried blindly); sends while it is down never left, and wait as for a login (not
    logged in: the server cannot be reached); once it is back the gateway reconnects, starts the account again and
    is still logged in, and the next send goes out once."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    customer = fake.contact_ids()[0]
    fake.send_delay = 2.0
    send = asyncio.create_task(gateway.send_text(customer, "周年庆通知", idempotency_key="d1"))
    await until(lambda: len(fake.sends) == 1)
    await fake._server.stop(grace=0)  # the service goes down with the send in flight ...
    with pytest.raises(UnknownOutcomeError):
        await send
    with pytest.raises(NotLoggedInError, match="cannot be reached"):  # ... and nothing is listening for a moment
        await gateway.send_text(customer, "second", idempotency_key="d2")
    assert not (await gateway.login_status()).logged_in
    fake.send_delay = 0.0
    await fake.restart()  # ... then it is back, its event seq starting again
    await until(lambda: fake.running and gateway._stream_up, timeout=10)
    assert (await gateway.login_status()).logged_in
    await gateway.send_text(customer, "second", idempotency_key="d2")
    assert [s.text for s in fake.sent_to(customer)] == ["周年庆通知", "second"]


# -- contacts ---------------------------------------------------------------------------------------
async def test_contacts_and_tags(make_fake: Factory, make_gateway: Factory) -> None:
    """Contacts come through BatchContactPayload (matched by id), the account itself left out though ContactList
    names it (it is no customer: never synced, never sent to); tags carry their group names."""
    fake = await make_fake(contacts=250)
    gateway = await make_gateway(settings_for(fake, contact_batch_size=40))
    await login(gateway, fake)
    page = await gateway.list_contacts(None, 100)
    assert page.total == 250 and SELF_ID not in [c.id for c in page.contacts]
    assert page.next_cursor == "100"
    assert len(page.contacts) == 100
    assert [c.id for c in page.contacts] == fake.contact_ids()[:100]  # our order, whatever the server's
    assert fake.calls.count("BatchContactPayload") == 3
    assert "ContactPayload" not in fake.calls[fake.calls.index("ContactList") :]
    tags = {t.id: t for t in await gateway.list_tags()}
    assert tags["et_vip"].group_name == "客户等级"
    assert tags["et_vip"].type == 2
    assert tags["pt_old"].group_name == ""
    assert tags["pt_old"].type == 1


async def test_a_list_right_after_the_login_waits_for_ready(make_fake: Factory, make_gateway: Factory) -> None:
    """Between LOGIN and READY ("data ready") the puppet is still loading the account's contacts and lists only
    some; a sync then would mark the rest removed. The first list after a login watched here waits for READY and
    has everyone; a process that finds the account logged in already does not wait for a READY."""
    fake = await make_fake(ready_delay=0.5)
    fake.partial_until_ready = True
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    assert fake.loading  # READY has not come yet
    page = await gateway.list_contacts(None, 100)
    assert page.total == 40 and [c.id for c in page.contacts] == fake.contact_ids()
    await gateway.close()
    fake.ready_delay = 5.0
    again = await make_gateway(settings_for(fake))
    started = time.monotonic()
    assert (await again.list_contacts(None, 100)).total == 40
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("mode", ["unimplemented", "not_a_function", "fail"])
async def test_batch_fallback(mode: str, make_fake: Factory, make_gateway: Factory) -> None:
    """Without a working BatchContactPayload every contact still arrives, via ContactPayload per id."""
    fake = await make_fake(contacts=120, batch_mode=mode)
    gateway = await make_gateway(settings_for(fake, contact_batch_size=50))
    await login(gateway, fake)
    ids = await all_ids(gateway, 1000)
    assert sorted(ids) == sorted(fake.contact_ids())
    assert fake.calls.count("ContactPayload") >= 120
    if mode != "fail":
        assert fake.calls.count("BatchContactPayload") <= 3  # tried once per chunk, then never again
        await gateway.list_contacts(None, 1000)
        assert fake.calls.count("BatchContactPayload") <= 3


async def all_ids(gateway: WorkproGateway, page_size: int) -> list[str]:
    ids: list[str] = []
    cursor: str | None = None
    while True:
        page = await gateway.list_contacts(cursor, page_size)
        ids.extend(c.id for c in page.contacts)
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor


@pytest.mark.parametrize("mode", ["ok", "fail", "not_a_function"])
async def test_contacts_that_vanish_mid_sync_are_skipped(mode: str, make_fake: Factory, make_gateway: Factory) -> None:
    """ContactList gives every id at once (no server paging); customers who delete the account before their page
    is read are simply missing from it (BatchContactPayload leaves them out, ContactPayload answers 'contact not
    found'): the sync goes on with everyone else, no error, nobody twice."""
    fake = await make_fake(contacts=120, batch_mode=mode)
    gateway = await make_gateway(settings_for(fake, contact_batch_size=50))
    await login(gateway, fake)
    first = await gateway.list_contacts(None, 60)
    assert first.total == 120 and first.next_cursor == "60"
    gone = fake.contact_ids()[70:75]
    for contact_id in gone:
        fake.remove_contact(contact_id, deliver=False)
    rest = await gateway.list_contacts(first.next_cursor, 60)
    assert rest.next_cursor is None
    seen = [c.id for c in first.contacts + rest.contacts]
    assert len(seen) == len(set(seen)) == 115
    assert not set(gone) & set(seen)


async def test_ten_thousand_contacts_sync_fast(make_fake: Factory, make_gateway: Factory) -> None:
    """10,000 contacts: one ContactList and 100 batch calls, no per-contact call on the critical path."""
    fake = await make_fake(contacts=10_000)
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    # Login looks up the account's own name (one ContactPayload) before it answers: not part of the sync.
    assert (await gateway.login_status()).account_name == SELF_NAME
    before = len(fake.calls)
    started = time.perf_counter()
    ids = await all_ids(gateway, 500)
    elapsed = time.perf_counter() - started
    assert len(ids) == len(set(ids)) == 10_000
    calls = fake.calls[before:]
    assert calls.count("ContactList") == 1
    assert calls.count("BatchContactPayload") == 100
    assert calls.count("ContactPayload") == 0
    print(f"\n10,000-contact sync: {elapsed:.2f} s")
    assert elapsed < 30


async def test_dirty_event_refreshes_contact(make_fake: Factory, make_gateway: Factory) -> None:
    """DIRTY(contact) becomes CONTACT_CHANGED, and get_contact reads the new data."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    contact_id = fake.contact_ids()[5]
    fake.touch_contact(contact_id, name="新名字", tag_ids=["et_vip"])
    await until(lambda: bool(kinds(gateway, EventKind.CONTACT_CHANGED)))
    assert kinds(gateway, EventKind.CONTACT_CHANGED)[0].data == {"contact_id": contact_id}
    contact = await gateway.get_contact(contact_id)
    assert contact is not None
    assert contact.name == "新名字"
    assert contact.tag_ids == ("et_vip",)


# -- sending ----------------------------------------------------------------------------------------
async def test_send_faults_map_to_error_kinds(make_fake: Factory, make_gateway: Factory) -> None:
    """20001 → rate limited, UNAVAILABLE → transient; neither delivered anything, the next send works."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    contact_id = fake.contact_ids()[0]
    fake.throttle_sends(1)
    with pytest.raises(RateLimitedError):
        await gateway.send_text(contact_id, "a", idempotency_key="1")
    fake.fail_sends(1)
    with pytest.raises(TransientError) as unavailable:
        await gateway.send_text(contact_id, "a", idempotency_key="1")
    assert type(unavailable.value) is TransientError
    assert fake.sends == []
    await gateway.send_text(contact_id, "a", idempotency_key="1")
    assert len(fake.sends) == 1


async def test_send_timeout_is_unknown_outcome(make_fake: Factory, make_gateway: Factory) -> None:
    """A deadline after the request left is UnknownOutcomeError: the fake did deliver it."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake, call_timeout=timedelta(seconds=0.3)))
    await login(gateway, fake)
    fake.send_delay = 1.0
    with pytest.raises(UnknownOutcomeError):
        await gateway.send_text(fake.contact_ids()[0], "slow", idempotency_key="1")
    assert len(fake.sends) == 1


async def test_message_id_falls_back_to_field_one(
    make_fake: Factory, make_gateway: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Servers that fill only the old wrapped id (field 1) still give us a message id."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    original = FakePuppet.MessageSendText

    async def old_style(self: FakePuppet, request: Any, context: Any) -> Any:
        response = await original(self, request, context)
        response.id = ""
        return response

    monkeypatch.setattr(FakePuppet, "MessageSendText", old_style)
    receipt = await gateway.send_text(fake.contact_ids()[0], "hi", idempotency_key="1")
    assert receipt.message_id == fake.sends[-1].message_id


async def test_without_upload_a_five_megabyte_image_is_read_and_encoded_once(
    make_fake: Factory, make_gateway: Factory, tmp_path: Path
) -> None:
    """On a server without Upload, a 5 MB poster to 10 customers: the file is read and base64-encoded into a
    FileBox once (cached by content), and every customer receives exactly its bytes."""
    fake = await make_fake(uploads="unimplemented")
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    data = b"\x89PNG\r\n\x1a\n" + random.Random(5).randbytes(5 * 1024 * 1024)
    path = tmp_path / "poster.png"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    part = ImagePart(Media(name="poster.png", path=path, size=len(data), sha256=digest, mime="image/png"))
    contacts = fake.contact_ids()[:10]
    for contact_id in contacts:
        await gateway.send_part(contact_id, part, idempotency_key=f"poster-{contact_id}")
    assert gateway.files.reads == 1
    assert [(s.contact_id, s.kind, s.sha256, s.size) for s in fake.sends] == [
        (c, PartKind.IMAGE, digest, len(data)) for c in contacts
    ]


async def test_without_upload_concurrent_image_sends_carry_one_filebox_at_a_time(
    make_fake: Factory, make_gateway: Factory, tmp_path: Path
) -> None:
    """On a server without Upload, eight sends of a 5 MB poster at once (the dispatcher's default concurrency)
    build and send one request carrying it inline at a time — each request is a copy of the FileBox — while small
    files still go side by side; every customer receives the poster exactly once, and nothing is left counted in
    flight."""
    fake = await make_fake(uploads="unimplemented")
    gateway = await make_gateway(settings_for(fake, call_timeout=timedelta(seconds=30)))
    await login(gateway, fake)
    data = b"\x89PNG\r\n\x1a\n" + random.Random(6).randbytes(5 * 1024 * 1024)
    path = tmp_path / "poster.png"
    path.write_bytes(data)
    poster = ImagePart(
        Media(name="poster.png", path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest(), mime="image/png")
    )
    contacts = fake.contact_ids()[:8]
    await asyncio.gather(*(gateway.send_part(c, poster, idempotency_key=f"p-{c}") for c in contacts))
    box = len(await gateway.files.get(poster.media, IMAGE_MAX_BYTES))
    assert box > 5 * 1024 * 1024  # base64: the request is bigger than the file
    assert gateway.in_flight.peak == box  # one at a time
    assert gateway.in_flight.used == 0
    assert sorted(s.contact_id for s in fake.sends) == sorted(contacts)
    small_data = b"\x89PNG\r\n\x1a\n" + random.Random(7).randbytes(50_000)
    (tmp_path / "small.png").write_bytes(small_data)
    small = ImagePart(Media(name="small.png", path=tmp_path / "small.png", size=len(small_data), mime="image/png"))
    gateway.in_flight.peak = 0
    await asyncio.gather(*(gateway.send_part(c, small, idempotency_key=f"s-{c}") for c in contacts))
    assert gateway.in_flight.peak > len(await gateway.files.get(small.media, IMAGE_MAX_BYTES))  # several at once
    assert gateway.in_flight.used == 0


async def test_a_file_send_that_finds_no_room_is_transient_and_never_left(
    make_fake: Factory, make_gateway: Factory, tmp_path: Path
) -> None:
    """While other large files fill the bytes in flight, a file send waits at most half the call timeout, then is
    a TransientError (retried later) — not a timeout the dispatcher would have to call an unknown outcome; the
    fake received nothing."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake, call_timeout=timedelta(seconds=0.2)))
    await login(gateway, fake)
    data = b"\x89PNG\r\n\x1a\n" + random.Random(8).randbytes(2000)
    (tmp_path / "p.png").write_bytes(data)
    part = ImagePart(Media(name="p.png", path=tmp_path / "p.png", size=len(data), mime="image/png"))
    await gateway.in_flight.acquire(gateway.in_flight.limit)  # another send's 8 MiB
    with pytest.raises(TransientError, match=r"not sent: waited 0.1 s for other sends of large files"):
        await gateway.send_part(fake.contact_ids()[0], part, idempotency_key="wait")
    assert fake.sends == [] and gateway.in_flight.used == gateway.in_flight.limit
    gateway.in_flight.release(gateway.in_flight.limit)
    await gateway.send_part(fake.contact_ids()[0], part, idempotency_key="wait")
    assert [s.kind for s in fake.sends] == [PartKind.IMAGE]


def poster_file(tmp_path: Path, seed: int, size: int, name: str = "poster.png") -> ImagePart:
    """A PNG-looking local image of `size` random bytes, declared with its sha256 as the campaign checks it."""
    data = b"\x89PNG\r\n\x1a\n" + random.Random(seed).randbytes(size)
    path = tmp_path / name
    path.write_bytes(data)
    return ImagePart(
        Media(name=name, path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest(), mime="image/png")
    )


async def test_local_files_go_by_upload_then_a_uuid_filebox(
    make_fake: Factory, make_gateway: Factory, tmp_path: Path
) -> None:
    """As juzi's client sends them: each send of local content first streams the bytes with Upload (in chunks,
    the file read once per content), then MessageSendFile carries a FileBox of type Uuid (7) naming that upload
    with the name and size — never base64. One upload per send (an uploaded uuid is loadable once); every
    customer got exactly the file's bytes; no request of an upload is empty (juzi's server fails on one)."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    poster = poster_file(tmp_path, 11, 700_000)  # three chunks
    (tmp_path / "价目表.pdf").write_bytes(b"%PDF-1.4 price list")
    price_list = FilePart(Media(name="价目表.pdf", path=tmp_path / "价目表.pdf"))
    contacts = fake.contact_ids()[:3]
    for contact_id in contacts:
        await gateway.send_part(contact_id, poster, idempotency_key=f"p-{contact_id}")
    await gateway.send_part(contacts[0], price_list, idempotency_key="pdf")
    calls = [c for c in fake.calls if c in ("Upload", "MessageSendFile")]
    assert calls == ["Upload", "MessageSendFile"] * 4
    assert [(b["type"], b["boxType"], b["name"], b["size"]) for b in fake.file_boxes] == [
        (7, 7, "poster.png", poster.media.size)
    ] * 3 + [(7, 7, "价目表.pdf", 19)]
    assert [b["uuid"] for b in fake.file_boxes] == list(fake.uploads)  # each upload named by one send
    assert all(u.used for u in fake.uploads.values())
    assert [(s.contact_id, s.kind, s.sha256, s.size) for s in fake.sends] == [
        (c, PartKind.IMAGE, poster.media.sha256, poster.media.size) for c in contacts
    ] + [(contacts[0], PartKind.FILE, hashlib.sha256(b"%PDF-1.4 price list").hexdigest(), 19)]
    assert gateway.uploads == 4 and gateway.contents.reads == 2  # each file read once
    assert fake.empty_upload_chunks == 0
    assert gateway.files.reads == 0  # nothing encoded as base64
    assert gateway.in_flight.used == 0


async def test_a_server_without_upload_gets_base64_once_told(
    make_fake: Factory, make_gateway: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An older or open-source server answers Upload with UNIMPLEMENTED: the gateway falls back to the inline
    (base64) FileBox, says so in one log line, and does not try Upload again on that connection."""
    fake = await make_fake(uploads="unimplemented")
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    poster = poster_file(tmp_path, 12, 300_000)
    contacts = fake.contact_ids()[:3]
    with caplog.at_level(logging.WARNING, logger="wecast.gateway.workpro"):
        for contact_id in contacts:
            await gateway.send_part(contact_id, poster, idempotency_key=f"p-{contact_id}")
            if contact_id == contacts[0]:
                # one, or two when gRPC lost the first answer to a chunk's write (then an Upload of nothing asks again)
                asked = fake.calls.count("Upload")
                assert asked in (1, 2)
    assert fake.calls.count("Upload") == asked  # not asked again on this connection
    assert [b["type"] for b in fake.file_boxes] == [1, 1, 1]
    assert [(s.contact_id, s.sha256) for s in fake.sends] == [(c, poster.media.sha256) for c in contacts]
    told = [r.getMessage() for r in caplog.records if "Upload" in r.getMessage()]
    assert told == ["workpro: the server has no Upload; local images and files go inline (base64)"]


async def test_a_cut_upload_is_not_sent_and_its_retry_arrives_once(
    make_fake: Factory, make_gateway: Factory, tmp_path: Path
) -> None:
    """An upload cut mid-stream (the connection reset) delivered nothing: a TransientError saying so — not an
    unknown outcome — and the retry uploads again and arrives exactly once."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    poster = poster_file(tmp_path, 13, 900_000)
    first, contact_id = fake.contact_ids()[:2]
    await gateway.send_part(first, poster, idempotency_key="first")
    fake.cut_uploads(1)
    with pytest.raises(TransientError) as cut:
        await gateway.send_part(contact_id, poster, idempotency_key="p")
    assert not isinstance(cut.value, UnknownOutcomeError)
    # gRPC's client reports the reset, or (when a chunk's write meets the ended call) its own failure to write
    assert str(cut.value) in {
        f"not sent: the upload of poster.png to WorkPro failed ({why})"
        for why in ("Connection reset by peer", "Internal error from Core")
    }
    assert [s.contact_id for s in fake.sends] == [first] and len(fake.uploads) == 1 and fake.cut_upload_count == 1
    assert fake.calls.count("MessageSendFile") == 1 and gateway.in_flight.used == 0
    await gateway.send_part(contact_id, poster, idempotency_key="p")
    assert [(s.contact_id, s.sha256, s.size) for s in fake.sends] == [
        (c, poster.media.sha256, poster.media.size) for c in (first, contact_id)
    ]


async def test_a_changed_or_empty_file_is_never_uploaded_nor_sent(
    make_fake: Factory, make_gateway: Factory, tmp_path: Path
) -> None:
    """A file that changed after the campaign checked it (its sha256), or is empty, is refused (PermanentError)
    before anything is uploaded or sent."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    poster = poster_file(tmp_path, 14, 400_000)
    assert poster.media.path is not None
    poster.media.path.write_bytes(b"\x89PNG\r\n\x1a\n another picture")
    with pytest.raises(PermanentError, match=r"changed after it was checked"):
        await gateway.send_part(fake.contact_ids()[0], poster, idempotency_key="p")
    assert fake.sends == [] and "MessageSendFile" not in fake.calls and "Upload" not in fake.calls
    (tmp_path / "empty.png").write_bytes(b"")
    empty = ImagePart(Media("empty.png", tmp_path / "empty.png"))
    with pytest.raises(PermanentError, match=r"is empty"):
        await gateway.send_part(fake.contact_ids()[0], empty, idempotency_key="e")
    assert fake.sends == [] and "Upload" not in fake.calls


async def test_an_upload_holds_a_few_chunks_of_the_file_not_the_file(
    make_fake: Factory, make_gateway: Factory, tmp_path: Path
) -> None:
    """Memory: once the 5 MB poster is read (one copy, kept by content), another send of it by Upload allocates
    (Python heap, the fake's side included) well under the file's size — a chunk at a time, never a copy of the
    whole nor an encoding — where the inline path builds a 6.7 MB request at least; eight at once stay within
    `in_flight` and all arrive once, the file read once."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake, call_timeout=timedelta(seconds=30)))
    await login(gateway, fake)
    poster = poster_file(tmp_path, 15, 5 * 1024 * 1024)
    contacts = fake.contact_ids()[:8]
    await gateway.send_part(contacts[0], poster, idempotency_key="zero")
    tracemalloc.start()
    try:
        await gateway.send_part(contacts[0], poster, idempotency_key="one")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024, peak
    await asyncio.gather(*(gateway.send_part(c, poster, idempotency_key=f"p-{c}") for c in contacts[1:]))
    assert gateway.in_flight.peak <= gateway.in_flight.limit and gateway.in_flight.used == 0
    assert sorted((s.contact_id, s.sha256) for s in fake.sends) == sorted(
        (c, poster.media.sha256) for c in [contacts[0], *contacts]
    )
    assert gateway.contents.reads == 1


async def test_refused_image_is_that_parts_failure(make_fake: Factory, make_gateway: Factory, tmp_path: Path) -> None:
    """WorkPro's refusal of an image (23060) is a PermanentError naming the image and the server's reason; a
    throttled image (20001) is rate limited like a text."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    path = tmp_path / "poster.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n poster")
    part = ImagePart(Media(name="poster.png", path=path))
    contact_id = fake.contact_ids()[0]
    fake.refuse_parts(PartKind.IMAGE)
    with pytest.raises(PermanentError) as refused:
        await gateway.send_part(contact_id, part, idempotency_key="1")
    assert (
        str(refused.value) == "WorkPro refused the image poster.png: WorkproErrorCode: 23060, cgi error code: (-4048)"
    )
    fake.throttle_sends(1)
    with pytest.raises(RateLimitedError):
        await gateway.send_part(contact_id, part, idempotency_key="1")
    assert fake.sends == []
    assert [r.kind for r in fake.rejected] == [PartKind.IMAGE, PartKind.IMAGE]


# -- customer events and tags ----------------------------------------------------------------------------
async def test_group_chat_and_non_text_messages(make_fake: Factory, make_gateway: Factory) -> None:
    """A message in a group chat is not a customer's message to us; an image from a customer is a MESSAGE with
    no text and its type."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    contact_id = fake.contact_ids()[2]
    fake.incoming_message(contact_id, "大家好", room_id="R:10696051737544800@chatroom")
    fake.incoming_message(contact_id, "", message_type=pb.MESSAGE_TYPE_IMAGE)
    fake.incoming_message(contact_id, "marker")
    await until(lambda: any(e.data.get("text") == "marker" for e in kinds(gateway, EventKind.MESSAGE)))
    assert [(e.data["text"], e.data["type"]) for e in kinds(gateway, EventKind.MESSAGE)] == [
        ("", "image"),
        ("marker", "text"),
    ]


async def test_a_dropped_contact_event_is_caught_by_the_next_sync(make_fake: Factory, make_gateway: Factory) -> None:
    """A new customer whose FRIENDSHIP event was lost emits nothing, but the next sync lists them; a contact the
    account deleted is CONTACT_REMOVED by the account."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    lost = fake.add_contact("林小雨", deliver=False)
    seen = fake.add_contact("marker")
    await until(lambda: bool(kinds(gateway, EventKind.CONTACT_ADDED)))
    assert [e.data["contact_id"] for e in kinds(gateway, EventKind.CONTACT_ADDED)] == [seen]
    assert kinds(gateway, EventKind.CONTACT_ADDED)[0].data == {
        "contact_id": seen,
        "staff_id": SELF_ID,
        "welcome_code": "",
    }
    assert lost in {c.id for c in (await gateway.list_contacts(None, 1000)).contacts}
    fake.remove_contact(seen, by_customer=False)
    await until(lambda: bool(kinds(gateway, EventKind.CONTACT_REMOVED)))
    assert kinds(gateway, EventKind.CONTACT_REMOVED)[0].data == {
        "contact_id": seen,
        "staff_id": SELF_ID,
        "by": "account",
    }


async def test_our_own_tag_change_comes_back_as_contact_changed(make_fake: Factory, make_gateway: Factory) -> None:
    """TagContactTagAdd makes the server push DIRTY for that contact, which is CONTACT_CHANGED (journeys diff it)."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    contact_id = fake.contact_ids()[4]
    tag = next(t for t in ("et_vip", "et_lead", "pt_old") if t not in fake._contacts[contact_id].tag_ids)
    await gateway.add_contact_tags(contact_id, [tag])
    await until(lambda: any(e.data == {"contact_id": contact_id} for e in kinds(gateway, EventKind.CONTACT_CHANGED)))
    assert tag in fake._contacts[contact_id].tag_ids


async def test_create_tag_makes_its_group_once(make_fake: Factory, make_gateway: Factory) -> None:
    """create_tag adds a missing group once (TagGroupAdd), reuses it and existing groups, and reports the type."""
    fake = await make_fake()
    gateway = await make_gateway(settings_for(fake))
    await login(gateway, fake)
    bought = await gateway.create_tag("已购", "购买状态")
    again = await gateway.create_tag("复购", "购买状态")
    level = await gateway.create_tag("SVIP", "客户等级")
    personal = await gateway.create_tag("待回电")
    assert fake.calls_with == [
        ("TagGroupAdd", "购买状态"),
        ("TagTagAdd", "已购"),
        ("TagTagAdd", "复购"),
        ("TagTagAdd", "SVIP"),
        ("TagTagAdd", "待回电"),
    ]
    assert {bought.type, again.type, level.type} == {pb.TAG_TYPE_CORPORATION}
    assert personal.type == pb.TAG_TYPE_PERSONAL
    tags = {t.id: t for t in await gateway.list_tags()}
    assert (tags[level.id].group_name, tags[again.id].group_name) == ("客户等级", "购买状态")


# -- secrets ----------------------------------------------------------------------------------------
async def test_token_never_logged(make_fake: Factory, make_gateway: Factory, caplog: pytest.LogCaptureFixture) -> None:
    """Discovery (httpx logs the URL), login, faults, reconnects and logout: the token appears nowhere."""
    caplog.set_level(logging.DEBUG)
    fake = await make_fake()
    seen: list[str] = []
    async with discovery({"juzi.example": (200, {"host": "127.0.0.1", "port": fake.port})}, seen) as client:
        gateway = await make_gateway(settings_for(None, discovery_authorities=["juzi.example"]), client)
    assert seen == ["juzi.example"]
    await login(gateway, fake)
    fake.throttle_sends(1)
    with pytest.raises(RateLimitedError):
        await gateway.send_text(fake.contact_ids()[0], "x", idempotency_key="1")
    fake.drop_event_stream()
    await until(lambda: len(fake.event_requests) == 2)
    await gateway.logout()
    assert "hosties" in caplog.text  # httpx did log the request...
    assert TOKEN not in caplog.text  # ...with the token redacted
    assert TOKEN not in repr(gateway)


async def test_session_lost_while_disconnected_is_noticed(make_fake: Factory, make_gateway: Factory) -> None:
    """If the account logged out while the stream was down, the reconnect's CurrentUser check says so."""
    fake = await make_fake()
    gateway = await make_gateway(
        settings_for(fake, reconnect_delay=timedelta(seconds=0.3), reconnect_max_delay=timedelta(seconds=0.3))
    )
    await login(gateway, fake)
    fake.drop_event_stream()
    await until(lambda: fake._stream is None)
    fake.logged_in = False  # e.g. logged out on the phone; the LOGOUT event went nowhere
    await until(lambda: gateway._login.state is LoginState.LOGGED_OUT)
    assert "while the event stream was down" in kinds(gateway, EventKind.LOGOUT)[-1].message
    with pytest.raises(NotLoggedInError):
        await gateway.send_text(fake.contact_ids()[0], "x", idempotency_key="1")
