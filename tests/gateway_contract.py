"""The gateway contract, as one test suite every gateway must pass (the APScheduler data-store pattern).

A gateway plugs in through a small *driver*: the gateway under test plus the few things only a test can do
to its far side (scan the QR with the "phone", read the code the phone shows, confirm 群发 tasks as the staff
member would, look at what the recipient received). `tests/test_gateway_contract.py` builds one driver per gateway
and runs `GatewayContract` on each.

The capabilities decide which tests apply, at collection: each gateway is a `Flavour` (its name, the capabilities
its settings give it, known without building it, and how to build its driver), each test says which flavours it
applies to (`@applies(predicate)`; none: every one), and `GatewayContract.pytest_generate_tests` parametrizes it
over exactly those — nothing is collected only to be skipped. The driver fixture checks that the gateway it built
has the capabilities its flavour claimed, so the selection cannot drift from the code. What a gateway claims is
tested; what it lacks, it must refuse cleanly (for good, sending nothing):

* `qr_login` — the QR + verification-code tests; a gateway that logs in with configured credentials (the official
  API) passes `test_credential_login` instead: start_login logs in at once, there is no code to submit, logout
  holds every call until start_login.
* `direct_send` — the one-message-at-a-time tests (text and every part kind it supports); a task-based gateway
  must refuse `send_text`, `send_part` and `send` for good.
* `batch_send` — the 群发 task tests: nothing delivered before staff confirm, then exactly once per customer (every
  part of the message), unknown customers rejected, a resubmission under the same key the same task; a direct
  gateway must refuse `submit_batch` and the task calls for good.
* `idempotent_sends`, `supports`, `tags`, `events` — the tests of each; a part kind outside `supports` is refused.
* `welcome` — a gateway without it refuses `send_welcome` for good (the official API's welcome is tested with its
  callbacks in tests/test_wecom_*.py).
* What the far side can do: `Flavour.customer_messages` is False where a test cannot make a customer write (the
  official API does not deliver customers' messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import pytest

from engine.errors import LoginError, NotLoggedInError, PermanentError
from engine.gateways.base import (
    BatchOutcome,
    Capabilities,
    ContactRecord,
    EventKind,
    Gateway,
    GatewayEvent,
    LoginState,
    LoginStatus,
)
from engine.messages import (
    FilePart,
    ImagePart,
    LinkPart,
    Media,
    Message,
    MiniProgramPart,
    Part,
    PartKind,
    TextPart,
)


@dataclass(frozen=True)
class Delivered:
    """One message part as the recipient's side recorded it. `text`: a text part's text, a card's title, or an
    image's or file's name. `sha256` / `size`: an image's or file's content as received ('' / 0 for other kinds).
    `url`: a link card's target, or the URL an image or file was sent by ('' otherwise)."""

    contact_id: str
    text: str
    message_id: str
    kind: PartKind = PartKind.TEXT
    sha256: str = ""
    size: int = 0
    url: str = ""


class GatewayDriver(Protocol):
    """What the contract suite needs besides the gateway itself."""

    gateway: Gateway
    unknown_contact_id: str

    async def scan(self) -> None:
        """The phone scans the QR that is showing."""

    def phone_code(self) -> str | None:
        """The verification code the phone shows after a scan."""

    def sent_messages(self) -> list[Delivered]:
        """Every message part the far side received, oldest first."""

    def contact_ids(self) -> set[str]:
        """The ids of all contacts the account has."""

    def refuse_next(self, kind: PartKind, reason: str) -> None:
        """The far side refuses the next part of `kind` for good, saying `reason`."""

    async def confirm(self) -> None:
        """Staff confirm every waiting 群发 task (task-based gateways; nothing to do for the others)."""

    async def customer_writes(self, contact_id: str, text: str) -> None:
        """The customer sends the account a text message (a driver whose far side cannot skips the test)."""

    async def customer_adds(self, name: str) -> str:
        """A new customer adds the account (and is confirmed); returns the new contact's id."""

    async def customer_removes(self, contact_id: str) -> None:
        """The customer deletes the account."""


DriverFactory = Callable[[], AbstractAsyncContextManager[GatewayDriver]]
SEVERAL = frozenset({PartKind.TEXT, PartKind.IMAGE, PartKind.LINK})  # test_send_message_of_several_parts


@dataclass(frozen=True)
class Flavour:
    """One gateway as the contract runs it, known at collection (see the module docstring). `capabilities`: what
    the gateway built by `make` has (checked when it is built). `make(folder)`: a factory of its drivers, keeping
    any state under `folder`."""

    name: str
    capabilities: Capabilities
    make: Callable[[Path], DriverFactory]
    customer_messages: bool = True  # the far side can make a customer write to the account

    def sends(self, *kinds: PartKind) -> bool:
        """Whether the gateway sends parts of these kinds directly (one contact at a time)."""
        return self.capabilities.direct_send and set(kinds) <= self.capabilities.supports

    def __str__(self) -> str:
        return self.name


