"""The bounded Jinja sandbox message templates run in: a template can use neither unbounded time nor memory.

`BoundedEnvironment` is Jinja's `ImmutableSandboxedEnvironment` (no attribute starting with `_`, no
`list.append` and friends) with these bounds, each enforced where the value is made, so a hostile template
fails with `TemplateLimitError` before it allocates — never a hang, a MemoryError or a dead process:

* **Size.** No value a template builds — a string, a list, a dict, the text of a macro or of the whole
  message — may exceed `MAX_SIZE` characters (containers are weighed deeply: a list of 10,000 references to
  a 10,000-character string weighs 100 million). Checked before the operation for everything that can
  amplify its input: `*`, `**`, `+`, `%`, `~`, `center`/`ljust`/`rjust`/`zfill`/`indent`/`wordwrap` widths,
  `replace`, `join`, `format`/`str.format` widths and fields, `batch`, `slice`, `tojson` indent, `lipsum`,
  `range`; and after every filter and call on its result. Integers stay under `MAX_INT_BITS` bits.
* **Steps.** Each loop iteration, filter use and call is a step; a render may take `MAX_STEPS`. `range`
  has at most `MAX_RANGE` items.
* **Time.** Every `CHECK_EVERY` steps, the rendering thread's CPU time is compared with the render's budget
  (`TIME_BUDGET`). This works in any thread (signal.alarm would only work in the main one) and is immune to
  a loaded machine (CPU time of this thread, not wall time).
* **Calls.** Only what a message template needs can be called: macros, `loop`, `cycler`/`joiner`/
  `namespace`/`dict`/`range`/`lipsum`, and an allowlist of methods of strings, dicts, lists and dates.
  `str.translate`, `int.to_bytes` and the like are refused.
* **No constant folding of filters.** Jinja evaluates filters over constants while compiling; the guarded
  filters take the context, which turns that off, so compiling is never the expensive part.

The per-render state is thread-local: `begin_render()` starts a render's budget; rendering in several
threads at once is fine. `engine.render` is the only user.
"""

from __future__ import annotations

import functools
import re
import string
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import date, datetime
from datetime import time as dtime
from itertools import islice
from typing import Any

from jinja2 import nodes, pass_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import BlockReference, Context, LoopContext, Macro, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Cycler, Joiner, Namespace, generate_lorem_ipsum

from engine.i18n import N_, tr

MAX_SIZE = 100_000  # characters (or weighed items) in any value a template builds, and in the rendered text
MAX_STEPS = 10_000  # loop iterations + filter uses + calls, per render
MAX_RANGE = 10_000  # items in range(...)
MAX_INT_BITS = 4_096  # integers a template computes (about 1,200 digits)
TIME_BUDGET = 0.5  # seconds of the rendering thread's CPU time per render
CHECK_EVERY = 32  # steps between two looks at the clock (reading a thread's CPU time costs ~1 µs)
_CHUNK = 64  # rendered pieces joined at a time (each at most MAX_SIZE: a few MB held at worst)
# Characters that `{{ ... }}` inside macros, set blocks, filter and call blocks may produce in one render:
# those pieces are collected in lists before they are joined, so they are counted as they are made.
MAX_BUFFERED = 10 * MAX_SIZE


class TemplateLimitError(Exception):
    """A template went over one of the bounds; the message says which."""


# -- the per-render budget ---------------------------------------------------------------------------------


class Budget:
    """One render's remaining steps, time and buffered characters (one per thread: see `current_budget`)."""

    __slots__ = ("buffered", "deadline", "next_check", "steps")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new render's budget."""
        self.steps = MAX_STEPS
        self.next_check = MAX_STEPS - CHECK_EVERY
        self.deadline = 0.0  # 0: not started (set at the first check: a render with few steps never reads the clock)
        self.buffered = MAX_BUFFERED  # characters macros and blocks may still collect (see buffered_text)


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.budget = Budget()


_local = _PerThread()


def current_budget() -> Budget:
    """This thread's budget (renders in a loop fetch it once and `reset()` it per render: a thread-local
    lookup is the expensive part)."""
    return _local.budget


def begin_render() -> None:
    """Start a new render's budget of steps and time in this thread."""
    _local.budget.reset()


