"""The chunkwise Triton kernels of the diagonal family: one *pass* reads one state.

A pass is the linear recurrence of one state with one write per token, read along one axis
after each token's update. In the kernel's orientation the state is ``S[X, Y]``: ``X`` the
axis the read contracts, ``Y`` the axis it returns::

    S_t = diag(exp(gx_t)) S_{t-1} diag(exp(gy_t)) + kx_t vy_tᵀ        o_t = S_tᵀ u_t (+ extra_t)

``gx`` is a per-token log-decay on X, either one value per token (a scalar decay: the whole
state decays) or one per channel; ``gy`` one per channel of Y. ``diag(x) @ S`` read by
``q @ S`` (GLA) has its decay on X; ``S @ diag(x)`` read by ``q @ S`` and Raven's
``Sk @ q`` (its slot axis is Y there) have it on Y. A read ``S @ u`` of a rule's ``S[R, C]``
is the same pass on ``Sᵀ`` (``TRANSPOSED``): the kernels load and store the rule's layout.
Everything else -- gates from params, routing, coefficients, chains of reads (Raven's
softmax between its two passes), several writes or terms (summed passes) -- lives outside,
in the per-token prologue and the runtime (``recdsl.runtime.chunk_diagonal``).

Kernels (``B*T`` tokens laid out ``[B, T, H, D]``, fp32 accumulation):

``chunk_decays``    the sums of a log-decay over the spans the other kernels need (below).
``chunk_fwd``       one program per (sequence, head, X tile, Y tile) walks the chunks with its
                    ``[BX, BV]`` tile of the state on chip, stores the state entering every
                    chunk and the one leaving the last (for the backward), the outputs and the
                    final state.
``chunk_bwd_dh``    the same programs walk the chunks backwards with the state gradient's tile
                    on chip: the gradient leaving every chunk, and the initial state's.
``chunk_bwd_x``     one program per (chunk, X tile, Y tile, head), all chunks at once, from
                    the stored states and state gradients: the gradient of u (SIDE 0) or kx
                    (SIDE 1) and that side's part of the X log-decays' gradient.
``chunk_bwd_y``     likewise: the gradient of vy and the keys' part of the Y log-decays'
                    gradient (SIDE 0), or the queries' part, recomputing the read (SIDE 1).

Tiling both axes keeps the per-program registers small (on a GPU 32 x 32; see ``PassShape``).
Everything a tile computes is linear in its slice of the contraction, so the values that
contract over a tiled axis come out as partial sums, one per tile, added by the caller: the
outputs and ``dvy`` over the X tiles, ``du`` and ``dkx`` over the Y tiles. The products
``A = U Kᵀ`` are recomputed per Y tile (as partial sums over X).

Decay gradients, per chunk (the decays are chunk-local, so a token's decay reaches other
chunks only through the state leaving its own). The gradient of the log-decay of token
``tau`` (X side; Y is the same with ``o ⊙ do`` and ``vy ⊙ dvy``) is the sum of the terms whose
decay span contains ``tau``, added directly, never as a difference: ``u_t ⊙ du_t`` through the
entering state for ``t >= tau`` (reverse sums); ``e^{E_end} (S_0 ⊙ dS_end)`` summed over Y, and
``kx_s ⊙ dkx_s`` through the leaving gradient for ``s < tau`` (forward sums); and every pair
of a query ``t >= tau`` and a key ``s < tau`` inside the chunk, ``u_t ⊙ kx_s ⊙ decay ⊙ dA_ts``
(within a sub-chunk, between it and earlier or later ones, and between an earlier and a
later one). The shorter identity ``dG = u ⊙ du - kx ⊙ dkx`` summed backwards cancels large
terms: it left rounding residues where the gradient is exactly zero and a 60x larger error
on a per-head decay's gradient.

Stability and precision. Decays enter as sums of per-token log-decays over spans of tokens,
each formed from its own terms (``chunk_decays``: E from the chunk's start through a token,
F after it to the chunk's end, P and Q the same within its sub-chunk, and masked cumulative
sums of the raw log-decays within a sub-chunk), never as a difference of two longer sums:
with strong gates a chunk's cumulative log-decay reaches hundreds, where fp32 values are
1e-5 apart, and ``G_t - G_s`` would carry that error into every decay factor. A span never
runs backwards (masked to ``-inf`` above the diagonal before the exp), so with decays in
(0, 1] no exponent is positive. The chunk (default 64 tokens) is cut into sub-chunks of
``BC = 16`` tokens. Between a sub-chunk ``i`` and an earlier one ``j`` the decay factors
through the last token ``l`` of ``j``: ``decay(s -> t) = decay(l -> t) decay(s -> l)`` =
``exp(P_t + totals of the sub-chunks between) exp(Q_s)``, both at most 1, so those blocks
are matrix products (``tl.dot``). This is GLA's secondary chunking; it is chosen because it
is exact for per-channel decays on either axis (and both at once), needs nothing but
``tl.dot`` and elementwise ops, and keeps the tiles small. Why not ``exp(G_t) exp(-G_s)``
over the whole chunk: ``exp(-G_s)`` overflows fp32 once a chunk's decays add up below about
-88. Within a sub-chunk:

* ``EXACT`` (a per-channel decay: GLA, Raven, value-axis decays): each key token ``s`` in turn
  with its exact decay to every later token of the sub-chunk, per channel (``BC x channels``
  elementwise); the exact ``BC x BC x channels`` tensor at once would not fit in registers.
* otherwise (no decay or a scalar one: linear attention, retention, Mamba-2): the masked
  product ``(U Kᵀ) ⊙ decay``, the ``BC x BC`` decays from Mamba-2's segment sums.

Loops are ``tl.range(..., num_stages=1)``: Triton's default software pipelining of loops
holding dots (3 stages) doubles the registers of these kernels and made them spill.

Dots take their operand format from the call's precision policy (``recdsl.codegen.precision``,
``precision_flags``): ``PRECISION_R`` for chunk_fwd's reads (the outputs), ``PRECISION`` for
the backward's products inside a chunk, ``PRECISION_S`` for those with a state (or its
gradient) as an operand or that carry it from chunk to chunk (chunk_fwd's ``Kᵀ V`` update,
chunk_bwd_dh's ``Uᵀ dO``, the backward's products with ``S0`` or ``dS``). fp32 inputs take
"tf32x3" on GPUs (three tf32 products that keep fp32 accuracy on tensor cores: plain tf32's
10-bit mantissa would put the outputs 1e-3 off, far outside the autotest's bounds); half
inputs take half operands for the backward's chunk products. The interpreter computes exactly
and cannot multiply bf16. ``tl.dot`` needs every side >= 16: blocks are powers of two of at
least 16.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import triton

from ..grammar import ast
from ..ir.affine import same_expr
from ..ir.checked import CheckedRule, Var
from ..ir.ssa import _Lowering
from ..ir.vjp import adjoint
from .precision import DOT_HELPER, Precision
from .prologue import _PrologueGenerator, _num
from .recurrent import _ident
from .triton_ops import TOPK_HELPER, block

# Version of the template: part of the cache key.
VERSION = "2"

SUB_CHUNK = 16  # BC with per-channel decays
SCALAR_SUB_CHUNK = 16  # BC without: the diagonal blocks are masked products
MIN_BLOCK = 16  # tl.dot needs every side >= 16

NONE, SCALAR, CHANNEL = 0, 1, 2  # decay kinds of an axis (Y takes NONE or CHANNEL)

# each kernel's dot-format constexprs, by class (recdsl.codegen.precision)
_PRODUCTS = {"chunk_fwd": {"read": "PRECISION_R", "state": "PRECISION_S"},
             "chunk_bwd_dh": {"state": "PRECISION_S"},
             "chunk_bwd_x": {"chunk": "PRECISION", "state": "PRECISION_S"},
             "chunk_bwd_y": {"chunk": "PRECISION", "state": "PRECISION_S"}}


def precision_flags(kernel: str, precision: Precision) -> dict:
    """The dot-format constexprs of ``kernel`` under ``precision``."""
    return {flag: getattr(precision, c) for c, flag in _PRODUCTS[kernel].items()}


def _dots(kernel: str, precision: Precision) -> str:
    """The formats of ``kernel``'s products, for build reports."""
    return precision.describe(tuple(_PRODUCTS[kernel]))


