"""Rich messages in campaign files (`engine.message_spec`): the parts' YAML, checked at file:line:field when the file
is loaded, and rendered per recipient into `Message`s whose templated fields are checked again.

Table-driven like tests/test_campaign_cases.py: every file in `tests/cases/messages/invalid/` starts with
`# expect: line N: FIELD: SUBSTRING`; the files in `valid/` load.
"""

from __future__ import annotations

import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.errors import CampaignError, TemplateError
from engine.gateways.base import Capabilities
from engine.gateways.registry import GATEWAYS, build_gateway, gateway_capabilities
from engine.gateways.sandbox import SandboxGateway
from engine.message_spec import Check, describe_problems, render_message, render_messages
from engine.messages import FilePart, ImagePart, LinkPart, MiniProgramPart, PartKind, TextPart
from engine.settings import Settings
from engine.spec import load_campaign, parse_campaign

CASES = Path(__file__).parent / "cases" / "messages"
VALID = sorted((CASES / "valid").glob("*.yaml"))
INVALID = sorted((CASES / "invalid").glob("*.yaml"))
EXPECT = re.compile(r"^# expect: line (\d+): (\S+): (.+)$")
NOW = datetime(2026, 11, 9, 2, 0, tzinfo=UTC)


@pytest.fixture
def settings() -> Settings:
    return Settings(version=1)


def contact(cid: str, **fields: object) -> dict[str, object]:
    base: dict[str, object] = {"id": cid, "name": "王芳", "alias": "", "gender": 2, "friend": True}
    return {**base, **fields}


def test_case_folders_are_populated() -> None:
    """There are cases in both folders, so the parametrized tests below cannot pass vacuously."""
    assert len(VALID) >= 4
    assert len(INVALID) >= 30


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_part_names_file_line_and_field(path: Path, settings: Settings) -> None:
    """Each bad part is a CampaignError starting `file:line: field:` with the expected reason."""
    match = EXPECT.match(path.read_text(encoding="utf-8").splitlines()[0])
    assert match, f"{path.name}: first line must be `# expect: line N: FIELD: SUBSTRING`"
    line, field, substring = int(match.group(1)), match.group(2), match.group(3).strip()
    with pytest.raises(CampaignError) as info:
        load_campaign(path, settings)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{path}:{line}: {field}: "), first
    assert substring in first, first


@pytest.mark.parametrize("path", VALID, ids=[p.stem for p in VALID])
def test_valid_message_loads(path: Path, settings: Settings) -> None:
    """A valid case compiles into a message with at least one part."""
    assert load_campaign(path, settings).compiled.parts


def test_every_part_kind_compiles_with_media_described_by_content(settings: Settings) -> None:
    """Files are described by their content (size, sha256, type sniffed), URLs kept as URLs, parts in file order."""
    c = load_campaign(CASES / "valid" / "every_part.yaml", settings).compiled
    assert [p.kind for p in c.parts] == [
        PartKind.IMAGE,
        PartKind.TEXT,
        PartKind.LINK,
        PartKind.MINIPROGRAM,
        PartKind.FILE,
        PartKind.IMAGE,
    ]
    poster, cover, menu, banner = c.media()[0], c.media()[1], c.media()[2], c.media()[3]
    data = (CASES / "valid" / "media" / "poster.png").read_bytes()
    assert (poster.size, poster.mime, poster.path) == (len(data), "image/png", (CASES / "valid/media/poster.png"))
    assert poster.sha256 == __import__("hashlib").sha256(data).hexdigest()
    assert (cover.mime, menu.mime) == ("image/jpeg", "application/pdf")
    assert (banner.url, banner.path, banner.name) == ("https://cdn.example.com/banner.png", None, "banner.png")
    assert not c.plain_text
    assert c.names >= {"display_name", "id"}


def test_a_legacy_template_is_a_plain_text_message(settings: Settings) -> None:
    """`message.template` (and 0.1's `type: text`) compile to one text part: stored as plain text, as before."""
    c = load_campaign(CASES / "valid" / "type_text.yaml", settings).compiled
    assert c.plain_text
    assert c.kinds == {PartKind.TEXT}