def tick() -> None:
    """Count one step of the current render; raise TemplateLimitError past the steps or the time budget."""
    b = _local.budget
    b.steps -= 1
    if b.steps <= b.next_check:
        _check(b)


def _check(b: Budget) -> None:
    if b.steps < 0:
        raise TemplateLimitError(
            tr(
                "the template takes more than {n} steps (loop iterations, filters and calls) to render",
                n=format(MAX_STEPS, ","),
            )
        )
    now = time.thread_time()
    if not b.deadline:
        b.deadline = now + TIME_BUDGET
    elif now > b.deadline:
        raise TemplateLimitError(tr("the template takes more than {n} s to render", n=format(TIME_BUDGET, "g")))
    b.next_check = b.steps - CHECK_EVERY


# -- sizes ----------------------------------------------------------------------------------------------


def size_of(value: Any, limit: int = MAX_SIZE) -> int:
    """About how many characters `value` would take as text, counting containers deeply; stops counting
    soon after `limit` (so weighing is cheap even for a huge value)."""
    if type(value) is str:
        return len(value)
    total = 0
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str | bytes):
            total += len(v)
        elif isinstance(v, bool) or v is None:
            total += 1
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 1
        elif isinstance(v, list | tuple | set | frozenset):
            total += len(v) + 1
            stack.extend(v)
        elif isinstance(v, dict):
            total += len(v) + 1
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, Namespace):
            stack.append(object.__getattribute__(v, "_Namespace__attrs"))
        else:
            total += 1
        if total > limit:
            break
    return total


def _too_large(what: str, **fields: object) -> TemplateLimitError:
    """`what` (an N_ message, with its `fields`) would be too large: said in the reader's language."""
    return TemplateLimitError(
        tr("{what} would be larger than {n} characters", what=tr(what, **fields), n=format(MAX_SIZE, ","))
    )


def check_size(value: Any, what: str = N_("a value the template builds"), **fields: object) -> None:
    if type(value) is str:
        if len(value) > MAX_SIZE:
            raise _too_large(what, **fields)
    elif size_of(value) > MAX_SIZE:
        raise _too_large(what, **fields)


def _too_many_bits() -> TemplateLimitError:
    return TemplateLimitError(tr("a number in the template would have more than {n} bits", n=format(MAX_INT_BITS, ",")))


def _check_width(width: Any, what: str, **fields: object) -> None:
    if isinstance(width, int) and width > MAX_SIZE:
        raise TemplateLimitError(
            tr(
                "{what} {width} is more than {max}",
                what=tr(what, **fields),
                width=format(width, ","),
                max=format(MAX_SIZE, ","),
            )
        )


class RenderedTextTooLong(TemplateLimitError):
    """A message's text passed MAX_SIZE: longer than any message may be (the recipient's message is too long)."""


def bounded_concat(pieces: Iterable[str], error: type[TemplateLimitError] = TemplateLimitError) -> str:
    """Join rendered pieces (of a macro, a set block, a whole message), refusing once the text passes MAX_SIZE.

    Pieces are joined `_CHUNK` at a time, each join weighed before the next is taken (this runs once per
    recipient, and a message is a handful of pieces: one join, one failed look for more): never more than a chunk
    past the cap is held."""
    iterator = iter(pieces)
    text = "".join(islice(iterator, _CHUNK))
    if len(text) > MAX_SIZE:
        raise error(f"the rendered text would be larger than {MAX_SIZE:,} characters")
    for piece in iterator:  # more than a chunk of pieces (a long loop's output)
        return _concat_rest([text, piece], len(text) + len(piece), iterator, error)
    return text


def _concat_rest(out: list[str], total: int, iterator: Iterator[str], error: type[TemplateLimitError]) -> str:
    while total <= MAX_SIZE:
        chunk = [*islice(iterator, _CHUNK)]
        if not chunk:
            return "".join(out)
        total += sum(map(len, chunk))
        out += chunk
    raise error(f"the rendered text would be larger than {MAX_SIZE:,} characters")


def bounded_text(pieces: Iterable[str]) -> str:
    """A whole message's text: bounded_concat, raising RenderedTextTooLong."""
    return bounded_concat(pieces, RenderedTextTooLong)


