"""backend="chunk" for the diagonal family (generated prologue + Triton pass kernels, run by
the interpreter) against the naive loop in float64: outputs, every final state and the
gradients of every input, param and initial state, with random upstream gradients.

Pass rule (TESTING.md): the backend's RMS error against the float64 result is at most 10x
the naive loop's own float32 error (2x its own error in half precision), with a floor for
values near zero. Shapes are small (interpreted Triton is slow): chunks of 16 tokens unless a test says
otherwise, dims that are not powers of two."""
import pytest
import torch

import recdsl
from recdsl.codegen import chunk_diagonal as codegen
from recdsl.runtime import backends, chunk_diagonal
from recdsl.runtime.sample import sample_inputs
from tests.helpers import EXAMPLES, assert_matches_naive, rms_ratio, rule_results

SIZES = {"K": 6, "V": 5, "N": 6, "P": 5, "M": 7}
FLOOR = 3e-6

VALUE_DECAY = """rule value_decay
dims K, V
state S[K, V]
input q[K], k[K], v[V], gv[V]
S = S @ diag(exp(gv)) + outer(k, v)
output o = q @ S
"""

# two writes (a pass each), a scalar and a row decay, a decay after the first write, and an
# output of two reads
TWO_WRITES = """rule two_writes
dims K, V
state S[K, V]
input q[K], k[K], v[V], k2[K], v2[V], g
S = exp(g) * S + outer(k, v)
S = diag(sigmoid(k2)) @ S + 0.5 * outer(k2, v2)
output o = q @ S + 2 * (k @ S)
"""

# decays on both axes, read S @ q (the pass on the transposed state)
RIGHT_READ = """rule right_read
dims K, V
state S[K, V]
input q[V], k[K], v[V], gk[K], gv[V]
S = diag(exp(gk)) @ S @ diag(exp(gv)) + outer(k, v)
output o = S @ q
"""


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(chunk_diagonal, "CHUNK_SIZE", 16)


def _load(name, **consts):
    if name == "raven":
        consts.setdefault("topk", 3)
    return recdsl.load(EXAMPLES / f"{name}.rec", **consts)


def _compare(rule, tensors, initial=None, cu_seqlens=None, dtype=torch.float32):
    assert_matches_naive(rule, tensors, initial, backend="chunk", cu_seqlens=cu_seqlens,
                         dtype=dtype, floor=FLOOR)


def _inputs(rule, T, B=1, H=2, seed=0, initial=False, sequences=None, sizes=None):
    sizes = sizes or {d: SIZES[d] for d in rule.dims}
    tensors = sample_inputs(rule, batch=B, time=T, heads=H, dims=sizes, dtype=torch.float64, seed=seed)
    states = None
    if initial:
        g = torch.Generator().manual_seed(seed + 100)
        states = [0.5 * torch.randn([sequences or B, H] + [sizes[d] for d in s.dims], generator=g,
                                    dtype=torch.float64) for s in rule.states]
    return tensors, states


# ------------------------------------------------------------------ the canonical rules


@pytest.mark.parametrize("name, T, H", [("linear_attention", 1, 2), ("retention", 33, 2),
                                        ("mamba2", 33, 2), ("gla", 33, 1), ("raven", 20, 1)])
def test_matches_naive_with_initial_state(name, T, H):
    rule = _load(name)
    tensors, states = _inputs(rule, T, H=H, initial=True)
    _compare(rule, tensors, states)


@pytest.mark.parametrize("name, T", [("retention", 63), ("retention", 64), ("retention", 65),
                                     ("gla", 65), pytest.param("gla", 63, marks=pytest.mark.slow),
                                     pytest.param("gla", 64, marks=pytest.mark.slow)])
def test_chunk_boundaries(name, T):
    rule = _load(name)
    tensors, _ = _inputs(rule, T, H=1, seed=T)
    _compare(rule, tensors)


def test_one_token_without_initial_state():
    """A decay that multiplies a zero state has a gradient of exactly zero: no rounding
    residue may appear (the autotest compares it against 0)."""
    rule = _load("retention")
    tensors, _ = _inputs(rule, 1)
    got = rule_results(rule, tensors, None, "chunk", torch.float32)
    assert torch.equal(got["dgamma"], torch.zeros_like(got["dgamma"]))
    _compare(rule, tensors)


def test_default_chunk_of_64(monkeypatch):
    """Four sub-chunks per chunk (the cross-sub-chunk products) and a second, partial chunk."""
    monkeypatch.setattr(chunk_diagonal, "CHUNK_SIZE", 64)
    rule = _load("gla")
    tensors, states = _inputs(rule, 65, H=1, initial=True)
    _compare(rule, tensors, states)


def test_three_packed_sequences():
    rule = _load("gla")
    cu = torch.tensor([0, 7, 23, 40])
    tensors, states = _inputs(rule, 40, H=1, initial=True, sequences=3)
    _compare(rule, tensors, states, cu_seqlens=cu)


