"""The chunkwise (WY / UT) algorithm for delta-family recurrences, in batched PyTorch.

A chunk holds ``L = C * m`` Householder-like steps (``C`` tokens of ``m`` steps each; m is
DeltaProduct's NH, 1 otherwise). Step ``h`` maps the state ``S`` (``K x V``) to

    S <- d_h (I - b_h k_h k_hᵀ) S + k_h u_hᵀ

(``d_h`` a scalar decay given as its log ``g_h`` and, when a decay may be negative, its sign;
``u_h`` the write, ``b_h v_h`` for the canonical rules). Token ``t`` is read after its last
step ``t*m + m - 1``. Inside a chunk, with ``Γ_ij`` the decay from after step j to after step
i (``i >= j``), the state after step i is

    S_i = Γ_i0 S_0 + sum_{j <= i} Γ_ij k_j v'_jᵀ,     V' = U - W S_0,
    (I + A) [W | U] = [diag(b) (K ⊙ exp(γ)) | Û],     A = strict_lower(diag(b) (K Kᵀ ⊙ Γ)),

with ``(I + A)^{-1}`` from one ``torch.linalg.solve_triangular`` against the identity (a unit
lower triangular solve, in the compute precision). Everything inside the chunks is computed
for many chunks of all sequences at once (all of them for short inputs; long ones go through
in groups of bounded size, see ``chunk_delta``); only the state passing,
``V'_c = U_c - W_c S`` then ``S <- exp(γ_L) S + K_endᵀ V'_c``, is a loop over chunks (two
batched matmuls per chunk). The gradient is autograd through these ops, with two explicit
backwards (``_UnitLowerSolve``, ``_PairDecays``) where autograd's own would be slow.

Numerics: decays live in log space as chunk-local cumulative sums, taken in float64 whatever
the compute precision, so that their differences (the log of ``Γ_ij``) are exact to the compute
precision even after a gate of -1e4 earlier in the chunk; they are exponentiated only where
``i >= j`` (-inf elsewhere), so every exponent is <= 0 for decays <= 1 and nothing overflows.
No T x T tensor is formed: chunks are ``L x L``.

Layout: every tensor is ``[nc, Z, L, ...]``: chunk index first (so the state loop slices
contiguous blocks), then ``Z`` = sequences x heads, then the steps of the chunk.
"""
from __future__ import annotations

import math

import torch


LOG_FLOOR = -1000.0
GROUP_ELEMENTS = 1 << 21  # elements of the largest per-group temporary (see chunk_delta)


def _lower(L, device):
    """The lower triangle with the diagonal, ``i >= j``."""
    i = torch.arange(L, device=device)
    return i[:, None] >= i[None, :]


class _UnitLowerSolve(torch.autograd.Function):
    """``X = (I + strict_lower(A))^{-1} R``, through the explicit inverse ``T``.

    ``T`` comes from one triangular solve against the identity; ``X = T R`` is then a matmul,
    and so is the whole backward (``dR = Tᵀ dX``, ``dA = -strict_lower(dR Xᵀ)``): autograd's
    own backward of a solve would run a second, transposed triangular solve, which is several
    times slower than a matmul of the same size on CPU."""

    @staticmethod
    def forward(ctx, A, R):
        L = A.shape[-1]
        eye = torch.eye(L, dtype=A.dtype, device=A.device).expand(A.shape)
        T = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
        X = T @ R
        ctx.save_for_backward(T, X)
        return X

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dX):
        T, X = ctx.saved_tensors
        dR = T.transpose(-1, -2) @ dX
        dA = -(dR @ X.transpose(-1, -2)).tril_(-1)
        return dA, dR


class _PairDecays(torch.autograd.Function):
    """``Γ_ij = exp(sum_{j < l <= i} g_l)`` for ``i >= j``, 0 above the diagonal.

    The exponents are differences of float64 cumulative sums rounded once to the compute
    precision. The backward stays in the compute precision and needs no L x L float64
    tensor: ``dg_l = sum_{i >= l} (row_i - col_i)`` of ``dΓ ⊙ Γ``."""

    @staticmethod
    def forward(ctx, g, lower):
        cum = g.to(torch.float64).clamp(min=LOG_FLOOR).cumsum(-1)
        seg = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).to(g.dtype)
        gamma = torch.where(lower, seg, float("-inf")).exp_()
        ctx.save_for_backward(gamma, g >= LOG_FLOOR)
        return gamma

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dgamma):
        gamma, above_floor = ctx.saved_tensors
        dseg = dgamma * gamma
        dcum = dseg.sum(-1) - dseg.sum(-2)
        dg = dcum.flip(-1).cumsum(-1).flip(-1)  # dg_l = sum_{i >= l} dcum_i
        return dg * above_floor, None


def _parity_sign(counts):
    """(-1) ** counts for float counts of negative decays (exact small integers)."""
    return 1 - 2 * torch.remainder(counts, 2)


