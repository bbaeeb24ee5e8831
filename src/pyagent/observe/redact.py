"""Redaction of secrets in span attributes before they leave the process (API, stream, OTLP).

A `Redactor` replaces every match of its patterns in string values, recursively through lists and
dicts, with `[REDACTED]`. A pattern with a group named `secret` replaces only that group, so
`password=[REDACTED]` keeps the key that tells a reader what was hidden. The defaults catch
common credential shapes; users add their own regular expressions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pyagent.errors import ConfigError

MASK = "[REDACTED]"
MAX_DEPTH = 32  # deeper values are replaced by a note (the API's documents stay shallow)
KEYS_KEPT = 10_000  # attribute names whose masked form is remembered
SECRET_NAME = (r"(?:[A-Za-z0-9]*[_-])?(?:password|passwd|secret|api[_-]?key|access[_-]?key|"
               r"access[_-]?token|auth[_-]?token|private[_-]?key)")
DEFAULT_PATTERNS: tuple[str, ...] = (
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
    r"\bsk-[A-Za-z0-9_-]{16,}",  # OpenAI-style API keys
    r"\bAKIA[0-9A-Z]{16}\b",  # AWS access key ids
    r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",  # GitHub tokens
    r"\bxox[abprs]-[A-Za-z0-9-]{10,}",  # Slack tokens
    r"(?i)\bbearer\s+(?P<secret>[A-Za-z0-9._~+/=-]{16,})",
    rf"(?i)(?<![A-Za-z0-9]){SECRET_NAME}[\"']?\s*[:=]\s*[\"']?(?P<secret>[^\s\"',;]{{4,}})",
)


class Redactor:
    """Masks matches of `patterns` (the defaults first unless `defaults` is False)."""

    def __init__(self, patterns: Iterable[str] = (), defaults: bool = True):
        compiled = []
        for pattern in [*(DEFAULT_PATTERNS if defaults else ()), *patterns]:
            try:
                compiled.append(re.compile(pattern))
            except re.error as exc:
                raise ConfigError(f"redaction pattern {pattern!r} is not a valid regular "
                                  f"expression: {exc}") from None
        self.patterns = tuple(compiled)
        self.defaults = defaults
        self._keys: dict[Any, tuple[str, bool]] = {}

    def text(self, value: str) -> str:
        """`value` with every match masked."""
        for pattern in self.patterns:
            value = pattern.sub(_mask, value)
        return value

    def value(self, value: Any, depth: int = MAX_DEPTH) -> Any:
        """A copy of `value` with strings masked inside lists and dicts too (keys included, and
        the whole value of a key named like a secret when defaults are on), at most `depth`
        levels deep."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict | list | tuple):
            if depth <= 0:
                return f"[{type(value).__name__} nested too deep]"
            if isinstance(value, dict):
                out = {}
                for key, item in value.items():
                    name, secret = self._key(key)
                    out[name] = MASK if secret and isinstance(item, str | int | float) \
                        else self.value(item, depth - 1)
                return out
            return [self.value(item, depth - 1) for item in value]
        return value

    def attributes(self, attributes: dict[str, Any]) -> dict[str, Any]:
        """A copy of span attributes with secrets masked."""
        return self.value(attributes)

    def _key(self, key: Any) -> tuple[str, bool]:
        """A key masked, and whether its value is a secret by its name (remembered: the same
        attribute names come back in every span)."""
        found = self._keys.get(key)
        if found is None:
            name = self.text(str(key))
            found = (name, self.defaults and _SECRET_KEY.search(name) is not None)
            if len(self._keys) < KEYS_KEPT:
                self._keys[key] = found
        return found


_SECRET_KEY = re.compile(rf"(?i)(?<![A-Za-z0-9]){SECRET_NAME}$")


def _mask(match: re.Match[str]) -> str:
    if "secret" not in match.re.groupindex or match.group("secret") is None:
        return MASK
    start, end = match.span("secret")
    offset = match.start()
    return match.group(0)[:start - offset] + MASK + match.group(0)[end - offset:]
