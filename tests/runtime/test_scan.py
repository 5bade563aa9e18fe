"""The elementwise scan family (backends "torch-scan" and "scan") on rules written from the
papers, outside the ten examples: each against the naive loop (TESTING.md's rule: outputs,
final states and every gradient) and against a loop written here from the paper's equations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import recdsl
from recdsl.runtime import scan_core
from tests.helpers import assert_matches_naive, random_args, rule_results

# ---------------------------------------------------------------- the rules, from the papers

# minGRU (Feng et al. 2024, "Were RNNs all we needed?"): h = (1 - z) h + z h~
MINGRU = """rule mingru
dims D
state h[D]
input zl[D], hh[D]
let z = sigmoid(zl)
h = (1 - z) * h + z * hh
output y = h
"""

# minLSTM (same paper): normalised forget and input gates
MINLSTM = """rule minlstm
dims D
state h[D]
input fl[D], il[D], hh[D]
let f = sigmoid(fl)
let i = sigmoid(il)
h = f / (f + i) * h + i / (f + i) * hh
output y = h
"""

# HGRN (Qin et al. 2023): h = g h + (1 - g) x, the forget gate bounded below, an output gate
HGRN = """rule hgrn
dims D
state h[D]
input x[D], gl[D], og[D]
param lower[D]
let g = sigmoid(lower) + (1 - sigmoid(lower)) * sigmoid(gl)
h = g * h + (1 - g) * x
output y = silu(og) * h
"""

# Mamba-1 / S6 (Gu and Dao 2023): a per-entry decay of a [D, N] state
MAMBA1 = """rule mamba1
dims D, N
state S[D, N]
input x[D], dt[D], Bm[N], Cm[N]
param A_log[D, N], Dskip[D]
let delta = softplus(dt)
S = exp(-(diag(delta) @ exp(A_log))) * S + outer(delta * x, Bm)
output y = S @ Cm + Dskip * x
"""

# linear attention with the elu + 1 feature map and its normaliser (Katharopoulos et al. 2020)
LINEAR_NORMALISED = """rule linear_normalised
dims K, V
state S[K, V], z[K]
input q[K], k[K], v[V]
let pk = relu(k) + exp(min(k, 0))
let pq = relu(q) + exp(min(q, 0))
S = S + outer(pk, v)
z = z + pk
output o = (pq @ S) / (dot(pq, z) + 1e-6)
"""

# mLSTM with a sigmoid input gate (xLSTM): no max-stabiliser needed
MLSTM_SIGMOID = """rule mlstm_sigmoid
dims K, V
state C[K, V], n[K]
input q[K], k[K], v[V], fl, il
let f = sigmoid(fl)
let i = sigmoid(il)
let qs = q * K ** -0.5
C = f * C + i * outer(k, v)
n = f * n + i * k
output h = (qs @ C) / max(abs(dot(n, qs)), 1.0)
"""

# a read of the state before the token's update, and a per-channel output gate
READ_FIRST = """rule read_first
dims K, V
state S[K, V]
input q[K], k[K], v[V], g, og[V]
output o = sigmoid(og) * (q @ S)
S = exp(g) * S + outer(k, v)
"""

RULES = {"mingru": MINGRU, "minlstm": MINLSTM, "hgrn": HGRN, "mamba1": MAMBA1,
         "linear_normalised": LINEAR_NORMALISED, "mlstm_sigmoid": MLSTM_SIGMOID,
         "read_first": READ_FIRST}
SIZES = {"D": 6, "N": 5, "K": 6, "V": 5, "NH": 2}


def _rule(name):
    return recdsl.compile(RULES[name])


def _inputs(rule, T, B=2, seed=0, sequences=None):
    sizes = {d: SIZES[d] for d in rule.dims}
    inputs, params, states = random_args(rule, batch=B, time=T, heads=2, sizes=sizes, seed=seed,
                                         initial_state=True, sequences=sequences)
    if "dt" in inputs:  # Mamba: small steps, A_log around 0
        inputs["dt"] = inputs["dt"] - 1.0
    return {**inputs, **params}, tuple(states.values())


# ---------------------------------------------------------------- loops from the papers


def _loop(name, t, s0):
    """The paper's recurrence, token by token, on [B, T, H, ...] float64 tensors."""
    T = next(iter(t.values())).shape[1]
    ys, states = [], [x.clone() for x in s0]
    for i in range(T):
        x = {n: v[:, i] if v.dim() >= 3 and v.shape[1] == T and n not in ("A_log", "Dskip",
                                                                           "lower") else v
             for n, v in t.items()}
        if name == "mingru":
            z = torch.sigmoid(x["zl"])
            states[0] = (1 - z) * states[0] + z * x["hh"]
            ys.append(states[0])
        elif name == "minlstm":
            f, ig = torch.sigmoid(x["fl"]), torch.sigmoid(x["il"])
            states[0] = f / (f + ig) * states[0] + ig / (f + ig) * x["hh"]
            ys.append(states[0])
        elif name == "hgrn":
            lo = torch.sigmoid(t["lower"])
            g = lo + (1 - lo) * torch.sigmoid(x["gl"])
            states[0] = g * states[0] + (1 - g) * x["x"]
            ys.append(F.silu(x["og"]) * states[0])
        elif name == "mamba1":
            delta = F.softplus(x["dt"])
            decay = torch.exp(-delta[..., None] * torch.exp(t["A_log"]))
            states[0] = decay * states[0] + (delta * x["x"])[..., None] * x["Bm"][..., None, :]
            ys.append((states[0] * x["Cm"][..., None, :]).sum(-1) + t["Dskip"] * x["x"])
        elif name == "linear_normalised":
            pk, pq = F.elu(x["k"]) + 1, F.elu(x["q"]) + 1
            states[0] = states[0] + pk[..., None] * x["v"][..., None, :]
            states[1] = states[1] + pk
            num = (pq[..., None] * states[0]).sum(-2)
            ys.append(num / ((pq * states[1]).sum(-1, keepdim=True) + 1e-6))
        elif name == "mlstm_sigmoid":
            f, ig = torch.sigmoid(x["fl"])[..., None], torch.sigmoid(x["il"])[..., None]
            qs = x["q"] / math.sqrt(x["q"].shape[-1])
            states[0] = f[..., None] * states[0] + ig[..., None] * x["k"][..., None] * x["v"][..., None, :]
            states[1] = f * states[1] + ig * x["k"]
            den = torch.clamp((states[1] * qs).sum(-1, keepdim=True).abs(), min=1.0)
            ys.append((qs[..., None] * states[0]).sum(-2) / den)
        elif name == "read_first":
            ys.append(torch.sigmoid(x["og"]) * (x["q"][..., None] * states[0]).sum(-2))
            states[0] = torch.exp(x["g"])[..., None, None] * states[0] + \
                x["k"][..., None] * x["v"][..., None, :]
    return torch.stack(ys, dim=1), states


