"""A corpus of published rules that recdsl was not written for, each in the language as a
researcher would write it from the paper: where it runs (a parallel path first on the CPU and
on a GPU), that every CPU path matches the naive loop (TESTING.md's rule: outputs, final
states, every gradient, with initial states), and, for a few, a loop written here from the
paper's equations as an independent reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import recdsl
from tests.helpers import assert_matches_naive

CORPUS = {
    # HGRN2 (Qin et al. 2024): the forget gate's complement is the key
    "hgrn2": """rule hgrn2
dims K, V
state S[K, V]
input q[K], f[K], v[V]
let g = logsigmoid(f)
S = diag(exp(g)) @ S + outer(1 - exp(g), v)
output o = q @ S
""",
    # RWKV-6 (Peng et al. 2024): data-dependent per-channel decay, the bonus u on the current
    # token, the read of the state before the update
    "rwkv6": """rule rwkv6
dims K, V
state S[K, V]
input r[K], k[K], v[V], w[K]
param u[K]
let y = r @ S + dot(r, u * k) * v
S = diag(exp(-exp(w))) @ S + outer(k, v)
output o = y
""",
    # TTT-linear (Sun et al. 2024), batch size 1: one gradient step of |W k - v|^2 per token
    "ttt_linear": """rule ttt_linear
dims V, K
state W[V, K]
input q[K], k[K], v[V], eta
let kn = l2norm(k)
W = W - sigmoid(eta) * outer(W @ kn - v, kn)
output o = W @ l2norm(q)
""",
    # TTT-linear with a weight decay
    "ttt_decay": """rule ttt_decay
dims V, K
state W[V, K]
input q[K], k[K], v[V], eta, a
let kn = l2norm(k)
W = exp(logsigmoid(a)) * W
W = W - sigmoid(eta) * outer(W @ kn - v, kn)
output o = W @ l2norm(q)
""",
    # a Householder erase along a key other than the write's (PaTH-style transitions)
    "householder_erase": """rule householder_erase
dims K, V
state S[K, V]
input q[K], k[K], v[V], w[K], beta
let wn = l2norm(w)
S = S - 2 * sigmoid(beta) * outer(wn, wn @ S)
S = S + outer(k, v)
output o = q @ S
""",
    # LRU (Orvieto et al. 2023) with a real diagonal: exp(-exp(nu)) and the normalised input
    "lru_real": """rule lru_real
dims D
state h[D]
input x[D], nu[D]
param Bp[D, D]
let lam = exp(-exp(nu))
h = lam * h + sqrt(1 - lam * lam) * (Bp @ x)
output y = h
""",
    # decays on both axes of the state (2D gating)
    "gla_2d": """rule gla_2d
dims K, V
state S[K, V]
input q[K], k[K], v[V], gk[K], gv[V]
S = diag(exp(gk)) @ S @ diag(exp(gv)) + outer(k, v)
output o = q @ S
""",
    # Mamba-2 with its output gate silu(z) and the skip D x
    "mamba2_gated": """rule mamba2_gated
dims N, P
state S[N, P]
input x[P], Bm[N], Cm[N], dt, z[P]
param A_log, Dskip
let d = softplus(dt)
S = exp(-exp(A_log) * d) * S + outer(d * Bm, x)
output y = silu(z) * (Cm @ S + Dskip * x)
""",
    # Gated DeltaNet in one statement, with an RMS-normalised, SiLU-gated output
    "gdn_rmsgate": """rule gdn_rmsgate
dims K, V
state S[K, V]
input q[K], k[K], v[V], g, beta, z[V]
let kn = l2norm(k)
S = exp(g) * (S - sigmoid(beta) * outer(kn, kn @ S)) + sigmoid(beta) * outer(kn, v)
let o1 = l2norm(q) @ S
output o = silu(z) * o1 * rsqrt(sum(o1 * o1) / V + 1e-5)
""",
    # gated linear attention with a feature map and its normaliser state
    "gated_la_norm": """rule gated_la_norm
dims K, V
state S[K, V], z[K]
input q[K], k[K], v[V], g
let phq = silu(q) + 1
let phk = silu(k) + 1
S = exp(logsigmoid(g)) * S + outer(phk, v)
z = exp(logsigmoid(g)) * z + phk
output o = (phq @ S) / (dot(phq, z) + 1e-6)
""",
    # RWKV-4's WKV with its running-max stabiliser p (a max-plus leading stage)
    "rwkv4": """rule rwkv4
dims D
state a[D], b[D], p[D]
input k[D], v[D], w[D]
param u[D]
let ww = -exp(w)
let pu = max(p, u + k)
let y = (exp(p - pu) * a + exp(u + k - pu) * v) / (exp(p - pu) * b + exp(u + k - pu))
let pn = max(ww + p, k)
a = exp(ww + p - pn) * a + exp(k - pn) * v
b = exp(ww + p - pn) * b + exp(k - pn)
p = pn
output o = y
""",
    # HGRN (Qin et al. 2023) with its learned lower bound on the forget gate
    "hgrn1_bound": """rule hgrn1_bound
