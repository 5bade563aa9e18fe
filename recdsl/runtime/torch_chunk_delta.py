"""backend="torch-chunk" for the delta family: the analysis's update read as Householder-like
steps, the per-token prologue evaluated for all tokens at once (``Tokenwise``), then the
chunkwise WY / UT algorithm (``chunk_delta_core``).

From the analysis, each token's update of a state is rewritten as m steps (m = NH for
DeltaProduct's ``for j in NH``, 1 otherwise)

    S <- d_h (I - b_h k_h k_hᵀ) S + k_h u_hᵀ,     u_h = sum of the writes along k_h,

or, for an erase of the undecayed state beside a scalar decay (``(a I - b k kᵀ) S``, KLA as its
author writes it), ``S <- d_h S - b_h k_h (r_h k_hᵀ S) + k_h u_hᵀ`` with ``d_h`` counting the
decay ``a`` and the erase's read scale ``r_h`` not (chunk_delta's ``g_read``; no division by
``a``, so ``a = 0`` at a token is exact),

where ``d_h`` gathers the scalar decays: those before the token's first erase go to its first
step; a decay met after a step's erase multiplies that step's decay and the writes it has made
so far (``a ((I - b k kᵀ) S + k uᵀ) = a (I - b k kᵀ) S + k (a u)ᵀ``). Decays are taken in
log space (``Tokenwise.log_decay``); one that is not positive by construction (``exp``,
``sigmoid``, ``softplus``, ... of anything) is taken as ``log |d|`` and a sign. (A decay of
exactly 0 has the right value; the gradient through it may be NaN, as log space cannot
differentiate there.)
Reads ``o = sum(coef * x @ S) + extra`` become one read vector per output, state and side
(``x @ S`` or ``S @ x``).

Not run here (``problem`` says why; the recurrent backend and the naive loop run them): a
per-channel decay ``diag(x) @ S`` before the erase, loops inside loops, and reads whose vector
depends on other reads of the states.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import BackendError
from ..grammar import ast
from ..ir import builtins
from ..ir.pretty import unparse
from .chunk_delta_core import Scaled, chunk_delta, formed
from .tokenwise import Tokenwise

# Tokens per chunk; 16, 32 and 64 are the tested sizes (any positive size is valid algebra).
# None picks by device: 32 on the CPU, where the L x L work is a large share of the time and
# the state loop still runs matmuls big enough at 32 (benchmarks/bench_delta.py), 64 elsewhere.
# An int forces a size everywhere.
CHUNK_SIZE = None
DEVICE_CHUNK_SIZES = {"cpu": 32}
DEFAULT_CHUNK_SIZE = 64


# ============================================================ the plan: what the rule does


@dataclass(eq=False)
class _Op:
    kind: str  # decay, erase, write
    expr: object = None  # decay: the decay; erase: the coefficient b; write: its coefficient
    decay: object = None  # erase: a scalar decay beside it, (a I - b k kᵀ) S, or None
    key: object = None  # erase: k in I - b k kᵀ
    value: object = None  # write: v in coef * outer(k, v)


@dataclass(eq=False)
class _Loop:
    var: str
    dim: str
    items: list


@dataclass(eq=False)
class _Step:
    """One canonical step, expressions with the loop index each is evaluated at."""
    decays: list = field(default_factory=list)  # (expr, loop)
    b: tuple = None  # (expr, loop)
    key: tuple = None
    writes: list = field(default_factory=list)  # [coef, value, loop, [(decay, loop) scaling it]]
    # the decays the erase's read sees, when not all of ``decays`` (a decay beside the erase)
    read_decays: Optional[list] = None


class _Unsupported(Exception):
    pass


def _template(rule, sa) -> list:
    """The state's operations in source order, loops kept as _Loop items."""
    steps = {id(s.node): s for s in sa.steps}

    def walk(body, depth):
        items = []
        for st in body:
            if isinstance(st, ast.For):
                inner = walk(st.body, depth + 1)
                if any(isinstance(i, _Loop) for i in inner) or (inner and depth > 0):
                    raise _Unsupported(f"the update of {sa.name} is inside nested 'for' loops "
                                       f"(line {st.pos.line})")
                if inner:
                    items.append(_Loop(st.var, st.dim, inner))
            elif isinstance(st, ast.Update) and st.state == sa.name:
                items.extend(_ops(steps[id(st)], sa.name))
        return items

    return walk(rule.ir.body, 0)