def test_image_type_is_read_from_content_not_name(tmp_path: Path, settings: Settings) -> None:
    """A PNG named .jpg is an image (its content says PNG); a text file named .png is refused."""
    shutil.copy(CASES / "valid" / "media" / "poster.png", tmp_path / "poster.jpg")
    (tmp_path / "notes.png").write_text("只是文字", encoding="utf-8")
    body = "name: x\naudience: {}\nmessage:\n  parts:\n    - image: "
    good = tmp_path / "good.yaml"
    good.write_text(body + "poster.jpg\n", encoding="utf-8")
    assert load_campaign(good, settings).compiled.media()[0].mime == "image/png"
    bad = tmp_path / "bad.yaml"
    bad.write_text(body + "notes.png\n", encoding="utf-8")
    with pytest.raises(CampaignError, match=r"bad.yaml:5: message.parts\[0\].image: 'notes.png' is not a JPG or PNG"):
        load_campaign(bad, settings)


@pytest.mark.parametrize(
    ("kind", "limit_mb", "message"),
    [
        ("image", 10, "image file 'big.bin' is larger than 10 MiB"),
        ("file", 20, "file 'big.bin' is larger than 20"),
    ],
)
def test_oversized_files_are_refused_at_their_line(
    tmp_path: Path, settings: Settings, kind: str, limit_mb: int, message: str
) -> None:
    """An image over 10 MB or a file over 20 MB (WeCom's limits) is an error at its part's line; one byte less is
    accepted (a sparse file: nothing that big is written)."""
    big = tmp_path / "big.bin"
    with big.open("wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" if kind == "image" else b"%PDF-")
        handle.truncate(limit_mb * 1024 * 1024 + 1)
    path = tmp_path / "c.yaml"
    path.write_text(f"name: 大文件\naudience: {{}}\nmessage:\n  parts:\n    - text: 您好\n    - {kind}: big.bin\n")
    with pytest.raises(CampaignError) as info:
        load_campaign(path, settings)
    assert str(info.value).startswith(f"{path}:6: message.parts[1].{kind}: {message}")
    os.truncate(big, limit_mb * 1024 * 1024)
    assert load_campaign(path, settings).compiled.media()[0].size == limit_mb * 1024 * 1024


