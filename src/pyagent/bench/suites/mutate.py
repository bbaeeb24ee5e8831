"""Small, realistic bugs made in correct code: AST mutation operators.

An operator looks at one function and proposes `Change`s: a node of its body and the source text
that replaces it. `mutants` applies each change to the source text (everything else stays byte for
byte as it was), checks that the result parses to exactly the intended tree, and yields it as a
`Mutant` with its operator, line and a description ("`<` became `<=` on line 7").

Operators (`OPERATORS`, by name):
- operator: an arithmetic, comparison or boolean operator swapped (`+`/`-`, `*`/`/`, `//`/`%`,
  `<`/`<=`, `>`/`>=`, `==`/`!=`, `and`/`or`), also in augmented assignments.
- off_by_one: an integer constant one more or one less; a `range` bound, an index or a slice
  bound with `+ 1` or `- 1` added.
- condition: the test of an `if`, `while`, conditional expression or comprehension filter
  inverted (a single comparison negated, `not` added or removed).
- variable: a name the function reads replaced by another of its parameters or local variables
  (one bound on an earlier line).
- call: a wrapping call dropped (`sorted(x)` -> `x`, `s.lower()` -> `s`) or a method call
  statement removed (`result.append(x)`).
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from pyagent.errors import ConfigError


@dataclass(frozen=True)
class Change:
    """A proposed bug: `node` (an expression, or a statement) becomes `text` ("" removes the
    statement); `old` and `new` are what the description quotes."""

    node: ast.AST
    text: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutant:
    """A mutated source with the operator that made it, the line it changed and what changed."""

    source: str
    operator: str
    line: int
    description: str


class Code:
    """A source text with the spans of its nodes (ast offsets count UTF-8 bytes)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.data = source.encode()
        self.starts = [0]
        for line in self.data.splitlines(keepends=True):
            self.starts.append(self.starts[-1] + len(line))

    def start(self, node: ast.AST) -> int:
        return self.starts[node.lineno - 1] + node.col_offset  # type: ignore[attr-defined]

    def end(self, node: ast.AST) -> int:
        return self.starts[node.end_lineno - 1] + node.end_col_offset  # type: ignore[attr-defined]

    def text(self, start: int, end: int) -> str:
        return self.data[start:end].decode()

    def segment(self, node: ast.AST) -> str:
        return self.text(self.start(node), self.end(node))

    def operand(self, node: ast.AST) -> str:
        """The node's text, in parentheses unless it is atomic."""
        atomic = (ast.Name, ast.Constant, ast.Attribute, ast.Subscript, ast.Call)
        text = self.segment(node)
        return text if isinstance(node, atomic) else f"({text})"

    def swap_operators(self, node: ast.AST, gaps: Sequence[tuple[ast.AST, ast.AST]],
                       old: str, new: str) -> str:
        """The node's text with the operator `old` in the gaps between the given operand pairs
        (where only it, spaces, parentheses and comments stand) replaced by `new`."""
        # a keyword matches as whole words with any spaces between ("not  in")
        pattern = (r"\b" + r"\s+".join(old.split()) + r"\b" if old[0].isalpha()
                   else re.escape(old))
        pieces, cursor = [], self.start(node)
        for left, right in gaps:
            gap = self.text(self.end(left), self.start(right))
            pieces += [self.text(cursor, self.end(left)), re.sub(pattern, new, gap, count=1)]
            cursor = self.start(right)
        pieces.append(self.text(cursor, self.end(node)))
        return "".join(pieces)

    def splice(self, node: ast.AST, text: str) -> str:
        """The source with the node's span replaced by `text`; with `text` empty, the
        statement's whole lines removed."""
        if text:
            return (self.data[:self.start(node)] + text.encode()
                    + self.data[self.end(node):]).decode()
        first = self.starts[node.lineno - 1]  # type: ignore[attr-defined]
        after = self.starts[node.end_lineno]  # type: ignore[attr-defined]
        return (self.data[:first] + self.data[after:]).decode()


SYMBOLS: dict[type, str] = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
    ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
    ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not",
    ast.And: "and", ast.Or: "or"}
SWAPS: dict[type, type] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mod, ast.Mod: ast.FloorDiv, ast.Lt: ast.LtE, ast.LtE: ast.Lt,
    ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.And: ast.Or, ast.Or: ast.And}
NEGATIONS: dict[type, type] = {
    ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot,
    ast.IsNot: ast.Is}
WRAPPERS = frozenset({"abs", "bool", "float", "int", "list", "max", "min", "reversed", "round",
                      "set", "sorted", "str", "sum", "tuple"})
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)

Operator = Callable[[Code, ast.FunctionDef], Iterator[Change]]
OPERATORS: dict[str, Operator] = {}


def operator(name: str) -> Callable[[Operator], Operator]:
    """Register a mutation operator under `name`."""
    def register(function: Operator) -> Operator:
        OPERATORS[name] = function
        return function
    return register


