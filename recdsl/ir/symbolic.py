"""The elementwise vocabulary of the language as sympy functions.

exp, log, sqrt, tanh, abs, cos, sin, max and min are sympy's own. sigmoid, logsigmoid, softplus, silu,
relu and rsqrt are small Function classes: sympy would otherwise expand them into forms that
overflow when printed (``log(1 + exp(x))`` at x = 100). Each class states its defining
expression (``definition``) and its derivative written in the same stable vocabulary
(``fdiff``); tests check every ``fdiff`` against ``sympy.diff`` of the definition, so the
derivative's truth still comes from sympy.
"""
from __future__ import annotations

import sympy
from sympy import Function


class _Stable(Function):
    """An elementwise function with a stable printed form and a checked derivative."""

    nargs = 1

    @classmethod
    def definition(cls, x):
        raise NotImplementedError

    @classmethod
    def eval(cls, x):
        if x.is_Number:  # fold constants, as sympy does for exp(2.0)
            return cls.definition(x).evalf()
        return None


class sigmoid(_Stable):
    @classmethod
    def definition(cls, x):
        return 1 / (1 + sympy.exp(-x))

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)


class logsigmoid(_Stable):
    @classmethod
    def definition(cls, x):
        return -sympy.log(1 + sympy.exp(-x))

    def fdiff(self, argindex=1):
        return 1 - sigmoid(self.args[0])


class softplus(_Stable):
    @classmethod
    def definition(cls, x):
        return sympy.log(1 + sympy.exp(x))

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])


class silu(_Stable):
    @classmethod
    def definition(cls, x):
        return x / (1 + sympy.exp(-x))

    def fdiff(self, argindex=1):
        x = self.args[0]
        s = sigmoid(x)
        return s * (1 + x * (1 - s))


class rsqrt(_Stable):
    @classmethod
    def definition(cls, x):
        return 1 / sympy.sqrt(x)

    def fdiff(self, argindex=1):
        return -rsqrt(self.args[0]) / (2 * self.args[0])


class relu(_Stable):
    @classmethod
    def definition(cls, x):
        return sympy.Max(x, 0)

    def fdiff(self, argindex=1):
        return sympy.Heaviside(self.args[0], 0)


STABLE = (sigmoid, logsigmoid, softplus, silu, rsqrt, relu)

# Language name -> sympy callable.
FUNCTIONS = {
    "exp": sympy.exp, "log": sympy.log, "sqrt": sympy.sqrt, "abs": sympy.Abs, "tanh": sympy.tanh,
    "sigmoid": sigmoid, "logsigmoid": logsigmoid, "softplus": softplus, "silu": silu,
    "rsqrt": rsqrt, "relu": relu, "max": sympy.Max, "min": sympy.Min, "cos": sympy.cos,
    "sin": sympy.sin,
}


def symbol(name: str) -> sympy.Symbol:
    """Every per-token value is real; sympy then simplifies abs' derivative to sign(x)."""
    return sympy.Symbol(name, real=True)


def dim_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(f"dim_{name}", positive=True, integer=True)
