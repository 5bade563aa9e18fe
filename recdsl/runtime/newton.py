"""The Newton (ParaRNN) backend: any rule whose step is differentiable in its states. For a
diagonal or narrow block-diagonal Jacobian every token's step is evaluated in parallel over T
and the sequential dependence is left to linear scans; for a dense one (or blocks wider than
``BLOCK_SCAN_MAX``) the forward is the sequential pass and only the backward's Jacobians are
formed in parallel.

A rule's token is ``h_t = f(h_{t-1}, x_t)`` (all states stacked into ``h``). Guess every
``h_t`` (the initial state), then iterate: evaluate ``f`` and its Jacobian ``J_t`` at every
token's guessed previous state at once, and solve the linearised recurrence
``h_t = J_t h_{t-1} + (f_t - J_t h^guess_{t-1})`` with a scan over T. After k iterations the
first k tokens are exact, so it ends; contracting cells converge in a few iterations (an
affine rule in one, then one evaluation confirms). It stops when the residual
``f(h_{t-1}) - h_t`` is within fp32 rounding of the states (``TOLERANCE_ULPS`` times eps times
each state's largest magnitude). Far from the solution a linearisation can overshoot (sLSTM:
its normaliser pushed through zero, then ``c / n``); an update that is not finite or more than
``GROWTH`` times beyond what ``f`` gives is refused and the solve restarts on a window of T a
quarter as long, after the tokens already converged (down to one token, which one
linearisation solves exactly): the sequential pass finishing the solve, a window at a time.
Only where ``f`` itself is not finite, or ``MAX_ITERATIONS`` pass in a one-token window, does
it warn and run the sequential loop.

The structure of ``J`` comes from the symbolic analysis (``recdsl.ir.jacobian``): block-diagonal
over channel dims with blocks of width k. Its numbers come from generated code
(``recdsl.codegen.jacobian_step``): the step and ``J`` in one pass, by forward-mode tangent
matrices (a diagonal ``J`` is elementwise expressions; ``sigmoid(x + R @ h)``'s tangent is
``sigmoid' * R``, no product over k). The scan is elementwise for a diagonal ``J``
(``scan_core``) and a chunked scan of small matrices for blocks up to ``BLOCK_SCAN_MAX`` wide
(blocks up to 4 wide as planes of their entries).

Dense ``J`` (``R @ h``) or wider blocks: a parallel scan of k x k matrices costs k^3 per token
(ParaRNN itself keeps to diagonal and block-diagonal cells), and Newton would need several
passes of it. So the forward is the sequential pass: one call of the generated step per token,
batched over B and H, without autograd (exact, so no Newton iteration confirms it; its
``iterations`` are reported as 0). The backward is sequential too, but cheap per token: the
Jacobians are formed in parallel, a small slice of tokens at a time (``CACHE_BUDGET``: their
passes stay in cache), time-major, and each token then costs one batched vector-matrix product
(``_Solve._reverse``).

Backward, at the converged states: ``g_t = dL/dh_t`` solves the reverse recurrence
``g_t = dfinal_t + J_{t+1}^T g_{t+1} + u_{t+1}`` (``u_t`` the outputs' gradient reaching
``h_{t-1}``), the same scans over reversed time (dense: token by token, above); then one
vector-Jacobian product of the step per token, batched over a slice of T, gives the gradients
of the inputs, params and initial states.

Tokens are processed in slices of T small enough that the largest temporary of a call stays
under ``TEMP_BUDGET`` entries (the Jacobian step's tangents and ``J`` count, see
``_Plan.jacobian_widest``). The generated step sums products of two operands (``R @ h``) with
one einsum (``printers.fused_sums``) and takes params as ``[1, H, ...]``, broadcast.
Packed sequences reset at their starts: there the previous state is the sequence's initial
state, so the linear recurrence has ``J = 0`` and the reverse one stops at the boundary.

The solves run in PyTorch on the CPU and in Triton kernels on CUDA (``newton_triton``); the
step and its Jacobian stay PyTorch. The backward is not itself differentiable
(``once_differentiable``: a second derivative raises).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from math import prod

import torch
from torch.autograd.function import once_differentiable
from torch.func import vjp

from ..codegen.loader import load_function
from ..codegen.printers import fused_sums
from ..codegen.naive import run_naive
from ..codegen.jacobian_step import jacobian_source
from ..codegen.torch_step import step_source
from ..ir.jacobian import structure
from ..ir.ssa import Elementwise, Reduce
from . import newton_triton
from .scan_core import scan as elementwise_scan

MAX_ITERATIONS = 30  # per window of T
MIN_WINDOW = 1  # the shortest window (one token converges in one linearisation, if f is finite)
WINDOW_SHRINK = 4  # a window where a linearisation overshoots is cut to 1/4
TOLERANCE_ULPS = 64  # residual allowed, in units of the state's rounding (eps * its max)
GROWTH = 1e3  # an update this many times beyond f's largest value is an overshoot
BLOCK_SCAN_MAX = 16  # blocks up to this wide: a parallel scan; wider: token by token
# devices where the forward is the sequential pass for every structure: on the CPU one call of
# the generated step per token (about a dozen small ops) beats Newton's four or five
# linearisations and scans over all of T (bench_newton, T = 4096: ParaGRU 0.40 s against
# 1.4 s, ParaLSTM 0.45 s against 3.0 s); a GPU runs each of those passes at once
SEQUENTIAL_DEVICES = ("cpu",)
TEMP_BUDGET = 1 << 24  # entries of one step call's largest temporary (sets the slice of T)
CACHE_BUDGET = 1 << 20  # the same for the dense backward's J slices (their passes stay in cache)

# iterations and structure of the last call (the benchmark prints them)
last_run = {}


def problem(rule):
    """Why the newton backend cannot run ``rule`` (None: it can)."""
    info = rule.family_info
    parallel = [f for f in ("delta", "diagonal", "dplr", "scan") if info.accepts(f)]
    if parallel or info.staged is not None:  # Newton would only linearise an affine rule again
        way = f"the {parallel[0]} family" if parallel else "in stages"
        return (f"rule '{rule.name}' has a parallel form ({way}): newton is for rules "
                f"without one")
    verdict = info.verdicts.get("newton")
    if verdict is None or verdict.accepted:
        return None
    where = f" ({verdict.where(rule.ir.filename)})" if verdict.pos else ""
    return f"rule '{rule.name}' has no Newton form: {verdict.reason}{where}"


# "auto" picks newton on the CPU for calls (training or not: the forward there is the
# sequential pass, no iterations) from this many tokens per sequence, for a diagonal Jacobian or blocks (or a dense J) up to
# AUTO_MAX_WIDTH wide. Measured (benchmarks/bench_newton.py, B=2 H=4 D=64, forward+backward,
# the CPU's sequential forward): ParaGRU 3x the naive loop at T = 16, 3x at 64, 5x at 256;
# ParaLSTM (2 x 2 blocks) 3x at 16, 4.6x at 64, 4.9x at 256; the dense LSTM (2D = 128) 1.2x
# at 16, 1.9x at 64, 3.8x at 256; sLSTM (a dense 4D = 256 wide J, bench_newton.py --slstm)
# 1.1x at 16, 1.2x at 64 and 256, 2.5x at 1024. Wider dense Jacobians are unmeasured (J is
# k^2 per token).
# Forward alone (no gradient) 2-3.5x: ParaGRU 3.3x at 256, 3.3x at 1024; the dense LSTM 2.1x
# at 256 and at 4096 (the generated step without the loop's per-op dispatch). Decoding (one
# token) keeps the loop.
AUTO_MIN_TOKENS = 16
AUTO_MAX_WIDTH = 256
# The same threshold on CUDA (solves in Triton, recdsl.codegen.newton_kernels), against the
# fused recurrent kernel: not measured on a GPU yet, so None: "auto" keeps the fused kernel.
AUTO_MIN_TOKENS_CUDA = None


def pays_off(rule, call) -> bool:
    """Whether newton beats the sequential loop for ``call`` (what "auto" asks)."""
    least = {"cpu": AUTO_MIN_TOKENS, "cuda": AUTO_MIN_TOKENS_CUDA}.get(call.device.type)
    if least is None:
        return False
    if call.device.type not in SEQUENTIAL_DEVICES:  # Newton iterations: only where trained
        tensors = list(call.tensors.values()) + list(call.initial.values())
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return False
    if max(b - a for a, b in call.segments()) < least:
        return False
    plan = _plan(rule, call.dim_sizes)
    return plan.diagonal or plan.k <= AUTO_MAX_WIDTH


# ---------------------------------------------------------------- the plan of one rule and sizes

class _Plan:
    """The generated step, the Jacobian structure and the packing of the states for one rule
    at given dim sizes."""

    def __init__(self, rule, dim_sizes: dict):
        src = step_source(rule.ir, dim_sizes, grad=False, fuse=True)
        self.step = load_function(src.source, src.name)
        jac = jacobian_source(rule.ir, dim_sizes)
        self.jacobian = load_function(jac.source, jac.name)
        self.blocks = jac.blocks
        self.sources = src.sources
        self.n_outputs = len(src.program.outputs)
        # outputs that are a new state (output y = h): their gradient joins dL/dh_t directly
        news = {v.id: name for name, v in src.program.states_out.items()}
        self.aliases = [news.get(v.id) for v in src.program.outputs.values()]
        self.structure = s = structure(rule.ir, dim_sizes)
        self.states = list(s.states)
        self.channel_sizes = [dim_sizes[d] for d in s.channels]
        self.C = prod(self.channel_sizes)
        self.k = s.block_size(dim_sizes)
        self.diagonal = s.kind == "diagonal"
        # dense J, or blocks too wide for a parallel scan: the forward is the sequential pass
        self.sequential = s.kind == "dense" or self.k > BLOCK_SCAN_MAX
        self.packing = []  # per state: (permutation of its axes, free sizes, width)
        for name in self.states:
            dims = s.dims[name]
            order = [dims.index(d) for d in s.channels] + [dims.index(d) for d in s.free[name]]
            free = [dim_sizes[d] for d in s.free[name]]
            self.packing.append((order, free, prod(free)))
        fused = fused_sums(src.program)  # products summed by an einsum: never materialised
        shapes = [op.shape if isinstance(op, Elementwise) else op.arg.shape
                  if isinstance(op, Reduce) else op.out.shape for op in src.program.ops
                  if id(op) not in fused or isinstance(op, Reduce)]
        # per batch row and token: the largest of the step's values; of the generated
        # Jacobian's tangents and the packed J
        self.widest = max((prod(dim_sizes[d] for d in shape) for shape in shapes), default=1)
        self.jacobian_widest = max(self.widest, jac.widest,
                                   self.C * (self.k if self.diagonal else self.k * self.k))

    def pack(self, values: list) -> torch.Tensor:
        """States ``[*lead, *dims]`` (in declaration order) -> ``[*lead, C, k]``."""
        parts = []
        for x, (order, _free, width) in zip(values, self.packing):
            lead = x.dim() - len(order)
            x = x.permute(*range(lead), *(lead + a for a in order))
            parts.append(x.reshape(*x.shape[:lead], self.C, width))
        return torch.cat(parts, dim=-1)

    def unpack(self, packed: torch.Tensor) -> list:
        """The inverse of ``pack``."""
        lead = packed.shape[:-2]
        out, start = [], 0
        for order, free, width in self.packing:
            x = packed[..., start:start + width].reshape(*lead, *self.channel_sizes, *free)
            inverse = [order.index(a) for a in range(len(order))]
            out.append(x.permute(*range(len(lead)), *(len(lead) + a for a in inverse)))
            start += width
        return out

    def tokens_per_call(self, heads: int, jacobian: bool, budget: int | None = None) -> int:
        budget = TEMP_BUDGET if budget is None else budget
        return max(1, budget // (heads * (self.jacobian_widest if jacobian else self.widest)))

    # one call of the generated step: every token of a slice at once
    def _arguments(self, tokens: dict, params: dict, prev: torch.Tensor) -> list:
        states = dict(zip(self.states, self.unpack(prev)))
        args = []
        for op in self.sources:
            if op.kind == "input":
                x = tokens[op.name]
                args.append(x if op.index is None else x.select(2, op.index))
            elif op.kind == "param":
                args.append(params[op.name].unsqueeze(0))  # broadcast over the batch
            else:
                args.append(states[op.name])
        return args

    def evaluate(self, tokens: dict, params: dict, prev: torch.Tensor):
        """``(new states packed, outputs)`` for tokens ``[N, H, ...]`` whose previous states
        are ``prev`` (``[N, H, C, k]``); params ``[H, ...]``."""
        results = _rows(self.step(*self._arguments(tokens, params, prev)), prev.shape[0])
        outs = results[:self.n_outputs]
        return self.pack(list(results[self.n_outputs:])), tuple(outs)

    def linearise(self, tokens, params, prev):
        """``(J, f, outputs)`` at ``prev``, from the generated Jacobian step (one pass): ``J``
        ``[N, H, C, k]`` (diagonal) or ``[N, H, C, k, k]`` (rows: new states, columns: old)."""
        results = _rows(self.jacobian(*self._arguments(tokens, params, prev)), prev.shape[0])
        n_out, n_states = self.n_outputs, len(self.states)
        outs = tuple(results[:n_out])
        f = self.pack(list(results[n_out:n_out + n_states]))
        blocks = dict(zip(self.blocks, results[n_out + n_states:]))
        if self.diagonal:
            parts = [blocks.get((s, s)) for s in self.states]
            news = results[n_out:n_out + n_states]
            return self.pack([torch.zeros_like(v) if b is None else b for b, v in zip(parts, news)]), f, outs
        N, H = prev.shape[:2]
        J = prev.new_empty(N, H, self.C, self.k, self.k)
        r0 = 0
        for (order, _free, width), new in zip(self.packing, self.states):
            c0 = 0
            for (_o, _f, w_old), old in zip(self.packing, self.states):
                part = J[..., r0:r0 + width, c0:c0 + w_old]
                b = blocks.get((new, old))
                if b is None:
                    part.zero_()
                else:
                    b = b.permute(0, 1, *(2 + a for a in order), *range(2 + len(order), b.dim()))
                    part.copy_(b.reshape(N, H, self.C, width, w_old))
                c0 += w_old
            r0 += width
        return J, f, outs


def _rows(results, n):
    """Results with ``n`` batch rows (one that reads only params comes with one: params are
    passed as [1, H, ...] and broadcast)."""
    return [r if r.shape[0] == n else r.expand(n, *r.shape[1:]) for r in results]


_PLANS = {}


def _plan(rule, dim_sizes: dict) -> _Plan:
    key = (id(rule), tuple(sorted(dim_sizes.items())))
    plan = _PLANS.get(key)
    if plan is None or plan.rule is not rule:
        plan = _Plan(rule, dim_sizes)
        plan.rule = rule
        _PLANS[key] = plan
    return plan


# ---------------------------------------------------------------- linear recurrences over T

def _matvec(A, x):
    return (A * x.unsqueeze(-2)).sum(-1)


def _matmul(A, P):
    """``A @ P`` over batches of small blocks: broadcast products beat batched GEMMs of 2 x 2s."""
    if A.shape[-1] > 4:
        return A @ P
    return (A.unsqueeze(-1) * P.unsqueeze(-3)).sum(-2)


def _small_block_scan(A, c, h0):
    """``_block_scan`` for blocks up to 4 wide, with the block's entries as the outer dims
    (planes ``[k, k, ...]``): each product is a few wide elementwise passes, not a broadcast
    over trailing dims of 2."""
    B, T = c.shape[:2]
    k, rest = c.shape[-1], c.shape[2:-1]
    L = max(1, math.isqrt(T))
    n = -(-T // L)
    if n * L != T:
        eye = torch.eye(k, dtype=A.dtype, device=A.device).expand(B, n * L - T, *A.shape[2:])
        A = torch.cat([A, eye], 1)
        c = torch.cat([c, c.new_zeros(B, n * L - T, *c.shape[2:])], 1)
    A = A.reshape(B, n, L, -1, k, k).permute(2, 4, 5, 0, 1, 3).contiguous()  # [L, k, k, B, n, R]
    c = c.reshape(B, n, L, -1, k).permute(2, 4, 0, 1, 3).contiguous()  # [L, k, B, n, R]

    def mv(M, x):
        return (M * x.unsqueeze(0)).sum(1)

    last, product = c[0].clone(), A[0].clone()
    for i in range(1, L):
        last = mv(A[i], last) + c[i]
        product = (A[i].unsqueeze(2) * product.unsqueeze(0)).sum(1)
    entering = [h0.reshape(B, -1, k).permute(2, 0, 1)]  # [k, B, R]
    for j in range(1, n):
        entering.append(mv(product[:, :, :, j - 1], entering[-1]) + last[:, :, j - 1])
    h = torch.stack(entering, 2)
    out = torch.empty_like(c)
    for i in range(L):
        h = out[i] = mv(A[i], h) + c[i]
    return out.permute(2, 3, 0, 4, 1).reshape(B, n * L, *rest, k)[:, :T]


def _block_scan(A, c, h0):
    """All ``h_t = A_t h_{t-1} + c_t`` for ``A`` ``[B, T, ..., k, k]``: chunks of about sqrt(T)
    tokens from a zero state with their transition products, the states entering the chunks,
    then the chunks again (the matrix form of ``scan_core.scan``)."""
    B, T = c.shape[:2]
    L = max(1, math.isqrt(T))
    n = -(-T // L)
    if n * L != T:
        k = A.shape[-1]
        eye = torch.eye(k, dtype=A.dtype, device=A.device).expand(B, n * L - T, *A.shape[2:])
        A = torch.cat([A, eye], 1)
        c = torch.cat([c, c.new_zeros(B, n * L - T, *c.shape[2:])], 1)
    # position in the chunk first, one copy: every step below then reads contiguous memory
    A = A.reshape(B, n, L, *A.shape[2:]).movedim(2, 0).contiguous()
    c = c.reshape(B, n, L, *c.shape[2:]).movedim(2, 0).contiguous()
    last, product = c[0].clone(), A[0].clone()
    for i in range(1, L):
        last = _matvec(A[i], last) + c[i]
        product = _matmul(A[i], product)
    entering = [h0]
    for j in range(1, n):
        entering.append(_matvec(product[:, j - 1], entering[-1]) + last[:, j - 1])
    h = torch.stack(entering, 1)
    out = torch.empty_like(c)
    for i in range(L):
        h = out[i] = _matvec(A[i], h) + c[i]
    return out.movedim(0, 2).reshape(B, n * L, *c.shape[3:])[:, :T]


def _sequential(A, c, h0):
    out = torch.empty_like(c)
    h = h0
    for t in range(c.shape[1]):
        h = torch.baddbmm(c[:, t].reshape(-1, c.shape[-1], 1), A[:, t].reshape(-1, *A.shape[-2:]),
                          h.reshape(-1, c.shape[-1], 1)).reshape(h0.shape)
        out[:, t] = h
    return out


def _solve(plan: _Plan, A, c, h0):
    """The linear recurrence over dim 1 with the solver the structure allows."""
    if newton_triton.wanted(c.device):  # CUDA: the Triton kernels (recdsl.codegen.newton_kernels)
        return newton_triton.solve(A, c, h0, plan.diagonal)
    if plan.diagonal:
        return elementwise_scan(A, c, h0)
    if plan.k <= 4:
        return _small_block_scan(A, c, h0)
    if plan.k <= BLOCK_SCAN_MAX:
        return _block_scan(A, c, h0)
    return _sequential(A, c, h0)


# ---------------------------------------------------------------- one call

@dataclass
class _Layout:
    """Time layout of a call: where sequences start (the state resets to its initial value)."""
    B: int
    T: int
    reset: torch.Tensor  # [T] bool: a sequence starts at this token
    segments: list  # (start, end) per sequence
    packed: bool


def _tokens(tensors: dict, names, t0, t1):
    return {n: tensors[n][:, t0:t1].flatten(0, 1) for n in names}


class _Solve:
    """The Newton solve of one call and its backward."""

    def __init__(self, plan: _Plan, layout: _Layout, tokens: dict, params: dict, init: torch.Tensor):
        self.plan, self.layout, self.tokens, self.params = plan, layout, tokens, params
        self.init = init  # [N, H, C, k]
        B, T = layout.B, layout.T
        self.heads = init.shape[1]
        # a dense (or too wide) J: solved token by token in PyTorch, forward by the sequential
        # pass; where the Triton solves run (CUDA) one kernel walks T instead, so Newton
        # iterations and the backward go through them like a block J's
        self.stepwise = plan.sequential and not newton_triton.wanted(init.device)
        if layout.packed:
            seq = torch.zeros(T, dtype=torch.long)
            for s, (a, b) in enumerate(layout.segments):
                seq[a:b] = s
            self.init_tok = init[seq.to(init.device)].unsqueeze(0)
        else:
            self.init_tok = init.unsqueeze(1).expand(B, T, *init.shape[1:])
        self.reset = layout.reset.to(init.device)

    def _slices(self, a=0, b=None, jacobian=True, budget=None):
        """Token ranges of ``[a, b)`` small enough for one call of the Jacobian step (or of
        the step)."""
        b = self.layout.T if b is None else b
        per = max(1, self.plan.tokens_per_call(self.heads, jacobian, budget) // self.layout.B)
        return [(t0, min(t0 + per, b)) for t0 in range(a, b, per)]

    def _previous(self, H, a, b):
        """The state entering each token of ``[a, b)``: the one before, or at a sequence's
        start its initial state."""
        before = H[:, a - 1:a] if a > 0 else self.init_tok[:, :1]
        prev = torch.cat([before, H[:, a:b - 1]], 1)
        return torch.where(self.reset[a:b].view(1, -1, 1, 1, 1), self.init_tok[:, a:b], prev)

    def _scale(self, F):
        """Per state, its largest magnitude (the rounding unit of the tolerance)."""
        peak = F.abs().flatten(0, -2).amax(0)
        out, start = torch.empty_like(peak), 0
        for _, _, width in self.plan.packing:
            out[start:start + width] = peak[start:start + width].max()
            start += width
        return out

    def sequential(self):
        """The sequential pass: one call of the generated step per token, batched over B and H
        (no autograd; the backward is the transposed recurrence all the same)."""
        plan, T = self.plan, self.layout.T
        args = [None] * len(plan.sources)
        slots = {}  # state -> argument position
        for i, op in enumerate(plan.sources):
            if op.kind == "param":
                args[i] = self.params[op.name].unsqueeze(0)
            elif op.kind == "state":
                slots[op.name] = i
        inputs = [(i, self.tokens[op.name], op.index) for i, op in enumerate(plan.sources)
                  if op.kind == "input"]
        n_out = plan.n_outputs
        states, outs = [], []
        current, resets = None, self.reset.tolist()
        for t in range(T):
            if t == 0 or resets[t]:
                current = plan.unpack(self.init_tok[:, t])
            for i, x, j in inputs:
                args[i] = x[:, t] if j is None else x[:, t].select(2, j)
            for name, value in zip(plan.states, current):
                args[slots[name]] = value
            results = _rows(plan.step(*args), self.layout.B)
            current = results[n_out:]
            states.append(current)
            outs.append(results[:n_out])
        self.states = plan.pack([torch.stack(s, 1) for s in zip(*states)])
        self.outputs = [torch.stack(o, 1) for o in zip(*outs)]
        self.prev = self._previous(self.states, 0, T)
        self.window = None
        return 0

    def forward(self):
        """Newton iterations, over windows of T that shrink where a linearisation overshoots;
        returns the number of linearisations used, or None if it did not converge."""
        if self.stepwise or self.init.device.type in SEQUENTIAL_DEVICES:
            return self.sequential()
        T = self.layout.T
        H = self.init_tok.clone()  # the guess: every state at its initial value
        self.states = torch.empty_like(H)
        self.outputs = None
        window, start, used = T, 0, 0
        while start < T:
            end = min(T, start + window)
            count = self._window(H, start, end)
            if count is None:
                if window <= MIN_WINDOW:
                    return None
                window = max(MIN_WINDOW, window // WINDOW_SHRINK)
                H[:, start:] = self.init_tok[:, start:]
                continue
            used, start = used + count, end
        self.prev = self._previous(self.states, 0, T)
        self.window = window
        return used

    def _window(self, H, a, b):
        """Converge tokens ``[a, b)`` (those before are): the linearisations used, or None
        when f is not finite, an update overshoots, or ``MAX_ITERATIONS`` pass."""
        eps = torch.finfo(self.init.dtype).eps
        for iteration in range(1, min(MAX_ITERATIONS, b - a + 1) + 1):
            prev = self._previous(H, a, b)
            new, F, outs = self._newton_step(prev, H[:, a - 1] if a > 0 else None, a, b)
            if not torch.isfinite(F).all():
                return None
            scale = self._scale(F)
            # done when the guess is a fixed point up to rounding (the first guess never is)
            if iteration > 1 and bool(((F - H[:, a:b]).abs() <= TOLERANCE_ULPS * eps * scale).all()):
                H[:, a:b] = self.states[:, a:b] = F
                if self.outputs is None:
                    self.outputs = [torch.empty(o.shape[0], self.layout.T, *o.shape[2:],
                                                dtype=o.dtype, device=o.device) for o in outs]
                for whole, part in zip(self.outputs, outs):
                    whole[:, a:b] = part
                return iteration - 1  # the last linearisation only confirmed
            # far from the solution a linearisation can overshoot (sLSTM's normaliser through
            # zero, then c / n): then a shorter window, closer to the converged prefix
            if not torch.isfinite(new).all() or bool((new.abs() > GROWTH * scale.clamp_min(1.0)).any()):
                return None
            H[:, a:b] = new
        return None

    def _newton_step(self, prev, carry, a, b):
        """``(new, f, outputs)`` for tokens ``[a, b)``: the states solving the recurrence
        linearised at ``prev``, and f and the outputs at ``prev``."""
        B = self.layout.B
        new, fs, outs = torch.empty_like(prev), torch.empty_like(prev), []
        carry = torch.zeros_like(prev[:, 0]) if carry is None else carry
        for t0, t1 in self._slices(a, b):
            p = prev[:, t0 - a:t1 - a].flatten(0, 1)
            J, f, o = self.plan.linearise(_tokens(self.tokens, self.tokens, t0, t1), self.params, p)
            Jp = J * p if self.plan.diagonal else _matvec(J, p)
            J, f = J.unflatten(0, (B, t1 - t0)), f.unflatten(0, (B, t1 - t0))
            c = f - Jp.unflatten(0, (B, t1 - t0))
            # at a sequence's start the previous state is known: h = f there, no transition
            at_reset = self.reset[t0:t1].view(1, -1, *([1] * (J.dim() - 2)))
            J = torch.where(at_reset, torch.zeros((), dtype=J.dtype, device=J.device), J)
            c = torch.where(self.reset[t0:t1].view(1, -1, 1, 1, 1), f, c)
            new[:, t0 - a:t1 - a] = _solve(self.plan, J, c, carry)
            fs[:, t0 - a:t1 - a] = f
            outs.append([x.unflatten(0, (B, t1 - t0)) for x in o])
            carry = new[:, t1 - 1 - a]
        return new, fs, [torch.cat(parts, 1) for parts in zip(*outs)]

    def finals(self) -> torch.Tensor:
        """The final states packed, ``[N, H, C, k]``."""
        if not self.layout.packed:
            return self.states[:, -1]
        rows = [self.states[0, b - 1] if b > a else self.init[s]
                for s, (a, b) in enumerate(self.layout.segments)]
        return torch.stack(rows, 0)

    def _reverse(self, t0, t1, b, flows):
        """``g_t = b_t + flows_{t+1} J_{t+1}^T g_{t+1}`` over ``[t0, t1)`` token by token (from
        the last, ``g = b``), with the slice's ``J`` from the generated Jacobian step in one
        batched call, time-major so each token's ``J`` is one contiguous batch of matrices."""
        plan, n, k = self.plan, t1 - t0, self.plan.k
        bt = b.transpose(0, 1).reshape(n, -1, 1, k)  # row vectors: g^T J = (J^T g)^T
        g = torch.empty_like(bt)
        h = g[n - 1] = bt[n - 1]
        keep = flows[t0 + 1:t1].tolist()
        for s0, s1 in reversed(self._slices(t0 + 1, t1, budget=CACHE_BUDGET)):  # J_{s0..s1-1}: g_{s0-1..s1-2}
            tokens = {name: _time_major(x, s0, s1) for name, x in self.tokens.items()}
            J = plan.linearise(tokens, self.params, _time_major(self.prev, s0, s1))[0]
            J = J.reshape(s1 - s0, -1, k, k)
            for t in range(s1 - 2 - t0, s0 - 2 - t0, -1):
                h = g[t] = torch.baddbmm(bt[t], h, J[t + 1 - (s0 - t0)]) if keep[t] else bt[t]
        return g.reshape(n, b.shape[0], *b.shape[2:]).transpose(0, 1)

    def backward(self, d_outputs: list, d_finals: torch.Tensor):
        """Gradients of the token inputs (dict), params (dict) and initial states (packed)."""
        plan, lay = self.plan, self.layout
        B, T = lay.B, lay.T
        d_tok = torch.zeros_like(self.states)  # dL/dh_t from the final states
        d_outputs = list(d_outputs)
        for i, state in enumerate(plan.aliases):  # an output that is a new state
            if state is not None and d_outputs[i] is not None:
                d = d_outputs[i].to(d_tok.dtype)
                d_tok += plan.pack([d if s == state else d.new_zeros(d.shape[:3] + x.shape[3:])
                                    for s, x in zip(plan.states, plan.unpack(self.states))])
                d_outputs[i] = None
        through = any(d is not None for d in d_outputs)  # an output gradient the step carries
        if lay.packed:
            for s, (a, b) in enumerate(lay.segments):
                if b > a:
                    d_tok[0, b - 1] += d_finals[s]
        else:
            d_tok[:, -1] += d_finals
        d_init = torch.zeros_like(self.init)
        if lay.packed:  # an empty sequence's final state is its initial state
            for s, (a, b) in enumerate(lay.segments):
                if b == a:
                    d_init[s] = d_finals[s]
        grads_tokens = {n: torch.zeros_like(x) for n, x in self.tokens.items()}
        grads_params = {n: torch.zeros_like(p) for n, p in self.params.items()}
        # the state entering token t keeps flowing back unless t starts a sequence
        flows = ~self.reset
        carry = torch.zeros_like(self.states[:, 0])  # flows_{t1} * w_{t1} from the later slice
        # a diagonal or block J is formed with the vjp; a dense one in small slices (_reverse)
        for t0, t1 in reversed(self._slices(jacobian=not self.stepwise)):
            n = t1 - t0
            tokens = _tokens(self.tokens, self.tokens, t0, t1)
            prev = self.prev[:, t0:t1].flatten(0, 1)
            names = list(tokens)
            fn = lambda p, xs, ps: plan.evaluate(dict(zip(names, xs)),  # noqa: E731
                                                 dict(zip(self.params, ps)), p)
            (f, outs), pullback = vjp(fn, prev, tuple(tokens.values()), tuple(self.params.values()))
            d_out = tuple(torch.zeros_like(o) if d is None else d[:, t0:t1].flatten(0, 1).to(o.dtype)
                          for o, d in zip(outs, d_outputs))
            if through:
                u = pullback((torch.zeros_like(f), d_out))[0].unflatten(0, (B, n))
            else:
                u = torch.zeros_like(d_tok[:, t0:t1])
            # g_t = d_t + flows_{t+1} (J_{t+1}^T g_{t+1} + u_{t+1}); the last of the slice: + carry
            tail = u[:, 1:] * flows[t0 + 1:t1].view(1, -1, 1, 1, 1)
            b = d_tok[:, t0:t1] + torch.cat([tail, carry.unsqueeze(1)], 1)
            if self.stepwise:
                g = self._reverse(t0, t1, b, flows)
            else:
                J = plan.linearise(tokens, self.params, prev)[0]
                JT = J if plan.diagonal else J.transpose(-1, -2)
                JT = JT.unflatten(0, (B, n))
                keep = flows[t0 + 1:t1].view(1, -1, *([1] * (JT.dim() - 2)))
                A = torch.zeros_like(JT)
                A[:, :-1] = torch.where(keep, JT[:, 1:], A[:, :-1])
                g = _solve(plan, A.flip(1), b.flip(1), torch.zeros_like(carry)).flip(1)
            d_prev, d_xs, d_ps = pullback((g.flatten(0, 1), d_out))
            for name, dx in zip(names, d_xs):
                grads_tokens[name][:, t0:t1] = dx.unflatten(0, (B, n))
            for name, dp in zip(self.params, d_ps):
                grads_params[name] += dp
            w = d_prev.unflatten(0, (B, n))
            carry = w[:, 0] * flows[t0]
            for s, (a, e) in enumerate(lay.segments):
                if e > a and t0 <= a < t1:
                    if lay.packed:
                        d_init[s] = w[0, a - t0]
                    else:
                        d_init = w[:, 0]
        return grads_tokens, grads_params, d_init