@pytest.mark.parametrize("topk", [1, 7])
def test_raven_topk_one_and_all_slots(topk):
    """topk = 1: one slot moves per token; topk = M = 7: every slot, keep_topk keeps all."""
    rule = _load("raven", topk=topk)
    tensors, states = _inputs(rule, 12, H=1, initial=True)
    _compare(rule, tensors, states)


def test_value_axis_decay():
    """S @ diag(exp(gv)) read by q @ S: the per-channel decay is on the returned axis."""
    rule = recdsl.compile(VALUE_DECAY)
    tensors, states = _inputs(rule, 20, H=1, initial=True)
    _compare(rule, tensors, states)


def test_tiles_of_both_axes(monkeypatch):
    """Dims wider than the tile caps: outputs and gradients summed over X and Y tiles."""
    monkeypatch.setattr(chunk_diagonal, "TILE_CAPS", (16, 16))
    rule = _load("mamba2")
    tensors, states = _inputs(rule, 20, H=1, initial=True, sizes={"N": 40, "P": 20})
    _compare(rule, tensors, states)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    rule = _load("retention")
    tensors, states = _inputs(rule, 20, initial=True)
    _compare(rule, tensors, states, dtype=dtype)


def test_gates_at_zero_and_very_negative():
    """gk = 0 (no decay) on half the channels, gk = -30 (the state forgets at once) on the
    rest: everything stays finite and exact."""
    rule = _load("gla")
    tensors, _ = _inputs(rule, 20, H=1)
    gk = torch.zeros_like(tensors["gk"])
    gk[..., 3:] = -30.0
    tensors["gk"] = gk
    _compare(rule, tensors)


# decays of exp(-exp(lam)) per token: exp(-20) and exp(-12) at lam = 3 and 2.5, per head
# (scalar) or per channel of either axis
STRONG_PARAM_DECAYS = {"scalar": "S = exp(-exp(lam)) * S + outer(k, v)",
                       "key axis": "S = diag(exp(-exp(lam))) @ S + outer(k, v)",
                       "value axis": "S = S @ diag(exp(-exp(lam))) + outer(k, v)"}


@pytest.mark.parametrize("kind, T", [("scalar", 2), ("scalar", 22), ("key axis", 9),
                                     ("value axis", 9)])
def test_param_decay_gradient_at_very_strong_decays(kind, T):
    """The gradient of a decay param sums every token's decay gradient, whose forward sums
    over the keys before a token are dominated by 1e9 by the keys nearest the chunk's end:
    formed as an inclusive sum less the token's own term, they were lost to its rounding
    (dlam 2e-3 to 1e-1 off, relatively)."""
    dims = {"scalar": "", "key axis": "[K]", "value axis": "[V]"}[kind]
    rule = recdsl.compile(f"""rule strong_decay
dims K, V
state S[K, V]
input q[K], k[K], v[V]
param lam{dims}
{STRONG_PARAM_DECAYS[kind]}
output o = K ** -0.5 * (q @ S)
""")
    tensors, states = _inputs(rule, T, initial=True)
    lam = torch.tensor([3.0, 2.5], dtype=torch.float64)
    tensors["lam"] = lam.view(2, 1).expand_as(tensors["lam"]).clone() if dims else lam
    _compare(rule, tensors, states)


@pytest.mark.parametrize("T", [2, 3])
def test_torch_chunk_strong_per_channel_decays_in_a_short_sub_chunk(T):
    """backend="torch-chunk" (its core shares these decay sums): log-decays of -12 to -13 per
    channel over a sub-chunk short enough to take the factored decays. The decay of a key to
    its sub-chunk's end, as a product of factors, had a gradient that cancelled on the earlier
    tokens and left there the rounding of the last key's term (dgk 4e-2 off)."""
    rule = _load("gla")
    tensors, states = _inputs(rule, T, initial=True)
    gen = torch.Generator().manual_seed(T)
    tensors["gk"] = -12 - torch.rand(tensors["gk"].shape, generator=gen, dtype=torch.float64)
    assert_matches_naive(rule, tensors, states, backend="torch-chunk", floor=FLOOR)


# ------------------------------------------------------------------ lowering and errors


def test_raven_lowers_to_two_chained_passes():
    plan = codegen.plan(_load("raven"))
    first, second = plan.passes
    # pass 1 scores the slots: Sk @ q contracts K; the slot decay is on the returned axis
    assert (first.state, first.x_dim, first.y_dim, first.transposed) == ("Sk", "K", "M", True)
    assert (first.gx, first.gy) == (codegen.NONE, codegen.CHANNEL)
    # pass 2 reads the value slots with p = softmax(scores), computed between the passes
    assert (second.state, second.x_dim, second.y_dim, second.transposed) == ("Sv", "M", "V", False)
    assert (second.gx, second.gy) == (codegen.CHANNEL, codegen.NONE)
    assert [st.reads_in for st in plan.stages] == [[], ["read0"]]
    assert list(plan.stages[1].values.values())[0].fn == "softmax"
    # both passes share the routing quantities (1 - lam and log lam) of stage 0
    assert second.kx == first.vy and second.gx_value == first.gy_value


