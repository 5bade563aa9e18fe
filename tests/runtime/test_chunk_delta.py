"""backend="chunk" for the delta family (generated Triton prologue + WY/UT core, run by the
interpreter) against the naive loop in float64: outputs, final states and the gradients of
every input, param and initial state, with random upstream gradients.

Pass rule (TESTING.md): the chunk error against the float64 result is at most 10x the naive
loop's own float32 error (2x for half inputs), with a floor. Shapes are small (the interpreter
is slow); most cases use 16-token chunks so that T = 15, 16, 17, 33 cross chunk boundaries the
way 63, 64, 65, 130 do at the default 64."""
import pytest
import torch

import recdsl
from recdsl.codegen import chunk_delta as core
from recdsl.codegen import prologue
from recdsl.errors import BackendError
from recdsl.runtime import backends, chunk_delta
from recdsl.runtime.sample import sample_inputs
from tests.helpers import EXAMPLES

FLOOR = 3e-6
SMALL = 1e-3  # below this rms a value counts as zero: errors are measured against this scale


def _load(name):
    return recdsl.load(EXAMPLES / f"{name}.rec")


def _sizes(rule, nh=2):
    return {d: {"K": 48, "V": 40, "NH": nh}[d] for d in rule.dims}


def _rms_ratio(x, golden):
    scale = max(golden.pow(2).mean().sqrt().item(), SMALL)
    return (x.double() - golden).pow(2).mean().sqrt().item() / scale


def _run(rule, tensors, initial, backend, dtype, cu_seqlens=None, chunk_size=None, seed=5):
    leaves = {k: v.to(dtype).clone().requires_grad_(True) for k, v in tensors.items()}
    init = initial.to(dtype).clone().requires_grad_(True) if initial is not None else None
    if backend == "chunk" and chunk_size is not None:
        call = rule.bind(**leaves, initial_state=init, cu_seqlens=cu_seqlens)
        (out,), (final,) = chunk_delta.run(rule, call, chunk_size=chunk_size)
    else:
        out, final = rule(**leaves, initial_state=init, output_final_state=True, backend=backend,
                          cu_seqlens=cu_seqlens)
    results = {"out": out, "final": final}
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in results.values()]
    loss = sum((r.double() * u).sum() for r, u in zip(results.values(), ups))
    wrt = dict(leaves, **({"initial": init} if init is not None else {}))
    grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
    values = {n: r.detach().double() for n, r in results.items()}
    for n, gr, w in zip(wrt, grads, wrt.values()):
        values[f"d{n}"] = (gr if gr is not None else torch.zeros_like(w)).double()
    return values


def _compare(rule, tensors, initial=None, cu_seqlens=None, chunk_size=16, dtype=torch.float32):
    golden = _run(rule, tensors, initial, "naive", torch.float64, cu_seqlens)
    reference = _run(rule, tensors, initial, "naive", dtype, cu_seqlens)
    got = _run(rule, tensors, initial, "chunk", dtype, cu_seqlens, chunk_size)
    factor, floor = (10, FLOOR) if dtype == torch.float32 else (2, 2e-3)
    assert got.keys() == golden.keys()
    for name in golden:
        assert torch.isfinite(got[name]).all(), f"{rule.name} {name}: not finite"
        err = _rms_ratio(got[name], golden[name])
        allowed = max(factor * _rms_ratio(reference[name], golden[name]), floor)
        assert err <= allowed, f"{rule.name} {name}: rms ratio {err:.2e} > {allowed:.2e}"
    return got