SOURCE = r'''"""Chunkwise kernels of the diagonal family, generated by recdsl (see
recdsl/codegen/chunk_diagonal.py for the algorithm)."""
import triton
import triton.language as tl


@triton.jit
def _tile(ptr, tok0, n_rows, H, i_h, D: tl.constexpr, col0, BR: tl.constexpr, BD: tl.constexpr):
    """Rows tok0 .. tok0+BR-1 (valid below n_rows) and columns col0 .. col0+BD-1 (valid below
    D) of a [tokens, H, D] tensor, as fp32; zero outside."""
    rows = tl.arange(0, BR)
    cols = col0 + tl.arange(0, BD)
    offs = ((tok0 + rows[:, None]) * H + i_h) * D + cols[None, :]
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _put(ptr, value, tok0, n_rows, H, i_h, D: tl.constexpr, col0, BR: tl.constexpr,
         BD: tl.constexpr):
    rows = tl.arange(0, BR)
    cols = col0 + tl.arange(0, BD)
    offs = ((tok0 + rows[:, None]) * H + i_h) * D + cols[None, :]
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row(ptr, tok, limit, H, i_h, D: tl.constexpr, col0, BD: tl.constexpr):
    """One token's [BD] slice of a [tokens, H, D] tensor, fp32; zero past D or unless
    tok < limit. (The interpreter refuses a scalar condition and'ed into a block mask, hence
    the broadcast.)"""
    cols = col0 + tl.arange(0, BD)
    return tl.load(ptr + (tok * H + i_h) * D + cols, mask=(cols < D) & ((cols * 0 + tok) < limit),
                   other=0.0).to(tl.float32)


@triton.jit
def _gtile(ptr, tok0, n_rows, H, i_h, D: tl.constexpr, col0, KIND: tl.constexpr,
           BR: tl.constexpr, BD: tl.constexpr):
    """Cumulative log-decays of BR tokens: a [BR, BD] tile, or [BR, 1] for KIND 1 (one per
    token, broadcast by the arithmetic). Rows past n_rows repeat the last valid one: their
    exponent differences stay finite (a zero there would make exp(0 - G) overflow, and the
    zero rows of u or kx would turn it into NaN)."""
    rows = tl.minimum(tl.arange(0, BR), n_rows - 1)
    if KIND == 1:
        g = tl.load(ptr + (tok0 + rows) * H + i_h).to(tl.float32)[:, None]
    else:
        cols = col0 + tl.arange(0, BD)
        offs = ((tok0 + rows[:, None]) * H + i_h) * D + cols[None, :]
        g = tl.load(ptr + offs, mask=(rows[:, None] >= 0) & (cols[None, :] < D), other=0.0).to(tl.float32)
    return g


@triton.jit
def _grow(ptr, tok, limit, H, i_h, D: tl.constexpr, col0, KIND: tl.constexpr, BD: tl.constexpr):
    """One token's cumulative log-decay: [BD], or [1] for KIND 1; zero unless tok < limit."""
    if KIND == 1:
        lanes = tl.zeros([1], tl.int64)
        g = tl.load(ptr + tok * H + i_h + lanes, mask=(lanes + tok) < limit, other=0.0).to(tl.float32)
    else:
        g = _row(ptr, tok, limit, H, i_h, D, col0, BD)
    return g


@triton.jit
def _bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = tl.cast(i_n, tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def _state_offsets(o_x, o_y, DX: tl.constexpr, DY: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Offsets of the [X, Y tile] slice in the rule's layout of the state."""
    if TRANSPOSED:
        offs = o_y[None, :] * DX + o_x[:, None]
    else:
        offs = o_x[:, None] * DY + o_y[None, :]
    return offs


@triton.jit
def _between(gP, start, j, i, H, i_h, D: tl.constexpr, col0, KIND: tl.constexpr,
             BC: tl.constexpr, BD: tl.constexpr):
    """The log-decay over the sub-chunks strictly between sub-chunks j and i of the chunk at
    ``start``, summed from their totals (their prefix sums' last rows): [1, BD] ([1, 1])."""
    if KIND == 1:
        acc = tl.zeros([1], tl.float32)
    else:
        acc = tl.zeros([BD], tl.float32)
    for b in tl.range(j + 1, i, num_stages=1):
        end = start + b * BC + BC - 1
        acc += _grow(gP, end, end + 1, H, i_h, D, col0, KIND, BD)
    return acc[None, :]


@triton.jit
def _vcol(ptr, tok0, n_rows, H, i_h, BR: tl.constexpr):
    """A per-token scalar [tokens, H] for BR tokens from tok0 as [BR, 1], zero past n_rows."""
    rows = tl.arange(0, BR)
    v = tl.load(ptr + (tok0 + rows) * H + i_h, mask=rows < n_rows, other=0.0).to(tl.float32)
    return v[:, None]


@triton.jit
def _graw(ptr, tok0, n_rows, H, i_h, D: tl.constexpr, col0, KIND: tl.constexpr,
          BR: tl.constexpr, BD: tl.constexpr):
    """Per-token log-decays (plane 0): [BR, BD], or [BR, 1] for KIND 1; zero past n_rows."""
    if KIND == 1:
        g = _vcol(ptr, tok0, n_rows, H, i_h, BR)
    else:
        g = _tile(ptr, tok0, n_rows, H, i_h, D, col0, BR, BD)
    return g


@triton.jit
def _segments(g_col, o_c):
    """[BC, BC]: the log-decay from after token s through token t (t >= s), formed from the
    per-token log-decays g_col [BC, 1] themselves: cumulative sums of masked values."""
    g_rows = tl.where(o_c[:, None] > o_c[None, :], g_col, 0.0)
    return tl.cumsum(g_rows, axis=0)


@triton.jit
def chunk_decays(g, out, cu_seqlens, T, H, NTOK, D: tl.constexpr, BD: tl.constexpr,
                 BT: tl.constexpr, BC: tl.constexpr, IS_VARLEN: tl.constexpr):
    """The log-decay sums the kernels need, from g [tokens, H, D], into out [5, tokens, H, D]:
    0 g itself; 1 E, from the chunk's start through the token; 2 F, after the token to the
    chunk's end; 3 P, from the sub-chunk's start through the token; 4 Q, after the token to
    the sub-chunk's end. Each is formed from its own terms, never as a difference of two
    longer sums, so a short span keeps its precision however long the chunk or strong the
    gates. Program (sequence and head, column tile)."""
    i_nh = tl.program_id(0)
    d0 = tl.program_id(1) * BD
    i_n = i_nh // H
    i_h = i_nh % H
    bos, eos = _bounds(cu_seqlens, i_n, T, IS_VARLEN)
    plane = tl.cast(NTOK, tl.int64) * D  # 64-bit: tokens * heads * D may pass 2^31
    for c in tl.range(0, tl.cdiv(eos - bos, BT), num_stages=1):
        start = bos + c * BT
        L = tl.minimum(BT, eos - start)
        n_sub = tl.cdiv(L, BC)
        before = tl.zeros([BD], tl.float32)
        for b in tl.range(0, n_sub, num_stages=1):
            t0 = start + b * BC
            n = tl.minimum(BC, L - b * BC)
            x = _tile(g, t0, n, H, i_h, D, d0, BC, BD)
            after_me = _tile(g, t0 + 1, n - 1, H, i_h, D, d0, BC, BD)  # the next token's row
            prefix = tl.cumsum(x, axis=0)
            _put(out, x, t0, n, H, i_h, D, d0, BC, BD)
            _put(out + plane, before[None, :] + prefix, t0, n, H, i_h, D, d0, BC, BD)
            _put(out + 3 * plane, prefix, t0, n, H, i_h, D, d0, BC, BD)
            _put(out + 4 * plane, tl.cumsum(after_me, axis=0, reverse=True), t0, n, H, i_h, D,
                 d0, BC, BD)
            before += tl.sum(x, axis=0)
        after = tl.zeros([BD], tl.float32)
        for b_rev in tl.range(0, n_sub, num_stages=1):
            b = n_sub - 1 - b_rev
            t0 = start + b * BC
            n = tl.minimum(BC, L - b * BC)
            after_me = _tile(g, t0 + 1, n - 1, H, i_h, D, d0, BC, BD)
            _put(out + 2 * plane, after[None, :] + tl.cumsum(after_me, axis=0, reverse=True),
                 t0, n, H, i_h, D, d0, BC, BD)
            after += tl.sum(_tile(g, t0, n, H, i_h, D, d0, BC, BD), axis=0)


@triton.jit
def _planes(gx, gy, NTOK, DX: tl.constexpr, DY: tl.constexpr, GX: tl.constexpr):
    """Strides of the five planes of chunk_decays' output for X and Y."""
    ntok = tl.cast(NTOK, tl.int64)  # tokens * heads * D may pass 2^31
    if GX == 2:
        sx = ntok * DX
    else:
        sx = ntok
    return sx, ntok * DY


@triton.jit
def chunk_fwd(u, kx, vy, gx, gy, extra, h0, out, ht, ckpt, cu_seqlens, chunk_offsets, T, H, NTOK,
              DX: tl.constexpr, DY: tl.constexpr, BX: tl.constexpr, BV: tl.constexpr,
              NY: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, EXACT: tl.constexpr,
              GX: tl.constexpr, GY: tl.constexpr, TRANSPOSED: tl.constexpr,
              USE_INITIAL: tl.constexpr, HAS_EXTRA: tl.constexpr, STORE_CKPT: tl.constexpr,
              IS_VARLEN: tl.constexpr, PRECISION_R: tl.constexpr,
              PRECISION_S: tl.constexpr):
    """o_t = S_tᵀ u_t (+ extra_t) for every token; S_T; the states entering each chunk.

    Program (sequence and head; X tile, Y tile). ``out`` is ``[NX, tokens, H, DY]``: partial
    sums over the X tiles. gx, gy hold chunk_decays' five planes (g, E, F, P, Q).
    EXACT: per-channel decays, the diagonal sub-chunk blocks one key token at a time."""
    i_nh = tl.program_id(0)
    i_x = tl.program_id(1) // NY
    i_y = tl.program_id(1) % NY
    i_n = i_nh // H
    i_h = i_nh % H
    bos, eos = _bounds(cu_seqlens, i_n, T, IS_VARLEN)
    first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    x0 = i_x * BX
    y0 = i_y * BV
    o_x = x0 + tl.arange(0, BX)
    o_y = y0 + tl.arange(0, BV)
    m_s = (o_x[:, None] < DX) & (o_y[None, :] < DY)
    s_offs = _state_offsets(o_x, o_y, DX, DY, TRANSPOSED)
    ck_offs = o_x[:, None] * DY + o_y[None, :]  # chunk states: the kernel's [X, Y] layout
    out_p = out + tl.cast(i_x, tl.int64) * NTOK * DY
    sx, sy = _planes(gx, gy, NTOK, DX, DY, GX)
    if USE_INITIAL:
        S = tl.load(h0 + tl.cast(i_nh, tl.int64) * DX * DY + s_offs, mask=m_s, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BX, BV], tl.float32)
    o_c = tl.arange(0, BC)
    causal = o_c[:, None] >= o_c[None, :]
    for c in tl.range(0, tl.cdiv(eos - bos, BT), num_stages=1):
        start = bos + c * BT
        L = tl.minimum(BT, eos - start)
        last = start + L - 1
        if STORE_CKPT:
            tl.store(ckpt + ((first_chunk + c) * H + i_h) * DX * DY + ck_offs, S, mask=m_s)
        for i in tl.range(0, tl.cdiv(L, BC), num_stages=1):
            t0 = start + i * BC
            n_i = tl.minimum(BC, L - i * BC)
            U_i = _tile(u, t0, n_i, H, i_h, DX, x0, BC, BX)
            # through the state entering the chunk
            if GX != 0:
                o = _dot(U_i * tl.exp(_gtile(gx + sx, t0, n_i, H, i_h, DX, x0, GX, BC, BX)), S, PRECISION_R)
                Px_i = _gtile(gx + 3 * sx, t0, n_i, H, i_h, DX, x0, GX, BC, BX)
            else:
                o = _dot(U_i, S, PRECISION_R)
            if GY != 0:
                o = o * tl.exp(_gtile(gy + sy, t0, n_i, H, i_h, DY, y0, 2, BC, BV))
                Py_i = _gtile(gy + 3 * sy, t0, n_i, H, i_h, DY, y0, 2, BC, BV)
            # earlier sub-chunks: decays factor through the last token of sub-chunk j
            for j in tl.range(0, i, num_stages=1):
                tj = start + j * BC
                K_j = _tile(kx, tj, BC, H, i_h, DX, x0, BC, BX)
                V_j = _tile(vy, tj, BC, H, i_h, DY, y0, BC, BV)
                if GX != 0:
                    q_to = tl.exp(Px_i + _between(gx + 3 * sx, start, j, i, H, i_h, DX, x0, GX, BC, BX))
                    k_from = tl.exp(_gtile(gx + 4 * sx, tj, BC, H, i_h, DX, x0, GX, BC, BX))
                    A = _dot(U_i * q_to, tl.trans(K_j * k_from), PRECISION_R)
                else:
                    A = _dot(U_i, tl.trans(K_j), PRECISION_R)
                if GY != 0:
                    o_to = tl.exp(Py_i + _between(gy + 3 * sy, start, j, i, H, i_h, DY, y0, 2, BC, BV))
                    v_from = tl.exp(_gtile(gy + 4 * sy, tj, BC, H, i_h, DY, y0, 2, BC, BV))
                    o += o_to * _dot(A, V_j * v_from, PRECISION_R)
                else:
                    o += _dot(A, V_j, PRECISION_R)
            # the sub-chunk itself
            if EXACT:  # one key token s at a time, exact decays per channel
                if GX != 0:
                    gx_i = _graw(gx, t0, n_i, H, i_h, DX, x0, GX, BC, BX)
                if GY != 0:
                    gy_i = _tile(gy, t0, n_i, H, i_h, DY, y0, BC, BV)
                for s in tl.range(0, n_i, num_stages=1):  # a run-time bound: not unrolled
                    ts = t0 + s
                    k_s = _row(kx, ts, t0 + n_i, H, i_h, DX, x0, BX)
                    v_s = _row(vy, ts, t0 + n_i, H, i_h, DY, y0, BV)
                    after = (o_c >= s)[:, None]
                    later = (o_c > s)[:, None]
                    if GX != 0:  # the log-decay after s through each t, summed from its terms
                        seg = tl.cumsum(tl.where(later, gx_i, 0.0), axis=0)
                        ex = tl.exp(tl.where(after, seg, float("-inf")))
                        a = tl.sum(U_i * k_s[None, :] * ex, axis=1)
                    else:
                        a = tl.sum(tl.where(after, U_i * k_s[None, :], 0.0), axis=1)
                    if GY != 0:
                        seg = tl.cumsum(tl.where(later, gy_i, 0.0), axis=0)
                        ey = tl.exp(tl.where(after, seg, float("-inf")))
                        o += a[:, None] * v_s[None, :] * ey
                    else:
                        o += a[:, None] * v_s[None, :]
            else:  # a scalar decay: the masked product
                K_i = _tile(kx, t0, n_i, H, i_h, DX, x0, BC, BX)
                V_i = _tile(vy, t0, n_i, H, i_h, DY, y0, BC, BV)
                A = _dot(U_i, tl.trans(K_i), PRECISION_R)
                if GX != 0:
                    seg = _segments(_vcol(gx, t0, n_i, H, i_h, BC), o_c)
                    A = A * tl.exp(tl.where(causal, seg, float("-inf")))
                else:
                    A = tl.where(causal, A, 0.0)
                o += _dot(A, V_i, PRECISION_R)
            if HAS_EXTRA:  # added once, by the first X tile
                o += _tile(extra, t0, tl.where(i_x == 0, n_i, 0), H, i_h, DY, y0, BC, BV)
            _put(out_p, o, t0, n_i, H, i_h, DY, y0, BC, BV)
        # the state entering the next chunk
        if GX != 0:
            S = S * tl.exp(_grow(gx + sx, last, eos, H, i_h, DX, x0, GX, BX))[:, None]
        if GY != 0:
            S = S * tl.exp(_row(gy + sy, last, eos, H, i_h, DY, y0, BV))[None, :]
        for j in tl.range(0, tl.cdiv(L, BC), num_stages=1):
            tj = start + j * BC
            n_j = tl.minimum(BC, L - j * BC)
            live = (o_c < n_j)[:, None]
            K_j = _tile(kx, tj, n_j, H, i_h, DX, x0, BC, BX)
            V_j = _tile(vy, tj, n_j, H, i_h, DY, y0, BC, BV)
            if GX != 0:
                Fx_j = _gtile(gx + 2 * sx, tj, n_j, H, i_h, DX, x0, GX, BC, BX)
                K_j = K_j * tl.exp(tl.where(live, Fx_j, float("-inf")))
            if GY != 0:
                Fy_j = _gtile(gy + 2 * sy, tj, n_j, H, i_h, DY, y0, 2, BC, BV)
                V_j = V_j * tl.exp(tl.where(live, Fy_j, float("-inf")))
            S += _dot(tl.trans(K_j), V_j, PRECISION_S)
    if STORE_CKPT:  # the slot after the last chunk: the state leaving it
        tl.store(ckpt + ((first_chunk + tl.cdiv(eos - bos, BT)) * H + i_h) * DX * DY + ck_offs,
                 S, mask=m_s)
    tl.store(ht + tl.cast(i_nh, tl.int64) * DX * DY + s_offs, S, mask=m_s)


@triton.jit
def chunk_bwd_dh(u, gx, gy, do, dht, dckpt, dh0, cu_seqlens, chunk_offsets, T, H, NTOK,
                 DX: tl.constexpr, DY: tl.constexpr, BX: tl.constexpr,
                 BV: tl.constexpr, NY: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                 GX: tl.constexpr, GY: tl.constexpr, TRANSPOSED: tl.constexpr,
                 USE_FINAL_GRAD: tl.constexpr, IS_VARLEN: tl.constexpr,
                 PRECISION_S: tl.constexpr):
    """The state gradient walked backwards: dS leaving every chunk (``dckpt``, the kernel's
    [X, Y] layout) and dS_0 (``dh0``)."""
    i_nh = tl.program_id(0)
    i_x = tl.program_id(1) // NY
    i_y = tl.program_id(1) % NY
    i_n = i_nh // H
    i_h = i_nh % H
    bos, eos = _bounds(cu_seqlens, i_n, T, IS_VARLEN)
    first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    x0 = i_x * BX
    y0 = i_y * BV
    o_x = x0 + tl.arange(0, BX)
    o_y = y0 + tl.arange(0, BV)
    m_s = (o_x[:, None] < DX) & (o_y[None, :] < DY)
    s_offs = _state_offsets(o_x, o_y, DX, DY, TRANSPOSED)
    ck_offs = o_x[:, None] * DY + o_y[None, :]
    sx, sy = _planes(gx, gy, NTOK, DX, DY, GX)
    if USE_FINAL_GRAD:
        dS = tl.load(dht + tl.cast(i_nh, tl.int64) * DX * DY + s_offs, mask=m_s, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BX, BV], tl.float32)
    o_c = tl.arange(0, BC)
    n_chunks = tl.cdiv(eos - bos, BT)
    for c_rev in tl.range(0, n_chunks, num_stages=1):
        c = n_chunks - 1 - c_rev
        start = bos + c * BT
        L = tl.minimum(BT, eos - start)
        last = start + L - 1
        tl.store(dckpt + ((first_chunk + c) * H + i_h) * DX * DY + ck_offs, dS, mask=m_s)
        if GX != 0:
            dS = dS * tl.exp(_grow(gx + sx, last, eos, H, i_h, DX, x0, GX, BX))[:, None]
        if GY != 0:
            dS = dS * tl.exp(_row(gy + sy, last, eos, H, i_h, DY, y0, BV))[None, :]
        for m in tl.range(0, tl.cdiv(L, BC), num_stages=1):
            t0 = start + m * BC
            n_m = tl.minimum(BC, L - m * BC)
            U_m = _tile(u, t0, n_m, H, i_h, DX, x0, BC, BX)
            dO_m = _tile(do, t0, n_m, H, i_h, DY, y0, BC, BV)
            if GX != 0:
                U_m = U_m * tl.exp(_gtile(gx + sx, t0, n_m, H, i_h, DX, x0, GX, BC, BX))
            if GY != 0:
                dO_m = dO_m * tl.exp(_gtile(gy + sy, t0, n_m, H, i_h, DY, y0, 2, BC, BV))
            dS += _dot(tl.trans(U_m), dO_m, PRECISION_S)
    tl.store(dh0 + tl.cast(i_nh, tl.int64) * DX * DY + s_offs, dS, mask=m_s)


@triton.jit
def _red(x, KIND: tl.constexpr):
    """A decay-gradient term [R, BX] as the decay has it: summed over X for a scalar decay
    (KIND 1, [R, 1])."""
    if KIND == 1:
        x = tl.sum(x, axis=1)[:, None]
    return x


@triton.jit
def _excl_combine(s1, x1, s2, x2):
    """Two runs of rows joined, each run as (the sum of all its rows but the last, its last)."""
    return s1 + x1 + s2, x2


@triton.jit
def _excl(x):
    """Exclusive cumulative sum down the rows (exact zero in the first row), added from the
    earlier rows' own terms. Not ``cumsum(x) - x``: with strong decays the row's own term (a
    key near the chunk's end, barely decayed) can be 1e9 times the earlier keys' sum, and its
    rounding then replaced that sum (a per-head decay's gradient was 3e-3 off, a token's 100%)."""
    s, _ = tl.associative_scan((tl.zeros_like(x), x), 0, _excl_combine)
    return s


@triton.jit
def _put_decay(ptr, dG, t0, n, H, i_h, D: tl.constexpr, col0, KIND: tl.constexpr,
               BR: tl.constexpr, BD: tl.constexpr):
    if KIND == 1:
        rows = tl.arange(0, BR)
        tl.store(ptr + (t0 + rows) * H + i_h, tl.sum(dG, axis=1), mask=rows < n)
    else:
        _put(ptr, dG, t0, n, H, i_h, D, col0, BR, BD)


@triton.jit
def chunk_bwd_x(u, kx, vy, gx, gy, ckpt, dckpt, do, dux, dgx, chunk_bounds, H, NTOK,
                DX: tl.constexpr, DY: tl.constexpr, BX: tl.constexpr, BV: tl.constexpr,
                NY: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, EXACT: tl.constexpr,
                GX: tl.constexpr, GY: tl.constexpr, SIDE: tl.constexpr, PRECISION: tl.constexpr,
                PRECISION_S: tl.constexpr):
    """One chunk's gradient of u (SIDE 0) or of kx (SIDE 1), and that side's part of the X
    log-decays' gradient (see "Decay gradients" in the module's docstring): SIDE 0 the terms
    of the queries (reverse sums), SIDE 1 those of the keys and the state leaving the chunk
    (forward sums), each with its share of the crossing pairs. Two launches of one kernel
    rather than one: half the live tiles, no spills.

    Program (chunk; X tile, Y tile; head). Partial sums over the Y tiles: ``dux`` (du or dkx)
    and a per-channel dgx ``[NY, tokens, H, DX]``; a scalar dgx ``[NX * NY, tokens, H]``."""
    i_c = tl.program_id(0)
    i_x = tl.program_id(1) // NY
    i_y = tl.program_id(1) % NY
    i_h = tl.program_id(2)
    start = tl.load(chunk_bounds + 3 * i_c)
    eos = tl.load(chunk_bounds + 3 * i_c + 1)
    slot = tl.load(chunk_bounds + 3 * i_c + 2)  # of the chunk's state in ckpt and dckpt
    L = tl.minimum(BT, eos - start)
    last = start + L - 1
    x0 = i_x * BX
    y0 = i_y * BV
    o_x = x0 + tl.arange(0, BX)
    o_y = y0 + tl.arange(0, BV)
    m_s = (o_x[:, None] < DX) & (o_y[None, :] < DY)
    ck = (slot * H + i_h) * DX * DY + o_x[:, None] * DY + o_y[None, :]
    dux_p = dux + tl.cast(i_y, tl.int64) * NTOK * DX
    o_c = tl.arange(0, BC)
    causal = o_c[:, None] >= o_c[None, :]
    if GX == 1:
        dgx_p = dgx + tl.cast(tl.program_id(1), tl.int64) * NTOK
    else:
        dgx_p = dgx + tl.cast(i_y, tl.int64) * NTOK * DX
    sx, sy = _planes(gx, gy, NTOK, DX, DY, GX)
    if GX != 0:
        gx_e = _grow(gx + sx, last, eos, H, i_h, DX, x0, GX, BX)[None, :]
        carry = _red(tl.zeros([1, BX], tl.float32), GX)
    if GY != 0:
        gy_e = _row(gy + sy, last, eos, H, i_h, DY, y0, BV)[None, :]
    if SIDE == 1 and GX != 0:
        # the state entering the chunk, carried to its end: e^{G_end} ⊙ (S0 ⊙ dS_end) over Y
        S0dS = tl.load(ckpt + ck, mask=m_s, other=0.0) * tl.load(dckpt + ck, mask=m_s, other=0.0)
        if GY != 0:
            S0dS = S0dS * tl.exp(gy_e)
        base = _red(tl.sum(S0dS, axis=1)[None, :] * tl.exp(gx_e), GX)
    n_sub = tl.cdiv(L, BC)
    for step in tl.range(0, n_sub, num_stages=1):  # SIDE 0 last to first (reverse sums), SIDE 1 first to last
        if SIDE == 0:
            m = n_sub - 1 - step
        else:
            m = step
        t0 = start + m * BC
        n_m = tl.minimum(BC, L - m * BC)
        live = (o_c < n_m)[:, None]
        dO_m = _tile(do, t0, n_m, H, i_h, DY, y0, BC, BV)
        U_m = _tile(u, t0, n_m, H, i_h, DX, x0, BC, BX)
        # log-decay sums (chunk_decays): E from the chunk's start, F to its end, P from the
        # sub-chunk's start, Q to the sub-chunk's end
        if SIDE == 0:
            # through the state entering the chunk
            dOq = dO_m
            if GY != 0:
                dOq = dO_m * tl.exp(_gtile(gy + sy, t0, n_m, H, i_h, DY, y0, 2, BC, BV))
            S0 = tl.load(ckpt + ck, mask=m_s, other=0.0)
            dX = _dot(dOq, tl.trans(S0), PRECISION_S)
            if GX != 0:
                dX = dX * tl.exp(_gtile(gx + sx, t0, n_m, H, i_h, DX, x0, GX, BC, BX))
                dG = _red(U_m * dX, GX)
                dG = tl.cumsum(dG, axis=0, reverse=True) + carry
                carry += tl.sum(_red(U_m * dX, GX), axis=0)[None, :]
            # earlier sub-chunks j (keys) -> this one (queries)
            dX_off = tl.zeros([BC, BX], tl.float32)
            for j in tl.range(0, m, num_stages=1):
                tj = start + j * BC
                kg = _tile(kx, tj, BC, H, i_h, DX, x0, BC, BX)
                V_j = _tile(vy, tj, BC, H, i_h, DY, y0, BC, BV)
                if GY != 0:
                    o_to = _gtile(gy + 3 * sy, t0, n_m, H, i_h, DY, y0, 2, BC, BV) \
                        + _between(gy + 3 * sy, start, j, m, H, i_h, DY, y0, 2, BC, BV)
                    v_from = _gtile(gy + 4 * sy, tj, BC, H, i_h, DY, y0, 2, BC, BV)
                    dA = _dot(dO_m * tl.exp(o_to), tl.trans(V_j * tl.exp(v_from)), PRECISION)
                else:
                    dA = _dot(dO_m, tl.trans(V_j), PRECISION)
                if GX != 0:
                    kg = kg * tl.exp(_gtile(gx + 4 * sx, tj, BC, H, i_h, DX, x0, GX, BC, BX))
                    q_to = _gtile(gx + 3 * sx, t0, n_m, H, i_h, DX, x0, GX, BC, BX) \
                        + _between(gx + 3 * sx, start, j, m, H, i_h, DX, x0, GX, BC, BX)
                    dX_off += tl.exp(q_to) * _dot(dA, kg, PRECISION)
                else:
                    dX_off += _dot(dA, kg, PRECISION)
            dX += dX_off
            if GX != 0:  # crossing pairs: keys of earlier sub-chunks, queries from here on
                dG += tl.cumsum(_red(U_m * dX_off, GX), axis=0, reverse=True)
        else:
            K_m = _tile(kx, t0, n_m, H, i_h, DX, x0, BC, BX)
            # through the gradient leaving the chunk
            Vk = _tile(vy, t0, n_m, H, i_h, DY, y0, BC, BV)
            if GY != 0:
                Fy_m = _gtile(gy + 2 * sy, t0, n_m, H, i_h, DY, y0, 2, BC, BV)
                Vk = Vk * tl.exp(tl.where(live, Fy_m, float("-inf")))
            dS = tl.load(dckpt + ck, mask=m_s, other=0.0)
            dX = _dot(Vk, tl.trans(dS), PRECISION_S)
            if GX != 0:
                Fx_m = _gtile(gx + 2 * sx, t0, n_m, H, i_h, DX, x0, GX, BC, BX)
                dX = dX * tl.exp(tl.where(live, Fx_m, float("-inf")))
                end = _red(K_m * dX, GX)  # the keys before a token reach the chunk's end
                dG = base + _excl(end) + carry
                carry += tl.sum(end, axis=0)[None, :]
            # this one (keys) -> later sub-chunks i (queries)
            vg = _tile(vy, t0, n_m, H, i_h, DY, y0, BC, BV)
            if GY != 0:
                Qy_m = _gtile(gy + 4 * sy, t0, n_m, H, i_h, DY, y0, 2, BC, BV)
                vg = vg * tl.exp(tl.where(live, Qy_m, float("-inf")))
            dKg = tl.zeros([BC, BX], tl.float32)
            for i in tl.range(m + 1, n_sub, num_stages=1):
                ti = start + i * BC
                n_i = tl.minimum(BC, L - i * BC)
                U_i = _tile(u, ti, n_i, H, i_h, DX, x0, BC, BX)
                dO_i = _tile(do, ti, n_i, H, i_h, DY, y0, BC, BV)
                if GX != 0:
                    U_i = U_i * tl.exp(_gtile(gx + 3 * sx, ti, n_i, H, i_h, DX, x0, GX, BC, BX)
                                       + _between(gx + 3 * sx, start, m, i, H, i_h, DX, x0, GX, BC, BX))
                if GY != 0:
                    dO_i = dO_i * tl.exp(_gtile(gy + 3 * sy, ti, n_i, H, i_h, DY, y0, 2, BC, BV)
                                         + _between(gy + 3 * sy, start, m, i, H, i_h, DY, y0, 2, BC, BV))
                dA = _dot(dO_i, tl.trans(vg), PRECISION)
                dKg += _dot(tl.trans(dA), U_i, PRECISION)
            if GX != 0:
                Qx_m = _gtile(gx + 4 * sx, t0, n_m, H, i_h, DX, x0, GX, BC, BX)
                dKg = dKg * tl.exp(tl.where(live, Qx_m, float("-inf")))
                # crossing pairs: keys up to here in this sub-chunk, queries after it
                dG += _excl(_red(K_m * dKg, GX))
                # ... and keys before this sub-chunk with queries after it
                for j in tl.range(0, m, num_stages=1):
                    tj = start + j * BC
                    kg = _tile(kx, tj, BC, H, i_h, DX, x0, BC, BX)
                    kg = kg * tl.exp(_gtile(gx + 4 * sx, tj, BC, H, i_h, DX, x0, GX, BC, BX))
                    vgj = _tile(vy, tj, BC, H, i_h, DY, y0, BC, BV)
                    if GY != 0:
                        vgj = vgj * tl.exp(_gtile(gy + 4 * sy, tj, BC, H, i_h, DY, y0, 2, BC, BV))
                    for i in tl.range(m + 1, n_sub, num_stages=1):
                        ti = start + i * BC
                        n_i = tl.minimum(BC, L - i * BC)
                        U_i = _tile(u, ti, n_i, H, i_h, DX, x0, BC, BX)
                        U_i = U_i * tl.exp(_gtile(gx + 3 * sx, ti, n_i, H, i_h, DX, x0, GX, BC, BX)
                                           + _between(gx + 3 * sx, start, j, i, H, i_h, DX, x0, GX, BC, BX))
                        dO_i = _tile(do, ti, n_i, H, i_h, DY, y0, BC, BV)
                        if GY != 0:
                            dO_i = dO_i * tl.exp(_gtile(gy + 3 * sy, ti, n_i, H, i_h, DY, y0, 2, BC, BV)
                                                 + _between(gy + 3 * sy, start, j, i, H, i_h, DY, y0, 2, BC, BV))
                        dA = _dot(dO_i, tl.trans(vgj), PRECISION)
                        P = U_i * _dot(dA, kg, PRECISION)
                        dG += _red(tl.sum(P, axis=0)[None, :], GX)
            dX += dKg
        # the sub-chunk itself
        if EXACT:  # one key token s at a time, exact decays per channel
            if SIDE == 0:
                stair = tl.zeros([BC, BX], tl.float32)
            if GX != 0:
                gx_m = _graw(gx, t0, n_m, H, i_h, DX, x0, GX, BC, BX)
            if GY != 0:
                gy_m = _tile(gy, t0, n_m, H, i_h, DY, y0, BC, BV)
            for s in tl.range(0, n_m, num_stages=1):  # a run-time bound: not unrolled (registers)
                ts = t0 + s
                v_s = _row(vy, ts, t0 + n_m, H, i_h, DY, y0, BV)[None, :]
                after = (o_c >= s)[:, None]
                later = (o_c > s)[:, None]
                if GY != 0:  # the log-decay after s through each t, summed from its terms
                    seg = tl.cumsum(tl.where(later, gy_m, 0.0), axis=0)
                    dOey = dO_m * tl.exp(tl.where(after, seg, float("-inf")))
                else:
                    dOey = tl.where(after, dO_m, 0.0)
                da = tl.sum(dOey * v_s, axis=1)[:, None]  # dA[t, s] for the queries t
                if GX != 0:
                    seg = tl.cumsum(tl.where(later, gx_m, 0.0), axis=0)
                    ex = tl.exp(tl.where(after, seg, float("-inf")))
                else:
                    ex = tl.where(after, 1.0, 0.0)
                if SIDE == 0:
                    pair = da * _row(kx, ts, t0 + n_m, H, i_h, DX, x0, BX)[None, :] * ex
                    dX += pair
                    if GX != 0:  # pairs (t, s) crossing the queries' positions after s
                        stair += tl.where((o_c > s)[:, None],
                                          tl.cumsum(U_m * pair, axis=0, reverse=True), 0.0)
                else:
                    dX += tl.where((o_c == s)[:, None], tl.sum(da * U_m * ex, axis=0)[None, :], 0.0)
            if SIDE == 0 and GX != 0:
                dG += _red(stair, GX)
        else:  # a scalar decay: masked products
            V_m = _tile(vy, t0, n_m, H, i_h, DY, y0, BC, BV)
            dA = _dot(dO_m, tl.trans(V_m), PRECISION)
            if GX != 0:
                seg = _segments(_vcol(gx, t0, n_m, H, i_h, BC), o_c)
                dA = dA * tl.exp(tl.where(causal, seg, float("-inf")))
            else:
                dA = tl.where(causal, dA, 0.0)
            if SIDE == 0:
                K_d = _tile(kx, t0, n_m, H, i_h, DX, x0, BC, BX)
                dX += _dot(dA, K_d, PRECISION)
                if GX != 0:  # the pairs (t, s) with s < tau <= t, tau in this sub-chunk
                    P = _dot(U_m, tl.trans(K_d), PRECISION) * dA
                    P = tl.cumsum(P, axis=0, reverse=True)
                    dG += tl.sum(tl.where(o_c[None, :] < o_c[:, None], P, 0.0), axis=1)[:, None]
            else:
                dX += _dot(tl.trans(dA), U_m, PRECISION)
        _put(dux_p, dX, t0, n_m, H, i_h, DX, x0, BC, BX)
        if GX != 0:
            _put_decay(dgx_p, dG, t0, n_m, H, i_h, DX, x0, GX, BC, BX)


@triton.jit
def chunk_bwd_y(u, kx, vy, gx, gy, ckpt, dckpt, do, dvy, dgy, chunk_bounds, H, NTOK,
                DX: tl.constexpr, DY: tl.constexpr, BX: tl.constexpr, BV: tl.constexpr,
                NY: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, EXACT: tl.constexpr,
                GX: tl.constexpr, GY: tl.constexpr, SIDE: tl.constexpr, PRECISION: tl.constexpr,
                PRECISION_S: tl.constexpr):
    """One chunk's gradient of vy with the keys' part of the Y log-decays' gradient (SIDE 0,
    forward sums), or the queries' part, which needs the read o itself, recomputed (SIDE 1,
    reverse sums; only with Y decays). Partial sums over the X tiles: ``[NX, tokens, H, DY]``."""
    i_c = tl.program_id(0)
    i_x = tl.program_id(1) // NY
    i_y = tl.program_id(1) % NY
    i_h = tl.program_id(2)
    start = tl.load(chunk_bounds + 3 * i_c)
    eos = tl.load(chunk_bounds + 3 * i_c + 1)
    slot = tl.load(chunk_bounds + 3 * i_c + 2)
    L = tl.minimum(BT, eos - start)
    last = start + L - 1
    x0 = i_x * BX
    y0 = i_y * BV
    o_x = x0 + tl.arange(0, BX)
    o_y = y0 + tl.arange(0, BV)
    m_s = (o_x[:, None] < DX) & (o_y[None, :] < DY)
    ck = (slot * H + i_h) * DX * DY + o_x[:, None] * DY + o_y[None, :]
    dvy_p = dvy + tl.cast(i_x, tl.int64) * NTOK * DY
    dgy_p = dgy + tl.cast(i_x, tl.int64) * NTOK * DY
    o_c = tl.arange(0, BC)
    causal = o_c[:, None] >= o_c[None, :]
    carry = tl.zeros([1, BV], tl.float32)
    sx, sy = _planes(gx, gy, NTOK, DX, DY, GX)
    if GX != 0:
        gx_e = _grow(gx + sx, last, eos, H, i_h, DX, x0, GX, BX)[None, :]
    if GY != 0:
        gy_e = _row(gy + sy, last, eos, H, i_h, DY, y0, BV)[None, :]
        if SIDE == 0:  # the state entering the chunk, carried to its end, over X
            S0dS = tl.load(ckpt + ck, mask=m_s, other=0.0) * tl.load(dckpt + ck, mask=m_s, other=0.0)
            if GX != 0:
                S0dS = S0dS * tl.exp(tl.trans(gx_e))
            base = tl.sum(S0dS, axis=0)[None, :] * tl.exp(gy_e)
    n_sub = tl.cdiv(L, BC)
    for step in tl.range(0, n_sub, num_stages=1):
        if SIDE == 0:
            m = step
        else:
            m = n_sub - 1 - step
        t0 = start + m * BC
        n_m = tl.minimum(BC, L - m * BC)
        live = (o_c < n_m)[:, None]
        U_m = _tile(u, t0, n_m, H, i_h, DX, x0, BC, BX)
        dO_m = _tile(do, t0, n_m, H, i_h, DY, y0, BC, BV)
        # log-decay sums (chunk_decays): E from the chunk's start, F to its end, P from the
        # sub-chunk's start, Q to the sub-chunk's end; the raw ones for exact blocks
        if GX != 0:
            gx_m = _graw(gx, t0, n_m, H, i_h, DX, x0, GX, BC, BX)
        if GY != 0:
            gy_m = _tile(gy, t0, n_m, H, i_h, DY, y0, BC, BV)
        if SIDE == 0:
            V_m = _tile(vy, t0, n_m, H, i_h, DY, y0, BC, BV)
            # through the gradient leaving the chunk
            Kk = _tile(kx, t0, n_m, H, i_h, DX, x0, BC, BX)
            if GX != 0:
                Kk = Kk * tl.exp(tl.where(live, _gtile(gx + 2 * sx, t0, n_m, H, i_h, DX, x0, GX, BC, BX),
                                          float("-inf")))
            dS = tl.load(dckpt + ck, mask=m_s, other=0.0)
            dV = _dot(Kk, dS, PRECISION_S)
            if GY != 0:
                dV = dV * tl.exp(tl.where(live, _gtile(gy + 2 * sy, t0, n_m, H, i_h, DY, y0, 2, BC, BV),
                                          float("-inf")))
                end = V_m * dV
                dG = base + _excl(end) + carry
                carry += tl.sum(end, axis=0)[None, :]
            # this one (keys) -> later sub-chunks i (queries)
            kg = _tile(kx, t0, n_m, H, i_h, DX, x0, BC, BX)
            if GX != 0:
                Qx_m = _gtile(gx + 4 * sx, t0, n_m, H, i_h, DX, x0, GX, BC, BX)
                kg = kg * tl.exp(tl.where(live, Qx_m, float("-inf")))
            dVg = tl.zeros([BC, BV], tl.float32)
            for i in tl.range(m + 1, n_sub, num_stages=1):
                ti = start + i * BC
                n_i = tl.minimum(BC, L - i * BC)
                U_i = _tile(u, ti, n_i, H, i_h, DX, x0, BC, BX)
                dO_i = _tile(do, ti, n_i, H, i_h, DY, y0, BC, BV)
                if GX != 0:
                    U_i = U_i * tl.exp(_gtile(gx + 3 * sx, ti, n_i, H, i_h, DX, x0, GX, BC, BX)
                                       + _between(gx + 3 * sx, start, m, i, H, i_h, DX, x0, GX, BC, BX))
                if GY != 0:
                    dO_i = dO_i * tl.exp(_gtile(gy + 3 * sy, ti, n_i, H, i_h, DY, y0, 2, BC, BV)
                                         + _between(gy + 3 * sy, start, m, i, H, i_h, DY, y0, 2, BC, BV))
                A = _dot(U_i, tl.trans(kg), PRECISION)
                dVg += _dot(tl.trans(A), dO_i, PRECISION)
            if GY != 0:
                Qy_m = _gtile(gy + 4 * sy, t0, n_m, H, i_h, DY, y0, 2, BC, BV)
                dVg = dVg * tl.exp(tl.where(live, Qy_m, float("-inf")))
                # crossing pairs: keys up to here in this sub-chunk, queries after it
                dG += _excl(V_m * dVg)
                # ... and keys before this sub-chunk with queries after it
                for j in tl.range(0, m, num_stages=1):
                    tj = start + j * BC
                    kgj = _tile(kx, tj, BC, H, i_h, DX, x0, BC, BX)
                    if GX != 0:
                        kgj = kgj * tl.exp(_gtile(gx + 4 * sx, tj, BC, H, i_h, DX, x0, GX, BC, BX))
                    vgj = _tile(vy, tj, BC, H, i_h, DY, y0, BC, BV)
                    vgj = vgj * tl.exp(_gtile(gy + 4 * sy, tj, BC, H, i_h, DY, y0, 2, BC, BV))
                    for i in tl.range(m + 1, n_sub, num_stages=1):
                        ti = start + i * BC
                        n_i = tl.minimum(BC, L - i * BC)
                        U_i = _tile(u, ti, n_i, H, i_h, DX, x0, BC, BX)
                        if GX != 0:
                            U_i = U_i * tl.exp(_gtile(gx + 3 * sx, ti, n_i, H, i_h, DX, x0, GX, BC, BX)
                                               + _between(gx + 3 * sx, start, j, i, H, i_h, DX, x0, GX, BC, BX))
                        dO_i = _tile(do, ti, n_i, H, i_h, DY, y0, BC, BV)
                        dO_i = dO_i * tl.exp(_gtile(gy + 3 * sy, ti, n_i, H, i_h, DY, y0, 2, BC, BV)
                                             + _between(gy + 3 * sy, start, j, i, H, i_h, DY, y0, 2, BC, BV))
                        A = _dot(U_i, tl.trans(kgj), PRECISION)
                        P = dO_i * _dot(A, vgj, PRECISION)
                        dG += tl.sum(P, axis=0)[None, :]
            dV += dVg
            # the sub-chunk itself
            if EXACT:
                for s in tl.range(0, n_m, num_stages=1):  # a run-time bound: not unrolled (registers)
                    ts = t0 + s
                    k_s = _row(kx, ts, t0 + n_m, H, i_h, DX, x0, BX)[None, :]
                    after = (o_c >= s)[:, None]
                    later = (o_c > s)[:, None]
                    if GX != 0:  # the log-decay after s through each t, summed from its terms
                        seg = tl.cumsum(tl.where(later, gx_m, 0.0), axis=0)
                        a = tl.sum(U_m * k_s * tl.exp(tl.where(after, seg, float("-inf"))),
                                   axis=1)[:, None]
                    else:
                        a = tl.sum(tl.where(after, U_m * k_s, 0.0), axis=1)[:, None]
                    if GY != 0:
                        seg = tl.cumsum(tl.where(later, gy_m, 0.0), axis=0)
                        dv_s = tl.sum(a * dO_m * tl.exp(tl.where(after, seg, float("-inf"))),
                                      axis=0)
                    else:
                        dv_s = tl.sum(a * dO_m, axis=0)
                    dV += tl.where((o_c == s)[:, None], dv_s[None, :], 0.0)
            else:
                K_m = _tile(kx, t0, n_m, H, i_h, DX, x0, BC, BX)
                A = _dot(U_m, tl.trans(K_m), PRECISION)
                if GX != 0:
                    seg = _segments(_vcol(gx, t0, n_m, H, i_h, BC), o_c)
                    A = A * tl.exp(tl.where(causal, seg, float("-inf")))
                else:
                    A = tl.where(causal, A, 0.0)
                dV += _dot(tl.trans(A), dO_m, PRECISION)
            _put(dvy_p, dV, t0, n_m, H, i_h, DY, y0, BC, BV)
        else:
            # the read o (recomputed): through the state entering the chunk ...
            S0 = tl.load(ckpt + ck, mask=m_s, other=0.0)
            if GX != 0:
                O = _dot(U_m * tl.exp(_gtile(gx + sx, t0, n_m, H, i_h, DX, x0, GX, BC, BX)), S0, PRECISION_S)
            else:
                O = _dot(U_m, S0, PRECISION_S)
            O = O * tl.exp(_gtile(gy + sy, t0, n_m, H, i_h, DY, y0, 2, BC, BV))
            dG = tl.cumsum(O * dO_m, axis=0, reverse=True) + carry
            carry += tl.sum(O * dO_m, axis=0)[None, :]
            # ... from earlier sub-chunks j (keys) ...
            O = tl.zeros([BC, BV], tl.float32)
            for j in tl.range(0, m, num_stages=1):
                tj = start + j * BC
                kg = _tile(kx, tj, BC, H, i_h, DX, x0, BC, BX)
                if GX != 0:
                    kg = kg * tl.exp(_gtile(gx + 4 * sx, tj, BC, H, i_h, DX, x0, GX, BC, BX))
                    q_to = _gtile(gx + 3 * sx, t0, n_m, H, i_h, DX, x0, GX, BC, BX) \
                        + _between(gx + 3 * sx, start, j, m, H, i_h, DX, x0, GX, BC, BX)
                    A = _dot(U_m * tl.exp(q_to), tl.trans(kg), PRECISION)
                else:
                    A = _dot(U_m, tl.trans(kg), PRECISION)
                vg = _tile(vy, tj, BC, H, i_h, DY, y0, BC, BV)
                vg = vg * tl.exp(_gtile(gy + 4 * sy, tj, BC, H, i_h, DY, y0, 2, BC, BV))
                o_to = _gtile(gy + 3 * sy, t0, n_m, H, i_h, DY, y0, 2, BC, BV) \
                    + _between(gy + 3 * sy, start, j, m, H, i_h, DY, y0, 2, BC, BV)
                O += tl.exp(o_to) * _dot(A, vg, PRECISION)
            dG += tl.cumsum(O * dO_m, axis=0, reverse=True)
            # ... and within the sub-chunk: the pairs crossing each position
            stair = tl.zeros([BC, BV], tl.float32)
            for s in tl.range(0, n_m, num_stages=1):  # a run-time bound: not unrolled (registers)
                ts = t0 + s
                k_s = _row(kx, ts, t0 + n_m, H, i_h, DX, x0, BX)[None, :]
                after = (o_c >= s)[:, None]
                later = (o_c > s)[:, None]
                if GX != 0:
                    seg = tl.cumsum(tl.where(later, gx_m, 0.0), axis=0)
                    a = tl.sum(U_m * k_s * tl.exp(tl.where(after, seg, float("-inf"))),
                               axis=1)[:, None]
                else:
                    a = tl.sum(tl.where(after, U_m * k_s, 0.0), axis=1)[:, None]
                seg = tl.cumsum(tl.where(later, gy_m, 0.0), axis=0)
                pair = a * _row(vy, ts, t0 + n_m, H, i_h, DY, y0, BV)[None, :] * dO_m \
                    * tl.exp(tl.where(after, seg, float("-inf")))
                stair += tl.where((o_c > s)[:, None], tl.cumsum(pair, axis=0, reverse=True), 0.0)
            dG += stair
        if GY != 0:
            _put(dgy_p, dG, t0, n_m, H, i_h, DY, y0, BC, BV)
'''
# the product helper, after the imports (one text for every kernel module: recdsl.codegen.precision)
SOURCE = SOURCE.replace("import triton.language as tl\n", "import triton.language as tl\n" + DOT_HELPER, 1)


