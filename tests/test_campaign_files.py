"""Files a campaign names stay inside the campaigns directory: `message.template_file` (and, through the same
`engine.paths.resolve_campaign_file`, every later kind of campaign file) cannot read /proc, /dev, /etc or
anything not a regular file, the refusal does not say whether a path outside exists, Jinja cannot include
other files, and `/api/v1/campaigns/validate` applies the same rule to the campaign it parses."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.errors import CampaignError, Location, TemplateError
from engine.paths import CampaignFileError, campaign_root, resolve_campaign_file
from engine.render import compile_template
from engine.settings import Settings
from engine.spec import load_campaign

try:
    from web_harness import LiveServer, make_settings
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.web_harness import LiveServer, make_settings

SECRET = "WECAST_TEST_SECRET_do_not_send"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/campaigns/{c.yaml, templates/ok.j2}, and tmp/outside/secret.txt beside the campaigns directory."""
    campaigns = tmp_path / "campaigns"
    (campaigns / "templates").mkdir(parents=True)
    (campaigns / "templates" / "ok.j2").write_text("{{ name }}您好", encoding="utf-8")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text(SECRET, encoding="utf-8")
    return campaigns


def settings_for(campaigns: Path) -> Settings:
    return Settings(version=1, campaigns_dir=campaigns)


def campaign_with(campaigns: Path, template_file: str, *, quoted: bool = False) -> Path:
    key = '"template_file"' if quoted else "template_file"
    path = campaigns / "c.yaml"
    path.write_text(f"name: x\naudience: {{}}\nmessage: {{{key}: {template_file!r}}}\n", encoding="utf-8")
    return path


def refusal(campaigns: Path, template_file: str) -> CampaignError:
    with pytest.raises(CampaignError) as info:
        load_campaign(campaign_with(campaigns, template_file), settings_for(campaigns))
    error = info.value
    assert error.location.field == "message.template_file"
    assert error.location.line == 3
    assert SECRET not in str(error)
    return error


@pytest.mark.parametrize(
    "name",
    [
        "/etc/passwd",
        "/proc/self/environ",
        "/dev/zero",
        "../outside/secret.txt",
        "../../../../../../../../etc/passwd",
        "templates/../../outside/secret.txt",
        "../outside/no_such_file.txt",
        "/no/such/absolute/path",
    ],
)
def test_paths_outside_the_campaigns_directory_are_refused(tree: Path, name: str) -> None:
    """Absolute paths and `..` escapes are refused at file:line:field, with nothing of the file in the error."""
    error = refusal(tree, name)
    assert "outside the campaigns directory" in str(error)


def test_refusal_does_not_reveal_whether_the_path_exists(tree: Path) -> None:
    """An existing file and a missing one outside the campaigns directory get the same message."""
    existing = refusal(tree, "../outside/secret.txt").reason.replace("secret.txt", "X")
    missing = refusal(tree, "../outside/nothing.txt").reason.replace("nothing.txt", "X")
    assert existing == missing


@pytest.mark.parametrize("target", ["../outside/secret.txt", "/proc/self/environ", "/dev/zero", "../outside/none"])
def test_symlinks_are_resolved_before_the_check(tree: Path, target: str) -> None:
    """A symlink inside the campaigns directory pointing outside (existing or not) is refused like the target."""
    link = tree / "templates" / "link.j2"
    link.symlink_to(target if target.startswith("/") else tree / target)
    error = refusal(tree, "templates/link.j2")
    assert "outside the campaigns directory" in str(error)


def test_symlinks_that_stay_inside_are_followed(tree: Path) -> None:
    """A symlink to another template inside the campaigns directory is read as that template."""
    (tree / "templates" / "alias.j2").symlink_to(tree / "templates" / "ok.j2")
    campaign = load_campaign(campaign_with(tree, "templates/alias.j2"), settings_for(tree))
    assert campaign.compiled.source == "{{ name }}您好"


