"""Helpers that generated PyTorch code calls as ``_rt.<name>``: the few operations that need
care with numbers versus tensors, or a numerically stable form."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _tensor(x, like):
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=like.dtype, device=like.device)


def _pair(a, b):
    ref = a if isinstance(a, torch.Tensor) else b
    return _tensor(a, ref), _tensor(b, ref)


def maximum(a, b):
    return torch.maximum(*_pair(a, b))


def minimum(a, b):
    return torch.minimum(*_pair(a, b))


def heaviside(x, at_zero):
    return torch.where(x > 0, 1.0, torch.where(x == 0, at_zero, 0.0)).to(x.dtype)


def softplus(x):
    """log(1 + e^x) exactly (torch's softplus turns linear above a threshold)."""
    return torch.logaddexp(x, torch.zeros_like(x))


def logsigmoid(x):
    return F.logsigmoid(x)


def silu(x):
    return F.silu(x)


def topk_mask(x, count):
    """1 on the ``count`` largest entries of the last axis, 0 elsewhere; ties go to the
    lowest index, as in the naive loop and the Triton kernels."""
    kept = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :min(count, x.shape[-1])]
    return torch.zeros_like(x).scatter(-1, kept, 1.0)


def broadcast(x, ref, dims):
    """``x`` (a number or a batched view) expanded to [B, H, *dims], B and H from ``ref``."""
    x = _tensor(x, ref)
    if x.dim() == 0:
        return x.expand(ref.shape[0], ref.shape[1], *dims)
    return x.expand(ref.shape[0], ref.shape[1], *dims)