dims D
state h[D]
input f[D], i[D], lo[D]
let fg = sigmoid(f) * (1 - sigmoid(lo)) + sigmoid(lo)
h = fg * h + (1 - fg) * silu(i)
output y = h
""",
    # two memories with different gates, read together
    "two_memories": """rule two_memories
dims K, V
state S1[K, V], S2[K, V]
input q[K], k[K], v[V], g1
S1 = exp(logsigmoid(g1)) * S1 + outer(k, v)
S2 = diag(exp(logsigmoid(k))) @ S2 + outer(1 - exp(logsigmoid(k)), v)
output o = q @ S1 + q @ S2
""",
    # a rank-two write per token
    "rank2_write": """rule rank2_write
dims K, V
state S[K, V]
input q[K], k1[K], k2[K], v1[V], v2[V], g[K]
S = diag(exp(logsigmoid(g))) @ S + outer(k1, v1) + outer(k2, v2)
output o = q @ S
""",
    # KDA with the fla gate and a sigmoid output gate, the delta written as k (kᵀS - v)
    "kda_outgate": """rule kda_outgate
dims K, V
state S[K, V]
input q[K], k[K], v[V], gk[K], beta, og[V]
param A_log, dt_bias[K]
let kn = l2norm(k)
S = diag(exp(-exp(A_log) * softplus(gk + dt_bias))) @ S
S = S - sigmoid(beta) * outer(kn, kn @ S - v)
output o = sigmoid(og) * (l2norm(q) @ S)
""",
    # an erase with a per-channel decay and a normaliser vector beside it
    "delta_normalised": """rule delta_normalised
