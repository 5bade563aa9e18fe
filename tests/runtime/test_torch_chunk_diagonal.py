"""backend="torch-chunk" for the diagonal family against the naive loop in float64: outputs,
final states and the gradients of every input, param and initial state (random upstream
gradients), at chunk edges, with packed sequences, in low precision and on long sequences."""
import pytest
import torch

import recdsl
from recdsl.codegen import naive
from recdsl.errors import BackendError
from recdsl.runtime import torch_chunk_diagonal
from recdsl.runtime.sample import sample_initial_state, sample_inputs
from tests.helpers import EXAMPLES, as_list, rms_ratio, rule_results

# dims that are not powers of two; M > topk so that routing really drops slots
SIZES = {"K": 6, "V": 5, "N": 7, "P": 5, "M": 12, "NH": 3}

RULE_TEXTS = {
    # a decay of the value axis (columns)
    "value_decay": """
rule value_decay
dims K, V
state S[K, V]
input q[K], k[K], v[V], gv[V]

S = S @ diag(exp(gv)) + outer(k, v)

output o = q @ S
""",
    # rows, columns and scalar decays at once, two writes, a decay after the writes (it scales
    # them), a read from each side and a per-token term
    "mixed": """
rule mixed
dims K, V
state S[K, V]
input q[K], k[K], v[V], u[V], gk[K], gv[V], a
param gamma

S = exp(a) * (diag(exp(gk)) @ S @ diag(exp(gv))) + outer(k, v) + 0.5 * outer(q, u)
S = gamma * S

output o = q @ S + 2 * v
output p = S @ u
""",
    # several decays and writes per token through a loop
    "looped": """
rule looped
dims NH, K, V
state S[K, V]
input q[K], k[NH, K], v[NH, V], g[NH]

for j in NH:
    S = exp(g[j]) * S + outer(k[j], v[j])

output o = q @ S
""",
}

RULE_TEXTS["two_blocks"] = """
rule two_blocks
dims NH, K, V
state S[K, V]
input q[K], k[NH, K], v[NH, V], g[NH]

let s = sigmoid(q)
for j in NH:
    let x = 2 * k[j] * s
    let d = exp(g[j])
    S = d * S + outer(x, v[j])
for j in NH:
    let x = 3 * k[j] + s
    let d = exp(-g[j] * g[j])
    S = d * S + outer(x, v[j])

output o = q @ S
"""  # let names bound again in a second block with the same loop variable, an outer let in both

EXAMPLE_RULES = ["linear_attention", "retention", "mamba2", "gla", "raven"]
RULES = EXAMPLE_RULES + list(RULE_TEXTS) + ["raven_topk_all", "raven_topk_1"]


def _rule(name):
    if name == "raven_topk_all":
        return recdsl.load(EXAMPLES / "raven.rec", topk=SIZES["M"])
    if name == "raven_topk_1":
        return recdsl.load(EXAMPLES / "raven.rec", topk=1)
    if name in RULE_TEXTS:
        return recdsl.compile(RULE_TEXTS[name])
    return recdsl.load(EXAMPLES / f"{name}.rec")


def _inputs(rule, T, B=2, H=2, seed=0, sequences=None):
    dims = {d: SIZES[d] for d in rule.dims}
    tensors = sample_inputs(rule, batch=B, time=T, heads=H, dims=dims, dtype=torch.float64,
                            seed=seed)
    initial = sample_initial_state(rule, batch=sequences or B, heads=H, dims=dims,
                                   dtype=torch.float64, seed=seed)
    return tensors, (initial if isinstance(initial, tuple) else (initial,))


def _run(rule, tensors, initial, backend, dtype=torch.float64, cu_seqlens=None):
    """Outputs, final states and gradients (random upstream) by name, in float64."""
    return rule_results(rule, tensors, initial, backend, dtype, cu_seqlens)


def _assert_close(got, want, tol=1e-10, what=""):
    assert got.keys() == want.keys()
    for name in want:
        scale = 1.0 + want[name].abs().max().item()
        err = (got[name] - want[name]).abs().max().item()
        assert err <= tol * scale, f"{what} {name}: max abs error {err:.2e} (scale {scale:.2e})"


# ---------------------------------------------------------------- against the naive loop


@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("name", RULES)
def test_matches_naive_float64(name, T):
    rule = _rule(name)
    assert rule.family == "diagonal"
    tensors, initial = _inputs(rule, T, seed=T)
    want = _run(rule, tensors, initial, "naive")
    got = _run(rule, tensors, initial, "torch-chunk")
    _assert_close(got, want, what=f"{name} T={T}")


