"""linear_scan (recdsl.runtime.scan_triton: the elementwise-scan kernels of
recdsl.codegen.scan_kernels, run by the Triton interpreter) against a plain PyTorch loop in
float64: every state, and the gradients of a, b and h0 with a random upstream gradient.

Multipliers mix exact zeros (a state reset), exact ones (no decay), values in (0, 1) and a
few negative ones. Shapes are small (interpreted Triton is slow); channel counts are not
powers of two, so the last channel block is masked. Tests run the one-token kernels unless
they say otherwise: the chunked ones are much slower interpreted (tl.associative_scan runs
element by element), so they get a few small shapes, 8 tokens a step."""
import os

import pytest
import torch

from recdsl.codegen import scan_kernels
from recdsl.errors import BackendError
from recdsl.runtime.scan_triton import linear_scan


@pytest.fixture(autouse=True)
def one_token_kernels(monkeypatch):
    monkeypatch.setattr(scan_kernels, "CHUNK_TOKENS", 1)


def reference(a, b, h0):
    """Every state of h_t = a_t * h_{t-1} + b_t, the plain loop."""
    h, states = h0, []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        states.append(h)
    return torch.stack(states, 1) if states else a.new_zeros(a.shape)


def make_inputs(N, T, C, seed=0):
    """float64 a, b, h0; a has exact zeros, exact ones, negatives and values in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(N, T, C, generator=g, dtype=torch.float64)
    kind = torch.randint(0, 8, (N, T, C), generator=g)
    a = torch.where(kind == 0, 0.0, a)
    a = torch.where(kind == 1, 1.0, a)
    a = torch.where(kind == 2, -a, a)
    b = torch.randn(N, T, C, generator=g, dtype=torch.float64)
    h0 = torch.randn(N, C, generator=g, dtype=torch.float64)
    return a, b, h0


def run_both(a, b, h0, dtype, seed=1):
    """(kernel, golden) results: each a list [h, da, db, dh0]. The golden loop runs in float64
    on the inputs as rounded to ``dtype``; both get the same random upstream gradient."""
    rounded = [x.to(dtype) for x in (a, b, h0)]
    leaves = [x.clone().requires_grad_(True) for x in rounded]
    h = linear_scan(*leaves)
    dh = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    h.backward(dh.to(h.dtype))
    gold = [x.double().requires_grad_(True) for x in rounded]
    want = reference(*gold)
    want.backward(dh)
    return [h.detach()] + [x.grad for x in leaves], [want.detach()] + [x.grad for x in gold]


NAMES = ["h", "da", "db", "dh0"]


@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("C", [40, 300])
@pytest.mark.parametrize("T", [1, 37, 65, 130])
def test_fp32_matches_the_loop(T, C, N):
    got, want = run_both(*make_inputs(N, T, C, seed=T + C + N), torch.float32)
    for name, x, y in zip(NAMES, got, want):
        assert x.dtype == torch.float32 and x.shape == y.shape, name
        # fp32 rounding only: about 1e-7 per step, relative to the values' size
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")


def test_wide_blocks(monkeypatch):
    """With many programs asked for, a launch takes 512 channels a program (4 warps); 600
    channels are then one full block and one masked one."""
    monkeypatch.setattr(scan_kernels, "TARGET_PROGRAMS", 1)
    assert scan_kernels.launch_config(2, 600) == (512, 4, 1)
    got, want = run_both(*make_inputs(2, 9, 600, seed=5), torch.float32)
    for name, x, y in zip(NAMES, got, want):
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("N, T, C", [(1, 1, 40), (3, 37, 40), (1, 17, 300), (2, 16, 40)])
def test_chunked_fp32_matches_the_loop(monkeypatch, N, T, C):
    """8 tokens a step: one partial tile, several tiles with and without a partial last one."""
    monkeypatch.setattr(scan_kernels, "CHUNK_TOKENS", 8)
    monkeypatch.setattr(scan_kernels, "INTERPRETED_CHUNKS", True)
    assert scan_kernels.launch_config(N, C)[2] == 8
    got, want = run_both(*make_inputs(N, T, C, seed=T + C + N + 1), torch.float32)
    for name, x, y in zip(NAMES, got, want):
        assert x.dtype == torch.float32 and x.shape == y.shape, name
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")


def test_chunked_float64(monkeypatch):
    monkeypatch.setattr(scan_kernels, "CHUNK_TOKENS", 8)
    monkeypatch.setattr(scan_kernels, "INTERPRETED_CHUNKS", True)
    got, want = run_both(*make_inputs(2, 19, 40, seed=9), torch.float64)
    for name, x, y in zip(NAMES, got, want):
        assert x.dtype == torch.float64, name
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-13, msg=lambda m: f"{name}: {m}")


def test_launch_config(monkeypatch):
    monkeypatch.setattr(scan_kernels, "CHUNK_TOKENS", 16)  # the default
    assert scan_kernels.block_choices(40) == [128]
    assert scan_kernels.block_choices(300) == [512, 256, 128]
    assert scan_kernels.launch_config(64, 8192) == (512, 4, 1)  # 1024 programs
    assert scan_kernels.launch_config(16, 8192) == (256, 2, 1)  # 256 programs at 512: short of 264
    assert scan_kernels.launch_config(8, 8192) == (128, 1, 1)
    # too few programs even at 128 channels: the chunked kernels
    assert scan_kernels.launch_config(3, 300) == (128, 8, 16)
    monkeypatch.setattr(scan_kernels, "CHUNK_TOKENS", 1)
    assert scan_kernels.launch_config(3, 300) == (128, 1, 1)


def test_float64_computes_in_float64():
    got, want = run_both(*make_inputs(2, 37, 40, seed=3), torch.float64)
    for name, x, y in zip(NAMES, got, want):
        assert x.dtype == torch.float64, name
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-13, msg=lambda m: f"{name}: {m}")


def test_gradcheck_float64():
    a, b, h0 = (x.requires_grad_(True) for x in make_inputs(2, 5, 3, seed=4))
    assert torch.autograd.gradcheck(linear_scan, (a, b, h0), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype, grad_rtol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_half_inputs_scan_in_fp32(dtype, grad_rtol):
    """Half inputs: the states are fp32 (and as exact as fp32 inputs); gradients come back in
    the inputs' dtype, so they carry its rounding."""
    got, want = run_both(*make_inputs(3, 37, 40, seed=6), dtype)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=2e-6)
    for name, x, y in zip(NAMES[1:], got[1:], want[1:]):
        assert x.dtype == dtype, name
        torch.testing.assert_close(x.double(), y, rtol=grad_rtol, atol=grad_rtol,
                                   msg=lambda m: f"{name}: {m}")


