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
from typing import NamedTuple

import torch


LOG_FLOOR = -1000.0
GROUP_ELEMENTS = 1 << 21  # elements of the largest per-group temporary (see chunk_delta)


class Scaled(NamedTuple):
    """``scale[..., None] * vector``, left unformed: chunk_delta's forward-only path forms it
    one group of chunks at a time (or folds the scale into its own), instead of a full-size
    temporary. ``scale`` is the vector's shape without its last dim."""
    scale: torch.Tensor
    vector: torch.Tensor

    def form(self):
        return self.scale.unsqueeze(-1) * self.vector

    def map(self, fn):
        return Scaled(fn(self.scale), fn(self.vector))


def _formed(x):
    return x.form() if isinstance(x, Scaled) else x


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


def chunk_delta(k, b, u, g, S0, steps_per_token=1, q_left=None, q_right=None, neg=None,
                out_left=None, out_right=None):
    """Run the recurrence over chunks.

    k: [nc, Z, L, K] keys; b: [nc, Z, L] erase strengths; u: [nc, Z, L, V] writes;
    g: [nc, Z, L] log |decay| applied before each step; neg: None or [nc, Z, L], 1.0 where
    the decay is negative; S0: [Z, K, V] the state entering the first chunk.
    q_left: None or [nc, Z, C, R, K]: R read vectors per token, o = q @ S -> [.., V].
    q_right: None or [nc, Z, C, R, V]: o = S @ x -> [.., K].
    ``Z`` may be given as several dims (e.g. sequences and heads), the same in every tensor,
    and the tensors may be strided views: the forward-only path then copies one group of
    chunks at a time instead of the whole input.
    u, q_left and q_right may be ``Scaled`` (an unformed product).
    out_left, out_right: optional destinations ``[nc, *Z, C, R, ..]`` (any strides, e.g. views
    of the outputs' final layout) that the forward-only path writes and returns instead of
    allocating; the gradient path ignores them.
    Returns (o_left [nc, Z, C, R, V] | None, o_right [nc, Z, C, R, K] | None, S_final [Z, K, V]).
    """
    tensors = (k, b, g, S0, neg) + tuple(t for x in (u, q_left, q_right) if x is not None
                                          for t in (x if isinstance(x, Scaled) else (x,)))
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        with torch.no_grad():
            return _forward_only(k, b, u, g, S0, steps_per_token, q_left, q_right, neg,
                                 out_left, out_right)
    k, b, u, g, q_left, q_right, neg = (None if x is None else _flat_z(_formed(x), k.dim() - 3)
                                        for x in (k, b, u, g, q_left, q_right, neg))
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


def _flat_z(x, nz):
    """[nc, *Z, ...] with nz dims in Z -> [nc, prod(Z), ...] (a copy only when strided)."""
    return x.flatten(1, nz) if nz > 1 else x


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


# ============================================================ forward only (no gradient)

# chunks per group in the forward-only path: its L x L and L x (K + V) temporaries stay near
# 1 MB, so that they live in the cache between the batched steps and the state loop
FORWARD_GROUP_ELEMENTS = 1 << 18
# largest spread of a chunk's cumulative log-decays for which Γ_ij = exp(c_i - r) exp(r - c_j)
# (r the middle of the spread) keeps both factors well inside the floating-point range
SPREAD_LIMIT = {torch.float32: 120.0, torch.float64: 1200.0}
SOLVE_BLOCK = 16  # rows per block of the forward-only path's triangular solve


def _unit_lower_inverse(A):
    """``(I + strict_lower(A))^{-1}``; A's diagonal and upper triangle are not read."""
    L = A.shape[-1]
    eye = torch.eye(L, dtype=A.dtype, device=A.device).expand(A.shape)
    return torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)


