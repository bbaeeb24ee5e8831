"""PyAgent: a Python runtime for fleets of LLM agents, built to be measured."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pyagent")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