def test_non_contiguous_inputs_and_upstream_gradient():
    """Strided inputs are copied; the expanded gradient of h.sum() is made contiguous."""
    a, b, h0 = make_inputs(2, 11, 40, seed=7)
    at, bt = (x.transpose(0, 1).contiguous().transpose(0, 1).float().requires_grad_(True) for x in (a, b))
    h0t = h0.t().contiguous().t().float().requires_grad_(True)
    assert not at.is_contiguous() and not h0t.is_contiguous()
    linear_scan(at, bt, h0t).sum().backward()
    gold = [x.clone().requires_grad_(True) for x in (a, b, h0)]
    reference(*gold).sum().backward()
    for name, x, y in zip(NAMES[1:], (at, bt, h0t), gold):
        torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")


def test_only_some_gradients():
    a, b, h0 = (x.float() for x in make_inputs(1, 4, 40, seed=8))
    b.requires_grad_(True)
    linear_scan(a, b, h0).sum().backward()
    assert b.grad is not None and a.grad is None and h0.grad is None


def test_empty_shapes():
    a, b, h0 = (x.float().requires_grad_(True) for x in make_inputs(2, 0, 40))
    h = linear_scan(a, b, h0)
    assert h.shape == (2, 0, 40)
    h.sum().backward()
    assert a.grad.shape == (2, 0, 40) and torch.equal(h0.grad, torch.zeros(2, 40))
    a, b, h0 = (x.float() for x in make_inputs(0, 3, 40))
    assert linear_scan(a, b, h0).shape == (0, 3, 40)
    a, b, h0 = (x.float() for x in make_inputs(2, 3, 0))
    assert linear_scan(a, b, h0).shape == (2, 3, 0)


def test_errors(monkeypatch):
    a, b, h0 = (x.float() for x in make_inputs(2, 3, 5))
    cases = [
        ((a[0], b[0], h0), r"^linear_scan: a must be \[N, T, C\], but its shape is \[3, 5\]$"),
        ((a, b[:, :2], h0), r"^linear_scan: b has shape \[2, 2, 5\] but a has \[2, 3, 5\]"),
        ((a, b, h0[:, :4]), r"^linear_scan: h0 has shape \[2, 4\] but must be \[N, C\] = \[2, 5\]"),
        ((a, b.double(), h0), r"^linear_scan: b is torch.float64 but a is torch.float32; "),
        ((a, b, h0.half()), r"^linear_scan: h0 is torch.float16 but a is torch.float32; "),
        ((a.int(), b.int(), h0.int()), r"^linear_scan: a is torch.int32; use float16, "),
        ((a, b.to("meta"), h0), r"^linear_scan: b is on meta but a is on cpu; "),
        ((a, b, h0.tolist()), r"^linear_scan: h0 must be a tensor, not list$"),
    ]
    for args, message in cases:
        with pytest.raises(BackendError, match=message):
            linear_scan(*args)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendError, match=r"needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"):
        linear_scan(a, b, h0)
    assert os.environ.get("TRITON_INTERPRET") is None