@pytest.mark.parametrize("name", RULES)
def test_forward_under_no_grad_matches_naive(name):
    """Without autograd the chunk algebra works in place and in shared buffers (the states
    between chunks, per-chunk factors of a decay fixed per head): the same numbers."""
    rule = _rule(name)
    tensors, initial = _inputs(rule, 256, seed=8)  # whole chunks: retention's are all alike
    with torch.no_grad():
        want = rule(**tensors, initial_state=initial, output_final_state=True, backend="naive")
        got = rule(**tensors, initial_state=initial, output_final_state=True, backend="torch-chunk")
    for w, g in zip(as_list(want[0]) + as_list(want[1]), as_list(got[0]) + as_list(got[1])):
        assert (g - w).abs().max().item() <= 1e-10 * (1 + w.abs().max().item()), name


@pytest.mark.parametrize("name", RULES)
def test_three_packed_sequences(name):
    rule = _rule(name)
    lengths = [37, 70, 1]  # one crosses a chunk edge, one is a single token
    cu = torch.tensor([0, 37, 107, 108])
    tensors, initial = _inputs(rule, 108, B=1, H=2, seed=3, sequences=3)
    want = _run(rule, tensors, initial, "naive", cu_seqlens=cu)
    got = _run(rule, tensors, initial, "torch-chunk", cu_seqlens=cu)
    assert got[f"final {rule.states[0].name}"].shape[0] == len(lengths)
    _assert_close(got, want, what=f"{name} packed")


@pytest.mark.parametrize("name", ["gla", "raven"])
def test_without_initial_state(name):
    rule = _rule(name)
    tensors, _ = _inputs(rule, 70)
    want, _ = rule(**tensors, backend="naive")
    got, final = rule(**tensors, backend="torch-chunk")
    assert final is None
    assert (got - want).abs().max().item() < 1e-10


@pytest.mark.parametrize("name", RULES)
def test_float32_close_to_float64(name):
    """fp32 error against the fp64 naive result is at most 10x the naive loop's own fp32 error."""
    rule = _rule(name)
    tensors, initial = _inputs(rule, 130, seed=7)
    golden = _run(rule, tensors, initial, "naive")
    reference = _run(rule, tensors, initial, "naive", torch.float32)
    got = _run(rule, tensors, initial, "torch-chunk", torch.float32)
    for key in golden:
        err = rms_ratio(got[key], golden[key])
        allowed = max(10 * rms_ratio(reference[key], golden[key]), 3e-6)
        assert err <= allowed, f"{name} {key}: rms ratio {err:.2e} > {allowed:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["mamba2", "gla", "raven"])
def test_half_inputs_accumulate_in_float32(name, dtype):
    rule = _rule(name)
    tensors, initial = _inputs(rule, 100, seed=2)
    rounded = {k: v.to(dtype).double() for k, v in tensors.items()}
    golden, _ = rule(**rounded, initial_state=initial, backend="naive")
    out, final = rule(**{k: v.to(dtype) for k, v in tensors.items()}, initial_state=initial,
                      output_final_state=True, backend="torch-chunk")
    out = as_list(out)[0]
    assert out.dtype == dtype
    assert all(f.dtype == torch.float64 for f in as_list(final))  # the initial state's dtype
    out32, final32 = rule(**{k: v.to(dtype) for k, v in tensors.items()},
                          initial_state=tuple(s.float() for s in initial),
                          output_final_state=True, backend="torch-chunk")
    assert all(f.dtype == torch.float32 for f in as_list(final32))
    # the only error left is rounding the output itself to the half type
    eps = {torch.float16: 2 ** -11, torch.bfloat16: 2 ** -8}[dtype]
    assert rms_ratio(as_list(out32)[0].double(), golden) < 2 * eps


# ---------------------------------------------------------------- windows


@pytest.mark.parametrize("name", ["gla", "raven", "mixed", "looped", "two_blocks"])
def test_windows_match_naive(name, monkeypatch):
    """A long call runs in windows of whole chunks, states carried from one to the next:
    here windows of 64 tokens (the last one partial), one batch and three packed sequences
    (windows cut each sequence; the short ones run out)."""
    monkeypatch.setattr(torch_chunk_diagonal, "WINDOW_BYTES", 1)
    rule = _rule(name)
    tensors, initial = _inputs(rule, 150, seed=9)
    assert torch_chunk_diagonal.window_length(rule, _bound(rule, tensors)) == 64
    _assert_close(_run(rule, tensors, initial, "torch-chunk"),
                  _run(rule, tensors, initial, "naive"), what=f"{name} windows")
    cu = torch.tensor([0, 37, 177, 178])
    tensors, initial = _inputs(rule, 178, B=1, seed=10, sequences=3)
    _assert_close(_run(rule, tensors, initial, "torch-chunk", cu_seqlens=cu),
                  _run(rule, tensors, initial, "naive", cu_seqlens=cu), what=f"{name} packed windows")


