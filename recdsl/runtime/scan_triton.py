"""The elementwise linear scan ``h_t = a_t * h_{t-1} + b_t`` on Triton, with its gradients.

``linear_scan(a, b, h0) -> h`` is a torch.autograd.Function over the fixed kernels of
``recdsl.codegen.scan_kernels``:

- ``a``, ``b``: ``[N, T, C]`` (N sequences, T tokens, C channels: a state flattened), the
  per-token multiplier (any real value; 0 is fine) and write;
- ``h0``: ``[N, C]``, the state before token 0;
- returns every state, ``h[:, t] = a[:, t] * h[:, t-1] + b[:, t]`` with ``h[:, -1]`` read as
  ``h0``; the final state is ``h[:, -1]``.

Dtypes: a, b and h0 share one floating dtype. The scan runs in fp32 and returns fp32 for
fp32, fp16 and bf16 inputs, and in fp64 for fp64 inputs; gradients come back in the inputs'
dtype. The backward reads the states the forward returned (saved, not recomputed): one
``[N, T, C]`` fp32 tensor that the caller holds anyway.

Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests). The kernel
module is imported on first use, so that importing this module does not decorate kernels
before the interpreter setting is made.
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import BackendError
from .recurrent import triton_usable

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _kernels():
    from ..codegen import scan_kernels
    return scan_kernels


def _check(a, b, h0):
    for name, t in (("a", a), ("b", b), ("h0", h0)):
        if not isinstance(t, torch.Tensor):
            raise BackendError(f"linear_scan: {name} must be a tensor, not {type(t).__name__}")
    if a.dim() != 3:
        raise BackendError(f"linear_scan: a must be [N, T, C], but its shape is {list(a.shape)}")
    if b.shape != a.shape:
        raise BackendError(f"linear_scan: b has shape {list(b.shape)} but a has {list(a.shape)}; "
                           f"both must be [N, T, C]")
    if h0.shape != (a.shape[0], a.shape[2]):
        raise BackendError(f"linear_scan: h0 has shape {list(h0.shape)} but must be [N, C] = "
                           f"{[a.shape[0], a.shape[2]]} for a of shape {list(a.shape)}")
    if a.dtype not in _FLOATS:
        raise BackendError(f"linear_scan: a is {a.dtype}; use float16, bfloat16, float32 or float64")
    for name, t in (("b", b), ("h0", h0)):
        if t.dtype != a.dtype:
            raise BackendError(f"linear_scan: {name} is {t.dtype} but a is {a.dtype}; "
                               f"a, b and h0 must share one dtype")
        if t.device != a.device:
            raise BackendError(f"linear_scan: {name} is on {t.device} but a is on {a.device}; "
                               f"put a, b and h0 on one device")
    if not triton_usable(a.device):
        raise BackendError(f"linear_scan runs Triton kernels: it needs CUDA tensors, or CPU tensors "
                           f"with TRITON_INTERPRET=1 set before the first call; here they are on {a.device}")


def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch(kernels: tuple, args, sequences: int, channels: int, device):
    """Run (one-token kernel, chunked kernel)[chosen] over every (sequence, channel block)."""
    block, warps, tokens = _kernels().launch_config(sequences, channels,
                                                    interpreted=device.type != "cuda")
    grid = (sequences * -(-channels // block),)
    extra = {} if tokens == 1 else {"BLOCK_T": tokens}
    # Triton launches on the current CUDA device: make it the tensors' one
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernels[tokens > 1][grid](*args, BLOCK_C=block, num_warps=warps, **extra)


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0):
        N, T, C = a.shape
        a, b, h0 = a.contiguous(), b.contiguous(), h0.contiguous()
        h = torch.empty((N, T, C), dtype=_state_dtype(a.dtype), device=a.device)
        if h.numel():
            k = _kernels()
            _launch((k.linear_scan_fwd, k.linear_scan_fwd_chunked), (a, b, h0, h, T, C), N, C, a.device)
        ctx.save_for_backward(a, h0, h)
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h0, h = ctx.saved_tensors
        N, T, C = a.shape
        da, db, dh0 = torch.empty_like(a), torch.empty_like(a), torch.empty_like(h0)
        if T == 0:  # no token: the initial state reaches nothing
            dh0.zero_()
        elif h.numel():
            dh = dh.to(h.dtype).contiguous()  # e.g. an expanded gradient of h.sum()
            k = _kernels()
            _launch((k.linear_scan_bwd, k.linear_scan_bwd_chunked), (a, h0, h, dh, da, db, dh0, T, C),
                    N, C, a.device)
        needs = ctx.needs_input_grad
        return (da if needs[0] else None, db if needs[1] else None, dh0 if needs[2] else None)


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Every state of ``h_t = a_t * h_{t-1} + b_t`` (``h_{-1} = h0``), differentiable in
    a, b and h0. Shapes ``a, b: [N, T, C]``, ``h0: [N, C]``; returns ``[N, T, C]``, fp32
    (fp64 for fp64 inputs). Raises BackendError for mismatched or unusable tensors."""
    _check(a, b, h0)
    return _LinearScan.apply(a, b, h0)
