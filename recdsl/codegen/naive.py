"""The naive loop: the semantic definition of a rule.

It walks the checked statements token by token with PyTorch, batched over B and H, and is
differentiable by autograd. It is an interpreter on purpose, not generated code: it shares no
code generation with the fast backends, so it can serve as their reference. Keep it simple
and obviously right; speed is not its job.

Values while evaluating: a batched tensor ``[B, H, *shape]`` (dim >= 2) for anything per
token, or a 0-d tensor for constants (numbers, dims, consts), which broadcast everywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..grammar import ast
from ..ir import builtins
from ..ir.checked import CheckedRule
from ..ir.checker import topk_count

_UNARY = {
    "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "abs": torch.abs,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "logsigmoid": F.logsigmoid,
    # softplus exactly, log(1 + e^x), without torch's linear cut-off above 20.
    "softplus": lambda x: torch.logaddexp(x, torch.zeros_like(x)),
    "silu": F.silu, "relu": torch.relu, "cos": torch.cos, "sin": torch.sin,
}


class _Diag:
    """The value of diag(x): kept as the vector until the '@' that consumes it."""

    def __init__(self, vector):
        self.vector = vector


def _lift(x, rank):
    """Give a batched value ``rank`` trailing axes so it broadcasts against a rank-``rank`` one."""
    if x.dim() < 2:
        return x
    return x.reshape(x.shape + (1,) * (rank - (x.dim() - 2)))


def _reduce_dims(x):
    return tuple(range(2, x.dim()))


def _matmul(a, b):
    if isinstance(a, _Diag):
        d = a.vector
        return d.unsqueeze(-1) * b if b.dim() == 4 else d * b
    if isinstance(b, _Diag):
        d = b.vector
        return a * d.unsqueeze(-2) if a.dim() == 4 else a * d
    if a.dim() == 3 and b.dim() == 3:
        return (a * b).sum(-1)
    if a.dim() == 3:
        return (a.unsqueeze(-2) @ b).squeeze(-2)
    if b.dim() == 3:
        return (a @ b.unsqueeze(-1)).squeeze(-1)
    return a @ b


# keep_topk over more entries than this (the chunk paths evaluate it for all tokens at once)
# takes torch.topk and a tie fix instead of a full sort: 4x faster, the same entries
TOPK_SORT_MAX = 1 << 16


def keep_topk(x, n):
    """``x`` with all but its ``n`` largest entries along the last axis set to 0; ties go to
    the lowest index, as in every backend. Gradients flow through the kept entries only."""
    if n >= x.shape[-1]:
        return x
    if x.numel() > TOPK_SORT_MAX:
        keep = _topk_keep(x, n)
        if keep is not None:
            return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    # a stable descending sort: obviously right
    kept = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :n]
    return torch.zeros_like(x).scatter(-1, kept, x.gather(-1, kept))


def _topk_keep(x, n):
    """The mask of the entries a stable descending sort puts first, from torch.topk: every
    entry above the n-th largest value, then entries equal to it by lowest index. None when
    a row holds nan (the sort's order of nan is left to the sort)."""
    kth = torch.topk(x, n, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    if torch.isnan(kth).any():
        return None
    keep = x >= kth
    count = keep.sum(-1, dtype=torch.int32)  # (a bool sum to int64 is 20x slower)
    if bool((count == n).all()):  # no tie at the n-th value (the usual case)
        return keep
    rows = (count != n).nonzero(as_tuple=True)  # ties: keep the lowest indices among them
    xr, kr = x[rows], kth[rows]
    at = xr == kr
    need = n - (xr > kr).sum(-1, keepdim=True, dtype=torch.int32)
    keep[rows] = (xr > kr) | (at & (at.cumsum(-1) <= need))
    return keep


class NaiveStep:
    """Evaluates one token of a rule. ``dim_sizes`` binds the rule's dims to numbers."""

    def __init__(self, rule: CheckedRule, dim_sizes: dict, dtype, device):
        self.rule = rule
        self.dim_sizes = dim_sizes
        self.dtype = dtype
        self.device = device
        self.constants = {name: self._const(v) for name, v in {**rule.consts, **dim_sizes}.items()}

    def _const(self, value):
        return torch.tensor(float(value), dtype=self.dtype, device=self.device)

    def __call__(self, token: dict, params: dict, states: dict) -> dict:
        """Run the statements once. ``token``: input name -> [B, H, *dims] at this token;
        ``params``: name -> [B, H, *dims]; ``states``: updated in place. Returns the outputs."""
        outputs = {}
        self._run(self.rule.body, {}, token, params, states, outputs)
        return outputs

    def _run(self, body, env, token, params, states, outputs):
        for st in body:
            if isinstance(st, ast.Let):
                env[st.name] = self.expr(st.value, env, token, params, states)
            elif isinstance(st, ast.Update):
                value = self.expr(st.value, env, token, params, states)
                # a constant (0-d) new value still has one entry per sequence and head
                states[st.state] = value.expand(states[st.state].shape) if value.dim() == 0 else value
            elif isinstance(st, ast.Output):
                env[st.name] = value = self.expr(st.value, env, token, params, states)
                outputs[st.name] = value
            elif isinstance(st, ast.For):
                for j in range(self.dim_sizes[st.dim]):
                    # lets inside the block are fresh each step and invisible after it
                    self._run(st.body, {**env, st.var: j}, token, params, states, outputs)
            else:
                raise AssertionError(st)

    def expr(self, e, env, token, params, states):
        ev = lambda x: self.expr(x, env, token, params, states)
        if isinstance(e, ast.Num):
            return self._const(e.value)
        if isinstance(e, ast.Name):
            if e.kind in ("dim", "const"):
                return self.constants[e.id]
            if e.kind == "state":
                return states[e.id]
            if e.kind == "input":
                return token[e.id]
            if e.kind == "param":
                return params[e.id]
            return env[e.id]
        if isinstance(e, ast.Index):
            source = token if e.target.kind == "input" else params
            return source[e.target.id].select(2, env[e.index.id])
        if isinstance(e, ast.Neg):
            return -ev(e.operand)
        if isinstance(e, ast.BinOp):
            a, b = ev(e.left), ev(e.right)
            if e.op == "@":
                return _matmul(a, b)
            rank = len(e.shape)
            a, b = _lift(a, rank), _lift(b, rank)
            return {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div,
                    "**": torch.pow}[e.op](a, b)
        if isinstance(e, ast.Call):
            return self.call(e, ev)
        raise AssertionError(e)

    def call(self, e: ast.Call, ev):
        fn = e.fn
        if fn in _UNARY:
            return _UNARY[fn](ev(e.args[0]))
        if fn in ("max", "min"):
            rank = len(e.shape)
            a, b = _lift(ev(e.args[0]), rank), _lift(ev(e.args[1]), rank)
            return torch.maximum(a, b) if fn == "max" else torch.minimum(a, b)
        if fn == "keep_topk":
            return keep_topk(ev(e.args[0]), topk_count(e, self.rule, self.dim_sizes))
        x = ev(e.args[0])
        if fn == "dot":
            return (x * ev(e.args[1])).sum(-1)
        if fn == "sum":
            return x.sum(_reduce_dims(x))
        if fn == "norm":
            return torch.sqrt((x * x).sum(-1))
        if fn == "l2norm":
            return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + builtins.L2NORM_EPS)
        if fn == "outer":
            return x.unsqueeze(-1) * ev(e.args[1]).unsqueeze(-2)
        if fn == "diag":
            return _Diag(x)
        if fn == "softmax":
            return torch.softmax(x, dim=-1)
        raise AssertionError(fn)


def run_naive(rule: CheckedRule, call) -> tuple:
    """Run a bound call (see ``recdsl.runtime.call``) token by token.

    Returns ``(outputs, final_states)``: lists in declaration order; outputs are
    ``[B, T, H, *shape]`` in the compute dtype, final states ``[N, H, *shape]``.
    """
    step = NaiveStep(rule, call.dim_sizes, call.compute_dtype, call.device)
    B, H = call.batch, call.heads
    params = {p.name: call.tensors[p.name].to(call.compute_dtype) for p in rule.params}
    outputs = {o.name: [] for o in rule.outputs}
    finals = {s.name: [] for s in rule.states}
    for seq, (start, end) in enumerate(call.segments()):
        # with cu_seqlens, B == 1 and each segment is one sequence of the packed batch
        rows = slice(seq, seq + 1) if call.packed else slice(None)
        nb = 1 if call.packed else B
        states = {s.name: call.initial_state(s.name, rows).to(call.compute_dtype) for s in rule.states}
        seq_params = {n: p.unsqueeze(0).expand(nb, *p.shape) for n, p in params.items()}
        for t in range(start, end):
            token = {i.name: call.tensors[i.name][:, t].to(call.compute_dtype) for i in rule.inputs}
            out = step(token, seq_params, states)
            for o in rule.outputs:
                value = out[o.name]  # a 0-d constant when the output does not depend on the token
                outputs[o.name].append(value.expand(nb, H, *value.shape[2:]))
        for s in rule.states:
            finals[s.name].append(states[s.name])
    outs = [torch.stack(outputs[o.name], dim=1) for o in rule.outputs]
    final = [torch.cat(finals[s.name], dim=0) for s in rule.states]
    return outs, final