def join_parts(parts: tuple[Any, ...]) -> str:
    """The `~` operator: weighed before anything is turned into text."""
    total = 0
    for part in parts:
        total += len(part) if type(part) is str else size_of(part)
    if total > MAX_SIZE:
        raise _too_large(N_("a string joined with ~"))
    return "".join([str(part) for part in parts])


def to_text(value: Any) -> str:
    """Every `{{ ... }}` value as text, weighed before it is turned into text."""
    if type(value) is str:
        return value
    check_size(value, N_("a value the template outputs"))
    return str(value)


def buffered_text(value: Any) -> str:
    """to_text for `{{ ... }}` inside a macro or block, whose pieces are collected before they are joined:
    counted against the render's MAX_BUFFERED."""
    text = to_text(value)
    b = _local.budget
    b.buffered -= len(text)
    if b.buffered < 0:
        raise TemplateLimitError(
            tr("macros and blocks would collect more than {n} characters", n=format(MAX_BUFFERED, ","))
        )
    return text


def guard_iter(iterable: Iterable[Any]) -> Iterator[Any]:
    """A for-loop's items, one step each (tick, inlined: this runs once per iteration of every loop)."""
    b = _local.budget
    for item in iterable:
        b.steps -= 1
        if b.steps <= b.next_check:
            _check(b)
        yield item


# -- formatting -------------------------------------------------------------------------------------------

_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.DOTALL)


def check_printf(fmt: str, args: Any) -> None:
    """`fmt % args` (and the `format` filter): widths and the text it would make stay bounded."""
    total = len(fmt)
    conversions = 0
    for match in _PRINTF.finditer(fmt):
        width, precision, conversion = match.groups()
        if conversion == "%":
            continue
        conversions += 1
        for number in (width, precision):
            if number == "*":
                raise TemplateLimitError(tr("a width taken from the arguments (%*d) is not allowed in templates"))
            if number and (len(number) > 7 or int(number) > MAX_SIZE):
                raise TemplateLimitError(
                    tr("a format width or precision over {n} is not allowed", n=format(MAX_SIZE, ","))
                )
            total += int(number or 0)
    if conversions:
        total += conversions * size_of(args)
    if total > MAX_SIZE:
        raise _too_large(N_("the formatted text"))


class _Formatter(SandboxedFormatter):
    """str.format in the sandbox, with every field's width and precision bounded."""

    def format_field(self, value: Any, format_spec: str) -> Any:
        for number in re.findall(r"\d+", format_spec):
            if len(number) > 7 or int(number) > MAX_SIZE:
                raise TemplateLimitError(
                    tr("a format width or precision over {n} is not allowed", n=format(MAX_SIZE, ","))
                )
        return super().format_field(value, format_spec)


class _BoundedFormat:
    """What `"...".format` / `.format_map` are in a template: sandboxed (no attribute escapes) and bounded."""

    def __init__(self, env: BoundedEnvironment, fmt: str, is_map: bool) -> None:
        self.env, self.fmt, self.is_map = env, fmt, is_map

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        if self.is_map:
            if kwargs or len(args) != 1:
                raise TypeError("format_map() takes exactly one argument")
            kwargs, args = args[0], ()
        fields = sum(1 for _, name, _, _ in string.Formatter().parse(self.fmt) if name is not None)
        if len(self.fmt) + fields * (size_of(args) + size_of(kwargs)) > MAX_SIZE:
            raise _too_large(N_("the formatted text"))
        return str(_Formatter(self.env).vformat(self.fmt, args, kwargs))


# -- filters ---------------------------------------------------------------------------------------------


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _pre_center(value: Any, *args: Any, **kwargs: Any) -> None:
    _check_width(_arg(args, kwargs, 0, "width", 80), N_("center width"))


def _pre_indent(value: Any, *args: Any, **kwargs: Any) -> None:
    width = _arg(args, kwargs, 0, "width", 4)
    per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    if (str(value).count("\n") + 1) * per_line + len(str(value)) > MAX_SIZE:
        raise _too_large(N_("the indented text"))