def _ops(step, state) -> list:
    ops = []
    for f in step.factors:
        if f.kind == "identity":
            continue
        if f.kind == "scalar":
            ops.append(_Op("decay", expr=f.decay))
        elif f.kind == "rank_one":
            if f.diag is not None and f.diag.kind != "scalar":
                raise _Unsupported(f"{unparse(f.node)} erases {state} beside the decay "
                                   f"{unparse(f.diag.node)}, which is not a scalar")
            ops.append(_Op("erase", expr=f.coef.expr(), key=f.key,
                           decay=None if f.diag is None else f.diag.decay))
        elif f.kind == "rows":
            line = ast.expr_span(f.node).line
            raise _Unsupported(f"the per-channel decay diag({unparse(f.decay)}) @ {state} before "
                               f"the erase (line {line}) has no numerically stable chunkwise "
                               f"form here; backend='recurrent' runs it")
        else:
            raise _Unsupported(f"{unparse(f.node)} is not a decay or an erase of {state}")
    for w in step.writes:
        if w.kind != "outer":
            raise _Unsupported(f"the write {unparse(w.node)} is not an outer product")
        ops.append(_Op("write", expr=w.coef.expr(), value=w.right))
    return ops


def _read_plan(rule) -> list:
    """Per output: (name, shape, [(state, side, [(coef, vector)])], extra)."""
    plan = []
    for rv in rule.analysis.reads:
        if rv.kind != "output":
            raise _Unsupported(f"{rv.name} reads the states and feeds another read (a chained "
                               f"read)")
        if rv.chain:
            raise _Unsupported(f"output {rv.name} reads along a vector computed from other reads "
                               f"of the states ({', '.join(rv.chain)})")
        groups = {}
        for term in rv.terms:
            if term.read.side not in ("left", "right"):
                raise _Unsupported(f"output {rv.name} reads {term.read.state} with dot()")
            groups.setdefault((term.read.state, term.read.side), []).append(
                (term.coef.expr(), term.read.vector))
        shape = rule.ir.var(rv.name).dims
        plan.append((rv.name, shape, [(s, side, terms) for (s, side), terms in groups.items()],
                     rv.extra))
    return plan


def _plan(rule):
    if rule.family != "delta":
        raise _Unsupported(f"rule '{rule.name}' is in the {rule.family} family, not delta")
    templates = {name: _template(rule, sa) for name, sa in rule.analysis.states.items()}
    return templates, _read_plan(rule)


def problem(rule) -> Optional[str]:
    """None when this module runs ``rule``; else why not, in one line."""
    try:
        _plan(rule)
    except _Unsupported as e:
        return str(e)
    return None


# ============================================================ unrolling to canonical steps


def _unroll(template, dim_sizes):
    for item in template:
        if isinstance(item, _Loop):
            for j in range(dim_sizes[item.dim]):
                for op in item.items:
                    yield op, {item.var: j}
        else:
            yield item, None


def _canonical_steps(template, dim_sizes) -> list:
    steps, pending, current = [], [], None
    for op, loop in _unroll(template, dim_sizes):
        if op.kind == "decay":
            if current is None:
                pending.append((op.expr, loop))
            else:  # after an erase: decays that step and the writes it has made
                current.decays.append((op.expr, loop))
                if current.read_decays is not None:
                    current.read_decays.append((op.expr, loop))
                for w in current.writes:
                    w[3].append((op.expr, loop))
        elif op.kind == "erase":
            current = _Step(decays=pending, b=(op.expr, loop), key=(op.key, loop))
            if op.decay is not None:  # beside the erase: decays the state, not the erase's read
                current.read_decays = list(pending)
                current.decays = pending + [(op.decay, loop)]
            pending = []
            steps.append(current)
        else:
            current.writes.append([op.expr, op.value, loop, []])
    if pending:  # a token with no erase (a loop over a dim of size 0): decay only
        steps.append(_Step(decays=pending))
    return steps


# ============================================================ per-token values