@dataclass(frozen=True)
class PassShape:
    """The compile-time shape of one pass: sizes, decay kinds, chunking and tiles.

    Each program keeps an ``[BX, BV]`` tile of the state. On a GPU the caps are 32 x 32, the
    largest at which every kernel builds without spilling for sm_80 and sm_90 (measured with
    ``recdsl.codegen.aot``; the forward of a per-channel decay already takes about 210
    registers). The interpreter takes whole axes (fewer, larger programs run faster there)."""
    dx: int  # size of the contracted axis X
    dy: int  # size of the returned axis Y
    gx: int  # NONE, SCALAR or CHANNEL
    gy: int  # NONE or CHANNEL
    transposed: bool  # the rule's state is [Y, X] (a read S @ u)
    chunk: int = 64
    block_x: int = 32  # caps of the tiles
    block_y: int = 32

    @property
    def bx(self) -> int:
        return max(MIN_BLOCK, min(self.block_x, triton.next_power_of_2(self.dx)))

    @property
    def bv(self) -> int:
        return max(MIN_BLOCK, min(self.block_y, triton.next_power_of_2(self.dy)))

    @property
    def x_tiles(self) -> int:
        return triton.cdiv(self.dx, self.bx)

    @property
    def y_tiles(self) -> int:
        return triton.cdiv(self.dy, self.bv)

    @property
    def exact(self) -> bool:
        """Per-channel decays: diagonal sub-chunk blocks one key token at a time."""
        return self.gx == CHANNEL or self.gy == CHANNEL

    @property
    def bc(self) -> int:
        return min(self.chunk, SUB_CHUNK if self.exact else SCALAR_SUB_CHUNK)

    @property
    def num_warps(self) -> int:
        """8 warps. The registers a thread needs hardly change with the warps here (the
        16-row dot operands are replicated across warps), but at 4 ptxas held some kernels to
        128 or 168 registers and spilled on sm_80 (retention's forward, Raven's kx backward
        and vy backward, depending on fp fusion); at 8 none spills (``recdsl.codegen.aot``)."""
        return 8


    def constexprs(self, **flags) -> dict:
        return dict(DX=self.dx, DY=self.dy, BX=self.bx, BV=self.bv, NY=self.y_tiles,
                    BT=self.chunk, BC=self.bc, EXACT=self.exact, GX=self.gx, GY=self.gy,
                    TRANSPOSED=self.transposed, **flags)


