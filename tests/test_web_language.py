"""API errors and messages in the request's language (issue 11 item 4), on a real server: the source document's
endpoints and /api/v1 answer in Chinese or English as `?lang=`, Accept-Language, config.yaml's `language:` or the
server's own locale say (English when nothing does), in one language per answer, never mixed; the JSON keys and
`code` stay English; two requests in different languages at once never mix."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

try:
    from web_harness import CAMPAIGN, LiveServer, login, make_settings
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.web_harness import CAMPAIGN, LiveServer, login, make_settings

from engine.i18n import Language, use_language
from engine.web.language import request_language

HAN = re.compile(r"[\u4e00-\u9fff]")
ZH = {"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.5"}
EN = {"Accept-Language": "en-US,en;q=0.8"}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root: Path = tmp_path_factory.mktemp("lang")
    (root / "campaigns").mkdir()
    (root / "campaigns" / "vip_daily.yaml").write_text(CAMPAIGN, encoding="utf-8")
    with LiveServer(make_settings(root)) as server:
        yield server


@pytest.fixture
def client(live: LiveServer) -> httpx.Client:
    return live.client


def test_the_language_of_a_request() -> None:
    """?lang= first, then Accept-Language (by quality), then the config, then the process's language (English here:
    the tests run in LANG=C.UTF-8); nonsense is ignored."""
    assert request_language("zh", "en", Language.EN) is Language.ZH
    assert request_language(None, "fr;q=1, zh-CN;q=0.8, en;q=0.5", None) is Language.ZH
    assert request_language(None, "en, zh;q=0.1", Language.ZH) is Language.EN
    assert request_language(None, None, Language.ZH) is Language.ZH
    assert request_language("klingon", "fr", None) is Language.EN
    with use_language(Language.ZH):  # a process whose CLI chose Chinese (its --lang or a zh_CN locale)
        assert request_language(None, None, None) is Language.ZH
        assert request_language(None, None, Language.EN) is Language.EN
        assert request_language(None, "en", None) is Language.EN


# (method, path, JSON body, status, code, Chinese words, English words): one error of each kind.
CASES = [
    (
        "post",
        "/send-message",
        {"message": "hi"},
        422,
        "invalid_request",
        "请求无效：id：缺少必填字段",
        "invalid request",
    ),
    ("post", "/send-message-all", {"message": "hi"}, 422, "invalid_request", "请给出收件人", "give the recipients"),
    ("get", "/api/v1/runs/999999", None, 404, "not_found", "没有发送批次 999999", "no run 999999"),
    ("get", "/api/v1/contacts/nobody", None, 404, "not_found", "没有客户 'nobody'", "no contact 'nobody'"),
    ("get", "/api/v1/campaigns/nope/preview", None, 404, "not_found", "中没有活动 'nope'", "no campaign 'nope'"),
    ("post", "/get-all-user", {"page": 1, "cursor": "x"}, 422, "invalid_request", "只能给一个", "not both"),
    # pydantic's own checks, in pydantic's English word for word, and in Chinese
    (
        "post",
        "/send-message",
        {"id": "x" * 201, "message": "hi"},
        422,
        "invalid_request",
        "最多 200 个字符",
        "at most 200",
    ),
    ("post", "/send-message", {"id": "x", "message": "a\u0000b"}, 422, "invalid_request", "控制字符 U+0000", "U+0000"),
    # a validator's own reason (was English in both)
    (
        "post",
        "/submit-verify-code",
        {"verifyCode": "12345"},
        422,
        "invalid_request",
        "verifyCode：应为手机上显示的 6 位数字",
        "must be the 6 digits shown on the phone",
    ),
]


def test_a_body_that_is_not_json_is_a_problem_of_the_body(client: httpx.Client) -> None:
    """`-d 'not json'` names the body as the field, not the decoder's position (`field: "0"`, `请求无效：0：…`)."""
    answer = client.post("/send-message", content=b"not json", headers={"content-type": "application/json", **ZH})
    assert answer.status_code == 422
    assert answer.json()["field"] == "body" and answer.json()["error"].startswith("请求无效：body："), answer.text


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_errors_answer_in_the_requests_language_with_english_codes(client: httpx.Client, lang: str) -> None:
    """Each error's words are in the language asked for (header or ?lang=), its `code` and keys English."""
    login(client)
    for method, path, body, status, code, zh, en in CASES:
        for ask in ({"headers": ZH if lang == "zh" else EN}, {"params": {"lang": lang}}):
            answer = client.request(method.upper(), path, json=body, **ask)  # type: ignore[arg-type]
            assert answer.status_code == status, (path, answer.text)
            data = answer.json()
            assert data["code"] == code and set(data) >= {"error", "code"}, data
            assert (zh if lang == "zh" else en) in data["error"], (path, data)
            if lang == "en":
                assert not HAN.search(data["error"]), data  # English, not a mix
            assert answer.headers["content-language"] == ("zh-CN" if lang == "zh" else "en")