def test_dotdot_that_comes_back_inside_is_allowed(tree: Path) -> None:
    """`..` is fine when the resolved path is still inside the campaigns directory."""
    campaign = load_campaign(campaign_with(tree, "../campaigns/templates/ok.j2"), settings_for(tree))
    assert campaign.compiled.source == "{{ name }}您好"


def test_a_fifo_is_refused_without_blocking(tree: Path) -> None:
    """A FIFO inside the campaigns directory is refused as not a regular file; nothing waits on a writer."""
    os.mkfifo(tree / "templates" / "pipe.j2")
    done = threading.Event()
    errors: list[CampaignError] = []

    def load() -> None:
        try:
            load_campaign(campaign_with(tree, "templates/pipe.j2"), settings_for(tree))
        except CampaignError as exc:
            errors.append(exc)
        done.set()

    threading.Thread(target=load, daemon=True).start()
    if not done.wait(10):  # pragma: no cover - the failure this test exists for
        with open(tree / "templates" / "pipe.j2", "w"):  # unblock the reader so the thread ends
            pass
        pytest.fail("loading a campaign whose template_file is a FIFO blocked")
    assert errors and "not a regular file" in str(errors[0])


def test_a_directory_is_refused(tree: Path) -> None:
    """A directory named as template_file is refused as not a regular file."""
    assert "not a regular file" in str(refusal(tree, "templates"))


def test_an_oversized_template_file_is_refused(tree: Path) -> None:
    """A template file over the size cap is refused before it is read."""
    (tree / "templates" / "big.j2").write_bytes(b"x" * (128 * 1024 + 1))
    assert "larger than 128 KiB" in str(refusal(tree, "templates/big.j2"))


def test_a_binary_template_file_is_refused(tree: Path) -> None:
    """A template file that is not UTF-8 text, or holds NUL bytes, is a clear error."""
    (tree / "templates" / "bin.j2").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff")
    assert "not UTF-8 text" in str(refusal(tree, "templates/bin.j2"))
    (tree / "templates" / "nul.j2").write_bytes(b"hello\x00world")
    assert "binary" in str(refusal(tree, "templates/nul.j2"))


def test_a_missing_file_inside_is_reported_once(tree: Path) -> None:
    """A template file that does not exist inside the campaigns directory is one located problem."""
    error = refusal(tree, "templates/none.j2")
    assert error.problems == [error]
    assert "template file not found: templates/none.j2" in str(error)


def test_an_empty_template_file_is_a_located_error(tree: Path) -> None:
    """An existing but empty template file is reported as an empty template, not an internal error."""
    (tree / "templates" / "empty.j2").write_text("", encoding="utf-8")
    with pytest.raises(TemplateError, match="template is empty"):
        load_campaign(campaign_with(tree, "templates/empty.j2"), settings_for(tree))


def test_campaign_outside_the_campaigns_directory_is_confined_to_its_folder(tmp_path: Path, tree: Path) -> None:
    """A campaign file loaded from elsewhere may use templates in its own folder, not above it."""
    other = tmp_path / "elsewhere"
    (other / "t").mkdir(parents=True)
    (other / "t" / "a.j2").write_text("你好", encoding="utf-8")
    assert campaign_root(tree, other / "c.yaml") == other.resolve()
    assert load_campaign(campaign_with(other, "t/a.j2"), settings_for(tree)).compiled.source == "你好"
    with pytest.raises(CampaignError, match="outside the campaigns directory"):
        load_campaign(campaign_with(other, "../outside/secret.txt"), settings_for(tree))


def test_the_check_is_one_function_for_every_kind_of_file(tree: Path) -> None:
    """resolve_campaign_file names the kind in its errors and caps each kind at its own size."""
    (tree / "poster.png").write_bytes(b"\x89PNG" + b"\x00" * 100)
    checked = resolve_campaign_file(tree.resolve(), tree, "poster.png", kind="image", max_bytes=1000)
    assert checked.size == 104 and checked.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(CampaignFileError, match=r"image file 'poster\.png' is larger than 100 bytes"):
        resolve_campaign_file(tree, tree, "poster.png", kind="image", max_bytes=100)
    with pytest.raises(CampaignFileError, match="image file '/etc/passwd' is outside"):
        resolve_campaign_file(tree, tree, "/etc/passwd", kind="image", max_bytes=100)


