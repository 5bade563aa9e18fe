"""The chunkwise (WY / UT) algorithm for delta-family recurrences, in batched PyTorch.

A chunk holds ``L = C * m`` Householder-like steps (``C`` tokens of ``m`` steps each; m is
DeltaProduct's NH, 1 otherwise). Step ``h`` maps the state ``S`` (``K x V``) to

    S <- d_h (I - b_h k_h k_hᵀ) S + k_h u_hᵀ

(``d_h`` a scalar decay given as its log ``g_h`` and, when a decay may be negative, its sign;
``u_h`` the write, ``b_h v_h`` for the canonical rules). More generally the erase may read the
state scaled by its own ``r_h`` instead of ``d_h`` (``g_read``, the log of ``|r_h|``):

    S <- d_h S - b_h k_h (r_h k_hᵀ S) + k_h u_hᵀ,

``r_h = d_h`` being the form above and ``r_h = 1`` an erase of the undecayed state beside the
decay, ``(d I - b k kᵀ) S`` (KLA as its author writes it). The erase's reads then use the
cumulative log-decay up to step h - 1 plus ``log r_h`` where they used the one up to step h:
``A_ij = b_i exp(γ_{i-1} + log r_i - γ_j) k_iᵀ k_j`` and ``W = T (diag(b) K ⊙ exp(γ_{i-1} +
log r_i))``: a decay of 0 zeroes the later decays but never divides. Token ``t`` is read after its last
step ``t*m + m - 1``. Inside a chunk, with ``Γ_ij`` the decay from after step j to after step
i (``i >= j``), the state after step i is

    S_i = Γ_i0 S_0 + sum_{j <= i} Γ_ij k_j v'_jᵀ,     V' = U - W S_0,
    (I + A) [W | U] = [diag(b) (K ⊙ exp(γ)) | Û],     A = strict_lower(diag(b) (K Kᵀ ⊙ Γ)),

with ``(I + A)^{-1}`` unit lower triangular. The state passing between chunks,
``V'_c = U_c - W_c S`` then ``S <- exp(γ_L) S + K_endᵀ V'_c``, is the only loop over chunks
(two batched matmuls per chunk); everything inside the chunks is batched over many chunks of
all sequences at once. The same algebra comes in two arrangements:

* with autograd (``chunk_delta`` when an input requires grad): every chunk of a group of
  bounded size at once, ``(I + A)^{-1}`` from one ``torch.linalg.solve_triangular`` against
  the identity, ``Γ`` from exact differences of float64 cumulative log-decays; the gradient
  is autograd through these ops, with two explicit backwards (``_UnitLowerSolve``,
  ``_PairDecays``) where autograd's own would be slow.
* forward only (no graph wanted): ``_forward_only``, arranged for the CPU's caches and for
  few Python-level ops: small groups of chunks read straight from the (strided) inputs into
  buffers made once per call, ``Γ_ij = a_i a'_j`` factored so that ``A`` and the reads come
  out of plain matmuls of rescaled rows (the exact differences for a chunk whose log-decays
  spread too widely), ``(I + A)^{-1}`` assembled from 16 x 16 diagonal blocks, the reads
  written straight into the outputs' layout.

Numerics: decays live in log space as chunk-local cumulative sums, taken in float64 whatever
the compute precision, so that their differences (the log of ``Γ_ij``) are exact to the compute
precision even after a gate of -1e4 earlier in the chunk; they are exponentiated only where
``i >= j`` (-inf elsewhere), so every exponent is <= 0 for decays <= 1 and nothing overflows.
The factored form is used only where both factors stay within ``exp(±SPREAD_LIMIT / 2)``.
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


def formed(x):
    """A tensor, or a Scaled formed into one."""
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
                out_left=None, out_right=None, g_read=None, neg_read=None):
    """Run the recurrence over chunks.

    k: [nc, Z, L, K] keys; b: [nc, Z, L] erase strengths; u: [nc, Z, L, V] writes;
    g: [nc, Z, L] log |decay| applied before each step; neg: None or [nc, Z, L], 1.0 where
    the decay is negative; S0: [Z, K, V] the state entering the first chunk.
    q_left: None or [nc, Z, C, R, K]: R read vectors per token, o = q @ S -> [.., V].
    q_right: None or [nc, Z, C, R, V]: o = S @ x -> [.., K].
    ``Z`` may be given as several dims (e.g. sequences and heads), the same in every tensor,
    and the tensors may be strided views: the forward-only path then copies one group of
    chunks at a time instead of the whole input.
    k, u, q_left and q_right may be ``Scaled`` (an unformed product).
    out_left, out_right: optional destinations ``[nc, *Z, C, R, ..]`` (any strides, e.g. views
    of the outputs' final layout) that the forward-only path writes and returns instead of
    allocating; the gradient path ignores them.
    g_read: None (the erase reads the decayed state, r = d) or [nc, Z, L] log |r_h|, the scale
    of the state step h's erase reads (see the module); neg_read: None or [nc, Z, L], 1.0 where
    r_h is negative.
    Returns (o_left [nc, Z, C, R, V] | None, o_right [nc, Z, C, R, K] | None, S_final [Z, K, V]).
    """
    tensors = (b, g, S0, neg, g_read, neg_read) + tuple(t for x in (k, u, q_left, q_right) if x is not None
                                       for t in (x if isinstance(x, Scaled) else (x,)))
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        with torch.no_grad():
            return _forward_only(k, b, u, g, S0, steps_per_token, q_left, q_right, neg,
                                 out_left, out_right, g_read, neg_read)
    nz = formed(k).dim() - 3
    k, b, u, g, q_left, q_right, neg, g_read, neg_read = (
        None if x is None else _flat_z(formed(x), nz)
        for x in (k, b, u, g, q_left, q_right, neg, g_read, neg_read))
    nc, Z, L, K = k.shape
    V = u.shape[-1]
    # chunks go through in groups whose L x L and L x (K + V) temporaries stay near 8 MB:
    # small enough to be reused by the allocator instead of being mapped afresh (and
    # page-faulted in) on every call, which cost more than the arithmetic at T = 16K
    group = max(1, GROUP_ELEMENTS // (Z * L * max(L, K + V)))
    if nc <= group:
        return _chunk_group(k, b, u, g, S0, steps_per_token, q_left, q_right, neg, g_read,
                            neg_read)
    # split, not slicing: one backward node per tensor instead of a full-size zero gradient
    # per group
    pieces = lambda x: (None,) * math.ceil(nc / group) if x is None else x.split(group)
    lefts, rights = [], []
    S = S0
    for k_, b_, u_, g_, ql_, qr_, neg_, gr_, nr_ in zip(
            *map(pieces, (k, b, u, g, q_left, q_right, neg, g_read, neg_read))):
        o_left, o_right, S = _chunk_group(k_, b_, u_, g_, S, steps_per_token, ql_, qr_, neg_,
                                          gr_, nr_)
        lefts.append(o_left)
        rights.append(o_right)
    cat = lambda parts: None if parts[0] is None else torch.cat(parts)
    return cat(lefts), cat(rights), S


def _flat_z(x, nz):
    """[nc, *Z, ...] with nz dims in Z -> [nc, prod(Z), ...] (a copy only when strided)."""
    return x.flatten(1, nz) if nz > 1 else x


def _erase_reads(cum, g_read, neg, neg_read):
    """(log scale, negative count) of the state each step's erase reads, [.., L] float64:
    ``γ_{i-1} + log |r_i|`` and the negative decays before step i plus r_i's own."""
    prev = torch.nn.functional.pad(cum[..., :-1], (1, 0))
    rc = prev + g_read.to(torch.float64).clamp(min=LOG_FLOOR)
    if neg is None and neg_read is None:
        return rc, None
    count = 0.0
    if neg is not None:
        n64 = neg.to(torch.float64)
        count = n64.cumsum(-1) - n64
    if neg_read is not None:
        count = count + neg_read.to(torch.float64)
    return rc, count


def _strict_lower(L, device):
    i = torch.arange(L, device=device)
    return i[:, None] > i[None, :]


def _chunk_group(k, b, u, g, S0, steps_per_token, q_left, q_right, neg, g_read=None,
                 neg_read=None):
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

    # the decays of the erases' reads: those of the state after the step (gamma, start), or,
    # with g_read, exp(γ_{i-1} + log r_i - γ_j) for i > j (autograd through float64 sums)
    gamma_e, start_e = gamma, start
    if g_read is not None:
        rc, rcount = _erase_reads(cum, g_read, neg, neg_read)
        seg = (rc.unsqueeze(-1) - cum.unsqueeze(-2)).to(g.dtype)
        gamma_e = torch.where(_strict_lower(L, k.device), seg, float("-inf")).exp()
        start_e = rc.exp().to(g.dtype)
        if rcount is not None:
            ccount = 0.0 if neg is None else neg.to(torch.float64).cumsum(-1)
            gamma_e = gamma_e * _parity_sign(rcount.unsqueeze(-1) - ccount.unsqueeze(-2)
                                             if neg is not None else rcount.unsqueeze(-1)
                                             ).to(g.dtype)
            start_e = start_e * _parity_sign(rcount).to(g.dtype)

    # the WY / UT factors: (I + A) [W | U] = [diag(b) (K ⊙ start) | U_hat]. The solve reads
    # only A's strict lower triangle and its gradient is zero elsewhere, so A needs no mask
    # beyond gamma's
    A = ((k * b.unsqueeze(-1)) @ k.transpose(-1, -2)) * gamma_e
    rhs = torch.cat([k * (b * start_e).unsqueeze(-1), u], dim=-1)
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

# elements of a group's L x (L + K + V) temporaries in the forward-only path, by device type:
# on the CPU about 1 MB, so that they stay in the cache between the batched steps and the
# state loop (larger and smaller groups were both slower, benchmarks/bench_delta.py); other
# devices take large groups (fewer, larger kernels)
FORWARD_GROUP_ELEMENTS = {"cpu": 1 << 18}
FORWARD_GROUP_ELEMENTS_OTHER = 1 << 24
# largest spread of a chunk's cumulative log-decays for which Γ_ij = exp(c_i - r) exp(r - c_j)
# (r the middle of the spread) keeps both factors well inside the floating-point range
SPREAD_LIMIT = {torch.float32: 120.0, torch.float64: 1200.0}
SOLVE_BLOCK = 16  # rows per diagonal block of the forward-only path's (I + A)^-1


def _unit_lower_inverse(A):
    """``(I + strict_lower(A))^{-1}``; A's diagonal and upper triangle are not read."""
    L = A.shape[-1]
    eye = torch.eye(L, dtype=A.dtype, device=A.device).expand(A.shape)
    return torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)