def test_without_a_choice_the_answer_is_english(client: httpx.Client) -> None:
    """A script that asks for nothing gets English (and can rely on `code`)."""
    answer = client.get("/api/v1/runs/999999")
    assert answer.json() == {"error": "no run 999999", "code": "not_found"}
    assert answer.headers["content-language"] == "en"


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_the_source_documents_flow_speaks_one_language(client: httpx.Client, lang: str) -> None:
    """goStart, submit-verify-code, send-message and goEnd: every message in the chosen language only (the old
    answers mixed 已登录 with English)."""
    ask = {"lang": lang}
    client.post("/goEnd", params=ask)
    started = client.post("/goStart", params=ask).json()
    client.post("/api/v1/sandbox/scan")
    code = client.get("/api/v1/sandbox/phone").json()["verifyCode"]
    verified = client.post(
        "/submit-verify-code", params=ask, json={"verifyCode": code, "qrcodeKey": started["qrcodeKey"]}
    ).json()
    contact = client.post("/get-all-user", json={"pageSize": 1}).json()["datas"][0]
    sent = client.post("/send-message", params=ask, json={"id": contact["id"], "message": "您好"}).json()
    again = client.post("/goStart", params=ask).json()  # logged out by nobody: already logged in
    ended = client.post("/goEnd", params=ask).json()
    messages = [verified["message"], sent["message"], again["message"], ended["message"]]
    if lang == "zh":
        assert verified["message"].startswith("验证码已接收，登录成功")
        assert sent["message"] == "send-message: 发送成功（1 条）"
        assert again["message"].startswith("已登录")
        assert ended["message"] == "已退出登录：调用 /goStart 获取新的二维码"
        assert all("logged" not in m and "sent " not in m for m in messages), messages
    else:
        assert verified["message"].startswith("verification code accepted: logged in as")
        assert sent["message"] == "send-message: sent successfully (1 sent)"
        assert ended["message"] == "logged out: call /goStart for a new QR code"
        assert not any(HAN.search(m.split(" as ")[0]) for m in messages), messages  # the account's name may be 中文
    login(client)


def test_the_guards_refusals_are_translated(client: httpx.Client) -> None:
    """A body that is not JSON (415) and a forged Host (421) are refused in the request's language too."""
    answer = client.post("/send-message", content=b"id=1", headers={"content-type": "text/plain", **ZH})
    assert answer.status_code == 415 and answer.json()["code"] == "unsupported_media_type"
    assert "请求体请用 JSON" in answer.json()["error"]
    answer = client.get("/api/v1/runs", headers={"host": "evil.example", **EN})
    assert answer.status_code == 421 and answer.json()["code"] == "misdirected_request"
    assert "only answers to loopback names" in answer.json()["error"]


def test_a_body_too_deeply_nested_for_the_json_decoder_is_a_bad_request_in_words(client: httpx.Client) -> None:
    """JSON nested 100,000 deep (the decoder's RecursionError) was answered {"detail": "There was an error parsing
    the body"}, English whatever the language: now a 400 like every other bad request, in the request's language."""
    body = b'{"id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for headers, words in ((ZH, "无法按 JSON 读取"), (EN, "could not be read as JSON")):
        answer = client.post("/send-message", content=body, headers={"content-type": "application/json", **headers})
        assert answer.status_code == 400, answer.text
        data = answer.json()
        assert data["code"] == "invalid_request" and data["field"] == "body" and words in data["error"], data
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"id": "\xff\xfe", "message": "hi"}'),  # not UTF-8 at all
        ("application/json; charset=latin-1", '{"id": "caf\u00e9", "message": "hi"}'.encode("latin-1")),
    ],
)
def test_a_json_body_that_is_not_utf8_is_a_bad_request_that_says_so(
    client: httpx.Client, content_type: str, body: bytes
) -> None:
    """A JSON body in another encoding was answered "could not be read as JSON (nested too deeply?)", sending the
    caller looking for nesting; it is refused (400, nothing sent) saying the body must be UTF-8, in both languages."""
    for headers, words in ((ZH, "UTF-8"), (EN, "not UTF-8")):
        answer = client.post("/send-message", content=body, headers={"content-type": content_type, **headers})
        assert answer.status_code == 400, answer.text
        data = answer.json()
        assert data["code"] == "invalid_request" and data["field"] == "body", data
        assert words in data["error"] and "nested" not in data["error"] and "嵌套" not in data["error"], data
    assert client.get("/healthz").status_code == 200


def test_two_languages_at_once_never_mix(client: httpx.Client) -> None:
    """Forty concurrent requests, half Chinese and half English: each answer is in its own request's language."""

    def ask(i: int) -> tuple[bool, str]:
        zh = i % 2 == 0
        answer = client.get(f"/api/v1/runs/{900000 + i}", headers=ZH if zh else EN)
        return zh, answer.json()["error"]

    with ThreadPoolExecutor(8) as pool:
        for zh, error in pool.map(ask, range(40)):
            assert bool(HAN.search(error)) == zh, error


def test_config_language_is_the_default(tmp_path: Path) -> None:
    """With `language: zh_CN` in config.yaml, a request that asks for nothing is answered in Chinese."""
    settings = make_settings(tmp_path, language="zh_CN")
    with LiveServer(settings, scheduler=False) as server:
        answer = server.client.get("/api/v1/runs/5")
        assert answer.json()["error"] == "没有发送批次 5"
        assert server.client.get("/api/v1/runs/5", params={"lang": "en"}).json()["error"] == "no run 5"