def _bound(rule, tensors):
    from recdsl.runtime.call import BoundCall
    return BoundCall(rule.ir, (), tensors, None, None)


# ---------------------------------------------------------------- keep_topk's ties


def test_keep_topk_by_topk_keeps_what_the_stable_sort_keeps():
    """keep_topk over many tokens (torch.topk plus a tie fix) keeps exactly the entries of
    the stable sort: ties at the n-th value go to the lowest index; gradients reach the kept
    entries only; a row holding nan falls back to the sort."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (50, 3, 9), generator=g).double()  # ties everywhere
    x[0, 0] = 1.0  # a row of equal entries
    x[1, 0] = torch.arange(9.0)  # no ties
    x[2, 1, 4] = float("nan")
    for n in (1, 3, 8):
        sort = naive.keep_topk(x, n)  # small: the stable sort
        fast = x.clone().requires_grad_(True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(naive, "TOPK_SORT_MAX", 0)
            kept = naive.keep_topk(fast, n)
        assert torch.equal(kept.detach().nan_to_num(7.5), sort.nan_to_num(7.5)), n
        kept.nan_to_num(0.0).sum().backward()
        chosen = torch.zeros_like(x).scatter(
            -1, torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :n], 1.0)
        nan_row = torch.isnan(x).any(-1, keepdim=True)
        assert torch.equal(torch.where(nan_row, chosen, fast.grad), chosen), n
    assert naive.keep_topk(x, 9) is x  # n >= size keeps everything


def test_raven_with_tied_routes_matches_naive(monkeypatch):
    """Router logits with many ties: torch-chunk's routing (torch.topk over all tokens)
    selects the slots the naive loop's stable sort selects, values and gradients."""
    monkeypatch.setattr(naive, "TOPK_SORT_MAX", 1000)  # per token: the sort; all tokens: topk
    rule = recdsl.load(EXAMPLES / "raven.rec", topk=3)
    tensors, initial = _inputs(rule, 70, seed=6)
    tensors["route"] = (tensors["route"] * 2).round() / 2  # about 5 distinct values over 12 slots
    assert tensors["route"].numel() > naive.TOPK_SORT_MAX
    _assert_close(_run(rule, tensors, initial, "torch-chunk"),
                  _run(rule, tensors, initial, "naive"), what="raven ties")


# ---------------------------------------------------------------- gates at the extremes


def test_decay_of_exactly_zero_and_of_one():
    """mamba2 with exp(-exp(A_log) * dt) = 0 (the state is wiped every token) and gla with
    gk = 0 (no decay, linear attention) match the naive loop, gradients included."""
    rule = _rule("mamba2")
    tensors, initial = _inputs(rule, 80)
    # head 0: exp(-exp(12) * dt) < exp(-8000) is exactly 0 in float64
    tensors["A_log"] = torch.tensor([12.0, 0.0], dtype=torch.float64)
    _assert_close(_run(rule, tensors, initial, "torch-chunk"),
                  _run(rule, tensors, initial, "naive"), what="mamba2 decay 0")
    rule = _rule("gla")
    tensors, initial = _inputs(rule, 80)
    tensors["gk"] = torch.zeros_like(tensors["gk"])
    _assert_close(_run(rule, tensors, initial, "torch-chunk"),
                  _run(rule, tensors, initial, "naive"), what="gla gk=0")


def test_very_negative_gates_stay_finite():
    """Gates of -200 per token: exp(-D_j) over a chunk would be exp(12800); the secondary
    chunking only ever takes exps of non-positive numbers."""
    rule = _rule("gla")
    tensors, initial = _inputs(rule, 130)
    tensors["gk"] = -200 * torch.rand_like(tensors["gk"])
    want = _run(rule, tensors, initial, "naive", torch.float32)
    got = _run(rule, tensors, initial, "torch-chunk", torch.float32)
    for key in want:
        assert torch.isfinite(got[key]).all(), key
        scale = 1 + want[key].abs().max().item()
        assert (got[key] - want[key]).abs().max().item() <= 1e-4 * scale, key


@pytest.mark.parametrize("name", ["gla", "value_decay", "raven"])
def test_strong_and_mild_gates_together(name):
    """Head 0 decays mildly (sub-chunk decays factored at the sub-chunk start), head 1
    strongly (below exp(-20) within a sub-chunk: exact 16 x 16 x channels decays); both
    paths in one call, merged, against the naive loop with gradients."""
    rule = _rule(name)
    tensors, initial = _inputs(rule, 130, seed=11)
    if name == "raven":
        tensors["A_log"] = torch.tensor([-2.0, 5.0], dtype=torch.float64)
    else:
        gate = "gk" if name == "gla" else "gv"
        tensors[gate] = tensors[gate] * torch.tensor([0.05, 10.0], dtype=torch.float64)[:, None]
    _assert_close(_run(rule, tensors, initial, "torch-chunk"),
                  _run(rule, tensors, initial, "naive"), what=f"{name} mixed gates")