def _unit_lower_solve(A, R, out, T):
    """``out = (I + strict_lower(A))^{-1} R`` for ``A [.., L, L]``, ``R, out [.., L, n]``;
    ``T [.., L, L]`` is a buffer for the inverse, zero above its diagonal blocks.

    The inverse is assembled from blocks of SOLVE_BLOCK rows: the diagonal blocks come from
    small triangular solves (which cost far less per matrix than one of size L), the blocks
    below them from ``T_i,<i = -T_ii A_i,<i T_<i,<i`` (two small matmuls per block row); then
    one matmul applies it."""
    s = SOLVE_BLOCK
    L = A.shape[-1]
    if L % s or L <= s:
        torch.matmul(_unit_lower_inverse(A), R, out=out)
        return out
    nb = L // s
    diagonal = lambda X: X.unflatten(-1, (nb, s)).unflatten(-3, (nb, s)).diagonal(
        dim1=-4, dim2=-2).movedim(-1, -3)  # [.., nb, s, s], a view
    D = _unit_lower_inverse(diagonal(A))
    diagonal(T).copy_(D)
    for i in range(1, nb):
        rows, before = slice(i * s, (i + 1) * s), slice(0, i * s)
        T[..., rows, before] = -(D[..., i, :, :] @ (A[..., rows, before] @ T[..., before, before]))
    torch.matmul(T, R, out=out)
    return out


