"""The built-in functions of the language: their arity and how they map argument shapes to a
result shape. Every later stage (naive loop, sympy math, printers) keys on these names."""
from __future__ import annotations

from .shapes import Diag

# Elementwise functions of one argument: any shape in, the same shape out.
UNARY = ("exp", "log", "sqrt", "rsqrt", "abs", "tanh", "sigmoid", "logsigmoid", "softplus",
         "silu", "relu", "cos", "sin")
# Elementwise functions of two arguments (scalars broadcast).
BINARY = ("max", "min")
# Functions over a whole vector.
VECTOR = ("dot", "sum", "norm", "l2norm", "outer", "diag", "softmax", "keep_topk")

ALL = UNARY + BINARY + VECTOR

ARITY = {**{f: 1 for f in UNARY}, **{f: 2 for f in BINARY}, "dot": 2, "sum": 1, "norm": 1,
         "l2norm": 1, "outer": 2, "diag": 1, "softmax": 1, "keep_topk": 2}

# The epsilon inside l2norm: x / sqrt(sum(x^2) + L2NORM_EPS). A zero vector maps to zero.
L2NORM_EPS = 1e-6


def result_shape(fn: str, shapes: list):
    """The result shape of ``fn(*args)`` given the argument shapes, or an error message.

    Returns ``(shape, None)`` or ``(None, (message, hint, argument_index))``.
    """
    def vector(i):
        s = shapes[i]
        return not isinstance(s, Diag) and len(s) == 1

    if fn in UNARY:
        return shapes[0], None
    if fn in BINARY:
        from .shapes import elementwise
        out = elementwise(shapes[0], shapes[1])
        if out is None:
            return None, (f"{fn}() needs arguments of the same shape or a scalar", "", 1)
        return out, None
    if fn in ("l2norm", "softmax", "norm", "diag", "sum"):
        if fn == "sum" and not isinstance(shapes[0], Diag) and len(shapes[0]) >= 1:
            return (), None
        if not vector(0):
            return None, (f"{fn}() takes a vector", "", 0)
        if fn == "norm":
            return (), None
        if fn == "diag":
            return Diag(shapes[0][0]), None
        return shapes[0], None
    if fn == "dot":
        if not (vector(0) and vector(1)):
            return None, ("dot() takes two vectors", "", 0 if not vector(0) else 1)
        if shapes[0] != shapes[1]:
            return None, ("dot() needs two vectors of the same dim", "", 1)
        return (), None
    if fn == "outer":
        if not (vector(0) and vector(1)):
            return None, ("outer() takes two vectors", "write outer(x, y) with x and y vectors", 0 if not vector(0) else 1)
        return (shapes[0][0], shapes[1][0]), None
    if fn == "keep_topk":
        if not vector(0):
            return None, ("keep_topk() takes a vector as its first argument", "", 0)
        return shapes[0], None
    raise AssertionError(fn)
