"""Templates and conditions of manifests: Jinja's sandbox with bounded sizes and time, and
rendering that turns any failure into one error naming the manifest's file, line and field."""

from __future__ import annotations

import functools
import math
import os
import pickle
import re
import resource
import select
import signal
import time
from collections.abc import Callable
from typing import Any

from jinja2 import StrictUndefined, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pyagent.errors import ConfigError

MAX_TEMPLATE_CHARS = 1_000_000  # bound on a rendered template and on sizes a template asks for
MAX_TEMPLATE_SECONDS = 2.0  # bound on rendering one template or evaluating one condition
MAX_TEMPLATE_MEMORY = 512 * 2**20  # bound on the memory one render or condition may add


class _BoundedJoins(CodeGenerator):
    """Compiles `a ~ b` to a join that checks its size first."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class TemplateEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox (a template cannot change the run's state it reads), strict
    about names, with bounds: every string or list a template builds (`'a' * n`, `a + b`,
    `a ~ b`, a call's or a filter's result, widths and counts asked of them) and the rendered
    text stay under MAX_TEMPLATE_CHARS and powers stay small. `Templates` adds bounds on time
    and memory by rendering in a child process."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = _BoundedJoins

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
        self.filters = {name: _bounded(name, f) for name, f in self.filters.items()}
        self.globals.pop("lipsum", None)  # generates text by the megabyte, of no use here

    def concat(self, parts: tuple[Any, ...]) -> str:
        """`a ~ b ~ ...`, refused before it is built when it would be too large."""
        texts = [str(part) for part in parts]
        _check_size(sum(map(len, texts)))
        return "".join(texts)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(left, int) and isinstance(right, int) \
                and right > 0 and max(left.bit_length(), 1) * right > 4 * MAX_TEMPLATE_CHARS:
            raise SecurityError(f"{left} ** {right} is too large")
        if operator == "%" and isinstance(left, str):
            _check_format(left)
            _check_sizes(right if isinstance(right, tuple) else (right,), {})
        if operator == "*":
            for sized, count in ((left, right), (right, left)):
                if isinstance(sized, str | list | tuple) and isinstance(count, int):
                    _check_size(len(sized) * count)
        if operator == "+" and isinstance(left, str | list | tuple) \
                and isinstance(right, str | list | tuple):
            _check_size(len(left) + len(right))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_sizes(args, kwargs)
        target = getattr(getattr(__obj, "__wrapped__", None), "__self__", None)
        if isinstance(target, str):  # str.format / str.format_map
            _check_format(target)
        elif isinstance(getattr(__obj, "__self__", None), str):
            _check_str_method(__obj.__self__, __obj.__name__, args)
        return _checked(super().call(__context, __obj, *args, **kwargs))

    def render(self, text: str, **names: Any) -> str:
        """Render template `text`; raises SecurityError past MAX_TEMPLATE_CHARS of output."""
        parts, size = [], 0
        for part in self.from_string(text).generate(**names):
            size += len(part)
            _check_size(size)
            parts.append(part)
        return "".join(parts)


def _check_size(size: int) -> None:
    if size > MAX_TEMPLATE_CHARS:
        raise SecurityError(f"the template asks for {size:,} characters, more than the "
                            f"{MAX_TEMPLATE_CHARS:,} allowed")


def _checked(result: Any) -> Any:
    """`result`, unless it is a string or list above MAX_TEMPLATE_CHARS."""
    if isinstance(result, str | list | tuple):
        _check_size(len(result))
    return result


def _check_str_method(text: str, name: str, args: tuple[Any, ...]) -> None:
    """Refuse `str.join` and `str.replace` calls whose result would be too large."""
    if name == "join" and args and isinstance(args[0], list | tuple):
        items = [len(str(item)) for item in args[0]]
        _check_size(sum(items) + len(text) * max(len(items) - 1, 0))
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) \
            and isinstance(args[1], str):
        _check_size(len(text) + text.count(args[0]) * max(len(args[1]) - len(args[0]), 0)
                    + (len(text) + 1) * len(args[1]) * (args[0] == ""))


def _check_sizes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool):
            _check_size(abs(value))


def _check_format(text: str) -> None:
    """Refuse a format string with a width or precision of 7 digits or more."""
    if _LONG_NUMBER.search(text):
        raise SecurityError("a format string in the template asks for a width or precision "
                            f"above {MAX_TEMPLATE_CHARS:,}")


_LONG_NUMBER = re.compile(r"\d{7,}")


def _bounded(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Filter `name`, refusing number arguments above MAX_TEMPLATE_CHARS and a result above it
    (`format`: also a format string asking for such a width; `join` and `replace`: a result
    that would be too large, before it is built)."""
    @functools.wraps(fn)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        if name == "format":
            _check_format(str(args[0]))
        _check_sizes(args[1:], kwargs)
        if name in ("join", "replace"):
            _check_filter(name, args, kwargs)
        return _checked(fn(*args, **kwargs))
    return bounded