dims K, V
state S[K, V], n[K]
input q[K], k[K], v[V], w[K], beta
let kn = l2norm(k)
S = diag(exp(-exp(w))) @ S - sigmoid(beta) * outer(kn, kn @ S) + outer(kn, v)
n = exp(-exp(w)) * n + kn
output o = (q @ S) / (abs(dot(q, n)) + 1)
""",
}

SIZES = {"K": 6, "V": 5, "D": 6, "N": 6, "P": 5}


def _rule(name):
    return recdsl.compile(CORPUS[name])


def _inputs(rule, T, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = {}
    for var in list(rule.inputs) + list(rule.params):
        lead = [2, T, 2] if var.kind == "input" else [2]
        x[var.name] = torch.randn(lead + [SIZES[d] for d in var.dims], generator=gen,
                                  dtype=torch.float64)
    if "Bp" in x:
        x["Bp"] = x["Bp"] / SIZES["D"] ** 0.5
    init = tuple(0.5 * torch.randn([2, 2] + [SIZES[d] for d in s.dims], generator=gen,
                                   dtype=torch.float64) for s in rule.states)
    return x, init


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_rule_has_a_parallel_path_first(name):
    rule = _rule(name)
    assert rule.backends()[0] in ("torch-chunk", "torch-scan")
    assert rule.backends("cuda")[0] in ("chunk", "scan")


@pytest.mark.parametrize("T", [1, 37, 65])
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_cpu_path_matches_the_naive_loop(name, T):
    rule = _rule(name)
    x, init = _inputs(rule, T)
    paths = [b for b in rule.backends() if b in ("torch-chunk", "torch-scan")]
    assert paths
    for backend in paths:
        assert_matches_naive(rule, x, init, backend=backend)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_triton_path_matches_the_naive_loop_under_the_interpreter(name):
    rule = _rule(name)
    x, init = _inputs(rule, 19)
    paths = [b for b in rule.backends("cuda") if b in ("chunk", "scan")]
    for backend in paths:
        assert_matches_naive(rule, x, init, backend=backend)


# ---------------------------------------------------------------- loops from the papers


def _rwkv6_loop(r, k, v, w, u, S):
    ys = []
    for t in range(r.shape[1]):
        rt, kt, vt = r[:, t], k[:, t], v[:, t]
        kv = kt[..., :, None] * vt[..., None, :]
        ys.append(torch.einsum("bhk,bhkv->bhv", rt, S + u[..., :, None] * kv))
        S = torch.exp(-torch.exp(w[:, t]))[..., None] * S + kv
    return torch.stack(ys, 1), S


def _ttt_loop(q, k, v, eta, W):
    ys = []
    for t in range(q.shape[1]):
        kn, qn = F.normalize(k[:, t], dim=-1, eps=0), F.normalize(q[:, t], dim=-1, eps=0)
        grad = torch.einsum("bhvk,bhk->bhv", W, kn) - v[:, t]  # d/dW of |W k - v|^2 / 2
        W = W - torch.sigmoid(eta[:, t])[..., None, None] * grad[..., :, None] * kn[..., None, :]
        ys.append(torch.einsum("bhvk,bhk->bhv", W, qn))
    return torch.stack(ys, 1), W


def _hgrn2_loop(q, f, v, S):
    ys = []
    for t in range(q.shape[1]):
        g = torch.sigmoid(f[:, t])
        S = g[..., None] * S + (1 - g)[..., None] * v[:, t][..., None, :]
        ys.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(ys, 1), S


def test_rwkv6_matches_the_papers_loop():
    rule = _rule("rwkv6")
    x, (S0,) = _inputs(rule, 37)
    out, S = rule(**x, initial_state=S0, output_final_state=True, backend="torch-chunk")
    u = x["u"][None, :]  # [1, H, K]
    ref, ref_S = _rwkv6_loop(x["r"], x["k"], x["v"], x["w"], u, S0)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, ref_S, rtol=1e-10, atol=1e-10)


def test_ttt_linear_matches_the_papers_loop():
    rule = _rule("ttt_linear")
    x, (W0,) = _inputs(rule, 37)
    out, W = rule(**x, initial_state=W0, output_final_state=True, backend="torch-chunk")
    ref, ref_W = _ttt_loop(x["q"], x["k"], x["v"], x["eta"], W0)
    # recdsl's l2norm has an epsilon of 1e-6 under the square root: agree to its size
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W, ref_W, rtol=1e-5, atol=1e-5)


def test_hgrn2_matches_the_papers_loop():
    rule = _rule("hgrn2")
    x, (S0,) = _inputs(rule, 37)
    out, S = rule(**x, initial_state=S0, output_final_state=True, backend="torch-chunk")
    ref, ref_S = _hgrn2_loop(x["q"], x["f"], x["v"], S0)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, ref_S, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- coupled states (newton)

# LRU (Orvieto et al. 2023), written with cos and sin: a complex diagonal transition
# lambda = exp(-exp(nu) + i exp(theta)) on h = hr + i hi, its real part read out
LRU = """rule lru
dims D
state hr[D], hi[D]
input x[D]
param nu_log[D], theta_log[D], gamma_log[D]
let r = exp(-exp(nu_log))
let th = exp(theta_log)
let nr = r * cos(th) * hr - r * sin(th) * hi + exp(gamma_log) * x
let ni = r * sin(th) * hr + r * cos(th) * hi
hr = nr
hi = ni
output y = hr
"""


def _lru_loop(x, nu_log, theta_log, gamma_log, h):
    """The paper's recurrence in complex arithmetic: h_t = lambda h_{t-1} + gamma x_t."""
    lam = torch.exp(torch.complex(-torch.exp(nu_log), torch.exp(theta_log)))
    ys = []
    for t in range(x.shape[1]):
        h = lam * h + torch.exp(gamma_log) * x[:, t]
        ys.append(h.real)
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("T", [1, 37, 130])
def test_lru_with_cos_and_sin_matches_the_complex_loop(T):
    rule = recdsl.compile(LRU)
    assert rule.backends()[0] == "newton"  # coupled real and imaginary parts: one linearisation
    x, (hr0, hi0) = _inputs(rule, T)
    out, (hr, hi) = rule(**x, initial_state=(hr0, hi0), output_final_state=True, backend="newton")
    ref, h = _lru_loop(x["x"], x["nu_log"], x["theta_log"], x["gamma_log"], torch.complex(hr0, hi0))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hr, h.real, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hi, h.imag, rtol=1e-10, atol=1e-10)
    assert_matches_naive(rule, x, (hr0, hi0), backend="newton")
    if T == 37:  # the fused kernel prints cos, sin and their derivatives (interpreted)
        assert_matches_naive(rule, x, (hr0, hi0), backend="recurrent")


COUPLED = {
    # LinOSS-IMEX (Rusch and Rus 2025): velocity z, then position y from the new z
    "linoss": """rule linoss
dims D
state z[D], y[D]
input u[D], dt[D]
param A[D]
let s = sigmoid(dt)
z = z - s * softplus(A) * y + s * u
y = y + s * z
output o = y
""",
    # GateLoop (Katsch 2023): a complex per-channel gate on a [K, V] state, real and imaginary
    "gateloop": """rule gateloop
dims K, V
state Sr[K, V], Si[K, V]
input q[K], k[K], v[V], ar[K], th[K]
let a = exp(logsigmoid(ar))
let nr = diag(a * cos(th)) @ Sr - diag(a * sin(th)) @ Si + outer(k, v)
let ni = diag(a * sin(th)) @ Sr + diag(a * cos(th)) @ Si
Sr = nr
Si = ni
output o = q @ Sr
""",
}


@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("name", sorted(COUPLED))
def test_coupled_affine_rules_run_on_newton(name, T):
    """Coupled affine states: 2 x 2 blocks per channel, newton first on the CPU, matching the
    naive loop (outputs, final states, every gradient)."""
    rule = recdsl.compile(COUPLED[name])
    assert rule.backends()[0] == "newton"
    assert rule.family_info.verdicts["newton"].reason.startswith(
        "Jacobian block-diagonal: one 2 x 2 block per channel")
    x, init = _inputs(rule, T)
    assert_matches_naive(rule, x, init, backend="newton")