class _Values:
    """Tokenwise values, each expression evaluated once per loop index.

    ``lean`` (no gradient wanted): ``vector`` leaves ``l2norm(e)`` unformed, as
    Scaled(1 / sqrt(sum(e^2) + eps), e), which chunk_delta's forward-only path folds into its
    own per-row scales: the same values without two full-size temporaries per l2norm."""

    def __init__(self, rule, call, lean=False):
        self.tw = Tokenwise(rule.ir, call)
        self.lean = lean
        self.lets = {}
        self.consts = dict(rule.ir.consts)
        self._collect(rule.ir.body)
        self.cache = {}

    def _collect(self, body):
        for st in body:
            if isinstance(st, ast.Let):
                self.lets[st.name] = st.value
            elif isinstance(st, ast.For):
                self._collect(st.body)

    def value(self, expr, loop):
        key = ("value", id(expr), _loop_key(loop))
        if key not in self.cache:
            self.cache[key] = self.tw.value(expr, loop)
        return self.cache[key]

    def vector(self, expr, loop):
        """A per-token vector, a Scaled one for l2norm(e) when lean (see the class)."""
        e = expr
        while isinstance(e, ast.Name) and e.kind == "let" and e.id in self.lets:
            e = self.lets[e.id]
        if not (self.lean and isinstance(e, ast.Call) and e.fn == "l2norm"):
            return self.value(expr, loop)
        key = ("l2norm", id(e), _loop_key(loop))
        if key not in self.cache:
            x = self.value(e.args[0], loop)
            squares = torch.linalg.vector_norm(x, dim=-1).square_()
            self.cache[key] = Scaled(torch.rsqrt(squares + builtins.L2NORM_EPS), x)
        return self.cache[key]

    def log_decay(self, expr, loop):
        """(log |decay|, 1.0 where the decay is negative or None when it cannot be)."""
        key = ("log", id(expr), _loop_key(loop))
        if key not in self.cache:
            if self.positive(expr):
                self.cache[key] = (self.tw.log_decay(expr, loop), None)
            else:
                d = self.value(expr, loop)
                self.cache[key] = (torch.log(d.abs()), (d < 0).to(d.dtype))
        return self.cache[key]

    def positive(self, e) -> bool:
        """True when e cannot be negative (so its log needs no sign)."""
        if isinstance(e, ast.Num):
            return e.value >= 0
        if isinstance(e, ast.Name):
            if e.kind == "dim":
                return True
            if e.kind == "const":
                return self.consts[e.id] >= 0
            if e.kind in ("let", "output") and e.id in self.lets:
                return self.positive(self.lets[e.id])
            return False
        if isinstance(e, ast.Call):
            if e.fn in ("exp", "sigmoid", "softplus", "sqrt", "rsqrt", "abs", "norm", "relu"):
                return True
            if e.fn == "max":
                return any(self.positive(a) for a in e.args)
            if e.fn == "min":
                return all(self.positive(a) for a in e.args)
            return False
        if isinstance(e, ast.BinOp) and e.op in ("*", "/", "+"):
            return self.positive(e.left) and self.positive(e.right)
        if isinstance(e, ast.BinOp) and e.op == "**":
            return self.positive(e.left)
        return False


def _loop_key(loop):
    return tuple(sorted(loop.items())) if loop else None


def _log_decays(values, decays, shape, dtype, device):
    """(log |product of decays|, negative-decay counts or None), per token [B, T, H]."""
    g, neg = None, None
    for expr, loop in decays:
        log_d, negative = values.log_decay(expr, loop)
        g = log_d if g is None else g + log_d
        if negative is not None:
            neg = negative if neg is None else neg + negative
    g = torch.zeros(shape, dtype=dtype, device=device) if g is None else g.expand(shape)
    return g, None if neg is None else neg.expand(shape)


def _step_values(values, step, shape_k, shape_v, dtype, device):
    """(log decay, negative-decay flags or None, b, k, u, read) of one canonical step, per
    token: [B, T, H] for the scalars, [B, T, H, K] and [B, T, H, V] for k and u (a single write
    ``w * v`` left as Scaled(w, v): chunk_delta forms it a group of chunks at a time); read:
    None when the erase reads the decayed state, else (log |r|, negative flags or None) of its
    read scale."""
    g, neg = _log_decays(values, step.decays, shape_k[:3], dtype, device)
    read = None
    if step.key is not None and step.read_decays is not None:
        read = _log_decays(values, step.read_decays, shape_k[:3], dtype, device)
    return _step_core(values, step, g, neg, shape_k, shape_v, dtype, device) + (read,)


def _step_core(values, step, g, neg, shape_k, shape_v, dtype, device):
    """(g, neg, b, k, u) of one step, its decays given (see _step_values)."""
    if step.key is None:
        return (g, neg, torch.zeros_like(g), torch.zeros(shape_k, dtype=dtype, device=device),
                torch.zeros(shape_v, dtype=dtype, device=device))
    b = values.value(*step.b).expand(shape_k[:3])
    k = values.vector(*step.key)
    k = k.map(lambda t: t.expand(shape_k[:t.dim()])) if isinstance(k, Scaled) else \
        k.expand(shape_k)
    terms = []
    for coef, right, loop, scales in step.writes:
        w = values.value(coef, loop)
        for expr, at in scales:
            w = w * values.value(expr, at)
        terms.append(Scaled(w.expand(shape_v[:3]), values.value(right, loop).expand(shape_v)))
    if not terms:
        return g, neg, b, k, torch.zeros(shape_v, dtype=dtype, device=device)
    return g, neg, b, k, terms[0] if len(terms) == 1 else sum(t.form() for t in terms)


