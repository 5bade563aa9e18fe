"""The chunkwise Triton core of the DPLR family: a fixed template, forward and backward.

It runs the canonical row form of ``recdsl.runtime.torch_chunk_dplr`` (see its docstring):
per row (a sub-step; ``recdsl.runtime.chunk_dplr`` lays a rule's sub-steps, extra writes and
extra reads out as rows)

    S <- Diag(exp(g)) S + a (bᵀ S) + x yᵀ,          then the read  o = Sᵀ q  (q = 0: no read)

with S [K, V] fp32. A chunk is L rows (a power of two, >= 16). With S0 the state entering it,
γ_i = g_0 + .. + g_i, and e_i = b_iᵀ S_{i-1}:

    A_ab[i, j] = sum_c b_ic a_jc exp(g_{j+1} + .. + g_{i-1})_c   (j < i), A_bx likewise with x,
    Q_a[t, j]  = sum_c q_tc a_jc exp(g_{j+1} + .. + g_t)_c       (j <= t), Q_x likewise,
    B̃ = b ⊙ exp(γ_{i-1}),  Ã = a ⊙ exp(γ_L - γ_j),  X̃ = x ⊙ exp(γ_L - γ_j),  Q̃ = q ⊙ exp(γ_t),
    T  = (I - A_ab)^{-1},   E = T (B̃ S0 + A_bx Y),
    O  = Q̃ S0 + Q_a E + Q_x Y,   S_L = exp(γ_L) ⊙ S0 + Ãᵀ E + X̃ᵀ Y.

Numerics. Every exponent is a span sum of the rows' log-decays, summed from the span's start
(running sums walked column by column, never a difference of two cumulative sums: a gate of
-1e4 next to mild ones loses no precision), masked before ``exp`` where the span is empty or
reversed, so that for decays <= 1 no exponent is positive and no entry of a row depends on a
later row's gate. The pairwise form is exact for any gate (0, -1e4, mixed; decays above 1
too, as far as fp32 holds them): there are no reference points to overflow. T is a forward
substitution in fp32 registers (chunk_delta's ``_solve``). Its cost is L column steps of
[L, K] element-wise work per chunk (the price of exactness without reference points).

Kernels (grids in brackets; Z = sequences x heads, every chunk of every sequence stored
[NC, Z, L, *], NC the chunks of the longest sequence, shorter ones padded with identity rows),
each holding few large tiles so that they build without register spills (K and V walked in
tiles BKT, BV; the walks carry the state through its per-chunk store, tile by tile, as
chunk_delta's do):
  forward   prepare  [chunk, z]          T, A_bx, Q_a, Q_x; B̃, Ã, X̃, Q̃, exp(γ_L)
            fwd_h    [z, V tile]         the walk: entry states, W, E, outputs, final state
  backward  bwd_dh   [z, V tile]         the walk back: dS_L per chunk, dE, dW, dS0
            bwd_dv   [chunk, z, V tile]  dY = Q_xᵀ dO + X̃ dS_L + A_bxᵀ dW
            bwd_dm   [chunk, z]          the [L, L] gradients; dA_ab = Tᵀ (dE Wᵀ) Tᵀ
            bwd_dk   [chunk, z, K tile]  dB̃, dÃ, dX̃, dQ̃, d exp(γ_L) from the states, then the
                                         chain rule to g, a, b, x, q (the same span walk)

``DOT`` is the input precision of the products: "ieee" under the interpreter, "tf32x3" on a
GPU (one constexpr, so a precision policy can set it). The solve and the span sums never use a
tensor-core product.
"""
from __future__ import annotations

import triton
import triton.language as tl

from recdsl.codegen.chunk_delta import _solve  # (I + M)^{-1}, forward substitution in fp32


# ------------------------------------------------------------------ shared pieces


@triton.jit
def _rows_tile(ptr, base, o_l, o_k, m_k, KD: tl.constexpr):
    """A chunk's [L, tile] rows of a [.., L, KD] buffer (``base``: the chunk's first element)."""
    return tl.load(ptr + base + o_l[:, None] * KD + o_k[None, :], mask=m_k[None, :], other=0.0)


