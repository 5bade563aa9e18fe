"""The newton backend's linear solves on Triton (recdsl.runtime.newton_triton, the kernels of
recdsl.codegen.newton_kernels, run by the Triton interpreter): every state of
h_t = A_t h_{t-1} + c_t against a plain loop written here in float64 and against the
backend's PyTorch solver, for a diagonal A (the elementwise scan), k x k blocks per channel
(block_solve) and dense matrices (tiled_solve); then whole newton calls with their solves
sent to the kernels, against the naive loop; then real builds for sm_80 and sm_90.

Shapes are small (interpreted Triton is slow); channel counts are not powers of two and k = 5
is padded to 8, so masks matter."""
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import recdsl
from recdsl.codegen import aot, newton_kernels
from recdsl.errors import BackendError
from recdsl.runtime import backends, newton, newton_triton
from tests.helpers import assert_matches_naive
from tests.runtime.test_newton import CASES, _args


def loop(A, c, h0, diagonal):
    """Every state of h_t = A_t h_{t-1} + c_t, token by token."""
    h, out = h0, []
    for t in range(c.shape[1]):
        h = (A[:, t] * h if diagonal else (A[:, t] @ h.unsqueeze(-1)).squeeze(-1)) + c[:, t]
        out.append(h)
    return torch.stack(out, 1)


def make(kind, T, *, B=2, H=3, C=5, k=5, seed=0):
    """float64 (A, c, h0) of the backend's layout [B, T, H, C, k(, k)]: contracting matrices
    (or multipliers in (-1, 1)), every tenth token's A exactly zero (a sequence start)."""
    g = torch.Generator().manual_seed(seed)
    diagonal = kind == "diagonal"
    shape = (B, T, H, C, k) if diagonal else (B, T, H, C, k, k)
    A = torch.randn(shape, generator=g, dtype=torch.float64)
    A = 2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1 if diagonal else 0.6 * A / k ** 0.5
    A[:, ::10] = 0
    c = torch.randn(B, T, H, C, k, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, H, C, k, generator=g, dtype=torch.float64)
    return A, c, h0, diagonal


# (kind, channels C, width k): a diagonal J; 2 x 2 and 5 x 5 blocks per channel (block_solve);
# wider blocks and a dense matrix per head, C = 1 (tiled_solve: k > BLOCK_MAX)
SOLVES = {"diagonal": ("diagonal", 7, 3), "block k=2": ("block", 5, 2), "block k=5": ("block", 3, 5),
          "block k=20": ("block", 2, 20), "dense k=40": ("dense", 1, 40)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 37, 65])
