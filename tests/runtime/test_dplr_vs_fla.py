"""The DPLR family against flash-linear-attention's own pure-PyTorch references (issue 11's
acceptance): fla's ``naive_recurrent_kda``, ``naive_chunk_kda``, ``dplr_recurrence``,
``iplr_recurrence``, ``naive_recurrent_gdn2``, ``naive_recurrent_comba`` and
``naive_recurrent_gated_delta_product``, each next to the rule that writes its definition in
recdsl's language. Outputs, final states and the gradients of every input and of the initial
state, at K=48, V=40, with an initial state.

fla is optional (``pip install --no-deps fla-core einops``): without it these tests skip, and
the loops written in tests/runtime/test_torch_chunk_dplr.py stay the references. fla's
functions compute in float32, so the comparison is at float32's precision: recdsl runs in
float64 and must agree to the float32 rounding of fla's loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import recdsl
from recdsl.bench import load_fla_naive
from recdsl.runtime import backends

K, V, NH = 48, 40, 2
B, H = 2, 2

# Each case: (rule text, fla folder, a function calling fla's reference with recdsl's
# tensors in recdsl's layout [B, T, H, ...] and returning (o, final state)).
CASES = {}


def case(name, text, folder):
    def register(call):
        CASES[name] = (text, folder, call)
        return call
    return register


KDA = """rule kda
dims K, V
state S[K, V]
input q[K], k[K], v[V], g[K], beta
S = diag(exp(g)) @ S
S = S - beta * outer(k, k @ S) + beta * outer(k, v)
output o = K ** -0.5 * (q @ S)
"""


@case("kda recurrent", KDA, "kda")
def _kda_recurrent(fla, x, S0):
    return fla.naive_recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                   initial_state=S0, output_final_state=True)


@case("kda chunk", KDA, "kda")
def _kda_chunk(fla, x, S0):  # fla's chunkwise reference, 64-token chunks
    return fla.naive_chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"],
                               initial_state=S0, output_final_state=True)


# fla's generalized DPLR: S = (Diag(exp(gk)) + beta alphaᵀ) S + k vᵀ, o = (q / sqrt(K)) S
DPLR = """rule dplr
dims K, V
state S[K, V]
input q[K], k[K], v[V], alpha[K], beta[K], gk[K]
S = diag(exp(gk)) @ S + outer(beta, alpha @ S) + outer(k, v)
output o = K ** -0.5 * (q @ S)
"""

IPLR = """rule iplr
dims K, V
state S[K, V]
input q[K], k[K], v[V], alpha[K], beta[K]
S = S + outer(beta, alpha @ S) + outer(k, v)
output o = K ** -0.5 * (q @ S)
"""


def _heads_first(x):  # fla's dplr and iplr take [B, H, T, ...]
    return x.transpose(1, 2)


@case("dplr", DPLR, "generalized_delta_rule/dplr")
def _dplr(fla, x, S0):
    t = _heads_first
    o, S = fla.dplr_recurrence(t(x["q"]), t(x["k"]), t(x["v"]), t(x["alpha"]), t(x["beta"]),
                               t(x["gk"]), initial_state=S0, output_final_state=True)
    return t(o), S


@case("iplr", IPLR, "generalized_delta_rule/iplr")
def _iplr(fla, x, S0):
    t = _heads_first
    o, S = fla.iplr_recurrence(t(x["q"]), t(x["k"]), t(x["v"]), t(x["alpha"]), t(x["beta"]),
                               initial_state=S0, output_final_state=True)
    return t(o), S


# GDN-2: S = (I - k (b ⊙ k)ᵀ) Diag(exp(g)) S + k (w ⊙ v)ᵀ
GDN2 = """rule gdn2
dims K, V
state S[K, V]
input q[K], k[K], v[V], g[K], b[K], w[V]
S = diag(exp(g)) @ S
S = S - outer(k, (b * k) @ S) + outer(k, w * v)
output o = K ** -0.5 * (q @ S)
"""


@case("gdn2", GDN2, "gdn2")
def _gdn2(fla, x, S0):
    return fla.naive_recurrent_gdn2(x["q"], x["k"], x["v"], x["g"], x["b"], x["w"],
                                    initial_state=S0, output_final_state=True)


# Comba: S = (I - beta k pᵀ) exp(g) S + beta k vᵀ (fla's orientation: read along p)
COMBA = """rule comba
dims K, V
state S[K, V]
input q[K], k[K], v[V], p[K], beta, g
S = exp(g) * S
S = S - beta * outer(k, p @ S) + beta * outer(k, v)
output o = K ** -0.5 * (q @ S)
"""


@case("comba", COMBA, "comba")
def _comba(fla, x, S0):
    return fla.naive_recurrent_comba(x["q"], x["k"], x["v"], x["p"], x["beta"], x["g"],
                                     initial_state=S0, output_final_state=True)


# Gated DeltaProduct: a scalar decay, then NH Householder steps per token
DELTAPRODUCT = """rule gated_deltaproduct
dims K, V, NH
state S[K, V]
input q[K], k[NH, K], v[NH, V], beta[NH], g
S = exp(g) * S
for j in NH:
    S = S - beta[j] * outer(k[j], k[j] @ S) + beta[j] * outer(k[j], v[j])
