"""backend="torch-chunk" for the diagonal family: the analysis's updates read as decays and
outer-product writes, the per-token prologue evaluated for all tokens at once (``Tokenwise``),
then the chunkwise algebra of ``chunk_diagonal_core``.

From the analysis, each token's update of a state (all its steps, a ``for`` loop unrolled) is

    S <- exp(g) * diag(exp(a)) @ S @ diag(exp(b)) + sum_w coef_w * outer(left_w, right_w)

``g``, ``a``, ``b`` sum the logs of the scalar, row and column factors (``Tokenwise.log_decay``:
``exp(gk)`` gives ``gk``, never forming the decay); a factor met after a write of the same
token multiplies that write (its coefficient, left or right vector) instead.

Reads run as passes in source order. A linear value ``sum(coef * x @ S) + extra`` becomes one
chunkwise read per state and side (the coefficients folded into the read vectors) plus the
per-token ``extra`` (Mamba-2's ``D * x``). A chained let (Raven's ``p = softmax(Sk @ q)``) is
its own expression evaluated for all tokens with each read replaced by the read's values;
later read vectors (``p @ Sv``) see it like any let. Autograd runs back through every pass,
the per-token functions and the prologue (``keep_topk`` routes gradients through the kept
entries only, as in the naive loop, whose evaluator Tokenwise uses).

Packed sequences are unpacked into rows and every row is padded with zeros to whole chunks:
a zero log-decay is no decay and a zero write adds nothing, so padding changes neither the
outputs nor the final states.

Long calls run in windows of whole chunks, one after the other, the final states of one the
initial states of the next (``WINDOW_BYTES``): the same algebra, with temporaries the size of
a window.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import BackendError
from ..grammar import ast
from ..ir.affine import loop_groups
from ..ir.pretty import unparse
from . import chunk_diagonal_core as core
from .tokenwise import Tokenwise
from .windows import run_in_windows

# Per-token log-decays are clamped below: exp(-60) (fp32) or exp(-700) (fp64) is no decay
# left to resolve, and the floor keeps a decay of exactly 0 (log -inf) out of the sums, where
# 0 * -inf would be nan.
_LOG_FLOOR = {torch.float32: -60.0, torch.float64: -700.0}


def problem(rule):
    """None when this path runs ``rule``, else why not (one line)."""
    if rule.family != "diagonal":
        return f"rule '{rule.name}' is not in the diagonal family"
    for sa in rule.analysis.states.values():
        for step in sa.steps:
            if step.loop is not None and step.loop.parent is not None:
                return (f"the update of {sa.name} on line {step.node.pos.line} is inside nested "
                        f"'for' loops, which the chunkwise path does not unroll")
    return None


def run(rule, call):
    """Outputs ``[B, T, H, *shape]`` and final states ``[N, H, *dims]`` (compute dtype)."""
    length = window_length(rule, call)
    if length >= max(end - start for start, end in call.segments()):
        return _Run(rule, call).outputs_and_states()
    return run_in_windows(lambda window: _Run(rule, window).outputs_and_states(), rule, call,
                          length)


# ============================================================ windows

# Long calls run in windows of whole chunks, the final states of one the initial states of
# the next. The chunk algebra's temporaries, many as large as the inputs, are then those of
# one window: memory the allocator hands out again, where whole-sequence temporaries are
# fresh pages on every call (glibc returns large freed blocks to the system), whose page
# faults cost as much as the arithmetic. A window holds about WINDOW_BYTES per widest value.
WINDOW_BYTES = 2 << 20


def window_length(rule, call) -> int:
    """Tokens per window: a multiple of the chunk length."""
    width = 1  # the widest per-token value: a state's axis, or its entries per chunk token
    for s in rule.states:
        sizes = [call.dim_sizes[d] for d in s.dims]
        width = max(width, *sizes, math.prod(sizes) // core.CHUNK)
    per_token = call.num_sequences * call.heads * width * call.compute_dtype.itemsize
    return max(1, WINDOW_BYTES // (per_token * core.CHUNK)) * core.CHUNK


# ============================================================ layout


class _Layout:
    """Between the call's layout ``[B, T, H, ...]`` and the chunk layout
    ``[N * H, chunks, C, ...]`` (packed sequences unpacked into rows, rows padded with zeros)."""

    def __init__(self, call):
        self.call = call
        self.N, self.H, self.T = call.num_sequences, call.heads, call.time
        segments = call.segments()
        longest = max(end - start for start, end in segments)
        # short sequences: one chunk of whole sub-chunks rather than a mostly padded 64
        self.C = core.CHUNK if longest > core.CHUNK else core.SUB * math.ceil(longest / core.SUB)
        self.nc = math.ceil(longest / self.C)
        self.Tp = self.nc * self.C
        self.packed = call.packed
        if self.packed:
            gather = torch.full((self.N, self.Tp), self.T, dtype=torch.long)  # T: a zero row
            scatter = []
            for n, (start, end) in enumerate(segments):
                gather[n, :end - start] = torch.arange(start, end)
                scatter.append(n * self.Tp + torch.arange(end - start))
            self.gather = gather.reshape(-1).to(call.device)
            self.scatter = torch.cat(scatter).to(call.device)

    def to_chunks(self, x, scale=None):
        """``[B, T, H, *rest]`` -> ``[N * H, chunks, C, *rest]``, times ``scale`` ([B, T, H],
        per token) if given: without autograd in the same pass as the copy."""
        rest = x.shape[3:]
        if scale is not None:
            scale = scale.reshape(scale.shape + (1,) * len(rest))
            if self.packed or self.Tp > self.T or core.recording(x, scale):
                return self.to_chunks(x * scale)
            out = torch.empty((self.N * self.H, self.nc, self.C) + rest, dtype=x.dtype, device=x.device)
            torch.mul(x.movedim(2, 1), scale.movedim(2, 1), out=out.view((self.N, self.H, self.Tp) + rest))
            return out
        zeros = lambda n: x.new_zeros((x.shape[0], n) + x.shape[2:])
        if self.packed:
            x = torch.cat([x, zeros(1)], dim=1)[0].index_select(0, self.gather)
            x = x.view(self.N, self.Tp, self.H, *rest)
        elif self.Tp > self.T:
            x = torch.cat([x, zeros(self.Tp - self.T)], dim=1)
        # contiguous: the chunk algebra multiplies batched matrices of it, several times
        return x.movedim(2, 1).reshape(self.N * self.H, self.nc, self.C, *rest).contiguous()

    def from_chunks(self, y):
        """``[N * H, chunks, C, *rest]`` -> ``[B, T, H, *rest]``."""
        rest = y.shape[3:]
        y = y.reshape(self.N, self.H, self.Tp, *rest).movedim(1, 2)
        if self.packed:
            return y.reshape(self.N * self.Tp, self.H, *rest).index_select(0, self.scatter)[None]
        return y[:, :self.T]


# ============================================================ per-token values


class _Values(Tokenwise):
    """Tokenwise with chained values bound by name (``bind``), seen by every expression, and
    a cache of state-free values by their text (Raven's ``lam`` feeds both states)."""

    def __init__(self, rule, call):
        super().__init__(rule, call, keep_lets=True)
        self.memo = {}

    def bind(self, name, value):
        B, T = self.shape_bt
        self.bound[name] = value.reshape(B * T, *value.shape[2:])

    def forget(self):
        """Drop the cached values (chained values stay bound)."""
        self.memo.clear()
        self.forget_lets()

    def _key(self, kind, expr, loop):
        # the text names the same values within one block (a let name may be bound again in
        # another block)
        return kind, unparse(expr), self._block(expr), _loop_key(loop)

    def cached(self, expr, loop=None):
        key = self._key("value", expr, loop)
        if key not in self.memo:
            self.memo[key] = self.value(expr, loop)
        return self.memo[key]

    def cached_log(self, expr, loop=None):
        key = self._key("log", expr, loop)
        if key not in self.memo:
            self.memo[key] = self.log_decay(expr, loop)
        return self.memo[key]


def _loop_key(loop):
    return tuple(sorted((loop or {}).items()))


def _unrolled(sa, dim_sizes):
    """(step, loop values) in execution order, each ``for`` body repeated."""
    for loop, steps in loop_groups(sa.steps):
        for j in range(dim_sizes[loop.dim]) if loop is not None else [None]:
            for step in steps:
                yield step, ({loop.var: j} if loop is not None else None)


def _stack(items, empty, dtype, device):
    """The writes along a new axis 3 (a view when there is one)."""
    if not items:
        return torch.zeros(empty, dtype=dtype, device=device)
    return items[0].unsqueeze(3) if len(items) == 1 else torch.stack(items, 3)


def _substitute(e, table):
    """``e`` with the nodes in ``table`` (by identity) replaced."""
    if id(e) in table:
        return table[id(e)]
    if isinstance(e, ast.BinOp):
        return dataclasses.replace(e, left=_substitute(e.left, table),
                                   right=_substitute(e.right, table))
    if isinstance(e, ast.Neg):
        return dataclasses.replace(e, operand=_substitute(e.operand, table))
    if isinstance(e, ast.Call):
        return dataclasses.replace(e, args=[_substitute(a, table) for a in e.args])
    return e


# ============================================================ one call


@dataclasses.dataclass
class _State:
    decays: core.Decays  # the log-decays, chunked
    left: torch.Tensor  # [b, nc, C, W, R], coefficients folded in
    right: torch.Tensor  # [b, nc, C, W, Cc]
    starts: torch.Tensor  # [b, nc, R, Cc]: the state entering each chunk
    final: torch.Tensor  # [b, R, Cc]


class _Run:
    def __init__(self, rule, call):
        self.rule, self.call = rule, call
        self.layout = _Layout(call)
        self.values = _Values(rule.ir, call)
        self.dtype = call.compute_dtype
        self.states = {}
        self.shared = {}

    def outputs_and_states(self):
        for name, sa in self.rule.analysis.states.items():
            self.states[name] = self._state(sa)
        # the per-token values the states were built from (Raven's routing) are in the
        # states now: let them go (a read that needs one again computes it again)
        self.shared.clear()
        self.values.forget()
        values = {}
        for rv in self.rule.analysis.reads:
            values[rv.name] = self._value(rv)
            self.values.bind(rv.name, values[rv.name])
        outputs = [values[o.name] for o in self.rule.outputs]
        N, H = self.layout.N, self.layout.H
        finals = [self.states[s.name].final.reshape(N, H, *self.states[s.name].final.shape[1:])
                  for s in self.rule.states]
        return outputs, finals

    # ------------------------------------------------------------ states

    def _state(self, sa) -> _State:
        values, call = self.values, self.call
        logs = {"scalar": None, "rows": None, "cols": None}
        writes = []  # [coef, left, right], call layout
        where = {"scalar": 0, "rows": 1, "cols": 2}
        for step, loop in _unrolled(sa, call.dim_sizes):
            for f in step.factors:
                if f.kind == "identity":
                    continue
                log = self._log_decay(f, loop)
                logs[f.kind] = log if logs[f.kind] is None else logs[f.kind] + log
                if writes:  # the factor scales the writes made earlier in the token
                    decay = values.cached(f.decay, loop)
                    for w in writes:
                        at = where[f.kind]
                        w[at] = decay if w[at] is None else w[at] * decay
            for w in step.writes:
                coef = None if w.coef.is_one else values.cached(w.coef.expr(), loop)
                writes.append([coef, values.cached(w.left, loop), values.cached(w.right, loop)])
        var = call.rule.var(sa.name)
        R, Cc = (call.dim_sizes[d] for d in var.dims)
        B, T, H = call.batch, call.time, call.heads

        def left():
            items = [(l if c is None else c.unsqueeze(-1) * l).expand(B, T, H, R)
                     for c, l, _ in writes]
            return self.layout.to_chunks(_stack(items, (B, T, H, 0, R), self.dtype, call.device))

        def right():
            items = [r.expand(B, T, H, Cc) for _, _, r in writes]
            return self.layout.to_chunks(_stack(items, (B, T, H, 0, Cc), self.dtype, call.device))

        floor = _LOG_FLOOR.get(self.dtype, -60.0)

        def log_decay(log, kind):
            log = log.unsqueeze(-1) if kind == "scalar" else log
            return core.LogDecay(self.layout.to_chunks(log.clamp(min=floor)))

        # states with the same decays or writes (Raven's Sk and Sv) share them, and with
        # them every factor computed from them (see chunk_diagonal_core.LogDecay)
        decays = core.Decays(**{k: None if v is None else
                                self._shared(("log", k == "scalar"), [v], lambda: log_decay(v, k))
                                for k, v in logs.items()})
        left = self._shared(("left", R), [t for c, l, _ in writes for t in (c, l)], left)
        right = self._shared(("right", Cc), [r for _, _, r in writes], right)
        initial = call.initial_state(sa.name).to(self.dtype).reshape(-1, R, Cc)
        starts, final = core.states(decays, left, right, initial)
        return _State(decays, left, right, starts, final)

    def _shared(self, kind, sources, compute):
        """``compute()`` once per ``kind`` and the identity of its source tensors."""
        key = (kind, tuple(id(t) for t in sources))
        if key not in self.shared:
            self.shared[key] = (sources, compute())  # sources kept alive: ids stay unique
        return self.shared[key][1]

    def _log_decay(self, factor, loop):
        """log(decay) for every token, [B, T, H] or [B, T, H, n] (one tensor per text)."""
        def compute():
            log = self.values.cached_log(factor.decay, loop)
            B, T, H = self.call.batch, self.call.time, self.call.heads
            log = log.expand((B, T, H) + (() if factor.kind == "scalar" else log.shape[3:]))
            if bool(torch.isnan(log.amax())):  # (a reduction: no mask as large as the log)
                pos = ast.expr_span(factor.node)
                raise BackendError(
                    f"the decay {unparse(factor.decay)} (line {pos.line}) is negative or nan for "
                    f"some tokens: the chunkwise path works with its log; use backend='naive'")
            return log
        return self._shared(("log decay", factor.kind == "scalar")
                            + self.values._key("log", factor.decay, loop), [], compute)

    # ------------------------------------------------------------ reads

    def _read(self, state, side, x, scale=None):
        """``x @ S`` (side left) or ``S @ x`` (side right) for every token, call layout, with
        ``x`` times ``scale`` ([B, T, H], a coefficient per token) if given. A new tensor."""
        st = self.states[state]
        # (the scale of a linear read: in the copy into chunks)
        x = self.layout.to_chunks(x.to(self.dtype), None if scale is None else scale.to(self.dtype))
        if side == "left":
            out = core.read(x, st.decays, st.left, st.right, st.starts)
        else:
            out = core.read(x, st.decays.transposed(), st.right, st.left, st.starts.transpose(-1, -2))
        return self.layout.from_chunks(out)

    def _value(self, rv):
        values = self.values
        if rv.linear:
            groups = {}  # (state, side) -> the terms reading it
            for term in rv.terms:
                groups.setdefault((term.read.state, term.read.side), []).append(term)
            result = None
            for (state, side), terms in groups.items():
                scale = None
                if len(terms) == 1:
                    x = values.value(terms[0].read.vector)
                    if not terms[0].coef.is_one:
                        scale = values.value(terms[0].coef.expr())
                else:  # one read of the summed vectors
                    x = sum(values.value(t.read.vector) if t.coef.is_one else
                            values.value(t.coef.expr()).unsqueeze(-1) * values.value(t.read.vector)
                            for t in terms)
                out = self._read(state, side, x, scale)
                result = out if result is None else core.add(result, out)
            if rv.extra is not None:
                extra = values.value(rv.extra)
                result = extra if result is None else core.add(result, extra)
            return result
        # a per-token function of reads: the reads' values stand in for the read nodes
        table = {}
        for i, r in enumerate(rv.reads):
            name = f"{rv.name}\0read{i}"
            values.bind(name, self._read(r.state, r.side, values.value(r.vector)))
            table[id(r.node)] = ast.Name(name, ast.expr_span(r.node), shape=r.node.shape, kind="let")
        return values.value(_substitute(rv.node.value, table))