TestFn = TypeVar("TestFn", bound=Callable[..., Any])


def applies(predicate: Callable[..., bool]) -> Callable[[TestFn], TestFn]:
    """The flavours a contract test runs on: `predicate(flavour)`, or `predicate(flavour, kind)` for a test that
    takes a part `kind` (run for each pair it accepts)."""

    def mark(test: TestFn) -> TestFn:
        test.contract_applies = predicate  # type: ignore[attr-defined]
        return test

    return mark


async def wait_for_state(gateway: Gateway, state: LoginState, timeout: float = 5.0) -> LoginStatus:
    """Poll login_status until it reaches `state` (events arrive asynchronously on real gateways)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status = await gateway.login_status()
        if status.state is state or loop.time() > deadline:
            return status
        await asyncio.sleep(0.01)


async def wait_for_phone_code(driver: GatewayDriver, timeout: float = 5.0) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (code := driver.phone_code()) is None:
        assert loop.time() < deadline, "the phone never showed a verification code"
        await asyncio.sleep(0.01)
    return code


async def log_in(driver: GatewayDriver) -> LoginStatus:
    """The happy path: QR, scan, right code, logged in."""
    gateway = driver.gateway
    status = await gateway.start_login()
    if status.logged_in:
        return status
    await driver.scan()
    await wait_for_state(gateway, LoginState.WAITING_VERIFY_CODE)
    await gateway.submit_verify_code(await wait_for_phone_code(driver), status.qrcode_key)
    status = await gateway.wait_for_login(5.0)
    assert status.logged_in, status
    return status


def media_file(folder: Path, name: str, data: bytes, mime: str) -> Media:
    """A local media file as validation describes it (size and sha256 of the content)."""
    path = folder / name
    path.write_bytes(data)
    return Media(name=name, path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest(), mime=mime)


def png(width: int = 64, height: int = 48) -> bytes:
    """A real PNG image (what WeCom takes as an image), different for each size."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (230, 60, 40)).save(out, "PNG")
    return out.getvalue()


def sample_parts(folder: Path) -> dict[PartKind, Part]:
    """One part of every kind, as a rendered campaign would carry them."""
    poster = media_file(folder, "poster.png", png(), "image/png")
    prices = media_file(folder, "价目表.pdf", b"%PDF-1.4 price list " + bytes(range(256)) * 40, "application/pdf")
    cover = Media(name="cover.jpg", url="https://img.example.com/cover.jpg", sha256="c0" * 32, size=2048)
    return {
        PartKind.TEXT: TextPart("王女士您好，周末店庆全场八折"),
        PartKind.IMAGE: ImagePart(poster),
        PartKind.FILE: FilePart(prices),
        PartKind.LINK: LinkPart(
            "https://shop.example.com/sale?c=42", "店庆八折", "本周六日，全场八折", "https://img.example.com/t.jpg"
        ),
        PartKind.MINIPROGRAM: MiniProgramPart(
            appid="wx4ff94de0d8038c25",
            title="领取优惠券",
            page="pages/coupon/index?id=42",
            thumb=cover,
            username="gh_69105b80ea75@app",
        ),
    }


async def friends(gateway: Gateway) -> list[str]:
    """The ids of contacts that can receive messages (friends of the account), sorted."""
    page = await gateway.list_contacts(None, 10_000)
    return sorted(c.id for c in page.contacts if c.friend)