output o = K ** -0.5 * (q @ S)
"""


@case("gated deltaproduct", DELTAPRODUCT, "gated_delta_product")
def _deltaproduct(fla, x, S0):
    # fla interleaves the steps along time: step j of token t at t * NH + j
    steps = lambda z: z.transpose(2, 3).flatten(1, 2)
    return fla.naive_recurrent_gated_delta_product(
        x["q"], steps(x["k"]), steps(x["v"]), x["g"], steps(x["beta"]), scale=K ** -0.5,
        initial_state=S0.clone(), output_final_state=True, num_householder=NH)


def _inputs(rule, T, gate):
    gen = torch.Generator().manual_seed(T)
    x = {}
    for var in rule.inputs:
        shape = [B, T, H] + [{"K": K, "V": V, "NH": NH}[d] for d in var.dims]
        raw = torch.randn(shape, generator=gen, dtype=torch.float64)
        if var.name in ("k", "p"):  # unit keys, as the models feed them
            raw = F.normalize(raw, dim=-1)
        elif var.name in ("g", "gk"):
            raw = {"soft": -F.softplus(raw) * 0.5, "zero": torch.zeros_like(raw),
                   "dead": torch.full_like(raw, -1e4)}[gate]
        elif var.name in ("beta", "b", "w") and rule.name not in ("dplr", "iplr"):
            raw = torch.sigmoid(raw)
        elif var.name == "alpha":  # RWKV-7's alpha = -kappa, beta = kappa * a: |eigenvalues| <= 1
            raw = -F.normalize(raw, dim=-1)
        x[var.name] = raw
    if "alpha" in x:
        x["beta"] = -x["alpha"] * torch.sigmoid(x["beta"])
    S0 = 0.5 * torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    return x, S0


def _fla(folder):
    fla = load_fla_naive(folder)
    if fla is None:
        pytest.skip(f"fla's {folder}/naive.py is not available (pip install --no-deps fla-core einops)")
    return fla


def _results(fn, x, S0):
    """(o, final state, gradients of every input and of S0) under fixed upstream gradients."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    s0 = S0.detach().clone().requires_grad_(True)
    o, S = fn(leaves, s0)
    gen = torch.Generator().manual_seed(99)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    dS = torch.randn(S.shape, generator=gen, dtype=torch.float64)
    loss = (o.double() * do).sum() + (S.double() * dS).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()) + [s0])
    names = [f"d{n}" for n in leaves] + ["dS0"]
    return {"o": o.detach().double(), "final S": S.detach().double(),
            **{n: g.double() for n, g in zip(names, grads)}}


def _in_float32(call, fla, leaves, s0):
    """fla's reference on float32 copies (its loops are float32 and some mix no dtypes)."""
    return call(fla, {n: t.float() for n, t in leaves.items()}, s0.float())


def _close(got, want, what):
    # fla's loops run in float32: agree to its rounding, relative to each value's scale
    for name in want:
        err = (got[name] - want[name]).abs().max().item()
        scale = want[name].abs().max().item()
        assert err <= 2e-5 * max(scale, 1.0), f"{what} {name}: |diff| {err:.2e}, scale {scale:.2e}"


@pytest.mark.parametrize("T, gate", [(1, "soft"), (37, "soft"), (63, "soft"), (64, "soft"),
                                     (65, "soft"), (130, "soft"), (65, "zero"), (65, "dead")])
@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_chunk_matches_fla(name, T, gate):
    text, folder, call = CASES[name]
    fla = _fla(folder)
    rule = recdsl.compile(text)
    if gate != "soft" and not any(v.name in ("g", "gk") for v in rule.inputs):
        pytest.skip(f"{rule.name} has no gate")
    if name == "kda chunk":
        T = 64 * -(-T // 64)  # fla's naive_chunk_kda takes whole chunks
    x, S0 = _inputs(rule, T, gate)
    assert backends.available(rule)[0] == "torch-chunk"
    got = _results(lambda leaves, s0: rule(**leaves, initial_state=s0, output_final_state=True,
                                           backend="torch-chunk"), x, S0)
    want = _results(lambda leaves, s0: _in_float32(call, fla, leaves, s0), x, S0)
    if name == "kda chunk" and gate == "dead":
        # fla's chunk reference divides by span decays: NaN gradients at gates of -1e4.
        # recdsl has none; its reference there is fla's token loop instead.
        assert not all(torch.isfinite(w).all() for w in want.values())
        want = _results(lambda leaves, s0: _in_float32(_kda_recurrent, fla, leaves, s0), x, S0)
    _close(got, want, f"{name} T={T} gate={gate}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_chunk_matches_fla_under_the_interpreter(name):
    """The Triton chunk kernels (TRITON_INTERPRET=1), where the DPLR family has them."""
    text, folder, call = CASES[name]
    fla = _fla(folder)
    rule = recdsl.compile(text)
    reason = backends.problem(rule, "chunk")
    if reason is not None:
        pytest.skip(f"no chunk kernels for {rule.name}: {reason}")
    from recdsl.runtime.recurrent import triton_usable
    if not triton_usable(torch.device("cpu")):
        pytest.skip("Triton runs on the CPU only under TRITON_INTERPRET=1")
    T = 64 if name == "kda chunk" else 37
    x, S0 = _inputs(rule, T, "soft")
    got = _results(lambda leaves, s0: rule(**leaves, initial_state=s0, output_final_state=True,
                                           backend="chunk"), x, S0)
    want = _results(lambda leaves, s0: _in_float32(call, fla, leaves, s0), x, S0)
    _close(got, want, f"{name} chunk")
