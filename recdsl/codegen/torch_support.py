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


# ---- tangents of the generated Jacobian (recdsl.codegen.jacobian_step): a tangent is
# [B, H, *value axes, *columns], size 1 along any axis it is constant on

def untie(t, axis, col, n):
    """A tangent tied along ``axis`` (entry i reads column i only) with that column made
    explicit at dim ``col``: t * eye(n) placed on (axis, col)."""
    t = t.unsqueeze(col)
    shape = [1] * t.dim()
    shape[axis] = shape[col] = n
    return t * torch.eye(n, dtype=t.dtype, device=t.device).reshape(shape)


def tangent_sum(t, summed, sizes, perm):
    """A sum's tangent: dims ``summed`` summed (a dim of size 1 is constant along the ``sizes``
    entries it stands for), then the rest reordered by ``perm``."""
    factor = 1
    for d, n in zip(summed, sizes):
        if t.shape[d] == 1:
            factor *= n
    if summed:
        t = t.sum(dim=tuple(summed))
    return (t * factor if factor != 1 else t).permute(perm)


def tangent_mm(a, b, shape, cols, left):
    """The tangent of ``a @ b`` through one factor, the other's tangent untied (its ``cols``
    trailing columns): ``a`` (the tangent, ``left``) ``@ b``, or ``a @ b`` (the tangent); the
    tangent expanded to the full ``shape`` [B, H, rows, columns] first."""
    t = a if left else b
    t = t.expand(*shape, *t.shape[len(shape):])
    t = t.flatten(4) if cols else t.unsqueeze(-1)
    out = torch.einsum("bhijc,bhjl->bhilc", t, b) if left else torch.einsum("bhij,bhjlc->bhilc", a, t)
    return out.unflatten(-1, (a if left else b).shape[4:]) if cols else out.squeeze(-1)


def full(t, ref, dims):
    """A tangent expanded to [B, H, *dims] (B and H from ``ref``)."""
    return t.expand(ref.shape[0], ref.shape[1], *dims)