def test_parts_the_configured_gateway_cannot_send_fail_validation(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    """A part kind outside the configured gateway's `capabilities.supports` is a validation error at that part,
    naming the gateway and what it can send — not a failure at send time."""
    only = Capabilities(supports=frozenset({PartKind.TEXT, PartKind.IMAGE}))
    monkeypatch.setattr(SandboxGateway, "capabilities_for", classmethod(lambda cls, s: only))
    path = CASES / "valid" / "every_part.yaml"
    with pytest.raises(CampaignError) as info:
        load_campaign(path, settings)
    located = [(p.location.line, p.location.field) for p in info.value.problems]
    assert located == [
        (9, "message.parts[2].link"),
        (14, "message.parts[3].miniprogram"),
        (20, "message.parts[4].file"),
    ]
    assert "the sandbox gateway cannot send link parts (it sends: image, text)" in str(info.value)


def test_render_fills_every_templated_field_per_recipient(settings: Settings) -> None:
    """Each recipient's message has its own text, link URL and title and mini-program page; the image and file
    parts are the same objects for everyone (described once, never copied per recipient)."""
    c = load_campaign(CASES / "valid" / "every_part.yaml", settings).compiled
    rendered = render_messages(
        c, [contact("a", alias="王姐"), contact("b", name="李雷", gender=1)], campaign={"id": "x", "name": "x"}, now=NOW
    )
    a, b = rendered.message("a"), rendered.message("b")
    assert isinstance(a.parts[1], TextPart) and a.parts[1].text == "王姐您好！双十一会员日，全场满300减50。"
    assert rendered.texts["b"].startswith("李雷您好")
    link = a.parts[2]
    assert isinstance(link, LinkPart)
    assert (link.url, link.title, link.description) == (
        "https://mall.example.com/1111?c=a",
        "王姐的双十一专属会场",
        "满300减50，限时三天",
    )
    mini = b.parts[3]
    assert isinstance(mini, MiniProgramPart)
    assert (mini.appid, mini.page, mini.username) == ("wx1234567890abcdef", "pages/coupon/index?c=b", "gh_0123456789ab")
    assert isinstance(a.parts[0], ImagePart) and a.parts[0] is b.parts[0]
    assert isinstance(a.parts[4], FilePart) and a.parts[4] is b.parts[4]


def test_templated_fields_are_checked_for_each_recipient(tmp_path: Path, settings: Settings) -> None:
    """A templated title over WeCom's byte limit, a field that renders empty and a URL that stops being one are
    reported per field at its file line, with how many recipients; the others still get their message."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: x\naudience: {}\nmessage:\n  parts:\n"
        "    - text: '{{ display_name }}您好'\n"
        "    - link:\n"
        '        url: "https://mall.example.com/{{ name }}"\n'
        '        title: "{{ display_name }}的专属会场"\n'
        "        description: \"{{ city | default('') }}\"\n"
        "    - miniprogram:\n"
        "        appid: wx1234567890abcdef\n"
        "        title: \"{{ title | default('') }}\"\n"
        "        page: pages/index\n"
        "        thumbnail: https://cdn.example.com/c.jpg\n",
        encoding="utf-8",
    )
    c = load_campaign(path, settings).compiled
    people = [
        contact("ok", title="店长"),
        contact("long", name="很" * 40, title="店长"),  # 40 + 5 characters: 135 bytes
        contact("space", name="王 芳", title="店长"),
        contact("empty"),
    ]
    rendered = render_messages(c, people, campaign={"id": "x", "name": "x"}, now=NOW)
    assert set(rendered.messages) == {"ok"}
    assert rendered.failed == {
        (2, Check.TOO_LONG): ["long"],
        (1, Check.NOT_HTTPS): ["space"],
        (4, Check.EMPTY): ["empty"],
    }
    problems = [str(p) for p in describe_problems(c, rendered.too_long, rendered.failed, total=4)]
    assert (
        f"{path}:8: message.parts[1].link.title: the title is longer than 128 bytes (WeCom's limit) for 1 of 4"
        in (problems[0])
    )
    assert any(
        p.startswith(f"{path}:7: message.parts[1].link.url: the url is not an https URL for 1") for p in problems
    )
    assert any(
        p.startswith(f"{path}:12: message.parts[2].miniprogram.title: the title renders empty") for p in problems
    )


def test_an_optional_field_may_render_empty(settings: Settings, tmp_path: Path) -> None:
    """A link's description is optional: rendering empty is no problem (it is left out), unlike a title."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: x\naudience: {}\nmessage:\n  parts:\n    - link:\n        url: https://a.example.com\n"
        "        title: 店庆\n        description: \"{{ city | default('') }}\"\n",
        encoding="utf-8",
    )
    message = render_message(load_campaign(path, settings).compiled, contact("a"), campaign={}, now=NOW)
    assert message.parts == (LinkPart("https://a.example.com", "店庆", ""),)


def test_render_message_raises_for_one_recipient(settings: Settings) -> None:
    """`render_message` (a journey step, a test send) raises for a field that fails its check."""
    text = (
        "name: x\naudience: {}\nmessage:\n  parts:\n    - link: {url: 'https://a.cn/{{ name }}', title: '{{ name }}'}\n"
    )
    c = parse_campaign(text, Path("/tmp/x.yaml"), Settings(version=1, campaigns_dir=Path("/tmp"))).compiled
    with pytest.raises(TemplateError, match="the title is longer than 128 bytes"):
        render_message(c, contact("a", name="很" * 50), campaign={}, now=NOW)


def test_a_changed_poster_changes_the_campaign_hash(tmp_path: Path, settings: Settings) -> None:
    """The campaign's content hash covers its media by content: replacing the poster (same name) changes it, and
    the new content is described afresh, not taken from a cache."""
    shutil.copy(CASES / "valid" / "media" / "poster.png", tmp_path / "p.png")
    path = tmp_path / "c.yaml"
    path.write_text("name: x\naudience: {}\nmessage:\n  parts: [{image: p.png}]\n", encoding="utf-8")
    before = load_campaign(path, settings)
    shutil.copy(CASES / "valid" / "media" / "cover.jpg", tmp_path / "p.png")
    after = load_campaign(path, settings)
    assert before.content_hash != after.content_hash
    assert (before.compiled.media()[0].mime, after.compiled.media()[0].mime) == ("image/png", "image/jpeg")


