"""A rich message's problems in the reader's language: `wecast --lang zh validate` gives a bad part's reason in
Chinese after the same `file:line: field:` prefix, the per-recipient checks of a preview read in Chinese, and the
HTTP API's 422 for a bad attachment (and its refusal of an upload) follows Accept-Language: zh-CN — while English
stays the answer for whoever asks for nothing."""

from __future__ import annotations

import io
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from PIL import Image

from engine import i18n
from engine.cli import main
from engine.gateways.base import Capabilities
from engine.gateways.sandbox import SandboxGateway
from engine.message_spec import describe_problems, render_messages
from engine.messages import PartKind
from engine.settings import Settings
from engine.spec import load_campaign

try:
    from web_harness import LiveServer, login, make_settings
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.web_harness import LiveServer, login, make_settings

CASES = Path(__file__).parent / "cases" / "messages" / "invalid"
EXPECT = re.compile(r"^# expect: line (\d+): (\S+): (.+)$")
CJK = re.compile(r"[\u4e00-\u9fff]")
NOW = datetime(2026, 11, 11, 2, 0, tzinfo=UTC)


def has_chinese(text: str) -> bool:
    return bool(CJK.search(text))


# -- wecast validate ---------------------------------------------------------------------------------------

# (case file, words of its reason in Chinese): one case per kind of problem a part can have.
ZH_CASES = [
    ("ten_attachments", "一条消息除文字外最多带 9 个附件"),
    ("two_texts", "一条消息最多只能有一段文字"),
    ("part_two_kinds", "每个部分只能是 text:、image:、link:、miniprogram:、file: 中的一种（这里写了 text, image）"),
    ("parts_and_template", "请给出其中一个，且只给一个（这里写了 template, parts）"),
    ("image_http_url", "'http://cdn.example.com/p.png' 不是 https 链接"),
    ("image_missing", "找不到图片文件：media/nope.png"),
    ("image_outside", "图片文件 '../../valid/media/poster.png' 在活动文件夹之外"),
    ("image_gif", "不是 JPG 或 PNG 图片（按文件内容判断：image/gif）"),
    ("image_not_an_image", "'media/fake.jpg' 不是 JPG 或 PNG 图片（按文件内容判断：不是 wecast 能识别的图片）"),
    ("file_missing", "找不到文件：media/价目表.pdf"),
    ("file_directory", "不是普通文件"),
    ("link_title_empty", "title 为空"),
    ("link_title_too_long", "title 超过 128 字节（现为 130；企业微信的限制）"),
    ("link_description_too_long", "description 超过 512 字节（现为 540；企业微信的限制）"),
    ("link_url_http", "'http://mall.example.com' 不是 https 链接"),
    ("link_url_template_not_https", "链接必须以 https:// 开头"),
    ("miniprogram_empty_appid", "appid 为空；请填写小程序的 AppID"),
    ("miniprogram_bad_appid", "'wx 123' 不是有效的 AppID"),
    ("miniprogram_title_too_long", "title 超过 64 字节"),
    ("text_part_template_file_missing", "找不到模板文件：templates/nope.j2"),
]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The invalid message cases (and their media) as the campaigns folder of a fresh config."""
    shutil.copytree(CASES, tmp_path / "campaigns")
    (tmp_path / "config.yaml").write_text(
        "version: 1\n"
        f"database_url: sqlite:///{tmp_path}/data/wecast.sqlite\n"
        f"campaigns_dir: {tmp_path}/campaigns\n"
        f"sandbox: {{state_file: {tmp_path}/data/sandbox.sqlite}}\n",
        encoding="utf-8",
    )
    return tmp_path


def validate(workdir: Path, lang: str, name: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        main,
        ["-c", str(workdir / "config.yaml"), "--lang", lang, "validate", str(workdir / "campaigns" / f"{name}.yaml")],
        catch_exceptions=False,
    )
    return result.exit_code, result.output


def problem_line(output: str, prefix: str) -> str:
    found = [line for line in output.splitlines() if prefix in line]
    assert found, f"no line with {prefix!r} in:\n{output}"
    return found[0]


@pytest.mark.parametrize(("name", "words"), ZH_CASES, ids=[c[0] for c in ZH_CASES])
def test_validate_names_a_bad_part_in_chinese(workdir: Path, name: str, words: str) -> None:
    """`--lang zh validate`: the problem keeps its `file:line: field:` prefix, and the reason after it is the
    Chinese catalog's; `--lang en` gives the English reason the case file expects, with no Chinese of ours in it."""
    first = (CASES / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0]
    match = EXPECT.match(first)
    assert match, first
    line, field, english = match.groups()
    prefix = f"{workdir / 'campaigns' / name}.yaml:{line}: {field}: "

    code, out = validate(workdir, "zh", name)
    assert code == 2, out
    zh = problem_line(out, prefix)
    reason = zh.split(prefix, 1)[1]
    assert words in reason, zh
    assert english not in reason

    code, out = validate(workdir, "en", name)
    assert code == 2, out
    en = problem_line(out, prefix).split(prefix, 1)[1]
    assert english in en
    # The English reason may quote the case's own Chinese (a file name like 价目表.pdf) and say 群发, nothing more.
    assert not has_chinese(en.replace("价目表", "").replace("群发", "")), en