def column_block(d: int) -> int:
    """Columns per program of chunk_decays: [BC, BD] tiles (at 64 its scans spilled on sm_90)."""
    return max(MIN_BLOCK, min(32, triton.next_power_of_2(d)))


def check_chunk(chunk: int):
    if chunk < MIN_BLOCK or chunk & (chunk - 1) or (chunk > SUB_CHUNK and chunk % SUB_CHUNK):
        raise ValueError(f"chunk size must be a power of two >= {MIN_BLOCK}; got {chunk}")


# ------------------------------------------------------------------ ahead-of-time builds

_FWD_ARGS = ["u", "kx", "vy", "gx", "gy", "extra", "h0", "out", "ht", "ckpt", "cu_seqlens",
             "chunk_offsets", "T", "H", "NTOK"]
_DH_ARGS = ["u", "gx", "gy", "do", "dht", "dckpt", "dh0", "cu_seqlens", "chunk_offsets", "T", "H",
            "NTOK"]
_BWD_X_ARGS = ["u", "kx", "vy", "gx", "gy", "ckpt", "dckpt", "do", "dux", "dgx", "chunk_bounds",
               "H", "NTOK"]
_BWD_Y_ARGS = ["u", "kx", "vy", "gx", "gy", "ckpt", "dckpt", "do", "dvy", "dgy", "chunk_bounds",
               "H", "NTOK"]