def chunk_delta(k, b, u, g, S0, steps_per_token=1, q_left=None, q_right=None, neg=None):
    """Run the recurrence over chunks.

    k: [nc, Z, L, K] keys; b: [nc, Z, L] erase strengths; u: [nc, Z, L, V] writes;
    g: [nc, Z, L] log |decay| applied before each step; neg: None or [nc, Z, L], 1.0 where
    the decay is negative; S0: [Z, K, V] the state entering the first chunk.
    q_left: None or [nc, Z, C, R, K]: R read vectors per token, o = q @ S -> [.., V].
    q_right: None or [nc, Z, C, R, V]: o = S @ x -> [.., K].
    Returns (o_left [nc, Z, C, R, V] | None, o_right [nc, Z, C, R, K] | None, S_final [Z, K, V]).
    """
    nc, Z, L, K = k.shape
    V = u.shape[-1]
    # chunks go through in groups whose L x L and L x (K + V) temporaries stay near 8 MB:
    # small enough to be reused by the allocator instead of being mapped afresh (and
    # page-faulted in) on every call, which cost more than the arithmetic at T = 16K
    group = max(1, GROUP_ELEMENTS // (Z * L * max(L, K + V)))
    if nc <= group:
        return _chunk_group(k, b, u, g, S0, steps_per_token, q_left, q_right, neg)
    # split, not slicing: one backward node per tensor instead of a full-size zero gradient
    # per group
    pieces = lambda x: (None,) * math.ceil(nc / group) if x is None else x.split(group)
    lefts, rights = [], []
    S = S0
    for k_, b_, u_, g_, ql_, qr_, neg_ in zip(*map(pieces, (k, b, u, g, q_left, q_right, neg))):
        o_left, o_right, S = _chunk_group(k_, b_, u_, g_, S, steps_per_token, ql_, qr_, neg_)
        lefts.append(o_left)
        rights.append(o_right)
    cat = lambda parts: None if parts[0] is None else torch.cat(parts)
    return cat(lefts), cat(rights), S


def _chunk_group(k, b, u, g, S0, steps_per_token, q_left, q_right, neg):
    """chunk_delta on consecutive chunks, all at once but for the state passing."""
    nc, Z, L, K = k.shape
    V = u.shape[-1]
    m = steps_per_token
    C = L // m
    lower = _lower(L, k.device)

    # decays inside the chunk, from cumulative log sums in float64. A log-decay below -1000 is
    # a decay of exactly 0 in every float format (exp(-746) == 0 in float64): the floor keeps
    # -inf out of the differences and changes no value
    gamma = _PairDecays.apply(g, lower)  # [nc, Z, L, L]: from after step j to after step i
    cum = g.to(torch.float64).clamp(min=LOG_FLOOR).cumsum(-1)  # from the chunk's start to after i
    start = cum.exp().to(g.dtype)
    to_end = (cum[..., L - 1:] - cum).exp().to(g.dtype)  # from after step j to the chunk's end
    total = start[..., L - 1]
    if neg is not None:  # signs: (-1) ** (negative decays in the segment), exact counts
        count = neg.cumsum(-1)
        gamma = gamma * _parity_sign(count.unsqueeze(-1) - count.unsqueeze(-2))
        start = start * _parity_sign(count)
        to_end = to_end * _parity_sign(count[..., L - 1:] - count)
        total = start[..., L - 1]

    # the WY / UT factors: (I + A) [W | U] = [diag(b) (K ⊙ start) | U_hat]. The solve reads
    # only A's strict lower triangle and its gradient is zero elsewhere, so A needs no mask
    # beyond gamma's
    A = ((k * b.unsqueeze(-1)) @ k.transpose(-1, -2)) * gamma
    rhs = torch.cat([k * (b * start).unsqueeze(-1), u], dim=-1)
    solved = _UnitLowerSolve.apply(A, rhs)
    del A, rhs
    W, U = solved[..., :K], solved[..., K:]

    # the state passed between chunks (the only sequential part): V'_c = U_c - W_c S,
    # S <- exp(γ_L) S + K_endᵀ V'_c
    k_end = (k * to_end.unsqueeze(-1)).transpose(-1, -2)  # [nc, Z, K, L]
    # unbind, not indexing: one backward node for all chunks instead of a full-size zero
    # gradient per chunk
    chunks = zip(U.unbind(0), W.unbind(0), k_end.unbind(0), total[..., None, None].unbind(0))
    S = S0
    entering, new_values = [], []
    for U_c, W_c, k_end_c, total_c in chunks:
        entering.append(S)
        vp = torch.baddbmm(U_c, W_c, S, alpha=-1)
        new_values.append(vp)
        S = torch.baddbmm(S * total_c, k_end_c, vp)
    S_in = torch.stack(entering)  # [nc, Z, K, V]: the state entering each chunk
    Vp = torch.stack(new_values)  # [nc, Z, L, V]

    # reads after each token's last step
    ends = slice(m - 1, L, m)
    gamma_r = gamma[..., ends, :]  # [nc, Z, C, L]
    start_r = start[..., ends]  # [nc, Z, C]
    o_left = o_right = None
    if q_left is not None:
        R = q_left.shape[-2]
        q = q_left.reshape(nc, Z, C * R, K)
        gam, st = _per_read(gamma_r, start_r, R)
        o_left = (q * st.unsqueeze(-1)) @ S_in + ((q @ k.transpose(-1, -2)) * gam) @ Vp
        o_left = o_left.reshape(nc, Z, C, R, V)
    if q_right is not None:
        R = q_right.shape[-2]
        x = q_right.reshape(nc, Z, C * R, V)
        gam, st = _per_read(gamma_r, start_r, R)
        o_right = (x @ S_in.transpose(-1, -2)) * st.unsqueeze(-1) + ((x @ Vp.transpose(-1, -2)) * gam) @ k
        o_right = o_right.reshape(nc, Z, C, R, K)
    return o_left, o_right, S


def _per_read(gamma_r, start_r, R):
    """Repeat the per-token decays for R reads per token: rows [C] -> [C * R]."""
    if R == 1:
        return gamma_r, start_r
    nc, Z, C, L = gamma_r.shape
    gam = gamma_r.unsqueeze(-2).expand(nc, Z, C, R, L).reshape(nc, Z, C * R, L)
    st = start_r.unsqueeze(-1).expand(nc, Z, C, R).reshape(nc, Z, C * R)
    return gam, st
