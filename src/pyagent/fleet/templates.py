"""Templates and conditions of manifests: Jinja's sandbox with bounded sizes, and rendering that
turns any failure into one error naming the manifest's file, line and field."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from jinja2 import StrictUndefined
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from pyagent.errors import ConfigError

MAX_TEMPLATE_CHARS = 1_000_000  # bound on a rendered template and on sizes a template asks for


class TemplateEnvironment(SandboxedEnvironment):
    """Jinja's sandbox, strict about names, with bounded sizes: a repetition (`'a' * n`), a
    width or count passed to a call or filter, a power and the rendered text stay under
    MAX_TEMPLATE_CHARS, so no template can exhaust memory or time."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
        self.filters = {name: _bounded(f) for name, f in self.filters.items()}
        self.filters["format"] = _bounded(self.filters["format"], check_format=True)

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
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_sizes(args, kwargs)
        target = getattr(getattr(__obj, "__wrapped__", None), "__self__", None)
        if isinstance(target, str):  # str.format / str.format_map
            _check_format(target)
        return super().call(__context, __obj, *args, **kwargs)

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


def _bounded(fn: Callable[..., Any], check_format: bool = False) -> Callable[..., Any]:
    """A filter that refuses number arguments above MAX_TEMPLATE_CHARS (and, for `format`,
    a format string asking for such a width)."""
    @functools.wraps(fn)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        if check_format:
            _check_format(str(args[0]))
        _check_sizes(args[1:], kwargs)
        return fn(*args, **kwargs)
    return bounded


class Templates:
    """Compiled instructions and conditions of one manifest; `where` (`file:line: field`) names
    the source of each in errors."""

    def __init__(self) -> None:
        self.env = TemplateEnvironment()
        self._expression = functools.lru_cache(maxsize=None)(self.env.compile_expression)

    def render(self, text: str, where: str, **names: Any) -> str:
        """Render an instruction; any failure is a ConfigError naming `where`."""
        try:
            return self.env.render(text, **names)
        except Exception as exc:  # undefined names, sandbox refusals, sizes, type errors
            raise ConfigError(f"{where}: cannot render: {_reason(exc)}") from None

    def holds(self, expression: str, where: str, **names: Any) -> bool:
        """Evaluate a condition; any failure is a ConfigError naming `where`."""
        try:
            return bool(self._expression(expression)(**names))
        except Exception as exc:
            raise ConfigError(f"{where}: cannot evaluate {expression!r}: {_reason(exc)}") \
                from None


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


