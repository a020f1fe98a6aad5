"""The WorkPro login state machine (`engine.gateways.workpro.login`) driven directly with parsed events: no gRPC,
no event loop, no clock."""

from __future__ import annotations

from engine.gateways.base import EventKind, LoginState
from engine.gateways.workpro.login import CODE_ACCEPTED, VERIFY_TRIES, Emit, LoginMachine
from engine.gateways.workpro.payloads import ScanEvent, VerifyCodeEvent, VerifySlideEvent

URL = "https://wx.work.weixin.qq.com/cgi-bin/crtx_auth?key={key}&wx=1"
NEW_DEVICE = "你正在一台新设备上使用企业微信，需通过手机企业微信扫码进行安全验证"
ACCOUNT = "1688850000000001"


def qr(key: str) -> ScanEvent:
    return ScanEvent(status=2, url=URL.format(key=key), key=key)


def kinds(emits: list[Emit]) -> list[EventKind]:
    return [e.kind for e in emits]


def at_code(machine: LoginMachine, key: str = "AB") -> None:
    machine.on_scan(qr(key))
    machine.on_scan(ScanEvent(status=3))
    machine.on_verify_code(VerifyCodeEvent(id=key, message="请输入企业微信手机端展示的验证码，以继续登录"))


def test_happy_path() -> None:
    """QR → scanned → code shown → LOGIN: each step moves the state once and emits its event."""
    machine = LoginMachine()
    assert kinds(machine.on_scan(qr("AB"))) == [EventKind.QR]
    assert machine.status().state is LoginState.WAITING_SCAN
    assert machine.status().qrcode_key == "AB"
    assert kinds(machine.on_scan(ScanEvent(status=3))) == [EventKind.SCANNED]
    assert kinds(machine.on_verify_code(VerifyCodeEvent(id="AB"))) == [EventKind.VERIFY_CODE]
    status = machine.status()
    assert (status.state, status.qrcode_key, status.tries_left) == (LoginState.WAITING_VERIFY_CODE, "AB", 3)
    assert machine.code_key() == "AB"
    assert kinds(machine.on_login(ACCOUNT)) == [EventKind.LOGIN]
    status = machine.status()
    assert status.logged_in
    assert (status.account_id, status.qr_url, status.qrcode_key, status.tries_left) == (ACCOUNT, None, None, None)


def test_code_accepted_after_login_keeps_the_logged_in_message() -> None:
    """The server sends LOGIN before EnterVerifyCode answers: the answer must not bring back "waiting for WeCom"."""
    machine = LoginMachine()
    at_code(machine)
    machine.on_login(ACCOUNT)
    machine.code_accepted()
    assert machine.status().message == "logged in"
    machine.on_account_name(ACCOUNT, "小王")
    assert machine.status().message == "logged in as 小王"
    assert machine.status().account_name == "小王"


def test_code_accepted_before_login_says_so() -> None:
    """A code accepted while the LOGIN event is still on its way says that it waits for WeCom."""
    machine = LoginMachine()
    at_code(machine)
    machine.code_accepted()
    assert machine.status().message == CODE_ACCEPTED
    machine.on_login(ACCOUNT)
    assert machine.status().message == "logged in"


def test_a_late_name_of_another_account_is_ignored() -> None:
    """A name lookup that finishes after another account logged in does not rename the new one."""
    machine = LoginMachine()
    machine.on_login(ACCOUNT)
    machine.on_logout("logout()")
    machine.on_login("1688850000000002")
    machine.on_account_name(ACCOUNT, "小王")
    assert machine.status().account_name is None