def test_a_file_swapped_after_the_check_is_not_read(tree: Path) -> None:
    """If the checked file is replaced (here by a symlink to a file outside) before it is read, reading fails."""
    target = tree / "templates" / "ok.j2"
    checked = resolve_campaign_file(tree, tree, "templates/ok.j2", kind="template", max_bytes=1000)
    target.unlink()
    target.symlink_to(tree.parent / "outside" / "secret.txt")
    with pytest.raises(CampaignFileError) as info:
        checked.read_text()
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("source", "tag"),
    [
        ("{% include '/etc/passwd' %}", "include"),
        ("第一行\n{% import 'x.j2' as x %}", "import"),
        ("{% from 'x.j2' import y %}", "from ... import"),
        ("{% extends 'base.j2' %}", "extends"),
        ("{% include ['a', '/proc/self/environ'] ignore missing %}", "include"),
    ],
)
def test_jinja_cannot_read_other_files(source: str, tag: str) -> None:
    """include / import / extends are refused when the template is checked, at the line they are on."""
    with pytest.raises(TemplateError, match=f"{{% {tag} %}} is not allowed") as info:
        compile_template(source, Location("c.yaml", 10, "message.template"))
    assert info.value.location.line == 10 + source.count("\n")


# -- the API ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    root = tmp_path_factory.mktemp("files_api")
    (root / "campaigns" / "templates").mkdir(parents=True)
    (root / "campaigns" / "templates" / "ok.j2").write_text("{{ name }}您好", encoding="utf-8")
    (root / "secret.txt").write_text(SECRET, encoding="utf-8")
    with LiveServer(make_settings(root), scheduler=False) as server:
        yield server.client


def validate(client: httpx.Client, content: str) -> dict[str, object]:
    answer = client.post("/api/v1/campaigns/validate", json={"content": content, "filename": "posted.yaml"})
    assert answer.status_code == 200
    assert SECRET not in answer.text
    body: dict[str, object] = answer.json()
    return body


@pytest.mark.parametrize(
    "message",
    [
        "message: {template_file: ../secret.txt}",  # flow style: a line regex never saw the key
        'message: {"template_file": "/proc/self/environ"}',  # quoted key
        "message:\n  'template_file': ../../../../etc/passwd",
        "message: {? template_file : ../secret.txt}",  # explicit key
    ],
)
def test_api_validate_refuses_paths_outside_in_any_yaml_spelling(api: httpx.Client, message: str) -> None:
    """The API checks the parsed campaign, so flow style, quoted and explicit keys cannot smuggle a path out."""
    body = validate(api, f"name: x\naudience: {{}}\n{message}\n")
    assert body["valid"] is False
    errors = body["errors"]
    assert isinstance(errors, list) and errors[0]["field"] == "message.template_file"
    assert "outside the campaigns directory" in errors[0]["message"]


def test_api_validate_says_the_same_for_existing_and_missing_paths(api: httpx.Client) -> None:
    """The API answer for a refused path is the same whether or not the file exists."""
    answers = [
        validate(api, f"name: x\naudience: {{}}\nmessage: {{template_file: '../{name}'}}\n")["errors"]
        for name in ("secret.txt", "missing.txt")
    ]
    texts = [str(a).replace("secret.txt", "X").replace("missing.txt", "X") for a in answers]
    assert texts[0] == texts[1]


def test_api_validate_reads_templates_inside_the_campaigns_directory(api: httpx.Client) -> None:
    """A posted campaign may use a template file that is inside the campaigns directory."""
    body = validate(api, "name: x\naudience: {}\nmessage: {template_file: templates/ok.j2}\n")
    assert body["valid"] is True, body
