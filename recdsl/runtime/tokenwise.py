"""Per-token values for all tokens at once: the prologue of the chunkwise paths.

Expressions that read no state (gates, normalised keys, write strengths, read vectors) do not
depend on the recurrence, so they are evaluated for every token in one batched pass: time is
folded into the batch (``[B*T, H, ...]``) and the naive loop's own expression evaluator does
the work, so the chunk paths compute exactly the rule's per-token math, with autograd.

``log_decay`` returns the natural log of a decay in log space without forming the decay
first where the rule writes it as ``exp(...)``, so very negative gates stay finite.
"""
from __future__ import annotations

import math

import torch

from ..codegen.naive import NaiveStep
from ..grammar import ast
from ..ir.checked import CheckedRule


class Tokenwise:
    """Evaluates state-free per-token expressions of ``rule`` for a bound call.

    Values come back as ``[B, T, H, *shape]`` in ``dtype`` (default: the call's compute dtype).
    Inside ``for j in NH`` blocks pass ``loop={"j": index}``.
    """

    def __init__(self, rule: CheckedRule, call, dtype=None):
        self.rule = rule
        self.call = call
        self.dtype = dtype or call.compute_dtype
        B, T = call.batch, call.time
        self.shape_bt = (B, T)
        flat = lambda t: t.to(self.dtype).reshape(B * T, *t.shape[2:])
        self.token = {v.name: flat(call.tensors[v.name]) for v in rule.inputs}
        self.params = {p.name: call.tensors[p.name].to(self.dtype).unsqueeze(0).expand(B * T, *call.tensors[p.name].shape)
                       for p in rule.params}
        self.step = NaiveStep(rule, call.dim_sizes, self.dtype, call.device)
        self.lets = {}  # (name, loop index or None) -> expression, state-free lets only
        self._collect(rule.body, None)
        self.cache = {}

    def _collect(self, body, loop):
        for st in body:
            if isinstance(st, ast.Let):
                self.lets[(st.name, loop)] = st.value
            elif isinstance(st, ast.For):
                self._collect(st.body, st.var)

    def _env(self, loop: dict | None):
        """Lets as lazily evaluated values (only those reached are computed)."""
        outer = self

        class _Lazy(dict):
            def __missing__(self, name):
                if loop and name in loop:
                    return loop[name]
                key = (name, next(iter(loop)) if loop and (name, next(iter(loop))) in outer.lets else None)
                if key not in outer.lets:
                    raise KeyError(name)
                value = outer._eval(outer.lets[key], loop)
                self[name] = value
                return value

        return _Lazy()

    def _eval(self, expr, loop=None):
        env = self._env(loop)
        return self.step.expr(expr, env, self.token, self.params, _NoStates())

    def value(self, expr, loop: dict | None = None) -> torch.Tensor:
        """``expr`` for every token, ``[B, T, H, *shape]`` (a constant is broadcast)."""
        v = self._eval(expr, loop)
        B, T = self.shape_bt
        H = self.call.heads
        if v.dim() < 2:
            v = v.expand(B * T, H)
        return v.reshape(B, T, *v.shape[1:])

    def log_decay(self, expr, loop: dict | None = None) -> torch.Tensor:
        """log(expr) for every token, evaluated in log space where the rule allows it."""
        v = self._log(expr, loop)
        B, T = self.shape_bt
        if v.dim() < 2:
            v = v.expand(B * T, self.call.heads)
        return v.reshape(B, T, *v.shape[1:])

    def _log(self, e, loop):
        if isinstance(e, ast.Call) and e.fn == "exp":
            return self._eval(e.args[0], loop)
        if isinstance(e, ast.Name) and e.kind == "let":
            key = (e.id, next(iter(loop)) if loop else None)
            if key not in self.lets:
                key = (e.id, None)
            return self._log(self.lets[key], loop)
        if isinstance(e, ast.Num):
            return torch.tensor(math.log(e.value) if e.value > 0 else -math.inf, dtype=self.dtype,
                                device=self.call.device)
        if isinstance(e, ast.BinOp) and e.op in "*/" and len(e.shape) <= 1:
            a, b = self._log(e.left, loop), self._log(e.right, loop)
            a, b = _lift(a, e.shape), _lift(b, e.shape)
            return a + b if e.op == "*" else a - b
        return torch.log(self._eval(e, loop))


def _lift(x, shape):
    """A log value of a scalar operand next to a vector one: add the vector axis."""
    if x.dim() >= 2 and len(shape) == 1 and x.dim() == 2:
        return x.unsqueeze(-1)
    return x


class _NoStates(dict):
    def __missing__(self, name):
        raise ValueError(f"state {name} read in a per-token expression")