# ---------------------------------------------------------------- the family and the backends


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_gets_a_parallel_path_on_the_cpu_and_a_gpu(name):
    rule = _rule(name)
    assert rule.family_info.accepts("scan"), rule.family_reason
    assert rule.backends()[0] != "naive"
    assert rule.backends("cuda")[0] not in ("recurrent", "naive")


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("T", [1, 37, 65, 130])
def test_torch_scan_matches_the_naive_loop(name, T):
    rule = _rule(name)
    tensors, initial = _inputs(rule, T)
    assert_matches_naive(rule, tensors, initial, backend="torch-scan")


@pytest.mark.parametrize("name", sorted(RULES))
def test_torch_scan_matches_the_papers_loop(name):
    rule = _rule(name)
    tensors, initial = _inputs(rule, 37)
    t64 = {n: v.double() for n, v in tensors.items()}
    out, finals = rule(**t64, initial_state=tuple(s.double() for s in initial) if len(initial) > 1
                       else initial[0].double(), output_final_state=True, backend="torch-scan")
    ref_out, ref_states = _loop(name, t64, [s.double() for s in initial])
    finals = finals if isinstance(finals, tuple) else (finals,)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for got, ref in zip(finals, ref_states):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["mingru", "mamba1", "mlstm_sigmoid", "read_first"])
def test_packed_sequences_with_initial_states(name):
    rule = _rule(name)
    cu = torch.tensor([0, 20, 20, 57, 130])  # one sequence empty
    tensors, initial = _inputs(rule, 130, B=1, sequences=4)
    assert_matches_naive(rule, tensors, initial, backend="torch-scan", cu_seqlens=cu)


@pytest.mark.parametrize("name", ["mingru", "mamba1", "linear_normalised", "read_first"])
@pytest.mark.parametrize("T", [1, 37, 65])
def test_triton_scan_matches_the_naive_loop(name, T):
    rule = _rule(name)
    tensors, initial = _inputs(rule, T)
    assert_matches_naive(rule, tensors, initial, backend="scan")


def test_triton_scan_packed():
    rule = _rule("mamba1")
    cu = torch.tensor([0, 3, 3, 40])
    tensors, initial = _inputs(rule, 40, B=1, sequences=3)
    assert_matches_naive(rule, tensors, initial, backend="scan", cu_seqlens=cu)


# ---------------------------------------------------------------- gates at the extremes


@pytest.mark.parametrize("backend", ["torch-scan", "scan"])
def test_gates_of_exactly_zero_one_and_very_strong(backend):
    """A forget gate of exactly 0 resets the state, 1 keeps it, exp(-1e4) is exactly 0:
    nothing divides, nothing overflows, exact zeros stay zero."""
    rule = recdsl.compile("rule gz\ndims D\nstate h[D]\ninput a[D], x[D]\nh = a * h + x\n"
                          "output y = h\n")
    T, D = 40, 5
    a = torch.rand(1, T, 1, D, dtype=torch.float64)
    a[:, ::7] = 0.0
    a[:, 3::7] = 1.0
    a[:, 5::7] = math.exp(-1e4)
    x = torch.randn(1, T, 1, D, dtype=torch.float64)
    x[:, 10:20] = 0.0
    h0 = torch.zeros(1, 1, D, dtype=torch.float64)
    tensors = {"a": a, "x": x}
    assert_matches_naive(rule, tensors, (h0,), backend=backend)
    y, _ = rule(a=a.float(), x=x.float(), backend=backend)
    assert (y[:, 14:20] == 0).all()  # zero writes after a reset at token 14: exact zeros


