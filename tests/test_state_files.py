"""The gateways' own state files (the sandbox's, the wecom gateway's) opened by several processes at the same moment
on a fresh machine — two `wecast serve` started together, serve beside `wecast run`: each process opens the new
file, none dies with "database is locked" (SQLite refuses the switch to WAL at once, without waiting, when waiting
could deadlock: `engine.gateways.statefile`)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPEN = """
import sys, time
from pathlib import Path
from {module} import {cls}
at = float(sys.argv[2])
while time.time() < at:
    pass
{cls}(Path(sys.argv[1])).close()
"""
STORES = {
    "sandbox": ("engine.gateways.sandbox", "SandboxStore"),
    "wecom": ("engine.gateways.wecom.store", "WecomStore"),
}


@pytest.mark.slow
@pytest.mark.parametrize("store", sorted(STORES))
def test_processes_opening_one_new_state_file_at_once_all_open_it(tmp_path: Path, store: str) -> None:
    """Six processes open one new state file in the same millisecond, four times over: every one of them opens it."""
    module, cls = STORES[store]
    code = OPEN.format(module=module, cls=cls)
    failures = []
    for trial in range(4):
        path = tmp_path / f"state{trial}.sqlite"
        at = time.time() + 2.0  # after every process has imported wecast
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(path), str(at)], cwd=ROOT, stderr=subprocess.PIPE, text=True
            )
            for _ in range(6)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            if proc.returncode:
                failures.append(err.strip().splitlines()[-1])
    assert failures == []