def _pre_wordwrap(value: Any, *args: Any, **kwargs: Any) -> None:
    width = _arg(args, kwargs, 0, "width", 79)
    wrap = _arg(args, kwargs, 2, "wrapstring", None)
    if isinstance(width, int) and isinstance(wrap, str):
        text = str(value)
        if len(text) + (len(text) // max(width, 1) + text.count("\n") + 1) * len(wrap) > MAX_SIZE:
            raise _too_large(N_("the wrapped text"))


def _replacement_size(text: str, old: Any, new: Any, count: Any) -> int:
    if not isinstance(old, str) or not isinstance(new, str):
        return len(text)
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * max(0, len(new) - len(old))


def _pre_replace(value: Any, *args: Any, **kwargs: Any) -> None:
    old, new = _arg(args, kwargs, 0, "old"), _arg(args, kwargs, 1, "new")
    if _replacement_size(str(value), old, new, _arg(args, kwargs, 2, "count")) > MAX_SIZE:
        raise _too_large(N_("the replaced text"))


def _joined_size(items: Iterable[Any], separator: Any) -> int:
    listed = items if isinstance(items, list | tuple) else list(items)
    return size_of(listed) + len(listed) * (len(separator) if isinstance(separator, str) else 1)


def _pre_format(value: Any, *args: Any, **kwargs: Any) -> None:
    check_printf(str(value), kwargs or args)


def _pre_batch(value: Any, *args: Any, **kwargs: Any) -> None:
    _check_width(_arg(args, kwargs, 0, "linecount"), N_("batch size"))


def _pre_slice(value: Any, *args: Any, **kwargs: Any) -> None:
    slices = _arg(args, kwargs, 0, "slices")
    if isinstance(slices, int) and slices > MAX_RANGE:
        raise TemplateLimitError(tr("slice into more than {n} parts is not allowed", n=format(MAX_RANGE, ",")))


def _pre_tojson(value: Any, *args: Any, **kwargs: Any) -> None:
    indent = _arg(args, kwargs, 0, "indent")
    if isinstance(indent, int) and indent > 8:
        raise TemplateLimitError(tr("tojson indent may be at most 8"))


def _pre_sum(value: Any, *args: Any, **kwargs: Any) -> None:
    start = _arg(args, kwargs, 1, "start", 0)
    if not isinstance(start, int | float):
        raise TemplateLimitError(tr("sum adds numbers only (its start must be a number)"))


def _pre_strftime(fmt: Any) -> None:
    if isinstance(fmt, str) and len(fmt) + fmt.count("%") * 40 > MAX_SIZE:
        raise _too_large(N_("the formatted date"))


def _pre_datefmt(value: Any, *args: Any, **kwargs: Any) -> None:
    _pre_strftime(_arg(args, kwargs, 0, "fmt"))


_PRECHECKS: dict[str, Callable[..., None]] = {
    "center": _pre_center,
    "indent": _pre_indent,
    "wordwrap": _pre_wordwrap,
    "replace": _pre_replace,
    "format": _pre_format,
    "batch": _pre_batch,
    "slice": _pre_slice,
    "tojson": _pre_tojson,
    "sum": _pre_sum,
    "datefmt": _pre_datefmt,
}
# HTML helpers with no use in a chat message, whose output is hard to bound.
_LEFT_OUT = frozenset({"urlize", "xmlattr"})
# Filters that pick from their input or compute a number, never building text from it: left as they are
# (the guard would only cost time on every render).
_UNGUARDED = frozenset({"default", "d", "first", "last", "length", "count", "random", "abs", "round", "int", "float"})


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """The filter with a step counted, its inputs and result weighed, and its amplifying arguments checked.

    The guard takes the context (Jinja's `pass_context`), which also keeps Jinja from running the filter on
    constants at compile time, outside any budget."""
    passing = getattr(getattr(func, "jinja_pass_arg", None), "name", None)
    precheck = _PRECHECKS.get(name)

    is_join = name == "join"

    @pass_context
    @functools.wraps(func)
    def guarded(context: Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        # Runs for every filter use: the common case (short strings) is kept to a few comparisons.
        b = _local.budget
        b.steps -= 1
        if b.steps <= b.next_check:
            _check(b)
        if is_join:  # weigh the items once, as a list, and hand the same list on
            value = value if isinstance(value, list | tuple | str) else list(value)
            if _joined_size(value, _arg(args, kwargs, 0, "d", "")) > MAX_SIZE:
                raise _too_large(N_("the joined text"))
        elif type(value) is not str or len(value) > MAX_SIZE:
            check_size(value, N_("the input of the {name} filter"), name=name)
        if args or kwargs:
            for arg in (*args, *kwargs.values()):
                check_size(arg, N_("an argument of the {name} filter"), name=name)
        if precheck is not None:
            precheck(value, *args, **kwargs)
        if passing is None:
            result = func(value, *args, **kwargs)
        elif passing == "context":
            result = func(context, value, *args, **kwargs)
        elif passing == "eval_context":
            result = func(context.eval_ctx, value, *args, **kwargs)
        else:
            result = func(context.environment, value, *args, **kwargs)
        if type(result) is not str or len(result) > MAX_SIZE:
            check_size(result, N_("the result of the {name} filter"), name=name)
        return result

    return guarded


# -- globals ------------------------------------------------------------------------------------------


def bounded_range(*args: int) -> range:
    """`range` with at most MAX_RANGE items."""
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise TemplateLimitError(
            tr(
                "range() may have at most {n} items (this one has {has})",
                n=format(MAX_RANGE, ","),
                has=format(len(rng), ","),
            )
        )
    return rng


def bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    """Jinja's `lipsum`, at most 20 paragraphs of at most 200 words."""
    if n > 20 or max > 200 or min > max:
        raise TemplateLimitError(tr("lipsum is limited to 20 paragraphs of at most 200 words"))
    return str(generate_lorem_ipsum(n, html, min, max))


# -- calls --------------------------------------------------------------------------------------------

_STR_METHODS = frozenset(
    {
        "capitalize", "casefold", "count", "endswith", "find", "index", "isalnum", "isalpha", "isascii",
        "isdecimal", "isdigit", "isidentifier", "islower", "isnumeric", "isprintable", "isspace", "istitle",
        "isupper", "lower", "lstrip", "partition", "removeprefix", "removesuffix", "rfind", "rindex",
        "rpartition", "rsplit", "rstrip", "split", "splitlines", "startswith", "strip", "swapcase", "title",
        "upper", "center", "ljust", "rjust", "zfill", "replace", "join", "expandtabs",
    }
)  # fmt: skip
_METHODS: dict[type, frozenset[str]] = {
    dict: frozenset({"get", "items", "keys", "values"}),
    list: frozenset({"count", "index"}),
    tuple: frozenset({"count", "index"}),
    datetime: frozenset({"strftime", "isoformat", "weekday", "isoweekday", "isocalendar", "date", "time"}),
    date: frozenset({"strftime", "isoformat", "weekday", "isoweekday", "isocalendar"}),
    dtime: frozenset({"strftime", "isoformat"}),
    int: frozenset({"bit_length"}),
    float: frozenset({"is_integer"}),
}
_JINJA_OBJECTS = (Macro, LoopContext, Cycler, Joiner, BlockReference, Undefined)
_GLOBALS: tuple[Any, ...] = (bounded_range, bounded_lipsum, dict, Namespace, Cycler, Joiner)


def _check_str_call(method: str, text: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    if method in ("center", "ljust", "rjust", "zfill"):
        _check_width(_arg(args, kwargs, 0, "width"), N_("{method} width"), method=method)
    elif method == "expandtabs":
        size = _arg(args, kwargs, 0, "tabsize", 8)
        if isinstance(size, int) and len(text) + text.count("\t") * size > MAX_SIZE:
            raise _too_large(N_("the expanded text"))
    elif method == "replace":
        _pre_replace(text, *args, **kwargs)  # the filter's arguments, in the same order
    elif method == "join" and args and _joined_size(args[0], text) > MAX_SIZE:
        raise _too_large(N_("the joined text"))


def _check_call(obj: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """Refuse what a message template has no business calling; check the amplifying arguments of the rest.
    Returns the arguments to call with (a join's items are listed once, here)."""
    if isinstance(obj, (*_JINJA_OBJECTS, _BoundedFormat)) or any(obj is g for g in _GLOBALS):
        return args
    owner = getattr(obj, "__self__", None)
    method = getattr(obj, "__name__", "")
    if isinstance(obj, types.MethodType) and isinstance(owner, (*_JINJA_OBJECTS, Namespace)):
        return args  # loop.cycle, cycler.next, ...
    if isinstance(obj, types.BuiltinMethodType) and owner is not None:
        if isinstance(owner, str) and method in _STR_METHODS:
            if method == "join" and args and not isinstance(args[0], list | tuple | str):
                args = (list(args[0]), *args[1:])
            _check_str_call(method, owner, args, kwargs)
            return args
        allowed = next((names for kind, names in _METHODS.items() if type(owner) is kind), frozenset())
        if method in allowed:
            if method == "strftime":
                _pre_strftime(_arg(args, kwargs, 0, "format"))
            return args
        raise SecurityError(
            tr("calling {method} is not allowed in templates", method=type(owner).__name__ + "." + method + "()")
        )
    raise SecurityError(
        tr("calling {method} is not allowed in templates", method=getattr(obj, "__name__", type(obj).__name__))
    )


# -- the environment ------------------------------------------------------------------------------------


class _CodeGenerator(CodeGenerator):
    """Jinja's code generator, with `~` routed through the environment's guard."""

    def visit_Call(self, node: nodes.Call, frame: Frame, forward_caller: bool = False) -> None:
        callee = node.node
        if isinstance(callee, nodes.EnvironmentAttribute) and callee.name == "guard_iter":
            # A loop's items (see BoundedEnvironment._parse): called directly, not through the sandbox's call.
            self.write("environment.guard_iter(")
            self.visit(node.args[0], frame)
            self.write(")")
            return
        super().visit_Call(node, frame, forward_caller=forward_caller)

    # Every `{{ ... }}` value becomes text through environment.to_text (autoescape is never on here), or,
    # inside a macro or block (whose output is collected in a list), environment.buffered_text.
    def _output_child_pre(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        self.write("environment.buffered_text(" if frame.buffer is not None else "environment.to_text(")

    def _output_child_post(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        self.write(")")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.join_parts((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment within this module's bounds (see the module docstring)."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})
    concat = staticmethod(bounded_concat)
    guard_iter = staticmethod(guard_iter)
    join_parts = staticmethod(join_parts)
    to_text = staticmethod(to_text)
    buffered_text = staticmethod(buffered_text)

    def __init__(self, **options: Any) -> None:
        if options.get("autoescape"):
            raise ValueError("message templates are plain text: autoescape is not supported")
        super().__init__(**options)
        self.globals["range"] = bounded_range
        self.globals["lipsum"] = bounded_lipsum

    def guard_filters(self) -> None:
        """Wrap every filter (call once all filters are added); leave out the HTML-only ones."""
        for name in _LEFT_OUT:
            self.filters.pop(name, None)
        self.filters = {
            name: func if name in _UNGUARDED else _guard_filter(name, func) for name, func in self.filters.items()
        }

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        # Each for-loop iterates `environment.guard_iter(items)`, which counts a step per item.
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(
                nodes.EnvironmentAttribute("guard_iter"), [loop.iter], [], None, None, lineno=loop.iter.lineno
            )
        return tree

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "%":
            if isinstance(left, str):
                check_printf(left, right)
            return left % right
        if operator == "+":
            if isinstance(left, str | list | tuple) and size_of(left) + size_of(right) > MAX_SIZE:
                raise _too_large(N_("a value joined with +"))
            return left + right
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int) and max(left.bit_length(), 1) * right > MAX_INT_BITS:
                raise _too_many_bits()
            return left**right
        # "*": a sequence repeated, or numbers multiplied
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(times, int):
                if size_of(seq) * times > MAX_SIZE:
                    raise _too_large(N_("a value repeated with *"))
                return left * right
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _too_many_bits()
        return left * right

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        tick()
        for arg in (*args, *kwargs.values()):
            check_size(arg, N_("an argument of a call"))
        args = _check_call(obj, args, kwargs)
        result = context.call(obj, *args, **kwargs)
        check_size(result, N_("the result of a call"))
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if (
            isinstance(value, types.MethodType | types.BuiltinMethodType)
            and value.__name__ in ("format", "format_map")
            and isinstance(value.__self__, str)
        ):
            return _BoundedFormat(self, value.__self__, value.__name__ == "format_map")
        return None
