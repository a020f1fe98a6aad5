"""Direction of imports (STYLE.md): cli/web -> dispatch -> (gateways, storage); never the other way.

Every module under engine/ and storage/ is parsed with `ast` (not imported), and every import in it —
top level, inside functions, under TYPE_CHECKING — is resolved to an absolute module name.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "storage")
# What a gateway may build on: the contract, its siblings, and the leaf modules below the pipeline.
GATEWAY_MAY_IMPORT = (
    "engine.messages",
    "engine.errors",
    "engine.clock",
    "engine.settings",
    "engine.durations",
    "engine.backoff",
    "engine.gateways",
)
SCHEDULER_MODULES = {"engine.scheduler", "engine.schedule"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """(absolute module imported, line) for every import statement in the module; `from a import b` yields
    `a.b` as well as `a`, since b may be a submodule."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:
                if alias.name != "*":
                    yield f"{target}.{alias.name}", node.lineno


def within(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


RULES: dict[str, tuple[str, Callable[[str, str], bool]]] = {
    # rule: (what it says, importer module x imported module -> is it a violation)
    "storage": (
        "storage imports nothing from engine",
        lambda name, target: within(name, "storage") and within(target, "engine"),
    ),
    # `from engine.gateways.x import SomeClass` yields engine.gateways.x.SomeClass, which stays within the allowed.
    "gateways": (
        "engine.gateways import only engine.errors, clock, settings, durations, backoff and engine.gateways.*",
        lambda name, target: (
            within(name, "engine.gateways")
            and within(target, "engine")
            and not any(within(target, ok) for ok in GATEWAY_MAY_IMPORT)
        ),
    ),
    "apscheduler": (
        "only engine/scheduler.py and engine/schedule.py import apscheduler",
        lambda name, target: within(target, "apscheduler") and name not in SCHEDULER_MODULES,
    ),
    "cli": (
        "nothing in engine/ or storage/ imports engine.cli",
        lambda name, target: within(target, "engine.cli") and name != "engine.cli",
    ),
}


def violations(rule: str) -> list[str]:
    broken = RULES[rule][1]
    return sorted(
        {
            f"{path.relative_to(ROOT)}:{line} imports {target}"
            for name, path in modules().items()
            for target, line in imports_of(name, path)
            if broken(name, target)
        }
    )


def test_the_walk_sees_the_packages_and_their_imports() -> None:
    """The walker finds the modules and resolves absolute and package-relative imports (a guard against a
    test that passes because it looked at nothing)."""
    known = modules()
    assert {"engine.dispatch", "engine.gateways.base", "storage.queries", "storage"} <= set(known)
    targets = {t for t, _ in imports_of("engine.plan", known["engine.plan"])}
    assert {"storage.queries", "engine.audience"} <= targets
    assert any(within(t, "apscheduler") for t, _ in imports_of("engine.schedule", known["engine.schedule"]))


@pytest.mark.parametrize("rule", sorted(RULES))
def test_import_direction(rule: str) -> None:
    """Each layering rule of STYLE.md holds for every module under engine/ and storage/."""
    found = violations(rule)
    assert not found, f"{RULES[rule][0]}, but:\n  " + "\n  ".join(found)
