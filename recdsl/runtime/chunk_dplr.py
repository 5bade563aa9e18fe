"""backend="chunk" for the DPLR family: the Triton core ``recdsl.codegen.chunk_dplr`` behind a
torch.autograd.Function.

The rule's prologue is PyTorch, for now: ``torch_chunk_dplr.run`` builds each state's canonical
per-sub-step tensors from the rule's inputs and params (log-decays, a, b, writes, read vectors;
the same code as backend "torch-chunk") and hands them to ``_core`` here, so autograd carries
the core's gradients back to the rule's inputs, params and initial states. (The issue asks for
the prologue generated into the kernels, as the delta family has it: not done yet.)

``_core`` lays the sub-steps out as the core's rows (one rank-one factor, one write and one read
per row): a sub-step with r writes becomes r rows (the later ones write only), a state read by
R outputs gets R - 1 identity rows after each token's last sub-step, and each chunk is padded
with identity rows to the core's L rows. Decays that may be negative (``tanh(c) * S``): the core
has no signs; ``_fold_signs`` moves them into a, b, the writes and the reads (exactly).

Inputs of any float dtype are computed in fp32 and returned in the call's compute dtype. For
the backward the forward keeps, per chunk, the entry state, T, A_bx, Q_a, Q_x ([L, L]), B̃, Ã,
X̃, Q̃ ([L, K]), W and E ([L, V]): about 4x the canonical inputs plus one state a chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from ..errors import BackendError
from ..ir import dplr
from . import torch_chunk_dplr
from .recurrent import check_device


def problem(rule):
    return torch_chunk_dplr.problem(rule)


def _kernels():
    from ..codegen import chunk_dplr  # triton.jit runs at import: after TRITON_INTERPRET is set
    return chunk_dplr


def _launch(kern, name, cfg, grid, *args, **flags):
    getattr(kern, name)[grid](*args, **kern.constexprs(name, cfg), **flags,
                              num_warps=kern.num_warps(name, cfg))


class _ChunkDplrFunction(torch.autograd.Function):
    """(g, a, b, x, q [nc, Z, L, K], y [nc, Z, L, V], S0 [Z, K, V], fp32) -> (o [nc, Z, L, V],
    final state [Z, K, V])."""

    @staticmethod
    def forward(ctx, cfg, g, a, b, x, y, q, s0):
        kern = _kernels()
        nc, Z, L, K = g.shape
        V = y.shape[-1]
        nv = triton.cdiv(V, cfg["BV"])
        f32 = dict(dtype=torch.float32, device=g.device)
        sq = [torch.empty(nc, Z, L, L, **f32) for _ in range(4)]  # T, A_bx, Q_a, Q_x
        rows = [torch.empty(nc, Z, L, K, **f32) for _ in range(4)]  # B̃, Ã, X̃, Q̃
        dl = torch.empty(nc, Z, K, **f32)
        _launch(kern, "chunk_dplr_prepare", cfg, (nc, Z), g, a, b, x, q, *sq, *rows, dl, Z)
        o, w, e = (torch.empty_like(y) for _ in range(3))
        states = torch.empty(nc, Z, K, V, **f32)
        ht = torch.empty(Z, K, V, **f32)
        _launch(kern, "chunk_dplr_fwd_h", cfg, (Z, nv), y, *sq, *rows, dl, s0, o, w, e, states,
                ht, nc, Z, USE_INITIAL=True)
        ctx.cfg = cfg
        ctx.save_for_backward(g, a, b, x, y, q, *sq, *rows, dl, w, e, states)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        kern = _kernels()
        cfg = ctx.cfg
        g, a, b, x, y, q, t, abx, qa, qx, bt, at, xt, qt, dl, w, e, states = ctx.saved_tensors
        nc, Z, L, K = g.shape
        V = y.shape[-1]
        nv = triton.cdiv(V, cfg["BV"])
        f32 = dict(dtype=torch.float32, device=g.device)
        do = do.contiguous() if do is not None else torch.zeros(nc, Z, L, V, **f32)
        dht = dht.contiguous() if dht is not None else torch.zeros(Z, K, V, **f32)
        dw, de, dy = (torch.empty_like(y) for _ in range(3))
        dstates = torch.empty_like(states)
        dh0 = torch.empty(Z, K, V, **f32)
        _launch(kern, "chunk_dplr_bwd_dh", cfg, (Z, nv), t, qa, bt, at, qt, dl, do, dht, dw, de,
                dstates, dh0, nc, Z, USE_FINAL_GRAD=True)
        _launch(kern, "chunk_dplr_bwd_dv", cfg, (nc, Z, nv), abx, qx, xt, dstates, do, dw, dy, Z)
        d_sq = [torch.empty_like(t) for _ in range(4)]  # of A_ab, A_bx, Q_a, Q_x
        _launch(kern, "chunk_dplr_bwd_dm", cfg, (nc, Z), y, t, w, e, do, dw, de, *d_sq, Z)
        grads = [torch.empty_like(g) for _ in range(5)]  # g, a, b, x, q
        _launch(kern, "chunk_dplr_bwd_dk", cfg, (nc, Z, triton.cdiv(K, cfg["BKT"])),
                g, a, b, x, q, y, e, do, dw, states, dstates, *d_sq, *grads, Z)
        dg, da, db, dx, dq = grads
        return None, dg, da, db, dx, dy, dq, dh0


def _rows_per_token(sp, sizes, readers: int) -> int:
    """The core's rows for one token of a state: r rows per sub-step (its writes), then the
    extra reads."""
    subs = torch_chunk_dplr._subs(sp, sizes)
    r = max([1] + [len(s.writes) for s in subs])
    return len(subs) * r + max(readers, 1) - 1


def _zeros_like_rows(t, n):
    """n zero rows shaped like t's rows along dim 3."""
    return t.new_zeros(*t.shape[:3], n, *t.shape[4:])


