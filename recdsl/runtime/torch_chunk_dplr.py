"""backend="torch-chunk" for the DPLR family: per-channel decays and rank-one factors
``(D - a bᵀ)`` between them, chunkwise in batched PyTorch, gradients by autograd.

The plan (``recdsl.ir.dplr``) gives each state's per-token ops in the canonical left
orientation. They are regrouped into ``m`` sub-steps per token of the one form

    S <- Diag(λ_h) S + a_h (b_hᵀ S) + sum_w x_hw y_hwᵀ                      (the read bᵀ S is
                                                                            of the state before
                                                                            the sub-step)

exactly, without dividing by any decay: a decay met before a sub-step's rank-one factor goes
into ``λ_h`` and scales ``b_h`` (``(I - a bᵀ) Diag(d) = Diag(d) - a (d ⊙ b)ᵀ``); a decay met
after it goes into ``λ_h`` and scales ``a_h`` and the writes made so far; ``(D - a bᵀ)`` with a
decay D beside the erase puts D into ``λ_h`` and leaves ``b_h`` alone (D may be 0). A rank-one
factor after a write starts a new sub-step. ``m`` is the same for every token (a ``for j in
NH`` block is unrolled).

A chunk holds ``L = C m`` sub-steps. With ``γ_h`` the chunk-local cumulative log-decay (per
channel, float64) and ``e_h = b_hᵀ S_{h-1}`` (the rank-one reads),

    E = B̃ S_0 + A_ab E + A_bx Y,     B̃_i = b_i ⊙ exp(γ_{i-1}),
    A_ab[i, j] = sum_c b_ic a_jc exp(γ_{i-1,c} - γ_{j,c})  (j < i),   A_bx likewise with x,

so ``E = (I - A_ab)^{-1} (B̃ S_0 + A_bx Y)`` (one unit lower triangular solve); the reads after a
token's last sub-step h and the state at the chunk's end are

    o_t = (q ⊙ exp(γ_h))ᵀ S_0 + sum_{j <= h} qᵀ Diag(exp(γ_h - γ_j)) (a_j e_j + X_j Y_j),
    S_L = exp(γ_L) ⊙ S_0 + sum_j Diag(exp(γ_L - γ_j)) (a_j e_j + X_j Y_j),

which are affine in ``S_0``; all chunks' ``(I - A_ab)^{-1}`` solves are batched, and the only
loop over chunks carries the state (``S' = λ_L S + Ãᵀ (M_1 S) + U``: two ``[L, K] x [K, V]``
matmuls a chunk); the reads of the entering states are batched after it.

The span decays ``exp(γ_i - γ_j)`` come factored when every decay is <= 1 (``_scores_factored``):
``A_ab``, ``A_bx`` and the reads' scores are plain matmuls of rows scaled by
``exp(γ_i - ρ)`` (<= 1) and columns scaled by ``exp(ρ - γ_j)``, with ``ρ`` the cumulative
log-decay at the start of the row's sub-chunk (``SUB_TOKENS`` tokens), at or before the row, so
that no row sees a later token's gate (fla #1240). A row whose own scale falls below
``exp(-SPREAD_LIMIT)`` (a strong gate earlier in its sub-chunk; its columns' scales would pass
``exp(SPREAD_LIMIT)``) is recomputed by the exact pairwise form, as is everything when some
decay exceeds 1 (``_scores_pairwise``): ``exp`` of a masked difference of float64 cumulative
sums, ``[L, L, K]``, which never overflows for decays <= 1: a gate of 0 or -1e4 is exact in
both. Log-decays are floored at ``LOG_FLOOR`` (a decay of exactly 0 has log -inf; ``exp`` of
anything below the floor is 0 in float64 as in float32, so the floor changes nothing). A decay that may
be negative is taken as ``log |d|`` and a sign, its sign over a span the parity of the count
of negative decays in it.

Not run here (``problem`` says why): reads along the value axis (``S @ x`` of a canonical
state), value-axis decays, chained reads. Packed sequences, initial states and final states
follow ``torch_chunk_delta``'s layout (``_Chunks``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import BackendError
from ..ir import dplr
from .torch_chunk_delta import _Chunks, _Values

CHUNK_SIZE = 16  # tokens per chunk (16 and 32 tested)
LOG_FLOOR = -1.0e4  # exp(-1e4) is 0 in float64
SUB_TOKENS = 16  # tokens per sub-chunk of the factored form (its reference points)
# largest |log| of a row or column scale of the factored form, by compute dtype: exp(60) is
# far inside float32's range (exp(88)), with room for the vectors' own magnitudes
SPREAD_LIMIT = {torch.float64: 600.0, torch.float32: 60.0, torch.bfloat16: 60.0,
                torch.float16: 8.0}


# ============================================================ the plan as sub-steps


@dataclass(eq=False)
class _Sub:
    """One sub-step: Diag(λ) S + a (bᵀ S) + sum x yᵀ; expressions with their loop index.
    ``decays``: [(expr, kind, loop)]; ``a``/``b``: [coef or None, vec, loop, [scales]];
    ``writes``: [[coef, x, y, loop, [scales]]] (a scale: (decay expr, kind, loop))."""
    decays: list = field(default_factory=list)
    a: Optional[list] = None
    b: Optional[list] = None
    writes: list = field(default_factory=list)


def _subs(sp: dplr.StatePlan, sizes) -> list:
    """A token's sub-steps for one state (loops unrolled)."""
    flat = []
    for it in sp.items:
        if isinstance(it, dplr.LoopOps):
            for j in range(sizes[it.dim]):
                flat.extend((op, {it.var: j}) for op in it.ops)
        else:
            flat.append((it, None))
    subs = [_Sub()]
    for op, loop in flat:
        cur = subs[-1]
        if isinstance(op, dplr.Decay):
            d = (op.decay, op.kind, loop)
            cur.decays.append(d)
            if cur.a is not None:
                cur.a[3].append(d)
            for w in cur.writes:
                w[4].append(d)
        elif isinstance(op, dplr.RankOne):
            if cur.a is not None or cur.writes:
                cur = _Sub()
                subs.append(cur)
            cur.b = [None, op.key, loop, list(cur.decays)]
            cur.a = [op.coef.negate(), op.vec, loop, []]
            if op.diag is not None:
                cur.decays.append((op.diag.decay, op.diag.kind, loop))
        else:
            cur.writes.append([op.coef, op.left, op.right, loop, []])
    return subs


