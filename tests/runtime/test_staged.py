"""Staged states (recdsl.ir.stages + recdsl.runtime.staged): a small non-affine state computed
first for every token (mLSTM's stabiliser m, Aaren's running max), then the other states as a
derived affine rule on a parallel backend. Against the naive loop in float64 (outputs, final
states, gradients of every input and initial state), against loops written here from the
papers (xLSTM's stabilised mLSTM, Aaren's softmax attention as an RNN), at T = 1, 37, 64, 65,
130, with initial states, packed sequences and extreme gates.

Until the backend registry routes to the staging, the tests register it as a backend of their
own ("staged", on torch-chunk; "staged-scan", on torch-scan; "staged-chunk", on the chunk
Triton kernels, under the interpreter on the CPU)."""
import pytest
import torch
import torch.nn.functional as F

import recdsl
from recdsl.ir import stages
from recdsl.runtime import backends, staged
from tests.helpers import EXAMPLES, assert_matches_naive, random_args, rule_results

AAREN = """rule aaren
dims D
state m, u[D], w
input k[D], v[D]
param q[D]
let s = dot(q, k)
let mp = m
m = max(m, s)
u = exp(mp - m) * u + exp(s - m) * v
w = exp(mp - m) * w + exp(s - m)
output o = u / w
"""

SLSTM = """rule slstm
dims D
state c[D], n[D], m[D], h[D]
input zx[D], ix[D], fx[D], ox[D]
param R[D, D]
let i_ = ix + R @ h
let f_ = fx + R @ h
let m1 = max(f_ + m, i_)
let ig = exp(i_ - m1)
let fg = exp(f_ + m - m1)
c = fg * c + ig * tanh(zx + R @ h)
n = fg * n + ig
m = m1
h = sigmoid(ox) * c / n
output y = h
"""

SIZES = {"K": 6, "V": 5}


@pytest.fixture(scope="module")
def mlstm():
    return recdsl.load(EXAMPLES / "mlstm.rec")


@pytest.fixture(scope="module")
def aaren():
    return recdsl.compile(AAREN)


@pytest.fixture
def staged_backends(monkeypatch):
    """The staging registered as backends "staged" (torch-chunk) and "staged-scan"."""
    names = {"staged": "torch-chunk", "staged-scan": "torch-scan", "staged-chunk": "chunk"}
    monkeypatch.setattr(backends, "NAMES", backends.NAMES + tuple(names))
    for name, backend in names.items():
        monkeypatch.setitem(backends._RUNNERS, name, staged.runner(backend))


# ============================================================ the analysis


def test_mlstm_stages(mlstm):
    st = stages.stage(mlstm.ir)
    assert [(s.name, s.form) for s in st.leading] == [("m", "maxplus")]
    lead, = st.leading
    assert (lead.a.id, lead.b.id, lead.before, lead.after) == ("lf", "i", "m_before", "m_after")
    assert st.rest == ("C", "n")
    assert st.order == [("m",), ("C",), ("n",)]
    # m is read before its update (inside the gates) and after it (the normaliser)
    assert "let fg = exp(lf + m_before - m1)" in st.text
    assert "exp(-m_after)" in st.text
    derived = st.derived
    assert derived.family_info.lowered is not None  # C and n diagonal, via the read lowering
    assert derived.family_info.lowered.family == "diagonal"
    assert backends.problem(derived, "torch-chunk") is None
    assert staged.problem(mlstm, "torch-chunk") is None
    assert "stage 1: m: max-plus" in st.describe()
    assert "stage 2: C, n: the diagonal family through the read lowering, given m per token" \
        in st.describe()


def test_aaren_stages(aaren):
    st = stages.stage(aaren.ir)
    lead, = st.leading
    assert (lead.name, lead.form, lead.a, lead.b.id) == ("m", "maxplus", None, "s")
    assert st.rest == ("u", "w")
    assert "let mp = m_before" in st.text
    assert st.derived.family == "scan"  # run chunkwise through its read lowering
    assert st.derived.family_info.lowered.family == "diagonal"