def test_rules_outside_the_family_are_refused():
    mlstm = recdsl.load(EXAMPLES / "mlstm.rec")
    assert chunk_diagonal.problem(mlstm) == "rule 'mlstm' is in the recurrent family, not diagonal"
    looped = recdsl.compile("""rule looped
dims K, V, NH
state S[K, V]
input q[K], k[NH, K], v[NH, V]
for j in NH:
    S = S + outer(k[j], v[j])
output o = q @ S
""")
    assert looped.family == "diagonal"
    assert chunk_diagonal.problem(looped) == ("the update of S inside a for block is not "
                                              "supported chunkwise")
    # the chunk backend still runs it: through the DPLR family's Triton core
    assert backends._family_of(looped, backends._BY_NAME["chunk"]) == "dplr"
    tensors, _ = _inputs(looped, 3, sizes={"K": 6, "V": 5, "NH": 2})
    assert_matches_naive(looped, tensors, backend="chunk")


# ------------------------------------------------------------------ slow: longer, wider


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linear_attention", "retention", "mamba2", "gla", "raven"])
def test_130_tokens_default_chunk(name, monkeypatch):
    monkeypatch.setattr(chunk_diagonal, "CHUNK_SIZE", 64)
    rule = _load(name)
    tensors, states = _inputs(rule, 130, H=1, initial=True)
    _compare(rule, tensors, states)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["retention", "mamba2", "raven"])
def test_three_packed_sequences_more_rules(name):
    rule = _load(name)
    cu = torch.tensor([0, 7, 23, 40])
    tensors, states = _inputs(rule, 40, initial=True, sequences=3)
    _compare(rule, tensors, states, cu_seqlens=cu)


@pytest.mark.slow
@pytest.mark.parametrize("text", [TWO_WRITES, RIGHT_READ])
def test_several_writes_terms_and_both_axes(text):
    rule = recdsl.compile(text)
    tensors, states = _inputs(rule, 37, B=2, initial=True)
    _compare(rule, tensors, states)


@pytest.mark.slow
def test_tiles_with_per_channel_decays(monkeypatch):
    monkeypatch.setattr(chunk_diagonal, "TILE_CAPS", (16, 16))
    monkeypatch.setattr(chunk_diagonal, "CHUNK_SIZE", 32)
    rule = recdsl.compile(RIGHT_READ)
    tensors, states = _inputs(rule, 40, H=1, initial=True, sizes={"K": 20, "V": 40})
    cu = torch.tensor([0, 5, 40])
    states = [torch.cat([s, s.flip(0)]) for s in states]
    _compare(rule, tensors, states, cu_seqlens=cu)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_kernels_build_without_spills(arch):
    """Every kernel of the passes of gla, retention and Raven (M = 256) at K = V = 64, built
    for real GPUs without one (TESTING.md section 2): no spills, shared memory in bounds."""
    from recdsl.codegen import aot
    shapes = {"gla": codegen.PassShape(64, 64, codegen.CHANNEL, codegen.NONE, False),
              "retention": codegen.PassShape(64, 64, codegen.SCALAR, codegen.NONE, False),
              "raven pass 1": codegen.PassShape(64, 256, codegen.NONE, codegen.CHANNEL, True),
              "raven pass 2": codegen.PassShape(256, 64, codegen.CHANNEL, codegen.NONE, False)}
    target = aot.ARCHS[arch]
    for name, shape in shapes.items():
        builds = aot.build_module(codegen.aot_module(shape, name), target)
        assert len(builds) >= 5
        assert aot.problems(builds, target) == []


@pytest.mark.slow
def test_long_sequence_strong_gates_stay_finite(monkeypatch):
    """1024 tokens with log-decays down to -20 per token: no overflow, and fp32 precision
    (a chunk's cumulative log-decay reaches about -600 here; decay factors formed as
    differences of such sums would be 1e-5 off)."""
    monkeypatch.setattr(chunk_diagonal, "CHUNK_SIZE", 64)
    rule = _load("gla")
    tensors, _ = _inputs(rule, 1024, H=1)
    tensors["gk"] = -20 * torch.rand(tensors["gk"].shape, generator=torch.Generator().manual_seed(1),
                                     dtype=torch.float64)
    single = {k: v.float() for k, v in tensors.items()}
    out, final = rule(**single, output_final_state=True, backend="chunk")
    ref, ref_final = rule(**single, output_final_state=True, backend="naive")
    gold, gold_final = rule(**tensors, output_final_state=True, backend="naive")
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    for got, naive, golden in ((out, ref, gold), (final, ref_final, gold_final)):
        assert rms_ratio(got, golden) <= max(10 * rms_ratio(naive, golden), FLOOR)
