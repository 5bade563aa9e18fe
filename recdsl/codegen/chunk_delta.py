"""The chunkwise (WY / UT) Triton core of the delta family: a fixed template.

Per token t: a scalar log-decay g_t, then NH Householder-like steps
``S <- (I - beta_j k_j k_jᵀ) S + k_j u_jᵀ`` (the decay applied once, before the first step),
then the read ``o_t = Sᵀ q_t``. The rule-specific math that produces k, beta, u, g and q is the
generated prologue (``recdsl.codegen.prologue``); this core never changes with the rule.

A chunk is C tokens; its R = C * NHP rows are the tokens' steps in order (NHP = NH rounded up
to a power of two; a padding step has k = 0, beta = 0, u = 0: the identity). With γ the decay
from the chunk start to a row's token, S0 the state entering the chunk:

    M   = strict_lower(diag(beta) (K Kᵀ ⊙ exp(γ_r - γ_s)))         (R x R)
    T   = (I + M)^{-1}              forward substitution in fp32 registers (no tensor cores)
    W   = T diag(beta exp(γ)) K,    Ũ = T U                          (the WY factors)
    Δ   = Ũ - W S0                                                   (the steps' new values)
    O   = diag(exp(γ_t)) Q S0 + P Δ,  P_tr = q_t·k_r exp(γ_t - γ_r) [token(r) <= t]
    S1  = exp(γ_C) S0 + (K ⊙ exp(γ_C - γ_r))ᵀ Δ

Erases beside a decay (``READ``, a constexpr: off, the kernels are the plain ones). A
token's first erase may read the state scaled by its own ``r_t`` (log ``gr_t``) instead of
``exp(g_t)``: ``u_t <- u_t - beta_t r_t S_{t-1}ᵀ k_t`` (KLA as its author writes it: r = 1).
Its row's erase exponent is then e_r = γ_{t-1} + gr_t where it was γ_t (a token's later steps
keep γ_t), in M and W only:

    M_rs = beta_r (k_r·k_s) exp(e_r - γ_s),   W = T diag(beta exp(e)) K,

e_r - γ_s being the segment sum of the log-decays of the rows strictly between s and r plus
gr_r: no division by the decay, so a decay of exactly 0 is exact. Its gradient: d e_r (the
sums of M's and B's gradients over row r) goes to γ_r as before, and on a token's first step
also to gr_t and, negated, to g_t (e_r = γ_r - g_t + gr_t).

Every decay exponent is a segment sum of the rule's log-decays (sums over masked ranges),
never a difference of two running sums, so very negative gates lose no precision; exponents
are masked before exp() where the decay does not apply.

Gradients, with dS1 the gradient of the state leaving a chunk and dY = Tᵀ dΔ:
    dΔ  = Pᵀ dO + (K ⊙ exp(γ_C - γ_r)) dS1,     dU = dY
    dS0 = exp(γ_C) dS1 + (Q ⊙ exp(γ_t))ᵀ dO - (diag(beta exp γ) K)ᵀ dY
    dM  = strict_lower(-dY Δᵀ),  dP = dO Δᵀ,  and through B = diag(beta exp γ) K: dB = -dY S0ᵀ
then the chain rule through M, P, B, the S1 write and the Q S0 read to k, beta, q and the
exponents γ, and from the exponents to g (a reverse running sum inside the chunk).

Kernels, each holding few large tiles so that they build without register spills: K and V
are walked in tiles (BKT, BV), and between chunks the walks carry the state through its
per-chunk store (stored once per chunk for the backward anyway) rather than in registers,
tile by tile. Grids in brackets:
  forward   prepare      [chunk, head]        T = (I + M)^{-1} (kept for the backward), W, Ũ
            fwd_h        [sequence, head, V]  the walk: S per chunk, Δ, the final state
            fwd_o        [chunk, head, V]     the outputs
  backward  bwd_dv       [chunk, head, V]     Pᵀ dO and (Q ⊙ exp γ)ᵀ dO (need no state)
            bwd_dh       [sequence, head, V]  the walk back: dS1 per chunk, dU = dY, dh0
            bwd_dm       [chunk, head]        through M: dbeta, dg; bgm + bgmᵀ stored
            bwd_dk       [chunk, head]        through B and the S1 write: dk, dbeta, dg
            bwd_dq       [chunk, head]        through the read: dq, dg; dP ⊙ decays stored
            bwd_dk_tail  [chunk, head, K]     the R x R gradients times K and Q into dk, dq

Layouts (NTOK = all tokens, packed; every sequence is a range of ``cu_seqlens``):
rows [NTOK, H, NH, *] (k, W: KD; u, Ũ, Δ: VD; beta), tokens [NTOK, H, *] (q: KD; o, do: VD;
g, gr); T [chunks, H, R, R]; states [chunks, H, KD, VD]; h0 / ht [N, H, KD, VD].
Products take their operand format from the call's precision policy
(``recdsl.codegen.precision``), by class: ``DOT_R`` fwd_o's (the outputs), ``DOT`` the
backward's products inside a chunk, ``DOT_S`` those with a state (or its gradient) as an
operand or carrying it (fwd_h, bwd_dh's walk, bwd_dq's dO S0ᵀ, bwd_dk's), ``DOT_T`` those with
T (prepare's W and Ũ, bwd_dh's Tᵀ dΔ); ``PRODUCTS`` lists each kernel's. The solve never uses
a tensor-core product, and K Kᵀ entering it is ieee everywhere.
"""
from __future__ import annotations

import triton
import triton.language as tl

# ------------------------------------------------------------------ shared pieces
# The products, by operand format (DOT_R: the read, DOT: chunk products, DOT_S: state, DOT_T:
# the solve's).


@triton.jit
def _dot(a, b, P: tl.constexpr):
    """a @ b with fp32 accumulation, operands in format P (see recdsl.codegen.precision)."""
    if P == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
    elif P == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    else:
        return tl.dot(a, b, input_precision=P)


# Addresses: a 64-bit scalar base per chunk plus 32-bit offsets inside it (registers are the
# budget: a tile of 64-bit offsets costs twice as many).


@triton.jit
def _rows(tok0, tok_end, i_h, H, NH: tl.constexpr, NHP: tl.constexpr, R: tl.constexpr):
    """A chunk's R step rows in [NTOK, H, NH, *] buffers: (base row, row offsets, mask)."""
    o_r = tl.arange(0, R)
    tok_r = o_r // NHP
    step_r = o_r % NHP
    m_r = (step_r < NH) & (tok0 + tok_r < tok_end)
    return (tok0 * H + i_h) * NH, tok_r * (H * NH) + step_r, m_r


