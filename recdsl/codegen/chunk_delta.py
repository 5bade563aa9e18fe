"""The chunkwise (WY / UT) Triton core of the delta family: a fixed template.

Per token t: a scalar log-decay g_t, then NH Householder-like steps
``S <- (I - beta_j k_j k_jᵀ) S + k_j u_jᵀ`` (the decay applied once, before the first step),
then the read ``o_t = Sᵀ q_t``. The rule-specific math that produces k, beta, u, g and q is the
generated prologue (``recdsl.codegen.prologue``); this core never changes with the rule.

A chunk is C tokens; its R = C * NHP rows are the tokens' steps, NHP = NH rounded up to a power
of two (a padding step has k = 0, beta = 0, u = 0: the identity). With γ the decay from the
chunk start to a row's token (a chunk-local sum of log-decays), S0 the state entering the chunk:

    M   = strict_lower(diag(beta) (K Kᵀ ⊙ exp(γ_r - γ_s)))         (R x R)
    T   = (I + M)^{-1}                  forward substitution in fp32 (registers, no tf32)
    Δ   = T (U - diag(beta exp(γ)) K S0)                             (the steps' new values)
    O   = diag(exp(γ_t)) Q S0 + P Δ,    P_tr = q_t·k_r exp(γ_t - γ_r) [token(r) <= t]
    S1  = exp(γ_C) S0 + (K ⊙ exp(γ_C - γ_r))ᵀ Δ

Every decay exponent is a segment sum of the log-decays (masked cumulative sums), never a
difference of two cumulative sums, so very negative gates cost no precision; exponents are
masked before exp() where the decay would not apply.

Kernels (all fp32, tl.dot with input_precision="ieee"):
- ``chunk_delta_fwd``: one program per (sequence, head, V tile); walks the chunks with the
  state in registers, stores it once per chunk (for the backward), writes O and the final state.
- ``chunk_delta_bwd_dh``: the same walk backwards: the gradient of the state entering each
  chunk, dS0 = diag(exp γ)Qᵀ dO + exp(γ_C) dS1 - (diag(beta exp γ) K)ᵀ Tᵀ dΔ, with
  dΔ = Pᵀ dO + (K ⊙ exp(γ_C - γ_r)) dS1; stores dS1 per chunk and dS of the initial state.
- ``chunk_delta_bwd``: one program per (chunk, head), chunks in parallel: recomputes M, T, P
  and (per V tile) Δ from the stored states, then the gradients of k, beta, u, g and q.

Layouts (NTOK = all tokens, packed; every sequence is a range of ``cu_seqlens``):
k [NTOK, H, NH, KD], beta [NTOK, H, NH], u [NTOK, H, NH, VD], g [NTOK, H], q [NTOK, H, KD],
o / do [NTOK, H, VD]; states [chunks, H, KD, VD]; h0 / ht [N, H, KD, VD].
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _chunk_setup(k, beta, g, q, tok0, tok_end, i_h, H, KD: tl.constexpr, NH: tl.constexpr,
                 NHP: tl.constexpr, C: tl.constexpr, R: tl.constexpr, BK: tl.constexpr):
    """Load one chunk's keys, betas, decays and reads; build T = (I + M)^{-1} and P."""
    o_r = tl.arange(0, R)
    tok_r = o_r // NHP
    step_r = o_r % NHP
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    m_k = o_k < KD
    m_r = (step_r < NH) & (tok0 + tok_r < tok_end)
    m_c = tok0 + o_c < tok_end
    row = ((tok0 + tok_r) * H + i_h) * NH + step_r
    b_k = tl.load(k + row[:, None] * KD + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
    b_beta = tl.load(beta + row, mask=m_r, other=0.0)
    b_q = tl.load(q + ((tok0 + o_c) * H + i_h)[:, None] * KD + o_k[None, :],
                  mask=m_c[:, None] & m_k[None, :], other=0.0)
    g_c = tl.load(g + (tok0 + o_c) * H + i_h, mask=m_c, other=0.0)
    # a token's decay sits on its first step's row
    g_r = tl.load(g + (tok0 + tok_r) * H + i_h, mask=m_r & (step_r == 0), other=0.0)
    # prefix sums from the chunk start (γ), and the suffix after each token (to the chunk end)
    gam_c = tl.sum(tl.where(o_c[None, :] <= o_c[:, None], g_c[None, :], 0.0), axis=1)
    suf_c = tl.sum(tl.where(o_c[None, :] > o_c[:, None], g_c[None, :], 0.0), axis=1)
    gam_last = tl.sum(g_c, axis=0)
    same_tok = tok_r[:, None] == o_c[None, :]
    gam_r = tl.sum(tl.where(same_tok, gam_c[None, :], 0.0), axis=1)
    suf_r = tl.sum(tl.where(same_tok, suf_c[None, :], 0.0), axis=1)
    # segment sums: seg_rr[r, s] = sum of decays of rows in (s, r]; seg_cr[t, r] = of tokens in (token(r), t]
    lower = o_r[:, None] > o_r[None, :]
    seg_rr = tl.cumsum(tl.where(lower, g_r[:, None], 0.0), axis=0)
    dec_rr = tl.where(lower, tl.exp(tl.where(lower, seg_rr, 0.0)), 0.0)
    causal = tok_r[None, :] <= o_c[:, None]
    seg_cr = tl.cumsum(tl.where(o_c[:, None] > tok_r[None, :], g_c[:, None], 0.0), axis=0)
    dec_cr = tl.where(causal, tl.exp(tl.where(causal, seg_cr, 0.0)), 0.0)
    kk = tl.dot(b_k, tl.trans(b_k), input_precision="ieee")
    m = b_beta[:, None] * kk * dec_rr
    # forward substitution for N = T - I (strictly lower): row i is -M_i - M_i N
    n = tl.zeros([R, R], dtype=tl.float32)
    for i in range(1, R):
        m_i = tl.sum(tl.where(o_r[:, None] == i, m, 0.0), axis=0)
        n_i = -m_i - tl.sum(m_i[:, None] * n, axis=0)
        n = tl.where(o_r[:, None] == i, n_i[None, :], n)
    t = n + tl.where(o_r[:, None] == o_r[None, :], 1.0, 0.0)
    p = tl.dot(b_q, tl.trans(b_k), input_precision="ieee") * dec_cr
    return b_k, b_beta, b_q, gam_c, gam_r, suf_r, gam_last, kk, dec_rr, dec_cr, t, p


@triton.jit
def chunk_delta_fwd(k, beta, u, g, q, h0, o, ht, states, cu_seqlens, chunk_offsets, H,
                    KD: tl.constexpr, VD: tl.constexpr, NH: tl.constexpr, NHP: tl.constexpr,
                    C: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    USE_INITIAL: tl.constexpr, STORE_STATES: tl.constexpr):
    i_n = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < KD)[:, None] & (o_v < VD)[None, :]
    o_r = tl.arange(0, R)
    o_c = tl.arange(0, C)
    state_offs = o_k[:, None] * VD + o_v[None, :]
    seq_state = (tl.cast(i_n, tl.int64) * H + i_h) * KD * VD
    if USE_INITIAL:
        s = tl.load(h0 + seq_state + state_offs, mask=m_kv, other=0.0)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
    for i_c in range(0, tl.cdiv(eos - bos, C)):
        tok0 = bos + i_c * C
        if STORE_STATES:
            tl.store(states + ((first_chunk + i_c) * H + i_h) * KD * VD + state_offs, s, mask=m_kv)
        b_k, b_beta, b_q, gam_c, gam_r, suf_r, gam_last, kk, dec_rr, dec_cr, t, p = _chunk_setup(
            k, beta, g, q, tok0, eos, i_h, H, KD, NH, NHP, C, R, BK)
        tok_r = o_r // NHP
        m_r = (o_r % NHP < NH) & (tok0 + tok_r < eos)
        m_c = tok0 + o_c < eos
        row = ((tok0 + tok_r) * H + i_h) * NH + o_r % NHP
        b_u = tl.load(u + row[:, None] * VD + o_v[None, :], mask=m_r[:, None] & (o_v < VD)[None, :],
                      other=0.0)
        ks = tl.dot(b_k, s, input_precision="ieee")
        y = b_u - (b_beta * tl.exp(gam_r))[:, None] * ks
        delta = tl.dot(t, y, input_precision="ieee")
        b_o = tl.exp(gam_c)[:, None] * tl.dot(b_q, s, input_precision="ieee") \
            + tl.dot(p, delta, input_precision="ieee")
        tl.store(o + ((tok0 + o_c) * H + i_h)[:, None] * VD + o_v[None, :],
                 b_o.to(o.dtype.element_ty), mask=m_c[:, None] & (o_v < VD)[None, :])
        s = tl.exp(gam_last) * s + tl.dot(tl.trans(b_k * tl.exp(suf_r)[:, None]), delta,
                                          input_precision="ieee")
    tl.store(ht + seq_state + state_offs, s, mask=m_kv)


