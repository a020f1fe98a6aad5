"""The documentation's examples run as written: docs/serve.md defines the `short` helper its curl examples pipe
into, and the Dockerfile does what its comments say."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _short_definition() -> str:
    text = (ROOT / "docs" / "serve.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    found = [b for b in blocks if b.startswith("short() {")]
    assert len(found) == 1, "docs/serve.md defines `short` once, in a ```sh block"
    first_use = text.index("| short")
    assert text.index("short() {") < first_use, "`short` is defined before its first use"
    return found[0]


def test_serve_md_short_helper_runs_as_pasted() -> None:
    """Pasting the definition and piping a page of contacts into `short` prints the first one and a count."""
    page = {"datas": [{"id": "a", "name": "王芳"}, {"id": "b"}, {"id": "c"}], "total": 3}
    script = _short_definition() + "\nshort\n"
    done = subprocess.run(["bash", "-c", script], input=json.dumps(page), capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == {"datas": [{"id": "a", "name": "王芳"}, "… 2 more"], "total": 3}
    assert "王芳" in done.stdout  # Chinese stays readable, not \\u escapes


def test_dockerfile_installs_dependencies_before_copying_the_code() -> None:
    """The dependency layer comes before the code is copied (so a code edit does not reinstall them), as its comment
    says; the code is then installed without touching the dependencies."""
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()]
    deps = next(i for i, line in enumerate(lines) if "pip install -r" in line)
    code = next(i for i, line in enumerate(lines) if line.startswith("COPY engine"))
    install = next(i for i, line in enumerate(lines) if line.startswith("RUN pip install --no-deps ."))
    assert deps < code < install