class _Group:
    """The buffers of ``n`` chunks of the forward-only path and the views its steps use, made
    once per call (twice when the last group is shorter): Python-level views cost about as
    much as the small matmuls they feed, so they are not remade for every group.

    Every buffer is ``[n, Z, ...]``; ``*_in`` views see it with Z as the inputs give it."""

    def __init__(self, n, zs, L, C, K, V, Rl, Rr, like):
        Z = math.prod(zs)
        new = lambda *shape: like.new_empty(n, Z, *shape)
        in_z = lambda t: t.view(n, *zs, *t.shape[2:])
        self.n = n
        self.ka = new(L, K)  # b a k (factored) or b k: A's rows
        self.kk = new(L, K)  # a' k (factored) or k, then the keys to the chunk's end
        self.A = new(L, L)
        self.R = new(L, K + V)  # [b start k | u]
        self.X = new(L, K + V)  # [W | U] = (I + A)^{-1} R
        self.Vp = new(L, V)  # V' = U - W S_in
        self.S = like.new_empty(n + 1, Z, K, V)  # the state entering each chunk, then after
        self.ka_in, self.kk_in = in_z(self.ka), in_z(self.kk)
        self.Rk_in, self.Ru_in = in_z(self.R[..., :K]), in_z(self.R[..., K:])
        self.kk_t = self.kk.transpose(-1, -2)
        # the state loop's operands, chunk by chunk
        self.W, self.U = self.X[..., :K].unbind(0), self.X[..., K:].unbind(0)
        self.Ss, self.Vs, self.K_end = self.S.unbind(0), self.Vp.unbind(0), self.kk_t.unbind(0)
        self.S_in = self.S[:n]
        self._solve_views(L)
        # the reads, o = q @ S [.., V] (left) and o = S @ x [.., K] (right)
        for side, R, width, out_width in (("left", Rl, K, V), ("right", Rr, V, K)):
            if not R:
                continue
            rows = new(C * R, width)  # q a or q (x a or x): P's rows
            scaled = new(C * R, width)  # q start (x start)
            out = new(C * R, out_width)
            setattr(self, f"{side}_a", rows)
            setattr(self, f"{side}_s", scaled)
            setattr(self, f"{side}_P", new(C * R, L))
            setattr(self, f"{side}_o", out)
            for name, t in (("a", rows), ("s", scaled), ("o", out)):
                setattr(self, f"{side}_{name}_in", t.view(n, *zs, C, R, t.shape[-1]))

    def _solve_views(self, L):
        s = SOLVE_BLOCK
        self.blocked = L > s and L % s == 0
        if not self.blocked:
            return
        nb = L // s
        diagonal = lambda X: X.view(*X.shape[:-2], nb, s, nb, s).diagonal(
            dim1=-4, dim2=-2).movedim(-1, -3)  # [n, Z, nb, s, s], a view
        self.T = self.A.new_zeros(self.A.shape)  # zero above its diagonal blocks, for good
        self.A_diag, self.T_diag = diagonal(self.A), diagonal(self.T)
        self.eye = torch.eye(s, dtype=self.A.dtype, device=self.A.device).expand(self.A_diag.shape)
        self.below = [(i, self.A[..., i * s:(i + 1) * s, :i * s], self.T[..., :i * s, :i * s],
                       self.T[..., i * s:(i + 1) * s, :i * s]) for i in range(1, nb)]

    def solve(self):
        """``X = (I + strict_lower(A))^{-1} R``.

        The inverse is assembled from blocks of SOLVE_BLOCK rows: the diagonal blocks come
        from small triangular solves (which cost far less per matrix than one of size L), the
        blocks below them from ``T_i,<i = -T_ii A_i,<i T_<i,<i``; then one matmul applies it."""
        if not self.blocked:
            torch.matmul(_unit_lower_inverse(self.A), self.R, out=self.X)
            return
        D = torch.linalg.solve_triangular(self.A_diag, self.eye, upper=False, unitriangular=True)
        self.T_diag.copy_(D)
        for i, A_i, T_before, T_i in self.below:
            torch.neg(D[..., i, :, :] @ (A_i @ T_before), out=T_i)
        torch.matmul(self.T, self.R, out=self.X)