def test_the_login_qr_is_logged_in_the_servers_language(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The log line that tells whoever watches `wecast serve` to scan the QR is in the server's language, whatever
    the request that started the login asked for (`/goStart?lang=en` on a Chinese server logged it in English)."""
    import logging

    from engine import i18n

    before = i18n.process_language()
    i18n.set_language(Language.ZH)  # a server started with --lang zh (or in a zh_CN locale)
    try:
        with LiveServer(make_settings(tmp_path), scheduler=False) as server, caplog.at_level(logging.INFO, "wecast"):
            server.client.post("/goEnd")
            answer = server.client.post("/goStart", params={"lang": "en"})
            assert answer.json()["state"] == "waiting_scan" and not HAN.search(answer.json()["message"]), answer.text
            server.client.post("/api/v1/sandbox/scan")
            en = server.client.get("/api/v1/sandbox/phone", params={"lang": "en"}).json()  # was Chinese in any language
            zh = server.client.get("/api/v1/sandbox/phone", params={"lang": "zh"}).json()
            assert en["message"] == f"WeCom on the phone shows the verification code {en['verifyCode']}", en
            assert zh["message"] == f"手机企业微信显示验证码 {zh['verifyCode']}", zh
    finally:
        i18n.set_language(before)
    logged = [r.getMessage() for r in caplog.records if r.name == "wecast.web" and "qrcodeKey" in r.getMessage()]
    assert logged and all(line.startswith("请用手机企业微信扫描这个二维码登录") for line in logged), logged


def test_pooled_sends_refused_answer_each_caller_in_its_language(client: httpx.Client) -> None:
    """Sends made at once are planned together in one pool; refused (logged out, an unknown id), each caller still
    reads the refusal in its own request's language."""
    login(client)
    contact = client.post("/get-all-user", json={"pageSize": 1}).json()["datas"][0]
    client.post("/goEnd")

    def send(i: int) -> tuple[bool, httpx.Response]:
        zh = i % 2 == 0
        body = {"id": contact["id"] if i % 4 < 2 else f"nobody-{i}", "message": "您好"}
        return zh, client.post("/send-message", json=body, headers=ZH if zh else EN)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(16)))
    for zh, answer in answers:
        assert answer.status_code == 409 and answer.json()["code"] == "not_logged_in", answer.text
        assert bool(HAN.search(answer.json()["error"])) == zh, answer.text
    login(client)
    unknown = client.post("/send-message", json={"id": "nobody", "message": "您好"}, headers=ZH)
    assert unknown.status_code == 404 and "没有 id 为 nobody 的客户" in unknown.json()["error"]


@pytest.mark.slow
@pytest.mark.parametrize(("locale", "chinese"), [("zh_CN.UTF-8", True), ("C.UTF-8", False)])
def test_serve_answers_in_its_locale_when_the_request_asks_for_nothing(
    tmp_path: Path, locale: str, chinese: bool
) -> None:
    """A real `wecast serve` started in a zh_CN locale answers a bare curl of the source document's /goStart in
    Chinese, as the original service did (before, English unless the request or config.yaml asked), and its log
    line for the login's event is Chinese too; in an English locale, English. A request's own choice still wins."""
    (tmp_path / "config.yaml").write_text("version: 1\nsandbox:\n  contacts: 5\n  scan_delay: 1h\n", encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "LC_MESSAGES", "LANGUAGE")}
    env |= {"LANG": locale, "WECAST_CONFIG": str(tmp_path / "config.yaml")}
    env |= {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, "-c", "from engine.cli import main; main()", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
        bare = httpx.post(f"{url}/goStart")
        asked = httpx.post(f"{url}/goStart", headers=EN if chinese else ZH)
        unknown = httpx.get(f"{url}/api/v1/runs/7")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert bare.json()["state"] == "waiting_scan"
    assert bool(HAN.search(bare.json()["message"])) == chinese, bare.text
    assert bare.headers["content-language"] == ("zh-CN" if chinese else "en")
    assert unknown.json()["error"] == ("没有发送批次 7" if chinese else "no run 7")
    assert bool(HAN.search(asked.json()["message"])) != chinese, asked.text  # the request's own choice wins
    assert unknown.json()["code"] == "not_found"
    # The log line of the bare request's QR event (the first), in the server's language.
    logged = [line for line in out.splitlines() if "wecast.gateway" in line and ": qr" in line]
    assert logged, out
    assert bool(HAN.search(logged[0])) == chinese, logged
    # Its stop too: these two lines were English in a Chinese server's log.
    stopping = [line for line in out.splitlines() if "wecast.web" in line][-2:]
    assert stopping, out
    if chinese:
        assert [line.split(": ", 1)[1] for line in stopping] == [
            "正在停止：停止定时任务，等待正在发送的消息发完",
            "已停止；正在发送的消息均已记录",
        ], out
    else:
        assert "stopped; every in-flight send is recorded" in stopping[-1], out
