"""backend="chunk" for the DPLR family (the Triton core ``recdsl.codegen.chunk_dplr``, run by
the interpreter) against the naive loop in float64 and against backend "torch-chunk":
outputs, final states and the gradients of every input, param and initial state, with random
upstream gradients (TESTING.md's rule: at most 10x the naive loop's own float32 error).

The rules, their input shaping and the loop from fla's KDA definition are the ones of
``test_torch_chunk_dplr`` (imported). Chunks here are 16 tokens (8 for DeltaProduct's two
steps), so T = 1, 37, 63, 64, 65, 130 start, cross and end on chunk boundaries.
"""
from __future__ import annotations

import pytest
import torch

import recdsl
from recdsl.codegen import chunk_dplr as core
from recdsl.ir.builtins import L2NORM_EPS
from recdsl.runtime import backends, torch_chunk_dplr
from tests.helpers import as_list, assert_matches_naive, rms_ratio, rule_results
from tests.runtime.test_torch_chunk_dplr import KDA, RULES, SIZES, _args, naive_recurrent_kda

FLOOR = 3e-6
SLOW = pytest.mark.slow  # interpreted calls take 10-40 s each on a shared CPU

# TWO_WRITES with a decay that cannot be negative (the Triton core has no signs): two writes
# in a step (two rows a step) and two outputs reading the state (an extra read row)
TWO_WRITES_POSITIVE = RULES["two_writes"].replace("two_writes", "two_writes_positive") \
    .replace("tanh(c) * S", "sigmoid(c) * S")


def _compare(rule, name, time, gate="soft", cu_seqlens=None, batch=2, sequences=None,
             initial=True, sizes=None):
    """chunk (float32) against the float64 loop by TESTING.md's rule, and against torch-chunk
    (float32) within the sum of both allowances."""
    tensors, init = _args(rule, name, time, gate=gate, batch=batch, sequences=sequences,
                          initial=initial, sizes=sizes)
    golden = rule_results(rule, tensors, init, "naive", torch.float64, cu_seqlens)
    reference = rule_results(rule, tensors, init, "naive", torch.float32, cu_seqlens)
    got = rule_results(rule, tensors, init, "chunk", torch.float32, cu_seqlens)
    torch_path = rule_results(rule, tensors, init, "torch-chunk", torch.float32, cu_seqlens)
    assert got.keys() == golden.keys()
    for key in golden:
        assert torch.isfinite(got[key]).all(), key
        allowed = max(10 * rms_ratio(reference[key], golden[key]), FLOOR)
        err = rms_ratio(got[key], golden[key])
        assert err <= allowed, f"{rule.name} {key}: rms ratio {err:.2e} > {allowed:.2e}"
        apart = rms_ratio(got[key], torch_path[key]) if torch_path[key].abs().max() > 0 else \
            got[key].abs().max().item()
        assert apart <= 2 * allowed, f"{rule.name} {key}: {apart:.2e} from torch-chunk"


# ---------------------------------------------------------------- the registry


@pytest.mark.parametrize("name", ["kda", "kda_fla_gate", "rwkv7", "dplr", "iplr", "gdn2",
                                  "comba", "deltaproduct"])
def test_chunk_comes_first_on_cuda(name):
    rule = recdsl.compile(RULES[name])
    assert rule.backends("cuda")[0] == "chunk"
    assert backends._family_of(rule, backends._BY_NAME["chunk"]) == "dplr"


# ---------------------------------------------------------------- against naive and torch-chunk


@pytest.mark.parametrize("name,time", [
    ("kda_fla_gate", 1), ("kda_fla_gate", 37), pytest.param("kda_fla_gate", 63, marks=SLOW),
    pytest.param("kda_fla_gate", 64, marks=SLOW), pytest.param("kda_fla_gate", 65, marks=SLOW),
    pytest.param("kda_fla_gate", 130, marks=SLOW),
    ("rwkv7", 1), ("rwkv7", 37), pytest.param("rwkv7", 63, marks=SLOW),
    pytest.param("rwkv7", 64, marks=SLOW), pytest.param("rwkv7", 65, marks=SLOW),
    pytest.param("rwkv7", 130, marks=SLOW),
    ("dplr", 37), ("iplr", 37), ("gdn2", 37), ("comba", 37), ("deltaproduct", 37),
])
def test_matches_naive_and_torch_chunk(name, time):
    _compare(recdsl.compile(RULES[name]), name, time)


