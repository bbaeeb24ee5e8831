"""Benchmark suites: reasoning-pattern families and code-repair tasks, graded by programs."""