def _arg_types(names) -> dict:
    from .aot import DATA
    ints = {"T": "i32", "H": "i32", "NTOK": "i64"}
    index = {"cu_seqlens": "*i64", "chunk_offsets": "*i64", "chunk_bounds": "*i64"}
    data = {"h0"}  # the caller's initial state; everything else is fp32 (prologue, buffers)
    return {n: ints.get(n) or index.get(n) or (DATA if n in data else "*fp32") for n in names}


def aot_module(shape: PassShape, name: str = "pass", precision: Precision | None = None) -> GeneratedModule:
    """The kernels of one pass as ``recdsl.codegen.aot`` builds them (every flag on: initial
    and final states, extra terms, checkpoints, packed sequences), their products in
    ``precision``'s formats (default the "auto" policy for fp32 inputs on a GPU)."""
    import torch

    from .aot import GeneratedModule, KernelEntry
    from .precision import resolve
    p = precision or resolve("auto", torch.float32, interpreted=False)
    fwd = KernelEntry("chunk_fwd", _arg_types(_FWD_ARGS),
                      shape.constexprs(USE_INITIAL=True, HAS_EXTRA=True, STORE_CKPT=True,
                                       IS_VARLEN=True, **precision_flags("chunk_fwd", p)),
                      shape.num_warps, variant=f"{name} forward", dots=_dots("chunk_fwd", p))
    ce = shape.constexprs(**precision_flags("chunk_bwd_x", p))
    dh = KernelEntry("chunk_bwd_dh", _arg_types(_DH_ARGS),
                     {k: v for k, v in shape.constexprs().items() if k != "EXACT"}
                     | dict(USE_FINAL_GRAD=True, IS_VARLEN=True, **precision_flags("chunk_bwd_dh", p)),
                     shape.num_warps, variant=f"{name} backward: state gradient",
                     dots=_dots("chunk_bwd_dh", p))
    side = {k: v for k, v in ce.items() if k != "TRANSPOSED"}
    chunk = _dots("chunk_bwd_x", p)
    bq = KernelEntry("chunk_bwd_x", _arg_types(_BWD_X_ARGS), side | dict(SIDE=0),
                     shape.num_warps, variant=f"{name} backward: u", dots=chunk)
    bk = KernelEntry("chunk_bwd_x", _arg_types(_BWD_X_ARGS), side | dict(SIDE=1),
                     shape.num_warps, variant=f"{name} backward: kx", dots=chunk)
    by = KernelEntry("chunk_bwd_y", _arg_types(_BWD_Y_ARGS), side | dict(SIDE=0),
                     shape.num_warps, variant=f"{name} backward: vy", dots=chunk)
    bo = KernelEntry("chunk_bwd_y", _arg_types(_BWD_Y_ARGS), side | dict(SIDE=1),
                     shape.num_warps, variant=f"{name} backward: o (Y decays)", dots=chunk)
    decays = [KernelEntry("chunk_decays", {"g": "*fp32", "out": "*fp32", "cu_seqlens": "*i64",
                                           "T": "i32", "H": "i32", "NTOK": "i64"},
                          dict(D=d, BD=column_block(d), BT=shape.chunk, BC=shape.bc, IS_VARLEN=True),
                          4, variant=f"{name} decay sums ({axis})")
              for axis, d, kind in (("X", shape.dx if shape.gx == CHANNEL else 1, shape.gx),
                                    ("Y", shape.dy, shape.gy)) if kind]
    kernels = [fwd, dh, bq, bk, by] + ([bo] if shape.gy else []) + decays
    return GeneratedModule("chunk-diagonal", "chunk_diagonal.py", SOURCE, kernels)


