"""backend="torch-scan": the elementwise scan family in batched PyTorch.

Every state's transition is elementwise (``recdsl.ir.family``), so each token's update, all
its statements and ``for`` steps composed, is ``S_t = a_t ⊙ S_{t-1} + b_t``:

1. prologue: ``a_t`` is the product of the token's decays (each factor's ``parts``) and
   ``b_t`` the sum of its writes, each multiplied by the decays applied after it; both for
   every token at once (``Tokenwise``, the naive loop's own expression evaluator);
2. the scan (``scan_core.linear_scan``) gives every token's state;
3. epilogue: the rule's statements run once for all tokens (time folded into the batch) with
   the states taken from the scan: before a state's first update its value from the token
   before, after its last update the scan's. An update in between is evaluated only where a
   statement reads the state before the next one. So an output may be any per-token function
   of the states (a gate, a normaliser, a read before the update, ``y = h``).

Autograd runs back through all three. Packed sequences run as one row: at each sequence's
first token the multiplier is 0 and the write carries the sequence's initial state in.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..codegen.naive import NaiveStep
from ..grammar import ast
from ..ir.affine import Write, loop_groups
from .scan_core import linear_scan
from .tokenwise import Tokenwise
from .windows import run_in_windows


def problem(rule) -> Optional[str]:
    """None when this path runs ``rule``, else why not (one line)."""
    if not rule.family_info.accepts("scan"):
        return f"rule '{rule.name}' is not in the scan family"
    for sa in rule.analysis.states.values():
        for step in sa.steps:
            if step.loop is not None and step.loop.parent is not None:
                return (f"the update of {sa.name} on line {step.node.pos.line} is inside nested "
                        f"'for' loops, which the scan does not unroll")
    return None


def run(rule, call, scan=linear_scan):
    """Outputs ``[B, T, H, *shape]`` and final states ``[N, H, *dims]`` (compute dtype).
    ``scan(a, b, h0)`` is the linear scan (``scan_core.linear_scan``'s contract): the
    Triton backend "scan" passes its kernels'."""
    length = window_length(rule, call)
    if length >= max(end - start for start, end in call.segments()):
        return _Run(rule, call, scan).outputs_and_states()
    return run_in_windows(lambda window: _Run(rule, window, scan).outputs_and_states(), rule,
                          call, length)


# A window holds about WINDOW_BYTES of every token's states (all sequences and heads): the
# prologue, the scan and the epilogue then work on values that stay in the caches. Measured
# (B=2 H=4 T=4096, one thread) over 0.5 to 32 MiB and no windows: 8 MiB is best for both
# Mamba-1 (forward 0.18 s against 0.23 s at 2 MiB and 0.58 s unwindowed) and minGRU.
WINDOW_BYTES = 8 << 20
SHORTEST_WINDOW = 16


def window_length(rule, call) -> int:
    per_token = call.num_sequences * call.heads * call.compute_dtype.itemsize * sum(
        math.prod(call.dim_sizes[d] for d in s.dims) for s in rule.ir.states)
    return max(SHORTEST_WINDOW, WINDOW_BYTES // max(per_token, 1))


class _Run:
    def __init__(self, rule, call, scan):
        self.rule, self.call, self.scan = rule, call, scan
        self.values = Tokenwise(rule.ir, call, keep_lets=True, broadcast_params=True)
        self.dtype = call.compute_dtype
        B, T, H = call.batch, call.time, call.heads
        self.lead = (B, T, H)
        if call.packed:  # the first token of each sequence that has one
            segments = list(call.segments())
            self.nonempty = torch.tensor([i for i, (s, e) in enumerate(segments) if e > s],
                                         device=call.device, dtype=torch.long)
            self.starts = torch.tensor([s for s, e in segments if e > s], device=call.device,
                                       dtype=torch.long)
            self.keep = torch.ones(T, dtype=self.dtype, device=call.device)
            self.keep[self.starts] = 0.0  # a new sequence forgets the one before

    # ------------------------------------------------------------ 1. prologue

    def _lift(self, x, rank, axis):
        """A per-token value ``[B, T, H, *shape]`` shaped to broadcast against a state of
        ``rank``: a scalar on every entry, a vector on the rows (axis 0) or columns (axis 1)."""
        if x.dim() == 3:
            return x.reshape(x.shape + (1,) * rank)
        if rank == 2 and x.dim() == 4:
            return x.unsqueeze(-1) if axis == 0 else x.unsqueeze(-2)
        return x

    def decay(self, factor, rank, loop):
        """The factor's decay, broadcastable against the state ``[B, T, H, *dims]``."""
        if factor.decay is not None:
            return self._lift(self.values.value(factor.decay, loop), rank,
                              1 if factor.kind == "cols" else 0)
        total = None
        for coef, ops in factor.parts:
            term = self._lift(self.values.value(coef.expr(), loop), rank, 0)
            for kind, x in ops:
                term = term * self._lift(self.values.value(x, loop), rank,
                                         1 if kind == "cols" else 0)
            total = term if total is None else total + term
        return total

    def write(self, w: Write, rank, loop):
        value = self.values.value
        if w.kind == "outer":
            x = value(w.left, loop).unsqueeze(-1) * value(w.right, loop).unsqueeze(-2)
        elif w.kind == "vector":
            x = value(w.left, loop)
        elif w.kind == "other":
            x = value(w.value, loop)
        else:  # scalar
            x = None
        if w.coef.is_one and x is not None:
            return x
        c = self._lift(value(w.coef.expr(), loop), rank, 0)
        return c if x is None else c * x

    def transition(self, sa):
        """``(a, b)`` of the state: ``S_t = a_t ⊙ S_{t-1} + b_t``."""
        rank = sa.var.rank
        a, b = None, None
        for loop, steps in loop_groups(sa.steps):
            for j in range(self.call.dim_sizes[loop.dim]) if loop is not None else [None]:
                at = {loop.var: j} if loop is not None else None
                for step in steps:
                    for f in step.factors:
                        if f.kind == "identity":
                            continue
                        d = self.decay(f, rank, at)
                        a = d if a is None else a * d
                        b = None if b is None else b * d
                    for w in step.writes:
                        x = self.write(w, rank, at)
                        b = x if b is None else b + x
        shape = self.lead + tuple(self.call.dim_sizes[d] for d in sa.var.dims)
        one = torch.ones((), dtype=self.dtype, device=self.call.device)
        a = one.expand((1,) * len(shape)) if a is None else a
        b = torch.zeros(shape, dtype=self.dtype, device=self.call.device) if b is None else b
        return a.expand(a.shape[:1] + shape[1:2] + a.shape[2:]), b.expand(shape)

    # ------------------------------------------------------------ 2. the scan

    def states(self, sa):
        """Every token's state after its updates ``[B, T, H, *dims]`` and the initial states."""
        a, b = self.transition(sa)
        h0 = self.call.initial_state(sa.name).to(self.dtype)
        if not self.call.packed:
            return self.scan(a, b, h0), h0
        rank = sa.var.rank
        keep = self.keep.reshape((1, -1) + (1,) * (1 + rank))
        b = b + a * self._at_starts(h0)
        return self.scan(a * keep, b, torch.zeros_like(b[:, 0])), h0

    def _at_starts(self, h0):
        """``[1, T, H, *dims]``: each sequence's initial state at its first token, 0 elsewhere."""
        full = torch.zeros((self.call.time,) + tuple(h0.shape[1:]), dtype=self.dtype,
                           device=self.call.device)
        return full.index_copy(0, self.starts, h0.index_select(0, self.nonempty)).unsqueeze(0)

    def before(self, h, h0):
        """The states before each token: the token before's, or the sequence's initial one."""
        shifted = torch.cat([h0.unsqueeze(1) if not self.call.packed else
                             torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        if not self.call.packed:
            return shifted
        keep = self.keep.reshape((1, -1) + (1,) * (h.dim() - 2))
        return shifted * keep + self._at_starts(h0)

    def finals(self, h, h0):
        if not self.call.packed:
            return h[:, -1] if h.shape[1] else h0
        rows = [h[0, e - 1] if e > s else h0[i] for i, (s, e) in enumerate(self.call.segments())]
        return torch.stack(rows)

    # ------------------------------------------------------------ 3. epilogue

    def outputs_and_states(self):
        rule = self.rule
        scanned = {name: self.states(sa) for name, sa in rule.analysis.states.items()}
        finals = [self.finals(*scanned[v.name]) for v in rule.ir.states]
        if not rule.ir.outputs:
            return [], finals
        B, T, H = self.lead
        fold = lambda x: x.reshape(B * T, *x.shape[2:])
        after = {n: fold(h) for n, (h, h0) in scanned.items()}
        before = {n: (lambda h=h, h0=h0: fold(self.before(h, h0))) for n, (h, h0) in scanned.items()}
        outputs = _Epilogue(rule.ir, self.values, after, before).run()
        result = []
        for o in rule.ir.outputs:
            value = outputs[o.name]
            shape = tuple(self.call.dim_sizes[d] for d in o.dims)
            value = value.expand((B * T, H) + shape) if value.dim() < 2 + len(shape) else value
            result.append(value.reshape(B, T, H, *shape))
        return result, finals


class _Epilogue:
    """The rule's statements once for all tokens, states from the scan (see the module doc)."""

    def __init__(self, rule, values: Tokenwise, after: dict, before: dict):
        self.rule, self.values = rule, values
        self.after, self.before = after, before  # before: name -> a thunk (made when read)
        self.step: NaiveStep = values.step
        # lets and outputs that read states (directly or through others), in source order
        self.stateful = set()
        for st in rule.body:
            if isinstance(st, (ast.Let, ast.Output)) and self._reads_states(st.value):
                self.stateful.add(st.name)
        # the top-level environment: state-free lets from the prologue's kept values
        self._env = _Env(values)
        self.last = {}  # state -> its last top-level update statement
        self.loop_updated = set()  # states updated inside a for block
        for st in rule.body:
            if isinstance(st, ast.Update):
                self.last[st.state] = st
            elif isinstance(st, ast.For):
                self.loop_updated |= {s.state for s in ast.walk_statements(st.body)
                                      if isinstance(s, ast.Update)}

    def run(self) -> dict:
        states = _States(self.before)
        outputs = {}
        body = self.rule.body
        for i, st in enumerate(body):
            if isinstance(st, ast.Update):
                if st is self.last.get(st.state) and st.state not in self.loop_updated:
                    states[st.state] = self.after[st.state]
                elif self._read_before_next_update(body, i, st.state):
                    states[st.state] = self._eval(st.value, {}, states)
                else:
                    states.stale(st.state)  # never read at this version
            elif isinstance(st, ast.Let) and not self._reads_states(st.value):
                continue  # evaluated (once, when used) in the prologue's environment
            else:
                if isinstance(st, ast.For):
                    self._env.bind_used(st.body)
                self.step._run([st], self._env, self.values.token, self.values.params, states,
                               outputs)
        return outputs

    def _reads_states(self, e) -> bool:
        for n in ast.walk(e):
            if isinstance(n, ast.Name) and (n.kind == "state" or (
                    n.kind in ("let", "output") and n.id in self.stateful)):
                return True
        return False

    def _eval(self, e, env, states):
        return self.step.expr(e, self._env, self.values.token, self.values.params, states)

    @staticmethod
    def _read_before_next_update(body, i, state) -> bool:
        for st in body[i + 1:]:
            exprs = [st.value] if not isinstance(st, ast.For) else [
                s.value for s in ast.walk_statements(st.body)]
            if any(isinstance(n, ast.Name) and n.kind == "state" and n.id == state
                   for e in exprs for n in ast.walk(e)):
                return True
            if isinstance(st, ast.Update) and st.state == state:
                return False
        return False


class _Env(dict):
    """The epilogue's environment: lets it binds, else the prologue's state-free lets."""

    def __init__(self, values: Tokenwise):
        super().__init__()
        self._lazy = values._env(None, None, values._envs(None))

    def __missing__(self, name):
        value = self[name] = self._lazy[name]
        return value

    def bind_used(self, body):
        """Bind the outer lets that ``body`` (a for block) uses: the naive step copies the
        environment into the block, so lazy values must be there before."""
        for st in ast.walk_statements(body):
            for n in ast.walk(st.value):
                if isinstance(n, ast.Name) and n.kind == "let" and n.id not in self:
                    try:
                        self[n.id]
                    except KeyError:  # bound inside the block itself
                        pass


class _States(dict):
    """State values by name; a state not yet updated is its value before the token, made
    when first read."""

    def __init__(self, before: dict):
        super().__init__()
        self._before = before
        self._stale = set()

    def stale(self, name):
        self._stale.add(name)
        self.pop(name, None)

    def __missing__(self, name):
        if name in self._stale:
            raise AssertionError(f"state {name} read at a version the epilogue skipped")
        value = self._before[name]()
        self[name] = value
        return value
