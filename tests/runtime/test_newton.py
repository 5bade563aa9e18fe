"""The newton backend (ParaRNN: Newton iterations whose linear solves are scans over T) and
the Jacobian structure it rests on (recdsl.ir.jacobian).

Rules written here: an LSTM and a GRU with per-head recurrent matrices R[D, D] (references:
torch.lstm_cell / torch.gru_cell), ParaGRU / ParaLSTM-style cells with diagonal recurrent
weights and sLSTM with its stabiliser (loops written here from the papers), and a momentum
delta rule with two coupled matrix states (a loop). Each rule's naive loop is checked against
its reference (float64: outputs, final states, every gradient); the newton backend against the
naive loop by TESTING.md's rule at T = 1, 37, 65, 130, 1000, with initial states and packed
sequences."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import recdsl
from recdsl.errors import BackendError
from recdsl.ir.jacobian import structure
from recdsl.runtime import backends, newton
from tests.helpers import assert_matches_naive, random_args, rms_ratio, rule_results

LSTM = """rule lstm
dims D
state c[D], h[D]
input xi[D], xf[D], xz[D], xo[D]
param Ri[D, D], Rf[D, D], Rz[D, D], Ro[D, D]
let i = sigmoid(xi + Ri @ h)
let f = sigmoid(xf + Rf @ h)
let z = tanh(xz + Rz @ h)
let o = sigmoid(xo + Ro @ h)
c = f * c + i * z
h = o * tanh(c)
output y = h
"""

GRU = """rule gru
dims D
state h[D]
input xr[D], xz[D], xn[D]
param Rr[D, D], Rz[D, D], Rn[D, D]
let r = sigmoid(xr + Rr @ h)
let z = sigmoid(xz + Rz @ h)
let n = tanh(xn + r * (Rn @ h))
h = (1 - z) * n + z * h
output y = h
"""

# ParaRNN's cells: recurrent weights on the diagonal, so every channel is its own recurrence
PARA_GRU = """rule para_gru
dims D
state h[D]
input xr[D], xz[D], xn[D]
param ar[D], az[D], an[D]
let r = sigmoid(xr + ar * h)
let z = sigmoid(xz + az * h)
let n = tanh(xn + r * (an * h))
h = (1 - z) * n + z * h
output y = h
"""

PARA_LSTM = """rule para_lstm
dims D
state c[D], h[D]
input xi[D], xf[D], xz[D], xo[D]
param ai[D], af[D], az[D], ao[D]
let i = sigmoid(xi + ai * h)
let f = sigmoid(xf + af * h)
let z = tanh(xz + az * h)
let o = sigmoid(xo + ao * h)
c = f * c + i * z
h = o * tanh(c)
output y = h
"""

# xLSTM's sLSTM: exponential input gate, sigmoid forget gate in log space, stabiliser m
SLSTM = """rule slstm
dims D
state c[D], n[D], m[D], h[D]
input zx[D], ix[D], fx[D], ox[D]
param Rz[D, D], Ri[D, D], Rf[D, D], Ro[D, D]
let logi = ix + Ri @ h
let logf = logsigmoid(fx + Rf @ h)
let m1 = max(logf + m, logi)
let ig = exp(logi - m1)
let fg = exp(logf + m - m1)
c = fg * c + ig * tanh(zx + Rz @ h)
n = fg * n + ig
m = m1
h = sigmoid(ox + Ro @ h) * c / n
output y = h
"""

# Titans-style momentum over a delta rule's gradient: M feeds S, S feeds M
MOMENTUM = """rule momentum_delta
dims K, V
state S[K, V], M[K, V]
input q[K], k[K], v[V]
input beta, eta
M = eta * M - beta * outer(k, k @ S - v)
S = S + M
output o = q @ S
"""

SIZES = {"D": 5, "K": 4, "V": 3}


@pytest.fixture(autouse=True)
def newton_iterations(monkeypatch):
    """These tests exercise Newton's iterations, which on the CPU the sequential pass replaces
    (newton.SEQUENTIAL_DEVICES; test_newton_jacobian runs that)."""
    monkeypatch.setattr(newton, "SEQUENTIAL_DEVICES", ())


# ---------------------------------------------------------------- references (float64 loops)

def _heads(x, h):
    return x[:, :, h]


def ref_lstm(t, init):
    B, T, H, D = t["xi"].shape
    c0, h0 = init
    ys, cs, hs = [], [], []
    for hd in range(H):
        c, h = c0[:, hd], h0[:, hd]
        w_hh = torch.cat([t[n][hd] for n in ("Ri", "Rf", "Rz", "Ro")], 0)
        eye = torch.eye(4 * D, dtype=w_hh.dtype)
        out = []
        for s in range(T):
            x = torch.cat([t[n][:, s, hd] for n in ("xi", "xf", "xz", "xo")], -1)
            h, c = torch.lstm_cell(x, (h, c), eye, w_hh)
            out.append(h)
        ys.append(torch.stack(out, 1))
        cs.append(c)
        hs.append(h)
    return [torch.stack(ys, 2)], [torch.stack(cs, 1), torch.stack(hs, 1)]


def ref_gru(t, init):
    B, T, H, D = t["xr"].shape
    (h0,) = init
    ys, hs = [], []
    for hd in range(H):
        h = h0[:, hd]
        w_hh = torch.cat([t[n][hd] for n in ("Rr", "Rz", "Rn")], 0)
        eye = torch.eye(3 * D, dtype=w_hh.dtype)
        out = []
        for s in range(T):
            h = torch.gru_cell(torch.cat([t[n][:, s, hd] for n in ("xr", "xz", "xn")], -1), h, eye, w_hh)
            out.append(h)
        ys.append(torch.stack(out, 1))
        hs.append(h)
    return [torch.stack(ys, 2)], [torch.stack(hs, 1)]


def ref_para_gru(t, init):
    (h,) = init
    ys = []
    for s in range(t["xr"].shape[1]):
        r = torch.sigmoid(t["xr"][:, s] + t["ar"] * h)
        z = torch.sigmoid(t["xz"][:, s] + t["az"] * h)
        n = torch.tanh(t["xn"][:, s] + r * t["an"] * h)
        h = (1 - z) * n + z * h
        ys.append(h)
    return [torch.stack(ys, 1)], [h]


def ref_para_lstm(t, init):
    c, h = init
    ys = []
    for s in range(t["xi"].shape[1]):
        i = torch.sigmoid(t["xi"][:, s] + t["ai"] * h)
        f = torch.sigmoid(t["xf"][:, s] + t["af"] * h)
        z = torch.tanh(t["xz"][:, s] + t["az"] * h)
        o = torch.sigmoid(t["xo"][:, s] + t["ao"] * h)
        c = f * c + i * z
        h = o * torch.tanh(c)
        ys.append(h)
    return [torch.stack(ys, 1)], [c, h]


def ref_slstm(t, init):
    c, n, m, h = init
    mv = lambda R, x: torch.einsum("hij,bhj->bhi", R, x)  # noqa: E731
    ys = []
    for s in range(t["zx"].shape[1]):
        logi = t["ix"][:, s] + mv(t["Ri"], h)
        logf = F.logsigmoid(t["fx"][:, s] + mv(t["Rf"], h))
        m_new = torch.maximum(logf + m, logi)
        ig, fg = torch.exp(logi - m_new), torch.exp(logf + m - m_new)
        c = fg * c + ig * torch.tanh(t["zx"][:, s] + mv(t["Rz"], h))
        n = fg * n + ig
        m = m_new
        h = torch.sigmoid(t["ox"][:, s] + mv(t["Ro"], h)) * c / n
        ys.append(h)
    return [torch.stack(ys, 1)], [c, n, m, h]


def ref_momentum(t, init):
    S, M = init
    os_ = []
    for s in range(t["q"].shape[1]):
        k, v = t["k"][:, s], t["v"][:, s]
        err = torch.einsum("bhk,bhkv->bhv", k, S) - v
        M = t["eta"][:, s, :, None, None] * M - t["beta"][:, s, :, None, None] * k[..., None] * err[..., None, :]
        S = S + M
        os_.append(torch.einsum("bhk,bhkv->bhv", t["q"][:, s], S))
    return [torch.stack(os_, 1)], [S, M]


def _slstm_init(states):
    c, n, m, h = states.values()
    return {"c": c, "n": n.abs() + 0.5, "m": m, "h": h}


def _momentum_inputs(x):
    return torch.sigmoid(x)


# name -> (text, reference, structure kind, channels, block width, shaping)
CASES = {
    "lstm": (LSTM, ref_lstm, "dense", (), 2 * SIZES["D"], {}),
    "gru": (GRU, ref_gru, "dense", (), SIZES["D"], {}),
    "para_gru": (PARA_GRU, ref_para_gru, "diagonal", ("D",), 1, {}),
    "para_lstm": (PARA_LSTM, ref_para_lstm, "block", ("D",), 2, {}),
    "slstm": (SLSTM, ref_slstm, "dense", (), 4 * SIZES["D"], {}),
    "momentum": (MOMENTUM, ref_momentum, "block", ("V",), 2 * SIZES["K"],
                 {"beta": _momentum_inputs, "eta": _momentum_inputs,
                  "k": lambda x: F.normalize(x, dim=-1)}),
}


@pytest.fixture(scope="module")
def rules():
    return {name: recdsl.compile(case[0]) for name, case in CASES.items()}


def _args(rule, name, T, *, batch=2, heads=2, init=True, sequences=None, seed=0):
    shaping = dict(CASES[name][5])
    if rule.params and any(p.rank == 2 for p in rule.params):  # R[D, D]: a contracting scale
        for p in rule.params:
            shaping[p.name] = lambda x: 0.4 * x
    inputs, params, states = random_args(rule, batch=batch, time=T, heads=heads, sizes=SIZES,
                                         initial_state=init, sequences=sequences, seed=seed,
                                         shape_values=shaping)
    if name == "slstm" and init:
        states = _slstm_init(states)
    return {**inputs, **params}, (tuple(states.values()) if init else None)


def _reference_results(name, rule, tensors, initial, seed=5):
    """The reference loop's results under rule_results' names and upstream gradients."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
    init = tuple(s.clone().requires_grad_(True) for s in initial)
    outs, finals = CASES[name][1](leaves, init)
    results = outs + finals
    names = [f"out {o.name}" for o in rule.outputs] + [f"final {s.name}" for s in rule.states]
    values = {n: r.detach() for n, r in zip(names, results)}
    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in results]
    grads = torch.autograd.grad(sum((r * u).sum() for r, u in zip(results, upstream)),
                                list(leaves.values()) + list(init), allow_unused=True)
    wrt = [f"d{k}" for k in leaves] + [f"d{s.name}0" for s in rule.states]
    for n, g, w in zip(wrt, grads, list(leaves.values()) + list(init)):
        values[n] = g if g is not None else torch.zeros_like(w)
    return values