def _core(cfg):
    def core(g, neg, a, b, x, y, q, s0, m):
        dt = a.dtype
        nc, Z, L0, K = a.shape
        C, r, V = L0 // m, x.shape[-2], y.shape[-1]
        R = 1 if q is None else q.shape[3]
        sign_last = None
        if neg is not None:
            a, b, x, q, sign_last = _fold_signs(neg, a, b, x, q, m)

        def rows(t, first_only):  # [nc, Z, C m, (r,) n] -> [nc, Z, C, m r + R - 1, n]
            n = t.shape[-1]
            t = t.reshape(nc, Z, C, m, 1 if first_only else r, n)
            if first_only and r > 1:
                t = torch.cat([t, t.new_zeros(nc, Z, C, m, r - 1, n)], 4)
            t = t.reshape(nc, Z, C, m * r, n)
            return torch.cat([t, _zeros_like_rows(t, R - 1)], 3) if R > 1 else t

        g_r, a_r, b_r = rows(g, True), rows(a, True), rows(b, True)
        x_r, y_r = rows(x, False), rows(y, False)
        if q is None:
            q_r = torch.zeros_like(a_r)
        else:
            q_r = torch.cat([_zeros_like_rows(q, m * r - 1), q], 3) if m * r > 1 else q
        mp = m * r + R - 1
        L = cfg["L"]
        if C * mp > L:
            raise BackendError(f"chunk of {C} tokens x {mp} rows exceeds the core's {L} rows")

        def flat(t):  # [nc, Z, C, mp, n] -> [nc, Z, L, n] fp32, identity rows at the end
            t = F.pad(t.reshape(nc, Z, C * mp, t.shape[-1]), (0, 0, 0, L - C * mp))
            return t.to(torch.float32).contiguous()

        o, S = _ChunkDplrFunction.apply(cfg, flat(g_r), flat(a_r), flat(b_r), flat(x_r),
                                        flat(y_r), flat(q_r), s0.to(torch.float32).contiguous())
        if q is not None:
            o = o[:, :, : C * mp].reshape(nc, Z, C, mp, V)[:, :, :, m * r - 1:].to(dt)
        else:
            o = None
        S = S.to(dt)
        return o, S if sign_last is None else S * sign_last.unsqueeze(-1)
    return core