# ================================================================== from a rule to passes
#
# A rule of the diagonal family becomes stages of (prologue, passes). Stage 0's prologue
# evaluates, per token and from the rule's inputs and params, every quantity its passes need;
# a later stage's prologue also takes the read values of earlier passes as inputs (Raven:
# stage 1 computes p = softmax(Sk @ q) from pass 1's output, for pass 2's read vector).


class Unsupported(Exception):
    """This rule has a form the diagonal chunk kernels do not take (the message says why)."""


@dataclass
class PassPlan:
    """One pass: a state, read along one side, with one of its writes."""
    index: int
    stage: int
    state: str
    x_dim: str  # the contracted axis
    y_dim: str  # the returned axis
    gx: int  # NONE, SCALAR or CHANNEL
    gy: int  # NONE or CHANNEL
    transposed: bool  # a read S @ u: the kernel works on Sᵀ
    u: str  # quantity names in the stage's prologue
    kx: str
    vy: str
    gx_value: Optional[str] = None
    gy_value: Optional[str] = None
    extra: Optional[str] = None
    initial: bool = False  # takes the state's initial value (the state's first write)
    final: bool = False  # its final state is a part of the state's final value

    def shape(self, sizes: dict, chunk: int, caps=None) -> PassShape:
        """The kernels' shape at these sizes; ``caps`` (BX, BV) overrides the tile caps."""
        extra = dict(block_x=caps[0], block_y=caps[1]) if caps else {}
        return PassShape(sizes[self.x_dim], sizes[self.y_dim], self.gx, self.gy, self.transposed,
                         chunk, **extra)


