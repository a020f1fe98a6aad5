"""The web console over real HTTP (uvicorn on loopback): its doors (the key, the session cookie, CSRF, cross-site
posts), its pages on the sandbox, the login flow with errors and tries left, and the pieces it draws (messages as
WeChat shows them, the run charts)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from jinja2 import Environment

from engine.gateways.base import EventKind
from engine.gateways.sandbox import SandboxGateway
from engine.i18n import Language
from engine.messages import ImagePart, LinkPart, Media, Message, MiniProgramPart, TextPart
from engine.web.console import charts
from engine.web.console.routes import MediaIndex, message_parts
from engine.web.console.templating import build_environment, translator
from engine.web.sessions import COOKIE, SessionKind, SessionTokens
from storage import journeys as journeys_db

try:
    from web_harness import BROKEN, CAMPAIGN, MANUAL, LiveServer, make_settings
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.web_harness import BROKEN, CAMPAIGN, MANUAL, LiveServer, make_settings

KEY = "console-test-key-0123456789"
PAGES = [
    "/console/",
    "/console/login",
    "/console/customers",
    "/console/customers/anyone",
    "/console/campaigns",
    "/console/campaigns/vip_daily",
    "/console/campaigns/vip_daily/preview",
    "/console/runs",
    "/console/runs/1",
    "/console/deliveries",
    "/console/journeys",
]
API_CALLS = [
    ("GET", "/"),
    ("GET", "/api/v1/contacts"),
    ("GET", "/api/v1/login/qr.png"),
    ("POST", "/api/v1/campaigns/vip_daily/run"),
    ("POST", "/get-all-user"),
    ("POST", "/goStart"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/metrics"),
]
HTML = {"accept": "text/html"}


WELCOME = """\
kind: journey
id: welcome
name: 新客欢迎
trigger: contact_added
entry: once
exit_when:
  - tag: 已购
steps:
  - id: hello
    send:
      template: "{{ name }}您好，欢迎添加门店小助手"
    transactional: true
  - id: later
    wait: {days: 1, at: "10:00"}
  - if: {tag: VIP}
    then:
      - id: vip_tip
        send: {template: "VIP专属小贴士"}
    else:
      - id: tip
        send: {template: "护肤小贴士"}
"""


def write_campaigns(root: Path) -> None:
    (root / "campaigns" / "welcome.yaml").write_text(WELCOME, encoding="utf-8")
    (root / "campaigns" / "vip_daily.yaml").write_text(CAMPAIGN, encoding="utf-8")
    (root / "campaigns" / "new_customers.yaml").write_text(MANUAL, encoding="utf-8")
    (root / "campaigns" / "broken.yaml").write_text(BROKEN, encoding="utf-8")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server as `wecast serve --host 0.0.0.0` runs it: a key, and any Host name accepted."""
    root = tmp_path_factory.mktemp("console-keyed")
    settings = make_settings(root, api={"key": KEY})
    write_campaigns(root)
    with LiveServer(settings, require_key=True, loopback_only=False) as server:
        yield server


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The loopback default: no key."""
    root = tmp_path_factory.mktemp("console-open")
    settings = make_settings(root)
    write_campaigns(root)
    with LiveServer(settings) as server:
        yield server


@pytest.fixture(autouse=True)
def _close_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every httpx client a test opens is closed after it (the suite turns unclosed sockets into errors)."""
    opened: list[httpx.Client] = []
    real = httpx.Client

    def tracked(*args: object, **kwargs: object) -> httpx.Client:
        client = real(*args, **kwargs)  # type: ignore[arg-type]
        opened.append(client)
        return client

    monkeypatch.setattr(httpx, "Client", tracked)
    yield
    for client in opened:
        client.close()


def csrf_of(html: str) -> str:
    found = re.search(r'"X-CSRF-Token": "([0-9a-f]+)"', html)
    assert found, "the page carries no CSRF token"
    return found.group(1)