@pytest.mark.parametrize("case", list(SOLVES))
def test_solve_matches_the_loop_and_the_torch_solver(case, T, dtype):
    kind, C, k = SOLVES[case]
    A, c, h0, diagonal = make(kind, T, C=C, k=k, seed=T + k)
    args = [x.to(dtype) for x in (A, c, h0)]
    got = newton_triton.solve(*args, diagonal)
    want = loop(*[x.double() for x in args], diagonal)  # the float64 loop on the rounded inputs
    torch_solver = newton._solve(SimpleNamespace(diagonal=diagonal, k=k), *args)
    assert got.dtype == dtype and got.shape == c.shape
    # fp32: rounding of a contracting recurrence, about 1e-7 a step relative to the values
    tol = dict(rtol=1e-11, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(torch_solver.double(), want, **tol)
    # a token with A = 0 starts afresh: its state is exactly c there
    assert torch.equal(got[:, ::10], args[1][:, ::10])


def test_transposed_and_flipped_views_as_the_backward_passes_them():
    """The backward solves the reversed recurrence in the transposed matrices: views, not copies."""
    A, c, h0, _ = make("block", 23, C=4, k=5, seed=3)
    At, cf = A.transpose(-1, -2).flip(1), c.flip(1)
    assert not At.is_contiguous()
    torch.testing.assert_close(newton_triton.solve(At, cf, h0, False), loop(At, cf, h0, False),
                               rtol=1e-11, atol=1e-11)


def test_narrow_channel_blocks_with_a_masked_last_block(monkeypatch):
    """Asked for many programs, block_solve narrows its channel block: 15 channels (3 heads x
    5) in blocks of 4, the last one masked."""
    monkeypatch.setattr(newton_kernels, "TARGET_PROGRAMS", 8)
    assert newton_kernels.launch_config(2, 15, 5) == ("block_solve", {"KP": 8, "BLOCK_M": 4}, 1)
    A, c, h0, _ = make("block", 19, H=3, C=5, k=5, seed=4)
    torch.testing.assert_close(newton_triton.solve(A, c, h0, False), loop(A, c, h0, False),
                               rtol=1e-11, atol=1e-11)


def test_launch_configs_bound_the_tile():
    """Whatever k, a program holds at most TILE values of A a step (so no spills)."""
    for k in (1, 2, 3, 5, 8, 16):
        name, blocks, warps = newton_kernels.launch_config(1, 1000, k)
        assert name == "block_solve" and blocks["KP"] >= k
        assert blocks["BLOCK_M"] * blocks["KP"] ** 2 <= newton_kernels.TILE and 1 <= warps <= 4
    for k in (17, 64, 128, 256, 300):
        name, blocks, warps = newton_kernels.launch_config(2, 4, k)
        assert name == "tiled_solve" and blocks["BLOCK_R"] * blocks["KP"] <= newton_kernels.TILE
    assert newton_kernels.launch_config(2, 4, 256) == ("tiled_solve", {"KP": 256, "BLOCK_R": 8}, 4)


def test_bad_input_is_named(monkeypatch):
    A, c, h0, _ = make("block", 4, k=2)
    with pytest.raises(BackendError, match=r"A has shape \[2, 4, 3, 5, 2\] but must be \[2, 4, 3, 5, 2, 2\]"):
        newton_triton.solve(A[..., 0], c, h0, False)
    with pytest.raises(BackendError, match=r"h0 has shape \[2, 3, 5\] but must be \[2, 3, 5, 2\]"):
        newton_triton.solve(A, c, h0[..., 0], False)
    with pytest.raises(BackendError, match="A is torch.float32 on cpu but c is torch.float64"):
        newton_triton.solve(A.float(), c, h0, False)
    with pytest.raises(BackendError, match="the tensors are torch.float16; the backend solves in float32"):
        newton_triton.solve(A.half(), c.half(), h0.half(), False)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendError, match="needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"):
        newton_triton.solve(A, c, h0, False)
    monkeypatch.setattr(newton_triton, "ON_CPU", True)
    assert not newton_triton.wanted(torch.device("cpu"))  # no interpreter: the PyTorch solver
    assert newton_triton.wanted(torch.device("cuda"))


# ---------------------------------------------------------------- whole newton calls

@pytest.fixture
def solves(monkeypatch):
    """Send the backend's solves on CPU tensors to the interpreted kernels; count them by kind."""
    monkeypatch.setattr(newton_triton, "ON_CPU", True)
    seen = []
    solve = newton_triton.solve

    def counted(A, c, h0, diagonal):
        seen.append("diagonal" if diagonal else newton_kernels.launch_config(1, 1, c.shape[-1])[0])
        return solve(A, c, h0, diagonal)
    monkeypatch.setattr(newton_triton, "solve", counted)
    return seen