@dataclass
class Stage:
    """A token-parallel prologue and the passes that use its quantities."""
    index: int
    values: dict = field(default_factory=dict)  # quantity name -> expression
    reads_in: list = field(default_factory=list)  # read values of earlier stages it takes
    passes: list = field(default_factory=list)


@dataclass
class DiagonalPlan:
    rule: CheckedRule
    stages: list
    read_dims: dict  # read value name -> dims (inputs of later stages)
    read_passes: dict  # read value name -> pass indices summed into it
    outputs: dict  # output name -> pass indices summed into it ([] when it reads no state)
    output_extra: dict  # output name -> quantity added to it outside the kernels (rare)
    finals: dict  # state name -> pass indices summed into its final value
    lets: dict  # the state-free lets the quantities use by name

    @property
    def passes(self) -> list:
        return [p for st in self.stages for p in st.passes]

    def stage_rule(self, stage: Stage) -> CheckedRule:
        """The rule with the read values a stage takes declared as inputs."""
        extra = tuple(Var(n, tuple(self.read_dims[n]), "input") for n in stage.reads_in)
        return dataclasses.replace(self.rule, inputs=self.rule.inputs + extra)


@dataclass
class _StateForm:
    """One state's decays and writes, per token."""
    scalar: list  # log-decays (expressions), the whole state
    rows: list  # log-decays [R]
    cols: list  # log-decays [C]
    writes: list  # (left [R], right [C]) with coefficients and later decays folded in


_AT = ast.Pos(0, 0)


def _binop(op, a, b, shape):
    return ast.BinOp(op, a, b, _AT, _AT, shape=shape)


def _total(items, shape):
    value = items[0]
    for item in items[1:]:
        value = _binop("+", value, item, shape)
    return value


def _scaled(vector, factors):
    """``vector * exp(sum of log-factors)`` (a vector's own shape)."""
    if not factors:
        return vector
    scale = ast.Call("exp", [_total(factors, factors[0].shape)], _AT, shape=factors[0].shape)
    return _binop("*", scale, vector, vector.shape)


def _state_form(sa, resolve, lets) -> _StateForm:
    form = _StateForm([], [], [], [])
    pending = []  # per write: [coef * left, right, later scalar, later rows, later cols]
    for step in sa.steps:
        if step.loop is not None:
            raise Unsupported(f"the update of {sa.name} inside a for block is not supported "
                              f"chunkwise")
        for f in step.factors:
            if f.kind == "identity":
                continue
            if f.kind == "scalar" and f.coef is not None and f.coef.sign < 0:
                raise Unsupported(f"the decay {_text(f.node)} of {sa.name} is negative; the chunk "
                                  f"kernels take decays in log space")
            log = resolve(_log_of(f.decay, lets))
            slot = {"scalar": 2, "rows": 3, "cols": 4}[f.kind]
            {"scalar": form.scalar, "rows": form.rows, "cols": form.cols}[f.kind].append(log)
            for w in pending:
                w[slot].append(log)
        for w in step.writes:
            pending.append([resolve(w.coef.scaled(w.left)), resolve(w.right), [], [], []])
    for left, right, scalar, rows, cols in pending:
        form.writes.append((_scaled(_scaled(left, rows), scalar), _scaled(right, cols)))
    if not form.writes:
        raise Unsupported(f"state {sa.name} is never written")
    return form


def _text(node) -> str:
    from ..ir.pretty import unparse
    return unparse(node)


def _log_of(e, lets: dict):
    """log(e) as an expression, in log space where the rule allows it (``log(exp(x))`` is
    ``x``, through lets: Raven's ``lam``): a per-token decay never has to be formed first."""
    if isinstance(e, ast.Name) and e.kind == "let" and e.id in lets:
        inner = _log_of(lets[e.id], lets)
        return e if inner is None else inner
    if isinstance(e, ast.Call) and e.fn == "exp":
        return e.args[0]
    if isinstance(e, ast.BinOp) and e.op in "*/" and (e.left.shape == () or e.right.shape == ()
                                                      or e.left.shape == e.right.shape):
        a, b = _log_of(e.left, lets), _log_of(e.right, lets)
        return _binop("+" if e.op == "*" else "-", a, b, e.shape)
    if isinstance(e, ast.Num):
        if e.value <= 0:
            raise Unsupported(f"the decay {e.text} is not positive")
        return _num(math.log(e.value))
    return ast.Call("log", [e], _AT, shape=e.shape)