def problem(rule) -> Optional[str]:
    """None when this module runs ``rule``; else why not, in one line."""
    try:
        dplr.plan(rule.analysis)
    except dplr.NotDplr as e:
        return e.reason
    return None


# ============================================================ the chunk algebra


def _span_decay(diff, neg_diff, dt):
    """exp(diff) (float64 log-differences, -inf where masked) in ``dt``, with the sign of
    the negative-decay count ``neg_diff`` (or None)."""
    d = diff.to(dt).exp()
    if neg_diff is not None:
        d = d * (1 - 2 * torch.remainder(neg_diff, 2)).to(dt)
    return d


def _pairs(rows, cols, mask, neg_rows=None, neg_cols=None, dt=torch.float32):
    """exp(rows_i - cols_j) where mask[i, j], else 0: [..., I, J, K]."""
    diff = rows.unsqueeze(-2) - cols.unsqueeze(-3)
    diff = torch.where(mask[..., None], diff, torch.full_like(diff, -torch.inf))
    neg = None if neg_rows is None else neg_rows.unsqueeze(-2) - neg_cols.unsqueeze(-3)
    return _span_decay(diff, neg, dt)


def _scores_pairwise(gam, gprev, ncum, nprev, a, b, x, q, m, dt):
    """(A_ab [nc, Z, L, L], A_bx [nc, Z, L, L r], Qa [nc, Z, C R, L], Qx [nc, Z, C R, L r]) by
    the pairwise ``[L, L, K]`` form: exact for any decays (also decays above 1)."""
    nc, Z, L, K = a.shape
    r = x.shape[-2]
    dev = a.device
    idx = torch.arange(L, device=dev)
    strict = idx[None, :] < idx[:, None]  # [i, j]: j < i
    G1 = _pairs(gprev, gam, strict, nprev, ncum, dt)  # [nc, Z, L, L, K]
    bG = b.unsqueeze(-2) * G1
    A_ab = (bG * a.unsqueeze(-3)).sum(-1)  # [nc, Z, L, L]
    A_bx = torch.einsum("...ijc,...jwc->...ijw", bG, x).reshape(nc, Z, L, L * r)
    Qa = Qx = None
    if q is not None:
        C, Rn = q.shape[2], q.shape[3]
        h = torch.arange(C, device=dev) * m + (m - 1)
        gh = gam[:, :, h]  # [nc, Z, C, K]
        nh = None if ncum is None else ncum[:, :, h]
        incl = idx[None, :] <= h[:, None]  # [t, j]
        G2 = _pairs(gh, gam, incl, nh, ncum, dt)  # [nc, Z, C, L, K]
        qG = q.unsqueeze(-2) * G2.unsqueeze(-3)  # [nc, Z, C, R, L, K]
        Qa = (qG * a[:, :, None, None]).sum(-1).reshape(nc, Z, C * Rn, L)
        Qx = torch.einsum("...trjc,...jwc->...trjw", qG, x).reshape(nc, Z, C * Rn, L * r)
    return A_ab, A_bx, Qa, Qx