def test_slstm_has_no_stage():
    rule = recdsl.compile(SLSTM)
    assert stages.staging(rule.ir) is None
    reason = stages.why_not(rule.ir)
    assert reason.endswith("read state h: no stage can go first"), reason
    assert reason.startswith("the gates of m (")


def test_affine_rule_needs_no_stage():
    rule = recdsl.load(EXAMPLES / "gla.rec")
    assert "no stage needs to go first" in stages.why_not(rule.ir)


def test_a_non_maxplus_leading_state_is_sequential():
    rule = recdsl.compile("""rule softcap
dims K, V
state C[K, V], m
input k[K], v[V], q[K], g
m = tanh(m + g)
C = exp(-abs(m)) * C + outer(k, v)
output o = q @ C
""")
    st = stages.stage(rule.ir)
    assert st.leading[0].form == "sequential"
    assert "not max(a + m, b)" in st.leading[0].why
    assert "stage 1: m: sequential" in st.describe()


def test_new_input_names_do_not_clash():
    rule = recdsl.compile(AAREN.replace("input k[D], v[D]", "input k[D], v[D], m_before")
                          .replace("let s = dot(q, k)", "let s = dot(q, k) + m_before"))
    st = stages.stage(rule.ir)
    assert st.leading[0].before == "m_before1"


# ============================================================ against the naive loop


def _args(rule, B, T, H, sizes, seed=0, init=True, sequences=None, shape=None):
    inputs, params, states = random_args(rule, batch=B, time=T, heads=H, sizes=sizes, seed=seed,
                                         initial_state=init, sequences=sequences,
                                         shape_values=shape)
    return {**inputs, **params}, (tuple(states.values()) if init else None)


@pytest.mark.parametrize("T", [1, 37, 64, 65, 130])
@pytest.mark.parametrize("init", [False, True])
def test_mlstm_matches_naive(mlstm, staged_backends, T, init):
    tensors, initial = _args(mlstm, 2, T, 2, SIZES, seed=T, init=init)
    assert_matches_naive(mlstm, tensors, initial, backend="staged", dtype=torch.float64)


@pytest.mark.parametrize("backend", ["staged", "staged-scan"])
def test_mlstm_float32(mlstm, staged_backends, backend):
    tensors, initial = _args(mlstm, 2, 65, 2, SIZES, seed=3)
    assert_matches_naive(mlstm, tensors, initial, backend=backend, dtype=torch.float32)


def test_mlstm_chunk_kernels_under_the_interpreter(mlstm, staged_backends):
    assert staged.problem(mlstm, "chunk") is None
    cu = torch.tensor([0, 5, 6, 21])
    tensors, initial = _args(mlstm, 1, 21, 2, {"K": 16, "V": 16}, seed=21, sequences=3)
    assert_matches_naive(mlstm, tensors, initial, backend="staged-chunk", cu_seqlens=cu,
                         dtype=torch.float64)


def test_mlstm_packed(mlstm, staged_backends):
    cu = torch.tensor([0, 5, 5, 40, 41, 100])
    tensors, initial = _args(mlstm, 1, 100, 2, SIZES, seed=7, sequences=5)
    assert_matches_naive(mlstm, tensors, initial, backend="staged", cu_seqlens=cu,
                         dtype=torch.float64)
    assert_matches_naive(mlstm, tensors, None, backend="staged", cu_seqlens=cu,
                         dtype=torch.float64)


@pytest.mark.parametrize("gates", ["i+50", "i=50", "f-50", "f+50", "i+50 f+50", "i=50 f=50",
                                   "i-50 f-50"])
def test_mlstm_extreme_gates(mlstm, staged_backends, gates):
    shape = {}
    for g in gates.split():
        name, op, value = g[0], g[1], float(g[2:]) * (-1 if g[1] == "-" else 1)
        shape[name] = (lambda x, v=value: x + v) if op in "+-" else (lambda x, v=value: 0 * x + v)
    tensors, initial = _args(mlstm, 2, 65, 2, SIZES, seed=11, shape=shape)
    assert_matches_naive(mlstm, tensors, initial, backend="staged", dtype=torch.float64)
    if "=" not in gates:
        # (constant gates: float64 only; with i = f = 50 in float32 a token's normaliser
        # |n . q| comes near 0 and both parallel paths land 12x off where the naive loop is
        # 5.7e-6 off: that is the chunk/scan arithmetic, not the stage)
        assert_matches_naive(mlstm, tensors, None, backend="staged", dtype=torch.float32)