def _fold_signs(neg, a, b, x, q, m):
    """The core without signs for decays that may be negative: with σ_h the product of the
    decays' signs over the sequence's sub-steps up to h (per channel), the state
    S'_h = Diag(σ_h) S_h follows the same form with |λ_h|, a_h σ_h, b_h σ_{h-1}, x_h σ_h and
    reads q σ_h (σ_h = s_h σ_{h-1}, Diag(σ)^2 = I); S_0' = S_0 and the final state is
    Diag(σ_last) S'. Multiplications by ±1: exact, and constants to autograd. Returns (a, b, x,
    q, σ_last [Z, K])."""
    nc, Z, L0, K = a.shape
    counts = neg.detach().transpose(0, 1).reshape(Z, nc * L0, K).to(torch.int64).cumsum(1)
    flat = (1 - 2 * torch.remainder(counts, 2)).to(a.dtype)  # σ_h, in sequence order
    prev = torch.cat([flat.new_ones(Z, 1, K), flat[:, :-1]], 1)  # σ_{h-1}
    sig = flat.reshape(Z, nc, L0, K).transpose(0, 1)
    sig_prev = prev.reshape(Z, nc, L0, K).transpose(0, 1)
    if q is not None:  # token t reads after its last sub-step
        q = q * sig[:, :, m - 1::m].unsqueeze(-2)
    return a * sig, b * sig_prev, x * sig.unsqueeze(-2), q, flat[:, -1]


def _layout(rule, sizes, chunk_size=None):
    """(tokens per chunk, rows per chunk, the states' (K, V)) at these dim sizes: a chunk
    takes as many tokens as fill the core's rows at the largest rows-per-token of the states."""
    the_plan = dplr.plan(rule.analysis)
    per_token = 1
    for name, sp in the_plan.states.items():
        readers = sum(any(rp.state == name for rp in op.reads) for op in the_plan.outputs)
        per_token = max(per_token, _rows_per_token(sp, sizes, readers))
    chunk = chunk_size or max(1, _kernels().ROWS // per_token)
    shapes = {(sizes[sp.key_dim], sizes[sp.value_dim]) for sp in the_plan.states.values()}
    return chunk, chunk * per_token, sorted(shapes)


def core_shapes(rule, sizes) -> list:
    """(K, V, rows) of every core a call at these sizes launches (for the AOT build)."""
    _, rows, shapes = _layout(rule, sizes)
    return [(k, v, rows) for k, v in shapes]


def run(rule, call, chunk_size=None):
    """Outputs and final states of ``rule`` on a bound call (``chunk_size``: tokens per chunk;
    default as many as fill the core's rows)."""
    check_device(call.device, "chunk")
    reason = problem(rule)
    if reason is not None:
        raise BackendError(f"backend 'chunk' is not available for rule '{rule.name}': {reason}")
    chunk, rows, _ = _layout(rule, call.dim_sizes, chunk_size)
    return torch_chunk_dplr.run(rule, call, chunk, core=_core_for(rows, call.device),
                                backend="chunk")


def _core_for(rows, device):
    """The core at each state's own K and V (states may differ in size), ``rows`` a chunk."""
    cores = {}

    def core(g, neg, a, b, x, y, q, s0, m):
        K, V = g.shape[-1], y.shape[-1]
        if (K, V) not in cores:
            cores[K, V] = _core(_kernels().config(K, V, rows, gpu=device.type != "cpu"))
        return cores[K, V](g, neg, a, b, x, y, q, s0, m)
    return core