@pytest.mark.parametrize("name", GATEWAYS)
def test_validation_knows_each_gateways_parts_as_the_gateway_does(name: str, tmp_path: Path) -> None:
    """What validation asks (`gateway_capabilities`, without building a gateway) is what the built gateway says
    it can do, for every gateway we ship; so a rich campaign validates for a gateway exactly when it can send it
    (the official API sends every part kind, as 群发 attachments)."""
    settings = Settings.model_validate(
        {
            "version": 1,
            "gateway": name,
            "campaigns_dir": str(tmp_path),
            "sandbox": {"state_file": str(tmp_path / "sandbox.sqlite")},
            "workpro": {"token": "puppet_workpro_0123456789abcdef", "endpoint": "127.0.0.1:9"},
            "wecom": {"corp_id": "ww0123456789abcdef", "secret": "s", "state_file": str(tmp_path / "wecom.sqlite")},
        }
    )
    built = build_gateway(settings)
    assert gateway_capabilities(settings) == built.capabilities
    shutil.copytree(CASES / "valid", tmp_path / "valid")
    every = tmp_path / "valid" / "every_part.yaml"  # its cover by URL: WorkPro takes no local cover (test below)
    text = every.read_text(encoding="utf-8")
    every.write_text(text.replace("thumbnail: media/cover.jpg", "thumbnail: https://cdn.example.com/c.jpg"), "utf-8")
    compiled = load_campaign(every, settings).compiled
    assert compiled.kinds == set(PartKind) <= built.capabilities.supports


COVERED = """name: 领券
audience: {}
message:
  parts:
    - miniprogram:
        appid: wx1234567890abcdef
        title: 领取会员券
        page: pages/coupon/index
        thumbnail: %s
"""


@pytest.mark.parametrize(("gateway", "local_ok"), [("sandbox", True), ("workpro", False), ("wecom", True)])
def test_a_local_cover_is_refused_for_a_gateway_that_takes_covers_by_url(
    gateway: str, local_ok: bool, tmp_path: Path
) -> None:
    """WorkPro's puppet takes a mini-program cover by URL only: a local cover file is a validation error at the
    thumbnail's line for it (not a failed send for every recipient); the sandbox and the official API upload it.
    An https cover is fine everywhere."""
    shutil.copy(CASES / "valid" / "media" / "cover.jpg", tmp_path / "cover.jpg")
    settings = Settings.model_validate(
        {
            "version": 1,
            "gateway": gateway,
            "campaigns_dir": str(tmp_path),
            "workpro": {"token": "puppet_workpro_0123456789abcdef", "endpoint": "127.0.0.1:9"},
            "wecom": {"corp_id": "ww0123456789abcdef", "secret": "s", "state_file": str(tmp_path / "wecom.sqlite")},
        }
    )
    local = tmp_path / "local.yaml"
    local.write_text(COVERED % "cover.jpg", encoding="utf-8")
    if local_ok:
        assert load_campaign(local, settings).compiled.media()[0].path == tmp_path / "cover.jpg"
    else:
        with pytest.raises(CampaignError) as info:
            load_campaign(local, settings)
        assert str(info.value).startswith(
            f"{local}:9: message.parts[0].miniprogram.thumbnail: the workpro gateway takes a mini-program cover by "
            "https URL only, and 'cover.jpg' is a local file"
        )
    remote = tmp_path / "remote.yaml"
    remote.write_text(COVERED % "https://cdn.example.com/cover.jpg", encoding="utf-8")
    assert load_campaign(remote, settings).compiled.media()[0].url == "https://cdn.example.com/cover.jpg"


def test_a_sandbox_that_sends_fewer_parts_refuses_the_others_at_validation(tmp_path: Path) -> None:
    """`sandbox.supports` narrows what the simulated account sends; validation then refuses a campaign's other
    parts at their file:line (as for a real gateway lacking them), and a list without text is a config error."""
    settings = Settings.model_validate(
        {"version": 1, "campaigns_dir": str(tmp_path), "sandbox": {"supports": ["text", "image"]}}
    )
    assert gateway_capabilities(settings).supports == {PartKind.TEXT, PartKind.IMAGE}
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: x\naudience: {}\nmessage:\n  parts:\n    - text: 你好\n"
        "    - link: {url: 'https://m.example.com/a', title: 新品}\n",
        encoding="utf-8",
    )
    with pytest.raises(CampaignError, match=r"c\.yaml:6: message\.parts\[1\]\.link: .*link"):
        load_campaign(path, settings)
    with pytest.raises(Exception, match="text"):
        Settings.model_validate({"version": 1, "sandbox": {"supports": ["image"]}})
