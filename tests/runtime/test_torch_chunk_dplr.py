"""The DPLR family's chunkwise PyTorch path (``recdsl.runtime.torch_chunk_dplr``) against the
naive loop: outputs, final states and the gradients of every input, param and initial state
(random upstream gradients), float64 (against the float64 loop) and float32 (TESTING.md's
rule: at most 10x the naive loop's own float32 error).

Rules written here: KDA, RWKV-7 in its own ``[V, K]`` orientation with its bonus term, DPLR
(a rank-one factor beside a per-channel decay, one statement), IPLR, GDN-2, Comba and gated
DeltaProduct with a per-channel decay (NH = 2). Gates of exactly 0, of -1e4 and mixed; packed
sequences; initial states; and a loop written here from fla's ``naive_recurrent_kda``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import recdsl
from recdsl.errors import BackendError
from recdsl.ir import dplr
from recdsl.ir.builtins import L2NORM_EPS
from recdsl.runtime import backends, torch_chunk_dplr
from tests.helpers import assert_matches_naive, random_args, rule_results

KDA = """
rule kda
dims K, V
state S[K, V]
input q[K], k[K], v[V], gk[K]
input beta
let kn = l2norm(k)
S = diag(exp(gk)) @ S
S = S - beta * outer(kn, kn @ S) + beta * outer(kn, v)
output o = K ** -0.5 * (l2norm(q) @ S)
"""

# fla's gate: gk = -exp(A_log) * softplus(g + dt_bias), per channel
KDA_FLA_GATE = """
rule kda_fla_gate
dims K, V
state S[K, V]
input q[K], k[K], v[V], g[K]
input beta
param A_log, dt_bias[K]
let kn = l2norm(k)
S = diag(exp(-exp(A_log) * softplus(g + dt_bias))) @ S
S = S - beta * outer(kn, kn @ S) + beta * outer(kn, v)
output o = K ** -0.5 * (l2norm(q) @ S)
"""

RWKV7 = """
rule rwkv7
dims V, K
state S[V, K]
input r[K], k[K], v[V], gk[K], kk[K], a[K]
param u[K]
let kn = l2norm(kk)
S = S @ diag(exp(gk))
S = S - outer(S @ kn, kn * a)
S = S + outer(v, k)
output o = S @ r + dot(r, k * u) * v
"""

DPLR = """
rule dplr
dims K, V
state S[K, V]
input q[K], k[K], v[V], a[K], b[K], gk[K]
S = diag(exp(gk)) @ S + outer(b, a @ S) + outer(k, v)
output o = q @ S
"""

IPLR = """
rule iplr
dims K, V
state S[K, V]
input q[K], k[K], v[V], a[K], b[K]
S = S + outer(b, a @ S) + outer(k, v)
output o = q @ S
"""

GDN2 = """
rule gdn2
dims K, V
state S[K, V]
input q[K], k[K], v[V], b[K], w[V], gk[K]
let kn = l2norm(k)
S = diag(exp(gk)) @ S
S = S - outer(kn, (b * kn) @ S) + outer(kn, w * v)
output o = l2norm(q) @ S
"""

COMBA = """
rule comba
dims K, V
state S[K, V]
input q[K], k[K], p[K], v[V], gk
input beta
let kn = l2norm(k)
let pn = l2norm(p)
S = exp(gk) * S - beta * outer(pn, kn @ S) + beta * outer(kn, v)
output o = l2norm(q) @ S
"""

DELTAPRODUCT = """
rule gated_deltaproduct_channel
dims K, V, NH
state S[K, V]
input q[K], k[NH, K], v[NH, V], beta[NH], gk[K]
S = diag(exp(gk)) @ S
for j in NH:
    let kj = l2norm(k[j])
    S = S - beta[j] * outer(kj, kj @ S) + beta[j] * outer(kj, v[j])