def plan(rule) -> DiagonalPlan:
    """The stages and passes of a ``Rule`` of the diagonal family (raises Unsupported)."""
    if rule.family != "diagonal":
        raise Unsupported(f"rule '{rule.name}' is in the {rule.family} family, not diagonal")
    analysis, ir = rule.analysis, rule.ir
    lets = {st.name: st.value for st in ir.body if isinstance(st, ast.Let)}  # outside for blocks
    chained = {rv.name for rv in analysis.reads if rv.kind == "let"}
    # lets that read no state stay names (lowered once per stage); the others are inlined
    free_lets = {n: e for n, e in lets.items() if not _reads_state(e, lets)}
    read_names = {}  # id(read node) -> read value name
    read_stage = {}  # read value name -> stage of its passes
    used = {v.name for v in ir.inputs + ir.params + ir.states + ir.outputs} | set(_all_lets(ir.body))

    def fresh(i):
        name = f"read{i}"
        while name in used:
            name += "_"
        used.add(name)
        return name

    def resolve(e):
        """``e`` with lets inlined and reads of earlier passes replaced by their values."""
        if id(e) in read_names:
            return ast.Name(read_names[id(e)], _AT, shape=e.shape, kind="input")
        if isinstance(e, ast.Name):
            if e.kind == "let" and e.id in free_lets:
                return e
            if e.kind == "let" and e.id in lets:
                return resolve(lets[e.id])
            if e.kind == "let":
                raise Unsupported(f"{e.id} is bound inside a for block; the chunk kernels need it "
                                  f"per token")
            if e.kind == "state":
                raise Unsupported(f"state {e.id} is used where a per-token value is needed")
            return e
        if isinstance(e, ast.Index):
            if not isinstance(e.index, ast.Num):
                raise Unsupported("indexing inside a for block is not supported chunkwise")
            return e
        if isinstance(e, ast.Num):
            return e
        if isinstance(e, ast.Neg):
            return ast.Neg(resolve(e.operand), e.pos, e.shape)
        if isinstance(e, ast.BinOp):
            return ast.BinOp(e.op, resolve(e.left), resolve(e.right), e.pos, e.start, e.shape)
        if isinstance(e, ast.Call):
            return ast.Call(e.fn, [resolve(a) for a in e.args], e.pos, e.shape)
        raise AssertionError(e)

    def reads_of(e) -> set:
        names = set()
        for n in _walk(e):
            if isinstance(n, ast.Name) and n.id in read_stage:
                names.add(n.id)
        return names

    forms = {name: _state_form(sa, resolve, free_lets) for name, sa in analysis.states.items()}
    stages, passes = [], []
    finals = {}

    where = {}  # quantity name -> its stage

    def add(expr) -> str:
        """The quantity holding ``expr`` (one per distinct expression), in the first stage
        that has the read values it needs."""
        for name, st in where.items():
            if same_expr(stages[st].values[name], expr):
                return name
        deps = reads_of(expr)
        i = 1 + max((read_stage[n] for n in deps), default=-1)
        while len(stages) <= i:
            stages.append(Stage(len(stages)))
        st = stages[i]
        st.reads_in += [n for n in sorted(deps) if n not in st.reads_in]
        name = f"q{len(where)}"
        st.values[name] = expr
        where[name] = i
        return name

    def add_passes(state, side, u) -> list:
        """Passes reading ``state`` with vector ``u`` (resolved), one per write."""
        form = forms[state]
        var = ir.var(state)
        rows, cols = var.dims
        left = side == "left"
        x_dim, y_dim = (rows, cols) if left else (cols, rows)
        x_logs, y_logs = (form.rows, form.cols) if left else (form.cols, form.rows)
        if x_logs:
            gx = _total(x_logs + form.scalar, (x_dim,)) if form.scalar else _total(x_logs, (x_dim,))
            gx_kind = CHANNEL
        elif form.scalar:
            gx, gx_kind = _total(form.scalar, ()), SCALAR
        else:
            gx, gx_kind = None, NONE
        gy = _total(y_logs, (y_dim,)) if y_logs else None
        first = state not in finals
        made = []
        for w, (a, b) in enumerate(form.writes):
            names = dict(u=add(u), kx=add(a if left else b), vy=add(b if left else a),
                         gx_value=add(gx) if gx is not None else None,
                         gy_value=add(gy) if gy is not None else None)
            st = stages[max(where[n] for n in names.values() if n is not None)]
            p = PassPlan(len(passes), st.index, state, x_dim, y_dim, gx_kind,
                         CHANNEL if gy is not None else NONE, not left, **names,
                         initial=w == 0, final=first)
            passes.append(p)
            st.passes.append(p)
            made.append(p)
        if first:
            finals[state] = [p.index for p in made]
        return made

    read_dims, read_passes, outputs, output_extra = {}, {}, {}, {}
    for rv in analysis.reads:
        if rv.problem is not None:
            raise Unsupported(rv.problem.message)
        if rv.kind == "let":
            for r in rv.reads:
                if id(r.node) in read_names:
                    continue
                made = add_passes(r.state, r.side, resolve(r.vector))
                name = fresh(len(read_dims))
                read_names[id(r.node)] = name
                read_stage[name] = made[0].stage
                read_dims[name] = tuple(r.node.shape)
                read_passes[name] = [p.index for p in made]
            continue
        if not rv.linear:
            raise Unsupported(f"output {rv.name} is not a linear read of the states")
        made = []
        for t in rv.terms:
            made += add_passes(t.read.state, t.read.side, resolve(t.coef.scaled(t.read.vector)))
        outputs[rv.name] = [p.index for p in made]
        if rv.extra is not None:
            extra = add(resolve(rv.extra))
            if made and where[extra] <= made[0].stage:
                made[0].extra = extra
            else:  # no read to fuse it into (or it needs later reads): added by the runtime
                output_extra[rv.name] = extra
    for name, sa in analysis.states.items():
        if name not in finals:  # never read: one pass for its final value, reading nothing
            rows, _ = sa.var.dims
            left0 = forms[name].writes[0][0]
            add_passes(name, "left", _binop("*", _num(0.0), left0, (rows,)))
    return DiagonalPlan(ir, stages, read_dims, read_passes, outputs, output_extra, finals,
                        free_lets)


def _all_lets(body):
    for st in body:
        if isinstance(st, ast.Let):
            yield st.name
        elif isinstance(st, ast.For):
            yield from _all_lets(st.body)


def _reads_state(e, lets) -> bool:
    for n in _walk(e):
        if isinstance(n, ast.Name) and (n.kind == "state" or (
                n.kind == "let" and n.id in lets and _reads_state(lets[n.id], lets))):
            return True
    return False


def lower_stage(rule: CheckedRule, dim_sizes: dict, values: dict, lets: dict):
    """A program computing a stage's quantities: the state-free lets they use (each once, in
    source order), then the quantities (``ssa.lower_values`` with lets kept as lets)."""
    needed, todo = set(), list(values.values())
    while todo:
        for n in _walk(todo.pop()):
            if isinstance(n, ast.Name) and n.kind == "let" and n.id not in needed:
                needed.add(n.id)
                todo.append(lets[n.id])
    low = _Lowering(rule, dict(dim_sizes))
    env = low.bind_sources(states=False)
    for name, e in lets.items():  # source order
        if name in needed:
            env[name] = low.materialize(low.expr(e, env), f"let_{name}")
    for name, e in values.items():
        low.program.outputs[name] = low.materialize(low.expr(e, env), f"val_{name}")
    return low.program


def _walk(e):
    yield e
    if isinstance(e, ast.BinOp):
        yield from _walk(e.left)
        yield from _walk(e.right)
    elif isinstance(e, ast.Neg):
        yield from _walk(e.operand)
    elif isinstance(e, ast.Call):
        for a in e.args:
            yield from _walk(a)


def problem(rule) -> Optional[str]:
    """Why the diagonal chunk kernels cannot run ``rule``, or None."""
    try:
        plan(rule)
    except Unsupported as e:
        return str(e)
    return None


# ================================================================== the generated prologue


@dataclass
class PrologueSpec:
    """The generated stage kernels of a rule: names, argument lists and which gradients exist."""
    rule_name: str
    source: str
    stages: list  # per stage: dict with forward/backward names, inputs, grad flags


class _StagePrologue(_PrologueGenerator):
    """One stage's token-parallel kernels: the quantities (forward) and their adjoint (the
    gradients of the rule's inputs, params and the read values the stage takes). Reuses the
    delta prologue's kernel header, slots, loads and stores; its quantities are one buffer
    each, ``[tokens, H, *dims]``."""

    def __init__(self, rule: CheckedRule, dim_sizes: dict, values: dict, lets: dict, name: str):
        self.rule = rule
        self.sizes = dict(dim_sizes)
        self.blocks = {d: triton.next_power_of_2(n) for d, n in self.sizes.items()}
        self.values = values
        self.name = name
        self.forward = lower_stage(rule, self.sizes, values, lets)
        self.adjoint = adjoint(self.forward)

    def quantity_dims(self, name) -> tuple:
        return tuple(self.values[name].shape)

    def _quantities(self):
        return [(n, n, 1, 0, self.quantity_dims(n)) for n in self.values]

    def _buffer_names(self) -> list:
        return list(self.values)

    def _kernel_name(self, direction: str) -> str:
        return f"{self.name}_{direction}"

    def info(self) -> dict:
        adj = self.adjoint
        return dict(forward=f"{self.name}_fwd", backward=f"{self.name}_bwd",
                    inputs=[v.name for v in self.rule.inputs],
                    values={n: self.quantity_dims(n) for n in self.values},
                    grad_inputs={v.name: any(adj.grad_inputs.get(k) is not None
                                             for k in adj.program.inputs if k[0] == v.name)
                                 for v in self.rule.inputs},
                    grad_params={v.name: adj.grad_params.get(v.name) is not None
                                 for v in self.rule.params})


def generate_prologue(rule, dim_sizes: dict, the_plan: Optional[DiagonalPlan] = None) -> PrologueSpec:
    """The prologue kernels of every stage of ``rule`` (a ``Rule``) at these sizes."""
    the_plan = the_plan or plan(rule)
    sizes = {d: dim_sizes[d] for d in rule.ir.dims}
    lines, infos = [], []
    for st in the_plan.stages:
        gen = _StagePrologue(the_plan.stage_rule(st), sizes, st.values, the_plan.lets,
                             f"{_ident(rule.name)}_stage{st.index}")
        _, fwd = gen.forward_kernel()
        _, bwd = gen.backward_kernel()
        lines += fwd + ["", ""] + bwd + ["", ""]
        infos.append(gen.info())
    header = [
        f'"""Chunk-kernel prologue (diagonal family) for rule {rule.name}, generated by recdsl.',
        f"Dims: {', '.join(f'{d}={n}' for d, n in sizes.items())}.",
        '"""',
        "import triton",
        "import triton.language as tl",
        "",
    ]
    blocks = [f"{block(d)} = tl.constexpr({max(1, triton.next_power_of_2(n))})"
              for d, n in sizes.items()]
    source = "\n".join(header + blocks + [TOPK_HELPER, ""] + lines) + "\n"
    return PrologueSpec(rule.name, source, infos)