# ============================================================ layout: sequences into chunks


class _Chunks:
    """Token tensors ``[B, T, H, ...]`` <-> chunks ``[nc, N, H, C, ...]``, one row of chunks per
    sequence (packed sequences gathered apart, each padded to whole chunks with zeros: a zero
    key, write and log-decay make a step the identity)."""

    def __init__(self, call, chunk):
        self.call, self.C = call, chunk
        self.N, self.H = call.num_sequences, call.heads
        segs = call.segments()
        longest = max(e - s for s, e in segs)
        self.nc = max(1, math.ceil(longest / chunk))
        self.Tp = self.nc * chunk
        if call.packed:
            dev = call.device
            idx = torch.full((self.N, self.Tp), call.time, dtype=torch.long)
            pos = torch.empty(call.time, dtype=torch.long)
            for n, (s, e) in enumerate(segs):
                idx[n, : e - s] = torch.arange(s, e)
                pos[s:e] = n * self.Tp + torch.arange(e - s)
            self.idx, self.pos = idx.to(dev), pos.to(dev)

    def split(self, x):
        """[B, T, H, *rest] -> [nc, N, H, C, *rest]: a view of x when the sequences fill whole
        chunks (chunk_delta copies it a group of chunks at a time), else a padded copy."""
        rest = x.shape[3:]
        if self.call.packed:
            flat = torch.cat([x[0], x.new_zeros(1, *x.shape[2:])])
            x = flat[self.idx]  # [N, Tp, H, *rest]
        elif self.Tp > x.shape[1]:
            x = torch.cat([x, x.new_zeros(x.shape[0], self.Tp - x.shape[1], *x.shape[2:])], 1)
        x = x.reshape(self.N, self.nc, self.C, self.H, *rest)
        return x.permute(1, 0, 3, 2, *range(4, x.dim()))

    def destination(self, R, n, dtype):
        """(R outputs [R, B, T, H, n], their view [nc, N, H, C, R, n]) when the sequences fill
        whole chunks, for chunk_delta to write its reads into; else None."""
        if self.call.packed or self.Tp != self.call.time:
            return None
        full = torch.empty(R, self.N, self.Tp, self.H, n, dtype=dtype, device=self.call.device)
        view = full.view(R, self.N, self.nc, self.C, self.H, n).permute(2, 1, 4, 3, 0, 5)
        return full, view

    def merge(self, y):
        """[nc, N*H, C, *rest] -> [B, T, H, *rest]."""
        rest = y.shape[3:]
        y = y.reshape(self.nc, self.N, self.H, self.C, *rest)
        y = y.permute(1, 0, 3, 2, *range(4, y.dim())).reshape(self.N, self.Tp, self.H, *rest)
        if self.call.packed:
            return y.reshape(self.N * self.Tp, self.H, *rest)[self.pos].unsqueeze(0)
        return y[:, : self.call.time]


# ============================================================ run