def _parity(n):
    """(-1)^n for float counts n."""
    return 1 - 2 * torch.remainder(n, 2)


class _Scores(torch.autograd.Function):
    """``R @ Cᵀ`` of the rescaled rows and columns of the factored scores, computed in the
    input dtype ``dt`` from ``R`` and ``C`` given in float64, with its backward in float64.

    A span's decay exp(γ_i - γ_j) is split into a row scale and a column scale, so the
    gradient of a gate g_t (the reverse cumulative sum of the scales' log-gradients) is the
    difference of the row and column parts of every span that starts after t: they cancel,
    leaving the spans across t. In float32 each part keeps the rounding of its own size,
    which the cancellation leaves behind (gate and decay-param gradients at 10x the naive
    loop's error). So the scaled rows and columns are formed in float64 (the exps too: a
    factor exp(±60) rounded from a float32 argument would be off by 60 ulp) and their
    gradients come back in float64; only the forward product runs in the input's dtype.
    Without autograd the rows and columns come in ``dt`` and nothing is widened."""

    @staticmethod
    def forward(ctx, R, C, dt):
        ctx.save_for_backward(R, C)
        return R.to(dt) @ C.to(dt).transpose(-1, -2)

    @staticmethod
    def backward(ctx, dout):
        R, C = ctx.saved_tensors
        d = dout.double()
        return d @ C, d.transpose(-1, -2) @ R, None