def signed_in(server: LiveServer) -> tuple[httpx.Client, str]:
    """A browser-like client signed in through the sign-in form, and its CSRF token."""
    client = httpx.Client(base_url=server.url, timeout=30)
    token = csrf_of(client.get("/console/signin").text)
    answer = client.post(
        "/console/signin", json={"key": KEY, "next": "/console/campaigns"}, headers={"x-csrf-token": token}
    )
    assert answer.status_code == 204 and answer.headers["hx-redirect"] == "/console/campaigns"
    return client, csrf_of(client.get("/console/campaigns").text)


# -- the doors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_without_the_key_every_page_is_refused(keyed: LiveServer, path: str) -> None:
    """Beyond loopback, a console page without the key or a session sends the browser to the sign-in page, an
    htmx request gets 401 with a redirect for htmx, and nothing of the page is shown."""
    client = httpx.Client(base_url=keyed.url, timeout=30)
    page = client.get(path, headers=HTML, follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"].startswith("/console/signin?next=")
    fragment = client.get(path, headers={"hx-request": "true"})
    assert fragment.status_code == 401 and fragment.headers["hx-redirect"] == "/console/signin"
    bare = client.get(path)
    assert bare.status_code == 401 and "Bearer" in bare.json()["error"]


@pytest.mark.parametrize(("method", "path"), API_CALLS)
def test_without_the_key_every_api_call_is_refused(keyed: LiveServer, method: str, path: str) -> None:
    """Beyond loopback, every API call (and the docs and metrics) without the key is a 401, also with a forged
    session cookie; only /healthz, the sign-in page and the console's static files are open."""
    client = httpx.Client(base_url=keyed.url, timeout=30)
    assert client.request(method, path, json={} if method == "POST" else None).status_code == 401
    forged = SessionTokens("not-the-key").issue(SessionKind.KEY)
    client.cookies.set(COOKIE, forged)
    assert client.request(method, path, json={} if method == "POST" else None).status_code == 401
    assert client.get("/healthz").status_code == 200
    assert client.get("/console/signin").status_code == 200
    assert client.get("/console/static/htmx.min.js").status_code == 200


def test_sign_in_exchanges_the_key_for_an_httponly_samesite_cookie(keyed: LiveServer) -> None:
    """The sign-in form takes the key (a wrong one is refused and says so) and answers with an HttpOnly,
    SameSite=Strict session cookie that opens the pages and the API; the key never appears in the answer."""
    client = httpx.Client(base_url=keyed.url, timeout=30)
    form = client.get("/console/signin")
    token = csrf_of(form.text)
    wrong = client.post("/console/signin", json={"key": "guess"}, headers={"x-csrf-token": token})
    assert (
        wrong.status_code == 401
        and "API 密钥不正确" in wrong.text
        and COOKIE not in wrong.headers.get("set-cookie", "")
    )
    right = client.post(
        "/console/signin", json={"key": KEY, "next": "https://evil.example/"}, headers={"x-csrf-token": token}
    )
    assert right.status_code == 204
    assert right.headers["hx-redirect"] == "/console/"  # never to another site
    cookie = right.headers["set-cookie"]
    assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert KEY not in cookie and KEY not in right.text
    assert client.get("/console/customers").status_code == 200
    assert client.get("/api/v1/contacts").status_code == 200


@pytest.mark.parametrize(
    ("given", "goes_to"),
    [
        ("/console/runs\r\nSet-Cookie: planted=1", "/console/runs%0D%0ASet-Cookie:%20planted=1"),
        ("/console/\x1b[2J", "/console/%1B%5B2J"),
        ("/console/\x7f", "/console/%7F"),
        ("/console/customers?q=İ王", "/console/customers?q=%C4%B0%E7%8E%8B"),
        ("/console/customers?q=%E7%8E%8B&tag=VIP", "/console/customers?q=%E7%8E%8B&tag=VIP"),
    ],
)
def test_the_page_after_sign_in_is_always_a_clean_header(
    keyed: LiveServer, open_server: LiveServer, given: str, goes_to: str
) -> None:
    """Whatever `next` the sign-in form carries (line breaks, escape, DEL, characters beyond Latin-1), the answer is
    a 204 whose hx-redirect is that console page percent-encoded: no header is planted, the connection is not
    dropped, no 500 — with the key and without."""
    for server, key in ((keyed, KEY), (open_server, "")):
        client = httpx.Client(base_url=server.url, timeout=30)
        token = csrf_of(client.get("/console/signin").text)
        answer = client.post("/console/signin", json={"key": key, "next": given}, headers={"x-csrf-token": token})
        assert answer.status_code == 204, answer.text
        assert answer.headers["hx-redirect"] == goes_to
        assert "planted" not in answer.headers.get("set-cookie", "")


def test_changes_on_the_cookie_need_the_csrf_token(keyed: LiveServer) -> None:
    """With the session cookie, a change without the page's CSRF token (or with a wrong one) is refused — for the
    console and for the API alike — while the Bearer header needs none (browsers never add it by themselves)."""
    client, token = signed_in(keyed)
    assert client.post("/console/login/start", json={}).status_code == 403
    assert client.post("/console/login/start", json={}, headers={"x-csrf-token": "0" * 64}).status_code == 403
    assert client.post("/api/v1/campaigns/vip_daily/run", json={}).status_code == 403
    assert client.post("/console/login/start", json={}, headers={"x-csrf-token": token}).status_code == 200
    bearer = httpx.Client(base_url=keyed.url).post("/api/v1/login/logout", headers={"authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200


def test_a_cross_site_form_post_is_refused(keyed: LiveServer, open_server: LiveServer) -> None:
    """A form another site posts (its Origin, a form body) never reaches a route, with or without a key; the
    console's own changes are JSON, so even a same-origin form body is refused."""
    client, token = signed_in(keyed)
    for server, c, headers in (
        (keyed, client, {"x-csrf-token": token}),
        (open_server, httpx.Client(base_url=open_server.url), {}),
    ):
        before = outbox_size(server)
        evil = c.post(
            "/console/campaigns/new_customers/run",
            content="confirm=1",
            headers={"origin": "https://evil.example", "content-type": "application/x-www-form-urlencoded", **headers},
        )
        assert evil.status_code == 403
        site = c.post(
            "/console/login/start",
            content="x=1",
            headers={"sec-fetch-site": "cross-site", "content-type": "application/x-www-form-urlencoded"},
        )
        assert site.status_code == 403
        form = c.post(
            "/console/login/start",
            content="x=1",
            headers={"content-type": "application/x-www-form-urlencoded", **headers},
        )
        assert form.status_code in (403, 415)
        assert outbox_size(server) == before


def test_without_a_key_console_changes_still_need_the_csrf_token(open_server: LiveServer) -> None:
    """On the loopback default (no key), the pages give an anonymous session whose CSRF token every console
    change must carry: a page elsewhere cannot drive the console even with the Origin check bypassed."""
    client = httpx.Client(base_url=open_server.url, timeout=30)
    assert client.post("/console/login/start", json={}).status_code == 403
    token = csrf_of(client.get("/console/login").text)
    assert client.cookies.get(COOKIE)
    assert client.post("/console/login/start", json={}, headers={"x-csrf-token": token}).status_code == 200


def test_signing_out_ends_the_session(keyed: LiveServer) -> None:
    """Signing out clears the cookie and revokes the session: the old cookie value no longer opens anything."""
    client, token = signed_in(keyed)
    value = client.cookies[COOKIE]
    out = client.post("/console/signout", json={}, headers={"x-csrf-token": token})
    assert out.status_code == 204 and out.headers["hx-redirect"] == "/console/signin"
    replay = httpx.Client(base_url=keyed.url, cookies={COOKIE: value})
    assert replay.get("/api/v1/contacts").status_code == 401


def test_session_tokens_expire_and_reject_tampering() -> None:
    """A session cookie is refused once expired, when any character is changed, or when signed with another
    key; the CSRF token belongs to one session only."""
    now = [1_000_000.0]
    tokens = SessionTokens(KEY, now=lambda: now[0])
    value = tokens.issue(SessionKind.KEY)
    session = tokens.read(value)
    assert session is not None and session.signed_in
    other = tokens.read(tokens.issue(SessionKind.KEY))
    assert other is not None
    assert tokens.check_csrf(session, tokens.csrf_token(session))
    assert not tokens.check_csrf(other, tokens.csrf_token(session))
    assert tokens.read(value.replace(".key.", ".anon.")) is None
    assert tokens.read(value[:-1] + ("0" if value[-1] != "0" else "1")) is None
    assert SessionTokens("another-key", now=lambda: now[0]).read(value) is None
    now[0] += 12 * 3600 + 1
    assert tokens.read(value) is None


# -- the pages --------------------------------------------------------------------------------------------


def outbox_size(server: LiveServer) -> int:
    gateway = server.app.gateway
    assert isinstance(gateway, SandboxGateway)
    return len(gateway.outbox_messages())


def test_login_flow_shows_errors_and_tries_left(open_server: LiveServer) -> None:
    """The account page starts a login (QR shown), a wrong code answers 400 with the gateway's message and the
    tries left, the right code logs in; the panel poll answers 204 while nothing changed."""
    client = httpx.Client(base_url=open_server.url, timeout=30)
    token = csrf_of(client.get("/console/login").text)
    h = {"x-csrf-token": token, "hx-request": "true"}
    client.post("/console/login/logout", json={}, headers=h)
    panel = client.post("/console/login/start", json={}, headers=h)
    assert panel.status_code == 200 and "/api/v1/login/qr.svg?key=" in panel.text
    version = re.search(r"/console/login/panel\?v=([0-9a-f]+)", panel.text)
    assert version and client.get(f"/console/login/panel?v={version.group(1)}").status_code == 204
    gateway = open_server.app.gateway
    assert isinstance(gateway, SandboxGateway)
    scanned = client.post("/console/login/sandbox-scan", json={}, headers=h)
    assert 'name="verifyCode"' in scanned.text and "还可以尝试 3 次" in scanned.text
    code = gateway.sandbox_phone_code()
    assert code
    wrong = client.post(
        "/console/login/verify", json={"verifyCode": "000000" if code != "000000" else "111111"}, headers=h
    )
    assert wrong.status_code == 400
    assert "验证码错误；还可以尝试 2 次" in wrong.text and "wrong verification code" not in wrong.text
    bad = client.post("/console/login/verify", json={"verifyCode": "12"}, headers=h)
    assert bad.status_code == 422 and "verifyCode" in bad.text
    ok = client.post("/console/login/verify", json={"verifyCode": code}, headers=h)
    assert ok.status_code == 200 and 'data-state="logged_in"' in ok.text
    # The header's state badge follows out of band (it was drawn with the page, before the login).
    assert re.search(r'id="login-badge" class="badge login-logged_in"[^>]*hx-swap-oob="true">已登录<', ok.text)
    page = client.get("/console/login").text
    assert page.count('id="login-badge"') == 1 and "hx-swap-oob" not in page


def test_pages_render_in_chinese_by_default_and_english_on_request(open_server: LiveServer) -> None:
    """Every page answers 200 (a broken campaign file 422 with its file:line error); the interface is Chinese
    unless ?lang=en asks for English, which a cookie then remembers."""
    client = httpx.Client(base_url=open_server.url, timeout=30)
    for path in ["/console/login", "/console/customers", "/console/campaigns", "/console/runs", "/console/deliveries"]:
        page = client.get(path)
        assert page.status_code == 200, path
        assert "客户" in page.text and 'lang="zh-CN"' in page.text
    broken = client.get("/console/campaigns/broken")
    assert broken.status_code == 422 and "broken.yaml:4: message.templat: unknown field" in broken.text
    listed = client.get("/console/campaigns").text
    assert "broken.yaml:4" in listed and "VIP每日问候" in listed
    english = client.get("/console/customers?lang=en")
    assert "Customers" in english.text and 'lang="en"' in english.text
    assert "Customers" in client.get("/console/campaigns").text  # remembered


def test_customers_search_by_name_remark_and_phone(open_server: LiveServer) -> None:
    """The customer search finds contacts by name, remark or phone number, filters by tag and pages by cursor."""
    gateway = open_server.app.gateway
    assert isinstance(gateway, SandboxGateway)
    client = httpx.Client(base_url=open_server.url, timeout=30)
    token = csrf_of(client.get("/console/login").text)
    if not open_server.app.contact_count():
        gateway_login(open_server)
        client.post("/api/v1/contacts/sync", json={})
    contacts = client.get("/api/v1/contacts", params={"limit": 500}).json()["items"]
    with_phone = next(c for c in contacts if c["phone"])
    with_alias = next(c for c in contacts if c["alias"])
    assert with_phone["id"] in client.get("/console/customers", params={"q": with_phone["phone"][0]}).text
    assert with_alias["id"] in client.get("/console/customers", params={"q": with_alias["alias"]}).text
    vip = client.get("/console/customers", params={"tag": "VIP"}).text
    vip_ids = {c["id"] for c in contacts if "VIP" in c["tags"]}
    assert vip_ids and all(i in vip for i in vip_ids)
    first = client.get("/console/customers").text
    next_url = re.search(r'href="(\?cursor=[^"]+)"', first)
    assert next_url, "60 contacts make two pages"
    second = client.get("/console/customers" + next_url.group(1).replace("&amp;", "&")).text
    assert contacts[-1]["id"] in second and contacts[-1]["id"] not in first
    assert token


def gateway_login(server: LiveServer) -> None:
    gateway = server.app.gateway
    assert isinstance(gateway, SandboxGateway)
    client = server.client
    client.post("/goStart")
    client.post("/api/v1/sandbox/scan")
    code = client.get("/api/v1/sandbox/phone").json()["verifyCode"]
    client.post("/submit-verify-code", json={"verifyCode": code}).raise_for_status()


# -- what the pages draw ----------------------------------------------------------------------------------


def test_messages_are_drawn_part_by_part(tmp_path: Path) -> None:
    """A preview draws every part of a message: the text bubble, the image (served by this server only for files
    previews showed), the link card and the mini-program card, all escaped."""
    poster = tmp_path / "poster.png"
    poster.write_bytes(b"\x89PNG\r\n\x1a\n")
    message = Message(
        (
            TextPart("<b>双11</b> 来了"),
            ImagePart(Media("poster.png", path=poster, size=2048, sha256="a" * 64, mime="image/png")),
            LinkPart("https://shop.example/sale", "全场五折", "仅限今天", "https://shop.example/t.jpg"),
            MiniProgramPart("wx123", "领券", "pages/coupon?id=7"),
        )
    )
    media = MediaIndex()
    parts = message_parts(message, media)
    assert [p["kind"] for p in parts] == ["text", "image", "link", "miniprogram"]
    assert parts[1]["src"] == "/console/media/" + "a" * 64 and media.get("a" * 64) is not None
    env = build_environment(ZoneInfo("Asia/Shanghai"))
    gettext, ngettext = translator(Language.ZH)
    macros = env.get_template("_macros.html").make_module({"_": gettext, "ngettext": ngettext})
    html = str(macros.message(parts))
    assert "&lt;b&gt;双11&lt;/b&gt; 来了" in html and "<b>" not in html
    assert 'class="bubble image"' in html and "2 KB" in html
    assert 'href="https://shop.example/sale"' in html and "全场五折" in html and "仅限今天" in html
    assert "wx123" in html and "pages/coupon?id=7" in html and "领券" in html


def test_charts_escape_labels_and_scale_to_the_largest_bucket() -> None:
    """The run charts draw one column per time bucket scaled to the largest, and a bar per reason, with every
    label escaped (a reason is text from a gateway)."""
    from datetime import UTC, datetime

    svg = str(
        charts.sends_over_time(
            datetime(2026, 11, 23, 2, tzinfo=UTC), 60, [1, 4, 2], ZoneInfo("Asia/Shanghai"), label="x"
        )
    )
    heights = [float(h) for h in re.findall(r'<rect [^>]*height="([\d.]+)"', svg)]
    assert len(heights) == 3 and max(heights) == heights[1] and heights[0] == pytest.approx(heights[1] / 4)
    assert "11-23 10:00:00" in svg  # local time
    bars = str(charts.bars([("<script>x</script>", 3), ("invalid", 1)], label="y"))
    assert "<script>" not in bars and "&lt;script&gt;" in bars
    widths = [float(w) for w in re.findall(r'<rect width="([\d.]+)"', bars)]
    assert widths == [100.0, pytest.approx(100 / 3, abs=0.1)]
    assert charts.sends_over_time(None, 0, [], ZoneInfo("UTC"), label="x") == ""


def test_the_console_environment_escapes_and_is_not_the_campaign_sandbox() -> None:
    """The console's Jinja environment autoescapes every template and refuses undefined names; it is a plain
    environment of its own, not the bounded sandbox campaign templates run in."""
    env = build_environment(ZoneInfo("UTC"))
    assert type(env) is Environment
    assert env.from_string("{{ x }}").render(x="<i>") == "&lt;i&gt;"
    with pytest.raises(Exception, match="undefined"):
        env.from_string("{{ nope }}").render()


def test_every_interface_text_has_its_chinese_translation() -> None:
    """Every text the console's templates and code mark for translation has a Chinese translation with the same
    placeholders, and the compiled catalog the server reads says the same as the .po file (no stale .mo)."""
    import gettext
    import io

    from babel.messages.extract import extract_from_dir
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po

    from engine.web.console import templating

    root = Path(templating.__file__).parent
    keywords = {"_": None, "N_": None, "ngettext": (1, 2)}
    method_map = [("**/templates/**.html", "jinja2"), ("**.py", "python")]
    found = {
        m[2] if isinstance(m[2], str) else m[2][0] for m in extract_from_dir(str(root), method_map, keywords=keywords)
    }
    po = root / "locale" / "zh_CN" / "LC_MESSAGES" / "console.po"
    with po.open("rb") as f:
        catalog = read_po(f)
    translated = {}
    for m in catalog:
        if m.id:
            key = m.id if isinstance(m.id, str) else m.id[0]
            translated[key] = m.string if isinstance(m.string, str) else m.string[0]
    missing = sorted(k for k in found if not translated.get(k))
    assert not missing, f"untranslated in {po}: {missing}"
    placeholder = re.compile(r"%\((\w+)\)[sd]")
    for key in found:
        assert set(placeholder.findall(key)) == set(placeholder.findall(translated[key])), key
    fresh = io.BytesIO()
    write_mo(fresh, catalog)
    compiled = gettext.GNUTranslations(io.BytesIO(fresh.getvalue()))
    shipped = templating.translations(Language.ZH)
    for key in found:
        assert shipped.gettext(key) == compiled.gettext(key), f"{po.with_suffix('.mo')} is stale: pybabel compile"


def wait_for_run(
    client: httpx.Client, run_id: int, status: str = "completed", within: float = 30.0
) -> dict[str, object]:
    """The run once it reaches `status` (polled until then, at most `within` seconds)."""
    import time

    deadline = time.monotonic() + within
    while True:
        run = client.get(f"/api/v1/runs/{run_id}").json()
        if run["status"] == status and not run.get("dispatching"):
            return dict(run)
        assert time.monotonic() < deadline, f"run {run_id} is still {run['status']}"
        time.sleep(0.05)


def test_test_send_reaches_only_the_named_contacts_and_leaves_the_real_run_alone(open_server: LiveServer) -> None:
    """A test send (API and console form) is refused while logged out and for unknown contacts; it sends the
    campaign's message to the named contacts only, in a run marked test, and the campaign's real run still sends
    to them (a test is outside dedupe)."""
    client = httpx.Client(base_url=open_server.url, timeout=30)
    client.post("/goEnd")
    refused = client.post("/api/v1/campaigns/vip_daily/test-send", json={"contacts": ["x"]})
    assert refused.status_code == 409 and "not logged in" in refused.json()["error"]
    gateway_login(open_server)
    client.post("/api/v1/contacts/sync").raise_for_status()
    vips = client.get("/api/v1/contacts", params={"tag": "VIP", "friend": True, "limit": 100}).json()["items"]
    tester = vips[0]["id"]
    assert client.post("/api/v1/campaigns/vip_daily/test-send", json={"contacts": []}).status_code == 422
    unknown = client.post("/api/v1/campaigns/vip_daily/test-send", json={"contacts": ["nobody"]})
    assert unknown.status_code == 404 and "nobody" in unknown.json()["error"]
    token = csrf_of(client.get("/console/campaigns/vip_daily").text)
    form = client.post(
        "/console/campaigns/vip_daily/test-send",
        json={"contacts": "nobody, 其他"},
        headers={"x-csrf-token": token, "hx-request": "true"},
    )
    assert form.status_code == 404 and form.headers["hx-retarget"] == "#notice" and "nobody" in form.text

    before = outbox_size(open_server)
    sent = client.post(
        "/console/campaigns/vip_daily/test-send", json={"contacts": tester}, headers={"x-csrf-token": token}
    )
    assert sent.status_code == 204
    run_id = int(sent.headers["hx-redirect"].rsplit("/", 1)[1])
    test_run = wait_for_run(client, run_id)
    assert test_run["trigger"] == "test" and test_run["counts"] == {"sent": 1}
    gateway = open_server.app.gateway
    assert isinstance(gateway, SandboxGateway)
    assert [m.contact_id for m in gateway.outbox_messages()[before:]] == [tester]
    assert "VIP每日问候您好" not in gateway.outbox_messages()[-1].text  # rendered: the contact's name, not a template
    real = client.post("/api/v1/campaigns/vip_daily/run").json()["run"]
    wait_for_run(client, real["id"])
    got = [m.contact_id for m in gateway.outbox_messages()[before:]]
    assert got.count(tester) == 2 and set(got) == {v["id"] for v in vips}


def test_the_engines_words_follow_the_pages_language(open_server: LiveServer) -> None:
    """What the engine words itself — a preview's exclusion reasons — comes out in the page's language: Chinese
    by default, English with ?lang=en, and the browser's Accept-Language decides when the page does not."""
    client = httpx.Client(base_url=open_server.url, timeout=30)
    if not open_server.app.contact_count():
        gateway_login(open_server)
        client.post("/api/v1/contacts/sync").raise_for_status()
    zh = client.get("/console/campaigns/vip_daily/preview").text
    assert "不是本账号的好友（无法接收消息）" in zh and "not a friend of this account" not in zh
    en = client.get("/console/campaigns/vip_daily/preview?lang=en").text
    assert "not a friend of this account (cannot receive messages)" in en and "收件人及其收到的消息" not in en
    browser = httpx.Client(base_url=open_server.url, timeout=30, headers={"accept-language": "en-US,en;q=0.9"})
    assert "Recipients and their messages" in browser.get("/console/campaigns/vip_daily/preview").text


def test_a_journeys_tree_counts_the_contacts_at_each_step(open_server: LiveServer) -> None:
    """A journey page draws its steps as a tree (the if's branches nested) with how many contacts stand at each
    step: after a new contact event the contact got the welcome and waits at the next step; the customer page
    shows the journey, the path taken and the opt-out state."""
    client = httpx.Client(base_url=open_server.url, timeout=30)
    if not open_server.app.contact_count():
        gateway_login(open_server)
        client.post("/api/v1/contacts/sync").raise_for_status()
    gateway = open_server.app.gateway
    assert isinstance(gateway, SandboxGateway)
    newcomer = client.get("/api/v1/contacts", params={"friend": True, "limit": 1}).json()["items"][0]["id"]
    listed = client.get("/console/journeys").text
    assert "新客欢迎" in listed and 'href="/console/journeys/welcome"' in listed
    assert "新客户添加我们" in listed and "仅一次" in listed and "contact added" not in listed  # trigger, entry
    open_server.on_loop(lambda: gateway.emit(EventKind.CONTACT_ADDED, contact_id=newcomer))
    deadline = time.monotonic() + 30
    while "later" not in [e.step for e in journeys_db.enrolments(open_server.app.db, journey_id="welcome")]:
        assert time.monotonic() < deadline, "the new contact never reached the wait"
        time.sleep(0.05)
    page = client.get("/console/journeys/welcome").text
    assert "新客户添加我们" in page and "仅一次" in page
    steps = re.findall(r'data-step="([^"]+)"', page)
    assert steps[:2] == ["hello", "later"] and {"vip_tip", "tip"} <= set(steps)
    at = {m[0]: int(m[1]) for m in re.findall(r'data-step="([^"]+)".*?<b>(\d+)</b>', page, flags=re.S)}
    assert at["later"] == 1 and at["hello"] == 0 and at["tip"] == 0
    assert re.search(r'data-step="hello".*?已经过 1 次', page, flags=re.S)  # the welcome was passed once
    assert any(m.contact_id == newcomer for m in gateway.outbox_messages())
    customer = client.get(f"/console/customers/{newcomer}").text
    assert 'href="/console/journeys/welcome"' in customer and "<code>hello</code>" in customer
    assert "subscribed" not in customer and "未退订" in customer


def test_the_new_device_check_shows_its_second_qr(tmp_path: Path) -> None:
    """When WeCom asks to confirm a new device after the code, the login panel says so and shows the second QR;
    once it is scanned the account is logged in."""
    settings = make_settings(tmp_path, sandbox={"second_verification": True})
    with LiveServer(settings) as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        h = {"x-csrf-token": csrf_of(client.get("/console/login").text), "hx-request": "true"}
        client.post("/console/login/start", json={}, headers=h)
        client.post("/console/login/sandbox-scan", json={}, headers=h)
        gateway = server.app.gateway
        assert isinstance(gateway, SandboxGateway)
        second = client.post("/console/login/verify", json={"verifyCode": gateway.sandbox_phone_code()}, headers=h)
        assert second.status_code == 200 and "新设备安全验证" in second.text and 'id="login-qr"' in second.text
        done = client.post("/console/login/sandbox-scan", json={}, headers=h)
        assert 'data-state="logged_in"' in done.text


def test_recent_events_refresh_without_reloading(open_server: LiveServer) -> None:
    """The account page's recent-events card polls /console/events with the version it shows: 204 while nothing
    happened, then — after the gateway's next event (a new QR) — the card again with that event and a new version."""
    client = httpx.Client(base_url=open_server.url, timeout=30)
    page = client.get("/console/login").text
    card = re.search(r'id="recent-events" hx-get="/console/events\?v=([0-9a-f]+)" hx-trigger="every 3s"', page)
    assert card, "the recent events card does not poll"
    version = card.group(1)
    assert client.get(f"/console/events?v={version}").status_code == 204
    h = {"x-csrf-token": csrf_of(page), "hx-request": "true"}
    client.post("/console/login/logout", json={}, headers=h)
    client.post("/console/login/start", json={}, headers=h)
    deadline = time.monotonic() + 20
    while (fresh := client.get(f"/console/events?v={version}")).status_code == 204:
        assert time.monotonic() < deadline, "the card never showed the new events"
        time.sleep(0.05)
    assert fresh.status_code == 200 and fresh.text.lstrip().startswith('<section class="card" id="recent-events"')
    assert '<span class="tag" title="qr">二维码</span>' in fresh.text and "<html" not in fresh.text  # not the code "qr"
    again = re.search(r"/console/events\?v=([0-9a-f]+)", fresh.text)
    assert again and again.group(1) != version
    while (latest := client.get(f"/console/events?v={again.group(1)}")).status_code == 200:  # later events, if any
        again = re.search(r"/console/events\?v=([0-9a-f]+)", latest.text)
        assert again and time.monotonic() < deadline
    assert latest.status_code == 204
