"""The house's rules (STYLE.md) as a test: the direction of imports (cli/web -> dispatch -> (gateways, storage);
never the other way), no import cycle inside engine/, and no SQL outside storage/.

Every module under engine/ and storage/ is parsed with `ast` (not imported), and every import in it —
top level, inside functions, under TYPE_CHECKING — is resolved to an absolute module name.
"""

from __future__ import annotations

import ast
import functools
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
    "engine.i18n",  # a leaf (imports nothing of wecast): the gateways' own words for people, translated
    "engine.gateways",
)
SCHEDULER_MODULES = {"engine.scheduler", "engine.schedule"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def parsed(path: Path) -> ast.Module:
    """A module's syntax tree (each file is parsed once for all the rules)."""
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


@functools.cache
def nodes(path: Path) -> tuple[ast.AST, ...]:
    return tuple(ast.walk(parsed(path)))


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """(absolute module imported, line) for every import statement in the module; `from a import b` yields
    `a.b` as well as `a`, since b may be a submodule."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in nodes(path):
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
        "engine.gateways import only engine.errors, clock, settings, durations, backoff, i18n and engine.gateways.*",
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
    "gateways-storage": (
        "gateways never touch wecast's database: engine.gateways imports nothing from storage",
        lambda name, target: within(name, "engine.gateways") and within(target, "storage"),
    ),
    "sql": (
        "only storage/ builds SQL: outside it, sqlalchemy and sqlmodel are imported for the Engine and Connection "
        "types only, and neither the table objects of storage.models nor storage._sql",
        lambda name, target: (
            not within(name, "storage")
            and (
                (within(target, "sqlalchemy") and target not in SQL_TYPES_OK and target != "sqlalchemy")
                or within(target, "sqlmodel")
                or within(target, "storage._sql")
                or (within(target, "storage.models") and target.rpartition(".")[2] in TABLES)
            )
        ),
    ),
}
# What code outside storage/ may take from sqlalchemy: the handles it passes to storage functions.
SQL_TYPES_OK = {"sqlalchemy.engine", "sqlalchemy.engine.Engine", "sqlalchemy.engine.Connection"}
TABLES = {
    "CONTACTS",
    "TAGS",
    "CONTACT_TAGS",
    "RUNS",
    "DELIVERIES",
    "DELIVERY_PARTS",
    "META",
    "SCHEDULE_STATE",
    "GATEWAY_EVENTS",
}
# Calls that run SQL. Gateways are exempt: they keep their own state (the sandbox's simulated account in its own
# SQLite file), never wecast's database (the gateways-storage rule).
SQL_CALLS = {"execute", "exec_driver_sql", "executemany", "scalar", "scalars"}


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
    assert {"engine.dispatch", "engine.gateways.base", "storage.deliveries", "storage"} <= set(known)
    targets = {t for t, _ in imports_of("engine.plan", known["engine.plan"])}
    assert {"storage.deliveries", "engine.audience"} <= targets
    assert any(within(t, "apscheduler") for t, _ in imports_of("engine.schedule", known["engine.schedule"]))


@pytest.mark.parametrize("rule", sorted(RULES))
def test_import_direction(rule: str) -> None:
    """Each layering rule of STYLE.md holds for every module under engine/ and storage/."""
    found = violations(rule)
    assert not found, f"{RULES[rule][0]}, but:\n  " + "\n  ".join(found)


def sql_calls(path: Path) -> Iterator[tuple[str, int]]:
    """(method, line) for every call of a method that runs SQL (`conn.execute(...)`, `db.begin()` ...)."""
    for node in nodes(path):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method = node.func.attr
            receiver = ast.unparse(node.func.value)
            if method in SQL_CALLS or (method in ("begin", "connect") and receiver.split(".")[-1] in ("db", "engine")):
                yield method, node.lineno


def test_no_sql_is_run_outside_storage() -> None:
    """No module outside storage/ (gateways aside, see SQL_CALLS) runs a statement: every operation on wecast's
    database is a named function in storage/."""
    found = sorted(
        f"{path.relative_to(ROOT)}:{line} calls .{method}()"
        for name, path in modules().items()
        if not within(name, "storage") and not within(name, "engine.gateways")
        for method, line in sql_calls(path)
    )
    assert not found, "SQL outside storage/:\n  " + "\n  ".join(found)


def import_graph() -> dict[str, set[str]]:
    """engine module -> the engine modules it imports (a `from a import b` of a submodule counts as a.b)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        if not within(name, "engine"):
            continue
        graph[name] = {t for t, _ in imports_of(name, path) if t in known and t != name and within(t, "engine")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    """The cycle finder reports a loop of three and leaves a chain alone (so an empty answer means something)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles_inside_engine() -> None:
    """No module of engine/ imports (directly or through others) a module that imports it back, not even under
    TYPE_CHECKING or inside a function: each layer can be read, tested and replaced on its own."""
    found = cycles(import_graph())
    assert not found, "import cycles:\n  " + "\n  ".join(" <-> ".join(group) for group in found)