def _check_filter(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """`join` and `replace` filters, checked as the string methods are."""
    if name == "join" and len(args) >= 2:  # (eval_ctx, value, d="", attribute=None)
        value, separator = args[1], (args[2] if len(args) > 2 else kwargs.get("d", ""))
        if isinstance(value, list | tuple) and isinstance(separator, str):
            _check_str_method(separator, "join", (value,))
    elif len(args) >= 4 and all(isinstance(a, str) for a in args[1:4]):  # (eval_ctx, s, old, new)
        _check_str_method(args[1], "replace", (args[2], args[3]))


class Templates:
    """Compiled instructions and conditions of one manifest; `where` (`file:line: field`) names
    the source of each in errors.

    Each render and condition runs in a forked child process with MAX_TEMPLATE_SECONDS of time
    and MAX_TEMPLATE_MEMORY of added address space (rlimits, and a kill at the deadline), so
    not even one long operation inside Python's C code can hang the run or exhaust the host's
    memory; the sizes checked while rendering make most refusals immediate and precise."""

    def __init__(self) -> None:
        self.env = TemplateEnvironment()
        self._expression = functools.lru_cache(maxsize=None)(self.env.compile_expression)

    def render(self, text: str, where: str, **names: Any) -> str:
        """Render an instruction; any failure is a ConfigError naming `where`."""
        return isolated(lambda: self.env.render(text, **names), f"{where}: cannot render")

    def holds(self, expression: str, where: str, **names: Any) -> bool:
        """Evaluate a condition; any failure is a ConfigError naming `where`."""
        return isolated(lambda: bool(self._expression(expression)(**names)),
                        f"{where}: cannot evaluate {expression!r}")


def isolated(work: Callable[[], Any], context: str, seconds: float = MAX_TEMPLATE_SECONDS,
             memory: int = MAX_TEMPLATE_MEMORY) -> Any:
    """`work()` computed in a forked child limited to `seconds` and `memory` more bytes of
    address space; its result (picklable) or a ConfigError `context: reason`."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, send, leave without running the parent's exit hooks
        os.close(read)
        try:
            with open("/proc/self/statm", "rb") as statm:
                size = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (size + memory, size + memory))
            resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(seconds), math.ceil(seconds) + 1))
            try:
                reply = (True, work())
            except MemoryError:
                reply = (False, f"SecurityError: the template needs more than "
                                f"{memory // 2**20} MiB of memory")
            except Exception as exc:  # undefined names, sandbox refusals, sizes, type errors
                reply = (False, _reason(exc))
            with os.fdopen(write, "wb") as pipe:
                pickle.dump(reply, pipe)
        finally:
            os._exit(0)
    os.close(write)
    data = bytearray()
    deadline = time.monotonic() + seconds + 0.5
    with os.fdopen(read, "rb", buffering=0) as pipe:
        while (left := deadline - time.monotonic()) > 0:
            if select.select([pipe], [], [], left)[0]:
                chunk = pipe.read(1 << 16)
                if not chunk:
                    break
                data += chunk
        else:
            os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if not data:
        raise ConfigError(f"{context}: SecurityError: the template ran longer than "
                          f"{seconds:g} s or needed more than {memory // 2**20} MiB")
    ok, value = pickle.loads(bytes(data))
    if not ok:
        raise ConfigError(f"{context}: {value}")
    return value


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