def _long(name, T, sizes, grads=False):
    rule = _rule(name)
    dims = {d: sizes[d] for d in rule.dims}
    tensors = sample_inputs(rule, batch=1, time=T, heads=1, dims=dims, dtype=torch.float32, seed=1)
    if grads:
        tensors = {k: v.requires_grad_(True) for k, v in tensors.items()}
    out, final = rule(**tensors, output_final_state=True, backend="torch-chunk")
    return rule, tensors, out, as_list(final)


@pytest.mark.parametrize("name", ["gla", "raven"])
def test_long_sequence_finite_and_close_to_float64(name):
    dims = {"K": 16, "V": 16, "M": 32}
    rule, tensors, out, final = _long(name, 16384, dims, grads=True)
    assert torch.isfinite(out).all() and all(torch.isfinite(f).all() for f in final)
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in tensors.values())
    # still responding at the end: the state neither vanished nor blew up
    assert out[:, -100:].abs().max() > 1e-3
    want, _ = rule(**{k: v.detach().double() for k, v in tensors.items()}, backend="torch-chunk")
    assert rms_ratio(out.detach().double(), want) < 1e-4


@pytest.mark.parametrize("name", ["gla", "raven"])
def test_65536_tokens_forward_finite(name):
    with torch.no_grad():
        _, _, out, final = _long(name, 65536, {"K": 16, "V": 16, "M": 32})
    assert torch.isfinite(out).all() and all(torch.isfinite(f).all() for f in final)


# ---------------------------------------------------------------- selection and refusals


@pytest.mark.parametrize("name", EXAMPLE_RULES)
def test_auto_on_cpu_runs_torch_chunk(name, monkeypatch):
    from recdsl.runtime import backends
    monkeypatch.setattr(backends, "SCAN_BELOW", 1)  # the small test dims would pick the scan
    rule = _rule(name)
    calls = []
    real = torch_chunk_diagonal.run
    monkeypatch.setattr(torch_chunk_diagonal, "run", lambda r, c: calls.append(r.name) or real(r, c))
    tensors, _ = _inputs(rule, 5)
    rule(**tensors)
    assert calls == [rule.name]
    assert rule.backends()[0] == "torch-chunk"


def test_nested_loops_are_refused():
    rule = recdsl.compile("""
rule nested
dims NH, NI, K, V
state S[K, V]
input q[K], k[NH, K], v[NI, V]

for j in NH:
    for i in NI:
        S = S + outer(k[j], v[i])

output o = q @ S
""")
    assert rule.family == "diagonal"
    assert "torch-chunk" not in rule.backends()
    tensors = sample_inputs(rule, batch=1, time=3, heads=1, dims={"NH": 2, "NI": 2})
    with pytest.raises(BackendError) as err:
        rule(**tensors, backend="torch-chunk")
    assert str(err.value) == (
        "backend 'torch-chunk' is not available for rule 'nested': the update of S on line 9 is "
        "inside nested 'for' loops, which the chunkwise path does not unroll; use "
        "backend='naive' or 'auto'")


def test_a_let_name_bound_in_two_blocks_means_each_block_own():
    """Each block's ``x`` and ``d`` (same names, same loop variable) are its own: the
    per-token values resolve names as the checker does, not by name and loop variable."""
    rule = _rule("two_blocks")
    assert torch_chunk_diagonal.problem(rule) is None
    assert rule.backends()[0] == "torch-chunk"
    tensors, initial = _inputs(rule, 70, seed=4)
    want = _run(rule, tensors, initial, "naive")
    _assert_close(_run(rule, tensors, initial, "torch-chunk"), want, what="two blocks")
    # the blocks really differ: with the first block's lets in both, the state would not match
    swapped = recdsl.compile(RULE_TEXTS["two_blocks"].replace("3 * k[j] + s", "2 * k[j] * s"))
    other = _run(swapped, tensors, initial, "naive")
    assert (other["final S"] - want["final S"]).abs().max() > 1e-3


def test_negative_decay_is_an_error_not_nan():
    rule = _rule("retention")
    tensors, _ = _inputs(rule, 4)
    tensors["gamma"] = torch.tensor([0.5, -0.5], dtype=torch.float64)
    with pytest.raises(BackendError) as err:
        rule(**tensors, backend="torch-chunk")
    assert str(err.value) == ("the decay gamma (line 9) is negative or nan for some tokens: the "
                              "chunkwise path works with its log; use backend='naive'")