def test_log_gates_of_minus_1e4_stay_finite_in_gradients():
    rule = recdsl.compile("rule lg\ndims D\nstate h[D]\ninput g[D], x[D]\nh = exp(g) * h + x\n"
                          "output y = h\n")
    g = torch.full((1, 50, 2, 4), -1e4)
    g[:, 1::2] = 0.0
    tensors = {"g": g, "x": torch.randn(1, 50, 2, 4)}
    got = rule_results(rule, tensors, (torch.randn(1, 2, 4),), "torch-scan", torch.float32)
    assert all(torch.isfinite(v).all() for v in got.values())
    assert_matches_naive(rule, tensors, (torch.randn(1, 2, 4),), backend="torch-scan")


@pytest.mark.slow
def test_65536_tokens_stay_finite():
    for name in ("mingru", "mamba1"):
        rule = _rule(name)
        tensors, initial = _inputs(rule, 65536, B=1)
        tensors = {n: v.float() for n, v in tensors.items()}
        with torch.no_grad():
            out, final = rule(**tensors, initial_state=initial[0].float(), output_final_state=True,
                              backend="torch-scan")
        assert torch.isfinite(out).all() and torch.isfinite(final).all()


# ---------------------------------------------------------------- the scan itself


@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 100])
def test_blocked_scan_against_a_loop(T):
    gen = torch.Generator().manual_seed(T)
    a = torch.rand(2, T, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(2, T, 3, generator=gen, dtype=torch.float64)
    h0 = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    h, ref = scan_core.scan(a, b, h0), []
    s = h0
    for t in range(T):
        s = a[:, t] * s + b[:, t]
        ref.append(s)
    torch.testing.assert_close(h, torch.stack(ref, 1), rtol=1e-12, atol=1e-12)


def test_blocked_scan_gradients_with_a_broadcast_multiplier():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, 30, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 30, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(scan_core.linear_scan, (a, b, h0))


def test_compile_report_builds_the_scan_kernels_of_a_scan_rule():
    from recdsl.codegen.export import generated_modules
    kinds = [m.kind for m in generated_modules(_rule("mamba1").ir, {"D": 64, "N": 16})]
    assert kinds == ["recurrent", "scan"]
    # minGRU's y = h also lowers to the diagonal family ([D, 1] states): its kernels are built
    kinds = [m.kind for m in generated_modules(_rule("mingru").ir, {"D": 64})]
    assert kinds[:2] == ["recurrent", "scan"] and "chunk-diagonal" in kinds


LOOPED = """rule looped
dims D, NH
state h[D], c[D]
input z[NH, D], x[NH, D], w[D]
let s = sigmoid(w)
for j in NH:
    let zj = sigmoid(z[j])
    h = (1 - zj) * h + zj * x[j] * s
output mid = h * s
h = s * h + w
c = exp(-s) * c + w
output y = tanh(h) + c
"""


@pytest.mark.parametrize("T", [1, 37])
def test_for_blocks_and_a_read_between_two_updates(T):
    """Steps in a for block compose into one token transition; ``mid`` reads h between its
    updates (the epilogue evaluates that version), ``y`` after them."""
    rule = recdsl.compile(LOOPED)
    assert rule.family == "scan"
    tensors, initial = _inputs(rule, T)
    assert_matches_naive(rule, tensors, initial, backend="torch-scan")
    cu = torch.tensor([0, T // 2, T])
    tensors, initial = _inputs(rule, T, B=1, sequences=2)
    assert_matches_naive(rule, tensors, initial, backend="torch-scan", cu_seqlens=cu)


def test_a_normaliser_vector_beside_a_wide_matrix_state_keeps_the_chunk_form_first():
    """The matrix state decides between scan and chunk form: the scan would store a [K, V]
    state per token for it (7x to 18x slower measured at K = V = 64, T = 2048), whatever the
    [K] normaliser beside it would prefer alone."""
    from recdsl.runtime import backends
    rule = _rule("linear_normalised")
    wide = {"K": 64, "V": 64}
    assert backends.available(rule, "cpu", wide)[:2] == ["torch-chunk", "torch-scan"]
    assert backends.available(rule, "cuda", wide)[:2] == ["chunk", "scan"]
    narrow = {"K": 4, "V": 4}  # below SCAN_BELOW the scan is faster, as for a [K, V] state alone
    assert backends.available(rule, "cpu", narrow)[:2] == ["torch-scan", "torch-chunk"]
    assert backends.available(_rule("mingru"), "cpu", {"D": 64})[0] == "torch-scan"