def _inputs(rule, T, B=1, H=1, seed=0, nh=2, sequences=None):
    sizes = _sizes(rule, nh)
    tensors = sample_inputs(rule, batch=B, time=T, heads=H, dims=sizes, dtype=torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    initial = 0.5 * torch.randn([sequences or B, H, sizes["K"], sizes["V"]], generator=g,
                                dtype=torch.float64)
    return tensors, initial


CASES = [("delta", 17, 1), ("gated_delta", 1, 1), ("gated_delta", 15, 1), ("gated_delta", 16, 1),
         ("gated_delta", 33, 1), ("kla", 17, 1), ("deltaproduct", 1, 2), ("deltaproduct", 17, 2),
         ("deltaproduct", 17, 3)]


@pytest.mark.parametrize("name,T,nh", [("delta", 1, 1), ("kla", 1, 1), ("deltaproduct", 16, 3),
                                       ("deltaproduct", 33, 3)])
def test_matches_naive_two_heads(name, T, nh):
    rule = _load(name)
    tensors, initial = _inputs(rule, T, H=2, nh=nh)
    _compare(rule, tensors, initial)


@pytest.mark.parametrize("name,T,nh", CASES, ids=[f"{n}{'-nh' + str(h) if n == 'deltaproduct' else ''}-T{t}"
                                                 for n, t, h in CASES])
def test_matches_naive_with_initial_state(name, T, nh):
    rule = _load(name)
    tensors, initial = _inputs(rule, T, nh=nh)
    _compare(rule, tensors, initial)


def test_default_chunk_size_through_the_rule_call():
    """backend='chunk' from the call contract: 64-token chunks, T = 65 spills into a second."""
    rule = _load("gated_delta")
    tensors, initial = _inputs(rule, 65)
    _compare(rule, tensors, initial, chunk_size=None)


@pytest.mark.parametrize("T", [63, 64, pytest.param(130, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name,nh", [("gated_delta", 1), ("deltaproduct", 2), ("deltaproduct", 3)])
def test_default_chunk_size(name, nh, T):
    """64 tokens of one step, 32 of two, 16 of three (padded to four) per chunk."""
    rule = _load(name)
    tensors, initial = _inputs(rule, T, nh=nh)
    _compare(rule, tensors, initial, chunk_size=None)


@pytest.mark.parametrize("name,nh", [("gated_delta", 1), ("deltaproduct", 2)])
def test_three_packed_sequences(name, nh):
    """The second sequence crosses a chunk boundary; each has its own initial state; two heads."""
    rule = _load(name)
    tensors, initial = _inputs(rule, 30, H=2, nh=nh, sequences=3)
    _compare(rule, tensors, initial, cu_seqlens=torch.tensor([0, 5, 21, 30]))


def test_empty_packed_sequences_keep_their_states():
    """Sequences with no token (first, middle, last): the final state is the initial one and
    its gradient goes back unchanged, and their neighbours' states are untouched (an empty
    sequence's chunk slot is the next sequence's: the walk must not write there)."""
    rule = _load("gated_delta")
    tensors, initial = _inputs(rule, 20, H=2, sequences=5)
    cu = torch.tensor([0, 0, 5, 5, 20, 20])
    _compare(rule, tensors, initial, cu_seqlens=cu)
    _, final = rule(**{k: v.float() for k, v in tensors.items()}, initial_state=initial.float(),
                    output_final_state=True, cu_seqlens=cu, backend="chunk")
    for empty in (0, 2, 4):
        assert torch.equal(final[empty], initial[empty].float())


@pytest.mark.parametrize("gate", [0.0, -1e4])
def test_gates_zero_and_very_negative(gate):
    rule = _load("gated_delta")
    tensors, initial = _inputs(rule, 20)
    tensors["g"] = torch.full_like(tensors["g"], gate)
    tensors["g"][:, ::3] = -30.0  # mixed with strong decays elsewhere
    _compare(rule, tensors, initial)


def test_kla_key_of_zero_norm():
    """beta = eta / (0 + eps) is huge, but it multiplies a zero key: no NaN, exact values."""
    rule = _load("kla")
    tensors, initial = _inputs(rule, 17, H=2)
    tensors["k"][:, 3] = 0.0
    tensors["k"][:, 11, 1] = 0.0
    _compare(rule, tensors, initial)


NEGATIVE_MAMBA = """
rule neg_mamba_delta

dims K, V
state S[K, V]
input q[K], k[K], v[V]
input a, b
param A_log, dt_bias

let kn = l2norm(k)
let beta = 2 * sigmoid(b)              # up to 2: negative eigenvalues
S = exp(-exp(A_log) * softplus(a + dt_bias)) * S
S = S - beta * outer(kn, kn @ S) + beta * outer(kn, v)

output o = l2norm(q) @ S
"""

DECAY_AFTER_WRITE = """
rule decay_after_write

dims K, V
state S[K, V]
input q[K], k[K], v[V], w[V]
input g, beta
param D

let kn = l2norm(k)
S = S - beta * outer(kn, kn @ S)
S = S + outer(kn, v)                   # a write of strength 1, not beta
S = exp(g) * S                         # decays the write made before it
output o = q @ S + D * w               # a term beside the read
"""


def test_negative_eigenvalues_and_a_mamba_gate_from_params():
    rule = recdsl.compile(NEGATIVE_MAMBA)
    tensors, initial = _inputs(rule, 17)
    tensors["b"] = 3.0 * tensors["b"] + 2.0  # beta close to 2
    got = _compare(rule, tensors, initial)
    assert got["dA_log"].abs().sum() > 0 and got["ddt_bias"].abs().sum() > 0


def test_decay_after_the_write_and_an_extra_output_term():
    rule = recdsl.compile(DECAY_AFTER_WRITE)
    tensors, initial = _inputs(rule, 17)
    _compare(rule, tensors, initial)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    rule = _load("gated_delta")
    tensors, initial = _inputs(rule, 17)
    _compare(rule, tensors, initial, dtype=dtype)


@pytest.mark.parametrize("name,nh", [("gated_delta", 1), ("deltaproduct", 3)])
def test_gpu_tiling_under_the_interpreter(name, nh, monkeypatch):
    """The GPU configuration walks K in tiles of 32 and V in tiles of 32 (K = 48, V = 40: a
    partial tile each); run it here with ieee products."""
    config = core.config
    monkeypatch.setattr(core, "config", lambda *a, gpu=True, **k: dict(config(*a, gpu=True, **k), DOT="ieee"))
    rule = _load(name)
    tensors, initial = _inputs(rule, 17, nh=nh)
    _compare(rule, tensors, initial)


# ---------------------------------------------------------------- what chunk refuses


PER_CHANNEL = """
rule channel_delta

dims K, V
state S[K, V]
input q[K], k[K], v[V]
input gk[K], beta

S = diag(exp(gk)) @ S
S = S - beta * outer(k, k @ S) + beta * outer(k, v)

output o = q @ S
"""


def test_per_channel_decay_before_the_erase_is_refused_with_the_reason():
    rule = recdsl.compile(PER_CHANNEL)
    assert rule.family == "delta"
    reason = chunk_delta.problem(rule)
    assert reason == ("the per-channel decay diag(exp(gk)) @ S before the erase is not supported "
                      "chunkwise (use the recurrent backend)")
    # the chunk backend goes on to the DPLR family's core (recdsl.runtime.chunk_dplr)
    assert backends._family_of(rule, backends._BY_NAME["chunk"]) == "dplr"


def test_recurrent_only_rule_is_refused():
    # gates that read the cell's own output through R @ h: no family, no stage goes first
    rule = recdsl.compile("rule cell\ndims D\nstate c[D], h[D]\ninput x[D], f[D]\n"
                          "param R[D, D]\nlet g = sigmoid(f + R @ h)\n"
                          "c = g * c + (1 - g) * tanh(x)\nh = tanh(c)\noutput y = h\n")
    with pytest.raises(BackendError, match="backend 'chunk' is not available for rule 'cell': "
                                           "rule 'cell' has no chunkwise form"):
        rule(**sample_inputs(rule, batch=1, time=2, heads=1, dims={"D": 4}), backend="chunk")


def test_chunk_size_must_be_16_32_or_64():
    rule = _load("delta")
    call = rule.bind(**sample_inputs(rule, batch=1, time=2, heads=1, dims={"K": 4, "V": 3}))
    with pytest.raises(BackendError, match="^chunk_size must be one of 16, 32, 64; got 48$"):
        chunk_delta.run(rule, call, chunk_size=48)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rule = _load("delta")
    with pytest.raises(BackendError, match="backend 'chunk' runs Triton kernels: it needs CUDA"):
        rule(**sample_inputs(rule, batch=1, time=2, heads=1, dims={"K": 4, "V": 3}), backend="chunk")


def test_auto_picks_chunk_on_cuda_when_the_rule_has_the_form():
    assert _load("gated_delta").backends("cuda")[0] == "chunk"
    assert recdsl.compile(PER_CHANNEL).backends("cuda")[0] == "chunk"  # the DPLR core
    assert _load("mlstm").backends("cuda")[0] == "chunk"  # in stages: m, then C and n
    assert backends.available(_load("kla"), "cuda")[0] == "chunk"


# ---------------------------------------------------------------- the prologue's math


def test_prologue_takes_the_rules_own_per_token_math():
    from recdsl.ir.pretty import unparse
    plan = prologue.plan(_load("kla"), {"K": 4, "V": 3})
    assert [unparse(e) for e in (plan.keys[0], plan.betas[0], plan.writes[0], plan.log_decay, plan.read)] == \
        ["k", "eta / (dot(k, k) + eps)", "eta / (dot(k, k) + eps) * v", "g", "K ** -0.5 * l2norm(q)"]
    plan = prologue.plan(recdsl.compile(DECAY_AFTER_WRITE), {"K": 4, "V": 3})
    assert [unparse(e) for e in (plan.betas[0], plan.writes[0], plan.log_decay, plan.extra)] == \
        ["beta", "exp(g) * v", "g", "D * w"]
    plan = prologue.plan(recdsl.compile(NEGATIVE_MAMBA), {"K": 4, "V": 3})
    assert unparse(plan.log_decay) == "-exp(A_log) * softplus(a + dt_bias)"
    assert prologue.plan(_load("deltaproduct"), {"K": 4, "V": 3, "NH": 3}).steps == 3


# ---------------------------------------------------------------- ahead-of-time builds


@pytest.mark.slow
@pytest.mark.parametrize("name,nh,arch", [("gated_delta", 1, "sm_90"), ("deltaproduct", 3, "sm_90"),
                                          ("deltaproduct", 2, "sm_80")])
def test_kernels_build_at_128_without_spills(name, nh, arch):
    """Real builds (ptxas) at K = V = 128: the core's nine kernels and the rule's prologue, no
    spills, shared memory within the GPU's limit (bwd_dk spilled on sm_80 at NH = 2 with
    32 x 32 tiles). benchmarks/aot_matrix.py builds the whole matrix."""
    from recdsl.codegen import aot
    arch = aot.ARCHS[arch]
    rule = _load(name)
    sizes = {d: {"K": 128, "V": 128, "NH": nh}[d] for d in rule.dims}
    builds = aot.build_module(core.aot_module(128, 128, nh), arch)
    builds += aot.build_module(prologue.aot_module(rule, sizes), arch)
    assert len(builds) == len(core.KERNELS) + 2
    assert aot.problems(builds, arch) == []