@triton.jit
def chunk_delta_bwd_dh(k, beta, g, q, do, dht, dstates, dh0, cu_seqlens, chunk_offsets, H,
                       KD: tl.constexpr, VD: tl.constexpr, NH: tl.constexpr, NHP: tl.constexpr,
                       C: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       USE_FINAL_GRAD: tl.constexpr):
    i_n = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < KD)[:, None] & (o_v < VD)[None, :]
    o_c = tl.arange(0, C)
    state_offs = o_k[:, None] * VD + o_v[None, :]
    seq_state = (tl.cast(i_n, tl.int64) * H + i_h) * KD * VD
    if USE_FINAL_GRAD:
        ds = tl.load(dht + seq_state + state_offs, mask=m_kv, other=0.0)
    else:
        ds = tl.zeros([BK, BV], dtype=tl.float32)
    n_chunks = tl.cdiv(eos - bos, C)
    for i_rev in range(0, n_chunks):
        i_c = n_chunks - 1 - i_rev
        tok0 = bos + i_c * C
        tl.store(dstates + ((first_chunk + i_c) * H + i_h) * KD * VD + state_offs, ds, mask=m_kv)
        b_k, b_beta, b_q, gam_c, gam_r, suf_r, gam_last, kk, dec_rr, dec_cr, t, p = _chunk_setup(
            k, beta, g, q, tok0, eos, i_h, H, KD, NH, NHP, C, R, BK)
        m_c = tok0 + o_c < eos
        b_do = tl.load(do + ((tok0 + o_c) * H + i_h)[:, None] * VD + o_v[None, :],
                       mask=m_c[:, None] & (o_v < VD)[None, :], other=0.0).to(tl.float32)
        ddelta = tl.dot(tl.trans(p), b_do, input_precision="ieee") \
            + tl.exp(suf_r)[:, None] * tl.dot(b_k, ds, input_precision="ieee")
        dy = tl.dot(tl.trans(t), ddelta, input_precision="ieee")
        ds = tl.exp(gam_last) * ds \
            + tl.dot(tl.trans(b_q * tl.exp(gam_c)[:, None]), b_do, input_precision="ieee") \
            - tl.dot(tl.trans(b_k * (b_beta * tl.exp(gam_r))[:, None]), dy, input_precision="ieee")
    tl.store(dh0 + seq_state + state_offs, ds, mask=m_kv)