class EventRecorder:
    """Collects a gateway's events from subscription on, and waits for one without polling."""

    def __init__(self, gateway: Gateway) -> None:
        self.seen: list[GatewayEvent] = []
        self._arrived = asyncio.Event()
        self.unsubscribe = gateway.subscribe(self._on_event)

    def _on_event(self, event: GatewayEvent) -> None:
        self.seen.append(event)
        self._arrived.set()

    def of(self, kind: EventKind) -> list[GatewayEvent]:
        return [e for e in self.seen if e.kind is kind]

    async def wait_for(self, kind: EventKind, timeout: float = 5.0, **data: object) -> GatewayEvent:
        """The first event of `kind` whose data has these values (waiting up to `timeout` seconds for it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._arrived.clear()
            for event in self.of(kind):
                if all(event.data.get(k) == v for k, v in data.items()):
                    return event
            remaining = deadline - loop.time()
            assert remaining > 0, f"no {kind.value} event with {data} within {timeout:g} s (seen: {self.seen})"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)


async def listed(gateway: Gateway) -> dict[str, ContactRecord]:
    """Every contact a fresh sync lists, by id."""
    out: dict[str, ContactRecord] = {}
    cursor: str | None = None
    while True:
        page = await gateway.list_contacts(cursor, 500)
        out.update((c.id, c) for c in page.contacts)
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


def wrong_code(right: str) -> str:
    return f"{(int(right) + 1) % 10**6:06d}"


async def all_contacts(gateway: Gateway, page_size: int) -> list[str]:
    ids: list[str] = []
    cursor: str | None = None
    for _ in range(10_000):
        page = await gateway.list_contacts(cursor, page_size)
        assert len(page.contacts) <= page_size
        ids.extend(c.id for c in page.contacts)
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor
    raise AssertionError("list_contacts never reached the last page")


def customer_of(driver: GatewayDriver, index: int = 3) -> str:
    return sorted(driver.contact_ids())[index]


async def send_any(gateway: Gateway, contact_id: str, text: str, key: str, sender: str) -> None:
    """One message the way the gateway sends: directly, or as a one-customer task of `sender`."""
    if gateway.capabilities.direct_send:
        await gateway.send_text(contact_id, text, idempotency_key=key)
    else:
        await gateway.submit_batch([contact_id], Message.of_text(text), idempotency_key=key, sender=sender)


async def deliver_one(driver: GatewayDriver, gateway: Gateway, contact_id: str, text: str, key: str) -> None:
    """One message sent and, on a task-based gateway, confirmed by staff and collected: delivered either way."""
    if gateway.capabilities.direct_send:
        await gateway.send_text(contact_id, text, idempotency_key=key)
        return
    sender = await sender_of(gateway, contact_id)
    receipt = await gateway.submit_batch([contact_id], Message.of_text(text), idempotency_key=key, sender=sender)
    await driver.confirm()
    assert {r.outcome for r in await gateway.batch_results(receipt.task_id)} == {BatchOutcome.SENT}


async def sender_of(gateway: Gateway, contact_id: str) -> str:
    """The staff member a task to this customer is sent by ('' where the gateway has one account)."""
    contact = await gateway.get_contact(contact_id)
    return contact.follow_user_ids[0] if contact and contact.follow_user_ids else ""


class GatewayContract:
    """The shared suite. Subclasses list their gateways in `FLAVOURS`; each test gets a `flavour` parameter (and a
    part `kind` where it takes one) for the flavours it applies to, and a `driver` built from it."""

    FLAVOURS: ClassVar[tuple[Flavour, ...]] = ()

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrize each test over the flavours (and part kinds) it applies to (see the module docstring)."""
        if "flavour" not in metafunc.fixturenames:
            return
        predicate: Callable[..., bool] = getattr(metafunc.function, "contract_applies", lambda *_: True)
        name = metafunc.function.__name__
        if "kind" in metafunc.fixturenames:
            pairs = [(f, k) for f in self.FLAVOURS for k in PartKind if predicate(f, k)]
            if not pairs:
                raise ValueError(f"{name} applies to no gateway and part kind: it would never run")
            metafunc.parametrize(("flavour", "kind"), pairs, ids=[f"{f.name}-{k.value}" for f, k in pairs])
            return
        chosen = [f for f in self.FLAVOURS if predicate(f)]
        if not chosen:
            raise ValueError(f"{name} applies to no gateway: it would never run")
        metafunc.parametrize("flavour", chosen, ids=[f.name for f in chosen])

    @pytest.fixture
    async def driver(self, flavour: Flavour, tmp_path: Path) -> Any:
        """The flavour's driver, whose gateway has the capabilities the flavour claimed at collection."""
        async with flavour.make(tmp_path)() as driver:
            assert driver.gateway.capabilities == flavour.capabilities, (
                f"{flavour.name}: the gateway's capabilities are not the ones its flavour declares"
            )
            yield driver

    @pytest.fixture
    def gateway(self, driver: GatewayDriver) -> Gateway:
        return driver.gateway

    @applies(lambda f: f.capabilities.qr_login)
    async def test_login_flow(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """A QR with a key, a scan, a wrong code (LoginError with tries left), the right code, LOGIN."""
        status = await gateway.start_login()
        assert status.state is LoginState.WAITING_SCAN
        assert status.qr_url
        assert status.qr_url.startswith("https://")
        assert status.qrcode_key
        await driver.scan()
        status = await wait_for_state(gateway, LoginState.WAITING_VERIFY_CODE)
        assert status.state is LoginState.WAITING_VERIFY_CODE
        code = await wait_for_phone_code(driver)
        with pytest.raises(LoginError) as wrong:
            await gateway.submit_verify_code(wrong_code(code), status.qrcode_key)
        assert wrong.value.tries_left is not None
        assert 0 < wrong.value.tries_left < 3
        assert not (await gateway.login_status()).logged_in
        await gateway.submit_verify_code(f" {code}\n", status.qrcode_key)  # as pasted from a chat
        status = await gateway.wait_for_login(5.0)
        assert status.logged_in
        assert any(e.kind is EventKind.LOGIN for e in gateway.events)

    @applies(lambda f: f.capabilities.qr_login)
    async def test_too_many_wrong_codes_need_a_new_qr(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """After 3 wrong codes the error says so (tries_left 0) and a new QR is shown."""
        first = await gateway.start_login()
        await driver.scan()
        await wait_for_state(gateway, LoginState.WAITING_VERIFY_CODE)
        code = await wait_for_phone_code(driver)
        errors = []
        for _ in range(3):
            with pytest.raises(LoginError) as caught:
                await gateway.submit_verify_code(wrong_code(code))
            errors.append(caught.value)
        assert [e.tries_left for e in errors] == [2, 1, 0]
        assert "qr" in str(errors[-1]).lower()
        status = await wait_for_state(gateway, LoginState.WAITING_SCAN)
        assert status.qrcode_key
        assert status.qrcode_key != first.qrcode_key

    async def test_contact_pages_cover_everyone_once(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """Paging with any page size returns every contact exactly once, with tags."""
        await log_in(driver)
        ids = await all_contacts(gateway, page_size=7)
        assert len(ids) == len(set(ids))
        assert set(ids) == driver.contact_ids()
        first = await gateway.list_contacts(None, 1000)
        assert first.total in (None, len(ids))
        assert any(c.tag_ids for c in first.contacts)
        assert all(c.id and c.name for c in first.contacts)

    async def test_list_tags(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """Tags have ids and names, and every tag a contact carries is among them."""
        await log_in(driver)
        tags = await gateway.list_tags()
        assert tags
        assert all(t.id and t.name for t in tags)
        assert any(t.group_name for t in tags)
        known = {t.id for t in tags}
        page = await gateway.list_contacts(None, 1000)
        used = {tag for c in page.contacts for tag in c.tag_ids}
        assert used <= known

    async def test_get_contact(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """get_contact returns one fresh contact, or None for an unknown id."""
        await log_in(driver)
        contact_id = sorted(driver.contact_ids())[0]
        contact = await gateway.get_contact(contact_id)
        assert contact is not None
        assert contact.id == contact_id
        assert await gateway.get_contact(driver.unknown_contact_id) is None

    @applies(lambda f: f.capabilities.direct_send)
    async def test_send_text(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """send_text returns a message id, and the recipient received exactly that message."""
        await log_in(driver)
        contact_id = sorted(driver.contact_ids())[3]
        receipt = await gateway.send_text(contact_id, "您好，周末店庆全场八折 🎉", idempotency_key="k-1")
        assert receipt.message_id
        assert Delivered(contact_id, "您好，周末店庆全场八折 🎉", receipt.message_id) in driver.sent_messages()

    @applies(lambda f: f.capabilities.direct_send)
    async def test_send_to_unknown_contact_is_permanent(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """Sending to an id the account does not know fails for good, and nothing is delivered."""
        await log_in(driver)
        with pytest.raises(PermanentError):
            await gateway.send_text(driver.unknown_contact_id, "hello", idempotency_key="k-2")
        assert driver.sent_messages() == []

    @applies(lambda f: f.capabilities.qr_login)
    async def test_logout_then_new_qr(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """logout ends the session (LOGOUT event), and start_login then shows a new QR."""
        first = await gateway.start_login()
        await log_in(driver)
        status = await gateway.logout()
        assert not status.logged_in
        assert any(e.kind is EventKind.LOGOUT for e in gateway.events)
        again = await gateway.start_login()
        assert again.state is LoginState.WAITING_SCAN
        assert again.qrcode_key
        assert again.qrcode_key != first.qrcode_key

    @applies(lambda f: not f.capabilities.qr_login)
    async def test_credential_login(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """Without a QR: start_login logs in at once (LOGIN), a verify code is refused, logout (LOGOUT) holds calls
        until start_login logs in again."""
        status = await gateway.start_login()
        assert status.logged_in, status.message
        assert any(e.kind is EventKind.LOGIN for e in gateway.events)
        with pytest.raises(LoginError):
            await gateway.submit_verify_code("123456")
        assert not (await gateway.logout()).logged_in
        assert any(e.kind is EventKind.LOGOUT for e in gateway.events)
        with pytest.raises(NotLoggedInError):
            await gateway.list_contacts(None, 10)
        assert (await gateway.start_login()).logged_in
        assert (await gateway.list_contacts(None, 10)).contacts

    async def test_send_while_logged_out(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """Sends while logged out raise NotLoggedInError (before a QR session, and after logout)."""
        contact_id = customer_of(driver, 0)
        if gateway.capabilities.qr_login:
            await gateway.start_login()
            with pytest.raises(NotLoggedInError):
                await send_any(gateway, contact_id, "hi", "k-3", sender="")
        await log_in(driver)
        sender = await sender_of(gateway, contact_id)
        await gateway.logout()
        with pytest.raises(NotLoggedInError):
            await send_any(gateway, contact_id, "hi", "k-4", sender)
        await driver.confirm()
        assert driver.sent_messages() == []

    @applies(lambda f: f.capabilities.direct_send)
    async def test_send_message_of_one_text_part(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """send() of a one-part text message delivers that text once and returns one receipt for part 0."""
        await log_in(driver)
        contact_id = sorted(driver.contact_ids())[3]
        receipts = await gateway.send(contact_id, Message.of_text("新品到店，欢迎试穿"), idempotency_key="k-5")
        assert [(r.index, r.kind) for r in receipts] == [(0, PartKind.TEXT)]
        assert [m for m in driver.sent_messages() if m.contact_id == contact_id] == [
            Delivered(contact_id, "新品到店，欢迎试穿", receipts[0].message_id)
        ]

    @applies(lambda f: f.capabilities.direct_send and f.capabilities.supports != frozenset(PartKind))
    async def test_parts_a_gateway_cannot_send_are_refused(
        self, driver: GatewayDriver, gateway: Gateway, tmp_path: Path
    ) -> None:
        """Every part kind outside capabilities.supports fails for good, and nothing is delivered for it."""
        await log_in(driver)
        assert PartKind.TEXT in gateway.capabilities.supports
        contact_id = sorted(driver.contact_ids())[3]
        lacking = [
            (kind, part) for kind, part in sample_parts(tmp_path).items() if kind not in gateway.capabilities.supports
        ]
        assert lacking
        for kind, part in lacking:
            with pytest.raises(PermanentError):
                await gateway.send_part(contact_id, part, idempotency_key=f"k-6-{kind}")
            with pytest.raises(PermanentError):
                await gateway.send(contact_id, Message((part,)), idempotency_key=f"k-6b-{kind}")
        assert driver.sent_messages() == []

    # -- rich messages: every part kind the gateway supports ---------------------------------------------
    @applies(lambda f, kind: f.sends(kind))
    async def test_send_each_part_kind(
        self, driver: GatewayDriver, gateway: Gateway, tmp_path: Path, kind: PartKind
    ) -> None:
        """A part of each supported kind reaches the recipient once, as that kind, with its content intact (an
        image's or file's bytes by sha256 and size, a card's title and target)."""
        await log_in(driver)
        contact_id = (await friends(gateway))[4]
        part = sample_parts(tmp_path)[kind]
        receipt = await gateway.send_part(contact_id, part, idempotency_key=f"k-7-{kind}")
        assert receipt.message_id
        [got] = driver.sent_messages()
        assert (got.contact_id, got.kind, got.message_id) == (contact_id, kind, receipt.message_id)
        if isinstance(part, TextPart):
            assert got.text == part.text
        elif isinstance(part, ImagePart | FilePart):
            assert (got.sha256, got.size) == (part.media.sha256, part.media.size)
        elif isinstance(part, LinkPart):
            assert (got.text, got.url) == (part.title, part.url)
        else:
            assert got.text == part.title

    @applies(lambda f: f.sends(*SEVERAL))
    async def test_send_message_of_several_parts(self, driver: GatewayDriver, gateway: Gateway, tmp_path: Path) -> None:
        """send() delivers every part in order with one receipt each; after a refused part it stops, and a resend
        that skips the parts already sent delivers only the rest."""
        kinds = [PartKind.TEXT, PartKind.IMAGE, PartKind.LINK]  # SEVERAL, in order
        await log_in(driver)
        parts = sample_parts(tmp_path)
        message = Message(tuple(parts[k] for k in kinds))
        first, second = (await friends(gateway))[5:7]
        receipts = await gateway.send(first, message, idempotency_key="k-8")
        assert [(r.index, r.kind) for r in receipts] == [(0, PartKind.TEXT), (1, PartKind.IMAGE), (2, PartKind.LINK)]
        assert [(d.kind, d.message_id) for d in driver.sent_messages()] == [(r.kind, r.message_id) for r in receipts]

        driver.refuse_next(PartKind.IMAGE, "图片违规 (image refused)")
        with pytest.raises(PermanentError, match="image refused"):
            await gateway.send(second, message, idempotency_key="k-9")
        assert [d.kind for d in driver.sent_messages() if d.contact_id == second] == [PartKind.TEXT]
        rest = await gateway.send(second, message, idempotency_key="k-9", skip=frozenset({0}))
        assert [r.index for r in rest] == [1, 2]
        assert [d.kind for d in driver.sent_messages() if d.contact_id == second] == kinds

    @applies(lambda f: f.sends(PartKind.IMAGE))
    async def test_refused_part_names_the_reason(self, driver: GatewayDriver, gateway: Gateway, tmp_path: Path) -> None:
        """A part the far side refuses is a PermanentError carrying the server's reason; nothing is delivered, and
        the next part of that kind goes through."""
        await log_in(driver)
        contact_id = (await friends(gateway))[4]
        part = sample_parts(tmp_path)[PartKind.IMAGE]
        driver.refuse_next(PartKind.IMAGE, "cgi error code: (-4048)")
        with pytest.raises(PermanentError, match=r"cgi error code: \(-4048\)"):
            await gateway.send_part(contact_id, part, idempotency_key="k-10")
        assert driver.sent_messages() == []
        await gateway.send_part(contact_id, part, idempotency_key="k-11")
        assert [d.kind for d in driver.sent_messages()] == [PartKind.IMAGE]

    @applies(lambda f: f.sends(PartKind.IMAGE))
    async def test_media_is_read_once(self, driver: GatewayDriver, gateway: Gateway, tmp_path: Path) -> None:
        """An image sent to many contacts is read once: after the first send the file may even be gone, and every
        later recipient still gets exactly the content that was checked."""
        await log_in(driver)
        part = sample_parts(tmp_path)[PartKind.IMAGE]
        assert isinstance(part, ImagePart) and part.media.path is not None
        contacts = (await friends(gateway))[:6]
        await gateway.send_part(contacts[0], part, idempotency_key="k-12-0")
        part.media.path.unlink()
        for i, contact_id in enumerate(contacts[1:], 1):
            await gateway.send_part(contact_id, part, idempotency_key=f"k-12-{i}")
        got = driver.sent_messages()
        assert [d.contact_id for d in got] == contacts
        assert {(d.sha256, d.size) for d in got} == {(part.media.sha256, part.media.size)}

    @applies(lambda f: f.sends(PartKind.FILE))
    async def test_bad_media_is_refused_before_sending(
        self, driver: GatewayDriver, gateway: Gateway, tmp_path: Path
    ) -> None:
        """A missing file, or one whose content is not the one checked (sha256), fails for good and sends nothing."""
        await log_in(driver)
        contact_id = (await friends(gateway))[4]
        part = sample_parts(tmp_path)[PartKind.FILE]
        assert isinstance(part, FilePart) and part.media.path is not None
        missing = replace(part.media, path=tmp_path / "gone.pdf")
        with pytest.raises(PermanentError, match="missing"):
            await gateway.send_part(contact_id, FilePart(missing), idempotency_key="k-13")
        part.media.path.write_bytes(b"%PDF-1.4 a different price list")
        with pytest.raises(PermanentError, match="changed"):
            await gateway.send_part(contact_id, part, idempotency_key="k-14")
        assert driver.sent_messages() == []

    @applies(lambda f: f.sends(PartKind.LINK) and f.capabilities.idempotent_sends)
    async def test_a_part_key_delivers_once(self, driver: GatewayDriver, gateway: Gateway, tmp_path: Path) -> None:
        """On a gateway that honours idempotency keys, sending a part again under its key delivers nothing new
        and answers with the first message id."""
        await log_in(driver)
        contact_id = (await friends(gateway))[4]
        part = sample_parts(tmp_path)[PartKind.LINK]
        first = await gateway.send_part(contact_id, part, idempotency_key="k-15#1")
        again = await gateway.send_part(contact_id, part, idempotency_key="k-15#1")
        assert (again.message_id, again.duplicate) == (first.message_id, True)
        assert len(driver.sent_messages()) == 1

    # -- task-based sending (群发) ------------------------------------------------------------------------
    @applies(lambda f: not f.capabilities.direct_send)
    async def test_task_based_gateways_refuse_direct_sends(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """A gateway without direct_send refuses send_text, send_part and send for good (the dispatcher must use
        tasks), sending nothing."""
        await log_in(driver)
        contact_id = customer_of(driver)
        with pytest.raises(PermanentError):
            await gateway.send_text(contact_id, "hi", idempotency_key="k-7")
        with pytest.raises(PermanentError):
            await gateway.send_part(contact_id, TextPart("hi"), idempotency_key="k-7#0")
        with pytest.raises(PermanentError):
            await gateway.send(contact_id, Message.of_text("hi"), idempotency_key="k-7b")
        await driver.confirm()
        assert driver.sent_messages() == []

    @applies(lambda f: not f.capabilities.batch_send)
    async def test_direct_gateways_refuse_tasks(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """A gateway without batch_send refuses submit_batch and every task call for good, sending nothing."""
        await log_in(driver)
        contact_id = customer_of(driver)
        with pytest.raises(PermanentError, match="batch tasks"):
            await gateway.submit_batch([contact_id], Message.of_text("hi"), idempotency_key="t-0")
        for call in (gateway.batch_results, gateway.remind_batch, gateway.cancel_batch):
            with pytest.raises(PermanentError, match="batch tasks"):
                await call("task-1")
        assert driver.sent_messages() == []

    @applies(lambda f: not f.capabilities.welcome)
    async def test_gateways_without_welcome_refuse_it(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """A gateway without welcome refuses send_welcome for good (a journey's first send then goes the usual
        way), sending nothing."""
        await log_in(driver)
        with pytest.raises(PermanentError, match="welcome"):
            await gateway.send_welcome("welcome-code-1", Message.of_text("欢迎！"))
        assert driver.sent_messages() == []

    @applies(lambda f: f.capabilities.batch_send)
    async def test_a_task_delivers_only_after_staff_confirm(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """submit_batch: the task covers the customers, nothing is delivered and results are pending until staff
        confirm; then each customer got the text exactly once, and the results say sent with that message id."""
        await log_in(driver)
        sender = await sender_of(gateway, customer_of(driver, 0))
        page = await gateway.list_contacts(None, 1000)
        ids = sorted(c.id for c in page.contacts if not sender or sender in c.follow_user_ids)[:8]
        message = Message.of_text("会员日，全场八折")
        receipt = await gateway.submit_batch(ids, message, idempotency_key="t-1", sender=sender)
        assert receipt.task_id
        assert set(receipt.accepted) | set(receipt.rejected) == set(ids)
        assert receipt.accepted
        assert {r.outcome for r in await gateway.batch_results(receipt.task_id)} <= {BatchOutcome.PENDING}
        assert driver.sent_messages() == []
        await driver.confirm()
        results = {r.contact_id: r for r in await gateway.batch_results(receipt.task_id)}
        sent = {cid for cid, r in results.items() if r.outcome is BatchOutcome.SENT}
        assert sent
        assert sent <= set(receipt.accepted)
        assert all(results[cid].message_id for cid in sent)
        delivered = [m for m in driver.sent_messages() if m.text == "会员日，全场八折"]
        assert sorted(m.contact_id for m in delivered) == sorted(sent)
        assert {(m.contact_id, m.message_id) for m in delivered} == {(cid, results[cid].message_id) for cid in sent}
        assert all(r.reason for r in results.values() if r.outcome is BatchOutcome.FAILED)

    @applies(lambda f: f.capabilities.batch_send)
    async def test_a_task_carries_every_part(self, driver: GatewayDriver, gateway: Gateway, tmp_path: Path) -> None:
        """A task of text, image, link and mini-program parts reaches each customer with every supported part once
        (an image by its content), in order."""
        await log_in(driver)
        parts = sample_parts(tmp_path)
        kinds = [k for k in (PartKind.TEXT, PartKind.IMAGE, PartKind.LINK) if k in gateway.capabilities.supports]
        message = Message(tuple(parts[k] for k in kinds))
        contact_id = (await friends(gateway))[2]
        sender = await sender_of(gateway, contact_id)
        receipt = await gateway.submit_batch([contact_id], message, idempotency_key="t-4", sender=sender)
        await driver.confirm()
        [result] = await gateway.batch_results(receipt.task_id)
        assert result.outcome is BatchOutcome.SENT
        got = [m for m in driver.sent_messages() if m.contact_id == contact_id]
        assert [m.kind for m in got] == kinds
        image = parts[PartKind.IMAGE]
        if PartKind.IMAGE in kinds and isinstance(image, ImagePart):
            assert [(m.sha256, m.size) for m in got if m.kind is PartKind.IMAGE] == [
                (image.media.sha256, image.media.size)
            ]

    @applies(lambda f: f.capabilities.batch_send)
    async def test_a_task_rejects_unknown_customers(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """An id the account does not know is rejected with a reason; the others are still covered."""
        await log_in(driver)
        known = customer_of(driver, 1)
        sender = await sender_of(gateway, known)
        receipt = await gateway.submit_batch(
            [known, driver.unknown_contact_id], Message.of_text("hello"), idempotency_key="t-2", sender=sender
        )
        assert known in receipt.accepted
        assert receipt.rejected[driver.unknown_contact_id]

    @applies(lambda f: f.capabilities.batch_send and f.capabilities.idempotent_sends)
    async def test_a_task_resubmitted_under_its_key_is_the_same_task(
        self, driver: GatewayDriver, gateway: Gateway
    ) -> None:
        """With idempotent_sends, submitting the same key again (after a crash) answers the same task, and each
        customer still receives the message once."""
        await log_in(driver)
        contact_id = customer_of(driver, 2)
        sender = await sender_of(gateway, contact_id)
        first = await gateway.submit_batch([contact_id], Message.of_text("一次"), idempotency_key="t-3", sender=sender)
        again = await gateway.submit_batch([contact_id], Message.of_text("一次"), idempotency_key="t-3", sender=sender)
        assert again.task_id == first.task_id
        await driver.confirm()
        await gateway.batch_results(first.task_id)
        assert [m.contact_id for m in driver.sent_messages() if m.text == "一次"] == [contact_id]

    # -- tags ----------------------------------------------------------------------------------------------
    @applies(lambda f: f.capabilities.tags)
    async def test_tags_added_and_removed_show_in_the_next_sync(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """Tags put on a contact appear in the next list_contacts and go again when taken off; both are idempotent."""
        await log_in(driver)
        contact_id = (await friends(gateway))[2]
        before = (await listed(gateway))[contact_id].tag_ids
        new = [t.id for t in await gateway.list_tags() if t.id not in before][:2]
        assert len(new) == 2
        await gateway.add_contact_tags(contact_id, new)
        await gateway.add_contact_tags(contact_id, new[:1])  # already there: no error
        assert set((await listed(gateway))[contact_id].tag_ids) == {*before, *new}
        await gateway.remove_contact_tags(contact_id, new)
        await gateway.remove_contact_tags(contact_id, new)  # not there any more: no error
        assert set((await listed(gateway))[contact_id].tag_ids) == set(before)

    @applies(lambda f: f.capabilities.tags)
    async def test_unknown_tag_is_refused(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """Putting a tag id the account does not have on a contact fails for good and changes nothing."""
        await log_in(driver)
        contact_id = (await friends(gateway))[2]
        before = (await listed(gateway))[contact_id].tag_ids
        with pytest.raises(PermanentError):
            await gateway.add_contact_tags(contact_id, ["no-such-tag-0000"])
        assert (await listed(gateway))[contact_id].tag_ids == before

    @applies(lambda f: f.capabilities.tags)
    async def test_create_tag(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """create_tag makes a tag in its group (created when missing) that list_tags shows and contacts can carry;
        asking again returns the same tag."""
        await log_in(driver)
        tag = await gateway.create_tag("已购", "购买状态")
        assert tag.id
        assert (tag.name, tag.group_name) == ("已购", "购买状态")
        assert (await gateway.create_tag("已购", "购买状态")).id == tag.id
        assert any((t.id, t.name, t.group_name) == (tag.id, "已购", "购买状态") for t in await gateway.list_tags())
        contact_id = (await friends(gateway))[3]
        await gateway.add_contact_tags(contact_id, [tag.id])
        assert tag.id in (await listed(gateway))[contact_id].tag_ids

    # -- customer events -------------------------------------------------------------------------------------
    @applies(lambda f: f.capabilities.events and f.customer_messages)
    async def test_incoming_message_is_a_message_event(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """A customer's text arrives as one MESSAGE event with the contact and the text; our own sends are not
        reported as messages from customers."""
        await log_in(driver)
        events = EventRecorder(gateway)
        contact_id = (await friends(gateway))[1]
        await send_any(gateway, contact_id, "您好，有什么可以帮您？", "k-16", await sender_of(gateway, contact_id))
        await driver.confirm()
        await driver.customer_writes(contact_id, "ＴＤ 退订")
        event = await events.wait_for(EventKind.MESSAGE, contact_id=contact_id)
        assert event.data["text"] == "ＴＤ 退订"
        assert event.data["message_id"]
        assert event.data["type"] == "text"
        await driver.customer_writes(contact_id, "marker")  # in order: once this is seen, so is any echo
        await events.wait_for(EventKind.MESSAGE, text="marker")
        assert [e.data["text"] for e in events.of(EventKind.MESSAGE)] == ["ＴＤ 退订", "marker"]

    @applies(lambda f: f.capabilities.events)
    async def test_new_and_removed_contacts_are_events(self, driver: GatewayDriver, gateway: Gateway) -> None:
        """A customer who adds the account is a CONTACT_ADDED event and a contact the next sync lists that was not
        there before, and can be sent to; one who deletes it is a CONTACT_REMOVED event. On a direct sender (a puppet:
        the account's own contact book) they are no friend in the next sync and a send to them fails; WeCom's API
        keeps listing a one-way follow, so the official gateway only promises the event."""
        await log_in(driver)
        before = await listed(gateway)
        events = EventRecorder(gateway)
        contact_id = await driver.customer_adds("陈晓雯")
        added = await events.wait_for(EventKind.CONTACT_ADDED, contact_id=contact_id)
        assert "staff_id" in added.data
        book = await listed(gateway)
        assert contact_id not in before
        assert set(book) == {*before, contact_id}
        assert book[contact_id].name == "陈晓雯"
        await deliver_one(driver, gateway, contact_id, "欢迎！", "k-18")
        assert [m.text for m in driver.sent_messages() if m.contact_id == contact_id] == ["欢迎！"]
        await driver.customer_removes(contact_id)
        await events.wait_for(EventKind.CONTACT_REMOVED, contact_id=contact_id)
        if gateway.capabilities.direct_send:
            after = (await listed(gateway)).get(contact_id)
            assert after is None or not after.friend
            with pytest.raises(PermanentError):
                await gateway.send_text(contact_id, "还在吗？", idempotency_key="k-17")
