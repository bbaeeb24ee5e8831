"""The reasoning suite: the seven reasoning-pattern families as one suite."""

from __future__ import annotations

from pyagent.bench.suites import (
    abstract,
    adaptive,
    convergent,
    critical,
    divergent,
    lateral,
    systems,
)
from pyagent.bench.suites.base import FamilySuite

MODULES = (convergent, divergent, lateral, systems, critical, abstract, adaptive)


def reasoning_suite() -> FamilySuite:
    """Convergent, divergent, lateral, systems, critical, abstract and adaptive reasoning."""
    return FamilySuite(
        "reasoning",
        "Seven reasoning patterns at three difficulties each, generated from seeds and graded "
        "by programs.",
        [module.FAMILY for module in MODULES])