output o = K ** -0.5 * (l2norm(q) @ S)
"""

# two writes in one step after the erase, a decay after them, two outputs
TWO_WRITES = """
rule two_writes
dims K, V
state S[K, V]
input q[K], k[K], v[V], x[K], y[V], gk[K], c
let kn = l2norm(k)
S = S - 0.5 * outer(kn, kn @ S) + outer(kn, v) + 0.1 * outer(x, y)
S = diag(exp(gk)) @ S
S = tanh(c) * S
output o = q @ S
output p = 2 * (k @ S) + v
"""

RULES = {"kda": KDA, "kda_fla_gate": KDA_FLA_GATE, "rwkv7": RWKV7, "dplr": DPLR,
         "iplr": IPLR, "gdn2": GDN2, "comba": COMBA, "deltaproduct": DELTAPRODUCT,
         "two_writes": TWO_WRITES}
SIZES = {"K": 48, "V": 40, "NH": 2}
BACKEND = "torch-chunk-dplr"


@pytest.fixture
def dplr_backend(monkeypatch):
    """This module's run registered as a backend (until the registry hooks the family in)."""
    monkeypatch.setattr(backends, "NAMES", backends.NAMES + (BACKEND,))
    monkeypatch.setitem(backends._RUNNERS, BACKEND, torch_chunk_dplr.run)


def _shaper(rule_name, gate):
    def shape(name, x):
        if name == "gk":
            if gate == "zero":
                return torch.zeros_like(x)
            if gate == "dead":
                return torch.full_like(x, -1e4)
            if gate == "mixed":
                pick = torch.randint(0, 3, x.shape, generator=torch.Generator().manual_seed(3))
                soft = -F.softplus(x)
                return torch.where(pick == 0, torch.zeros_like(x),
                                   torch.where(pick == 1, torch.full_like(x, -1e4), soft))
            return -F.softplus(x) * 0.5
        if name in ("beta", "a") and rule_name not in ("dplr", "iplr"):
            return torch.sigmoid(x)
        if name in ("a", "b") and rule_name in ("dplr", "iplr"):
            return 0.15 * x  # I + b aᵀ stays near the identity
        if name in ("b", "w"):
            return torch.sigmoid(x)
        if name == "A_log":
            return 0.3 * x
        return x
    return shape


def _args(rule, name, time, gate="soft", batch=2, heads=2, initial=True, sequences=None,
          sizes=None):
    shaper = _shaper(name, gate)
    sizes = sizes or SIZES
    inputs, params, states = random_args(
        rule, batch=batch, time=time, heads=heads, sizes={d: sizes[d] for d in rule.dims},
        initial_state=initial, sequences=sequences,
        shape_values={v.name: (lambda n: lambda x: shaper(n, x))(v.name)
                      for v in list(rule.inputs) + list(rule.params)})
    return {**inputs, **params}, tuple(s * 0.5 for s in states.values()) or None


# ---------------------------------------------------------------- the plan


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_here_is_planned(name):
    rule = recdsl.compile(RULES[name])
    p = dplr.plan(rule.analysis)
    assert torch_chunk_dplr.problem(rule) is None
    assert p.describe().startswith("DPLR transitions")


def test_rwkv7_is_planned_transposed():
    p = dplr.plan(recdsl.compile(RWKV7).analysis)
    sp = p.states["S"]
    assert sp.orientation == "right" and (sp.key_dim, sp.value_dim) == ("K", "V")