def body_nodes(function: ast.FunctionDef, nested: bool = True) -> Iterator[ast.AST]:
    """The nodes of the function's body in a fixed order, its docstring left out; with `nested`
    False, nested functions, lambdas and classes are not entered."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    stack: list[ast.AST] = list(reversed(body))
    while stack:
        node = stack.pop()
        yield node
        if nested or not isinstance(node, SCOPES):
            stack.extend(reversed(list(ast.iter_child_nodes(node))))


def _swap(code: Code, node: ast.AST, gaps: Sequence[tuple[ast.AST, ast.AST]], op: ast.AST,
          table: dict[type, type], suffix: str = "") -> Iterator[Change]:
    if type(op) in table:
        old, new = SYMBOLS[type(op)] + suffix, SYMBOLS[table[type(op)]] + suffix
        yield Change(node, code.swap_operators(node, gaps, old, new), old, new)


@operator("operator")
def swap_operator(code: Code, function: ast.FunctionDef) -> Iterator[Change]:
    """An arithmetic, comparison or boolean operator swapped for its usual confusion."""
    for node in body_nodes(function):
        if isinstance(node, ast.BinOp):
            yield from _swap(code, node, [(node.left, node.right)], node.op, SWAPS)
        elif isinstance(node, ast.AugAssign):
            yield from _swap(code, node, [(node.target, node.value)], node.op, SWAPS, "=")
        elif isinstance(node, ast.BoolOp):
            yield from _swap(code, node, list(zip(node.values, node.values[1:], strict=False)),
                             node.op, SWAPS)
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for index, op in enumerate(node.ops):
                yield from _swap(code, node, [(operands[index], operands[index + 1])], op, SWAPS)


def _is_int(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int


def _shifted(code: Code, node: ast.AST) -> Iterator[Change]:
    """`node + 1` and `node - 1`, unless the node already adds or subtracts a constant (the
    constant's own change covers that)."""
    if _is_int(node) or (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub)
                         and _is_int(node.right)):
        return
    old = code.segment(node)
    for sign in "+-":
        new = f"{code.operand(node)} {sign} 1"
        yield Change(node, new, old, new)


def _constant(code: Code, node: ast.AST, value: int) -> Iterator[Change]:
    for new in (value + 1, value - 1):
        yield Change(node, str(new), code.segment(node), str(new))


@operator("off_by_one")
def off_by_one(code: Code, function: ast.FunctionDef) -> Iterator[Change]:
    """An integer constant, a `range` bound, an index or a slice bound one off."""
    negated: set[ast.AST] = set()  # constants under a minus sign: `-1` changes as one number
    for node in body_nodes(function):
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) \
                and _is_int(node.operand):
            negated.add(node.operand)
            yield from _constant(code, node, -node.operand.value)  # type: ignore[attr-defined]
        elif _is_int(node) and node not in negated:
            yield from _constant(code, node, node.value)  # type: ignore[attr-defined]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "range":
            for argument in node.args:
                yield from _shifted(code, argument)
        elif isinstance(node, ast.Slice):
            for bound in (node.lower, node.upper):
                if bound is not None:
                    yield from _shifted(code, bound)
        elif isinstance(node, ast.Subscript) and isinstance(
                node.slice, ast.Name | ast.BinOp | ast.UnaryOp | ast.Call):
            yield from _shifted(code, node.slice)


@operator("condition")
def invert_condition(code: Code, function: ast.FunctionDef) -> Iterator[Change]:
    """The test of an `if`, `while`, conditional expression or comprehension filter inverted."""
    for node in body_nodes(function):
        if isinstance(node, ast.If | ast.While | ast.IfExp):
            tests = [node.test]
        elif isinstance(node, ast.comprehension):
            tests = node.ifs
        else:
            continue
        for test in tests:
            old = code.segment(test)
            if isinstance(test, ast.Compare) and len(test.ops) == 1 \
                    and type(test.ops[0]) in NEGATIONS:
                op = type(test.ops[0])
                new = code.swap_operators(test, [(test.left, test.comparators[0])],
                                          SYMBOLS[op], SYMBOLS[NEGATIONS[op]])
            elif isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
                new = code.segment(test.operand)
            else:
                new = f"not {code.operand(test)}"
            yield Change(test, new, old, new)


def _locals(function: ast.FunctionDef) -> dict[str, int]:
    """The function's parameters and local variables, each with the line it is first bound."""
    arguments = function.args
    bound = {a.arg: function.lineno for a in (*arguments.posonlyargs, *arguments.args,
                                              *arguments.kwonlyargs, arguments.vararg,
                                              arguments.kwarg) if a is not None}
    comprehensions = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
    for node in body_nodes(function, nested=False):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.setdefault(node.id, node.lineno)
        elif isinstance(node, comprehensions):  # their targets live in their own scope
            for generator in node.generators:
                for name in ast.walk(generator.target):
                    if isinstance(name, ast.Name):
                        bound.setdefault(name.id, -1)
    return {name: line for name, line in bound.items() if line >= 0}