def test_ties_take_the_sequential_pass(mlstm):
    """f = +50 rounds lf away next to m; with a constant input gate every step ties."""
    tensors, initial = _args(mlstm, 1, 8, 1, SIZES, shape={"f": lambda x: 0 * x + 50,
                                                         "i": lambda x: 0 * x + 50})
    call = mlstm.bind(**tensors)
    tw = staged.Tokenwise(mlstm.ir, call)
    lead, = staged._staged(mlstm).leading
    assert staged._maxplus(lead, call, tw, ()) is None  # a tie: not the cummax path
    tensors, _ = _args(mlstm, 1, 8, 1, SIZES)
    call = mlstm.bind(**tensors)
    assert staged._maxplus(lead, call, staged.Tokenwise(mlstm.ir, call), ()) is not None


def test_sequential_pass_matches_naive(mlstm, monkeypatch, staged_backends):
    monkeypatch.setitem(backends._RUNNERS, "staged",
                        lambda rule, call: staged.run(rule, call, "torch-chunk",
                                                      force_sequential=True))
    tensors, initial = _args(mlstm, 2, 37, 2, SIZES, seed=2)
    assert_matches_naive(mlstm, tensors, initial, backend="staged", dtype=torch.float64)
    cu = torch.tensor([0, 3, 30, 37])
    tensors, initial = _args(mlstm, 1, 37, 2, SIZES, seed=4, sequences=3)
    assert_matches_naive(mlstm, tensors, initial, backend="staged", cu_seqlens=cu,
                         dtype=torch.float64)


def test_aaren_runs_chunkwise(aaren):
    # u / w reads the states directly: the derived rule is in the scan family, and its read
    # lowering (u lifted to [D, ONE], w to [ONE, ONE], reads u @ one and one @ w) diagonal
    derived = staged._staged(aaren).derived
    low = derived.family_info.lowered
    assert low is not None and low.family == "diagonal"
    assert "state u[D, ONE], w[ONE, ONE]" in low.text
    assert "output read_u = u @ one" in low.text and "output read_w = one @ w" in low.text
    for backend in ("torch-chunk", "torch-scan"):
        assert staged.problem(aaren, backend) is None, backend
    # the derived rule's states are [D, 1] and [1, 1]: the scan is measured faster there
    # (backends._prefer_scan, SCAN_BELOW), so auto takes it; the chunk forms are listed
    assert aaren.backends()[0] == "torch-scan"
    assert "torch-chunk" in aaren.backends()
    assert "chunk" in aaren.backends("cuda") and "torch-chunk" in aaren.backends("cuda")


def _aaren_initial(initial):
    # w0 > 0 so that o stays defined whatever the initial state
    return (initial[0], initial[1], initial[2].abs() + 0.5)