def _time_major(x, t0, t1):
    return x[:, t0:t1].transpose(0, 1).flatten(0, 1)


class _Newton(torch.autograd.Function):
    """Outputs and final states of a converged solve; backward by the transposed recurrence."""

    @staticmethod
    def forward(ctx, solve, *leaves):
        ctx.solve = solve
        finals = solve.plan.unpack(solve.finals())
        return tuple(o.clone() for o in solve.outputs) + tuple(f.contiguous() for f in finals)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        solve = ctx.solve
        plan = solve.plan
        n_out = plan.n_outputs
        d_outputs = list(grads[:n_out])
        d_finals = [g if g is not None else torch.zeros_like(x)
                    for g, x in zip(grads[n_out:], plan.unpack(solve.finals()))]
        dx, dp, d_init = solve.backward(d_outputs, plan.pack(d_finals))
        d_init = plan.unpack(d_init)
        return (None, *dx.values(), *dp.values(), *d_init)


def run(rule, call):
    """Outputs and final states of ``call`` by Newton iterations (see the module notes)."""
    plan = _plan(rule, call.dim_sizes)
    dtype = call.compute_dtype
    names = [v.name for v in rule.ir.inputs]
    tokens = {n: call.tensors[n].to(dtype) for n in names}
    params = {p.name: call.tensors[p.name].to(dtype) for p in rule.ir.params}
    inits = [call.initial_state(s.name).to(dtype) for s in rule.ir.states]
    segments = call.segments()
    reset = torch.zeros(call.time, dtype=torch.bool)
    for a, b in segments:
        if b > a:
            reset[a] = True
    layout = _Layout(call.batch, call.time, reset, segments, call.packed)
    with torch.no_grad():
        solve = _Solve(plan, layout, {n: t.detach() for n, t in tokens.items()},
                       {n: p.detach() for n, p in params.items()},
                       plan.pack([s.detach() for s in inits]))
        iterations = solve.forward()
    last_run.clear()
    last_run.update(structure=plan.structure.kind, iterations=iterations, tokens=call.time,
                    window=getattr(solve, "window", None))
    if iterations is None:
        warnings.warn(f"newton: rule '{rule.name}' did not converge at T = {call.time} (f not "
                      f"finite, or {MAX_ITERATIONS} iterations in windows down to {MIN_WINDOW} "
                      f"tokens); running the sequential loop instead", RuntimeWarning, stacklevel=3)
        return run_naive(rule.ir, call)
    results = _Newton.apply(solve, *tokens.values(), *params.values(), *inits)
    n_out = plan.n_outputs
    return list(results[:n_out]), list(results[n_out:])