def _scores_factored(gam, gprev, ncum, nprev, a, b, x, q, m, dt):
    """The same four score matrices as ``_scores_pairwise`` for decays <= 1 (every log-decay
    <= 0, so ``γ`` falls along the chunk), as plain batched matmuls of rescaled rows.

    The chunk's sub-steps are cut into sub-chunks of ``SUB_TOKENS`` tokens; a row in sub-chunk
    p (an erase's read i, with ``γ_{i-1}``, or a token's read, with ``γ_h``) takes the
    reference ``ρ_p``, the cumulative log-decay at p's start: its row scale ``exp(γ_row - ρ_p)``
    is <= 1, the column scales ``exp(ρ_p - γ_j)`` are <= 1 for every j before p and >= 1
    inside p. Every reference is at or before its rows, so no row sees a later token's gate,
    not even in its rounding (fla #1240). A row whose own scale falls below
    ``exp(-SPREAD_LIMIT)`` in some channel (a strong gate inside its sub-chunk, before it)
    would meet column scales beyond ``exp(SPREAD_LIMIT)``: such rows, and only those, are
    recomputed by the exact pairwise form (``_exact_rows``; the choice too depends on earlier
    gates only). Column scales are capped at ``exp(SPREAD_LIMIT)``: the cap only touches
    masked entries of the rows that stay factored, which so stay finite (no 0 * inf in the
    gradients). Each sub-chunk's rows meet all L columns (the masked ones wasted): for
    ``P = L / (SUB_TOKENS m)`` sub-chunks the column scales take ``[P, L, K]``."""
    nc, Z, L, K = a.shape
    r = x.shape[-2]
    dev = a.device
    limit = SPREAD_LIMIT.get(dt, 60.0)
    C = L // m
    sub = SUB_TOKENS if C % SUB_TOKENS == 0 else C  # tokens per sub-chunk
    Ls, P = sub * m, C // sub  # sub-steps per sub-chunk, sub-chunks per chunk
    idx = torch.arange(L, device=dev)
    h = torch.arange(C, device=dev) * m + (m - 1)
    gh = gam[:, :, h]  # [nc, Z, C, K]: each token's read
    nh = None if ncum is None else ncum[:, :, h]
    if P == 1:  # the reference is the chunk's start, where γ = 0
        ref = None
        rexp_a, rexp_q = gprev, gh
        cexp = (-gam).clamp(max=limit).unsqueeze(2)  # [nc, Z, 1, L, K]
    else:
        ref = gprev[:, :, ::Ls].detach()  # [nc, Z, P, K]
        rexp_a = gprev - ref.repeat_interleave(Ls, 2)
        rexp_q = gh - ref.repeat_interleave(sub, 2)
        cexp = (ref.unsqueeze(3) - gam.unsqueeze(2)).clamp(max=limit)  # [nc, Z, P, L, K]
    # the rows and columns rescaled, in float64 where gradients will flow (``_Scores``),
    # signed where decays are negative; the scales' exps in float64 either way
    wide = torch.float64 if torch.is_grad_enabled() else dt
    signed = lambda scale, n: (scale if n is None else scale * _parity(n)).to(wide)
    cs = signed(cexp.exp(), None if ncum is None else ncum.unsqueeze(2))
    rows_b = (b.to(wide) * signed(rexp_a.exp(), nprev)).reshape(nc, Z, P, Ls, K)
    cols_a = a.unsqueeze(2).to(wide) * cs  # [nc, Z, P, L, K]
    cols_x = (x.unsqueeze(2).to(wide) * cs.unsqueeze(-2)).reshape(nc, Z, P, L * r, K)
    zero = torch.zeros((), dtype=dt, device=dev)
    strict = idx[None, :] < idx[:, None]  # [i, j]: j < i
    A_ab = torch.where(strict, _Scores.apply(rows_b, cols_a, dt).reshape(nc, Z, L, L), zero)
    A_bx = torch.where(strict.repeat_interleave(r, 1),
                       _Scores.apply(rows_b, cols_x, dt).reshape(nc, Z, L, L * r), zero)
    bad_a = rexp_a.detach().amin(-1) < -limit  # [nc, Z, L]
    if bool(bad_a.any()):
        A_ab, A_bx = _exact_rows(bad_a, gprev, nprev, b, idx, gam, ncum, a, x, dt, A_ab, A_bx)
    Qa = Qx = None
    if q is not None:
        Rn = q.shape[3]
        rows_q = (q.to(wide) * signed(rexp_q.exp(), nh).unsqueeze(-2)).reshape(
            nc, Z, P, sub * Rn, K)
        incl = (idx[None, :] <= h[:, None]).repeat_interleave(Rn, 0)  # [t R, j]
        Qa = torch.where(incl, _Scores.apply(rows_q, cols_a, dt).reshape(nc, Z, C * Rn, L), zero)
        Qx = torch.where(incl.repeat_interleave(r, 1),
                         _Scores.apply(rows_q, cols_x, dt).reshape(nc, Z, C * Rn, L * r), zero)
        bad_q = rexp_q.detach().amin(-1) < -limit  # [nc, Z, C]
        if bool(bad_q.any()):
            Qa, Qx = _exact_rows(bad_q.repeat_interleave(Rn, 2),
                                 gh.repeat_interleave(Rn, 2),
                                 None if nh is None else nh.repeat_interleave(Rn, 2),
                                 q.reshape(nc, Z, C * Rn, K), (h + 1).repeat_interleave(Rn),
                                 gam, ncum, a, x, dt, Qa, Qx)
    return A_ab, A_bx, Qa, Qx


