"""The elementwise linear scan ``h_t = a_t * h_{t-1} + b_t`` along the time axis, in batched
PyTorch, with its backward (no rule knowledge here).

Blocked, so that a call is a few hundred large ops whatever T is: time is cut into chunks of
about sqrt(T) tokens; (1) every chunk is run from a zero state, all chunks at once, one op per
position in the chunk, keeping only the chunk's last state and the product of its multipliers;
(2) the states entering the chunks are carried from chunk to chunk, one op per chunk; (3) every
chunk is run again, all at once, from its true entering state, writing each token's state.
Reading the inputs twice costs less than keeping the first pass's states and products (fewer
full-size temporaries). Nothing is divided and no exponential is formed: a multiplier of 0
makes every later product exactly 0, products of multipliers in [0, 1] only shrink, so no gate
value overflows.

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
    # (1) each chunk from a zero state: its last state and the product of its multipliers
    last = b[:, :, 0].clone()
    for i in range(1, L):
        last.mul_(a[:, :, i]).add_(b[:, :, i])
    product = a.prod(dim=2)
    # (2) the state entering each chunk
    entering = torch.empty((B, C) + rest, dtype=b.dtype, device=b.device)
    entering[:, 0] = h0
    for c in range(1, C):
        torch.addcmul(last[:, c - 1], product[:, c - 1], entering[:, c - 1], out=entering[:, c])
    # (3) every chunk again from its entering state
    h = torch.empty_like(b)
    torch.addcmul(b[:, :, 0], a[:, :, 0], entering, out=h[:, :, 0])
    for i in range(1, L):
        torch.addcmul(b[:, :, i], a[:, :, i], h[:, :, i - 1], out=h[:, :, i])
    return h.reshape(B, C * L, *rest)[:, :T]


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