@pytest.mark.parametrize("T", [1, 37, 64, 65, 130])
@pytest.mark.parametrize("backend", ["staged", "staged-scan"])
def test_aaren_matches_naive(aaren, staged_backends, backend, T):
    tensors, initial = _args(aaren, 2, T, 2, {"D": 5}, seed=T)
    initial = _aaren_initial(initial)
    assert_matches_naive(aaren, tensors, initial, backend=backend, dtype=torch.float64)
    assert_matches_naive(aaren, tensors, None, backend=backend, dtype=torch.float64)
    cu = torch.tensor([0, T // 3, T])
    tensors, _ = _args(aaren, 1, T, 2, {"D": 5}, seed=T + 1, init=False)
    assert_matches_naive(aaren, tensors, None, backend=backend, cu_seqlens=cu,
                         dtype=torch.float64)


def test_aaren_packed_with_initial_states(aaren, staged_backends):
    cu = torch.tensor([0, 5, 5, 40, 41, 100])
    tensors, initial = _args(aaren, 1, 100, 2, {"D": 5}, seed=8, sequences=5)
    tensors["k"] = tensors["k"] * 3  # large scores: the running max moves
    assert_matches_naive(aaren, tensors, _aaren_initial(initial), backend="staged",
                         cu_seqlens=cu, dtype=torch.float64)


def test_aaren_float32(aaren, staged_backends):
    tensors, initial = _args(aaren, 2, 65, 2, {"D": 5}, seed=3)
    assert_matches_naive(aaren, tensors, _aaren_initial(initial), backend="staged",
                         dtype=torch.float32)


def test_aaren_chunk_kernels_under_the_interpreter(aaren, staged_backends):
    assert staged.problem(aaren, "chunk") is None
    cu = torch.tensor([0, 5, 6, 21])
    tensors, initial = _args(aaren, 1, 21, 2, {"D": 16}, seed=21, sequences=3)
    assert_matches_naive(aaren, tensors, _aaren_initial(initial), backend="staged-chunk",
                         cu_seqlens=cu, dtype=torch.float64)


def test_softcap_sequential_matches_naive(staged_backends):
    rule = recdsl.compile("""rule softcap
dims K, V
state C[K, V], m
input k[K], v[V], q[K], g
m = tanh(m + g)
C = exp(-abs(m)) * C + outer(k, v)
output o = q @ C
""")
    tensors, initial = _args(rule, 2, 37, 2, SIZES, seed=5)
    assert_matches_naive(rule, tensors, initial, backend="staged", dtype=torch.float64)


# ============================================================ against the papers


def xlstm_mlstm(q, k, v, i, f, C0, n0, m0, cu=None):
    """The stabilised mLSTM of the xLSTM paper (Beck et al. 2024, appendix), written here:
    m_t = max(log f_t + m_{t-1}, log i_t), i'_t = exp(log i_t - m_t),
    f'_t = exp(log f_t + m_{t-1} - m_t), C_t = f' C + i' k vᵀ, n_t = f' n + i' k,
    h_t = C_tᵀ q̃ / max(|n_tᵀ q̃|, exp(-m_t)) (+ 1e-6), q̃ = q / sqrt(K); f = sigmoid(f̃),
    i = exp(ĩ)."""
    B, T, H, K = q.shape
    segments = list(zip(cu[:-1], cu[1:])) if cu is not None else [(0, T)]
    hs, finals = [], ([], [], [])
    for seq, (s, e) in enumerate(segments):
        rows = slice(seq, seq + 1) if cu is not None else slice(None)
        C, n, m = C0[rows], n0[rows], m0[rows]
        for t in range(s, e):
            logf = F.logsigmoid(f[:, t])
            logi = i[:, t]
            m_new = torch.maximum(logf + m, logi)
            ip = torch.exp(logi - m_new)
            fp = torch.exp(logf + m - m_new)
            C = fp[..., None, None] * C + ip[..., None, None] * k[:, t, ..., :, None] * v[:, t, ..., None, :]
            n = fp[..., None] * n + ip[..., None] * k[:, t]
            m = m_new
            qt = q[:, t] / K ** 0.5
            num = torch.einsum("bhk,bhkv->bhv", qt, C)
            den = torch.maximum((n * qt).sum(-1).abs(), torch.exp(-m)) + 1e-6
            hs.append(num / den[..., None])
        for lst, x in zip(finals, (C, n, m)):
            lst.append(x)
    return torch.stack(hs, dim=1), tuple(torch.cat(x) for x in finals)


@pytest.mark.parametrize("T,gates", [(1, ""), (37, ""), (64, ""), (65, "i+50"), (130, "f-50"),
                                     (65, "f+50")])
def test_mlstm_matches_xlstm_paper(mlstm, T, gates):
    shape = {}
    if gates:
        shape[gates[0]] = lambda x, v=float(gates[1:]): x + v
    tensors, initial = _args(mlstm, 2, T, 2, SIZES, seed=T + 100, shape=shape)
    leaves = {**tensors, **{f"{s.name}0": x for s, x in zip(mlstm.states, initial)}}

    def ours(q, k, v, i, f, C0, n0, m0):
        call = mlstm.bind(q, k, v, i, f, initial_state=(C0, n0, m0))
        outs, fins = staged.run(mlstm, call, "torch-chunk")
        return [outs[0], *fins]

    def paper(q, k, v, i, f, C0, n0, m0):
        h, fins = xlstm_mlstm(q, k, v, i, f, C0, n0, m0)
        return [h, *fins]

    from tests.helpers import forward_backward
    got, dgot = forward_backward(ours, leaves)
    ref, dref = forward_backward(paper, leaves)
    for name, a, b in zip(["h", "C", "n", "m"], got, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), (name, (a - b).abs().max())
    for name in leaves:
        assert dgot[name] is not None, name
        assert torch.allclose(dgot[name], dref[name], rtol=1e-8, atol=1e-9), \
            (name, (dgot[name] - dref[name]).abs().max())


def test_mlstm_packed_matches_xlstm_paper(mlstm):
    cu = torch.tensor([0, 17, 18, 64])
    tensors, initial = _args(mlstm, 1, 64, 2, SIZES, seed=9, sequences=3)
    call = mlstm.bind(**tensors, initial_state=initial, cu_seqlens=cu)
    outs, fins = staged.run(mlstm, call, "torch-chunk")
    h, ref = xlstm_mlstm(*tensors.values(), *initial, cu=cu.tolist())
    for a, b in zip([outs[0], *fins], [h, *ref]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def test_aaren_is_softmax_attention(aaren):
    """From zero states, Aaren's o_t is softmax attention of the one query q over k_1..k_t."""
    tensors, _ = _args(aaren, 2, 40, 3, {"D": 4}, seed=1, init=False)
    tensors["k"] = tensors["k"] * 3  # large scores: the running max matters
    call = aaren.bind(**tensors)
    (o,), _ = staged.run(aaren, call, "torch-scan")
    k, v, q = tensors["k"], tensors["v"], tensors["q"]
    s = torch.einsum("bthd,hd->bth", k, q)
    T = s.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = s.unsqueeze(1).expand(-1, T, -1, -1).masked_fill(~mask[None, :, :, None], -torch.inf)
    p = torch.softmax(scores, dim=2)  # [B, t, s, H]
    ref = torch.einsum("btsh,bshd->bthd", p, v)
    assert torch.allclose(o, ref, rtol=1e-10, atol=1e-10)


# ============================================================ long sequences


@pytest.mark.slow
def test_mlstm_long_sequence_is_finite(mlstm):
    tensors, initial = _args(mlstm, 1, 65536, 1, {"K": 4, "V": 3}, seed=0)
    tensors = {n: t.float() for n, t in tensors.items()}
    call = mlstm.bind(**tensors)
    outs, fins = staged.run(mlstm, call, "torch-chunk")
    assert all(torch.isfinite(x).all() for x in (*outs, *fins))
    # m after T tokens, m_t = max(lf_t + m_{t-1}, i_t) from m = 0, in float64 closed form:
    # the cumulative forget gate L_T plus the best of starting from 0 or from some token's i
    lf = F.logsigmoid(tensors["f"].double())
    cum = lf.cumsum(1)
    m = cum[:, -1] + torch.clamp((tensors["i"].double() - cum).amax(1), min=0.0)
    assert abs(fins[2].double() - m).max() < 1e-4


@pytest.mark.parametrize("T", [37, 65])
def test_mlstm_through_the_registry(mlstm, T):
    """Without the test fixture: torch-chunk and torch-scan run mLSTM through its stages, and
    they come first on the CPU and (chunk) on a GPU."""
    assert mlstm.backends()[0] == "torch-chunk" and mlstm.backends("cuda")[0] == "chunk"
    tensors, initial = _args(mlstm, 2, T, 2, SIZES, seed=T)
    for backend in ("torch-chunk", "torch-scan"):
        assert_matches_naive(mlstm, tensors, initial, backend=backend)
