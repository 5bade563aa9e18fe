"""The chunk kernels' precision policy (recdsl.codegen.precision): what each policy resolves
to, the call's precision= argument, half-precision operands under the interpreter against the
float64 naive loop (TESTING.md's rule for float16: at most 2x the naive loop's own float16
error), and the formats and occupancy the build report shows.

bfloat16 operands cannot be checked here (the interpreter's bf16 dots are wrong): under it a
bf16 format runs as ieee, and benchmarks/gpu_check.py checks bf16 on a GPU."""
import inspect
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl.cli import main
from recdsl.codegen import aot, chunk_delta, chunk_diagonal
from recdsl.codegen.precision import DOT_HELPER, NAMES, Precision, resolve
from recdsl.errors import InputError
from recdsl.runtime.autotest import Shape, measure, run_autotest
from recdsl.runtime.sample import sample_inputs

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SMALL = {"K": 16, "V": 16, "NH": 2}
# T = 1, across a 64-token chunk with an initial state, and three packed sequences
SHAPES = [Shape(1, 1, 1), Shape(1, 70, 2, initial_state=True),
          Shape(1, 40, 1, cu_seqlens=(0, 1, 15, 40), initial_state=True)]


def load(name):
    return recdsl.load(EXAMPLES / f"{name}.rec")


# ---------------------------------------------------------------- the policies


def test_auto_follows_the_dtype():
    assert resolve("auto", torch.float32, interpreted=False) == Precision("tf32x3", *["tf32x3"] * 4)
    assert resolve("auto", torch.float64, interpreted=False).chunk == "tf32x3"
    # half operands for the backward's chunk products only (the outputs' products stay accurate)
    assert resolve("auto", torch.float16, interpreted=False) == Precision("mixed", "tf32x3", "fp16", "tf32x3", "tf32x3")
    assert resolve("auto", torch.bfloat16, interpreted=False) == Precision("mixed", "tf32x3", "bf16", "tf32x3", "tf32x3")


def test_named_policies():
    assert resolve("half", torch.float16, False) == Precision("half", "fp16", "fp16", "fp16", "tf32x3")
    assert resolve("half", torch.float32, False) == Precision("half", "bf16", "bf16", "bf16", "tf32x3")
    assert resolve("tf32", torch.float32, False) == Precision("tf32", "tf32", "tf32", "tf32", "tf32x3")
    assert resolve("ieee", torch.bfloat16, False) == Precision("ieee", *["ieee"] * 4)


def test_the_interpreter_runs_tf32_and_bf16_as_ieee_and_keeps_fp16():
    assert resolve("auto", torch.float32, True) == Precision("tf32x3", *["ieee"] * 4)
    assert resolve("half", torch.bfloat16, True) == Precision("half", *["ieee"] * 4)
    assert resolve("half", torch.float16, True) == Precision("half", "fp16", "fp16", "fp16", "ieee")


@pytest.mark.parametrize("bad", ["fp8", "HALF", None, 16])
def test_an_unknown_policy_is_a_recdsl_error_that_lists_the_names(bad):
    rule = load("gated_delta")
    x = sample_inputs(rule, batch=1, time=3, heads=1, dims={"K": 4, "V": 4})
    with pytest.raises(InputError) as err:
        rule(**x, precision=bad)
    assert repr(bad) in str(err.value)
    assert all(repr(n) in str(err.value) for n in NAMES)


def test_the_core_holds_the_same_product_helper_as_generated_modules():
    assert inspect.getsource(chunk_delta._dot.fn).strip() == DOT_HELPER.strip()
    assert DOT_HELPER in chunk_diagonal.SOURCE