def test_wrong_codes_count_down_and_a_new_qr_resets() -> None:
    """Each wrong code costs a try; the threshold leaves 0; the server's new QR gives 3 tries again."""
    machine = LoginMachine()
    at_code(machine)
    assert [machine.code_wrong("AB", "Invalid verify code!")[0].data["tries_left"] for _ in range(2)] == [2, 1]
    machine.code_tries_exhausted("AB", "验证码错误次数超过阈值，请重新扫码")
    assert machine.status().tries_left == 0
    dead = machine.status()  # that QR is dead: no key to send a code for, no QR to show
    assert (dead.state, dead.qr_url, dead.qrcode_key, machine.code_key()) == (LoginState.LOGGED_OUT, None, None, None)
    machine.on_scan(qr("CD"))
    assert machine.status().tries_left == VERIFY_TRIES
    assert machine.status().qrcode_key == "CD"


def test_a_new_qr_before_the_too_many_tries_answer_is_kept() -> None:
    """The server's new QR can arrive before EnterVerifyCode's answer: the answer about the old key leaves it."""
    machine = LoginMachine()
    at_code(machine)
    machine.on_scan(qr("CD"))
    machine.code_tries_exhausted("AB", "验证码错误次数超过阈值，请重新扫码")
    status = machine.status()
    assert (status.state, status.qrcode_key, status.tries_left) == (LoginState.WAITING_SCAN, "CD", VERIFY_TRIES)


def test_replays_change_nothing() -> None:
    """The cached SCAN replayed on reconnect while a code is pending, and a replayed LOGIN, emit nothing."""
    machine = LoginMachine()
    machine.on_scan(qr("AB"))
    assert machine.on_scan(qr("AB")) == []  # the stream re-opened while the QR shows: no second QR event
    assert machine.status().state is LoginState.WAITING_SCAN
    machine.on_scan(ScanEvent(status=3))
    machine.on_verify_code(VerifyCodeEvent(id="AB"))
    assert machine.on_scan(qr("AB")) == []
    assert machine.status().state is LoginState.WAITING_VERIFY_CODE
    machine.on_login(ACCOUNT)
    assert machine.on_login(ACCOUNT) == []
    assert machine.on_login("") == []
    assert machine.on_ready() is True
    assert machine.on_ready() is False  # READY arrives twice


def test_new_device_logout_announces_the_security_qr() -> None:
    """A LOGOUT with WeCom's new-device text makes the next QR the security check, even without a URL marker;
    the one after that is an ordinary QR again."""
    machine = LoginMachine()
    machine.on_login(ACCOUNT)
    emits = machine.on_logout(NEW_DEVICE)
    assert kinds(emits) == [EventKind.LOGOUT, EventKind.SECOND_VERIFICATION]
    assert emits[0].data == {"account_id": ACCOUNT, "second_verification": True}
    assert kinds(machine.on_scan(qr("EF"))) == [EventKind.QR, EventKind.SECOND_VERIFICATION]
    assert machine.status().second_verification
    machine.on_scan(qr("GH"))
    assert not machine.status().second_verification


def test_qr_while_logged_in_ends_the_session() -> None:
    """A QR arriving while logged in means the session is over: logged out, the new QR showing."""
    machine = LoginMachine()
    machine.on_login(ACCOUNT)
    emits = machine.on_scan(qr("IJ"))
    assert kinds(emits) == [EventKind.LOGOUT, EventKind.QR]  # the engine learns the session is over
    assert emits[0].data == {} and "new QR" in emits[0].message
    status = machine.status()
    assert (status.state, status.account_id, status.qrcode_key) == (LoginState.WAITING_SCAN, None, "IJ")


def test_a_code_for_another_qr_or_scene_is_ignored() -> None:
    """juzi's demo acts on VERIFY_CODE only for scene LOGIN and the latest QR's key: a code for a dead key (a
    SCAN replayed after a reconnect) or another scene leaves the live QR and its key alone."""
    machine = LoginMachine()
    machine.on_scan(qr("NEW"))
    machine.on_scan(ScanEvent(status=3))
    assert machine.on_verify_code(VerifyCodeEvent(id="OLD", scene=1)) == []
    assert machine.on_verify_code(VerifyCodeEvent(id="NEW", scene=7)) == []
    assert machine.on_verify_code(VerifyCodeEvent(id="OLD", status=2)) == []  # another QR's expiry
    assert machine.status().state is LoginState.SCANNED
    assert kinds(machine.on_verify_code(VerifyCodeEvent(id="NEW", scene=1))) == [EventKind.VERIFY_CODE]
    assert machine.code_key() == "NEW"


