"""Small helpers shared by the tests: random tensors laid out for a rule, forward plus
backward with random upstream gradients, and error measures."""
from __future__ import annotations

from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def layout_shape(var, *, batch, time, heads, sizes) -> list:
    """The call-time shape of a declared input, param or state (see the call contract)."""
    lead = {"input": [batch, time, heads], "param": [heads], "state": [batch, heads]}[var.kind]
    return lead + [sizes[d] for d in var.dims]


def random_args(rule, *, batch, time, heads, sizes, dtype=torch.float64, seed=0,
                initial_state=False, sequences=None, state_dtype=None, shape_values=None):
    """Standard-normal tensors for every input and param of ``rule`` (and its states when
    ``initial_state``; ``sequences`` rows, default ``batch``), returned as ``(inputs, params, states)`` dicts in declaration order.

    ``shape_values`` maps a name to a function applied to its raw normal tensor, to move it
    into the range the rule expects (e.g. a log-decay <= 0)."""
    gen = torch.Generator().manual_seed(seed)
    shape_values = shape_values or {}

    def make(var, dt, batch_rows):
        raw = torch.randn(layout_shape(var, batch=batch_rows, time=time, heads=heads, sizes=sizes),
                          generator=gen, dtype=torch.float64)
        return shape_values.get(var.name, lambda x: x)(raw).to(dt)

    inputs = {v.name: make(v, dtype, batch) for v in rule.inputs}
    params = {v.name: make(v, dtype, batch) for v in rule.params}
    states = {}
    if initial_state:
        states = {v.name: make(v, state_dtype or dtype, sequences or batch) for v in rule.states}
    return inputs, params, states


def forward_backward(fn, leaves: dict, seed=1):
    """Run ``fn(**leaves) -> list of tensors`` and backpropagate random upstream gradients
    (the same for equal shapes and seed). Returns ``(results, grads)``: the detached results
    and a dict leaf name -> gradient (None when the leaf does not reach the results)."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in leaves.items()}
    results = fn(**leaves)
    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(r.shape, generator=gen, dtype=torch.float64).to(r.dtype) for r in results]
    loss = sum((r * u).sum() for r, u in zip(results, upstream))
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return [r.detach() for r in results], dict(zip(leaves, grads))


def max_abs_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def as_list(x) -> list:
    """A rule's output or final-state return value as a list (a tensor or a tuple)."""
    if x is None:
        return []
    return list(x) if isinstance(x, tuple) else [x]
