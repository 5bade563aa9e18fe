"""The syntax tree of a rule file. Every node knows where it came from (1-based line, column).

The checker (``recdsl.ir.checker``) fills in ``shape`` on expressions and ``kind`` on names;
the parser leaves them empty.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class Pos:
    line: int
    column: int
    length: int = 1  # how many characters the caret should cover


# ---------------------------------------------------------------- expressions

@dataclass
class Num:
    value: float
    text: str
    pos: Pos
    shape: Optional[tuple] = None


@dataclass
class Name:
    id: str
    pos: Pos
    shape: Optional[tuple] = None
    kind: Optional[str] = None  # dim, const, state, input, param, let, output, loop


@dataclass
class Index:
    """``k[j]``: the j-th slice of an input declared ``k[NH, ...]``, inside ``for j in NH``."""
    target: Name
    index: Name
    pos: Pos
    shape: Optional[tuple] = None


@dataclass
class Call:
    fn: str
    args: list
    pos: Pos
    shape: Optional[tuple] = None


@dataclass
class BinOp:
    op: str  # + - * / @ **
    left: "Expr"
    right: "Expr"
    pos: Pos  # position of the operator
    start: Pos  # the whole expression, from its left operand on
    shape: Optional[tuple] = None


@dataclass
class Neg:
    operand: "Expr"
    pos: Pos
    shape: Optional[tuple] = None


Expr = Union[Num, Name, Index, Call, BinOp, Neg]


def expr_span(e: Expr) -> Pos:
    """Where a whole expression stands in the text (binary operators store their operator)."""
    return e.start if isinstance(e, BinOp) else e.pos


# ---------------------------------------------------------------- declarations

@dataclass
class VarDecl:
    name: str
    dims: list  # names of dims, possibly empty (a scalar)
    pos: Pos
    dim_pos: list = field(default_factory=list)


@dataclass
class DimsDecl:
    names: list
    positions: list
    pos: Pos


@dataclass
class VarsDecl:
    kind: str  # state, input, param
    vars: list
    pos: Pos


@dataclass
class ConstDecl:
    name: str
    value: float
    text: str
    pos: Pos
    value_pos: Pos


# ---------------------------------------------------------------- statements

@dataclass
class Let:
    name: str
    value: Expr
    pos: Pos


@dataclass
class Update:
    state: str
    value: Expr
    pos: Pos


@dataclass
class Output:
    name: str
    value: Expr
    pos: Pos
    name_pos: Optional[Pos] = None


@dataclass
class For:
    var: str
    dim: str
    body: list
    pos: Pos
    var_pos: Optional[Pos] = None
    dim_pos: Optional[Pos] = None


@dataclass
class RuleFile:
    name: str
    name_pos: Pos
    items: list  # declarations and statements in source order
    source: str
    filename: str


# ---------------------------------------------------------------- traversal

def walk(e: Expr):
    """An expression and all its subexpressions, parents first (an index's target and index
    are not visited separately: ``k[j]`` is one node)."""
    yield e
    if isinstance(e, BinOp):
        yield from walk(e.left)
        yield from walk(e.right)
    elif isinstance(e, Neg):
        yield from walk(e.operand)
    elif isinstance(e, Call):
        for a in e.args:
            yield from walk(a)


def walk_statements(body: list):
    """Every statement of a body, ``for`` blocks included and then their bodies, in order."""
    for st in body:
        yield st
        if isinstance(st, For):
            yield from walk_statements(st.body)


def walk_body_expressions(body: list):
    """Every expression node in the statements of a body (nested blocks included)."""
    for st in walk_statements(body):
        if not isinstance(st, For):
            yield from walk(st.value)