# the other lengths for the other rules, at a smaller K and V (interpreted)
@SLOW
@pytest.mark.parametrize("time", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("name", ["dplr", "iplr", "gdn2", "comba", "deltaproduct"])
def test_every_rule_at_every_length(name, time):
    _compare(recdsl.compile(RULES[name]), name, time, sizes={"K": 16, "V": 12, "NH": 2})


@pytest.mark.parametrize("gate", ["zero", "mixed"])
@pytest.mark.parametrize("name", ["kda", "rwkv7",
                                  *[pytest.param(n, marks=SLOW) for n in ("dplr", "gdn2",
                                                                          "deltaproduct")]])
def test_gates_zero_and_mixed(name, gate):
    small = None if name in ("kda", "rwkv7") else {"K": 16, "V": 12, "NH": 2}
    _compare(recdsl.compile(RULES[name]), name, 40, gate=gate, sizes=small)


@pytest.mark.parametrize("name", ["kda", "rwkv7",
                                  *[pytest.param(n, marks=SLOW) for n in ("dplr", "gdn2",
                                                                          "deltaproduct")]])
def test_gates_of_minus_1e4(name):
    """Every decay exactly 0: the gate's gradient is exactly 0 in the loop, rounding here."""
    rule = recdsl.compile(RULES[name])
    tensors, initial = _args(rule, name, 40, gate="dead")
    golden = rule_results(rule, tensors, initial, "naive", torch.float64)
    got = rule_results(rule, tensors, initial, "chunk", torch.float32)
    for key, want in golden.items():
        scale = max(want.abs().max().item(), 1.0)
        assert (got[key] - want).abs().max().item() <= 1e-5 * scale, key


@SLOW
@pytest.mark.parametrize("name", ["kda_fla_gate", "deltaproduct"])
def test_packed_sequences(name):
    rule = recdsl.compile(RULES[name])
    cu = torch.tensor([0, 5, 40, 41, 90])
    _compare(rule, name, 90, gate="mixed", cu_seqlens=cu, batch=1, sequences=4)


@SLOW
def test_two_writes_a_step_and_two_reads():
    """A step of two writes (two core rows) and two outputs of the state (an extra read row),
    with a decay after the writes."""
    rule = recdsl.compile(TWO_WRITES_POSITIVE)
    _compare(rule, "two_writes", 37)


def test_decays_that_may_be_negative(monkeypatch):
    """tanh(c) * S: signs the Triton core does not carry, folded into a, b, the writes and the
    reads (the PyTorch core is not used); about half the decays negative, over 4 chunks (two
    writes a step and two reads: 3 rows a token, 5 tokens a chunk)."""
    used = []
    real = torch_chunk_dplr.chunk_dplr
    monkeypatch.setattr(torch_chunk_dplr, "chunk_dplr", lambda *a: used.append(1) or real(*a))
    rule = recdsl.compile(RULES["two_writes"])
    tensors, initial = _args(rule, "two_writes", 20)
    assert (tensors["c"] < 0).float().mean() > 0.3
    rule_results(rule, tensors, initial, "chunk", torch.float32, grads=False)
    assert not used
    _compare(rule, "two_writes", 20)


@SLOW
@pytest.mark.parametrize("name", ["kda_fla_gate", "rwkv7"])
def test_gpu_tiling_under_the_interpreter(name, monkeypatch):
    """The GPU walks K and V in tiles (32 there; 16 here, so K = 48 and V = 40 take three,
    the last one partial), with ieee products."""
    config = core.config
    monkeypatch.setattr(core, "config", lambda *a, gpu=True, **k: dict(
        config(*a, gpu=True, **k), BKT=16, BV=16, DOT="ieee"))
    _compare(recdsl.compile(RULES[name]), name, 37)


def test_bfloat16_and_float64_inputs():
    """Inputs of other dtypes are computed in fp32 and returned in their own dtype: bf16 by
    TESTING.md's half-precision rule; fp64 to fp32 accuracy."""
    rule = recdsl.compile(KDA)
    tensors, initial = _args(rule, "kda", 20)
    assert_matches_naive(rule, tensors, initial, backend="chunk", dtype=torch.bfloat16)
    golden = rule_results(rule, tensors, initial, "naive", torch.float64)
    out, _ = rule(**tensors, initial_state=initial, backend="chunk")
    assert out.dtype == torch.float64
    assert rms_ratio(out.double(), golden["out o"]) < 1e-6


def test_no_output_depends_on_a_later_gate():
    """Gates changed from token 21 on (in the middle of a chunk) change no earlier output,
    not even in rounding."""
    rule = recdsl.compile(KDA)
    tensors, initial = _args(rule, "kda", 40)
    tensors = {k: v.float() for k, v in tensors.items()}
    initial = tuple(s.float() for s in initial)
    o1, _ = rule(**tensors, initial_state=initial, backend="chunk")
    for value in (-1e4, 0.0):
        changed = dict(tensors, gk=tensors["gk"].clone())
        changed["gk"][:, 21:] = value
        o2, _ = rule(**changed, initial_state=initial, backend="chunk")
        assert torch.equal(o1[:, :21], o2[:, :21])
        assert not torch.equal(o1[:, 21:], o2[:, 21:])


# ---------------------------------------------------------------- fla's KDA


def test_kda_against_a_loop_from_fla_definition_and_fla():
    """The loop written from fla's definition, and fla's own naive_recurrent_kda where fla is
    installed."""
    rule = recdsl.compile(KDA)
    tensors, initial = _args(rule, "kda", 37, gate="mixed")
    tensors = {k: v.float() for k, v in tensors.items()}
    S0 = initial[0].float()
    out, final = rule(**tensors, initial_state=(S0,), output_final_state=True, backend="chunk")
    (o,), (S,) = as_list(out), as_list(final)
    norm = lambda x: x * torch.rsqrt(x.square().sum(-1, keepdim=True) + L2NORM_EPS)
    qn, kn = norm(tensors["q"]), norm(tensors["k"])
    scale = SIZES["K"] ** -0.5
    refs = [naive_recurrent_kda(qn.double(), kn.double(), tensors["v"].double(),
                                tensors["gk"].double(), tensors["beta"].double(), S0.double(),
                                scale)]
    try:
        from fla.ops.kda.naive import naive_recurrent_kda as fla_kda
    except ImportError:
        fla_kda = None
    if fla_kda is not None:
        refs.append(fla_kda(qn.double(), kn.double(), tensors["v"].double(),
                            tensors["gk"].double(), tensors["beta"].double(), scale=scale,
                            initial_state=S0.double(), output_final_state=True))
    for ref_o, ref_S in refs:
        assert rms_ratio(o.double(), ref_o.double()) < 1e-5
        assert rms_ratio(S.double(), ref_S.double()) < 1e-5


# ---------------------------------------------------------------- ahead-of-time builds


def test_the_export_builds_the_dplr_core_for_kda_and_rwkv7():
    from recdsl.codegen import export
    for name in ("kda_fla_gate", "rwkv7"):
        rule = recdsl.compile(RULES[name])
        sizes = {d: 64 for d in rule.ir.dims}
        kinds = [m.kind for m in export.generated_modules(rule.ir, sizes)]
        assert "chunk-dplr" in kinds, kinds


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_the_core_builds_at_128_without_spills(arch):
    """Real builds (ptxas) at K = V = 128: every kernel of the core, no spills, shared memory
    within the GPU's limit."""
    from recdsl.codegen import aot
    builds = aot.build_module(core.aot_module(128, 128), aot.ARCHS[arch])
    assert len(builds) == len(core.KERNELS)
    assert aot.problems(builds, aot.ARCHS[arch]) == []
