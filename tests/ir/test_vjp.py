"""The derivatives derived symbolically (ssa + vjp + the PyTorch printer) against torch
autograd through the naive loop, one token, float64, every canonical rule."""
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl.codegen.loader import load_function
from recdsl.codegen.torch_step import step_source

EXAMPLES = sorted(Path(__file__).resolve().parents[2].joinpath("examples").glob("*.rec"))
SIZES = {"K": 5, "V": 3, "N": 4, "P": 3, "M": 6, "NH": 3}


def _random_call(rule, B=2, H=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    dims = {d: SIZES[d] for d in rule.dims}
    t = {}
    for var in rule.inputs:
        t[var.name] = torch.randn(B, 1, H, *[dims[d] for d in var.dims], generator=g, dtype=torch.float64)
    for var in rule.params:
        t[var.name] = torch.randn(H, *[dims[d] for d in var.dims], generator=g, dtype=torch.float64)
    init = [torch.randn(B, H, *[dims[d] for d in s.dims], generator=g, dtype=torch.float64) * 0.5
            for s in rule.states]
    return dims, t, init


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_adjoint_matches_autograd(path):
    rule = recdsl.load(path)
    dims, tensors, init = _random_call(rule)
    leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    init_leaves = [s.clone().requires_grad_() for s in init]
    out, final = rule(**leaves, initial_state=tuple(init_leaves), output_final_state=True, backend="naive")
    out = out if isinstance(out, tuple) else (out,)
    final = final if isinstance(final, tuple) else (final,)
    g = torch.Generator().manual_seed(1)
    d_out = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in out]
    d_final = [torch.randn(f.shape, generator=g, dtype=torch.float64) for f in final]
    loss = sum((o * d).sum() for o, d in zip(out, d_out)) + sum((f * d).sum() for f, d in zip(final, d_final))
    wrt = list(leaves.values()) + init_leaves
    expected = torch.autograd.grad(loss, wrt, allow_unused=True)

    step = step_source(rule.ir, dims, grad=True)
    prog, sources = step.program, step.sources
    fn = load_function(step.source, step.name)
    B, H = init[0].shape[:2]
    feed = []
    for s in sources:
        if s.kind == "input":
            x = tensors[s.name][:, 0]
            feed.append(x if s.index is None else x.select(2, s.index))
        elif s.kind == "param":
            feed.append(tensors[s.name].expand(B, *tensors[s.name].shape))
        elif s.kind == "state":
            feed.append(init[[v.name for v in rule.states].index(s.name)])
        elif s.kind == "grad_output":
            feed.append(d_out[[o.name for o in rule.outputs].index(s.name)][:, 0])
        else:
            feed.append(d_final[[v.name for v in rule.states].index(s.name)])
    got = fn(*feed)
    n_in, n_par, n_st = len(prog.inputs), len(prog.params), len(prog.states_in)
    # forward values first
    fwd_out = got[n_in + n_par + n_st:]
    for o, value in zip(out, fwd_out[:len(out)]):
        torch.testing.assert_close(value, o[:, 0], rtol=0, atol=1e-12)
    for f, value in zip(final, fwd_out[len(out):]):
        torch.testing.assert_close(value, f, rtol=0, atol=1e-12)
    # gradients: assemble stepped inputs k[j] back into [B, H, NH, ...]
    grads_by_name = {}
    for (name, index), value in zip(prog.inputs, got[:n_in]):
        grads_by_name.setdefault(name, {})[index] = value
    names = list(leaves)
    for name, exp_grad in zip(names, expected[:len(names)]):
        var = rule.ir.var(name)
        if var.kind == "param":
            value = got[n_in + list(prog.params).index(name)]
            value = torch.zeros_like(tensors[name]) if value is None else value.sum(0)
            torch.testing.assert_close(value, exp_grad, rtol=0, atol=1e-10, msg=name)
            continue
        parts = grads_by_name[name]
        zeros = lambda: torch.zeros_like(tensors[name][:, 0])
        if None in parts:
            value = parts[None] if parts[None] is not None else zeros()
        else:
            value = torch.zeros_like(tensors[name][:, 0])
        for j, part in parts.items():
            if j is not None and part is not None:
                value.select(2, j).add_(part)
        exp = exp_grad[:, 0] if exp_grad is not None else torch.zeros_like(value)
        torch.testing.assert_close(value, exp, rtol=0, atol=1e-10, msg=name)
    for s, exp_grad in zip(rule.states, expected[len(names):]):
        value = got[n_in + n_par + list(prog.states_in).index(s.name)]
        exp = exp_grad if exp_grad is not None else torch.zeros_like(value)
        torch.testing.assert_close(value, exp, rtol=0, atol=1e-10, msg=s.name)
