"""The newton backend's linear solves on Triton: every ``h_t = A_t h_{t-1} + c_t`` over T.

``solve(A, c, h0, diagonal)`` takes the backend's layout (``recdsl.runtime.newton._solve``):

- ``c``: ``[B, T, *channels, k]``, ``h0``: ``[B, *channels, k]``;
- ``A``: the same shape as ``c`` when ``diagonal`` (``h_t = A_t * h_{t-1} + c_t`` entry by
  entry: the elementwise scan of ``recdsl.runtime.scan_triton``), else ``[B, T, *channels, k,
  k]`` (one k x k matrix per token and channel: ``recdsl.codegen.newton_kernels``);
- returns every state ``[B, T, *channels, k]``, fp32 (fp64 for fp64 inputs).

No autograd: the backend's backward solves the transposed recurrence with this function again.
Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests, which set
``ON_CPU`` to send the backend's CPU solves here). The kernel module is imported on first use,
so that importing this module does not decorate kernels before the interpreter setting is made.
"""
from __future__ import annotations

import contextlib
from math import prod

import torch

from ..errors import BackendError
from .recurrent import triton_usable
from .scan_triton import linear_scan

# Tests set this to run the backend's solves on CPU tensors through the interpreted kernels.
ON_CPU = False


def wanted(device: torch.device) -> bool:
    """Whether the backend's solves on ``device`` go to these kernels."""
    return device.type == "cuda" or (ON_CPU and triton_usable(device))


def _kernels():
    from ..codegen import newton_kernels
    return newton_kernels


def _check(A, c, h0, diagonal: bool):
    if c.dim() < 3:
        raise BackendError(f"newton solve: c must be [B, T, ..., k], but its shape is {list(c.shape)}")
    want = tuple(c.shape) if diagonal else (*c.shape, c.shape[-1])
    if tuple(A.shape) != want:
        raise BackendError(f"newton solve: A has shape {list(A.shape)} but must be {list(want)} for c "
                           f"of shape {list(c.shape)} ({'diagonal' if diagonal else 'k x k blocks'})")
    if tuple(h0.shape) != (c.shape[0], *c.shape[2:]):
        raise BackendError(f"newton solve: h0 has shape {list(h0.shape)} but must be "
                           f"{[c.shape[0], *c.shape[2:]]} (c without its token dim)")
    for name, t in (("A", A), ("h0", h0)):
        if t.dtype != c.dtype or t.device != c.device:
            raise BackendError(f"newton solve: {name} is {t.dtype} on {t.device} but c is {c.dtype} "
                               f"on {c.device}; A, c and h0 must share one dtype and device")
    if c.dtype not in (torch.float32, torch.float64):
        raise BackendError(f"newton solve: the tensors are {c.dtype}; the backend solves in float32 "
                           f"or float64")
    if not triton_usable(c.device):
        raise BackendError(f"newton solve runs Triton kernels: it needs CUDA tensors, or CPU tensors "
                           f"with TRITON_INTERPRET=1 set before the first call; here they are on "
                           f"{c.device}")


def solve(A: torch.Tensor, c: torch.Tensor, h0: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """Every state of ``h_t = A_t h_{t-1} + c_t`` from ``h_{-1} = h0`` (module notes for the
    shapes); raises BackendError for mismatched or unusable tensors."""
    _check(A, c, h0, diagonal)
    B, T, k = c.shape[0], c.shape[1], c.shape[-1]
    if diagonal:  # every entry its own recurrence: the elementwise scan over B x (the rest)
        with torch.no_grad():
            h = linear_scan(A.reshape(B, T, -1), c.reshape(B, T, -1), h0.reshape(B, -1))
        return h.reshape(c.shape)
    M = prod(c.shape[2:-1])
    h = torch.empty(c.shape, dtype=c.dtype, device=c.device)
    if h.numel() == 0:
        return h
    A, c, h0 = A.contiguous(), c.contiguous(), h0.contiguous()
    kernels = _kernels()
    name, blocks, warps = kernels.launch_config(B, M, k)
    grid = (B * (M if name == "tiled_solve" else -(-M // blocks["BLOCK_M"])),)
    # Triton launches on the current CUDA device: make it the tensors' one
    with torch.cuda.device(c.device) if c.device.type == "cuda" else contextlib.nullcontext():
        getattr(kernels, name)[grid](A, c, h0, h, T, M, K=k, num_warps=warps, **blocks)
    return h