def _forward_only(k, b, u, g, S0, m, q_left, q_right, neg, out_left=None, out_right=None):
    """chunk_delta without a graph: the same algebra as ``_chunk_group``, arranged for speed.

    Chunks go through in small groups whose temporaries stay in the cache, read straight from
    the (possibly strided) inputs. The decays are factored, ``Γ_ij = a_i a'_j`` with
    ``a_i = exp(c_i - r)``, ``a'_j = exp(r - c_j)`` (``c`` the chunk's cumulative log-decays,
    ``r`` their middle), so that ``A`` and the reads' ``P`` are plain matmuls of rescaled rows,
    with no L x L exponential; a group with a chunk whose log-decays spread too widely for that
    (a decay near 0 inside it) takes the exact differences of float64 cumulative sums instead,
    as ``_chunk_group`` does. ``[W | U]`` comes from a blocked triangular solve; the reads of
    the entering states are batched over the group after its state loop."""
    nz = k.dim() - 3
    zs = tuple(k.shape[1:1 + nz])  # Z as the inputs give it (e.g. sequences, heads)
    nc, L, K = k.shape[0], k.shape[-2], k.shape[-1]
    Z, V = S0.shape[0], S0.shape[-1]
    C = L // m
    dt, dev = k.dtype, k.device
    ends = slice(m - 1, L, m)
    lower = _lower(L, dev)
    g, b = _flat_z(g, nz), _flat_z(b, nz).to(dt)
    neg = None if neg is None else _flat_z(neg, nz)

    # decays of all chunks at once ([nc, Z, L]: small)
    cum = g.to(torch.float64).clamp(min=LOG_FLOOR).cumsum(-1)
    hi, lo = cum.amax(-1, keepdim=True), cum.amin(-1, keepdim=True)
    factored = ((hi - lo) <= SPREAD_LIMIT.get(dt, 120.0)).flatten(1).all(1).tolist()
    mid = (hi + lo) / 2
    sign = None if neg is None else _parity_sign(neg.to(torch.float64).cumsum(-1))
    signed = lambda x, s: (x if sign is None else x * s).to(dt)
    start = signed(cum.exp(), sign)  # from the chunk's start to after step i
    a = signed((cum - mid).exp(), sign)  # Γ_ij = a_i a'_j for i >= j
    a_inv = signed((mid - cum).exp(), sign)
    end = signed((cum[..., L - 1:] - mid).exp(), None if sign is None else sign[..., L - 1:])
    to_end = None  # from after step j to the chunk's end: end a'_j (factored)
    if not all(factored):
        to_end = signed((cum[..., L - 1:] - cum).exp(),
                        None if sign is None else sign[..., L - 1:] * sign)
    totals = start[..., L - 1, None, None].unbind(0)  # [Z, 1, 1] per chunk
    # per-row scales, shaped to multiply the inputs as given: [nc, *zs, L or C, 1 (, 1)]
    rows_of = lambda x: x.reshape(nc, *zs, x.shape[-1], 1)
    reads_of = lambda x: x[..., ends].reshape(nc, *zs, C, 1, 1)
    b_rows, ba_rows, bs_rows, a_inv_rows = map(rows_of, (b, b * a, b * start, a_inv))
    a_reads, start_reads = reads_of(a), reads_of(start)
    # the read vectors' rows are multiplied by these (times the vectors' own scales if unformed)
    read_scales = lambda x: (None, a_reads, start_reads) if not isinstance(x, Scaled) else (
        x.scale.unsqueeze(-1), a_reads * x.scale.unsqueeze(-1), start_reads * x.scale.unsqueeze(-1))
    if isinstance(q_left, Scaled):
        (ql_plain, ql_a, ql_start), q_left = read_scales(q_left), q_left.vector
    else:
        ql_plain, ql_a, ql_start = read_scales(q_left)
    if isinstance(q_right, Scaled):
        (qr_plain, qr_a, qr_start), q_right = read_scales(q_right), q_right.vector
    else:
        qr_plain, qr_a, qr_start = read_scales(q_right)
    u_scale, u = (u.scale.unsqueeze(-1), u.vector) if isinstance(u, Scaled) else (None, u)
    end_rows = end.unsqueeze(-1)  # [nc, Z, 1, 1]

    Rl = q_left.shape[-2] if q_left is not None else 0
    Rr = q_right.shape[-2] if q_right is not None else 0
    # the reads go to the given destinations, else to new [nc, Z, C, R, ..] tensors
    o_left = out_left if out_left is not None or not Rl else k.new_empty(nc, Z, C, Rl, V)
    o_right = out_right if out_right is not None or not Rr else k.new_empty(nc, Z, C, Rr, K)
    out_left = o_left if out_left is not None or not Rl else o_left.view(nc, *zs, C, Rl, V)
    out_right = o_right if out_right is not None or not Rr else o_right.view(nc, *zs, C, Rr, K)
    G = max(1, min(nc, FORWARD_GROUP_ELEMENTS // (Z * L * (L + K + V))))
    new = lambda *shape: k.new_empty(G, Z, *shape)
    full = dict(
        ka=new(L, K),  # b a k (factored) or b k: A's rows
        kk=new(L, K),  # a' k or k, then the keys to the chunk's end
        A=new(L, L),
        T=k.new_zeros(G, Z, L, L),  # (I + A)^{-1}: zero above the diagonal blocks
        R=new(L, K + V),  # [b start k | u]
        X=new(L, K + V),  # [W | U] = (I + A)^{-1} R
        Vp=new(L, V),  # V' = U - W S_in
        qa=new(C * Rl, K),  # q a or q: P's rows
        qs=new(C * Rl, K),  # q start
        P=new(C * Rl, L),
        o_left=new(C * Rl, V),
        o_right=new(C * Rr, K),
        S=k.new_empty(G + 1, Z, K, V),  # the state entering each chunk of the group, then after
    )
    full["S"][0] = S0
    as_in = lambda t: t.view(t.shape[0], *zs, *t.shape[2:])  # a buffer seen with the inputs' Z
    for c0 in range(0, nc, G):
        c1 = min(nc, c0 + G)
        n = c1 - c0
        buf = full if n == G else {name: t[:n + (name == "S")] for name, t in full.items()}
        ka, kk, A, T, R, X, Vp, qa, qs, P = (
            buf[x] for x in ("ka", "kk", "A", "T", "R", "X", "Vp", "qa", "qs", "P"))
        kg = k[c0:c1]
        q = q_left[c0:c1].flatten(-3, -2) if Rl else None  # [n, *zs, C * Rl, K]
        plain = not all(factored[c0:c1])
        if plain:
            torch.mul(kg, b_rows[c0:c1], out=as_in(ka))
            as_in(kk).copy_(kg)
        else:
            torch.mul(kg, ba_rows[c0:c1], out=as_in(ka))
            torch.mul(kg, a_inv_rows[c0:c1], out=as_in(kk))
        torch.matmul(ka, kk.transpose(-1, -2), out=A)  # its upper part is not read
        if Rl:
            q_rows = as_in(qa).unflatten(-2, (C, Rl))
            if not plain:
                torch.mul(q.unflatten(-2, (C, Rl)), ql_a[c0:c1], out=q_rows)
            elif ql_plain is not None:
                torch.mul(q.unflatten(-2, (C, Rl)), ql_plain[c0:c1], out=q_rows)
            else:
                as_in(qa).copy_(q)
            torch.matmul(qa, kk.transpose(-1, -2), out=P)
        if plain:
            pair = _pair_decays(cum[c0:c1], None if neg is None else neg[c0:c1], lower, dt)
            A *= pair
            if Rl:
                P.unflatten(-2, (C, Rl)).mul_(pair[..., ends, :].unsqueeze(-2))
            kk.mul_(to_end[c0:c1].unsqueeze(-1))
        else:
            pair = None
            if Rl:
                _tril_reads(P, C, Rl, m)
            kk.mul_(end_rows[c0:c1])  # end a' k: the keys to the chunk's end
        torch.mul(kg, bs_rows[c0:c1], out=as_in(R[..., :K]))
        if u_scale is None:
            as_in(R[..., K:]).copy_(u[c0:c1])
        else:
            torch.mul(u[c0:c1], u_scale[c0:c1], out=as_in(R[..., K:]))
        _unit_lower_solve(A, R, X, T)

        # the state passing: V'_c = U_c - W_c S, S <- exp(γ_L) S + K_endᵀ V'_c
        Ws, Us = X[..., :K].unbind(0), X[..., K:].unbind(0)
        Ss, Vs, Ks = buf["S"].unbind(0), Vp.unbind(0), kk.transpose(-1, -2).unbind(0)
        for c in range(n):
            torch.baddbmm(Us[c], Ws[c], Ss[c], alpha=-1, out=Vs[c])
            torch.mul(Ss[c], totals[c0 + c], out=Ss[c + 1]).baddbmm_(Ks[c], Vs[c])
        S_in = buf["S"][:n]

        # reads after each token's last step: o = q start S_in + P V'
        flat = lambda t: t.flatten(0, 1)
        if Rl:
            torch.mul(q.unflatten(-2, (C, Rl)), ql_start[c0:c1],
                      out=as_in(qs).unflatten(-2, (C, Rl)))
            o = buf["o_left"]
            torch.baddbmm(flat(qs) @ flat(S_in), flat(P), flat(Vp), out=flat(o))
            out_left[c0:c1].copy_(as_in(o).unflatten(-2, (C, Rl)))
        if Rr:  # o = S x: start (S_in x) + sum_j Γ_ij (x · v'_j) k_j
            xr = _flat_z(q_right[c0:c1], nz)  # [n, Z, C, Rr, V]
            st_r, a_r = (_flat_z(x[c0:c1], nz) for x in (qr_start, qr_a))
            xs = (xr * st_r).flatten(2, 3)
            kz = _flat_z(kg, nz)
            if pair is None:
                Pr = (xr * a_r).flatten(2, 3) @ Vp.transpose(-1, -2)
                _tril_reads(Pr, C, Rr, m)
                kr = kz * _flat_z(a_inv_rows[c0:c1], nz)
            else:
                if qr_plain is not None:
                    xr = xr * _flat_z(qr_plain[c0:c1], nz)
                Pr = xr.flatten(2, 3) @ Vp.transpose(-1, -2)
                Pr.unflatten(-2, (C, Rr)).mul_(pair[..., ends, :].unsqueeze(-2))
                kr = kz
            o = buf["o_right"]
            torch.baddbmm(flat(xs) @ flat(S_in).transpose(-1, -2), flat(Pr), flat(kr),
                          out=flat(o))
            out_right[c0:c1].copy_(as_in(o).unflatten(-2, (C, Rr)))
        full["S"][0] = buf["S"][n]
    return o_left, o_right, full["S"][0].clone()


def _tril_reads(P, C, R, m):
    """Zero ``P [.., C * R, C * m]`` where step j comes after token t's read (j > t m + m - 1),
    in place: a triangle over (token, token of step j), whatever the non-finite values there."""
    if R == 1 and m == 1:
        P.tril_()
        return
    shape = P.shape[:-2]
    d = len(shape)
    P.view(*shape, C, R, C, m).permute(*range(d), d + 1, d + 3, d, d + 2).tril_()


def _pair_decays(cum, neg, lower, dtype):
    """Γ [.., L, L] from float64 cumulative log-decays (exact differences), signs applied."""
    seg = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).to(dtype)
    gamma = seg.masked_fill_(~lower, float("-inf")).exp_()
    if neg is not None:
        count = neg.cumsum(-1)
        gamma *= _parity_sign(count.unsqueeze(-1) - count.unsqueeze(-2))
    return gamma
