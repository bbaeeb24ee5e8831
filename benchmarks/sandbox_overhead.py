"""What the tool sandbox costs: the same commands run through `run_command` in bubblewrap and
unconfined, alternating, in one process.

    .venv/bin/python benchmarks/sandbox_overhead.py

Two commands: `true` (the sandbox's fixed cost per command) and the `run_tests` tool on a small
project (what an agent's test step pays). Each is run ROUNDS times per arm after a warm-up, the
arms alternating so that machine noise falls on both; the table gives medians, the added
milliseconds and the ratio.
Results: benchmarks/results/sandbox-overhead.json and sandbox-overhead.md.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path

from pyagent.bench.provenance import provenance, write_result
from pyagent.fleet.tools.base import Limits, ToolContext, Workspace
from pyagent.fleet.tools.bubblewrap import Bubblewrap
from pyagent.fleet.tools.process import run_command
from pyagent.fleet.tools.registry import make_tool
from pyagent.fleet.tools.sandbox import Unconfined, UnconfinedWarning

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ROUNDS = {"true": 30, "run_tests": 8}
PROJECT = {
    "calc.py": "def add(a, b):\n    return a + b\n",
    "test_calc.py": "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n",
}


def main() -> None:
    warnings.simplefilter("ignore", UnconfinedWarning)
    with tempfile.TemporaryDirectory() as folder:
        for name, text in PROJECT.items():
            (Path(folder) / name).write_text(text)
        arms = {name: ToolContext(Workspace(folder), Limits(timeout_s=120), sandbox=sandbox)
                for name, sandbox in (("bubblewrap", Bubblewrap()), ("none", Unconfined()))}
        commands = {"true": lambda context: run_command(["true"], context),
                    "run_tests": lambda context: make_tool("run_tests").call({}, context)}
        medians: dict[str, dict[str, float]] = {}
        for command, call in commands.items():
            times: dict[str, list[float]] = {arm: [] for arm in arms}
            for context in arms.values():
                call(context)  # warm up (the first bubblewrap call also checks it works)
            for _ in range(ROUNDS[command]):
                for arm, context in arms.items():
                    start = time.perf_counter()
                    call(context)
                    times[arm].append(time.perf_counter() - start)
            medians[command] = {arm: statistics.median(t) * 1e3 for arm, t in times.items()}
    out = {"benchmark": "sandbox_overhead", "meta": provenance(ROOT), "rounds": ROUNDS,
           "median_ms": medians,
           "added_ms": {c: m["bubblewrap"] - m["none"] for c, m in medians.items()}}
    lines = ["| command | rounds | unconfined ms | bubblewrap ms | added ms | ratio |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {c} | {ROUNDS[c]} | {m['none']:.1f} | {m['bubblewrap']:.1f} | "
              f"{m['bubblewrap'] - m['none']:.1f} | {m['bubblewrap'] / m['none']:.2f} |"
              for c, m in medians.items()]
    write_result(RESULTS, "sandbox-overhead", out, lines)


if __name__ == "__main__":
    main()