@operator("variable")
def wrong_variable(code: Code, function: ast.FunctionDef) -> Iterator[Change]:
    """A name the function reads replaced by another of its locals bound on an earlier line."""
    names = _locals(function)
    for node in body_nodes(function, nested=False):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in names:
            for other, line in sorted(names.items()):
                if other != node.id and line < node.lineno:
                    yield Change(node, other, node.id, other)


@operator("call")
def missing_call(code: Code, function: ast.FunctionDef) -> Iterator[Change]:
    """A wrapping call dropped (`sorted(x)` -> `x`, `s.lower()` -> `s`) or a method call
    statement removed."""
    for node in (function, *body_nodes(function)):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(node, ast.stmt) and isinstance(block, list) and len(block) > 1:
                for statement in block:
                    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call) \
                            and isinstance(statement.value.func, ast.Attribute) \
                            and _own_lines(code, statement):
                        yield Change(statement, "", code.segment(statement), "")
        if not isinstance(node, ast.Call) or node.keywords:
            continue
        if isinstance(node.func, ast.Name) and node.func.id in WRAPPERS and len(node.args) == 1 \
                and not isinstance(node.args[0], ast.Starred):
            argument = node.args[0]
        elif isinstance(node.func, ast.Attribute) and not node.args:
            argument = node.func.value
        else:
            continue
        yield Change(node, code.segment(argument), code.segment(node), code.segment(argument))


def _own_lines(code: Code, statement: ast.stmt) -> bool:
    """Whether nothing but the statement (and a comment) stands on its lines."""
    before = code.text(code.starts[statement.lineno - 1], code.start(statement))
    after = code.text(code.end(statement), code.starts[statement.end_lineno])  # type: ignore[index]
    return not before.strip() and (not after.strip() or after.strip().startswith("#"))


def _replaced(node: ast.AST, target: ast.AST, new: ast.AST | None) -> ast.AST | None:
    """A copy of the tree with `target` replaced by `new` (None removes a statement)."""
    if node is target:
        return new
    fields = {}
    for name, value in ast.iter_fields(node):
        if isinstance(value, list):
            items = (_replaced(v, target, new) if isinstance(v, ast.AST) else v for v in value)
            value = [v for v in items if v is not None]
        elif isinstance(value, ast.AST):
            value = _replaced(value, target, new)
        fields[name] = value
    return type(node)(**fields)


def _parsed(node: ast.AST, text: str) -> ast.AST | None:
    """What `text` means in `node`'s place, or None when it does not parse."""
    try:
        if isinstance(node, ast.expr):
            return ast.parse(f"({text})", mode="eval").body
        return ast.parse(text).body[0] if text else None
    except SyntaxError:
        return None


def _apply(code: Code, tree: ast.Module, change: Change) -> str | None:
    """The mutated source, or None when the spliced text does not mean the intended tree
    (or the change would change nothing)."""
    new = _parsed(change.node, change.text)
    if new is None and change.text:
        return None
    expected = ast.dump(_replaced(tree, change.node, new))  # type: ignore[arg-type]
    if expected == ast.dump(tree):
        return None
    for text in (change.text, f"({change.text})"):
        source = code.splice(change.node, text)
        try:
            if ast.dump(ast.parse(source)) == expected:
                return source
        except SyntaxError:
            pass
        if not change.text:
            break
    return None


def _quote(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return f"`{text if len(text) <= limit else text[:limit - 3] + '...'}`"


def describe(change: Change) -> str:
    line = change.node.lineno  # type: ignore[attr-defined]
    if not change.new:
        return f"{_quote(change.old)} removed from line {line}"
    return f"{_quote(change.old)} became {_quote(change.new)} on line {line}"


def find_function(tree: ast.Module, name: str) -> ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise ConfigError(f"no function {name!r} in the source")


def check_operators(names: Sequence[str]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in OPERATORS]
    if unknown:
        raise ConfigError(f"unknown mutation operator {unknown[0]!r}; choose from "
                          f"{', '.join(OPERATORS)}")
    return tuple(names)


def mutants(source: str, function_name: str, rng: random.Random,
            operators: Sequence[str] | None = None) -> Iterator[Mutant]:
    """Mutants of `function_name` in `source`, one change each, in an order drawn from `rng`
    (the same for the same generator state); `operators` limits them to those names."""
    code, tree = Code(source), ast.parse(source)
    function = find_function(tree, function_name)
    changes = [(name, change) for name in check_operators(operators or tuple(OPERATORS))
               for change in OPERATORS[name](code, function)]
    rng.shuffle(changes)
    seen = {source}
    for name, change in changes:
        mutated = _apply(code, tree, change)
        if mutated is not None and mutated not in seen:
            seen.add(mutated)
            yield Mutant(mutated, name, change.node.lineno,  # type: ignore[attr-defined]
                         describe(change))