def test_each_delta_kernel_gets_the_formats_of_its_products():
    cfg = chunk_delta.config(128, 128, 2, precision=resolve("auto", torch.float16, False))
    fwd_o = chunk_delta.constexprs("chunk_delta_fwd_o", cfg)
    assert fwd_o["DOT_R"] == "tf32x3" and "DOT" not in fwd_o and "DOT_S" not in fwd_o
    assert chunk_delta.constexprs("chunk_delta_fwd_h", cfg)["DOT_S"] == "tf32x3"
    dh = chunk_delta.constexprs("chunk_delta_bwd_dh", cfg)
    assert (dh["DOT_S"], dh["DOT_T"], "DOT" in dh) == ("tf32x3", "tf32x3", False)
    dq = chunk_delta.constexprs("chunk_delta_bwd_dq", cfg)
    assert (dq["DOT"], dq["DOT_S"]) == ("fp16", "tf32x3")
    assert chunk_delta.num_warps("chunk_delta_bwd_dq", cfg) == 8
    # bwd_dk's state products are ieee unless half (tf32x3 spilled there)
    assert chunk_delta.constexprs("chunk_delta_bwd_dk", cfg)["DOT_S"] == "ieee"
    half = chunk_delta.config(128, 128, 2, precision=resolve("half", torch.bfloat16, False))
    assert chunk_delta.constexprs("chunk_delta_bwd_dk", half)["DOT_S"] == "bf16"
    assert chunk_delta.constexprs("chunk_delta_fwd_o", half)["DOT_R"] == "bf16"
    cfg32 = chunk_delta.config(128, 128, 2)
    assert chunk_delta.constexprs("chunk_delta_bwd_dq", cfg32)["DOT"] == "tf32x3"
    assert chunk_delta.num_warps("chunk_delta_bwd_dq", cfg32) == 4
    assert chunk_delta.dots("chunk_delta_prepare", cfg) == "solve tf32x3, K Kᵀ ieee"


def test_diagonal_state_products_have_their_own_format():
    p = resolve("mixed", torch.float16, False)
    assert chunk_diagonal.precision_flags("chunk_fwd", p) == dict(PRECISION_R="tf32x3", PRECISION_S="tf32x3")
    assert chunk_diagonal.precision_flags("chunk_bwd_dh", p) == dict(PRECISION_S="tf32x3")
    assert chunk_diagonal.precision_flags("chunk_bwd_x", p) == dict(PRECISION="fp16", PRECISION_S="tf32x3")


# ---------------------------------------------------------------- numerics under the interpreter


@pytest.mark.parametrize("name", ["gated_delta", "gla", "deltaproduct"])
def test_float16_inputs_pass_the_autotest_with_the_default_policy(name):
    rule = load(name)
    dims = {d: SMALL[d] for d in rule.dims}
    report = run_autotest(rule, backends=["chunk"], dims=dims, shapes=SHAPES, dtypes=["float16"],
                          progress=None)
    assert len(report.cases) == len(SHAPES)
    assert not report.failures, report.table()


def _run(rule, x, h0, dtype, backend, **options):
    """The output and the gradients of every input under random upstream gradients."""
    leaves = {k: v.to(dtype).clone().requires_grad_(True) for k, v in x.items()}
    h0 = h0.to(dtype) if h0 is not None else None
    out, _ = rule(**leaves, initial_state=h0, backend=backend, **options)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * up).sum(), list(leaves.values()))
    return {"o": out.detach().double(), **{f"d{k}": g.double() for k, g in zip(x, grads)}}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gated_delta", "gla"])
def test_the_policy_reaches_the_kernels(name):
    """fp16 inputs: auto (mixed) rounds the backward's chunk products and not the outputs'
    products; half rounds the outputs' too. Each differs from ieee where it rounds, by about
    fp16's rounding, and not elsewhere (the interpreter runs tf32x3 exactly)."""
    rule = load(name)
    dims = {d: SMALL[d] for d in rule.dims}
    x = sample_inputs(rule, batch=1, time=40, heads=2, dims=dims, dtype=torch.float64, seed=3)
    exact = _run(rule, x, None, torch.float16, "chunk", precision="ieee")
    auto = _run(rule, x, None, torch.float16, "chunk")
    half = _run(rule, x, None, torch.float16, "chunk", precision="half")
    assert torch.equal(auto["o"], exact["o"])
    scale = max(t.abs().max().item() for t in exact.values())
    gap = lambda got, names: max((got[q] - exact[q]).abs().max().item() for q in names)  # noqa: E731
    assert 0 < gap(auto, [q for q in exact if q != "o"]) < 1e-2 * scale
    assert 0 < gap(half, ["o"]) < 1e-2 * scale