@triton.jit
def _put_rows(ptr, base, o_l, o_k, m_k, KD: tl.constexpr, value):
    tl.store(ptr + base + o_l[:, None] * KD + o_k[None, :], value, mask=m_k[None, :])


@triton.jit
def _square(ptr, base, L: tl.constexpr):
    o_l = tl.arange(0, L)
    return tl.load(ptr + base + o_l[:, None] * L + o_l[None, :])


@triton.jit
def _put_square(ptr, base, L: tl.constexpr, value):
    o_l = tl.arange(0, L)
    tl.store(ptr + base + o_l[:, None] * L + o_l[None, :], value)


@triton.jit
def _decays(g, base, o_k, m_k, KD: tl.constexpr, L: tl.constexpr):
    """The chunk's exponents on a K tile, as running sums of rows (no differences):
    γ_t (through row t), γ_{i-1} (before row i), the suffix after row j, and γ_L."""
    o_l = tl.arange(0, L)
    g_t = _rows_tile(g, base, o_l, o_k, m_k, KD)
    g_prev = tl.load(g + base + (o_l[:, None] - 1) * KD + o_k[None, :],
                     mask=(o_l[:, None] >= 1) & m_k[None, :], other=0.0)
    g_next = tl.load(g + base + (o_l[:, None] + 1) * KD + o_k[None, :],
                     mask=(o_l[:, None] + 1 < L) & m_k[None, :], other=0.0)
    return (tl.cumsum(g_t, axis=0), tl.cumsum(g_prev, axis=0),
            tl.cumsum(g_next, axis=0, reverse=True), tl.sum(g_t, axis=0))


@triton.jit
def _spans(g, base, j, o_k, m_k, acc_a, acc_q, KD: tl.constexpr, L: tl.constexpr):
    """One step of the column walk (j from L - 1 down to 0): the span sums of column j,
    acc_a[i] = g_{j+1} + .. + g_{i-1} (rows i > j) and acc_q[t] = g_{j+1} + .. + g_t (t >= j),
    each the previous column's plus g_{j+1}; and their decays, 0 outside the spans."""
    o_l = tl.arange(0, L)
    g_n = tl.load(g + base + (j + 1) * KD + o_k, mask=m_k & (o_k * 0 + j + 1 < L), other=0.0)
    acc_a = tl.where(o_l[:, None] > j + 1, acc_a + g_n[None, :], 0.0)
    acc_q = tl.where(o_l[:, None] > j, acc_q + g_n[None, :], 0.0)
    in_a = o_l[:, None] > j
    in_q = o_l[:, None] >= j
    dec_a = tl.where(in_a, tl.exp(tl.where(in_a, acc_a, 0.0)), 0.0)
    dec_q = tl.where(in_q, tl.exp(tl.where(in_q, acc_q, 0.0)), 0.0)
    return acc_a, acc_q, dec_a, dec_q


@triton.jit
def _column(m, j, L: tl.constexpr):
    """Column j of an [L, L] matrix held in registers."""
    o_l = tl.arange(0, L)
    return tl.sum(tl.where(o_l[None, :] == j, m, 0.0), axis=1)


# ------------------------------------------------------------------ forward