@triton.jit
def _tokens(tok0, tok_end, i_h, H, C: tl.constexpr):
    """A chunk's C tokens in [NTOK, H, *] buffers: (base row, row offsets, mask)."""
    o_c = tl.arange(0, C)
    return tok0 * H + i_h, o_c * H, tok0 + o_c < tok_end


@triton.jit
def _tile(ptr, base, offs, mask, cols, m_cols, width):
    return tl.load(ptr + base * width + offs[:, None] * width + cols[None, :],
                   mask=mask[:, None] & m_cols[None, :], other=0.0).to(tl.float32)


@triton.jit
def _put(ptr, base, offs, mask, cols, m_cols, width, value):
    tl.store(ptr + base * width + offs[:, None] * width + cols[None, :], value,
             mask=mask[:, None] & m_cols[None, :])


@triton.jit
def _state_tile(ptr, base, o_k, m_k, o_v, m_v, VD: tl.constexpr):
    """A [BKT, BV] tile of a [KD, VD] state at ``ptr + base``."""
    return tl.load(ptr + base + o_k[:, None] * VD + o_v[None, :], mask=m_k[:, None] & m_v[None, :],
                   other=0.0)


@triton.jit
def _put_state(ptr, base, o_k, m_k, o_v, m_v, VD: tl.constexpr, value):
    tl.store(ptr + base + o_k[:, None] * VD + o_v[None, :], value, mask=m_k[:, None] & m_v[None, :])


@triton.jit
def _gates(g, tok0, tok_end, i_h, H, NHP: tl.constexpr, C: tl.constexpr, R: tl.constexpr):
    """Log-decays of the chunk: per token (g_c) and per row (g_r: the token's decay on its
    first step); γ from the chunk start to each token (gam_c) and row (gam_r); the decay after
    each row's token to the chunk end (suf_r); γ_C (gam_last). Running sums of vectors only:
    the suffix is a reverse running sum of the next tokens' decays, not a difference."""
    o_c = tl.arange(0, C)
    g_c = tl.load(g + (tok0 + o_c) * H + i_h, mask=tok0 + o_c < tok_end, other=0.0)
    g_next = tl.load(g + (tok0 + o_c + 1) * H + i_h, mask=(o_c + 1 < C) & (tok0 + o_c + 1 < tok_end),
                     other=0.0)
    gam_c = tl.cumsum(g_c, axis=0)
    suf_c = tl.cumsum(g_next, axis=0, reverse=True)
    first = (tl.arange(0, NHP) == 0)[None, :]
    g_r = tl.reshape(tl.where(first, g_c[:, None], 0.0), [R])
    gam_r = tl.reshape(tl.broadcast_to(gam_c[:, None], [C, NHP]), [R])
    suf_r = tl.reshape(tl.broadcast_to(suf_c[:, None], [C, NHP]), [R])
    return g_c, g_r, gam_c, gam_r, suf_r, tl.sum(g_c, axis=0)


@triton.jit
def _row_decays(g_r, R: tl.constexpr):
    """exp(γ_r - γ_s) for s < r (0 elsewhere), as segment sums of the rows' log-decays."""
    o_r = tl.arange(0, R)
    lower = o_r[:, None] > o_r[None, :]
    seg = tl.cumsum(tl.where(lower, g_r[:, None], 0.0), axis=0)
    return tl.where(lower, tl.exp(tl.where(lower, seg, 0.0)), 0.0)


@triton.jit
def _read_decays(g_c, NHP: tl.constexpr, C: tl.constexpr, R: tl.constexpr):
    """exp(γ_t - γ_r) where token(r) <= t (0 elsewhere), as segment sums over tokens."""
    o_c = tl.arange(0, C)
    tok_r = tl.arange(0, R) // NHP
    causal = tok_r[None, :] <= o_c[:, None]
    seg = tl.cumsum(tl.where(o_c[:, None] > tok_r[None, :], g_c[:, None], 0.0), axis=0)
    return tl.where(causal, tl.exp(tl.where(causal, seg, 0.0)), 0.0)


@triton.jit
def _erase_gates(g, gr, g_c, gam_c, tok0, tok_end, i_h, H, NHP: tl.constexpr, C: tl.constexpr,
                 R: tl.constexpr):
    """READ: the rows' erase exponents e_r (γ_{t-1} + gr_t on a token's first step, γ_t on its
    later ones), the rows' read logs (gr_t on first steps, 0 elsewhere) and the log-decay of
    each row's previous row (for segment sums). γ_{t-1} is a running sum of the previous
    tokens' decays (loaded shifted), not γ_t - g_t."""
    o_c = tl.arange(0, C)
    m_c = tok0 + o_c < tok_end
    gr_c = tl.load(gr + (tok0 + o_c) * H + i_h, mask=m_c, other=0.0)
    g_prev = tl.load(g + (tok0 + o_c - 1) * H + i_h, mask=(o_c >= 1) & m_c, other=0.0)
    first = (tl.arange(0, NHP) == 0)[None, :]
    e_r = tl.reshape(tl.where(first, (tl.cumsum(g_prev, axis=0) + gr_c)[:, None], gam_c[:, None]),
                     [R])
    lr_r = tl.reshape(tl.where(first, gr_c[:, None], 0.0), [R])
    if NHP == 1:
        gp_r = g_prev
    else:  # the row before a token's second step is its first, which carries its decay
        gp_r = tl.reshape(tl.where((tl.arange(0, NHP) == 1)[None, :], g_c[:, None], 0.0), [R])
    return e_r, lr_r, gp_r


@triton.jit
def _erase_decays(gp_r, lr_r, R: tl.constexpr):
    """READ: exp(e_r - γ_s) for s < r (0 elsewhere): the log-decays of the rows strictly
    between s and r (as the previous rows' logs of rows s+2..r) plus row r's read log."""
    o_r = tl.arange(0, R)
    lower = o_r[:, None] > o_r[None, :]
    seg = tl.cumsum(tl.where(o_r[:, None] > o_r[None, :] + 1, gp_r[:, None], 0.0), axis=0)
    return tl.where(lower, tl.exp(tl.where(lower, seg + lr_r[:, None], 0.0)), 0.0)


@triton.jit
def _first_steps(x_r, NHP: tl.constexpr, C: tl.constexpr):
    """Per token, the entry of its first step's row."""
    first = (tl.arange(0, NHP) == 0)[None, :]
    return tl.sum(tl.where(first, tl.reshape(x_r, [C, NHP]), 0.0), axis=1)