def _exact_rows(bad, rows_g, rows_n, rows_v, lim, gam, ncum, a, x, dt, Sa, Sx):
    """Sa [nc, Z, I, L], Sx [nc, Z, I, L r] with the rows where ``bad`` [nc, Z, I] recomputed
    by the pairwise form: row i has log-decay rows_g[.., i, :] (and negative-decay count
    rows_n), vector rows_v[.., i, :], and the columns j < lim[i]."""
    L = gam.shape[2]
    r = x.shape[-2]
    ci, zi, ri = bad.nonzero(as_tuple=True)
    idx = torch.arange(L, device=gam.device)
    mask = idx[None, :] < lim[ri][:, None]  # [n, L]
    diff = rows_g[ci, zi, ri].unsqueeze(1) - gam[ci, zi]  # [n, L, K]
    diff = torch.where(mask[..., None], diff, torch.full_like(diff, -torch.inf))
    neg = None if ncum is None else rows_n[ci, zi, ri].unsqueeze(1) - ncum[ci, zi]
    pair = _span_decay(diff, neg, dt) * rows_v[ci, zi, ri].unsqueeze(1)
    ea = (pair * a[ci, zi]).sum(-1)  # [n, L]
    ex = torch.einsum("njc,njwc->njw", pair, x[ci, zi]).reshape(-1, L * r)
    return Sa.index_put((ci, zi, ri), ea), Sx.index_put((ci, zi, ri), ex)


def chunk_dplr(g, neg, a, b, x, y, q, S0, m):
    """The chunk recurrence of one state.

    g: [nc, Z, L, K] log |λ| (floored), neg: 1.0 where λ < 0 (or None), a, b: [nc, Z, L, K],
    x: [nc, Z, L, r, K], y: [nc, Z, L, r, V], q: [nc, Z, C, R, K] read vectors (or None; token
    t read after sub-step t m + m - 1), S0: [Z, K, V]. Returns (o [nc, Z, C, R, V] or None,
    final state [Z, K, V])."""
    dt = a.dtype
    nc, Z, L, K = a.shape
    r, V = y.shape[-2], y.shape[-1]
    dev = a.device
    gam = g.to(torch.float64).cumsum(2)
    gprev = torch.cat([torch.zeros_like(gam[:, :, :1]), gam[:, :, :-1]], 2)
    ncum = nprev = None
    if neg is not None:
        ncum = neg.to(torch.float64).cumsum(2)
        nprev = torch.cat([torch.zeros_like(ncum[:, :, :1]), ncum[:, :, :-1]], 2)
    # factored unless a decay exceeds 1 somewhere in the call (then the span decays are not
    # bounded by 1 and the pairwise form is the safe one)
    scores = _scores_factored if bool((g <= 0).all()) else _scores_pairwise
    A_ab, A_bx, Qa, Qx = scores(gam, gprev, ncum, nprev, a, b, x, q, m, dt)
    yf = y.reshape(nc, Z, L * r, V)
    Bt = b * _span_decay(gprev, nprev, dt)
    rhs = torch.cat([Bt, A_bx @ yf], -1)  # [nc, Z, L, K + V]
    eye = torch.eye(L, dtype=dt, device=dev)
    sol = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)
    M1, M2 = sol[..., :K], sol[..., K:]  # E = M1 S0 + M2

    gL = gam[:, :, -1:]  # [nc, Z, 1, K]
    nL = None if ncum is None else ncum[:, :, -1:]
    toend = _span_decay(gL - gam, None if ncum is None else nL - ncum, dt)  # [nc, Z, L, K]
    At = a * toend
    Xt = (x * toend.unsqueeze(-2)).reshape(nc, Z, L * r, K)
    decay = _span_decay(gL[:, :, 0], None if nL is None else nL[:, :, 0], dt).unsqueeze(-1)
    AtT = At.transpose(-1, -2)  # [nc, Z, K, L]
    U = AtT @ M2 + Xt.transpose(-1, -2) @ yf  # [nc, Z, K, V]

    # the state loop: E = M1 S + M2 (M2 added after it), S' = decay S + Atᵀ (M1 S) + U, two
    # [L, K] x [K, V] matmuls a chunk (cheaper than one K x K transition for L < K); unbind,
    # not M1[c]: the gradient of an indexed chunk is a zero tensor of all chunks
    S = S0
    states, reads = [], []
    for M1c, AtTc, Uc, dc in zip(M1.unbind(0), AtT.unbind(0), U.unbind(0), decay.unbind(0)):
        E = M1c @ S
        if q is not None:
            states.append(S)
            reads.append(E)
        S = torch.addcmul(torch.baddbmm(Uc, AtTc, E), dc, S)
    o = None
    if q is not None:
        C, Rn = q.shape[2], q.shape[3]
        h = torch.arange(C, device=dev) * m + (m - 1)
        gh = gam[:, :, h]  # [nc, Z, C, K]
        nh = None if ncum is None else ncum[:, :, h]
        Qt = (q * _span_decay(gh, nh, dt).unsqueeze(-2)).reshape(nc, Z, C * Rn, K)
        # o = Qt S_in + Qa (M1 S_in + M2) + Qx Y, all chunks at once
        E = torch.stack(reads) + M2
        o = Qt @ torch.stack(states) + Qa @ E + Qx @ yf
        o = o.reshape(nc, Z, C, Rn, V)
    return o, S


