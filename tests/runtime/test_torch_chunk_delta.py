"""backend="torch-chunk" for the delta family against the naive loop in float64.

Every comparison covers the outputs, the final states and the gradients of every input, param
and initial state (random upstream gradients). Rules: the four canonical delta rules
(DeltaProduct with NH = 2 and 3), and rules written here: negative eigenvalues
(beta = 2 sigmoid(b)), a Mamba-style gate computed from params, a decay of either sign after
the write with a right read and an extra term, two states read together, and two writes with
several outputs reading one state on each side. ``compare`` runs the gradient path and the
forward-only path (no autograd), which differ in their arrangement (chunk_delta_core).
"""
from __future__ import annotations

import pytest
import torch

import recdsl
from recdsl.errors import BackendError
from recdsl.runtime import chunk_delta_core, torch_chunk_delta
from recdsl.runtime.sample import sample_initial_state, sample_inputs
from tests.helpers import EXAMPLES, as_list, forward_backward

TOL64 = 1e-9
SIZES = {"K": 48, "V": 40}

NEGATIVE_EIGENVALUES = """
rule delta_negative
dims K, V
state S[K, V]
input q[K], k[K], v[V]
input b
let kn = l2norm(k)
let beta = 2 * sigmoid(b)           # in (0, 2): eigenvalues of I - beta kn knᵀ down to -1
S = S - beta * outer(kn, kn @ S) + beta * outer(kn, v)
output o = K ** -0.5 * (l2norm(q) @ S)
"""

MAMBA_GATE = """
rule gated_delta_mamba
dims K, V
state S[K, V]
input q[K], k[K], v[V]
input a, b
param A_log, dt_bias
let g = -exp(A_log) * softplus(a + dt_bias)
let kn = l2norm(k)
S = exp(g) * S
S = S - sigmoid(b) * outer(kn, kn @ S) + sigmoid(b) * outer(kn, v)
output o = K ** -0.5 * (l2norm(q) @ S)
"""

# a decay of either sign after the write, an unnormalised left read plus a per-token term,
# and a right read S @ w
DECAY_AFTER_WRITE = """
rule decay_after_write
dims K, V
state S[K, V]
input q[K], k[K], v[V], w[V]
input a, beta
param D
let kn = l2norm(k)
S = S - beta * outer(kn, kn @ S) + beta * outer(kn, v)
S = tanh(a) * S
output o = K ** -0.5 * (q @ S) + D * v
output r = S @ w
"""

TWO_STATES = """
rule two_states
dims K, V
state S[K, V], P[K, V]
input q[K], k[K], v[V]
input g, beta
let kn = l2norm(k)
S = exp(g) * S
S = S - beta * outer(kn, kn @ S) + beta * outer(kn, v)
P = P - 0.5 * outer(kn, kn @ P) + 0.5 * outer(kn, v)
output o = q @ S - 2 * (q @ P) + 0.5 * (k @ S)
"""

# two writes in one step, and two outputs reading the state on each side
TWO_READS = """
rule two_reads
dims K, V
state S[K, V]
input q[K], k[K], v[V], w[V]
input g, beta
let kn = l2norm(k)
S = exp(g) * S
S = S - beta * outer(kn, kn @ S) + beta * outer(kn, v) + 0.5 * beta * outer(kn, w)
output o = q @ S
output p = kn @ S
output r = S @ w
output s = S @ v
"""

PER_CHANNEL_DECAY = """
rule kda_like
dims K, V
state S[K, V]
input q[K], k[K], v[V], gk[K]
input beta
let kn = l2norm(k)
S = diag(exp(gk)) @ S
S = S - beta * outer(kn, kn @ S) + beta * outer(kn, v)
output o = q @ S
"""

