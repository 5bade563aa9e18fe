"""The generated step-with-Jacobian (recdsl.codegen.jacobian_step) against forward-mode
autodiff of the generated step (torch.func.jvp, one tangent per column of a block) and against
central finite differences, in float64, at random points, for diagonal, block and dense rules
(the cells of test_newton, incl. sLSTM and the momentum delta rule) and forms that exercise
sums over tied axes, broadcasts and matrix products. Then the dense path (the sequential pass
forward, the transposed recurrence with generated Jacobians backward) against the naive loop
at T = 1, 37, 65, 130 with its slices forced small, packed sequences, and blocks wider than
the block scan."""
import pytest
import torch
from torch.func import jvp, vmap

import recdsl
from recdsl.codegen.jacobian_step import jacobian_source
from recdsl.runtime import newton
from tests.helpers import assert_matches_naive
from tests.runtime.test_newton import CASES, SIZES, _args

SIZES = {**SIZES, "E": 2}

# sums over tied axes, a state read whole and broadcast, a matrix product of two states
EXTRA = {
    "sum_tied": """rule sum_tied
dims K, V
state S[K, V], n[K]
input k[K], v[V], q[V]
S = S @ diag(sigmoid(v)) + outer(k, tanh(k @ S))
n = n + k * sum(S @ q)
output o = S @ q
""",
    "matmul": """rule mm
dims K, V, E
state A[K, V], B[V, E]
input X[K, V]
param W[E, V]
A = tanh(X + (A @ B) @ W)
B = B * 0.9 + 0.1 * tanh(B)
output y = sum(A @ B)
""",
    "softmax": """rule soft
dims D
state h[D]
input x[D]
h = softmax(h + x) * tanh(h)
output y = h
""",
}


def _rules():
    out = {name: case[0] for name, case in CASES.items()}
    out.update(EXTRA)
    return out


