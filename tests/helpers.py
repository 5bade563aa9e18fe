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


def rule_results(rule, tensors: dict, initial, backend: str, dtype, cu_seqlens=None, grads=True,
                 seed=5, **options) -> dict:
    """A rule's outputs, final states and (with ``grads``) the gradients of every input, param
    and initial state under random upstream gradients, by name ("out o", "final S", "dq",
    "dS0"), as float64. ``tensors`` and ``initial`` are cast to ``dtype`` first."""
    leaves = {k: v.to(dtype).clone().requires_grad_(grads) for k, v in tensors.items()}
    init = tuple(s.to(dtype).clone().requires_grad_(grads) for s in initial) if initial else None
    out, final = rule(**leaves, initial_state=init, output_final_state=True, backend=backend,
                      cu_seqlens=cu_seqlens, **options)
    results = as_list(out) + as_list(final)
    names = [f"out {o.name}" for o in rule.outputs] + [f"final {s.name}" for s in rule.states]
    values = {n: r.detach().double() for n, r in zip(names, results)}
    if grads:
        gen = torch.Generator().manual_seed(seed)
        upstream = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in results]
        loss = sum((r.double() * u).sum() for r, u in zip(results, upstream))
        wrt = list(leaves.values()) + list(init or ())
        got = torch.autograd.grad(loss, wrt, allow_unused=True)
        wrt_names = [f"d{k}" for k in leaves] + [f"d{s.name}0" for s in rule.states][:len(init or ())]
        for n, g, w in zip(wrt_names, got, wrt):
            values[n] = (g if g is not None else torch.zeros_like(w)).double()
    return values


def rms_ratio(x, golden) -> float:
    """RMS of the error over the RMS of the golden value."""
    return ((x.double() - golden).pow(2).mean().sqrt()
            / golden.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_matches_naive(rule, tensors: dict, initial=None, *, backend: str, cu_seqlens=None,
                         grads=True, dtype=torch.float32, floor=3e-6, **options):
    """TESTING.md's pass rule: ``backend``'s RMS error against the naive loop in float64 is at
    most 10x the naive loop's own error in ``dtype`` (2x in half precision), or ``floor``
    (relative; 2e-3 in half precision) for values the naive loop gets almost exactly."""
    golden = rule_results(rule, tensors, initial, "naive", torch.float64, cu_seqlens, grads)
    reference = rule_results(rule, tensors, initial, "naive", dtype, cu_seqlens, grads)
    got = rule_results(rule, tensors, initial, backend, dtype, cu_seqlens, grads, **options)
    factor, floor = (10, floor) if dtype in (torch.float32, torch.float64) else (2, 2e-3)
    assert got.keys() == golden.keys()
    for name in golden:
        assert torch.isfinite(got[name]).all(), f"{rule.name} {name}: not finite"
        err = rms_ratio(got[name], golden[name])
        allowed = max(factor * rms_ratio(reference[name], golden[name]), floor)
        assert err <= allowed, f"{rule.name} {name}: rms ratio {err:.2e} > {allowed:.2e}"