CHAINED_READ = """
rule chained
dims K, V
state S[K, V], P[V, K]
input q[K], k[K], v[V]
input beta
let kn = l2norm(k)
let vn = l2norm(v)
S = S - beta * outer(kn, kn @ S) + beta * outer(kn, v)
P = P - beta * outer(vn, vn @ P) + beta * outer(vn, k)
let p = softmax(q @ S)
output o = p @ P
"""

NESTED_LOOPS = """
rule nested
dims K, V, NH, NI
state S[K, V]
input q[K], k[NH, K], v[NH, V], w[NI]
input beta
for j in NH:
    for i in NI:
        let kj = l2norm(k[j])
        S = S - beta * outer(kj, kj @ S) + beta * outer(kj, v[j])
output o = q @ S
"""

_RULES = {}


@pytest.fixture(autouse=True)
def one_thread():
    """The naive loop's many tiny ops are many times slower with a thread pool on a busy
    machine; one thread keeps this module fast. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rule(name):
    """A canonical rule by file name, or one of the rules above by variable name."""
    if name not in _RULES:
        text = globals().get(name)
        _RULES[name] = recdsl.compile(text) if text else recdsl.load(EXAMPLES / f"{name}.rec")
    return _RULES[name]


# (rule, extra dims): the cases run at every T
CANONICAL = [("delta", {}), ("gated_delta", {}), ("kla", {}),
             ("deltaproduct", {"NH": 2}), ("deltaproduct", {"NH": 3})]
WRITTEN = [("NEGATIVE_EIGENVALUES", {}), ("MAMBA_GATE", {}), ("DECAY_AFTER_WRITE", {}),
           ("TWO_STATES", {}), ("TWO_READS", {})]


def case_id(case):
    name, dims = case
    return name.lower() + "".join(f"-{k}{v}" for k, v in dims.items())


# ---------------------------------------------------------------- running and comparing


def make_leaves(r, *, time, dims, batch=2, heads=2, dtype=torch.float64, seed=0,
                sequences=None, initial=True):
    """Inputs, params and (optionally) initial states of ``r`` by name; initial states are
    named ``init:<state>``."""
    sizes = {**SIZES, **dims}
    leaves = sample_inputs(r, batch=batch, time=time, heads=heads, dims=sizes, dtype=dtype,
                           seed=seed)
    for name in ("a", "b"):  # the written rules' raw gate inputs: any real value
        if name in leaves:
            leaves[name] = torch.randn(leaves[name].shape, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed + 7)).to(dtype)
    if initial:
        states = sample_initial_state(r, batch=sequences or batch, heads=heads, dims=sizes,
                                      dtype=dtype, seed=seed)
        for s, t in zip(r.states, states if isinstance(states, tuple) else (states,)):
            leaves[f"init:{s.name}"] = t
    return leaves


def results(r, leaves, backend, cu_seqlens=None):
    """(outputs + final states, gradients by leaf name) of one call."""
    def fn(**t):
        init = tuple(t.get(f"init:{s.name}") for s in r.states)
        named = {n: v for n, v in t.items() if not n.startswith("init:")}
        out, final = r(**named, initial_state=init if any(i is not None for i in init) else None,
                       output_final_state=True, backend=backend, cu_seqlens=cu_seqlens)
        return as_list(out) + as_list(final)
    return forward_backward(fn, leaves)


def assert_close(got, want, tol, what):
    err = (got.double() - want.double()).abs().max().item()
    scale = max(1.0, want.double().abs().max().item())
    assert err <= tol * scale, f"{what}: max abs diff {err:.3e} (scale {scale:.3g})"


def forward_only(r, leaves, backend, cu_seqlens=None):
    """Outputs + final states of one call without autograd (torch-chunk's forward-only path)."""
    init = tuple(leaves.get(f"init:{s.name}") for s in r.states)
    named = {n: v for n, v in leaves.items() if not n.startswith("init:")}
    with torch.no_grad():
        out, final = r(**named, initial_state=init if any(i is not None for i in init) else None,
                       output_final_state=True, backend=backend, cu_seqlens=cu_seqlens)
    return as_list(out) + as_list(final)


def compare(r, leaves, tol=TOL64, cu_seqlens=None):
    """Outputs, final states and gradients against the naive loop, and the outputs and final
    states of the forward-only path (no autograd) too."""
    ref, ref_grads = results(r, leaves, "naive", cu_seqlens)
    got, got_grads = results(r, leaves, "torch-chunk", cu_seqlens)
    fwd = forward_only(r, leaves, "torch-chunk", cu_seqlens)
    names = [o.name for o in r.outputs] + [f"final {s.name}" for s in r.states]
    for name, g, f, w in zip(names, got, fwd, ref):
        assert g.shape == w.shape and f.shape == w.shape, name
        assert torch.isfinite(g).all() and torch.isfinite(f).all(), name
        assert_close(g, w, tol, name)
        assert_close(f, w, tol, f"{name} (forward only)")
    for name in leaves:
        assert ref_grads[name] is not None, f"no gradient reaches {name}"
        assert torch.isfinite(got_grads[name]).all(), f"grad {name}"
        assert_close(got_grads[name], ref_grads[name], tol, f"grad {name}")


# ---------------------------------------------------------------- against the naive loop


@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("case", CANONICAL, ids=case_id)
def test_canonical_rules_match_naive(case, T):
    name, dims = case
    r = rule(name)
    compare(r, make_leaves(r, time=T, dims=dims))


@pytest.mark.parametrize("T", [1, 64, 130])  # 64: whole chunks, read in place (no padding)
@pytest.mark.parametrize("case", WRITTEN, ids=case_id)
def test_written_rules_match_naive(case, T):
    name, dims = case
    r = rule(name)
    compare(r, make_leaves(r, time=T, dims=dims))


def test_forward_only_outputs_in_place_are_contiguous():
    """With whole chunks the forward-only path writes the reads straight into the outputs:
    each output its own contiguous tensor, also with two reads of one state on each side."""
    r = rule("TWO_READS")
    leaves = make_leaves(r, time=64, dims={})
    outs = forward_only(r, leaves, "torch-chunk")
    assert all(o.is_contiguous() for o in outs)
    assert len({o.data_ptr() for o in outs}) == len(outs)


def test_negative_eigenvalues_are_reached():
    """beta = 2 sigmoid(b) near 2 makes I - beta k kᵀ reflect along k: still exact."""
    r = rule("NEGATIVE_EIGENVALUES")
    leaves = make_leaves(r, time=130, dims={})
    leaves["b"] = 4.0 + leaves["b"].abs()  # beta in (1.96, 2)
    compare(r, leaves)


def test_without_initial_state():
    r = rule("gated_delta")
    compare(r, make_leaves(r, time=65, dims={}, initial=False))


def test_default_chunk_size_by_device():
    assert torch_chunk_delta.CHUNK_SIZE is None
    assert torch_chunk_delta.DEVICE_CHUNK_SIZES["cpu"] == 32
    assert torch_chunk_delta.DEFAULT_CHUNK_SIZE == 64


@pytest.mark.parametrize("chunk", [16, 64])  # 32 is the CPU default, run everywhere else
@pytest.mark.parametrize("case", [("gated_delta", {}), ("deltaproduct", {"NH": 3})], ids=case_id)
def test_chunk_sizes(case, chunk, monkeypatch):
    monkeypatch.setattr(torch_chunk_delta, "CHUNK_SIZE", chunk)
    name, dims = case
    r = rule(name)
    compare(r, make_leaves(r, time=75, dims=dims))


@pytest.mark.parametrize("case", [("gated_delta", {}), ("deltaproduct", {"NH": 2}),
                                  ("DECAY_AFTER_WRITE", {})], ids=case_id)
def test_chunks_in_groups(case, monkeypatch):
    """Long inputs go through the chunks a group at a time (bounded temporaries): with groups
    of one or two chunks the results are the same, on both paths."""
    monkeypatch.setattr(chunk_delta_core, "GROUP_ELEMENTS", 1)
    monkeypatch.setitem(chunk_delta_core.FORWARD_GROUP_ELEMENTS, "cpu", 1)
    monkeypatch.setattr(torch_chunk_delta, "CHUNK_SIZE", 16)
    name, dims = case
    r = rule(name)
    compare(r, make_leaves(r, time=75, dims=dims))
    monkeypatch.setattr(chunk_delta_core, "GROUP_ELEMENTS", 2 * 4 * 16 * (48 + 40))  # groups of 2 chunks (1 for NH = 2)
    # groups of 2 chunks in the forward-only path (1 for NH = 2): the last group is partial
    monkeypatch.setitem(chunk_delta_core.FORWARD_GROUP_ELEMENTS, "cpu", 2 * 4 * 16 * (16 + 48 + 40))
    compare(r, make_leaves(r, time=75, dims=dims))


@pytest.mark.parametrize("case", [("gated_delta", {}), ("deltaproduct", {"NH": 2}),
                                  ("DECAY_AFTER_WRITE", {}), ("TWO_READS", {})], ids=case_id)
def test_forward_only_exact_decays(case, monkeypatch):
    """The forward-only path factors each chunk's decays unless their log spread is too wide;
    forced to the exact float64 differences everywhere, it gives the same values."""
    monkeypatch.setattr(chunk_delta_core, "SPREAD_LIMIT", {torch.float64: -1.0})
    name, dims = case
    r = rule(name)
    compare(r, make_leaves(r, time=130, dims=dims))


def test_forward_only_mixes_factored_and_exact_groups(monkeypatch):
    """Gates of -1e4 in the second chunk only: with groups of one chunk, that chunk takes the
    exact decays and its neighbours the factored ones, in float64 and in float32."""
    monkeypatch.setitem(chunk_delta_core.FORWARD_GROUP_ELEMENTS, "cpu", 1)
    r = rule("gated_delta")
    leaves = make_leaves(r, time=130, dims={})
    g = leaves["g"].clone()
    g[:, 40:44] = -1e4
    leaves["g"] = g
    compare(r, leaves)
    ref = forward_only(r, leaves, "naive")
    got = forward_only(r, {n: v.float() for n, v in leaves.items()}, "torch-chunk")
    for g32, g64 in zip(got, ref):
        assert torch.isfinite(g32).all()
        assert_close(g32, g64, 1e-4, "float32 forward only")


@pytest.mark.parametrize("case", [("gated_delta", {}), ("kla", {}), ("deltaproduct", {"NH": 2}),
                                  ("TWO_STATES", {})], ids=case_id)
def test_three_packed_sequences(case):
    """Lengths 1, 70 and 59 packed in one row (B = 1): chunks restart at each sequence, each
    with its own initial and final state."""
    name, dims = case
    r = rule(name)
    cu = torch.tensor([0, 1, 71, 130])
    leaves = make_leaves(r, time=130, dims=dims, batch=1, sequences=3)
    compare(r, leaves, cu_seqlens=cu)


def test_packed_equals_separate_calls():
    r = rule("gated_delta")
    leaves = make_leaves(r, time=130, dims={}, batch=1, sequences=3)
    cu = [0, 1, 71, 130]
    packed, _ = results(r, leaves, "torch-chunk", torch.tensor(cu))
    for n, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        one = {k: (v[n:n + 1] if k.startswith("init:") else v[:, s:e]) for k, v in leaves.items()}
        alone, _ = results(r, one, "torch-chunk")
        assert_close(packed[0][:, s:e], alone[0], TOL64, f"sequence {n} output")
        assert_close(packed[1][n:n + 1], alone[1], TOL64, f"sequence {n} final state")


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("gate", ["zero", "very_negative", "mixed"])
def test_extreme_gates(gate):
    """Gates of exactly 0 (no decay) and of -1e4 (a decay of exactly 0): no inf or NaN, and
    the same values as the naive loop, in float64 and (finite, close) in float32."""
    r = rule("gated_delta")
    leaves = make_leaves(r, time=130, dims={})
    g = leaves["g"]
    if gate == "zero":
        leaves["g"] = torch.zeros_like(g)
    elif gate == "very_negative":
        leaves["g"] = torch.full_like(g, -1e4 / 64)  # -1e4 over each chunk
    else:
        g = g.clone()
        g[:, ::7] = 0.0
        g[:, 3::11] = -1e4  # a single gate of -1e4 inside a chunk, then ordinary ones
        leaves["g"] = g
    compare(r, leaves)
    single = {k: v.float() for k, v in leaves.items()}
    got, grads = results(r, single, "torch-chunk")
    fwd = forward_only(r, single, "torch-chunk")
    ref, ref_grads = results(r, leaves, "naive")
    for g32, f32, g64 in zip(got, fwd, ref):
        assert torch.isfinite(g32).all() and torch.isfinite(f32).all()
        assert_close(g32, g64, 2e-4, "float32 value")
        assert_close(f32, g64, 2e-4, "float32 value (forward only)")
    for name in leaves:
        assert torch.isfinite(grads[name]).all(), name
        assert_close(grads[name], ref_grads[name], 2e-3, f"float32 grad {name}")


def test_kla_zero_norm_key():
    """KLA's beta = eta / (dot(k, k) + eps) is eta / eps for a zero key: huge, but beta k kᵀ
    and beta k vᵀ are 0; nothing becomes NaN, and the values match the naive loop."""
    r = rule("kla")
    leaves = make_leaves(r, time=130, dims={})
    k = leaves["k"].clone()
    k[:, 5] = 0.0
    k[:, 64] = 0.0  # the first token of the second chunk
    k[:, 100, 1] = 0.0
    leaves["k"] = k
    compare(r, leaves)
    single = {n: v.float() for n, v in leaves.items()}
    got, grads = results(r, single, "torch-chunk")
    for t in got + list(grads.values()):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("case", [("gated_delta", {}), ("deltaproduct", {"NH": 2}), ("kla", {}),
                                  ("NEGATIVE_EIGENVALUES", {})], ids=case_id)
def test_float32_against_float64(case):
    name, dims = case
    r = rule(name)
    leaves = make_leaves(r, time=130, dims=dims)
    ref, ref_grads = results(r, leaves, "naive")
    got, grads = results(r, {n: v.float() for n, v in leaves.items()}, "torch-chunk")
    fwd = forward_only(r, {n: v.float() for n, v in leaves.items()}, "torch-chunk")
    for g32, f32, g64 in zip(got, fwd, ref):
        assert g32.dtype == torch.float32 and f32.dtype == torch.float32
        assert_close(g32, g64, 1e-4, "value")
        assert_close(f32, g64, 1e-4, "value (forward only)")
    for n in leaves:
        assert grads[n].dtype == torch.float32
        assert_close(grads[n], ref_grads[n], 1e-3, f"grad {n}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """fp16/bf16 inputs are computed in fp32: outputs come back in the input dtype, final
    states in fp32, both close to float64 on the same (rounded) values."""
    r = rule("gated_delta")
    leaves = make_leaves(r, time=130, dims={}, initial=False)
    half = {n: v.to(dtype) for n, v in leaves.items()}
    out, final = r(**half, backend="torch-chunk", output_final_state=True)
    want, want_final = r(**{n: v.double() for n, v in half.items()}, backend="naive",
                         output_final_state=True)
    assert out.dtype == dtype and final.dtype == torch.float32
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    assert_close(out, want, tol, "output")
    assert_close(final, want_final, 1e-5, "final state")
    x = {n: v.detach().requires_grad_() for n, v in half.items()}
    o, _ = r(**x, backend="torch-chunk")
    o.float().square().sum().backward()
    for n, v in x.items():
        assert v.grad.dtype == dtype and torch.isfinite(v.grad.float()).all(), n


@pytest.mark.parametrize("T", [16384, 65536])
def test_long_sequences_stay_finite(T):
    """A few seconds each on one core (B=1, H=2, K=V=64)."""
    r = rule("gated_delta")
    x = sample_inputs(r, batch=1, time=T, heads=2, dims={"K": 64, "V": 64})
    with torch.no_grad():
        out, final = r(**x, backend="torch-chunk", output_final_state=True)
        last, _ = r(**{n: v[:, -64:] for n, v in x.items()}, backend="naive")
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    # the state stays bounded (a contraction of the writes), and the last chunk agrees with the
    # naive loop started from zero there to within the decay of the earlier history
    assert final.abs().max().item() < 100
    assert out.abs().max().item() < 100
    assert (out[:, -1] - last[:, -1]).abs().max().item() < 1e-2


# ---------------------------------------------------------------- dispatch and refusals


@pytest.mark.parametrize("name", ["delta", "gated_delta", "kla", "deltaproduct",
                                  "NEGATIVE_EIGENVALUES", "MAMBA_GATE", "DECAY_AFTER_WRITE",
                                  "TWO_STATES", "TWO_READS"])
def test_auto_picks_torch_chunk_on_cpu(name):
    r = rule(name)
    assert r.family == "delta"
    assert torch_chunk_delta.problem(r) is None
    assert r.backends()[0] == "torch-chunk"


def test_auto_runs_torch_chunk(monkeypatch):
    r = rule("gated_delta")
    called = []
    real = torch_chunk_delta.run
    monkeypatch.setattr(torch_chunk_delta, "run", lambda rule, call: called.append(1) or real(rule, call))
    r(**make_leaves(r, time=5, dims={}, initial=False))
    assert called == [1]


REFUSALS = [
    ("PER_CHANNEL_DECAY",
     "the per-channel decay diag(exp(gk)) @ S before the erase (line 8) has no numerically "
     "stable chunkwise form here; backend='recurrent' runs it"),
    ("CHAINED_READ", "p reads the states and feeds another read (a chained read)"),
    ("NESTED_LOOPS", "the update of S is inside nested 'for' loops (line 8)"),
]


@pytest.mark.parametrize("name,reason", REFUSALS, ids=[n.lower() for n, _ in REFUSALS])
def test_refuses_with_a_reason(name, reason):
    r = rule(name)
    assert r.family == "delta"
    assert torch_chunk_delta.problem(r) == reason
    if name == "PER_CHANNEL_DECAY":
        # the DPLR family's module takes what the delta module refuses (KDA's form)
        from recdsl.runtime import backends
        assert backends._family_of(r, backends._BY_NAME["torch-chunk"]) == "dplr"
        assert r.backends()[0] == "torch-chunk"
        return
    assert "torch-chunk" not in r.backends()
    dims = {"NH": 2, "NI": 2} if "NH" in r.dims else {}
    leaves = make_leaves(r, time=3, dims=dims, initial=False)
    with pytest.raises(BackendError) as err:
        r(**leaves, backend="torch-chunk")
    assert str(err.value) == (f"backend 'torch-chunk' is not available for rule '{r.name}': "
                              f"{reason}; use backend='naive' or 'auto'")
    out, _ = r(**leaves)  # auto falls back
    assert torch.isfinite(as_list(out)[0]).all()


def test_refuses_other_families():
    r = recdsl.load(EXAMPLES / "gla.rec")
    assert torch_chunk_delta.problem(r) == "rule 'gla' is in the diagonal family, not delta"


def test_bad_chunk_size():
    r = rule("gated_delta")
    call = r.bind(**make_leaves(r, time=3, dims={}, initial=False))
    with pytest.raises(BackendError, match="chunk size must be a positive integer"):
        torch_chunk_delta.run(r, call, chunk_size=0)