REFUSED = {
    "a value-axis decay": ("""
rule value_decay
dims K, V
state S[K, V]
input q[K], k[K], v[V], w[V]
S = S @ diag(exp(w))
S = S - 0.5 * outer(k, k @ S) + outer(k, v)
output o = q @ S
""", "value axis"),
    "a read along the value axis": ("""
rule value_read
dims K, V
state S[K, V]
input q[V], k[K], v[V]
S = S - 0.5 * outer(k, k @ S) + outer(k, v)
output o = S @ q
""", "key axis"),
    "rank-one factors on both sides": ("""
rule both_sides
dims K
state S[K, K]
input q[K], k[K]
S = S - 0.5 * outer(k, k @ S)
S = S - 0.5 * outer(S @ k, k)
output o = q @ S
""", "both sides"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_say_why(case):
    text, words = REFUSED[case]
    rule = recdsl.compile(text)
    with pytest.raises(dplr.NotDplr) as err:
        dplr.plan(rule.analysis)
    assert words in err.value.reason and err.value.pos is not None
    assert words in torch_chunk_dplr.problem(rule)
    x = {v.name: torch.randn([1, 3, 1] + [4 for _ in v.dims]) for v in rule.inputs}
    with pytest.raises(BackendError):
        torch_chunk_dplr.run(rule, rule.bind(**x))


# ---------------------------------------------------------------- against the naive loop


@pytest.mark.parametrize("time", [1, 37, 63, 64, 65, 130])
@pytest.mark.parametrize("name", ["kda", "rwkv7"])
def test_kda_and_rwkv7_float64(dplr_backend, name, time):
    rule = recdsl.compile(RULES[name])
    tensors, initial = _args(rule, name, time)
    assert_matches_naive(rule, tensors, initial, backend=BACKEND, dtype=torch.float64,
                         floor=1e-10)


@pytest.mark.parametrize("time", [37])
@pytest.mark.parametrize("name", ["kda_fla_gate", "dplr", "iplr", "gdn2", "comba",
                                  "deltaproduct", "two_writes"])
def test_other_rules_float64(dplr_backend, name, time):
    rule = recdsl.compile(RULES[name])
    tensors, initial = _args(rule, name, time)
    assert_matches_naive(rule, tensors, initial, backend=BACKEND, dtype=torch.float64,
                         floor=1e-10)


@pytest.mark.parametrize("name", sorted(RULES))
def test_float32(dplr_backend, name):
    rule = recdsl.compile(RULES[name])
    tensors, initial = _args(rule, name, 70)
    assert_matches_naive(rule, tensors, initial, backend=BACKEND, dtype=torch.float32)


@pytest.mark.parametrize("gate", ["zero", "dead", "mixed"])
@pytest.mark.parametrize("name", ["kda", "rwkv7", "dplr", "deltaproduct"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gates_zero_dead_and_mixed(dplr_backend, name, gate, dtype):
    rule = recdsl.compile(RULES[name])
    tensors, initial = _args(rule, name, 40, gate=gate)
    if gate != "dead":
        assert_matches_naive(rule, tensors, initial, backend=BACKEND, dtype=dtype,
                             floor=1e-10 if dtype == torch.float64 else 3e-6)
        return
    # every decay exactly 0: the gate's gradient is exactly 0 in the loop, rounding here
    golden = rule_results(rule, tensors, initial, "naive", torch.float64)
    got = rule_results(rule, tensors, initial, BACKEND, dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for key, want in golden.items():
        scale = max(want.abs().max().item(), 1.0)
        assert (got[key] - want).abs().max().item() <= tol * scale, key


@pytest.mark.parametrize("name", ["kda", "rwkv7", "deltaproduct", "two_writes"])
def test_packed_sequences(dplr_backend, name):
    rule = recdsl.compile(RULES[name])
    cu = torch.tensor([0, 5, 40, 41, 90])
    tensors, initial = _args(rule, name, 90, gate="mixed", batch=1, sequences=4)
    assert_matches_naive(rule, tensors, initial, backend=BACKEND, dtype=torch.float64,
                         cu_seqlens=cu, floor=1e-10)
    assert_matches_naive(rule, tensors, None, backend=BACKEND, dtype=torch.float32,
                         cu_seqlens=cu)


@pytest.mark.parametrize("chunk", [1, 32])
def test_other_chunk_sizes(dplr_backend, monkeypatch, chunk):
    monkeypatch.setattr(torch_chunk_dplr, "CHUNK_SIZE", chunk)
    rule = recdsl.compile(KDA)
    tensors, initial = _args(rule, "kda", 70, gate="mixed")
    assert_matches_naive(rule, tensors, initial, backend=BACKEND, dtype=torch.float64,
                         floor=1e-10)


def test_no_output_depends_on_a_later_gate():
    """A gate at token t changes nothing before t (no reference point after the read)."""
    rule = recdsl.compile(KDA)
    tensors, initial = _args(rule, "kda", 40, initial=True)
    o1, _ = torch_chunk_dplr.run(rule, rule.bind(**tensors, initial_state=initial))
    changed = dict(tensors)
    changed["gk"] = tensors["gk"].clone()
    changed["gk"][:, 21:] = -1e4
    o2, _ = torch_chunk_dplr.run(rule, rule.bind(**changed, initial_state=initial))
    assert torch.equal(o1[0][:, :21], o2[0][:, :21])
    assert not torch.equal(o1[0][:, 21:], o2[0][:, 21:])


# ---------------------------------------------------------------- fla's KDA, written here


def naive_recurrent_kda(q, k, v, g, beta, initial, scale):
    """fla's definition: S = (I - beta k kᵀ) Diag(exp(g)) S + beta k vᵀ, o = Sᵀ q * scale
    (q, k normalised by the caller; [B, T, H, ...]; state [B, H, K, V])."""
    B, T, H, K = q.shape
    S = initial.clone()
    outs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None]
        kt, bt = k[:, t], beta[:, t][..., None]
        S = S - bt[..., None] * kt[..., None] * (kt[..., None, :] @ S)
        S = S + bt[..., None] * kt[..., None] * v[:, t][..., None, :]
        outs.append((q[:, t][..., None, :] @ S)[..., 0, :] * scale)
    return torch.stack(outs, 1), S


def test_kda_against_a_loop_from_fla_definition():
    rule = recdsl.compile(KDA)
    tensors, initial = _args(rule, "kda", 50, gate="mixed")
    o, (S,) = torch_chunk_dplr.run(rule, rule.bind(**tensors, initial_state=initial))
    norm = lambda x: x * torch.rsqrt(x.square().sum(-1, keepdim=True) + L2NORM_EPS)
    qn, kn = norm(tensors["q"]), norm(tensors["k"])
    ref_o, ref_S = naive_recurrent_kda(qn, kn, tensors["v"], tensors["gk"], tensors["beta"],
                                       initial[0], SIZES["K"] ** -0.5)
    assert (o[0] - ref_o).abs().max() < 1e-10 * ref_o.abs().max()
    assert (S - ref_S).abs().max() < 1e-10 * ref_S.abs().max()


# ---------------------------------------------------------------- factored and exact scores


def _strong_then_mild(x, strong_at, log_decay):
    """Mild gates everywhere, and ``log_decay`` on the channels of every token in
    ``strong_at`` (a slice of the time axis): a sub-chunk whose spread defeats the factored
    form next to ones that take it."""
    g = -F.softplus(x) * 0.5
    g[:, strong_at, :, ::2] = log_decay
    return g


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("strong", [-1e4, -9.0])
@pytest.mark.parametrize("name", ["kda", "rwkv7"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_strong_gates_beside_mild_ones(dplr_backend, monkeypatch, name, strong, chunk, dtype):
    """One call, chunks (and sub-chunks) with strong gates (rows recomputed exactly) beside
    chunks with mild ones (factored): TESTING.md's rule against the naive loop."""
    monkeypatch.setattr(torch_chunk_dplr, "CHUNK_SIZE", chunk)
    rule = recdsl.compile(RULES[name])
    tensors, initial = _args(rule, name, 80)
    tensors["gk"] = _strong_then_mild(tensors["gk"], slice(40, 50), strong)
    assert_matches_naive(rule, tensors, initial, backend=BACKEND, dtype=dtype,
                         floor=1e-10 if dtype == torch.float64 else 3e-6)


def _score_inputs(L, m, K=12, r=2, R=2, nc=3, Z=2, gates="mixed", signs=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    g = -F.softplus(rn(nc, Z, L, K))
    if gates == "mixed":
        pick = torch.randint(0, 4, g.shape, generator=gen)
        g = torch.where(pick == 0, torch.zeros_like(g), g)
        g = torch.where(pick == 1, torch.full_like(g, -40.0), g)
        g[0, 0, L // 2, :] = -1e4
    gam = g.cumsum(2)
    gprev = torch.cat([torch.zeros_like(gam[:, :, :1]), gam[:, :, :-1]], 2)
    ncum = nprev = None
    if signs:
        neg = (torch.rand(g.shape, generator=gen) < 0.3).double()
        ncum = neg.cumsum(2)
        nprev = torch.cat([torch.zeros_like(ncum[:, :, :1]), ncum[:, :, :-1]], 2)
    a, b = rn(nc, Z, L, K), rn(nc, Z, L, K)
    x, q = rn(nc, Z, L, r, K), rn(nc, Z, L // m, R, K)
    return gam, gprev, ncum, nprev, a, b, x, q, m


@pytest.mark.parametrize("L,m", [(16, 1), (64, 1), (64, 2), (48, 3), (5, 1)])
@pytest.mark.parametrize("gates", ["soft", "mixed"])
@pytest.mark.parametrize("signs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factored_scores_equal_pairwise_ones(L, m, gates, signs, dtype):
    """The factored form (rows over sub-chunk references, strong rows recomputed) gives the
    pairwise form's four score matrices, with reads (m sub-steps a token, 2 reads) and signs."""
    args = _score_inputs(L, m, gates=gates, signs=signs)
    vecs = [t.to(dtype) for t in args[4:8]]
    want = torch_chunk_dplr._scores_pairwise(*args[:4], *vecs, m, dtype)
    got = torch_chunk_dplr._scores_factored(*args[:4], *vecs, m, dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for w, g in zip(want, got):
        assert torch.isfinite(g).all()
        assert (g - w).abs().max() <= tol * max(w.abs().max().item(), 1.0)


def test_strong_rows_are_recomputed_and_the_rest_factored(monkeypatch):
    """The exact form runs for the rows after a strong gate in their sub-chunk only."""
    seen = []
    real = torch_chunk_dplr._span_decay

    def spy(diff, neg, dt):
        seen.append(diff.shape)
        return real(diff, neg, dt)
    monkeypatch.setattr(torch_chunk_dplr, "_span_decay", spy)
    args = _score_inputs(64, 1, gates="soft", nc=2, Z=2, R=1)
    gam = args[0].clone()
    g = torch.diff(gam, dim=2, prepend=torch.zeros_like(gam[:, :, :1]))
    g[1, 0, 40, 3] = -1e4  # chunk 1, row 0: sub-chunk 2 (32..47) after token 40
    gam = g.cumsum(2)
    gprev = torch.cat([torch.zeros_like(gam[:, :, :1]), gam[:, :, :-1]], 2)
    torch_chunk_dplr._scores_factored(gam, gprev, None, None, *args[4:8], 1, torch.float64)
    # erase rows 41..47 (gprev after the gate) and the reads of tokens 40..47
    assert seen == [torch.Size([7, 64, 12]), torch.Size([8, 64, 12])]


@pytest.mark.parametrize("chunk", [16, 64])
def test_a_decay_above_one_takes_the_pairwise_form(dplr_backend, monkeypatch, chunk):
    monkeypatch.setattr(torch_chunk_dplr, "CHUNK_SIZE", chunk)
    rule = recdsl.compile(RULES["dplr"])
    tensors, initial = _args(rule, "dplr", 70)
    tensors["gk"] = tensors["gk"] + 0.1  # some decays a little above 1
    assert (tensors["gk"] > 0).any()
    used = []
    real = torch_chunk_dplr._scores_pairwise
    monkeypatch.setattr(torch_chunk_dplr, "_scores_pairwise",
                        lambda *a: used.append(1) or real(*a))
    assert_matches_naive(rule, tensors, initial, backend=BACKEND, dtype=torch.float64,
                         floor=1e-10)
    assert used


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("at", [21, 40])
def test_no_output_depends_on_a_later_gate_in_its_sub_chunk(monkeypatch, chunk, at):
    """Strong gates before the change (exact rows) and mild ones (factored rows); a later
    gate, in the same sub-chunk and chunk, changes no earlier output, not even in rounding."""
    monkeypatch.setattr(torch_chunk_dplr, "CHUNK_SIZE", chunk)
    rule = recdsl.compile(KDA)
    tensors, initial = _args(rule, "kda", 64, initial=True)
    tensors = {k: v.float() for k, v in tensors.items()}
    initial = tuple(s.float() for s in initial)
    tensors["gk"][:, 34] = -1e4
    o1, _ = torch_chunk_dplr.run(rule, rule.bind(**tensors, initial_state=initial))
    for value in (-1e4, -70.0, 0.0):
        changed = dict(tensors)
        changed["gk"] = tensors["gk"].clone()
        changed["gk"][:, at:] = value
        o2, _ = torch_chunk_dplr.run(rule, rule.bind(**changed, initial_state=initial))
        assert torch.equal(o1[0][:, :at], o2[0][:, :at])