def converged_matches_naive(rule, tensors, initial, **options):
    """newton against the naive loop, failing on a fallback to the sequential loop (a wrong
    solve does not converge, and the fallback's results would pass)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert_matches_naive(rule, tensors, initial, backend="newton", **options)
    assert newton.last_run["iterations"] is not None


@pytest.mark.parametrize("T", [1, 37])
def test_newton_para_lstm_through_the_kernels(solves, T):
    """ParaLSTM (2 x 2 blocks per channel): outputs, final states and every gradient against
    the naive loop, with the forward's and the backward's solves on block_solve."""
    rule = recdsl.compile(CASES["para_lstm"][0])
    tensors, initial = _args(rule, "para_lstm", T)
    converged_matches_naive(rule, tensors, initial)
    assert solves and set(solves) == {"block_solve"}


@pytest.mark.parametrize("name, kind", [("para_gru", "diagonal"), ("lstm", "tiled_solve")])
def test_newton_diagonal_and_dense_through_the_kernels(solves, monkeypatch, name, kind):
    """ParaGRU through the elementwise scan; the LSTM's dense 10 x 10 Jacobian per head through
    tiled_solve (BLOCK_MAX lowered so that k = 10 counts as wide)."""
    monkeypatch.setattr(newton_kernels, "BLOCK_MAX", 4)
    rule = recdsl.compile(CASES[name][0])
    tensors, initial = _args(rule, name, 37)
    converged_matches_naive(rule, tensors, initial)
    assert solves and set(solves) == {kind}


def test_newton_packed_sequences_through_the_kernels(solves):
    rule = recdsl.compile(CASES["para_lstm"][0])
    tensors, initial = _args(rule, "para_lstm", 30, batch=1, sequences=3)
    converged_matches_naive(rule, tensors, initial, cu_seqlens=torch.tensor([0, 1, 17, 30]))
    assert set(solves) == {"block_solve"}


# ---------------------------------------------------------------- auto on CUDA

class _OnCuda:
    """A bound call as "auto" sees it, claiming CUDA (no GPU here)."""
    device = torch.device("cuda")

    def __init__(self, call):
        self._call = call

    def __getattr__(self, name):
        return getattr(self._call, name)


def test_auto_keeps_the_fused_kernel_on_cuda_until_measured(monkeypatch):
    rule = recdsl.compile(CASES["para_lstm"][0])
    tensors, _ = _args(rule, "para_lstm", 37, init=False)
    call = _OnCuda(rule.bind(**{k: v.requires_grad_(True) for k, v in tensors.items()}))
    assert rule.backends("cuda") == ["recurrent", "newton", "naive"]
    assert backends._auto(rule, call) == "recurrent"  # AUTO_MIN_TOKENS_CUDA is None
    monkeypatch.setattr(newton, "AUTO_MIN_TOKENS_CUDA", 32)
    assert backends._auto(rule, call) == "newton"
    monkeypatch.setattr(newton, "AUTO_MIN_TOKENS_CUDA", 64)  # 37 tokens: too short
    assert backends._auto(rule, call) == "recurrent"


# ---------------------------------------------------------------- builds for real GPUs

def test_compile_report_lists_the_solve_kernels():
    from recdsl.codegen.export import generated_modules, newton_modules
    for name, D, want in (("para_lstm", 64, ["block_solve"] * 5), ("lstm", 128, ["tiled_solve"]),
                          ("para_gru", 64, ["linear_scan_fwd", "linear_scan_fwd_chunked"])):
        modules = generated_modules(recdsl.compile(CASES[name][0]).ir, {"D": D})
        assert [m.kind for m in modules] == ["recurrent", "newton"]
        assert [k.name for k in modules[1].kernels] == want
    (lstm,) = generated_modules(recdsl.compile(CASES["lstm"][0]).ir, {"D": 128})[1].kernels
    assert lstm.constexprs == {"K": 256, "KP": 256, "BLOCK_R": 8}
    # a rule with a parallel form: no newton kernels
    gla = recdsl.load(Path(__file__).resolve().parents[2] / "examples/gla.rec")
    assert newton_modules(gla.ir, {"K": 16, "V": 16}) == []


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_solve_kernels_build_without_spills(arch):
    """D = 64 and 128: 2 x 2 blocks (ParaLSTM), 64- and 128-wide blocks (a delta rule's K x K
    per column), dense 128 and 256 (an LSTM's 2D)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"  # conftest: the build runs in a child
    builds = aot.build_module(newton_kernels.aot_module([2, 64, 128, 256]), aot.ARCHS[arch])
    assert [(b.kernel, b.variant) for b in builds] == [
        ("block_solve", "k=2, BLOCK_M=512"), ("block_solve", "k=2, BLOCK_M=256"),
        ("block_solve", "k=2, BLOCK_M=128"), ("block_solve", "k=2, BLOCK_M=64"),
        ("block_solve", "k=2, BLOCK_M=32"), ("tiled_solve", "k=64, BLOCK_R=32"),
        ("tiled_solve", "k=128, BLOCK_R=16"), ("tiled_solve", "k=256, BLOCK_R=8")]
    for b in builds:
        assert b.source_of_figures == "ptxas log"
        assert (b.spill_stores, b.spill_loads, b.stack) == (0, 0, 0), b
        assert 0 < b.registers <= 128, b
    assert aot.problems(builds, aot.ARCHS[arch]) == []