@triton.jit
def chunk_dplr_prepare(g, a, b, x, q, t_out, abx, qa, qx, bt, at, xt, qt, dl, Z,
                       KD: tl.constexpr, L: tl.constexpr, BKT: tl.constexpr):
    i_c, i_z = tl.program_id(0), tl.program_id(1)
    cz = tl.cast(i_c, tl.int64) * Z + i_z
    base, sbase = cz * L * KD, cz * L * L
    o_l = tl.arange(0, L)
    cols = o_l[None, :]
    a_ab = tl.zeros([L, L], dtype=tl.float32)
    a_bx = tl.zeros([L, L], dtype=tl.float32)
    q_a = tl.zeros([L, L], dtype=tl.float32)
    q_x = tl.zeros([L, L], dtype=tl.float32)
    for k0 in range(0, KD, BKT):
        o_k = k0 + tl.arange(0, BKT)
        m_k = o_k < KD
        gam, gpre, suf, tot = _decays(g, base, o_k, m_k, KD, L)
        b_t = _rows_tile(b, base, o_l, o_k, m_k, KD)
        q_t = _rows_tile(q, base, o_l, o_k, m_k, KD)
        e_suf = tl.exp(suf)
        _put_rows(bt, base, o_l, o_k, m_k, KD, b_t * tl.exp(gpre))
        _put_rows(at, base, o_l, o_k, m_k, KD, _rows_tile(a, base, o_l, o_k, m_k, KD) * e_suf)
        _put_rows(xt, base, o_l, o_k, m_k, KD, _rows_tile(x, base, o_l, o_k, m_k, KD) * e_suf)
        _put_rows(qt, base, o_l, o_k, m_k, KD, q_t * tl.exp(gam))
        tl.store(dl + cz * KD + o_k, tl.exp(tot), mask=m_k)
        acc_a = tl.zeros([L, BKT], dtype=tl.float32)
        acc_q = tl.zeros([L, BKT], dtype=tl.float32)
        for jj in range(L):
            j = L - 1 - jj
            acc_a, acc_q, dec_a, dec_q = _spans(g, base, j, o_k, m_k, acc_a, acc_q, KD, L)
            a_j = tl.load(a + base + j * KD + o_k, mask=m_k, other=0.0)[None, :]
            x_j = tl.load(x + base + j * KD + o_k, mask=m_k, other=0.0)[None, :]
            bd, qd = b_t * dec_a, q_t * dec_q
            col = cols == j
            a_ab += tl.where(col, tl.sum(bd * a_j, axis=1)[:, None], 0.0)
            a_bx += tl.where(col, tl.sum(bd * x_j, axis=1)[:, None], 0.0)
            q_a += tl.where(col, tl.sum(qd * a_j, axis=1)[:, None], 0.0)
            q_x += tl.where(col, tl.sum(qd * x_j, axis=1)[:, None], 0.0)
    _put_square(t_out, sbase, L, _solve(-a_ab, L))
    _put_square(abx, sbase, L, a_bx)
    _put_square(qa, sbase, L, q_a)
    _put_square(qx, sbase, L, q_x)