def test_a_slider_check_is_said_not_waited_for() -> None:
    """VERIFY_SLIDE (WeCom's slider puzzle) has no answering RPC: the status says so at once, with an ERROR
    event, instead of waiting for a LOGIN that cannot come; its expiry logs out. Ignored once logged in."""
    machine = LoginMachine()
    machine.on_scan(qr("AB"))
    emits = machine.on_verify_slide(VerifySlideEvent(status=1, scene=1))
    assert kinds(emits) == [EventKind.ERROR] and emits[0].data == {"verify_slide": True}
    assert "slider" in machine.status().message
    assert kinds(machine.on_verify_slide(VerifySlideEvent(status=2, scene=1))) == [EventKind.ERROR]
    assert machine.status().state is LoginState.LOGGED_OUT
    machine.on_login(ACCOUNT)
    assert machine.on_verify_slide(VerifySlideEvent(status=1, scene=1)) == []


def test_expiry_and_session_loss() -> None:
    """An expired code or QR logs out with a message; a session lost without an event emits LOGOUT once."""
    machine = LoginMachine()
    at_code(machine)
    assert kinds(machine.on_verify_code(VerifyCodeEvent(id="AB", status=2))) == [EventKind.ERROR]
    assert machine.status().state is LoginState.LOGGED_OUT
    machine.on_scan(qr("KL"))
    machine.on_scan(ScanEvent(status=5))  # timeout
    assert machine.status().state is LoginState.LOGGED_OUT
    assert "expired" in machine.status().message
    assert machine.session_lost("gone") == []  # not logged in: nothing to lose
    machine.on_login(ACCOUNT)
    assert kinds(machine.session_lost("gone")) == [EventKind.LOGOUT]
    assert machine.session_lost("gone") == []


def test_messages_are_in_the_language_of_whoever_reads_them() -> None:
    """The status message is translated when read (a request in Chinese, the CLI in English, of one machine);
    an event's message in the language in force when it was made; WeCom's own prompt is passed on as it is."""
    from engine.gateways.workpro.login import LOGGED_OUT
    from engine.i18n import Language, Lazy, use_language

    machine = LoginMachine()
    with use_language(Language.ZH):
        (shown,) = machine.on_scan(qr("AB"))
    assert shown.message == "请用手机企业微信扫描二维码"
    assert machine.status().message == "scan the QR code with WeCom on the phone"
    with use_language(Language.ZH):
        assert machine.status().message == "请用手机企业微信扫描二维码"
        assert machine.on_scan(ScanEvent(status=3))[0].message == "已扫码，请在手机上确认登录"
        machine.on_verify_code(VerifyCodeEvent(id="AB"))
        assert machine.status().message == "请输入手机企业微信上显示的验证码"
    machine.code_tries_exhausted("AB", "验证码错误次数超过阈值，请重新扫码")
    with use_language(Language.ZH):
        assert machine.status().message == "验证码错误次数过多：请等待新的二维码，扫码后输入新的验证码"
    assert machine.status().message.startswith("too many wrong verification codes")
    at_code(machine, "CD")
    assert machine.status().message == "请输入企业微信手机端展示的验证码，以继续登录"  # the server's text
    machine.on_login(ACCOUNT)
    machine.on_account_name(ACCOUNT, "小王")
    with use_language(Language.ZH):
        assert machine.status().message == "已登录：小王"
        assert machine.session_lost(Lazy(LOGGED_OUT))[0].message == "已退出登录"
    assert machine.status().message == "logged out"
