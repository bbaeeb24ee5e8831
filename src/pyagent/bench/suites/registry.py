"""Suites by name: adding a suite is one module and one line here.

`pyagent bench run` takes suite names (`reasoning`, `repair`), a suite's families
(`reasoning.convergent`) or a family's bare name when only one suite has it (`convergent`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyagent.bench.suites.base import Suite
from pyagent.errors import ConfigError


def _reasoning() -> Suite:
    from pyagent.bench.suites.reasoning import reasoning_suite

    return reasoning_suite()


def _repair() -> Suite:
    from pyagent.bench.suites.repair import RepairSuite

    return RepairSuite()


SUITES: dict[str, Callable[[], Suite]] = {
    "reasoning": _reasoning,
    "repair": _repair,
}


@dataclass(frozen=True)
class Selection:
    """A suite and the families of it to run (None: all of them)."""

    suite: Suite
    families: tuple[str, ...] | None = None


def select(names: Sequence[str]) -> list[Selection]:
    """The suites and families that `names` ask for, each suite once (families merged)."""
    built: dict[str, Suite] = {}
    wanted: dict[str, set[str] | None] = {}

    def get(suite_name: str) -> Suite:
        if suite_name not in built:
            built[suite_name] = SUITES[suite_name]()
        return built[suite_name]

    for name in names:
        suite_name, _, family = name.partition(".")
        if suite_name not in SUITES:
            owners = [s for s in SUITES if name in get(s).families]
            if len(owners) != 1:
                raise ConfigError(
                    f"unknown suite or family {name!r}; suites: {', '.join(SUITES)}; families: "
                    + "; ".join(f"{s}: {', '.join(built[s].families)}" for s in built))
            suite_name, family = owners[0], name
        suite = get(suite_name)
        if family and family not in suite.families:
            raise ConfigError(f"suite {suite_name!r} has no family {family!r}; it has "
                              f"{', '.join(suite.families)}")
        if not family:
            wanted[suite_name] = None
        elif wanted.get(suite_name, set()) is not None:
            wanted.setdefault(suite_name, set()).add(family)  # type: ignore[union-attr]
    return [Selection(built[name], None if families is None else
                      tuple(f for f in built[name].families if f in families))
            for name, families in wanted.items()]