# ============================================================ run


def _token_values(values, sub, shape_k, shape_v, dt, dev):
    """(g, neg, a, b, xs, ys) of one sub-step, per token: g, neg, a, b [B, T, H, K]; xs
    [B, T, H, r, K], ys [B, T, H, r, V] (r >= 1, zeros when the sub-step writes nothing)."""
    g = torch.zeros(shape_k, dtype=dt, device=dev)
    neg = None
    for expr, kind, loop in sub.decays:
        ld, ng = values.log_decay(expr, loop)
        ld = ld.unsqueeze(-1) if kind == "scalar" else ld
        g = g + ld.to(dt)
        if ng is not None:
            ng = ng.unsqueeze(-1) if kind == "scalar" else ng
            neg = ng.expand(shape_k) if neg is None else neg + ng
    g = g.clamp_min(LOG_FLOOR)

    def scaled(vec, coef, loop, scales, shape):
        v = values.value(vec, loop)
        if coef is not None and not coef.is_one:
            v = v * values.value(coef.expr(), loop).unsqueeze(-1)
        for expr, kind, at in scales:
            d = values.value(expr, at)
            v = v * (d.unsqueeze(-1) if kind == "scalar" else d)
        return v.to(dt).expand(shape)

    if sub.a is None:
        a = b = torch.zeros(shape_k, dtype=dt, device=dev)
    else:
        a = scaled(sub.a[1], sub.a[0], sub.a[2], sub.a[3], shape_k)
        b = scaled(sub.b[1], None, sub.b[2], sub.b[3], shape_k)
    if not sub.writes:
        xs = torch.zeros(shape_k, dtype=dt, device=dev).unsqueeze(3)
        ys = torch.zeros(shape_v, dtype=dt, device=dev).unsqueeze(3)
    else:
        xs = torch.stack([scaled(x, None, loop, scales, shape_k)
                          for coef, x, y, loop, scales in sub.writes], 3)
        ys = torch.stack([scaled(y, coef, loop, [], shape_v)
                          for coef, x, y, loop, scales in sub.writes], 3)
    return g, neg, a, b, xs, ys