# ---------------------------------------------------------------- the rules and their references

@pytest.mark.parametrize("name", list(CASES))
def test_each_rule_is_its_reference(rules, name):
    """The rule text means the paper's cell: the naive loop against the reference, float64."""
    rule = rules[name]
    tensors, initial = _args(rule, name, 23)
    want = _reference_results(name, rule, tensors, initial)
    got = rule_results(rule, tensors, initial, "naive", torch.float64)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-9, atol=1e-10), (name, key)


@pytest.mark.parametrize("name", list(CASES))
def test_structure_of_the_jacobian(rules, name):
    _, _, kind, channels, width, _ = CASES[name]
    s = structure(rules[name].ir)
    assert (s.kind, s.channels, s.block_size(SIZES)) == (kind, channels, width)
    verdict = rules[name].family_info.verdicts["newton"]
    assert verdict.accepted and verdict.reason.startswith(s.describe())


def test_structure_says_what_couples():
    s = structure(recdsl.compile(MOMENTUM).ir)
    assert s.couplings == {("S", "S"), ("S", "M"), ("M", "M"), ("M", "S")}
    assert "one 2*K x 2*K block per channel of (V) over (S, M)" in s.describe()
    assert structure(recdsl.compile(PARA_GRU).ir).couplings == {("h", "h")}


