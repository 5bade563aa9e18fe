"""The elementwise linear scan ``h_t = a_t * h_{t-1} + b_t`` along the time axis, in batched
PyTorch, with its backward (no rule knowledge here).

Blocked, so that a call is a few hundred large ops whatever T is: time is cut into chunks of
about sqrt(T) tokens; (1) every chunk is scanned from a zero state, all chunks at once, one op
per position in the chunk; (2) the states entering the chunks are carried from chunk to chunk,
one op per chunk; (3) each token's state is its chunk's local state plus the carried state
times the running product of the chunk's multipliers (``cumprod``). Nothing is divided and no
exponential is formed: a multiplier of 0 makes every later product exactly 0, a product of
multipliers in [0, 1] only shrinks, so no gate value overflows.

The backward is the same scan run backwards: with ``g_t`` the gradient reaching ``h_t``,
``g_t = dh_t + a_{t+1} g_{t+1}``, then ``db_t = g_t``, ``da_t = g_t h_{t-1}``, ``dh0 = a_0 g_0``.
"""
from __future__ import annotations

import math

import torch


def _chunk_length(T: int) -> int:
    return max(1, math.isqrt(T))


def _pad_time(x, length, value):
    if x.shape[1] == length:
        return x
    pad = x.new_full((x.shape[0], length - x.shape[1]) + tuple(x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)


def scan(a, b, h0):
    """All states of ``h_t = a_t * h_{t-1} + b_t`` (t along dim 1), ``h_{-1} = h0``.

    ``b``: ``[B, T, *rest]``; ``a`` broadcasts against ``b`` and has the time axis in full (or
    expanded); ``h0``: ``[B, *rest]``. No autograd (see ``LinearScan``)."""
    B, T = b.shape[:2]
    rest = tuple(b.shape[2:])
    if T == 0:
        return b.clone()
    L = _chunk_length(T)
    C = -(-T // L)
    a = _pad_time(a, C * L, 1.0)
    b = _pad_time(b, C * L, 0.0)
    a = a.reshape(a.shape[0], C, L, *a.shape[2:])
    b = b.reshape(B, C, L, *rest)
    # (1) each chunk from a zero state, all chunks at once
    local = torch.empty_like(b)
    local[:, :, 0] = b[:, :, 0]
    for i in range(1, L):
        torch.addcmul(b[:, :, i], a[:, :, i], local[:, :, i - 1], out=local[:, :, i])
    # (2) the state entering each chunk
    products = torch.cumprod(a, dim=2)  # prod of a over the chunk up to each token
    entering = torch.empty((B, C) + rest, dtype=b.dtype, device=b.device)
    entering[:, 0] = h0
    for c in range(1, C):
        torch.addcmul(local[:, c - 1, L - 1], products[:, c - 1, L - 1], entering[:, c - 1],
                      out=entering[:, c])
    # (3) every token: its local state plus the entering state carried to it
    local.addcmul_(products, entering.unsqueeze(2))
    return local.reshape(B, C * L, *rest)[:, :T]


class LinearScan(torch.autograd.Function):
    """``scan`` with gradients for ``a``, ``b`` and ``h0``."""

    @staticmethod
    def forward(ctx, a, b, h0):
        h = scan(a, b, h0)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h, h0 = ctx.saved_tensors
        T = h.shape[1]
        # g_t = dh_t + a_{t+1} g_{t+1}: the forward scan over reversed time
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
        g = scan(a_next.flip(1), dh.flip(1), torch.zeros_like(h0)).flip(1)
        grad_a = grad_b = grad_h0 = None
        if ctx.needs_input_grad[0]:
            before = torch.cat([h0.unsqueeze(1), h[:, :T - 1]], dim=1)
            grad_a = (g * before).sum_to_size(a.shape)
        if ctx.needs_input_grad[1]:
            grad_b = g
        if ctx.needs_input_grad[2]:
            grad_h0 = (a[:, 0] * g[:, 0]).sum_to_size(h0.shape)
        return grad_a, grad_b, grad_h0


def linear_scan(a, b, h0):
    """All states ``[B, T, *rest]`` of ``h_t = a_t * h_{t-1} + b_t``, differentiable."""
    a = a.expand(b.shape[:2] + tuple(a.shape[2:])) if a.shape[1] != b.shape[1] else a
    return LinearScan.apply(a, b, h0)