@triton.jit
def _solve(m, R: tl.constexpr):
    """(I + M)^{-1} for strictly lower M by forward substitution, in fp32 registers:
    N = T - I has rows N_i = -M_i - M_i N."""
    o_r = tl.arange(0, R)
    n = tl.zeros([R, R], dtype=tl.float32)
    for i in range(1, R):
        m_i = tl.sum(tl.where(o_r[:, None] == i, m, 0.0), axis=0)
        n_i = -m_i - tl.sum(m_i[:, None] * n, axis=0)
        n = tl.where(o_r[:, None] == i, n_i[None, :], n)
    return n + tl.where(o_r[:, None] == o_r[None, :], 1.0, 0.0)


@triton.jit
def _to_log_decays(d_gam_c, d_gam_r, d_gam_last, NHP: tl.constexpr, C: tl.constexpr):
    """Gradients of the exponents γ_t, γ_r, γ_C -> gradients of the tokens' log-decays
    (γ_t is the sum of g up to t, γ_r the same at the row's token, γ_C of all of them)."""
    d_tok = d_gam_c + tl.sum(tl.reshape(d_gam_r, [C, NHP]), axis=1)
    return tl.cumsum(d_tok, axis=0, reverse=True) + d_gam_last


@triton.jit
def _kk(k, rbase, roffs, m_r, KD: tl.constexpr, R: tl.constexpr, BKT: tl.constexpr, DOT: tl.constexpr):
    """K Kᵀ over K tiles."""
    kk = tl.zeros([R, R], dtype=tl.float32)
    for kt in tl.range(0, KD, BKT, num_stages=1):
        o_k = kt + tl.arange(0, BKT)
        k_t = _tile(k, rbase, roffs, m_r, o_k, o_k < KD, KD)
        kk += _dot(k_t, tl.trans(k_t), DOT)
    return kk


@triton.jit
def _qk(q, k, tbase, toffs, m_c, rbase, roffs, m_r, KD: tl.constexpr, C: tl.constexpr,
        R: tl.constexpr, BKT: tl.constexpr, DOT: tl.constexpr):
    """Q Kᵀ over K tiles."""
    qk = tl.zeros([C, R], dtype=tl.float32)
    for kt in tl.range(0, KD, BKT, num_stages=1):
        o_k = kt + tl.arange(0, BKT)
        m_k = o_k < KD
        qk += _dot(_tile(q, tbase, toffs, m_c, o_k, m_k, KD),
                     tl.trans(_tile(k, rbase, roffs, m_r, o_k, m_k, KD)), DOT)
    return qk


# ------------------------------------------------------------------ forward


@triton.jit
def chunk_delta_prepare(k, beta, u, g, gr, t_out, w, u_t, chunk_starts, chunk_ends, H,
                        KD: tl.constexpr, VD: tl.constexpr, NH: tl.constexpr, NHP: tl.constexpr,
                        C: tl.constexpr, R: tl.constexpr, BKT: tl.constexpr, BV: tl.constexpr,
                        DOT_T: tl.constexpr, READ: tl.constexpr = False):
    i_chunk = tl.program_id(0)
    i_h = tl.program_id(1)
    tok0 = tl.load(chunk_starts + i_chunk).to(tl.int64)
    eos = tl.load(chunk_ends + i_chunk).to(tl.int64)
    rbase, roffs, m_r = _rows(tok0, eos, i_h, H, NH, NHP, R)
    o_r = tl.arange(0, R)
    b_beta = tl.load(beta + rbase + roffs, mask=m_r, other=0.0)
    g_c, g_r, gam_c, gam_r, suf_r, gam_last = _gates(g, tok0, eos, i_h, H, NHP, C, R)
    kk = _kk(k, rbase, roffs, m_r, KD, R, BKT, "ieee")
    if READ:
        e_r, lr_r, gp_r = _erase_gates(g, gr, g_c, gam_c, tok0, eos, i_h, H, NHP, C, R)
        t = _solve(b_beta[:, None] * kk * _erase_decays(gp_r, lr_r, R), R)
        bg = b_beta * tl.exp(e_r)
    else:
        t = _solve(b_beta[:, None] * kk * _row_decays(g_r, R), R)
        bg = b_beta * tl.exp(gam_r)
    tl.store(t_out + (tl.cast(i_chunk, tl.int64) * H + i_h) * R * R + o_r[:, None] * R + o_r[None, :], t)
    for kt in tl.range(0, KD, BKT, num_stages=1):
        o_k = kt + tl.arange(0, BKT)
        m_k = o_k < KD
        b_w = _dot(t, _tile(k, rbase, roffs, m_r, o_k, m_k, KD) * bg[:, None], DOT_T)
        _put(w, rbase, roffs, m_r, o_k, m_k, KD, b_w)
    for vt in tl.range(0, VD, BV, num_stages=1):
        o_v = vt + tl.arange(0, BV)
        m_v = o_v < VD
        b_u = _tile(u, rbase, roffs, m_r, o_v, m_v, VD)
        _put(u_t, rbase, roffs, m_r, o_v, m_v, VD, _dot(t, b_u, DOT_T))


@triton.jit
def chunk_delta_fwd_h(k, g, w, u_t, h0, delta, ht, states, cu_seqlens, chunk_offsets, H,
                      KD: tl.constexpr, VD: tl.constexpr, NH: tl.constexpr, NHP: tl.constexpr,
                      C: tl.constexpr, R: tl.constexpr, BKT: tl.constexpr, BV: tl.constexpr,
                      DOT_S: tl.constexpr, USE_INITIAL: tl.constexpr):
    """The walk over a sequence's chunks for one V tile. The state entering chunk c is
    states[c] (the next chunk's is written tile by tile from it; the last one goes to ht)."""
    i_n = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < VD
    final = (tl.cast(i_n, tl.int64) * H + i_h) * KD * VD
    start = (first_chunk * H + i_h) * KD * VD
    for kt in tl.range(0, KD, BKT, num_stages=1):
        o_k = kt + tl.arange(0, BKT)
        m_k = o_k < KD
        if USE_INITIAL:
            s_t = _state_tile(h0, final, o_k, m_k, o_v, m_v, VD)
        else:
            s_t = tl.zeros([BKT, BV], dtype=tl.float32)
        _put_state(states, start, o_k, m_k, o_v, m_v, VD, s_t)
    tl.debug_barrier()
    for i_c in tl.range(0, n_chunks, num_stages=1):
        tok0 = bos + i_c * C
        cur = ((first_chunk + i_c) * H + i_h) * KD * VD
        rbase, roffs, m_r = _rows(tok0, eos, i_h, H, NH, NHP, R)
        ws = tl.zeros([R, BV], dtype=tl.float32)
        for kt in tl.range(0, KD, BKT, num_stages=1):
            o_k = kt + tl.arange(0, BKT)
            m_k = o_k < KD
            ws += _dot(_tile(w, rbase, roffs, m_r, o_k, m_k, KD),
                         _state_tile(states, cur, o_k, m_k, o_v, m_v, VD), DOT_S)
        b_delta = _tile(u_t, rbase, roffs, m_r, o_v, m_v, VD) - ws
        _put(delta, rbase, roffs, m_r, o_v, m_v, VD, b_delta)
        g_c, g_r, gam_c, gam_r, suf_r, gam_last = _gates(g, tok0, eos, i_h, H, NHP, C, R)
        dec = tl.exp(suf_r)
        carry = tl.exp(gam_last)
        for kt in tl.range(0, KD, BKT, num_stages=1):
            o_k = kt + tl.arange(0, BKT)
            m_k = o_k < KD
            k_t = _tile(k, rbase, roffs, m_r, o_k, m_k, KD) * dec[:, None]
            s_t = carry * _state_tile(states, cur, o_k, m_k, o_v, m_v, VD) \
                + _dot(tl.trans(k_t), b_delta, DOT_S)
            if i_c + 1 < n_chunks:
                _put_state(states, cur + H * KD * VD, o_k, m_k, o_v, m_v, VD, s_t)
            else:
                _put_state(ht, final, o_k, m_k, o_v, m_v, VD, s_t)
        tl.debug_barrier()