# ---------------------------------------------------------------- newton against the naive loop

@pytest.mark.parametrize("T", [1, 37, 65, 130])
@pytest.mark.parametrize("name", list(CASES))
def test_newton_matches_the_naive_loop(rules, name, T):
    rule = rules[name]
    tensors, initial = _args(rule, name, T, init=T != 37)
    assert_matches_naive(rule, tensors, initial, backend="newton")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_newton_matches_the_naive_loop_at_1000(rules, name):
    rule = rules[name]
    tensors, initial = _args(rule, name, 1000, batch=1, heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to the sequential loop
        assert_matches_naive(rule, tensors, initial, backend="newton")
    assert newton.last_run["iterations"] is not None


@pytest.mark.parametrize("name", ["para_lstm", "lstm", "slstm", "momentum"])
def test_newton_packed_sequences(rules, name):
    rule = rules[name]
    cu = torch.tensor([0, 1, 30, 30, 65])
    tensors, initial = _args(rule, name, 65, batch=1, sequences=4)
    assert_matches_naive(rule, tensors, initial, backend="newton", cu_seqlens=cu)
    tensors, _ = _args(rule, name, 65, batch=1, init=False)
    assert_matches_naive(rule, tensors, None, backend="newton", cu_seqlens=cu)


def test_newton_against_torch_lstm_cell_directly(rules):
    """float32 newton against the float64 torch.lstm_cell loop, with no naive loop between."""
    rule = rules["lstm"]
    tensors, initial = _args(rule, "lstm", 130)
    want = _reference_results("lstm", rule, tensors, initial)
    got = rule_results(rule, tensors, initial, "newton", torch.float32)
    for key in want:
        assert rms_ratio(got[key], want[key]) < 1e-5, key


def test_an_affine_rule_converges_in_one_iteration(rules):
    rule = rules["momentum"]
    tensors, initial = _args(rule, "momentum", 130)
    rule(**tensors, initial_state=initial, backend="newton")
    assert newton.last_run == {"structure": "block", "iterations": 1, "tokens": 130, "window": 130}


def test_no_convergence_warns_and_runs_the_sequential_loop(rules, monkeypatch):
    rule = rules["para_gru"]
    tensors, initial = _args(rule, "para_gru", 37)
    monkeypatch.setattr(newton, "MAX_ITERATIONS", 2)
    monkeypatch.setattr(newton, "MIN_WINDOW", 37)  # no shorter window to retry in
    with pytest.warns(RuntimeWarning, match="did not converge at T = 37"):
        got = rule_results(rule, tensors, initial, "newton", torch.float64)
    want = rule_results(rule, tensors, initial, "naive", torch.float64)
    for key in want:
        assert torch.equal(got[key], want[key]), key


# ---------------------------------------------------------------- the registry

def test_newton_serves_the_rules_without_a_parallel_form():
    gated = recdsl.load(recdsl.__path__[0] + "/examples/gated_delta.rec")
    assert "newton" not in gated.backends()
    assert backends.problem(gated, "newton") == (
        "rule 'gated_delta' has a parallel form (the delta family): newton is for rules "
        "without one")
    mlstm = recdsl.load(recdsl.__path__[0] + "/examples/mlstm.rec")
    assert backends.problem(mlstm, "newton") == (
        "rule 'mlstm' has a parallel form (in stages): newton is for rules without one")
    assert recdsl.compile(LSTM).backends()[:1] == ["newton"]


def test_auto_takes_newton_from_16_tokens(rules, monkeypatch):
    """Measured (benchmarks/bench_newton.py): newton pays off from about 16 tokens, diagonal,
    2 x 2 blocks and dense Jacobians up to 256 wide, for forward+backward and (the CPU's
    sequential pass) for the forward alone."""
    def pick(name, T, grad=True):
        rule = rules[name]
        tensors, _ = _args(rule, name, T, batch=1, heads=1, init=False)
        tensors = {k: v.float().requires_grad_(grad) for k, v in tensors.items()}
        return backends._auto(rule, rule.bind(**tensors))
    long = newton.AUTO_MIN_TOKENS
    monkeypatch.setattr(newton, "SEQUENTIAL_DEVICES", ("cpu",))  # the default (see the fixture)
    assert pick("para_gru", long) == "newton" and pick("para_lstm", long) == "newton"
    assert pick("lstm", long) == "newton"  # dense: the sequential pass, J only backward
    assert pick("slstm", long) == "newton"  # dense and 4D wide: measured faster too
    assert pick("para_gru", long - 1) == "naive"  # short: the loop (and decoding)
    assert pick("para_gru", long, grad=False) == "newton"  # inference: the sequential pass
    monkeypatch.setattr(newton, "SEQUENTIAL_DEVICES", ())
    assert pick("para_gru", long, grad=False) == "naive"  # Newton iterations: training only
    assert pick("para_gru", long) == "newton"
    monkeypatch.setattr(newton, "AUTO_MAX_WIDTH", 2 * SIZES["D"] - 1)
    assert pick("lstm", long) == "naive"  # wider than measured


def test_a_step_that_is_not_differentiable_is_refused():
    rule = recdsl.compile("rule pick\ndims D\nstate h[D]\ninput x[D]\n"
                          "h = tanh(keep_topk(h, 2) + x)\noutput y = h\n")
    assert "newton" not in rule.backends()
    inputs, _, _ = random_args(rule, batch=1, time=3, heads=1, sizes={"D": 4})
    with pytest.raises(BackendError, match="backend 'newton' is not available for rule 'pick'.*keep_topk"):
        rule(**inputs, backend="newton")
