"""Reverse mode for one token: the adjoint program of an ``ssa.Program``.

Given upstream gradients of the token's outputs and of its final states, the adjoint program
computes the gradients of its inputs, params and the states it started from. It is itself an
``ssa.Program`` (the same few operations), so every printer that emits the forward emits the
backward too. Elementwise derivatives come from ``sympy.diff``; the derivatives of one
elementwise op with respect to all its operands share subexpressions through one multi-output
op (the printers run ``sympy.cse`` over it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

import sympy

from . import ssa
from .ssa import Elementwise, Leaf, MatMul, Program, Reduce, Source, TopkMask, Val
from .symbolic import symbol


@dataclass
class Adjoint:
    """The forward ops of a token followed by its reverse-mode ops.

    ``program.ops`` = forward ops, then the adjoint ops. Seeds (``Source`` ops of kind
    ``grad_output`` / ``grad_state``) are in ``grad_outputs`` / ``grad_states_out``; results
    in ``grad_inputs`` ((name, index) -> Val), ``grad_params`` and ``grad_states_in``
    (None where no gradient reaches).
    """
    program: Program
    forward_ops: int  # how many of program.ops are the forward pass
    grad_outputs: dict = field(default_factory=dict)
    grad_states_out: dict = field(default_factory=dict)
    grad_inputs: dict = field(default_factory=dict)
    grad_params: dict = field(default_factory=dict)
    grad_states_in: dict = field(default_factory=dict)


class _Builder:
    def __init__(self, forward: Program):
        self.forward = forward
        self.ops = list(forward.ops)
        self.ids = count()
        self.pending = {}  # Val -> list of gradient contributions (Vals of the same shape)

    def val(self, hint, shape):
        return Val(f"{hint}_{next(self.ids)}", tuple(shape))

    def add(self, target: Val, grad: Val):
        self.pending.setdefault(target, []).append(grad)

    def total(self, target: Val):
        """The gradient of ``target``: the sum of its contributions (None when none)."""
        parts = self.pending.pop(target, [])
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        full = tuple(range(len(target.shape)))
        syms = [symbol(f"{p.id}") for p in parts]
        out = self.val(f"d_{target.id}", target.shape)
        self.ops.append(Elementwise([out], [sympy.Add(*syms)],
                                    [Leaf(p, full, s) for p, s in zip(parts, syms)], target.shape))
        return out

    def seed(self, kind, name, like: Val):
        out = Val(f"d{'o' if kind == 'grad_output' else 's'}_{name}", like.shape)
        self.ops.append(Source(out, kind, name))
        self.add(like, out)
        return out

    # one rule per op
    def elementwise(self, op: Elementwise):
        grads = [(out, expr, self.total(out)) for out, expr in zip(op.outs, op.exprs)]
        grads = [(out, expr, g) for out, expr, g in grads if g is not None]
        if not grads:
            return
        full = tuple(range(len(op.shape)))
        seeds = [(symbol(f"{g.id}"), g) for _, _, g in grads]
        leaves = list(op.leaves) + [Leaf(g, full, s) for s, g in seeds]
        outs, exprs, targets = [], [], []
        for leaf in op.leaves:
            expr = sympy.Add(*[s * sympy.diff(e, leaf.sym) for (s, _), (_, e, _) in zip(seeds, grads)])
            if expr == 0:
                continue
            outs.append(self.val(f"g_{leaf.val.id}", op.shape))
            exprs.append(expr)
            targets.append(leaf)
        if not outs:
            return
        self.ops.append(Elementwise(outs, exprs, leaves, op.shape))
        for out, leaf in zip(outs, targets):
            if leaf.axes != full:  # the operand was broadcast: sum over the axes it did not span
                reduced = self.val(f"g_{leaf.val.id}", leaf.val.shape)
                self.ops.append(Reduce(reduced, out, leaf.axes))
                out = reduced
            self.add(leaf.val, out)

    def reduce(self, op: Reduce):
        g = self.total(op.out)
        if g is None or op.kind == "max":  # a max only shifts a softmax: no gradient through it
            return
        sym = symbol(g.id)
        out = self.val(f"g_{op.arg.id}", op.arg.shape)
        self.ops.append(Elementwise([out], [sym], [Leaf(g, op.keep, sym)], op.arg.shape))
        self.add(op.arg, out)

    def matmul(self, op: MatMul):
        g = self.total(op.out)
        if g is None:
            return
        assert not (op.ta or op.tb), "forward matrix products are never transposed"
        ga = self.val(f"g_{op.a.id}", op.a.shape)
        gb = self.val(f"g_{op.b.id}", op.b.shape)
        self.ops.append(MatMul(ga, g, op.b, tb=True))  # dA = dC @ Bᵀ
        self.ops.append(MatMul(gb, op.a, g, ta=True))  # dB = Aᵀ @ dC
        self.add(op.a, ga)
        self.add(op.b, gb)


def adjoint(forward: Program) -> Adjoint:
    """The adjoint program: every output and final state gets an upstream-gradient seed."""
    b = _Builder(forward)
    result = Adjoint(Program(b.ops, dict(forward.inputs), dict(forward.params),
                             dict(forward.states_in), dict(forward.states_out),
                             dict(forward.outputs), forward.dims), len(forward.ops))
    for name, val in forward.outputs.items():
        result.grad_outputs[name] = b.seed("grad_output", name, val)
    for name, val in forward.states_out.items():
        result.grad_states_out[name] = b.seed("grad_state", name, val)
    for op in reversed(forward.ops):
        if isinstance(op, Elementwise):
            b.elementwise(op)
        elif isinstance(op, Reduce):
            b.reduce(op)
        elif isinstance(op, MatMul):
            b.matmul(op)
        elif isinstance(op, TopkMask):
            b.pending.pop(op.out, None)  # a mask is a constant of the token: no gradient
        elif isinstance(op, Source):
            grad = b.total(op.out)
            if op.kind == "input":
                result.grad_inputs[(op.name, op.index)] = grad
            elif op.kind == "param":
                result.grad_params[op.name] = grad
            elif op.kind == "state":
                result.grad_states_in[op.name] = grad
    result.program.ops = b.ops
    return result
