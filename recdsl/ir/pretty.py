"""Syntax tree -> rule text: expressions with as few parentheses as the grammar allows.

Used wherever a statement is shown back to the user (``recdsl check``, error reports), so the
text must re-parse to the same tree. Precedence, loosest first, as in ``grammar/rec.lark``:

    + -        left-associative
    * / @      left-associative
    -x         unary minus
    **         right-associative; its left operand must be an atom, its right may be -x
"""
from __future__ import annotations

from ..grammar import ast
from .shapes import Diag

_SUM, _PRODUCT, _UNARY, _POWER, _ATOM = range(5)
_LEVEL = {"+": _SUM, "-": _SUM, "*": _PRODUCT, "/": _PRODUCT, "@": _PRODUCT, "**": _POWER}


def _level(e) -> int:
    if isinstance(e, ast.BinOp):
        return _LEVEL[e.op]
    if isinstance(e, ast.Neg):
        return _UNARY
    if isinstance(e, ast.Num) and e.text.startswith("-"):
        return _UNARY  # only a hand-built tree has a negative literal; it prints like -x
    return _ATOM


def _wrap(e, tightest_allowed: int) -> str:
    """``e``'s text, parenthesised when it binds more loosely than ``tightest_allowed``."""
    text = unparse(e)
    return f"({text})" if _level(e) < tightest_allowed else text


def unparse(e) -> str:
    """The text of an expression, with only the parentheses its structure needs."""
    if isinstance(e, ast.Num):
        return e.text or f"{e.value:g}"
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Index):
        return f"{e.target.id}[{e.index.id}]"
    if isinstance(e, ast.Call):
        return f"{e.fn}({', '.join(unparse(a) for a in e.args)})"
    if isinstance(e, ast.Neg):
        operand = _wrap(e.operand, _UNARY)
        # "- -x", not "--x": the same tree, and it does not read as a typo
        return f"- {operand}" if operand.startswith("-") else f"-{operand}"
    if isinstance(e, ast.BinOp):
        level = _LEVEL[e.op]
        if e.op == "**":
            # a ** b ** c is a ** (b ** c); the base must be an atom, the exponent may be -x
            return f"{_wrap(e.left, _ATOM)} ** {_wrap(e.right, _UNARY)}"
        # left-associative: an equal-level right operand needs parentheses (a - (b - c))
        return f"{_wrap(e.left, level)} {e.op} {_wrap(e.right, level + 1)}"
    raise TypeError(f"not an expression node: {type(e).__name__}")


def describe(stmt) -> str:
    """One line of text for a statement; a ``for`` gives its header line only (see ``lines``)."""
    if isinstance(stmt, ast.Let):
        return f"let {stmt.name} = {unparse(stmt.value)}"
    if isinstance(stmt, ast.Update):
        return f"{stmt.state} = {unparse(stmt.value)}"
    if isinstance(stmt, ast.Output):
        return f"output {stmt.name} = {unparse(stmt.value)}"
    if isinstance(stmt, ast.For):
        return f"for {stmt.var} in {stmt.dim}:"
    raise TypeError(f"not a statement node: {type(stmt).__name__}")


def lines(body, depth: int = 0):
    """Walk statements in source order, ``for`` bodies included: yields ``(depth, stmt)``."""
    for stmt in body:
        yield depth, stmt
        if isinstance(stmt, ast.For):
            yield from lines(stmt.body, depth + 1)


def unparse_body(body, indent: str = "    ") -> str:
    """The text of a list of statements, ``for`` bodies indented."""
    return "\n".join(indent * depth + describe(stmt) for depth, stmt in lines(body))


def shape_text(shape) -> str:
    """A checked shape: ``[K, V]``, ``scalar``, ``diag[K]``."""
    if isinstance(shape, Diag):
        return f"diag[{shape.dim}]"
    if shape == ():
        return "scalar"
    return "[" + ", ".join(shape) + "]"


def _declared(var) -> str:
    return var.name + (f"[{', '.join(var.dims)}]" if var.dims else "")


def summary(rule) -> str:
    """One screen about a checked rule: its declarations, then each statement per token with
    its line number and the shape of its value."""
    def listing(values):
        return ", ".join(values) or "none"

    head = [
        f"rule {rule.name} ({rule.filename})",
        f"  dims     {listing(rule.dims)}",
        f"  states   {listing(_declared(v) for v in rule.states)}",
        f"  inputs   {listing(_declared(v) for v in rule.inputs)}",
        f"  params   {listing(_declared(v) for v in rule.params)}",
        f"  consts   {listing(f'{k} = {v:g}' for k, v in rule.consts.items())}",
        f"  outputs  {listing(_declared(v) for v in rule.outputs)}",
        "  per token:",
    ]
    rows = [(stmt.pos.line, "    " * depth + describe(stmt),
             "" if isinstance(stmt, ast.For) else shape_text(stmt.value.shape))
            for depth, stmt in lines(rule.body)]
    width = max(len(text) for _, text, _ in rows)
    body = [f"  {line:4d}  {text:<{width}}  {shape}".rstrip() for line, text, shape in rows]
    return "\n".join(head + body)