@triton.jit
def chunk_dplr_fwd_h(y, t_in, abx, qa, qx, bt, at, xt, qt, dl, h0, o, wv, ev, states, ht, NC, Z,
                     KD: tl.constexpr, VD: tl.constexpr, L: tl.constexpr, BKT: tl.constexpr,
                     BV: tl.constexpr, DOT: tl.constexpr, USE_INITIAL: tl.constexpr):
    """The walk over the chunks for one V tile: per chunk W = B̃ S0 + A_bx Y, E = T W (both
    stored for the backward), the outputs, the next state. The state entering chunk c is
    states[c], carried there K tile by K tile (the next chunk's written from it; the last
    state to ht): no [K, V] state lives in registers."""
    i_z, i_v = tl.program_id(0), tl.program_id(1)
    o_l = tl.arange(0, L)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < VD
    zk = tl.cast(i_z, tl.int64) * KD * VD
    step = tl.cast(Z, tl.int64) * KD * VD  # from one chunk's state to the next's
    for k0 in tl.range(0, KD, BKT, num_stages=1):
        o_k = k0 + tl.arange(0, BKT)
        m_s = (o_k < KD)[:, None] & m_v[None, :]
        offs = o_k[:, None] * VD + o_v[None, :]
        if USE_INITIAL:
            s = tl.load(h0 + zk + offs, mask=m_s, other=0.0)
        else:
            s = tl.zeros([BKT, BV], dtype=tl.float32)
        tl.store(states + zk + offs, s, mask=m_s)
    tl.debug_barrier()
    for c in tl.range(NC, num_stages=1):
        cz = tl.cast(c, tl.int64) * Z + i_z
        kbase, vbase, sbase, cur = cz * L * KD, cz * L * VD, cz * L * L, cz * KD * VD
        y_t = _rows_tile(y, vbase, o_l, o_v, m_v, VD)
        w = tl.dot(_square(abx, sbase, L), y_t, input_precision=DOT)
        out = tl.dot(_square(qx, sbase, L), y_t, input_precision=DOT)
        for k0 in tl.range(0, KD, BKT, num_stages=1):
            o_k = k0 + tl.arange(0, BKT)
            m_k = o_k < KD
            s = tl.load(states + cur + o_k[:, None] * VD + o_v[None, :],
                        mask=m_k[:, None] & m_v[None, :], other=0.0)
            w += tl.dot(_rows_tile(bt, kbase, o_l, o_k, m_k, KD), s, input_precision=DOT)
            out += tl.dot(_rows_tile(qt, kbase, o_l, o_k, m_k, KD), s, input_precision=DOT)
        e = tl.dot(_square(t_in, sbase, L), w, input_precision="ieee")
        _put_rows(wv, vbase, o_l, o_v, m_v, VD, w)
        _put_rows(ev, vbase, o_l, o_v, m_v, VD, e)
        _put_rows(o, vbase, o_l, o_v, m_v, VD,
                  out + tl.dot(_square(qa, sbase, L), e, input_precision=DOT))
        for k0 in tl.range(0, KD, BKT, num_stages=1):
            o_k = k0 + tl.arange(0, BKT)
            m_k = o_k < KD
            m_s = m_k[:, None] & m_v[None, :]
            offs = o_k[:, None] * VD + o_v[None, :]
            d = tl.load(dl + cz * KD + o_k, mask=m_k, other=0.0)
            s = (d[:, None] * tl.load(states + cur + offs, mask=m_s, other=0.0)
                 + tl.dot(tl.trans(_rows_tile(at, kbase, o_l, o_k, m_k, KD)), e,
                          input_precision=DOT)
                 + tl.dot(tl.trans(_rows_tile(xt, kbase, o_l, o_k, m_k, KD)), y_t,
                          input_precision=DOT))
            if c + 1 < NC:
                tl.store(states + cur + step + offs, s, mask=m_s)
            else:
                tl.store(ht + zk + offs, s, mask=m_s)
        tl.debug_barrier()


# ------------------------------------------------------------------ backward