def test_per_recipient_checks_read_in_chinese(tmp_path: Path) -> None:
    """The checks made for each recipient (a templated title over WeCom's limit, a field rendering empty, a URL
    that stops being https) are described in the language in force when they are reported."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: x\naudience: {}\nmessage:\n  max_length: 10\n  parts:\n"
        "    - text: '{{ display_name }}您好'\n"
        "    - link:\n"
        '        url: "https://mall.example.com/{{ city }}"\n'
        '        title: "{{ display_name }}的专属会场"\n'
        "    - miniprogram:\n"
        "        appid: wx1234567890abcdef\n"
        "        title: \"{{ title | default('') }}\"\n"
        "        page: pages/index\n"
        "        thumbnail: https://cdn.example.com/c.jpg\n",
        encoding="utf-8",
    )
    c = load_campaign(path, Settings(version=1)).compiled
    base = {"name": "王芳", "alias": "", "gender": 2, "friend": True, "city": "a", "title": "店长"}
    people = [
        {**base, "id": "ok"},
        {**base, "id": "long", "name": "很" * 40},  # the text over 10 characters, the title over 128 bytes
        {**base, "id": "space", "city": "a b"},  # the URL has a space in it
        {**{k: v for k, v in base.items() if k != "title"}, "id": "empty"},
    ]
    rendered = render_messages(c, people, campaign={"id": "x", "name": "x"}, now=NOW)
    with i18n.use_language(i18n.Language.ZH):
        zh = [str(p) for p in describe_problems(c, rendered.too_long, rendered.failed, total=4)]
    en = [str(p) for p in describe_problems(c, rendered.too_long, rendered.failed, total=4)]
    assert f"{path}:6: message.parts[0].text: 有 1 位收件人的消息超过 message.max_length（10）" in zh
    assert f"{path}:9: message.parts[1].link.title: 4 位收件人中有 1 位的 title 超过 128 字节（企业微信的限制）" in zh
    assert f"{path}:8: message.parts[1].link.url: 4 位收件人中有 1 位的 url 不是 https 链接" in zh
    assert f"{path}:12: message.parts[2].miniprogram.title: 4 位收件人中有 1 位的 title 渲染后为空" in zh
    assert f"{path}:6: message.parts[0].text: the message is longer than message.max_length (10) for 1 recipient" in en
    assert f"{path}:12: message.parts[2].miniprogram.title: the title renders empty for 1 of 4 recipients" in en
    assert not any(has_chinese(p.split(": ", 2)[-1]) for p in en), en


# -- the HTTP API ------------------------------------------------------------------------------------------

ZH = {"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.5"}


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 45)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root: Path = tmp_path_factory.mktemp("message-lang")
    with LiveServer(make_settings(root, media_dir=str(root / "media"))) as server:
        login(server.client)
        yield server


def upload(client: httpx.Client, body: bytes, name: str, **extra: Any) -> httpx.Response:
    return client.post(
        "/api/v1/media", params={"name": name}, content=body, headers={"content-type": "image/png", **extra}
    )


def received(live: LiveServer, contact_id: str) -> list[str]:
    gateway = live.app.gateway
    assert isinstance(gateway, SandboxGateway)
    return [m.kind for m in gateway.outbox_messages(contact_id)]


def a_friend(client: httpx.Client, offset: int) -> str:
    page = client.get("/api/v1/contacts", params={"friend": True, "coworker": False, "limit": 1, "offset": offset})
    return str(page.json()["items"][0]["id"])


LINK = {"kind": "link", "url": "https://mall.example.com/1111", "title": "双十一主会场"}
MINI = {
    "kind": "miniprogram",
    "appid": "wx1234567890abcdef",
    "title": "领取会员券",
    "page": "pages/coupon/index",
    "thumbnail_url": "https://cdn.example.com/c.jpg",
}

# (what is sent besides the recipient, the field named, the Chinese words, the English words)
BAD = [
    (
        {"attachments": [{"kind": "image", "media_id": "0" * 64}]},
        "attachments[0]",
        "没有已存储的媒体",
        "no stored media",
    ),
    ({"attachments": [{"kind": "image", "media_id": "../x"}]}, "attachments[0]", "64 位十六进制", "64 hex digits"),
    ({"attachments": [{"kind": "file"}]}, "attachments[0]", "二者选一", "one of them"),
    (
        {"attachments": [{"kind": "image", "url": "http://cdn.example.com/p.png"}]},
        "attachments[0]",
        "'http://cdn.example.com/p.png' 不是 https 链接",
        "is not an https URL",
    ),
    (
        {"attachments": [{**LINK, "title": "双十一" * 15}]},
        "attachments[0].title",
        "title 超过 128 字节",
        "longer than 128",
    ),
    ({"attachments": [{**LINK, "title": " "}]}, "attachments[0].title", "title 为空", "the title is empty"),
    ({"attachments": [{**MINI, "appid": " "}]}, "attachments[0].appid", "请填写小程序的 AppID", "AppID"),
    ({"attachments": [LINK] * 10}, "attachments", "最多 9 项（现有 10 项）", "at most 9 items (found 10)"),
    ({"message": " "}, "message", "不能为空", "must not be empty"),
]


@pytest.mark.parametrize(
    ("body", "field", "zh", "en"),
    BAD,
    ids=["unknown-media", "bad-media-id", "no-media", "http-url", "long-title", "empty-title", "appid", "ten", "none"],
)
def test_a_bad_attachment_is_refused_in_the_callers_language(
    live: LiveServer, body: dict[str, Any], field: str, zh: str, en: str
) -> None:
    """/send-message and /send-message-all: a bad part is a 422 naming its field, with the reason in Chinese for
    Accept-Language: zh-CN and in English for a caller who asks for nothing; nothing is sent either way."""
    client = live.client
    contact = a_friend(client, 30)
    for path, extra in (("/send-message", {"id": contact}), ("/send-message-all", {"ids": [contact]})):
        chinese = client.post(path, json={**extra, **body}, headers=ZH)
        assert chinese.status_code == 422, chinese.text
        assert chinese.headers["content-language"] == "zh-CN"
        assert field in chinese.text and zh in chinese.text, chinese.text
        english = client.post(path, json={**extra, **body})
        assert english.status_code == 422, english.text
        assert field in english.text and en in english.text, english.text
        assert not has_chinese(english.text.replace("双十一", "")), english.text
    assert received(live, contact) == []


def test_a_stored_pdf_sent_as_an_image_is_refused_in_chinese(live: LiveServer) -> None:
    """A stored file whose content is not an image, given as an image attachment: 422 on the attachment, saying
    so in Chinese by its content."""
    client = live.client
    kept = client.post(
        "/api/v1/media",
        params={"name": "价目表.pdf", "kind": "file"},
        content=b"%PDF-1.4 " + bytes(range(256)),
        headers={"content-type": "application/pdf"},
    )
    assert kept.status_code in (200, 201), kept.text
    contact = a_friend(client, 31)
    answer = client.post(
        "/send-message",
        json={"id": contact, "attachments": [{"kind": "image", "media_id": kept.json()["id"]}]},
        headers=ZH,
    )
    assert answer.status_code == 422, answer.text
    assert "attachments[0]" in answer.text
    assert "'价目表.pdf' 不是 JPG 或 PNG 图片（按文件内容判断：application/pdf）" in answer.json()["error"]
    assert received(live, contact) == []


def test_a_part_the_gateway_cannot_send_and_a_local_cover_in_chinese(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway that sends no mini-programs, then one that takes covers by URL only: each 422 says why in
    Chinese, naming the gateway."""
    client = live.client
    gateway = live.app.gateway
    contact = a_friend(client, 32)
    only = Capabilities(supports=frozenset({PartKind.TEXT, PartKind.IMAGE, PartKind.FILE, PartKind.LINK}))
    monkeypatch.setattr(type(gateway), "capabilities", property(lambda self: only))
    answer = client.post("/send-message", json={"id": contact, "attachments": [MINI]}, headers=ZH)
    assert answer.status_code == 422, answer.text
    assert "sandbox 网关不能发送 miniprogram 类型的部分（它能发送：file, image, link, text）" in answer.json()["error"]

    cover = upload(client, png(), "封面.png").json()["id"]
    url_only = Capabilities(supports=frozenset(PartKind), local_covers=False)
    monkeypatch.setattr(type(gateway), "capabilities", property(lambda self: url_only))
    card = {**MINI, "thumbnail_url": None, "thumbnail_media_id": cover}
    answer = client.post("/send-message", json={"id": contact, "attachments": [card]}, headers=ZH)
    assert answer.status_code == 422, answer.text
    assert "attachments[0].thumbnail" in answer.text
    assert "sandbox 网关的小程序封面只支持 https 链接，而 '封面.png' 是本地文件" in answer.json()["error"]
    assert received(live, contact) == []


@pytest.mark.parametrize(
    ("content", "status", "zh"),
    [
        (b"GIF89a" + b"\x00" * 100, 415, "'动图.png' 不是 JPG 或 PNG 图片（按文件内容判断：image/gif）"),
        ("只是文字".encode(), 415, "'动图.png' 不是 JPG 或 PNG 图片（按文件内容判断：不是 wecast 能识别的图片）"),
        (b"", 422, "'动图.png' 是空的"),
    ],
    ids=["gif", "text", "empty"],
)
def test_an_upload_is_refused_in_chinese(live: LiveServer, content: bytes, status: int, zh: str) -> None:
    """POST /api/v1/media refuses content that is not a JPG/PNG image (or nothing at all) in the caller's
    language, keeping its stable code."""
    answer = upload(live.client, content, "动图.png", **ZH)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == zh
    assert answer.json()["code"] in ("unsupported_media_type", "invalid_request")
