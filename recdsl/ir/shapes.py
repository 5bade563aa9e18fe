"""Symbolic shapes. A shape is a tuple of dim names: () a scalar, ("K",) a vector, ("K", "V")
a matrix. Dims are symbols: K and V never match, whatever sizes are passed later.
``Diag("K")`` is the type of ``diag(x)``, which may only stand as a factor of ``@``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Diag:
    dim: str


Shape = Union[tuple, Diag]

SCALAR: tuple = ()


def show(shape: Shape) -> str:
    if isinstance(shape, Diag):
        return f"diag[{shape.dim}]"
    if shape == ():
        return "a scalar"
    return "[" + ", ".join(shape) + "]"


def elementwise(a: tuple, b: tuple):
    """The shape of ``a op b`` for an elementwise op, or None if they do not broadcast."""
    if a == b or b == ():
        return a
    if a == ():
        return b
    return None


def matmul(a: Shape, b: Shape):
    """The shape of ``a @ b`` (numpy's rules, plus diag factors), or None if they do not fit."""
    if isinstance(a, Diag) and isinstance(b, Diag):
        return None
    if isinstance(a, Diag):
        return b if len(b) in (1, 2) and b[0] == a.dim else None
    if isinstance(b, Diag):
        return a if len(a) in (1, 2) and a[-1] == b.dim else None
    if len(a) == 0 or len(b) == 0:
        return None
    inner_b = b[0]
    if a[-1] != inner_b:
        return None
    return a[:-1] + b[1:]