def _forward_only(k, b, u, g, S0, m, q_left, q_right, neg, out_left=None, out_right=None,
                  g_read=None, neg_read=None):
    """chunk_delta without a graph: the same algebra as ``_chunk_group``, arranged for speed.

    Chunks go through in small groups whose temporaries stay in the cache, read straight from
    the (possibly strided) inputs. The decays are factored, ``Γ_ij = a_i a'_j`` with
    ``a_i = exp(c_i - r)``, ``a'_j = exp(r - c_j)`` (``c`` the chunk's cumulative log-decays,
    ``r`` their middle), so that ``A`` and the reads' ``P`` are plain matmuls of rescaled rows,
    with no L x L exponential; a group with a chunk whose log-decays spread too widely for that
    (a decay near 0 inside it) takes the exact differences of float64 cumulative sums instead,
    as ``_chunk_group`` does. ``[W | U]`` comes from a blocked inverse; the reads of the
    entering states are batched over the group after its state loop. With ``g_read`` the
    erases' rows of ``A`` and ``W`` take the decays of their own reads (``_erase_reads``),
    factored alike (their log scales count in the spread)."""
    k_scale = None  # the keys' own scales when they come unformed: folded into the row scales
    if isinstance(k, Scaled):
        k_scale, k = k.scale, k.vector
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
    rc = rcount = None
    if g_read is not None:
        rc, rcount = _erase_reads(cum, _flat_z(g_read, nz), neg,
                                  None if neg_read is None else _flat_z(neg_read, nz))
        hi = torch.maximum(hi, rc.amax(-1, keepdim=True))
        lo = torch.minimum(lo, rc.amin(-1, keepdim=True))
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
    total = start[..., L - 1, None, None]  # [nc, Z, 1, 1]
    start_e, a_e = start, a  # the decays of the erases' reads
    if rc is not None:
        sign_e = None if rcount is None else _parity_sign(rcount)
        start_e, a_e = signed(rc.exp(), sign_e), signed((rc - mid).exp(), sign_e)

    # per-row scales, shaped to multiply the inputs as given: [nc, *zs, L, 1] and, for the
    # reads' rows (each token's last step), [nc, *zs, C, R, 1] -- times the read vectors' own
    # scales when they come unformed
    rows_of = lambda x: x.reshape(nc, *zs, L, 1)
    reads_of = lambda x: x[..., ends].reshape(nc, *zs, C, 1, 1)
    ks = 1.0 if k_scale is None else _flat_z(k_scale, nz).to(dt)  # [nc, Z, L]
    scales = dict(b=rows_of(b * ks), ba=rows_of(b * a_e * ks), bs=rows_of(b * start_e * ks),
                  a_inv=rows_of(a_inv * ks), end=end.unsqueeze(-1), total=total)
    if k_scale is not None:
        scales["k"] = rows_of(ks)
    if to_end is not None:
        scales["to_end"] = to_end.unsqueeze(-1)
    inputs = dict(k=k)
    if isinstance(u, Scaled):
        inputs["u"], scales["u"] = u.vector, u.scale.unsqueeze(-1)
    else:
        inputs["u"] = u
    a_r, start_r = reads_of(a), reads_of(start)
    R_of = {}
    for side, x in (("left", q_left), ("right", q_right)):
        if x is None:
            continue
        if isinstance(x, Scaled):
            own = x.scale.unsqueeze(-1)  # [nc, *zs, C, R, 1]
            x = x.vector
            scales[f"{side}_plain"] = own
            scales[f"{side}_a"], scales[f"{side}_s"] = a_r * own, start_r * own
        else:
            scales[f"{side}_a"], scales[f"{side}_s"] = a_r, start_r
        inputs[side] = x
        R_of[side] = x.shape[-2]
    Rl, Rr = R_of.get("left", 0), R_of.get("right", 0)
    # the reads go to the given destinations, else to new [nc, Z, C, R, ..] tensors
    o_left = out_left if out_left is not None or not Rl else k.new_empty(nc, Z, C, Rl, V)
    o_right = out_right if out_right is not None or not Rr else k.new_empty(nc, Z, C, Rr, K)
    if Rl:
        inputs["out_left"] = o_left if out_left is not None else o_left.view(nc, *zs, C, Rl, V)
    if Rr:
        inputs["out_right"] = o_right if out_right is not None else o_right.view(nc, *zs, C, Rr, K)

    budget = FORWARD_GROUP_ELEMENTS.get(dev.type, FORWARD_GROUP_ELEMENTS_OTHER)
    G = max(1, min(nc, budget // (Z * L * (L + K + V))))
    # every per-chunk tensor cut into its groups at once
    inputs = {name: x.split(G) for name, x in inputs.items()}
    scales = {name: x.split(G) for name, x in scales.items()}
    groups = {}  # chunks per group -> _Group
    S = S0.to(dt)
    for gi, c0 in enumerate(range(0, nc, G)):
        n = min(G, nc - c0)
        grp = groups.get(n) or groups.setdefault(n, _Group(n, zs, L, C, K, V, Rl, Rr, k))
        x = {name: parts[gi] for name, parts in inputs.items()}
        f = {name: parts[gi] for name, parts in scales.items()}
        grp.Ss[0].copy_(S)
        _group_step(grp, x, f, factored[c0:c0 + n], L, C, m, Rl, Rr,
                    lambda: _group_pairs(cum[c0:c0 + n], None if neg is None else neg[c0:c0 + n],
                                         lower, dt, None if rc is None else rc[c0:c0 + n],
                                         None if rcount is None else rcount[c0:c0 + n]))
        S = grp.Ss[n]
    return o_left, o_right, S.clone()


def _group_step(grp, x, f, factored, L, C, m, Rl, Rr, pair_decays):
    """One group of chunks: A and the reads' P, [W | U], the state loop, the reads.

    x: the group's inputs (k, u, left, right, out_left, out_right: [n, *zs, ...] views);
    f: the group's per-row scales; pair_decays(): Γ [n, Z, L, L] for the exact path, and the
    decays of the erases' reads (Γ itself unless they differ)."""
    ends = slice(m - 1, L, m)
    k = x["k"]
    plain = not all(factored)
    pair, pair_e = pair_decays() if plain else (None, None)
    if plain:
        torch.mul(k, f["b"], out=grp.ka_in)
        _scaled_copy(grp.kk_in, k, f.get("k"))
    else:
        torch.mul(k, f["ba"], out=grp.ka_in)
        torch.mul(k, f["a_inv"], out=grp.kk_in)
    torch.matmul(grp.ka, grp.kk_t, out=grp.A)  # its upper part is not read
    if plain:
        grp.A.mul_(pair_e)
    if Rl:  # P = (q a)(a' k)ᵀ, or (q kᵀ) ⊙ Γ
        _read_rows(grp.left_a_in, x["left"], f, "left", plain)
        P = grp.left_P
        torch.matmul(grp.left_a, grp.kk_t, out=P)
        if plain:
            P.view(*P.shape[:2], C, Rl, L).mul_(pair[..., ends, :].unsqueeze(-2))
        else:
            _tril_reads(P, C, Rl, m)
    if plain:
        grp.kk.mul_(f["to_end"])
    else:
        grp.kk.mul_(f["end"])  # end a' k: the keys to the chunk's end
    torch.mul(k, f["bs"], out=grp.Rk_in)
    _scaled_copy(grp.Ru_in, x["u"], f.get("u"))
    grp.solve()

    # the state passing: V'_c = U_c - W_c S, S <- exp(γ_L) S + K_endᵀ V'_c
    W, U, Ss, Vs, K_end, total = grp.W, grp.U, grp.Ss, grp.Vs, grp.K_end, f["total"]
    for c in range(grp.n):
        torch.baddbmm(U[c], W[c], Ss[c], alpha=-1, out=Vs[c])
        torch.mul(Ss[c], total[c], out=Ss[c + 1]).baddbmm_(K_end[c], Vs[c])

    # reads after each token's last step: o = q start S_in + P V'
    flat = lambda t: t.flatten(0, 1)
    if Rl:
        torch.mul(x["left"], f["left_s"], out=grp.left_s_in)
        torch.baddbmm(flat(grp.left_s) @ flat(grp.S_in), flat(grp.left_P), flat(grp.Vp),
                      out=flat(grp.left_o))
        x["out_left"].copy_(grp.left_o_in)
    if Rr:  # o = S x: start (S_in x) + sum_j Γ_ij (x · v'_j) k_j
        _read_rows(grp.right_a_in, x["right"], f, "right", plain)
        P = grp.right_P
        torch.matmul(grp.right_a, grp.Vp.transpose(-1, -2), out=P)
        # the keys of P's columns go where A's rows were: k (exact) or a' k (factored)
        if plain:
            P.view(*P.shape[:2], C, Rr, L).mul_(pair[..., ends, :].unsqueeze(-2))
            _scaled_copy(grp.ka_in, k, f.get("k"))
        else:
            _tril_reads(P, C, Rr, m)
            torch.mul(k, f["a_inv"], out=grp.ka_in)
        torch.mul(x["right"], f["right_s"], out=grp.right_s_in)
        torch.baddbmm(flat(grp.right_s) @ flat(grp.S_in).transpose(-1, -2), flat(P), flat(grp.ka),
                      out=flat(grp.right_o))
        x["out_right"].copy_(grp.right_o_in)


def _scaled_copy(out, x, scale):
    """out = x (times scale, per row, if any)."""
    if scale is None:
        out.copy_(x)
    else:
        torch.mul(x, scale, out=out)


def _read_rows(out, x, f, side, plain):
    """The read vectors' rows of P: x a (factored), else x, times their own scales if any."""
    if plain:
        _scaled_copy(out, x, f.get(f"{side}_plain"))
    else:
        torch.mul(x, f[f"{side}_a"], out=out)


def _tril_reads(P, C, R, m):
    """Zero ``P [.., C * R, C * m]`` where step j comes after token t's read (j > t m + m - 1),
    in place: a triangle over (token, token of step j), whatever the non-finite values there."""
    if R == 1 and m == 1:
        P.tril_()
        return
    shape = P.shape[:-2]
    d = len(shape)
    P.view(*shape, C, R, C, m).permute(*range(d), d + 1, d + 3, d, d + 2).tril_()


def _group_pairs(cum, neg, lower, dtype, rc=None, rcount=None):
    """(Γ, the erases' read decays) of a group for the exact path (see _pair_decays)."""
    pair = _pair_decays(cum, neg, lower, dtype)
    if rc is None:
        return pair, pair
    L = cum.shape[-1]
    seg = (rc.unsqueeze(-1) - cum.unsqueeze(-2)).to(dtype)
    pair_e = seg.masked_fill_(~_strict_lower(L, cum.device), float("-inf")).exp_()
    if rcount is not None:
        ccount = 0.0 if neg is None else neg.to(torch.float64).cumsum(-1).unsqueeze(-2)
        pair_e *= _parity_sign(rcount.unsqueeze(-1) - ccount).to(dtype)
    return pair, pair_e


def _pair_decays(cum, neg, lower, dtype):
    """Γ [.., L, L] from float64 cumulative log-decays (exact differences), signs applied."""
    seg = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).to(dtype)
    gamma = seg.masked_fill_(~lower, float("-inf")).exp_()
    if neg is not None:
        count = neg.cumsum(-1)
        gamma *= _parity_sign(count.unsqueeze(-1) - count.unsqueeze(-2))
    return gamma