@pytest.mark.parametrize("name", ["gated_delta", "deltaproduct"])
def test_float16_gradients_with_half_operands_stay_within_twice_the_naive_error(name):
    """The autotest checks half types forward only; the default policy's half operands are in
    the backward, so its gradients are checked here by the same rule (autotest.measure: at
    most 2x the naive loop's float16 error, with its floors; measured 1.2x-1.35x)."""
    rule = load(name)
    dims = {d: SMALL[d] for d in rule.dims}
    x = sample_inputs(rule, batch=1, time=70, heads=2, dims=dims, dtype=torch.float64, seed=0)
    h0 = 0.5 * torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    golden = _run(rule, x, h0, torch.float64, "naive")
    reference = _run(rule, x, h0, torch.float16, "naive")
    got = _run(rule, x, h0, torch.float16, "chunk")
    for q, want in golden.items():
        assert measure(q, got[q], want, reference[q], torch.float16).passed, q


@pytest.mark.slow
def test_recdsl_test_dtype_float16_on_the_chunk_backend(capsys):
    code = main(["test", str(EXAMPLES / "gated_delta.rec"), "--dtype", "float16", "--backend",
                 "chunk", "--quick", "--dims", "K=16,V=16"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith("PASS  gated_delta:")


# ---------------------------------------------------------------- the build report


def _build(**changes):
    fields = dict(kernel="k", kind="chunk-delta", num_warps=4, registers=128, spill_stores=0,
                  spill_loads=0, stack=0, shared=16 * 1024, seconds=1.0, source_of_figures="ptxas log")
    fields.update(changes)
    return aot.KernelBuild(**fields)


def test_occupancy_from_registers_shared_memory_and_warps():
    sm80, sm90 = aot.ARCHS["sm_80"], aot.ARCHS["sm_90"]
    # 128 registers x 32 threads = 4096 a warp: 16 warps of 65536 registers
    assert aot.occupancy(_build(), sm80) == (16, "registers")
    # 255 registers round up to 256: 8 warps, two programs of 4
    assert aot.occupancy(_build(registers=255), sm80) == (8, "registers")
    # 64 registers: 32 warps by registers, but 40 KiB (+1 KiB) of shared memory a program
    # leaves room for 4 programs on sm_80's 164 KiB and 5 on sm_90's 228 KiB
    assert aot.occupancy(_build(registers=64, shared=40 * 1024), sm80) == (16, "shared")
    assert aot.occupancy(_build(registers=64, shared=40 * 1024), sm90) == (20, "shared")
    # few registers and no shared memory: the 64-warp limit
    assert aot.occupancy(_build(registers=24, shared=0, num_warps=8), sm80) == (64, "warps")


def test_the_report_table_shows_occupancy_and_dot_formats():
    text = aot.format_table([_build(dots="chunk fp16"), _build(kernel="j", registers=255)],
                            aot.ARCHS["sm_80"])
    header, first, second = text.splitlines()[:3]
    assert "warps/SM" in header and "dots" in header
    assert "16 (registers)" in first and first.endswith("chunk fp16")
    assert "8 (registers)" in second and second.endswith("-")
    assert "warps/SM" not in aot.format_table([_build()])  # without an architecture: as before


@pytest.mark.slow
def test_half_operand_delta_kernels_build_at_128_without_spills():
    """Real builds (ptxas) of the delta core at K = V = 128, NH = 1 (64-token chunks) under the
    default policy for fp16 inputs on sm_80: at 4 warps bwd_dv and bwd_dq spilled with half
    operands (hence 8, ``chunk_delta._WIDE_HALF``)."""
    arch = aot.ARCHS["sm_80"]
    p = resolve("auto", torch.float16, interpreted=False)
    builds = aot.build_module(chunk_delta.aot_module(128, 128, 1, precision=p), arch)
    assert aot.problems(builds, arch) == []
    dv = next(b for b in builds if b.kernel == "chunk_delta_bwd_dv")
    assert dv.num_warps == 8 and dv.dots == "chunk fp16"
