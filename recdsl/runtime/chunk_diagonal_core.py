"""The chunkwise algebra of diagonal-family states, in batched PyTorch (no rule knowledge here).

A state ``S`` (``R x Cc``) evolves per token as

    S_t = exp(g_t) * diag(exp(a_t)) @ S_{t-1} @ diag(exp(b_t)) + sum_w left_tw right_twᵀ

with a scalar log-decay ``g`` and per-channel log-decays ``a`` (rows) and ``b`` (columns), any
of them absent. A read contracts one axis of the state after the token's update: ``x @ S``
(the rows) or ``S @ x`` (the columns). ``read`` takes the read in the orientation where ``x``
contracts the rows; the caller transposes for the other.

Layout: ``[b, nc, C, ...]`` (batch and heads folded into ``b``, ``nc`` chunks of ``C`` tokens,
``C`` a multiple of ``SUB``); writes carry a ``W`` axis (several writes per token).

**Decays in log space.** The decay between two tokens is ``exp(sum of the log-decays between
them)``. Each such sum, and the scalar decays' ``C x C`` matrix, is formed from sums over
at most one sub-chunk (below) and whole sub-chunk totals (Mamba-2's segment sums for the
matrix: cumulative sums of masked values), never as a difference ``cum_i - cum_j`` of
chunk-wide cumulative sums, which loses the precision of the larger sums and whose gradient
cancels the contributions of every token but those between i and j (the decay gradients of
fp32 runs then lost up to 30x the naive loop's error; now they are within 1-4x of it).
Decays are applied as products of these factors' exps (a product of small numbers, unlike
exp of a very negative one, takes no slow path). The exponents are sums of log-decays: <= 0
for decays in (0, 1]. The only positive exponents are the within-sub-chunk factors below,
bounded by ``LIMIT``.

**Per-channel decays: secondary chunking** (as GLA does). The chunk is cut into sub-chunks of
``SUB = 16`` tokens.

* Between a query sub-chunk ``I`` and an earlier key sub-chunk ``J`` the decay factors through
  the end ``r`` of sub-chunk ``I - 1``: ``decay(j -> i) = decay(j -> r) * decay(r -> i)``, both
  at most 1, so each of the ``nb (nb - 1) / 2`` block pairs is a matrix product over channels.
* Within a sub-chunk the decay factors through the middle of the sub-chunk's decay:
  ``exp(P_i - m) * exp(m - P_j)`` with ``P`` the cumulative sum from the sub-chunk start and
  ``m`` half the sub-chunk's total, a ``16 x 16`` matrix product whose factors stay within
  ``exp(±LIMIT)`` (``LIMIT = 20``) while the sub-chunk decays by less than ``exp(-2 LIMIT)``
  in every channel. A token's own write is not decayed and is taken exactly (its term would
  otherwise enter the decay gradients only to cancel there). Sub-chunks beyond that (strong
  gates) get exact ``16 x 16 x channels`` decays and sums instead.

Why this and not the plain factorisation ``exp(D_i) * exp(-D_j)`` over a whole chunk:
``exp(-D_j)`` overflows once the decays of one chunk add up below about -88 (fp32), and the
decay gradients cancel over 64 tokens instead of 16. Why not exact ``16 x 16 x channels``
decays everywhere: they are 16 per-token tensors as wide as the state; for Raven's 256 slots
they dominated time and memory (3x slower). They stay for strong gates only.

**Memory.** On the CPU every large temporary costs its page faults as well as its passes, so
the ops are arranged to allocate little: exponentials and products in place where autograd
allows, block matrices written into one buffer, no gathered copies of the queries, and under
``no_grad`` the states between chunks written into one tensor. Masks are 0/1 tensors that
values are multiplied by (masked_fill is several times slower on the CPU).

Everything is computed for all chunks at once; only the passing of states from chunk to chunk
(``states``) walks the chunks in order. Gradients come from autograd through these ops.
Decay factors and the write vectors scaled by them are cached on the ``LogDecay``, so states
that share decays and writes (Raven's two slot memories, both passes of its read) share them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch

SUB = 16  # sub-chunk length for per-channel decays
CHUNK = 64  # chunk length
LIMIT = 20.0  # largest log-decay factored out inside a sub-chunk (exp(20) = 5e8)

EXP_FLOOR = -80.0  # exp(-80) = 2e-35: no decay left; below about -87 fp32 exp is 50x slower


def _exp(x):
    """exp of a sum of log-decays (a new tensor), the sum clamped at EXP_FLOOR: torch's fp32
    exp takes a slow path for arguments whose result is subnormal, which strong gates produce
    by the million (the clamp, a pass of its own, only when some sum is below the floor)."""
    if x.numel() > 1 << 16 and bool(x.amin() >= EXP_FLOOR):
        return torch.exp(x)
    return x.clamp(min=EXP_FLOOR).exp_()


class LogDecay:
    """The log-decays ``[b, nc, C, n]`` of one axis (``n = 1`` for a scalar decay; finite
    values), the sums and decay factors the algorithm needs (cached), and a memo of write
    vectors scaled by them."""

    def __init__(self, log):
        self.log = log
        self.b, self.nc, self.C, self.n = log.shape
        self.nb = self.C // SUB
        self._memo = {}

    def remember(self, kind, values, compute):
        """``compute()``, once per ``kind`` and ``values`` (by storage, shape and strides)."""
        key = (kind, values.data_ptr(), tuple(values.shape), values.stride())
        if key not in self._memo:
            self._memo[key] = (values, compute())  # the values kept alive: the key stays unique
        return self._memo[key][1]

    # ---- sub-chunks
    @cached_property
    def _blocks(self):
        return self.log.view(self.b, self.nc, self.nb, SUB, self.n)

    @property
    def block_upto(self):
        """[b, nc, nb, SUB, n]: from the sub-chunk start through token i (not kept: its
        exp and a few reductions are)."""
        return _sums(self._blocks, "upto")

    @cached_property
    def block_totals(self):
        """[b, nc, nb, n]: each whole sub-chunk."""
        return self._blocks.sum(3)

    @property
    def exp_block_upto(self):
        return self._of_block_upto[0]

    @cached_property
    def _of_block_upto(self):
        """exp(P) and ``strong``: from the same sums P, not kept."""
        P, m = self.block_upto, self._middle[:, :, :, 0]
        strong = ((P.amax(3) - m > LIMIT) | (P.amin(3) - m < -LIMIT)).any(-1)
        return _exp(P), strong

    @cached_property
    def exp_block_to_end(self):
        """[b, nc, C, n]: the decay after token j to the end of its sub-chunk, from the sums
        over those tokens. (Not as exp(m - P) exp(t - m), t the sub-chunk's total: its
        gradient would reach every token of the sub-chunk and cancel on those up to j, and for
        the last keys, barely decayed, the residue swamped the gradients of strong decays:
        gla's dgk 5e-2 off at log-decays of -12.)"""
        return _exp(_sums(self._blocks, "after")).view(self.b, self.nc, self.C, self.n)

    @cached_property
    def exp_blocks_between(self):
        """[b, nc, pairs, n]: for each pair (I, J) of ``pairs``, the decay over the whole
        sub-chunks strictly between J and I."""
        I, J = _pairs(self.nb, self.log.device)
        # sum over J < K < I, as a product with a 0/1 matrix [pairs, nb]
        ar = torch.arange(self.nb, device=self.log.device)[None, :]
        span = (ar > J[:, None]) & (ar < I[:, None])
        return _exp(torch.matmul(span.to(self.log.dtype), self.block_totals))

    # ---- over the chunk: a sub-chunk's own sums and the totals of whole sub-chunks (as
    # products of their exps: exps are the costly passes, and a product of small decays,
    # unlike exp of a very negative number, takes no slow path)
    @cached_property
    def exp_before(self):
        """[b, nc, nb, 1, n]: the decay over the whole sub-chunks before each sub-chunk."""
        return _exp(_sums(self.block_totals, "before")).unsqueeze(3)

    @cached_property
    def exp_later(self):
        """[b, nc, nb, 1, n]: the decay over the whole sub-chunks after each sub-chunk."""
        return _exp(_sums(self.block_totals, "after")).unsqueeze(3)

    @cached_property
    def exp_upto(self):
        """[b, nc, C, n]: the decay from the chunk start through token i."""
        if self.n == 1:  # a scalar decay: small, one cumulative sum
            return _exp(_sums(self.log, "upto"))
        return (self.exp_block_upto * self.exp_before).view(self.b, self.nc, self.C, self.n)

    @cached_property
    def exp_to_end(self):
        """[b, nc, C, n]: the decay after token j to the chunk end."""
        if self.n == 1:
            return _exp(_sums(self.log, "after"))
        to_block_end = self.exp_block_to_end.view(self.b, self.nc, self.nb, SUB, self.n)
        return (to_block_end * self.exp_later).view(self.b, self.nc, self.C, self.n)

    def upto_times(self, x):
        """``x`` [b, nc, C, n] (a temporary: changed in place without autograd) times
        ``exp_upto``, without forming it."""
        x = mul(x, self.exp_block_upto.view(x.shape))
        return mul(x.view(self.b, self.nc, self.nb, SUB, -1), self.exp_before).view(x.shape)

    @cached_property
    def total(self):
        """[b, nc, n]: the whole chunk."""
        return self.log.sum(2) if self.n == 1 else self.block_totals.sum(2)

    @cached_property
    def decay_between(self):
        """[b, nc, C, C]: for a scalar decay, the decay after token j through token i (0 for
        j > i): exp of cumulative sums of masked values (Mamba-2's segment sums)."""
        causal, later = _masks(self.C, self.log)[3:]
        masked = self._one_chunk * later  # [.., k, j] = x_k for k > j
        return mul(_exp(masked.cumsum(-2)), causal)

    @cached_property
    def _one_chunk(self):
        """The log-decays, or those of the first chunk when every chunk has the same (a decay
        fixed per head, as retention's) and no gradient is recorded: ``C x C`` factors of them
        then broadcast over the chunks instead of being repeated."""
        first = self.log[:, :1]
        if self.nc > 1 and not recording(self.log) and torch.equal(self.log, first.expand_as(self.log)):
            return first
        return self.log

    # ---- within a sub-chunk
    @cached_property
    def _middle(self):
        """[b, nc, nb, 1, n]: m, half the sub-chunk's total. The product of the two factors
        does not depend on m, so m takes no gradient (which would only be rounding left
        over from cancelling terms)."""
        return 0.5 * self.block_totals.detach().unsqueeze(3)

    @property
    def strong(self):
        """[b, nc, nb] bool: sub-chunks whose sums P - m leave [-LIMIT, LIMIT] in some
        channel (for decays <= 1: a sub-chunk decaying below exp(-2 LIMIT))."""
        return self._of_block_upto[1]

    @cached_property
    def factored(self):
        """(exp(P - m), exp(m - P)), P - m clamped to [-LIMIT, LIMIT]: the within sub-chunk
        decays factored at the middle (exact where not ``strong``). Without strong
        sub-chunks P stays within [-2 LIMIT, 2 LIMIT], where exp(P) needs no clamp."""
        if self.strong.any():
            decay = torch.exp((self.block_upto - self._middle).clamp(-LIMIT, LIMIT))
        else:
            decay = self.exp_block_upto * torch.exp(-self._middle)
        return decay, torch.reciprocal(decay)

    def exact_within(self, at, W):
        """[nsel, n, SUB, SUB * W] (channels first) for the sub-chunks at ``at``: the decay
        after token j through token i, exactly (1 for j >= i: callers mask j > i)."""
        seg = _masks(SUB, self.log)[2]
        sums = (self._blocks[at].transpose(-1, -2) @ seg.T).unflatten(-1, (SUB, SUB))
        return _exp(_keys(sums, W, dim=-1))


@functools.lru_cache(maxsize=None)
def _masks_cached(L, dtype, device):
    ar = torch.arange(L, device=device)
    i, j = ar[:, None], ar[None, :]
    upto = (j <= i).to(dtype)  # [i, k]: k <= i
    after = (j > i).to(dtype)  # [j, k]: k > j
    k = ar[None, None, :]
    seg = ((k > ar[None, :, None]) & (k <= ar[:, None, None])).to(dtype).view(L * L, L)  # [(i, j), k]
    return upto, after, seg, (j <= i).to(dtype), (i > j).to(dtype)


def _masks(L, like):
    """0/1 matrices over L positions (multiplying by them is much faster than masked_fill on
    the CPU): ``upto`` [i, k] (k <= i), ``after`` [j, k] (k > j), ``seg`` [(i, j), k]
    (j < k <= i), ``causal`` [i, j] (j <= i) and ``later`` [k, j] (k > j)."""
    return _masks_cached(L, like.dtype, like.device)


@functools.lru_cache(maxsize=None)
def _below_cached(W, dtype, device):
    return torch.ones(SUB, SUB, dtype=dtype, device=device).tril(-1).repeat_interleave(W, dim=1)


def _below(W, like):
    """[SUB, SUB * W] 0/1: the key is a write of an earlier token of the sub-chunk (keys are
    token-major)."""
    return _below_cached(W, like.dtype, like.device)


def _sums(x, kind):
    """Along the token axis of ``x`` [..., L, n]: inclusive prefix sums (``upto``), exclusive
    prefix sums (``before``) or exclusive suffix sums (``after``). For a few tokens or one
    channel cumulative sums; else a product with a 0/1 matrix (PyTorch runs cumulative sums
    along a strided axis slowly on the CPU)."""
    L, n = x.shape[-2:]
    if kind == "before":
        return torch.cat([torch.zeros_like(x[..., :1, :]), _sums(x[..., :-1, :], "upto")], dim=-2)
    if n > 1 and L > 4:
        return torch.matmul(_masks(L, x)[0 if kind == "upto" else 1], x)
    if kind == "upto":
        return x.cumsum(-2)
    rest = x.flip(-2).cumsum(-2).flip(-2)  # from each token to the end
    return torch.cat([rest[..., 1:, :], torch.zeros_like(rest[..., :1, :])], dim=-2)


@dataclass
class Decays:
    """The log-decays of one state: ``scalar``, ``rows``, ``cols`` (``LogDecay`` or None)."""
    scalar: Optional[LogDecay] = None
    rows: Optional[LogDecay] = None
    cols: Optional[LogDecay] = None

    def transposed(self) -> "Decays":
        return Decays(self.scalar, self.cols, self.rows)


def _keys(x, W, dim=2):
    """Per-token values repeated for each of the token's W writes (keys are token-major)."""
    return x if W == 1 else x.repeat_interleave(W, dim=dim)


@functools.lru_cache(maxsize=None)
def _pairs(nb, device):
    """(I, J) sub-chunk pairs with J < I: the blocks below the diagonal, those of one I
    together (I = 1, 2, ...; pairs of I from I (I - 1) / 2)."""
    return tuple(torch.tril_indices(nb, nb, -1, device=device))


def recording(*tensors):
    """Whether autograd records ops on these tensors (else they may be changed in place)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def mul(a, b):
    """``a * b``, in place in ``a`` (a temporary) when autograd is not recording."""
    return a * b if recording(a, b) else a.mul_(b)


def addcmul(a, b, c):
    """``a + b * c``, in place in ``a`` (a temporary of the result's shape) when autograd is
    not recording."""
    return torch.addcmul(a, b, c) if recording(a, b, c) else a.addcmul_(b, c)


def add(a, b):
    """``a + b``, in place in ``a`` (a temporary of ``b``'s shape or larger) when autograd
    is not recording."""
    return a + b if recording(a, b) or a.shape != torch.broadcast_shapes(a.shape, b.shape) \
        else a.add_(b)




def _mm(a, b, add=None):
    """``a @ b`` (``+ add``) over equal leading dims, as one batched matrix multiply: torch's
    matmul copies an operand that is a transposed view; bmm takes it as it is."""
    lead = a.shape[:-2]
    a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    out = torch.bmm(a, b) if add is None else torch.baddbmm(add.reshape(-1, *add.shape[-2:]), a, b)
    return out.view(*lead, *out.shape[-2:])


# ============================================================ states between chunks


def states(decays: Decays, left, right, initial):
    """The state entering every chunk and the final state.

    ``left`` ``[b, nc, C, W, R]``, ``right`` ``[b, nc, C, W, Cc]`` (coefficients folded in),
    ``initial`` ``[b, R, Cc]``. Returns ``(starts [b, nc, R, Cc], final [b, R, Cc])``."""
    b, nc, C, W, R = left.shape
    Cc = right.shape[-1]
    G, A, B = decays.scalar, decays.rows, decays.cols
    # the chunk's own contribution: every write decayed to the chunk end
    lk = _to_end(left, [L for L in (G, A) if L is not None])
    rk = _to_end(right, [B] if B is not None else [])
    own = _mm(lk.reshape(b, nc, C * W, R).transpose(-1, -2), rk.reshape(b, nc, C * W, Cc))
    # the decay across a whole chunk, kept broadcastable ([b, nc, 1 or R, 1 or Cc])
    log_total = None
    for part in (G.total.unsqueeze(-1) if G is not None else None,
                 A.total.unsqueeze(-1) if A is not None else None,
                 B.total.unsqueeze(-2) if B is not None else None):
        if part is not None:
            log_total = part if log_total is None else log_total + part
    decay = None if log_total is None else _exp(log_total)
    if not recording(own, initial, *([] if decay is None else [decay])):
        # one buffer, each chunk's start written in place
        starts = own.new_empty(b, nc, R, Cc)
        starts[:, 0] = initial
        for c in range(1, nc):
            if decay is None:
                torch.add(own[:, c - 1], starts[:, c - 1], out=starts[:, c])
            else:
                torch.addcmul(own[:, c - 1], decay[:, c - 1], starts[:, c - 1], out=starts[:, c])
        last = starts[:, -1] if decay is None else decay[:, -1] * starts[:, -1]
        return starts, last + own[:, -1]
    # the only sequential part: the recurrence between chunks (unbind, not indexing: the
    # backward of one index per chunk would fill a whole-sequence gradient per chunk)
    S, starts = initial, []
    decays = decay.unbind(1) if decay is not None else [None] * nc
    for own_c, decay_c in zip(own.unbind(1), decays):
        starts.append(S)
        S = S + own_c if decay_c is None else torch.addcmul(own_c, decay_c, S)
    return torch.stack(starts, dim=1), S


def _to_end(values, logs):
    """``values`` [b, nc, C, W, n] decayed from each token to the chunk end by ``logs``:
    by the first, the decay to the end of the token's sub-chunk (shared with the reads'
    earlier sub-chunks) times that over the later sub-chunks."""
    if not logs:
        return values
    b, nc, C, W, n = values.shape
    L0 = logs[0]

    def compute():
        if L0.n == 1:  # a scalar decay: its (small) decay to the chunk end
            out = values * L0.exp_to_end.unsqueeze(3)
            for L in logs[1:]:
                out = mul(out, L.exp_to_end.unsqueeze(3))
            return out
        own_end = _to_own_end(values.reshape(b, nc, C * W, n), L0, W)
        out = own_end.view(b, nc, L0.nb, SUB * W, n) * L0.exp_later
        for L in logs[1:]:
            out = mul(out, _keys(L.exp_to_end, W).view(b, nc, L0.nb, SUB * W, -1))
        return out.view(b, nc, C, W, n)
    return logs[-1].remember(("to_end",) + tuple(id(L) for L in logs), values, compute)


def _to_own_end(values, L: LogDecay, W):
    """``values`` [b, nc, C * W, n] (keys) decayed to the end of their sub-chunk."""
    return L.remember(("to own end", W), values, lambda: values * _keys(L.exp_block_to_end, W))


# ============================================================ reads


def read(x, decays: Decays, u, w, starts):
    """``x_i @ S_i`` for every token, in the orientation where ``x`` contracts the rows.

    ``x`` ``[b, nc, C, d]``; ``decays`` with ``rows`` on the contracted axis (``d``) and
    ``cols`` on the free one (``f``); writes ``u`` ``[b, nc, C, W, d]``, ``w``
    ``[b, nc, C, W, f]``; ``starts`` ``[b, nc, d, f]``. Returns ``[b, nc, C, f]``."""
    b, nc, C, W, d = u.shape
    f = w.shape[-1]
    G, D, F = decays.scalar, decays.rows, decays.cols
    CK = C * W
    uk, wk = u.reshape(b, nc, CK, d), w.reshape(b, nc, CK, f)
    # the scores of the writes inside the chunk; with a decay on the contracted axis from
    # xe, x decayed from its sub-chunk's start, which then becomes (in place) x decayed from
    # the chunk start, for the state entering the chunk
    xe = None if D is None else x * D.exp_block_upto.view(x.shape)
    if W == 0:
        score = None
    elif D is None:
        score = mul(_mm(x, uk.transpose(-1, -2)),
                    _keys(G.decay_between, W, dim=3) if G is not None
                    else _keys(_masks(C, x)[3], W, dim=1))
    else:
        score = _channel_scores(x, xe, uk, D, W)  # causal already
        if G is not None:
            score = mul(score, _keys(G.decay_between, W, dim=3))
    # from the state entering the chunk (bmm keeps its operands, not its result: in place)
    xq = x if D is None else mul(xe.view(b, nc, D.nb, SUB, d), D.exp_before).view(x.shape)
    del xe
    out = _mm(xq, starts)
    del xq
    if G is not None:
        out = mul(out, G.exp_upto)
    if score is None:
        return out if F is None else F.upto_times(out)
    if F is None:
        if not recording(out, score, wk):  # into ``out``: no copy of it
            out.view(-1, C, f).baddbmm_(score.view(-1, C, CK), wk.reshape(-1, CK, f))
            return out
        return _mm(score, wk, add=out)
    return _channel_values(score, wk, F, W, out)


def _earlier(values, L: LogDecay, W):
    """For each query sub-chunk I = 1, 2, ...: the keys of the sub-chunks J < I (``values``
    [b, nc, C * W, n]) decayed to the end of sub-chunk I - 1 (to the end of J, then over the
    whole sub-chunks between), one [b, nc, I * SUB * W, n] tensor."""
    b, nc, CK, n = values.shape
    sk = CK // L.nb

    def compute():
        own_end = _to_own_end(values, L, W).view(b, nc, L.nb, sk, n)
        between = L.exp_blocks_between.unsqueeze(3)  # [b, nc, pairs, 1, n], those of I together
        return [(own_end[:, :, :I] * between[:, :, I * (I - 1) // 2:I * (I + 1) // 2])
                .view(b, nc, I * sk, n) for I in range(1, L.nb)]
    return L.remember(("earlier", W), values, compute)


def _factored_keys(values, L: LogDecay, W):
    """``values`` [b, nc, nb, SUB * W, n] times exp(m - P) of their token (see ``factored``)."""
    return L.remember(("factored", W), values,
                      lambda: values * _keys(L.factored[1], W, dim=3))


def _channel_scores(x, xe, uk, D: LogDecay, W):
    """score[i, key] = sum_d x_i[d] u_key[d] decay_d(key -> i) for keys up to i, 0 for later
    keys, by secondary chunking on the contracted axis (``xe``: x decayed from the start of
    its sub-chunk)."""
    b, nc, C, d = x.shape
    nb, sk, CK = D.nb, SUB * W, uk.shape[2]
    xb, ub = x.view(b, nc, nb, SUB, d), uk.view(b, nc, nb, sk, d)
    score = x.new_zeros(b, nc, nb, SUB, nb, sk)  # [.., I, i, J, key]
    # earlier sub-chunks: decay(j -> end of I - 1) * decay(end of I - 1 -> i)
    if nb > 1:
        keys = _earlier(uk, D, W)
        xr = xe.view(b, nc, nb, SUB, d)
        for I in range(1, nb):
            block = _mm(xr[:, :, I], keys[I - 1].transpose(-1, -2))
            score[:, :, I, :, :I] = block.view(b, nc, SUB, I, sk)
    # the sub-chunk itself: factored at the middle; own writes exactly
    within = _mm(xb * D.factored[0], _factored_keys(ub, D, W).transpose(-1, -2))
    if D.strong.any():  # strong decays: exact, channels first ([.., d, i, key])
        at = D.strong.nonzero(as_tuple=True)
        exact = (D.exact_within(at, W) * xb[at].transpose(-1, -2).unsqueeze(-1)
                 * ub[at].transpose(-1, -2).unsqueeze(-2)).sum(-3)
        within = within.index_put(at, exact)
    within = mul(within, _below(W, x))
    own = (xb.unsqueeze(-2) * ub.view(b, nc, nb, SUB, W, d)).sum(-1)  # [.., i, w]
    within.view(b, nc, nb, SUB, SUB, W).diagonal(0, 3, 4).copy_(own.transpose(-1, -2))
    score.diagonal(0, 2, 4).copy_(within.permute(0, 1, 3, 4, 2))
    return score.view(b, nc, C, CK)


def _channel_values(score, wk, F: LogDecay, W, start):
    """start_i[f] decayed from the chunk start to token i (``start`` [b, nc, C, f], changed in
    place without autograd) plus sum_key score[i, key] w_key[f] decay_f(key -> i), by
    secondary chunking on the free axis (score must be 0 for keys after i)."""
    b, nc, C, CK = score.shape
    f = wk.shape[-1]
    nb, sk = F.nb, SUB * W
    blocks = score.view(b, nc, nb, SUB, nb, sk)  # [.., I, i, J, key]
    wb = wk.view(b, nc, nb, sk, f)
    # the sub-chunk itself: factored at the middle; own writes exactly
    inner = blocks.diagonal(0, 2, 4).permute(0, 1, 4, 2, 3)  # [b, nc, nb, SUB, sk]
    within = _mm(inner * _below(W, score), _factored_keys(wb, F, W))  # times factored[0]
    own = (score.view(b, nc, nb, SUB, nb, SUB, W).diagonal(0, 2, 4).diagonal(0, 2, 3)
           .permute(0, 1, 3, 4, 2))  # [b, nc, nb, i, w]: the token's own writes
    strong = F.strong.any()
    if strong:  # strong decays: exact, channels first ([.., f, i, key])
        within = mul(within, F.factored[0])
        within = within + (own.unsqueeze(-1) * wb.view(b, nc, nb, SUB, W, f)).sum(-2)
        at = F.strong.nonzero(as_tuple=True)
        exact = (F.exact_within(at, W) * inner[at].unsqueeze(-3)
                 * wb[at].transpose(-1, -2).unsqueeze(-2)).sum(-1)
        within = within.index_put(at, exact.transpose(-1, -2))
    # the state entering the chunk and the earlier sub-chunks: decayed to the end of
    # sub-chunk I - 1, then all from there to token i
    acc = mul(start.view(b, nc, nb, SUB, f), F.exp_before)
    if nb > 1:
        keys = _earlier(wk, F, W)
        cross = [_mm(blocks[:, :, I, :, :I].reshape(b, nc, SUB, I * sk), keys[I - 1])
                 for I in range(1, nb)]
        if recording(acc, *cross):
            acc = acc + torch.cat([torch.zeros_like(acc[:, :, :1]), torch.stack(cross, 2)], 2)
        else:
            for I, c in enumerate(cross, 1):
                acc[:, :, I] += c
        del cross
    acc = mul(acc, F.exp_block_upto)
    if strong:
        acc = add(acc, within)
    else:
        acc = addcmul(acc, within, F.factored[0])
        if W == 1:
            acc = addcmul(acc, own, wb)
        else:
            acc = add(acc, (own.unsqueeze(-1) * wb.view(b, nc, nb, SUB, W, f)).sum(-2))
    return acc.view(b, nc, C, f)