@triton.jit
def chunk_delta_fwd_o(k, g, q, delta, states, o, chunk_starts, chunk_ends, H,
                      KD: tl.constexpr, VD: tl.constexpr, NH: tl.constexpr, NHP: tl.constexpr,
                      C: tl.constexpr, R: tl.constexpr, BKT: tl.constexpr, BV: tl.constexpr,
                      DOT_R: tl.constexpr):
    i_chunk = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    tok0 = tl.load(chunk_starts + i_chunk).to(tl.int64)
    eos = tl.load(chunk_ends + i_chunk).to(tl.int64)
    rbase, roffs, m_r = _rows(tok0, eos, i_h, H, NH, NHP, R)
    tbase, toffs, m_c = _tokens(tok0, eos, i_h, H, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < VD
    state = (tl.cast(i_chunk, tl.int64) * H + i_h) * KD * VD
    qs = tl.zeros([C, BV], dtype=tl.float32)
    qk = tl.zeros([C, R], dtype=tl.float32)
    for kt in tl.range(0, KD, BKT, num_stages=1):
        o_k = kt + tl.arange(0, BKT)
        m_k = o_k < KD
        q_t = _tile(q, tbase, toffs, m_c, o_k, m_k, KD)
        qs += _dot(q_t, _state_tile(states, state, o_k, m_k, o_v, m_v, VD), DOT_R)
        qk += _dot(q_t, tl.trans(_tile(k, rbase, roffs, m_r, o_k, m_k, KD)), DOT_R)
    g_c, g_r, gam_c, gam_r, suf_r, gam_last = _gates(g, tok0, eos, i_h, H, NHP, C, R)
    p = qk * _read_decays(g_c, NHP, C, R)
    b_o = tl.exp(gam_c)[:, None] * qs \
        + _dot(p, _tile(delta, rbase, roffs, m_r, o_v, m_v, VD), DOT_R)
    _put(o, tbase, toffs, m_c, o_v, m_v, VD, b_o.to(o.dtype.element_ty))


# ------------------------------------------------------------------ backward


@triton.jit
def chunk_delta_bwd_dv(k, g, q, do, du, dread, chunk_starts, chunk_ends, H, KD: tl.constexpr,
                       VD: tl.constexpr, NH: tl.constexpr, NHP: tl.constexpr, C: tl.constexpr,
                       R: tl.constexpr, BKT: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr):
    """The parts of the backward walk that need no state: Pᵀ dO into du (bwd_dh completes
    dΔ) and the read's share of dS0, (Q ⊙ exp(γ_t))ᵀ dO, into dread."""
    i_chunk = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    tok0 = tl.load(chunk_starts + i_chunk).to(tl.int64)
    eos = tl.load(chunk_ends + i_chunk).to(tl.int64)
    rbase, roffs, m_r = _rows(tok0, eos, i_h, H, NH, NHP, R)
    tbase, toffs, m_c = _tokens(tok0, eos, i_h, H, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < VD
    state = (tl.cast(i_chunk, tl.int64) * H + i_h) * KD * VD
    g_c, g_r, gam_c, gam_r, suf_r, gam_last = _gates(g, tok0, eos, i_h, H, NHP, C, R)
    b_do = _tile(do, tbase, toffs, m_c, o_v, m_v, VD)
    p = _qk(q, k, tbase, toffs, m_c, rbase, roffs, m_r, KD, C, R, BKT, DOT) \
        * _read_decays(g_c, NHP, C, R)
    _put(du, rbase, roffs, m_r, o_v, m_v, VD, _dot(tl.trans(p), b_do, DOT))
    e_c = tl.exp(gam_c)
    for kt in tl.range(0, KD, BKT, num_stages=1):
        o_k = kt + tl.arange(0, BKT)
        m_k = o_k < KD
        q_t = _tile(q, tbase, toffs, m_c, o_k, m_k, KD) * e_c[:, None]
        _put_state(dread, state, o_k, m_k, o_v, m_v, VD, _dot(tl.trans(q_t), b_do, DOT))


@triton.jit
def chunk_delta_bwd_dh(k, beta, g, gr, t_in, dread, dht, du, dstates, dh0, cu_seqlens,
                       chunk_offsets, H, KD: tl.constexpr, VD: tl.constexpr, NH: tl.constexpr,
                       NHP: tl.constexpr, C: tl.constexpr, R: tl.constexpr, BKT: tl.constexpr,
                       BV: tl.constexpr, DOT_S: tl.constexpr, DOT_T: tl.constexpr, USE_FINAL_GRAD: tl.constexpr,
                       READ: tl.constexpr = False):
    """The walk back over a sequence's chunks for one V tile. dstates[c] is the gradient of
    the state leaving chunk c (the previous chunk's is written from it; the first's goes to
    dh0); dU = dY is written for every chunk."""
    i_n = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < VD
    o_r = tl.arange(0, R)
    final = (tl.cast(i_n, tl.int64) * H + i_h) * KD * VD
    last = ((first_chunk + n_chunks - 1) * H + i_h) * KD * VD
    for kt in tl.range(0, KD, BKT, num_stages=1):
        o_k = kt + tl.arange(0, BKT)
        m_k = o_k < KD
        if USE_FINAL_GRAD:
            ds_t = _state_tile(dht, final, o_k, m_k, o_v, m_v, VD)
        else:
            ds_t = tl.zeros([BKT, BV], dtype=tl.float32)
        _put_state(dstates, last, o_k, m_k, o_v, m_v, VD, ds_t)
    tl.debug_barrier()
    for i_rev in tl.range(0, n_chunks, num_stages=1):
        i_c = n_chunks - 1 - i_rev
        tok0 = bos + i_c * C
        chunk = (first_chunk + i_c) * H + i_h
        cur = chunk * KD * VD
        rbase, roffs, m_r = _rows(tok0, eos, i_h, H, NH, NHP, R)
        g_c, g_r, gam_c, gam_r, suf_r, gam_last = _gates(g, tok0, eos, i_h, H, NHP, C, R)
        kds = tl.zeros([R, BV], dtype=tl.float32)
        for kt in tl.range(0, KD, BKT, num_stages=1):
            o_k = kt + tl.arange(0, BKT)
            m_k = o_k < KD
            kds += _dot(_tile(k, rbase, roffs, m_r, o_k, m_k, KD),
                          _state_tile(dstates, cur, o_k, m_k, o_v, m_v, VD), DOT_S)
        # du holds Pᵀ dO (from bwd_dv); it is replaced by dY
        ddelta = _tile(du, rbase, roffs, m_r, o_v, m_v, VD) + tl.exp(suf_r)[:, None] * kds
        t = tl.load(t_in + chunk * R * R + o_r[:, None] * R + o_r[None, :])
        dy = _dot(tl.trans(t), ddelta, DOT_T)
        _put(du, rbase, roffs, m_r, o_v, m_v, VD, dy)
        if READ:
            e_r, lr_r, gp_r = _erase_gates(g, gr, g_c, gam_c, tok0, eos, i_h, H, NHP, C, R)
            bg = tl.load(beta + rbase + roffs, mask=m_r, other=0.0) * tl.exp(e_r)
        else:
            bg = tl.load(beta + rbase + roffs, mask=m_r, other=0.0) * tl.exp(gam_r)
        carry = tl.exp(gam_last)
        for kt in tl.range(0, KD, BKT, num_stages=1):
            o_k = kt + tl.arange(0, BKT)
            m_k = o_k < KD
            k_t = _tile(k, rbase, roffs, m_r, o_k, m_k, KD) * bg[:, None]
            ds_t = carry * _state_tile(dstates, cur, o_k, m_k, o_v, m_v, VD) \
                + _state_tile(dread, cur, o_k, m_k, o_v, m_v, VD) \
                - _dot(tl.trans(k_t), dy, DOT_S)
            if i_c > 0:
                _put_state(dstates, cur - H * KD * VD, o_k, m_k, o_v, m_v, VD, ds_t)
            else:
                _put_state(dh0, final, o_k, m_k, o_v, m_v, VD, ds_t)
        tl.debug_barrier()


@triton.jit
def chunk_delta_bwd_dm(k, beta, g, gr, delta, du, dbeta, dg, dgr, sym_out, chunk_starts,
                       chunk_ends, H, KD: tl.constexpr, VD: tl.constexpr, NH: tl.constexpr,
                       NHP: tl.constexpr, C: tl.constexpr, R: tl.constexpr, BKT: tl.constexpr,
                       BV: tl.constexpr, DOT: tl.constexpr, READ: tl.constexpr = False):
    """Through M_rs = beta_r (k_r·k_s) exp(γ_r - γ_s), s < r, with dM = strict_lower(-dY Δᵀ):
    dbeta and dg (first parts: bwd_dk and bwd_dq add theirs), and d(K Kᵀ) counted both ways,
    bgm + bgmᵀ, for bwd_dk_tail."""
    i_chunk = tl.program_id(0)
    i_h = tl.program_id(1)
    tok0 = tl.load(chunk_starts + i_chunk).to(tl.int64)
    eos = tl.load(chunk_ends + i_chunk).to(tl.int64)
    rbase, roffs, m_r = _rows(tok0, eos, i_h, H, NH, NHP, R)
    tbase, toffs, m_c = _tokens(tok0, eos, i_h, H, C)
    o_r = tl.arange(0, R)
    d_m = tl.zeros([R, R], dtype=tl.float32)
    for vt in tl.range(0, VD, BV, num_stages=1):
        o_v = vt + tl.arange(0, BV)
        m_v = o_v < VD
        d_m -= _dot(_tile(du, rbase, roffs, m_r, o_v, m_v, VD),
                      tl.trans(_tile(delta, rbase, roffs, m_r, o_v, m_v, VD)), DOT)
    g_c, g_r, gam_c, gam_r, suf_r, gam_last = _gates(g, tok0, eos, i_h, H, NHP, C, R)
    b_beta = tl.load(beta + rbase + roffs, mask=m_r, other=0.0)
    kk = _kk(k, rbase, roffs, m_r, KD, R, BKT, DOT)
    if READ:
        e_r, lr_r, gp_r = _erase_gates(g, gr, g_c, gam_c, tok0, eos, i_h, H, NHP, C, R)
        gm = tl.where(o_r[:, None] > o_r[None, :], d_m, 0.0) * _erase_decays(gp_r, lr_r, R)
    else:
        gm = tl.where(o_r[:, None] > o_r[None, :], d_m, 0.0) * _row_decays(g_r, R)
    bgm = b_beta[:, None] * gm
    tl.store(sym_out + (tl.cast(i_chunk, tl.int64) * H + i_h) * R * R + o_r[:, None] * R + o_r[None, :],
             bgm + tl.trans(bgm))
    dmm = bgm * kk
    tl.store(dbeta + rbase + roffs, tl.sum(gm * kk, axis=1), mask=m_r)
    if READ:  # e_r = γ_r - g_t + gr_t on first steps
        d_e_r = tl.sum(dmm, axis=1)
        d_e0 = _first_steps(d_e_r, NHP, C)
        tl.store(dgr + tbase + toffs, d_e0, mask=m_c)
        d_g = _to_log_decays(tl.zeros([C], dtype=tl.float32), d_e_r - tl.sum(dmm, axis=0), 0.0,
                             NHP, C) - d_e0
        tl.store(dg + tbase + toffs, d_g, mask=m_c)
    else:
        d_gam_r = tl.sum(dmm, axis=1) - tl.sum(dmm, axis=0)
        tl.store(dg + tbase + toffs, _to_log_decays(tl.zeros([C], dtype=tl.float32), d_gam_r, 0.0, NHP, C),
                 mask=m_c)


@triton.jit
def chunk_delta_bwd_dk(k, beta, g, gr, delta, du, states, dstates, dk, dbeta, dg, dgr,
                       chunk_starts, chunk_ends, H, KD: tl.constexpr, VD: tl.constexpr,
                       NH: tl.constexpr, NHP: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
                       BKT: tl.constexpr, BV: tl.constexpr, DOT_S: tl.constexpr,
                       READ: tl.constexpr = False):
    """Through B (in Y = U - B S0) and the write of S1: dk (bwd_dk_tail adds the rest), and
    the parts of dbeta and dg these carry (added to bwd_dm's). Its products are ieee unless
    half (``constexprs``): small tiles (16 x 16 on a GPU, see _TILE_CAPS), and tf32x3 here
    spilled on sm_80."""
    i_chunk = tl.program_id(0)
    i_h = tl.program_id(1)
    tok0 = tl.load(chunk_starts + i_chunk).to(tl.int64)
    eos = tl.load(chunk_ends + i_chunk).to(tl.int64)
    rbase, roffs, m_r = _rows(tok0, eos, i_h, H, NH, NHP, R)
    tbase, toffs, m_c = _tokens(tok0, eos, i_h, H, C)
    state = (tl.cast(i_chunk, tl.int64) * H + i_h) * KD * VD
    g_c, g_r, gam_c, gam_r, suf_r, gam_last = _gates(g, tok0, eos, i_h, H, NHP, C, R)
    b_beta = tl.load(beta + rbase + roffs, mask=m_r, other=0.0)
    if READ:  # the rows of B = diag(beta exp e) K
        e_r, lr_r, gp_r = _erase_gates(g, gr, g_c, gam_c, tok0, eos, i_h, H, NHP, C, R)
        bg = b_beta * tl.exp(e_r)
    else:
        bg = b_beta * tl.exp(gam_r)  # the rows of B = diag(beta exp γ) K
    dec = tl.exp(suf_r)
    d_bg = tl.zeros([R], dtype=tl.float32)
    d_write = tl.zeros([R], dtype=tl.float32)  # k_r · (Δ dS1ᵀ)_r
    d_carry = tl.zeros([], dtype=tl.float32)  # <S0, dS1>
    for kt in tl.range(0, KD, BKT, num_stages=1):
        o_k = kt + tl.arange(0, BKT)
        m_k = o_k < KD
        a1 = tl.zeros([R, BKT], dtype=tl.float32)  # dY S0ᵀ
        a2 = tl.zeros([R, BKT], dtype=tl.float32)  # Δ dS1ᵀ
        for vt in tl.range(0, VD, BV, num_stages=1):
            o_v = vt + tl.arange(0, BV)
            m_v = o_v < VD
            s0 = _state_tile(states, state, o_k, m_k, o_v, m_v, VD)
            ds1 = _state_tile(dstates, state, o_k, m_k, o_v, m_v, VD)
            a1 += _dot(_tile(du, rbase, roffs, m_r, o_v, m_v, VD), tl.trans(s0), DOT_S)
            a2 += _dot(_tile(delta, rbase, roffs, m_r, o_v, m_v, VD), tl.trans(ds1), DOT_S)
            d_carry += tl.sum(tl.sum(s0 * ds1, axis=1), axis=0)
        _put(dk, rbase, roffs, m_r, o_k, m_k, KD, dec[:, None] * a2 - bg[:, None] * a1)
        k_t = _tile(k, rbase, roffs, m_r, o_k, m_k, KD)
        d_bg -= tl.sum(k_t * a1, axis=1)
        d_write += tl.sum(k_t * a2, axis=1)
    if READ:
        d_beta = tl.exp(e_r) * d_bg
    else:
        d_beta = tl.exp(gam_r) * d_bg
    # the write's decay exp(γ_C - γ_r) spans the tokens after row r's: each token's share is
    # the sum over the rows of earlier tokens, added directly (as -d_gam_r plus a share of
    # d_gam_last it would be a difference of two sums over the chunk, which cancel for the
    # chunk's first tokens and left their gradients 1e-6 off, relatively)
    o_c = tl.arange(0, C)
    d_write_c = tl.sum(tl.reshape(dec * d_write, [C, NHP]), axis=1)
    d_suf_c = tl.sum(tl.where(o_c[None, :] < o_c[:, None], d_write_c[None, :], 0.0), axis=1)
    tl.store(dbeta + rbase + roffs, tl.load(dbeta + rbase + roffs, mask=m_r, other=0.0) + d_beta,
             mask=m_r)
    d_g = d_suf_c + _to_log_decays(tl.zeros([C], dtype=tl.float32), bg * d_bg,
                                   tl.exp(gam_last) * d_carry, NHP, C)
    if READ:  # e_r = γ_r - g_t + gr_t on first steps
        d_e0 = _first_steps(bg * d_bg, NHP, C)
        tl.store(dgr + tbase + toffs, tl.load(dgr + tbase + toffs, mask=m_c, other=0.0) + d_e0,
                 mask=m_c)
        d_g -= d_e0
    tl.store(dg + tbase + toffs, tl.load(dg + tbase + toffs, mask=m_c, other=0.0) + d_g, mask=m_c)


@triton.jit
def chunk_delta_bwd_dq(k, g, q, delta, states, do, dq, dg, dpm_out, chunk_starts, chunk_ends, H,
                       KD: tl.constexpr, VD: tl.constexpr, NH: tl.constexpr, NHP: tl.constexpr,
                       C: tl.constexpr, R: tl.constexpr, BKT: tl.constexpr, BV: tl.constexpr,
                       DOT: tl.constexpr, DOT_S: tl.constexpr):
    """Through the read O = diag(exp γ) Q S0 + P Δ: dq (bwd_dk_tail adds dpm K), the part of
    dg through it (added to bwd_dk's), and dpm = dP ⊙ exp(γ_t - γ_r) for bwd_dk_tail."""
    i_chunk = tl.program_id(0)
    i_h = tl.program_id(1)
    tok0 = tl.load(chunk_starts + i_chunk).to(tl.int64)
    eos = tl.load(chunk_ends + i_chunk).to(tl.int64)
    rbase, roffs, m_r = _rows(tok0, eos, i_h, H, NH, NHP, R)
    tbase, toffs, m_c = _tokens(tok0, eos, i_h, H, C)
    state = (tl.cast(i_chunk, tl.int64) * H + i_h) * KD * VD
    d_p = tl.zeros([C, R], dtype=tl.float32)
    for vt in tl.range(0, VD, BV, num_stages=1):
        o_v = vt + tl.arange(0, BV)
        m_v = o_v < VD
        d_p += _dot(_tile(do, tbase, toffs, m_c, o_v, m_v, VD),
                      tl.trans(_tile(delta, rbase, roffs, m_r, o_v, m_v, VD)), DOT)
    g_c, g_r, gam_c, gam_r, suf_r, gam_last = _gates(g, tok0, eos, i_h, H, NHP, C, R)
    dpm = d_p * _read_decays(g_c, NHP, C, R)
    o_c = tl.arange(0, C)
    o_r = tl.arange(0, R)
    tl.store(dpm_out + (tl.cast(i_chunk, tl.int64) * H + i_h) * R * R + o_c[:, None] * R + o_r[None, :], dpm)
    dpp = dpm * _qk(q, k, tbase, toffs, m_c, rbase, roffs, m_r, KD, C, R, BKT, DOT)
    e_c = tl.exp(gam_c)
    d_gam_c = tl.sum(dpp, axis=1)
    for kt in tl.range(0, KD, BKT, num_stages=1):
        o_k = kt + tl.arange(0, BKT)
        m_k = o_k < KD
        b = tl.zeros([C, BKT], dtype=tl.float32)  # dO S0ᵀ
        for vt in tl.range(0, VD, BV, num_stages=1):
            o_v = vt + tl.arange(0, BV)
            m_v = o_v < VD
            b += _dot(_tile(do, tbase, toffs, m_c, o_v, m_v, VD),
                        tl.trans(_state_tile(states, state, o_k, m_k, o_v, m_v, VD)), DOT_S)
        q_t = _tile(q, tbase, toffs, m_c, o_k, m_k, KD)
        _put(dq, tbase, toffs, m_c, o_k, m_k, KD, e_c[:, None] * b)
        d_gam_c += e_c * tl.sum(q_t * b, axis=1)
    d_g = _to_log_decays(d_gam_c, -tl.sum(dpp, axis=0), 0.0, NHP, C)
    tl.store(dg + tbase + toffs, tl.load(dg + tbase + toffs, mask=m_c, other=0.0) + d_g, mask=m_c)


@triton.jit
def chunk_delta_bwd_dk_tail(k, q, sym, dpm, dk, dq, chunk_starts, chunk_ends, H, KD: tl.constexpr,
                            VD: tl.constexpr, NH: tl.constexpr, NHP: tl.constexpr,
                            C: tl.constexpr, R: tl.constexpr, BKT: tl.constexpr,
                            BV: tl.constexpr, DOT: tl.constexpr):
    """The products of the R x R gradients with K and Q, one K tile per program:
    dk += (bgm + bgmᵀ) K + dpmᵀ Q and dq += dpm K."""
    i_chunk = tl.program_id(0)
    i_h = tl.program_id(1)
    i_k = tl.program_id(2)
    tok0 = tl.load(chunk_starts + i_chunk).to(tl.int64)
    eos = tl.load(chunk_ends + i_chunk).to(tl.int64)
    rbase, roffs, m_r = _rows(tok0, eos, i_h, H, NH, NHP, R)
    tbase, toffs, m_c = _tokens(tok0, eos, i_h, H, C)
    o_k = i_k * BKT + tl.arange(0, BKT)
    m_k = o_k < KD
    o_r = tl.arange(0, R)
    o_c = tl.arange(0, C)
    base = (tl.cast(i_chunk, tl.int64) * H + i_h) * R * R
    k_t = _tile(k, rbase, roffs, m_r, o_k, m_k, KD)
    _put(dq, tbase, toffs, m_c, o_k, m_k, KD, _tile(dq, tbase, toffs, m_c, o_k, m_k, KD)
         + _dot(tl.load(dpm + base + o_c[:, None] * R + o_r[None, :]), k_t, DOT))
    d_k = _tile(dk, rbase, roffs, m_r, o_k, m_k, KD) \
        + _dot(tl.load(sym + base + o_r[:, None] * R + o_r[None, :]), k_t, DOT)
    d_k += _dot(tl.load(dpm + base + o_r[:, None] + o_c[None, :] * R),
                  _tile(q, tbase, toffs, m_c, o_k, m_k, KD), DOT)
    _put(dk, rbase, roffs, m_r, o_k, m_k, KD, d_k)


# ------------------------------------------------------------------ launch configuration

CHUNK_SIZES = (16, 32, 64)
ROWS = 64  # step rows per chunk by default: 64 tokens of one step, 32 of two, 16 of three or four


def config(key_dim: int, value_dim: int, steps: int, chunk_size: int | None = None,
           gpu: bool = True, precision: Precision | None = None) -> dict:
    """The constexprs of every core kernel for these sizes. On a GPU, K and V are walked in
    tiles of 32; under the interpreter (``gpu=False``) one tile covers K or V (fewer, larger
    steps). DOT_R, DOT, DOT_S and DOT_T are ``precision``'s formats of the read, chunk, state
    and solve products (default: the "auto" policy for fp32 inputs)."""
    steps_p2 = triton.next_power_of_2(steps)
    chunk = chunk_size or max(16, ROWS // steps_p2)
    if chunk not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {', '.join(map(str, CHUNK_SIZES))}; got {chunk}")
    bk = max(16, triton.next_power_of_2(key_dim))
    bv = max(16, triton.next_power_of_2(value_dim))
    if precision is None:  # imported here: AOT builds load this file alone, outside the package
        import torch

        from .precision import resolve
        precision = resolve("auto", torch.float32, interpreted=not gpu)
    return dict(KD=key_dim, VD=value_dim, NH=steps, NHP=steps_p2, C=chunk, R=chunk * steps_p2,
                BKT=min(bk, 32) if gpu else bk, BV=min(bv, 32) if gpu else bv,
                DOT_R=precision.read, DOT=precision.chunk, DOT_S=precision.state,
                DOT_T=precision.solve)


# The classes of products in each kernel (recdsl.codegen.precision), hence its DOT constexprs.
# prepare's K Kᵀ (entering the solve) is ieee whatever the policy.
PRODUCTS = {
    "chunk_delta_prepare": ("solve",),
    "chunk_delta_fwd_h": ("state",),
    "chunk_delta_fwd_o": ("read",),
    "chunk_delta_bwd_dv": ("chunk",),
    "chunk_delta_bwd_dh": ("state", "solve"),
    "chunk_delta_bwd_dm": ("chunk",),
    "chunk_delta_bwd_dk": ("state",),
    "chunk_delta_bwd_dq": ("chunk", "state"),
    "chunk_delta_bwd_dk_tail": ("chunk",),
}
_CONSTEXPR = {"read": "DOT_R", "chunk": "DOT", "state": "DOT_S", "solve": "DOT_T"}
_HALF = ("fp16", "bf16")


# the kernels with the most live tiles take 8 warps (ptxas reports spills at 4); the others 4.
# bwd_dq is not one of them: at 8 warps ptxas capped it at 128 registers and spilled on sm_80
# (NH=2), at 4 it builds without spills for NH = 1..3, K = V = 64 and 128, on sm_80 and sm_90.
# With half operands (DOT fp16 or bf16) bwd_dv and bwd_dq take 8 too: at 4 they spilled on
# sm_80 at NH = 1 (255 registers, 16 and 40 bytes); at 8 they take 190 and 186 ("mixed"; 156
# for bwd_dq under "half"), no spills, for NH = 1..3 on sm_80 and sm_90.
_WIDE = ("chunk_delta_bwd_dm", "chunk_delta_bwd_dk")
_WIDE_HALF = ("chunk_delta_bwd_dv", "chunk_delta_bwd_dq")

# Caps (BKT, BV) on config's tiles for kernels that walk K and V inside one program. bwd_dk
# holds two [R, BKT] accumulators and multiplies with ieee (FMA) products: at 32 x 32 ptxas held
# it to 128 registers at 8 warps and spilled on sm_80 (K = V = 128, NH = 2), and at 4 warps it
# spilled on sm_90; at 16 x 16 it takes 64 to 116 registers, no spills, for NH = 1..3 and
# K = V = 64 and 128 on sm_80 and sm_90 (benchmarks/aot_matrix.py). The price: its du and Δ
# tiles are read once per K tile, twice as often as at 32.
_TILE_CAPS = {"chunk_delta_bwd_dk": (16, 16)}


def num_warps(kernel: str, cfg: dict) -> int:
    return 8 if kernel in _WIDE or (kernel in _WIDE_HALF and cfg["DOT"] in _HALF) else 4


def constexprs(kernel: str, cfg: dict) -> dict:
    """The constexprs of ``kernel``: ``cfg`` (from ``config``) with its tile caps applied and
    the DOT formats of its products only. Only kernels whose grid has no K or V axis have
    caps: the others' tiles are the grid's. bwd_dk's products are ieee unless half: its
    tf32x3 spilled on sm_80 (see _TILE_CAPS)."""
    used = {_CONSTEXPR[c] for c in PRODUCTS[kernel]}
    out = {k: v for k, v in cfg.items() if k not in _CONSTEXPR.values() or k in used}
    if kernel == "chunk_delta_bwd_dk" and out["DOT_S"] not in _HALF:
        out["DOT_S"] = "ieee"
    if kernel in _TILE_CAPS:
        bk, bv = _TILE_CAPS[kernel]
        out.update(BKT=min(cfg["BKT"], bk), BV=min(cfg["BV"], bv))
    return out


def dots(kernel: str, cfg: dict) -> str:
    """The formats of ``kernel``'s products, for build reports."""
    ce = constexprs(kernel, cfg)
    text = ", ".join(f"{c} {ce[_CONSTEXPR[c]]}" for c in PRODUCTS[kernel])
    return text + (", K Kᵀ ieee" if kernel == "chunk_delta_prepare" else "")


# argument types of each kernel for ahead-of-time builds (pointers to fp32 buffers, int64
# boundaries, the head count) and the variant built: every feature on
_P, _I = "*fp32", "*i64"
KERNELS = {
    "chunk_delta_prepare": ("k beta u g gr t_out w u_t", "chunk_starts chunk_ends", {}),
    "chunk_delta_fwd_h": ("k g w u_t h0 delta ht states", "cu_seqlens chunk_offsets",
                          {"USE_INITIAL": True}),
    "chunk_delta_fwd_o": ("k g q delta states o", "chunk_starts chunk_ends", {}),
    "chunk_delta_bwd_dv": ("k g q do du dread", "chunk_starts chunk_ends", {}),
    "chunk_delta_bwd_dh": ("k beta g gr t_in dread dht du dstates dh0", "cu_seqlens chunk_offsets",
                           {"USE_FINAL_GRAD": True}),
    "chunk_delta_bwd_dm": ("k beta g gr delta du dbeta dg dgr sym_out", "chunk_starts chunk_ends",
                           {}),
    "chunk_delta_bwd_dk": ("k beta g gr delta du states dstates dk dbeta dg dgr",
                           "chunk_starts chunk_ends", {}),
    "chunk_delta_bwd_dq": ("k g q delta states do dq dg dpm_out", "chunk_starts chunk_ends", {}),
    "chunk_delta_bwd_dk_tail": ("k q sym dpm dk dq", "chunk_starts chunk_ends", {}),
}


# the kernels with a READ variant (an erase beside a decay)
_READ_KERNELS = ("chunk_delta_prepare", "chunk_delta_bwd_dh", "chunk_delta_bwd_dm",
                 "chunk_delta_bwd_dk")


def aot_module(key_dim: int, value_dim: int, steps: int, chunk_size: int | None = None,
               read: bool = False, precision=None):
    """This file's kernels as an ``aot.GeneratedModule`` for a build report at these sizes
    (``read``: the READ variants of the kernels that have one, for a rule whose first erase
    stands beside a decay; the variant text says so; ``precision``: a
    ``recdsl.codegen.precision.Precision``, default the "auto" policy for fp32 inputs)."""
    from pathlib import Path

    from . import aot
    cfg = config(key_dim, value_dim, steps, chunk_size, precision=precision)
    variant = (f"K={key_dim} V={value_dim} NH={steps} chunk {cfg['C']} (rows {cfg['R']}), "
               f"K x V tiles {cfg['BKT']} x {cfg['BV']}"
               + "".join(f" ({k.removeprefix('chunk_delta_')} {min(cfg['BKT'], bk)} x {min(cfg['BV'], bv)})"
                         for k, (bk, bv) in _TILE_CAPS.items()))
    entries = []
    for name, (pointers, bounds, flags) in KERNELS.items():
        types = {a: _P for a in pointers.split()}
        types.update({a: _I for a in bounds.split()})
        types["H"] = "i32"
        text = variant
        if name in _READ_KERNELS:  # a defaulted constexpr must still be named to build it
            flags = {**flags, "READ": read}
            text += ", READ" if read else ""
        entries.append(aot.KernelEntry(name, types, {**constexprs(name, cfg), **flags},
                                       num_warps(name, cfg), text, dots(name, cfg)))
    return aot.GeneratedModule("chunk-delta", "chunk_delta_core.py", Path(__file__).read_text(), entries)
