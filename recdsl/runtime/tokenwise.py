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

    A let name may be bound again in a later ``for`` block, so names are resolved as the
    checker did, lexically: every let reference (an ``ast.Name`` node of the rule) to the
    ``let`` statement it sees. An expression is evaluated in the innermost block of the lets
    it refers to, where every name means what it meant in the rule.
    """

    def __init__(self, rule: CheckedRule, call, dtype=None, keep_lets=False,
                 broadcast_params=False):
        self.rule = rule
        self.call = call
        self.dtype = dtype or call.compute_dtype
        B, T = call.batch, call.time
        self.shape_bt = (B, T)
        flat = lambda t: t.to(self.dtype).reshape(B * T, *t.shape[2:])
        self.token = {v.name: flat(call.tensors[v.name]) for v in rule.inputs}
        # params [1, H, ...] broadcast in every op, so that a value of params alone
        # (exp(A_log)) is computed once, not once per token; else expanded to [B*T, H, ...]
        lead = 1 if broadcast_params else B * T
        self.params = {p.name: call.tensors[p.name].to(self.dtype).unsqueeze(0).expand(
            lead, *call.tensors[p.name].shape) for p in rule.params}
        self.kept = {} if keep_lets else None  # loop index -> environment, when lets are kept
        self.step = NaiveStep(rule, call.dim_sizes, self.dtype, call.device)
        self.bound = {}  # names visible everywhere (a subclass's chained values), [B*T, H, ...]
        self.scopes = {}  # block (None: the body, else id of its For) -> {name: Let}
        self.depth = {None: 0}
        self.home = {}  # id(Let) -> its block
        self.refers = {}  # id(Name node) -> the Let it refers to
        self._collect(rule.body, None, {})

    def _collect(self, body, block, visible):
        scope = self.scopes[block] = dict(visible)
        for st in body:
            if isinstance(st, ast.For):
                self.depth[id(st)] = self.depth[block] + 1
                self._collect(st.body, id(st), scope)
                continue
            for e in ast.walk(st.value):
                if isinstance(e, ast.Name) and e.kind == "let" and e.id in scope:
                    self.refers[id(e)] = scope[e.id]
            if isinstance(st, ast.Let):
                scope[st.name] = st
                self.home[id(st)] = block

    def _let(self, name: ast.Name) -> ast.Let:
        """The let a name node refers to (a node built outside the rule: its only binding)."""
        if id(name) in self.refers:
            return self.refers[id(name)]
        found = [st for st in ast.walk_statements(self.rule.body)
                 if isinstance(st, ast.Let) and st.name == name.id]
        if len(found) != 1:
            raise KeyError(name.id)
        return found[0]

    def _block(self, expr):
        """The innermost block of the lets ``expr`` refers to (None: the rule's body)."""
        block = None
        for e in ast.walk(expr):
            if isinstance(e, ast.Name) and e.kind == "let" and e.id not in self.bound:
                home = self.home[id(self._let(e))]
                if self.depth[home] > self.depth[block]:
                    block = home
        return block

    def _envs(self, loop: dict | None) -> dict:
        """The environments of one evaluation by block; with ``keep_lets`` those of every
        evaluation at this loop index, so that a state-free let (a gate, Raven's routing, a
        topk over all tokens) is computed once for every expression that uses it."""
        if self.kept is None:
            return {}
        return self.kept.setdefault(tuple(sorted((loop or {}).items())), {})

    def forget_lets(self):
        if self.kept is not None:
            self.kept.clear()

    def _env(self, block, loop: dict | None, envs: dict):
        """The lets visible in ``block`` as lazily evaluated values (only those reached are
        computed), each evaluated in its own block's environment."""
        if block in envs:
            return envs[block]
        outer = self
        scope = self.scopes[block]

        class _Lazy(dict):
            def __missing__(self, name):
                if name in outer.bound:
                    return outer.bound[name]
                if loop and name in loop:
                    return loop[name]
                if name not in scope:
                    raise KeyError(name)
                let = scope[name]
                home = outer.home[id(let)]
                if home != block:  # an enclosing block's let: computed (once) there
                    value = outer._env(home, loop, envs)[name]
                else:
                    value = outer.step.expr(let.value, self, outer.token, outer.params, _NoStates())
                self[name] = value
                return value

        envs[block] = _Lazy()
        return envs[block]

    def _eval(self, expr, loop=None):
        env = self._env(self._block(expr), loop, self._envs(loop))
        return self.step.expr(expr, env, self.token, self.params, _NoStates())

    def value(self, expr, loop: dict | None = None) -> torch.Tensor:
        """``expr`` for every token, ``[B, T, H, *shape]`` (a constant is broadcast)."""
        v = self._eval(expr, loop)
        B, T = self.shape_bt
        H = self.call.heads
        if v.dim() < 2:
            v = v.expand(B * T, H)
        elif v.shape[0] != B * T:  # a value of params alone (broadcast_params)
            v = v.expand(B * T, *v.shape[1:])
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
        if isinstance(e, ast.Name) and e.kind == "let" and e.id not in self.bound:
            return self._log(self._let(e).value, loop)
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