def _point(plan, rule, N=3, H=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = {**SIZES}
    tokens = {}
    for v in rule.ir.inputs:
        tokens[v.name] = torch.randn(N, H, *[sizes[d] for d in v.dims], generator=gen, dtype=torch.float64)
    params = {p.name: 0.4 * torch.randn(H, *[sizes[d] for d in p.dims], generator=gen, dtype=torch.float64)
              for p in rule.ir.params}
    states = [torch.randn(N, H, *[sizes[d] for d in s.dims], generator=gen, dtype=torch.float64)
              for s in rule.ir.states]
    if rule.name == "slstm":
        states[1] = states[1].abs() + 0.5  # the normaliser n > 0
    return tokens, params, plan.pack(states)


def _jvp_jacobian(plan, tokens, params, prev):
    """The reference: J by torch.func.jvp of the generated step (what newton used before)."""
    fn = lambda p: plan.evaluate(tokens, params, p)[0]  # noqa: E731
    if plan.diagonal:
        return jvp(fn, (prev,), (torch.ones_like(prev),))[1]
    eye = torch.eye(plan.k, dtype=prev.dtype)
    basis = eye.reshape(plan.k, 1, 1, 1, plan.k).expand(plan.k, *prev.shape)
    return vmap(lambda t: jvp(fn, (prev,), (t,))[1])(basis).permute(1, 2, 3, 4, 0)


@pytest.mark.parametrize("name", list(_rules()))
def test_generated_jacobian_is_jvp_and_finite_differences(name):
    rule = recdsl.compile(_rules()[name])
    plan = newton._Plan(rule, SIZES)
    tokens, params, prev = _point(plan, rule)
    J, f, outs = plan.linearise(tokens, params, prev)
    f_ref, outs_ref = plan.evaluate(tokens, params, prev)
    assert torch.allclose(f, f_ref, rtol=1e-12, atol=1e-12)
    for o, r in zip(outs, outs_ref):
        assert torch.allclose(o, r, rtol=1e-12, atol=1e-12)
    want = _jvp_jacobian(plan, tokens, params, prev)
    assert J.shape == want.shape
    assert torch.allclose(J, want, rtol=1e-10, atol=1e-12), (J - want).abs().max()
    assert J.abs().max() > 0.01  # not trivially zero
    # central differences, one column of the block at a time (1 on every channel at once)
    eps = 1e-6
    for col in range(plan.k if not plan.diagonal else 1):
        step = torch.zeros_like(prev)
        if plan.diagonal:
            step += eps
        else:
            step[..., col] = eps
        fd = (plan.evaluate(tokens, params, prev + step)[0]
              - plan.evaluate(tokens, params, prev - step)[0]) / (2 * eps)
        got = J if plan.diagonal else J[..., col]
        assert torch.allclose(got, fd, rtol=1e-6, atol=1e-7), (name, col, (got - fd).abs().max())


def test_a_state_read_through_R_costs_no_matrix_product():
    """sigmoid(x + R @ h)'s tangent in h is sigmoid' * R: R's entries, no matmul over k."""
    rule = recdsl.compile(CASES["lstm"][0])
    tangents = [line for line in jacobian_source(rule.ir, SIZES).source.splitlines()
                if line.strip().startswith("d_")]
    assert tangents and not any("einsum" in t or "tangent_mm" in t or "@" in t for t in tangents)
    diag = jacobian_source(recdsl.compile(CASES["para_gru"][0]).ir, SIZES).source
    assert "untie" not in diag and "tangent_sum" not in diag  # elementwise only


# ---------------------------------------------------------------- the dense path

@pytest.fixture(scope="module")
def dense_rules():
    return {name: recdsl.compile(CASES[name][0]) for name in ("lstm", "gru", "slstm")}


@pytest.mark.parametrize("T", [1, 37, 65, 130])
@pytest.mark.parametrize("name", ["lstm", "gru", "slstm"])
def test_dense_runs_the_sequential_pass_and_matches_the_naive_loop(dense_rules, name, T, monkeypatch):
    """Forward: the generated step token by token (no Newton iteration); backward: J in
    slices of a few tokens (forced small here, so slices and their seams are exercised)."""
    monkeypatch.setattr(newton, "CACHE_BUDGET", 1)  # one token per J slice
    monkeypatch.setattr(newton, "TEMP_BUDGET", 1)  # one token per vjp slice
    rule = dense_rules[name]
    tensors, initial = _args(rule, name, T, init=T != 37)
    assert_matches_naive(rule, tensors, initial, backend="newton")
    assert newton.last_run["iterations"] == 0 and newton.last_run["structure"] == "dense"


def test_dense_slices_across_packed_sequences(dense_rules, monkeypatch):
    monkeypatch.setattr(newton, "CACHE_BUDGET", 3 * 4 * 2 * 10 * 10)  # a few tokens per slice
    rule = dense_rules["lstm"]
    cu = torch.tensor([0, 1, 30, 30, 65])
    tensors, initial = _args(rule, "lstm", 65, batch=1, sequences=4)
    assert_matches_naive(rule, tensors, initial, backend="newton", cu_seqlens=cu)


def test_blocks_wider_than_the_scan_take_the_sequential_pass(monkeypatch):
    monkeypatch.setattr(newton, "BLOCK_SCAN_MAX", 4)  # momentum's 2K = 8 wide blocks
    rule = recdsl.compile(CASES["momentum"][0])
    tensors, initial = _args(rule, "momentum", 65)
    assert_matches_naive(rule, tensors, initial, backend="newton")
    assert newton.last_run["iterations"] == 0 and newton.last_run["structure"] == "block"


def test_the_plan_says_what_newton_does_with_a_dense_jacobian(dense_rules):
    reason = dense_rules["lstm"].family_info.verdicts["newton"].reason
    assert reason.endswith("On the CPU: the sequential pass of the generated step forward, backward "
                           "the transposed recurrence token by token (one batched 2*D x 2*D "
                           "product each) with generated Jacobians; on a GPU: Newton iterations, "
                           "each linearised recurrence solved by a kernel walking T with one "
                           "2*D x 2*D matrix-vector product per token (Triton), backward the "
                           "same in the transposed Jacobians")


@pytest.mark.parametrize("T", [1, 37, 130])
@pytest.mark.parametrize("name", ["para_gru", "para_lstm", "momentum"])
def test_on_the_cpu_the_forward_is_the_sequential_pass(name, T):
    """newton.SEQUENTIAL_DEVICES: a diagonal or block J still gets the parallel backward."""
    rule = recdsl.compile(CASES[name][0])
    tensors, initial = _args(rule, name, T, init=T != 37)
    assert_matches_naive(rule, tensors, initial, backend="newton")
    assert newton.last_run["iterations"] == 0
    cu = torch.tensor([0, 1, 30, 30, 65])
    tensors, initial = _args(rule, name, 65, batch=1, sequences=4)
    assert_matches_naive(rule, tensors, initial, backend="newton", cu_seqlens=cu)