def run(rule, call, chunk_size: Optional[int] = None):
    """Outputs ``[B, T, H, *shape]`` and final states ``[N, H, *dims]`` (compute dtype)."""
    chunk = chunk_size if chunk_size is not None else CHUNK_SIZE if CHUNK_SIZE is not None \
        else DEVICE_CHUNK_SIZES.get(call.device.type, DEFAULT_CHUNK_SIZE)
    if not isinstance(chunk, int) or chunk < 1:
        raise BackendError(f"chunk size must be a positive integer (16, 32 or 64); got {chunk!r}")
    try:
        templates, reads = _plan(rule)
    except _Unsupported as e:
        raise BackendError(f"backend 'torch-chunk' cannot run rule '{rule.name}': {e}") from None
    # no graph wanted: chunk_delta takes its forward-only path, which can take unformed inputs
    given = list(call.tensors.values()) + list(call.initial.values())
    lean = not (torch.is_grad_enabled() and any(t.requires_grad for t in given))
    values = _Values(rule, call, lean)
    layout = _Chunks(call, chunk)
    dt = call.compute_dtype
    B, T, H = call.batch, call.time, call.heads
    sizes = call.dim_sizes

    # which read vectors each state serves: state -> side -> [(output, vector [B, T, H, n])]
    wanted = {}
    for name, _, groups, _ in reads:
        for state, side, terms in groups:
            scaled = [_read_vector(values.value(coef, None).expand(B, T, H),
                                   values.vector(vector, None)) for coef, vector in terms]
            vec = scaled[0] if len(scaled) == 1 else sum(t.form() for t in scaled)
            wanted.setdefault(state, {}).setdefault(side, []).append((name, vec))

    parts = {name: [] for name, *_ in reads}
    finals = []
    for var in rule.ir.states:
        Kd, Vd = (sizes[d] for d in var.dims)
        shape_k, shape_v = (B, T, H, Kd), (B, T, H, Vd)
        steps = _canonical_steps(templates[var.name], sizes)
        per = [_step_values(values, s, shape_k, shape_v, dt, call.device) for s in steps]
        m = len(per)

        def chunked(i):
            """Item i of every step, [B, T, H, m, ...] -> [nc, N, H, C*m, ...] (token-major)."""
            if m == 1:
                x = per[0][i]
                return x.map(layout.split) if isinstance(x, Scaled) else layout.split(x)
            items = [formed(p[i]) if p[i] is not None else torch.zeros_like(per[0][0])
                     for p in per]
            return layout.split(torch.stack(items, 3)).flatten(3, 4)

        g, b, k, u = (chunked(i) for i in (0, 2, 3, 4))
        neg = chunked(1) if any(p[1] is not None for p in per) else None
        g_read = neg_read = None
        if any(p[5] is not None for p in per):  # erases beside a decay: their read scales
            scales = [p[5] if p[5] is not None else (p[0], p[1]) for p in per]
            g_read = _chunked_items(layout, [r[0] for r in scales])
            if any(r[1] is not None for r in scales):
                neg_read = _chunked_items(layout, [r[1] if r[1] is not None
                                                   else torch.zeros_like(r[0]) for r in scales])
        sides = wanted.get(var.name, {})
        q_left = _read_block(layout, sides.get("left"))
        q_right = _read_block(layout, sides.get("right"))
        S0 = call.initial_state(var.name).to(dt).reshape(-1, Kd, Vd)
        # destinations in the outputs' layout, which the forward-only path fills in place
        dest = {side: layout.destination(len(sides[side]), n, dt)
                for side, n in (("left", Vd), ("right", Kd)) if sides.get(side)}
        views = {side: None if d is None else d[1] for side, d in dest.items()}
        o_left, o_right, S = chunk_delta(k, b, u, g, S0, m, q_left, q_right, neg,
                                         views.get("left"), views.get("right"), g_read, neg_read)
        for side, o in (("left", o_left), ("right", o_right)):
            in_place = o is not None and o is views.get(side)
            for r, (name, _) in enumerate(sides.get(side, [])):
                parts[name].append(dest[side][0][r] if in_place else layout.merge(o[..., r, :]))
        finals.append(S.reshape(call.num_sequences, H, Kd, Vd))

    outputs = {}
    for name, shape, _, extra in reads:
        full = (B, T, H) + tuple(sizes[d] for d in shape)
        value = None
        for p in parts[name]:
            value = p if value is None else value + p
        if extra is not None:
            e = values.value(extra, None)
            e = e.reshape(e.shape + (1,) * (len(full) - e.dim())).expand(full)
            value = e if value is None else value + e
        if value is None:
            value = torch.zeros(full, dtype=dt, device=call.device)
        outputs[name] = value.to(dt)
    return [outputs[o.name] for o in rule.ir.outputs], finals


def _chunked_items(layout, items):
    """Per-step [B, T, H] tensors -> [nc, N, H, C*m] (token-major)."""
    if len(items) == 1:
        return layout.split(items[0])
    return layout.split(torch.stack(items, 3)).flatten(3, 4)


def _read_vector(coef, vector):
    """coef * vector, unformed (coef [B, T, H]; vector a tensor or a Scaled one)."""
    if isinstance(vector, Scaled):
        return Scaled(coef * vector.scale, vector.vector)
    return Scaled(coef, vector)


def _read_block(layout, reads):
    """Read vectors [B, T, H, n] of one side -> [nc, N, H, C, R, n], or None."""
    if not reads:
        return None
    if len(reads) == 1 and isinstance(reads[0][1], Scaled):  # [nc, N, H, C, 1] and [.., 1, n]
        return reads[0][1].map(lambda x: layout.split(x.unsqueeze(3)))
    vectors = [formed(vec) for _, vec in reads]
    return layout.split(torch.stack(vectors, 3) if len(vectors) > 1 else vectors[0].unsqueeze(3))