@triton.jit
def chunk_dplr_bwd_dh(t_in, qa, bt, at, qt, dl, do, dht, dwv, dev, dstates, dh0, NC, Z,
                      KD: tl.constexpr, VD: tl.constexpr, L: tl.constexpr, BKT: tl.constexpr,
                      BV: tl.constexpr, DOT: tl.constexpr, USE_FINAL_GRAD: tl.constexpr):
    """The walk back, dS_L the gradient of a chunk's exit state (dstates[c], carried there K
    tile by K tile as the forward walk carries S): dE = Q_aᵀ dO + Ã dS_L, dW = Tᵀ dE (both
    stored), dS0 = Q̃ᵀ dO + exp(γ_L) ⊙ dS_L + B̃ᵀ dW (to the previous chunk, or dh0)."""
    i_z, i_v = tl.program_id(0), tl.program_id(1)
    o_l = tl.arange(0, L)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < VD
    zk = tl.cast(i_z, tl.int64) * KD * VD
    step = tl.cast(Z, tl.int64) * KD * VD
    last = tl.cast(NC - 1, tl.int64) * step + zk
    for k0 in tl.range(0, KD, BKT, num_stages=1):
        o_k = k0 + tl.arange(0, BKT)
        m_s = (o_k < KD)[:, None] & m_v[None, :]
        offs = o_k[:, None] * VD + o_v[None, :]
        if USE_FINAL_GRAD:
            dh = tl.load(dht + zk + offs, mask=m_s, other=0.0)
        else:
            dh = tl.zeros([BKT, BV], dtype=tl.float32)
        tl.store(dstates + last + offs, dh, mask=m_s)
    tl.debug_barrier()
    for cc in tl.range(NC, num_stages=1):
        c = NC - 1 - cc
        cz = tl.cast(c, tl.int64) * Z + i_z
        kbase, vbase, sbase, cur = cz * L * KD, cz * L * VD, cz * L * L, cz * KD * VD
        do_t = _rows_tile(do, vbase, o_l, o_v, m_v, VD)
        de = tl.dot(tl.trans(_square(qa, sbase, L)), do_t, input_precision=DOT)
        for k0 in tl.range(0, KD, BKT, num_stages=1):
            o_k = k0 + tl.arange(0, BKT)
            m_k = o_k < KD
            dh = tl.load(dstates + cur + o_k[:, None] * VD + o_v[None, :],
                         mask=m_k[:, None] & m_v[None, :], other=0.0)
            de += tl.dot(_rows_tile(at, kbase, o_l, o_k, m_k, KD), dh, input_precision=DOT)
        dw = tl.dot(tl.trans(_square(t_in, sbase, L)), de, input_precision="ieee")
        _put_rows(dev, vbase, o_l, o_v, m_v, VD, de)
        _put_rows(dwv, vbase, o_l, o_v, m_v, VD, dw)
        for k0 in tl.range(0, KD, BKT, num_stages=1):
            o_k = k0 + tl.arange(0, BKT)
            m_k = o_k < KD
            m_s = m_k[:, None] & m_v[None, :]
            offs = o_k[:, None] * VD + o_v[None, :]
            d = tl.load(dl + cz * KD + o_k, mask=m_k, other=0.0)
            dh = (d[:, None] * tl.load(dstates + cur + offs, mask=m_s, other=0.0)
                  + tl.dot(tl.trans(_rows_tile(qt, kbase, o_l, o_k, m_k, KD)), do_t,
                           input_precision=DOT)
                  + tl.dot(tl.trans(_rows_tile(bt, kbase, o_l, o_k, m_k, KD)), dw,
                           input_precision=DOT))
            if c > 0:
                tl.store(dstates + cur - step + offs, dh, mask=m_s)
            else:
                tl.store(dh0 + zk + offs, dh, mask=m_s)
        tl.debug_barrier()


@triton.jit
def chunk_dplr_bwd_dv(abx, qx, xt, dstates, do, dwv, dy, Z,
                      KD: tl.constexpr, VD: tl.constexpr, L: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, DOT: tl.constexpr):
    """dY = Q_xᵀ dO + X̃ dS_L + A_bxᵀ dW on a V tile."""
    i_c, i_z, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cz = tl.cast(i_c, tl.int64) * Z + i_z
    kbase, vbase, sbase = cz * L * KD, cz * L * VD, cz * L * L
    o_l = tl.arange(0, L)
    o_k = tl.arange(0, BK)
    m_k = o_k < KD
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < VD
    dh = tl.load(dstates + cz * KD * VD + o_k[:, None] * VD + o_v[None, :],
                 mask=m_k[:, None] & m_v[None, :], other=0.0)
    _put_rows(dy, vbase, o_l, o_v, m_v, VD,
              tl.dot(tl.trans(_square(qx, sbase, L)), _rows_tile(do, vbase, o_l, o_v, m_v, VD),
                     input_precision=DOT)
              + tl.dot(_rows_tile(xt, kbase, o_l, o_k, m_k, KD), dh, input_precision=DOT)
              + tl.dot(tl.trans(_square(abx, sbase, L)), _rows_tile(dwv, vbase, o_l, o_v, m_v, VD),
                       input_precision=DOT))


