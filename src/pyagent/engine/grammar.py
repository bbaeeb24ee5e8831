"""Grammar-constrained decoding: the engine only samples tokens that keep the output valid JSON for
a given JSON schema (llguidance computes the allowed-token mask, ~0.2 ms for Gemma's 262k vocab).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import llguidance
import llguidance.hf
import torch

from pyagent.errors import RequestError

BITS = torch.arange(32, dtype=torch.int32)


def grammar_tokenizer(tokenizer: Any, eos_ids: set[int]) -> llguidance.LLTokenizer:
    """The tokenizer as llguidance sees it (about a second for a large vocabulary: cache it)."""
    return llguidance.hf.from_tokenizer(tokenizer, eos_token=sorted(eos_ids) or None)


def schema_grammar(schema: dict[str, Any], param: str) -> str:
    """The grammar of JSON valid for `schema`; a `RequestError` naming `param` if the schema is
    not one llguidance can use."""
    grammar, problem = _grammar(schema)
    if problem:
        raise RequestError(f"{param} is not a usable JSON schema: {problem}", param=param,
                           code="invalid_value")
    return grammar


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why `schema` is not a usable JSON schema; None if it is."""
    return _grammar(schema)[1]


def _grammar(schema: dict[str, Any]) -> tuple[str, str | None]:
    problem = reference_problem(schema)
    if problem:
        return "", problem
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False})  # compact: always terminates
        return grammar, llguidance.LLMatcher.validate_grammar(grammar) or None
    except (ValueError, TypeError) as exc:
        return "", str(exc)


# Keywords holding subschemas: applied to the same value (a `$ref` cycle through these never
# ends), to parts of it, or to nothing (definitions). Each holds one schema, a list or a map.
_IN_PLACE = {"allOf": list, "anyOf": list, "oneOf": list, "not": dict, "if": dict,
             "then": dict, "else": dict, "dependentSchemas": "map"}
_NESTED = {"properties": "map", "patternProperties": "map", "additionalProperties": dict,
           "items": dict, "prefixItems": list, "additionalItems": dict, "contains": dict,
           "propertyNames": dict, "unevaluatedProperties": dict, "unevaluatedItems": dict,
           "$defs": "map", "definitions": "map"}


def _subschemas(schema: dict[str, Any], keywords: dict[str, Any]) -> list[tuple[str, Any]]:
    """(pointer suffix, subschema) for the subschemas under `keywords` in `schema`."""
    found: list[tuple[str, Any]] = []
    for key, shape in keywords.items():
        value = schema.get(key)
        if isinstance(value, dict) and shape == "map":
            found += [(f"/{key}/{_escape(name)}", part) for name, part in value.items()]
        elif isinstance(value, list) and shape in (list, dict):  # items may be a list (old)
            found += [(f"/{key}/{i}", part) for i, part in enumerate(value)]
        elif isinstance(value, dict) and shape is dict:
            found.append((f"/{key}", value))
    return found


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def reference_problem(schema: dict[str, Any]) -> str | None:
    """What is wrong with the local `$ref`s of `schema`: one that points to nothing or to
    something other than a schema, or a cycle of references that never reaches a part of the
    value (`{"$ref": "#/$defs/a"}` as `a` itself), which no value could ever be checked
    against. References by URL or anchor, and schemas with `$id`s inside, are left to
    llguidance."""
    where: dict[int, str] = {}  # id of each subschema -> its pointer
    edges: dict[int, list[int]] = {}  # subschema -> those applied to the same value
    nodes: dict[int, dict[str, Any]] = {}
    pending: list[tuple[str, Any]] = [("", schema)]
    while pending:
        pointer, node = pending.pop()
        if not isinstance(node, dict):
            continue
        if pointer and "$id" in node:
            return None  # a resource of its own: `#` means something else inside
        where[id(node)], nodes[id(node)] = pointer, node
        inner = _subschemas(node, _IN_PLACE)
        edges[id(node)] = [id(part) for _, part in inner if isinstance(part, dict)]
        pending += reversed([(pointer + suffix, part) for suffix, part in inner + _subschemas(
            node, _NESTED)])  # visited in document order
    for key, node in nodes.items():
        ref = node.get("$ref")
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            continue
        target = _resolve(schema, ref)
        at = where[key] or "the root"
        if target is _MISSING:
            return f"$ref {ref!r} at {at} points to nothing in the schema"
        if isinstance(target, dict):
            edges[key].append(id(target))
        elif not isinstance(target, bool):
            return (f"$ref {ref!r} at {at} points to {_kind(target)}, not a schema (an object "
                    "or a boolean)")
    cycle = _cycle(edges)
    if cycle:
        path = " -> ".join(where[node] or "(root)" for node in cycle)
        return (f"reference cycle: {path}; a schema that refers back to itself without "
                "descending into the value (through properties, items, ...) never ends")
    return None


_MISSING = object()


def _resolve(schema: Any, ref: str) -> Any:
    """The value a local JSON pointer `#/...` names in `schema` (`_MISSING` if none)."""
    target = schema
    for token in unquote(ref[1:]).split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and token in target:
            target = target[token]
        elif isinstance(target, list) and token.isdigit() and int(token) < len(target):
            target = target[int(token)]
        else:
            return _MISSING
    return target


def _kind(value: Any) -> str:
    return {str: "a string", int: "a number", float: "a number", list: "an array"}.get(
        type(value), "null")


def _cycle(edges: dict[int, list[int]]) -> list[int] | None:
    """A cycle in the graph `edges` as its nodes, the first repeated at the end; None if none."""
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    for start in edges:
        if start in state:
            continue
        path, iterators = [start], [iter(edges[start])]
        state[start] = 1
        while path:
            following = next(iterators[-1], None)
            if following is None:
                state[path.pop()] = 2
                iterators.pop()
            elif state.get(following) == 1:
                return [*path[path.index(following):], following]
            elif following not in state and following in edges:
                state[following] = 1
                path.append(following)
                iterators.append(iter(edges[following]))
    return None


class JsonConstraint:
    """Tracks one generation against a JSON schema (`param` names the schema in errors)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, schema: dict[str, Any],
                 vocab_size: int, param: str = "response_format"):
        self.matcher = llguidance.LLMatcher(tokenizer, schema_grammar(schema, param), log_level=0)
        if self.matcher.is_error():
            raise RequestError(f"{param} is not a usable JSON schema: "
                               f"{self.matcher.get_error()}", param=param)
        self.vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """Boolean mask over the vocabulary of the tokens that may come next."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        return ((words[:, None] >> BITS) & 1).bool().flatten()[:self.vocab_size]

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        mask = self.allowed()
        out = torch.full_like(logits, float("-inf"))
        count = min(mask.numel(), logits.numel())
        out[:count] = torch.where(mask[:count], logits[:count], out[:count])
        return out

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RequestError(f"token {token} broke the JSON grammar: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The output is complete: nothing but end-of-sequence may follow."""
        return self.matcher.is_stopped()