@triton.jit
def chunk_delta_bwd(k, beta, u, g, q, states, dstates, do, dk, dbeta, du, dg, dq,
                    chunk_starts, chunk_ends, H,
                    KD: tl.constexpr, VD: tl.constexpr, NH: tl.constexpr, NHP: tl.constexpr,
                    C: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    i_chunk = tl.program_id(0)
    i_h = tl.program_id(1)
    tok0 = tl.load(chunk_starts + i_chunk).to(tl.int64)
    eos = tl.load(chunk_ends + i_chunk).to(tl.int64)
    b_k, b_beta, b_q, gam_c, gam_r, suf_r, gam_last, kk, dec_rr, dec_cr, t, p = _chunk_setup(
        k, beta, g, q, tok0, eos, i_h, H, KD, NH, NHP, C, R, BK)
    o_k = tl.arange(0, BK)
    m_k = o_k < KD
    o_r = tl.arange(0, R)
    o_c = tl.arange(0, C)
    tok_r = o_r // NHP
    m_r = (o_r % NHP < NH) & (tok0 + tok_r < eos)
    m_c = tok0 + o_c < eos
    row = ((tok0 + tok_r) * H + i_h) * NH + o_r % NHP
    tok_c = (tok0 + o_c) * H + i_h
    state = (tl.cast(i_chunk, tl.int64) * H + i_h) * KD * VD
    bg = b_beta * tl.exp(gam_r)  # the rows of B = diag(beta exp γ) K
    dec_last = tl.exp(suf_r)
    e_c = tl.exp(gam_c)
    d_k = tl.zeros([R, BK], dtype=tl.float32)
    d_q = tl.zeros([C, BK], dtype=tl.float32)
    d_m = tl.zeros([R, R], dtype=tl.float32)  # dL of L = I + M, summed over V tiles
    d_p = tl.zeros([C, R], dtype=tl.float32)
    d_beta = tl.zeros([R], dtype=tl.float32)
    d_gam_r = tl.zeros([R], dtype=tl.float32)  # gradients of the exponents γ_r, γ_t, γ_C
    d_gam_c = tl.zeros([C], dtype=tl.float32)
    d_gam_last = tl.zeros([], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(VD, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < VD
        m_kv = m_k[:, None] & m_v[None, :]
        s0 = tl.load(states + state + o_k[:, None] * VD + o_v[None, :], mask=m_kv, other=0.0)
        ds1 = tl.load(dstates + state + o_k[:, None] * VD + o_v[None, :], mask=m_kv, other=0.0)
        b_u = tl.load(u + row[:, None] * VD + o_v[None, :], mask=m_r[:, None] & m_v[None, :], other=0.0)
        b_do = tl.load(do + tok_c[:, None] * VD + o_v[None, :], mask=m_c[:, None] & m_v[None, :],
                       other=0.0).to(tl.float32)
        ks = tl.dot(b_k, s0, input_precision="ieee")
        delta = tl.dot(t, b_u - bg[:, None] * ks, input_precision="ieee")
        kds = tl.dot(b_k, ds1, input_precision="ieee")
        ddelta = tl.dot(tl.trans(p), b_do, input_precision="ieee") + dec_last[:, None] * kds
        dy = tl.dot(tl.trans(t), ddelta, input_precision="ieee")
        tl.store(du + row[:, None] * VD + o_v[None, :], dy, mask=m_r[:, None] & m_v[None, :])
        d_m -= tl.dot(dy, tl.trans(delta), input_precision="ieee")
        d_p += tl.dot(b_do, tl.trans(delta), input_precision="ieee")
        # through B in Y = U - B S0, through (K ⊙ exp(γ_C - γ_r))ᵀ Δ in S1, through Q S0 in O
        d_k += -bg[:, None] * tl.dot(dy, tl.trans(s0), input_precision="ieee") \
            + dec_last[:, None] * tl.dot(delta, tl.trans(ds1), input_precision="ieee")
        d_q += e_c[:, None] * tl.dot(b_do, tl.trans(s0), input_precision="ieee")
        d_bg = -tl.sum(dy * ks, axis=1)
        d_beta += tl.exp(gam_r) * d_bg
        d_gam_r += bg * d_bg
        kd_dot = dec_last * tl.sum(delta * kds, axis=1)
        d_gam_r -= kd_dot
        d_gam_last += tl.sum(kd_dot, axis=0) + tl.exp(gam_last) * tl.sum(tl.sum(s0 * ds1, axis=1), axis=0)
        d_gam_c += e_c * tl.sum(b_do * tl.dot(b_q, s0, input_precision="ieee"), axis=1)
    # through M_rs = beta_r (k_r·k_s) exp(γ_r - γ_s), s < r
    lower = o_r[:, None] > o_r[None, :]
    d_m = tl.where(lower, d_m, 0.0)
    gm = d_m * dec_rr
    d_beta += tl.sum(gm * kk, axis=1)
    bgm = b_beta[:, None] * gm
    d_k += tl.dot(bgm, b_k, input_precision="ieee") + tl.dot(tl.trans(bgm), b_k, input_precision="ieee")
    dmm = d_m * (b_beta[:, None] * kk * dec_rr)
    d_gam_r += tl.sum(dmm, axis=1) - tl.sum(dmm, axis=0)
    # through P_tr = (q_t·k_r) exp(γ_t - γ_r)
    dpm = d_p * dec_cr
    d_q += tl.dot(dpm, b_k, input_precision="ieee")
    d_k += tl.dot(tl.trans(dpm), b_q, input_precision="ieee")
    dpp = d_p * p
    d_gam_c += tl.sum(dpp, axis=1)
    d_gam_r -= tl.sum(dpp, axis=0)
    # exponents -> log-decays: γ_t is the sum of g up to t, γ_C of all of them
    same_tok = tok_r[None, :] == o_c[:, None]
    d_tok = d_gam_c + tl.sum(tl.where(same_tok, d_gam_r[None, :], 0.0), axis=1)
    d_g = tl.sum(tl.where(o_c[None, :] >= o_c[:, None], d_tok[None, :], 0.0), axis=1) + d_gam_last
    tl.store(dk + row[:, None] * KD + o_k[None, :], d_k, mask=m_r[:, None] & m_k[None, :])
    tl.store(dbeta + row, d_beta, mask=m_r)
    tl.store(dq + tok_c[:, None] * KD + o_k[None, :], d_q, mask=m_c[:, None] & m_k[None, :])
    tl.store(dg + tok_c, d_g, mask=m_c)