@triton.jit
def chunk_dplr_bwd_dm(y, t_in, wv, ev, do, dwv, dev, d_aab, d_abx, d_qa, d_qx, Z,
                      VD: tl.constexpr, L: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr):
    """The [L, L] gradients, over V tiles: dQ_a = dO Eᵀ, dQ_x = dO Yᵀ, dA_bx = dW Yᵀ, and
    dA_ab = Tᵀ (dE Wᵀ) Tᵀ below the diagonal (T = (I - A_ab)^{-1})."""
    i_c, i_z = tl.program_id(0), tl.program_id(1)
    cz = tl.cast(i_c, tl.int64) * Z + i_z
    vbase, sbase = cz * L * VD, cz * L * L
    o_l = tl.arange(0, L)
    g_t = tl.zeros([L, L], dtype=tl.float32)
    g_abx = tl.zeros([L, L], dtype=tl.float32)
    g_qa = tl.zeros([L, L], dtype=tl.float32)
    g_qx = tl.zeros([L, L], dtype=tl.float32)
    for v0 in range(0, VD, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < VD
        y_t = tl.trans(_rows_tile(y, vbase, o_l, o_v, m_v, VD))
        do_t = _rows_tile(do, vbase, o_l, o_v, m_v, VD)
        dw = _rows_tile(dwv, vbase, o_l, o_v, m_v, VD)
        g_qa += tl.dot(do_t, tl.trans(_rows_tile(ev, vbase, o_l, o_v, m_v, VD)), input_precision=DOT)
        g_qx += tl.dot(do_t, y_t, input_precision=DOT)
        g_abx += tl.dot(dw, y_t, input_precision=DOT)
        g_t += tl.dot(_rows_tile(dev, vbase, o_l, o_v, m_v, VD),
                      tl.trans(_rows_tile(wv, vbase, o_l, o_v, m_v, VD)), input_precision="ieee")
    t = _square(t_in, sbase, L)
    g_aab = tl.dot(tl.trans(t), tl.dot(g_t, tl.trans(t), input_precision="ieee"),
                   input_precision="ieee")
    _put_square(d_aab, sbase, L, tl.where(o_l[:, None] > o_l[None, :], g_aab, 0.0))
    _put_square(d_abx, sbase, L, g_abx)
    _put_square(d_qa, sbase, L, g_qa)
    _put_square(d_qx, sbase, L, g_qx)


@triton.jit
def chunk_dplr_bwd_dk(g, a, b, x, q, y, ev, do, dwv, states, dstates, d_aab, d_abx, d_qa, d_qx,
                      dg, da, db, dx, dq, Z, KD: tl.constexpr, VD: tl.constexpr,
                      L: tl.constexpr, BKT: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr):
    """On one K tile: the gradients of B̃, Ã, X̃, Q̃ and exp(γ_L) (over V tiles: dB̃ = dW S0ᵀ,
    dÃ = E dS_Lᵀ, dX̃ = Y dS_Lᵀ, dQ̃ = dO S0ᵀ), then the chain rule to g, a, b, x, q. The
    exponents' gradients go to the log-decays of their spans: a pair (i, j) of A_ab / A_bx to
    j < k < i, of Q_a / Q_x to j < k <= t (reverse running sums of each column's terms)."""
    i_c, i_z, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cz = tl.cast(i_c, tl.int64) * Z + i_z
    base, vbase, sbase, zk = cz * L * KD, cz * L * VD, cz * L * L, cz * KD * VD
    o_l = tl.arange(0, L)
    o_k = i_k * BKT + tl.arange(0, BKT)
    m_k = o_k < KD
    g_bt = tl.zeros([L, BKT], dtype=tl.float32)
    g_at = tl.zeros([L, BKT], dtype=tl.float32)
    g_xt = tl.zeros([L, BKT], dtype=tl.float32)
    g_qt = tl.zeros([L, BKT], dtype=tl.float32)
    g_dl = tl.zeros([BKT], dtype=tl.float32)
    for v0 in range(0, VD, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < VD
        m_s = m_k[:, None] & m_v[None, :]
        s_offs = o_k[:, None] * VD + o_v[None, :]
        s = tl.trans(tl.load(states + zk + s_offs, mask=m_s, other=0.0))
        dh = tl.trans(tl.load(dstates + zk + s_offs, mask=m_s, other=0.0))
        g_qt += tl.dot(_rows_tile(do, vbase, o_l, o_v, m_v, VD), s, input_precision=DOT)
        g_bt += tl.dot(_rows_tile(dwv, vbase, o_l, o_v, m_v, VD), s, input_precision=DOT)
        g_at += tl.dot(_rows_tile(ev, vbase, o_l, o_v, m_v, VD), dh, input_precision=DOT)
        g_xt += tl.dot(_rows_tile(y, vbase, o_l, o_v, m_v, VD), dh, input_precision=DOT)
        g_dl += tl.sum(s * dh, axis=0)
    gam, gpre, suf, tot = _decays(g, base, o_k, m_k, KD, L)
    e_pre, e_suf, e_gam, e_tot = tl.exp(gpre), tl.exp(suf), tl.exp(gam), tl.exp(tot)
    a_t = _rows_tile(a, base, o_l, o_k, m_k, KD)
    b_t = _rows_tile(b, base, o_l, o_k, m_k, KD)
    x_t = _rows_tile(x, base, o_l, o_k, m_k, KD)
    q_t = _rows_tile(q, base, o_l, o_k, m_k, KD)
    d_b, d_a, d_x, d_q = g_bt * e_pre, g_at * e_suf, g_xt * e_suf, g_qt * e_gam
    # exponents: γ_{i-1} of B̃ (to k < i), the suffix of Ã, X̃ (to k > j), γ_t of Q̃ (k <= t)
    v_b = d_b * b_t
    v_a = d_a * a_t + d_x * x_t
    v_q = d_q * q_t
    d_g = (tl.cumsum(v_b, axis=0, reverse=True) - v_b + tl.cumsum(v_a, axis=0) - v_a
           + tl.cumsum(v_q, axis=0, reverse=True) + (g_dl * e_tot)[None, :])
    m_aab = _square(d_aab, sbase, L)
    m_abx = _square(d_abx, sbase, L)
    m_qa = _square(d_qa, sbase, L)
    m_qx = _square(d_qx, sbase, L)
    acc_a = tl.zeros([L, BKT], dtype=tl.float32)
    acc_q = tl.zeros([L, BKT], dtype=tl.float32)
    for jj in range(L):
        j = L - 1 - jj
        acc_a, acc_q, dec_a, dec_q = _spans(g, base, j, o_k, m_k, acc_a, acc_q, KD, L)
        a_j = tl.load(a + base + j * KD + o_k, mask=m_k, other=0.0)[None, :]
        x_j = tl.load(x + base + j * KD + o_k, mask=m_k, other=0.0)[None, :]
        c_ab = _column(m_aab, j, L)[:, None]
        c_bx = _column(m_abx, j, L)[:, None]
        c_qa = _column(m_qa, j, L)[:, None]
        c_qx = _column(m_qx, j, L)[:, None]
        r_a = dec_a * (c_ab * a_j + c_bx * x_j)  # d(row vector b_i) of the pairs (i, j)
        r_q = dec_q * (c_qa * a_j + c_qx * x_j)
        d_b += r_a
        d_q += r_q
        p_a = r_a * b_t  # the pairs' terms, to the log-decays of their spans
        p_q = r_q * q_t
        d_g += tl.where(o_l[:, None] > j, tl.cumsum(p_a + p_q, axis=0, reverse=True) - p_a, 0.0)
        bd, qd = dec_a * b_t, dec_q * q_t
        here = o_l[:, None] == j
        d_a += tl.where(here, tl.sum(bd * c_ab + qd * c_qa, axis=0)[None, :], 0.0)
        d_x += tl.where(here, tl.sum(bd * c_bx + qd * c_qx, axis=0)[None, :], 0.0)
    _put_rows(dg, base, o_l, o_k, m_k, KD, d_g)
    _put_rows(da, base, o_l, o_k, m_k, KD, d_a)
    _put_rows(db, base, o_l, o_k, m_k, KD, d_b)
    _put_rows(dx, base, o_l, o_k, m_k, KD, d_x)
    _put_rows(dq, base, o_l, o_k, m_k, KD, d_q)


# ------------------------------------------------------------------ launch configuration

ROWS = 16  # rows per chunk


def config(key_dim: int, value_dim: int, rows: int = ROWS, gpu: bool = True) -> dict:
    """The constexprs of every kernel at these sizes. On a GPU the K walks (prepare, bwd_dk)
    take tiles of 32 and V is walked in tiles of 32 (products on tensor cores at fp32 accuracy,
    tf32x3); under the interpreter one tile covers K or V and DOT is ieee."""
    bk = max(16, triton.next_power_of_2(key_dim))
    bv = max(16, triton.next_power_of_2(value_dim))
    return dict(KD=key_dim, VD=value_dim, L=max(16, triton.next_power_of_2(rows)), BK=bk,
                BKT=min(bk, 32) if gpu else bk, BV=min(bv, 32) if gpu else bv,
                DOT="tf32x3" if gpu else "ieee")


_PARAMS = {  # each kernel's constexprs (the rest of config is not its business)
    "chunk_dplr_prepare": ("KD", "L", "BKT"),
    "chunk_dplr_fwd_h": ("KD", "VD", "L", "BKT", "BV", "DOT"),
    "chunk_dplr_bwd_dh": ("KD", "VD", "L", "BKT", "BV", "DOT"),
    "chunk_dplr_bwd_dv": ("KD", "VD", "L", "BK", "BV", "DOT"),
    "chunk_dplr_bwd_dm": ("VD", "L", "BV", "DOT"),
    "chunk_dplr_bwd_dk": ("KD", "VD", "L", "BKT", "BV", "DOT"),
}


# fwd_h at 4 warps: ptxas held it to 128 registers on sm_90 and spilled 8 bytes (K = V = 128)
_WIDE = ("chunk_dplr_fwd_h",)


def num_warps(kernel: str, cfg: dict) -> int:
    return 8 if kernel in _WIDE else 4


def constexprs(kernel: str, cfg: dict) -> dict:
    return {k: cfg[k] for k in _PARAMS[kernel]}


_WITH_T = ("chunk_dplr_fwd_h", "chunk_dplr_bwd_dh", "chunk_dplr_bwd_dm")  # products with T: ieee
_P = "*fp32"
KERNELS = {  # pointer arguments, then the int arguments, and the variant built
    "chunk_dplr_prepare": ("g a b x q t_out abx qa qx bt at xt qt dl", "Z", {}),
    "chunk_dplr_fwd_h": ("y t_in abx qa qx bt at xt qt dl h0 o wv ev states ht", "NC Z",
                         {"USE_INITIAL": True}),
    "chunk_dplr_bwd_dh": ("t_in qa bt at qt dl do dht dwv dev dstates dh0", "NC Z",
                          {"USE_FINAL_GRAD": True}),
    "chunk_dplr_bwd_dv": ("abx qx xt dstates do dwv dy", "Z", {}),
    "chunk_dplr_bwd_dm": ("y t_in wv ev do dwv dev d_aab d_abx d_qa d_qx", "Z", {}),
    "chunk_dplr_bwd_dk": ("g a b x q y ev do dwv states dstates d_aab d_abx d_qa d_qx "
                          "dg da db dx dq", "Z", {}),
}


def aot_module(key_dim: int, value_dim: int, rows: int = ROWS):
    """This file's kernels as an ``aot.GeneratedModule`` for a build report at these sizes."""
    from pathlib import Path

    from . import aot
    cfg = config(key_dim, value_dim, rows)
    entries = []
    for name, (pointers, ints, flags) in KERNELS.items():
        types = {p: _P for p in pointers.split()}
        types.update({i: "i32" for i in ints.split()})
        cx = constexprs(name, cfg)
        variant = (f"K={key_dim} V={value_dim} rows {cfg['L']}, "
                   + ", ".join(f"{k} {v}" for k, v in cx.items() if k not in ("KD", "VD", "L")))
        dots = "none" if "DOT" not in cx else cx["DOT"] + (", T ieee" if name in _WITH_T else "")
        entries.append(aot.KernelEntry(name, types, {**cx, **flags}, num_warps(name, cfg),
                                       variant, dots))
    return aot.GeneratedModule("chunk-dplr", "chunk_dplr_core.py", Path(__file__).read_text(),
                               entries)