def run(rule, call, chunk_size: Optional[int] = None, core=None, backend="torch-chunk"):
    """Outputs ``[B, T, H, *shape]`` and final states ``[N, H, *dims]`` (compute dtype).
    ``core``: the chunk recurrence run on each state's canonical tensors, with
    ``chunk_dplr``'s signature (default ``chunk_dplr``; ``recdsl.runtime.chunk_dplr`` passes
    its Triton core), so both backends build those tensors from the rule here."""
    chunk = chunk_size or CHUNK_SIZE
    core = core or chunk_dplr
    try:
        the_plan = dplr.plan(rule.analysis)
    except dplr.NotDplr as e:
        raise BackendError(f"backend '{backend}' cannot run rule '{rule.name}': "
                           f"{e.reason}") from None
    values = _Values(rule, call)
    layout = _Chunks(call, chunk)
    dt, dev = call.compute_dtype, call.device
    B, T, H = call.batch, call.time, call.heads
    sizes = call.dim_sizes
    nc, N = layout.nc, layout.N

    parts = {o.name: [] for o in the_plan.outputs}
    finals = []
    for var in rule.ir.states:
        sp = the_plan.states[var.name]
        Kd, Vd = sizes[sp.key_dim], sizes[sp.value_dim]
        shape_k, shape_v = (B, T, H, Kd), (B, T, H, Vd)
        subs = _subs(sp, sizes)
        m = len(subs)
        per = [_token_values(values, s, shape_k, shape_v, dt, dev) for s in subs]
        r = max(p[4].shape[3] for p in per)

        def pad(t):  # [B, T, H, r', n] -> r slots
            if t.shape[3] == r:
                return t
            return torch.cat([t, t.new_zeros(*t.shape[:3], r - t.shape[3], t.shape[4])], 3)

        def chunked(items):  # per sub-step [B, T, H, ...] -> [nc, N*H, C*m, ...]
            x = torch.stack(items, 3) if len(items) > 1 else items[0].unsqueeze(3)
            x = layout.split(x)  # [nc, N, H, C, m, ...]
            return x.reshape(nc, N * H, chunk * m, *x.shape[5:])

        g = chunked([p[0] for p in per])
        neg = None
        if any(p[1] is not None for p in per):
            neg = chunked([p[1] if p[1] is not None else torch.zeros(shape_k, dtype=dt,
                                                                     device=dev) for p in per])
        a = chunked([p[2] for p in per])
        b = chunked([p[3] for p in per])
        x = chunked([pad(p[4]) for p in per])
        y = chunked([pad(p[5]) for p in per])

        # the reads of this state: one read vector per output reading it
        readers = []
        for op in the_plan.outputs:
            vecs = [values.value(rp.vector, None).to(dt).expand(shape_k)
                    * (values.value(rp.coef.expr(), None).to(dt).expand(B, T, H).unsqueeze(-1)
                       if not rp.coef.is_one else 1)
                    for rp in op.reads if rp.state == var.name]
            if vecs:
                readers.append((op.name, sum(vecs[1:], vecs[0])))
        q = None
        if readers:
            q = layout.split(torch.stack([v for _, v in readers], 3))  # [nc, N, H, C, R, K]
            q = q.reshape(nc, N * H, chunk, len(readers), Kd)
        S0 = call.initial_state(var.name).to(dt)
        if sp.orientation == "right":
            S0 = S0.transpose(-1, -2)
        S0 = S0.reshape(N * H, Kd, Vd)
        o, S = core(g, neg, a, b, x, y, q, S0, m)
        for i, (name, _) in enumerate(readers):
            parts[name].append(layout.merge(o[:, :, :, i].reshape(nc, N * H, chunk, Vd)))
        S = S.reshape(N, H, Kd, Vd)
        finals.append(S.transpose(-1, -2) if sp.orientation == "right" else S)

    outputs = {}
    for op in the_plan.outputs:
        full = (B, T, H) + tuple(sizes[d] for d in rule.ir.var(op.name).dims)
        value = None
        for p in parts[op.name]:
            value = p if value is None else value + p
        if op.extra is not None:
            e = values.value(op.extra, None).to(dt)
            e = e.reshape(e.shape + (1,) * (len(full) - e.dim())).expand(full)
            value = e if value is None else value + e
        if value is None:
            value = torch.zeros(full, dtype=dt, device=dev)
        outputs[op.name] = value
    return [outputs[o.name] for o in rule.ir.outputs], finals
