"""The WorkPro login flow as a pure state machine: scan → verify code → login → logout, with WeCom's "new device"
security QR. No gRPC, no asyncio, no clock: the gateway feeds it parsed events (`payloads`) and the outcome of its
own calls, and emits the `Emit`s each step returns. Tests drive it directly (`tests/test_workpro_login.py`).

    LOGGED_OUT ──SCAN(2)──▶ WAITING_SCAN ──SCAN(3/4)──▶ SCANNED ──VERIFY_CODE──▶ WAITING_VERIFY_CODE
      ▲   ▲                 (a new QR: tries reset)                                 │ wrong code: tries - 1
      │   └──────── too many tries: that QR is dead; a new one comes (or is asked for) ◀┤
      └──LOGOUT / session lost── LOGGED_IN ◀──LOGIN────────────────────────────────────┘ (code accepted)

Facts it encodes (`shared/reference/workpro_puppet.md` §1.5, §8): the server replays its cached SCAN and LOGIN on
every reconnect (a replay changes nothing); a LOGOUT whose reason is WeCom's new-device text announces a security
QR, which may arrive without the `secondaryEquipment` marker; READY can arrive twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.gateways.base import EventKind, LoginState, LoginStatus
from engine.gateways.workpro.payloads import (
    SCAN_CANCEL,
    SCAN_CONFIRMED,
    SCAN_IDLE,
    SCAN_SCANNED,
    SCAN_TIMEOUT,
    SCENE_LOGIN,
    SCENE_UNKNOWN,
    VERIFY_EXPIRED,
    VERIFY_WAITING,
    VERIFY_WRONG,
    ScanEvent,
    VerifyCodeEvent,
    VerifySlideEvent,
)
from engine.gateways.workpro.rpc_errors import NEW_DEVICE_MARKERS
from engine.i18n import N_, Lazy, tr

VERIFY_TRIES = 3  # WeCom allows about 3 wrong codes, then the QR must be scanned again

# The machine's messages are catalog keys: `status().message` is translated when the status is read (in the
# language of the request or command asking), an `Emit`'s message when the event is made. Texts from the server
# (WeCom's own code prompt, a LOGOUT reason) are passed on as they are.
SCAN_QR = N_("scan the QR code with WeCom on the phone")
SECURITY_QR = N_(
    "WeCom asks for a security check on a new device: scan this QR with WeCom on the phone within 2 minutes"
)
SECURITY_NEXT = N_(
    "WeCom asks for a security check on a new device: scan the next QR with WeCom on the phone within 2 minutes"
)
SCANNED = N_("scanned; confirm the login on the phone")
ENTER_CODE = N_("enter the verification code shown by WeCom on the phone")
CODE_ACCEPTED = N_("code accepted; waiting for WeCom to log in")
NEW_QR_AFTER_TRIES = N_("too many wrong verification codes: wait for the new QR code, scan it and enter the new code")
SLIDER = N_(
    "WeCom asks for a slider check before this login (VERIFY_SLIDE); WorkPro's gRPC service has no call to "
    "answer it, so wecast cannot: wait a few minutes and start the login again, or ask juzi's support"
)
SLIDER_EXPIRED = N_("the slider check expired; start the login again")
WAITING_FOR_START = N_("the puppet waits for a login to be started")
QR_EXPIRED = N_("the QR code expired or was cancelled; start the login again")
CODE_EXPIRED = N_("the verification code expired; start the login again")
WRONG_CODE = N_("wrong verification code")
NEW_QR_ENDS_SESSION = N_("WorkPro shows a new QR code: the session has ended")
LOGGED_IN = N_("logged in")
LOGGED_IN_AS = N_("logged in as {name}")
LOGGED_OUT = N_("logged out")


@dataclass(frozen=True)
class Emit:
    """An event the gateway should emit (`Gateway.emit(kind, message, **data)`)."""

    kind: EventKind
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


class LoginMachine:
    """Where the login stands, and how each event moves it. Read `status()`; never set the fields from outside."""

    def __init__(self) -> None:
        self.state = LoginState.LOGGED_OUT
        self.qr_url: str | None = None
        self.qr_key: str | None = None
        self.verify_id: str | None = None  # the VERIFY_CODE event's id (the QR key) once the phone shows a code
        self.second = False  # the QR showing is the new-device security check
        self.expect_second = False  # a new-device LOGOUT announced a security QR
        self.account_id: str | None = None
        self.account_name: str | None = None
        self.tries_left: int | None = None
        self.ready = False
        # This process saw the login happen (a QR, then LOGIN), so the account's data is still loading on the puppet
        # until READY; a LOGIN replayed on connect (or learnt by CurrentUser) is an account logged in before.
        self.watched_login = False
        self.message: str | Lazy = ""  # a catalog key (Lazy: translated when read) or the server's own text

    # -- reading ---------------------------------------------------------------------------------
    @property
    def logged_in(self) -> bool:
        return self.state is LoginState.LOGGED_IN

    def qr_showing(self) -> bool:
        """A QR is showing (or none is needed: logged in)."""
        return self.logged_in or (self.qr_key is not None and self.state is not LoginState.LOGGED_OUT)

    def code_key(self, given: str | None = None) -> str | None:
        """The id to send with EnterVerifyCode: the caller's, else the VERIFY_CODE event's, else the QR key."""
        return given or self.verify_id or self.qr_key

    def status(self) -> LoginStatus:
        return LoginStatus(
            state=self.state,
            qr_url=self.qr_url,
            qrcode_key=self.verify_id or self.qr_key,
            second_verification=self.second,
            account_id=self.account_id,
            account_name=self.account_name,
            tries_left=None if self.logged_in else self.tries_left,
            message=str(self.message),
        )

    # -- events from the server ------------------------------------------------------------------
    def on_scan(self, event: ScanEvent) -> list[Emit]:
        if event.shows_qr:
            return self._show_qr(event)
        if event.status in (SCAN_SCANNED, SCAN_CONFIRMED):
            if self.state in (LoginState.WAITING_SCAN, LoginState.LOGGED_OUT):
                self.state = LoginState.SCANNED
                return [Emit(EventKind.SCANNED, self._say(SCANNED), {"status": event.status})]
            return []
        if event.status in (SCAN_CANCEL, SCAN_TIMEOUT, SCAN_IDLE) and not self.logged_in:
            self.state = LoginState.LOGGED_OUT
            self.qr_url = self.qr_key = self.verify_id = None
            self._say(WAITING_FOR_START if event.status == SCAN_IDLE else QR_EXPIRED)
        return []

    def _show_qr(self, event: ScanEvent) -> list[Emit]:
        key = event.key
        if (
            key
            and key == self.qr_key
            and self.state in (LoginState.WAITING_SCAN, LoginState.SCANNED, LoginState.WAITING_VERIFY_CODE)
        ):
            return []  # the server replays its cached SCAN on every reconnect: not a new QR
        second = event.verification or self.expect_second
        self.expect_second = False
        # A QR while logged in: the session has ended, though no LOGOUT said so (it was lost with a stream).
        emits = self.session_lost(Lazy(NEW_QR_ENDS_SESSION))
        if key != self.qr_key:
            self.tries_left = VERIFY_TRIES
        self.state = LoginState.WAITING_SCAN
        self.qr_url, self.qr_key, self.verify_id, self.second = event.url, key, None, second
        shown = self._say(SECURITY_QR if second else SCAN_QR)
        emits += [
            Emit(
                EventKind.QR,
                shown,
                {"qr_url": event.url, "qrcode_key": key, "second_verification": second, "status": event.status},
            )
        ]
        if second:
            emits.append(Emit(EventKind.SECOND_VERIFICATION, shown, {"qr_url": event.url, "qrcode_key": key}))
        return emits

    def on_verify_code(self, event: VerifyCodeEvent) -> list[Emit]:
        if event.scene not in (SCENE_UNKNOWN, SCENE_LOGIN) or (event.id and self.qr_key and event.id != self.qr_key):
            # Not about the QR showing: juzi's demo acts only on scene LOGIN and id == the latest QR's key
            # (RPAChat/workpro-getting-started latest-features index.ts); after a reconnect the server may still
            # replay an older SCAN, and a code for its dead key must not replace the live one.
            return []
        verify_id = event.id or self.qr_key
        if event.status == VERIFY_EXPIRED:
            self.state = LoginState.LOGGED_OUT
            self.qr_url = self.qr_key = self.verify_id = None
            return [Emit(EventKind.ERROR, self._say(CODE_EXPIRED))]
        if event.status == VERIFY_WRONG:
            return [Emit(EventKind.VERIFY_CODE_WRONG, tr(WRONG_CODE), {"qrcode_key": verify_id})]
        if self.logged_in:
            return []
        self.state = LoginState.WAITING_VERIFY_CODE
        self.verify_id = verify_id
        if self.tries_left is None:
            self.tries_left = VERIFY_TRIES
        if event.message:  # WeCom's own prompt, passed on
            self.message = event.message
            return [Emit(EventKind.VERIFY_CODE, event.message, {"qrcode_key": verify_id})]
        return [Emit(EventKind.VERIFY_CODE, self._say(ENTER_CODE), {"qrcode_key": verify_id})]

    def on_verify_slide(self, event: VerifySlideEvent) -> list[Emit]:
        """VERIFY_SLIDE: a challenge wecast cannot answer, said so instead of waiting silently for a LOGIN."""
        if self.logged_in or event.scene not in (SCENE_UNKNOWN, SCENE_LOGIN):
            return []
        if event.status == VERIFY_EXPIRED:
            self.state = LoginState.LOGGED_OUT
            self.qr_url = self.qr_key = self.verify_id = None
            return [Emit(EventKind.ERROR, self._say(SLIDER_EXPIRED), {"verify_slide": True})]
        if event.status != VERIFY_WAITING:
            return []
        return [Emit(EventKind.ERROR, self._say(SLIDER), {"verify_slide": True})]

    def on_login(self, account_id: str) -> list[Emit]:
        """LOGIN: logged in as `account_id`. A replay (same account, or none named) changes nothing."""
        if self.logged_in and account_id in ("", self.account_id):
            return []
        if account_id != self.account_id:
            self.account_name = None
        self.watched_login = self.state in (LoginState.WAITING_SCAN, LoginState.SCANNED, LoginState.WAITING_VERIFY_CODE)
        self.state = LoginState.LOGGED_IN
        self.account_id = account_id or self.account_id
        self.qr_url = self.qr_key = self.verify_id = None
        self.second = False
        self.tries_left = None
        self.message = self._logged_in_message()
        return [
            Emit(EventKind.LOGIN, tr(LOGGED_IN), {"account_id": self.account_id, "account_name": self.account_name})
        ]

    def on_account_name(self, account_id: str, name: str | None) -> None:
        """The account's own name, looked up after LOGIN (ignored if another account logged in meanwhile)."""
        if account_id == self.account_id:
            self.account_name = name or None
            if self.logged_in:
                self.message = self._logged_in_message()

    def on_ready(self) -> bool:
        """READY: True the first time after a login (the server may send it twice)."""
        if self.ready:
            return False
        self.ready = True
        return True

    def on_logout(self, reason: str) -> list[Emit]:
        new_device = any(marker in reason.lower() for marker in NEW_DEVICE_MARKERS)
        account = self.account_id
        self._logged_out(reason)
        emits = [
            Emit(
                EventKind.LOGOUT,
                reason or tr(LOGGED_OUT),
                {"account_id": account, "second_verification": new_device},
            )
        ]
        if new_device:
            self.expect_second = True
            emits.append(Emit(EventKind.SECOND_VERIFICATION, self._say(SECURITY_NEXT)))
        return emits

    def session_lost(self, reason: str | Lazy) -> list[Emit]:
        """We learnt without a LOGOUT event that the session is gone (it ended while the stream was down, or the
        Logout call succeeded and no event followed)."""
        if not self.logged_in:
            return []
        self._logged_out(reason)
        return [Emit(EventKind.LOGOUT, str(reason))]

    # -- outcomes of our own calls ---------------------------------------------------------------
    def code_accepted(self) -> None:
        """EnterVerifyCode succeeded. The LOGIN event may already have come (the server sends it first)."""
        if not self.logged_in:
            self._say(CODE_ACCEPTED)

    def code_wrong(self, key: str, text: str) -> list[Emit]:
        """EnterVerifyCode said the code was wrong: one try less."""
        self.tries_left = max(0, (self.tries_left or VERIFY_TRIES) - 1)
        return [Emit(EventKind.VERIFY_CODE_WRONG, text, {"qrcode_key": key, "tries_left": self.tries_left})]

    def code_tries_exhausted(self, key: str, text: str) -> list[Emit]:
        """EnterVerifyCode said too many wrong codes: that QR is dead and a new one must be scanned. The dead QR
        is dropped (no more codes are asked for it) unless the new one has already come."""
        if not self.logged_in and key in (self.qr_key, self.verify_id):
            self.state = LoginState.LOGGED_OUT
            self.qr_url = self.qr_key = self.verify_id = None
            self.second = False
            self._say(NEW_QR_AFTER_TRIES)
            self.tries_left = 0
        return [Emit(EventKind.VERIFY_CODE_WRONG, text, {"qrcode_key": key, "tries_left": 0})]

    # -- internals -------------------------------------------------------------------------------
    def _say(self, message: str, /, **fields: object) -> str:
        """Show the catalog message `message` (translated whenever the status is read); its text now, for an Emit."""
        self.message = Lazy(message, **fields)
        return str(self.message)

    def _logged_in_message(self) -> Lazy:
        return Lazy(LOGGED_IN_AS, name=self.account_name) if self.account_name else Lazy(LOGGED_IN)

    def _logged_out(self, reason: str | Lazy) -> None:
        self.state = LoginState.LOGGED_OUT
        self.ready = self.watched_login = False
        self.account_id = self.account_name = None
        self.qr_url = self.qr_key = self.verify_id = None
        self.second = False
        self.tries_left = None
        self.message = reason
