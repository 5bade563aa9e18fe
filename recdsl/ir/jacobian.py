"""The structure of a rule's state Jacobian: which entries of one token's new states depend on
which entries of the states it started from, read off the per-token program symbolically.

For the Newton (ParaRNN) backend a rule's token is ``h_t = f(h_{t-1}, x_t)`` with every state
stacked into ``h``; the backend linearises ``f`` around a guess, so it needs ``J_t = df/dh`` and,
to keep the linear solve cheap, the pattern of its nonzeros. That pattern comes from the
``ssa.Program`` of one token (``recdsl.ir.ssa``): every value records, for each state, which of
the state's axes it is *tied* to (its entry at index i along that axis reads the state only at
index i: elementwise ops keep ties, a sum or a matrix product over an axis frees it) or whether
it reads the whole axis (free). A derivative that sympy finds identically zero is no
dependence. From the ties of the new states on the old ones:

- *channel* dims: dims every state has, on which every dependence is tied (the channels of
  an elementwise GRU, the ``V`` axis of a delta-rule matrix state, whose columns do not mix);
- the *block* of one channel: the entries along the other (free) axes of every state, stacked;
  ``J`` is block-diagonal over the channels, with blocks of that size;
- ``diagonal``: no free axis and no state reads another (a block of one entry per state);
  ``block``: channels with blocks of more than one entry (an LSTM's ``(c, h)`` pair per channel,
  a delta rule's ``K x K`` block per column); ``dense``: no channel at all (``R @ h``).

The numbers of ``J`` are not derived here: generated code (``recdsl.codegen.jacobian_step``)
computes them with the step, by forward-mode tangents with one column per entry of a block (1
on every channel at once), which this structure is what makes exact; the ties let it keep a
tied tangent as a diagonal (no column) until a sum turns it into one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import sympy

from .checked import CheckedRule
from .ssa import Elementwise, MatMul, Reduce, Source, TopkMask, lower

KINDS = ("diagonal", "block", "dense")


class NotDifferentiable(Exception):
    """The step's new states are not differentiable in the old ones (so no Newton step)."""


@dataclass
class Structure:
    kind: str  # diagonal, block or dense
    states: tuple  # state names, in declaration order (the order they are stacked in)
    channels: tuple  # channel dim names (J is block-diagonal over them)
    free: dict  # state -> its dims along which a block spans, in order
    couplings: frozenset  # (new state, old state) pairs with a nonzero derivative
    dims: dict = field(default_factory=dict)  # state -> its dims

    def block_size(self, dim_sizes: dict) -> int:
        """Entries of one channel's block: the width of the linear solve's matrices."""
        return sum(prod(dim_sizes[d] for d in self.free[s]) for s in self.states)

    def channel_count(self, dim_sizes: dict) -> int:
        return prod(dim_sizes[d] for d in self.channels)

    def size_text(self) -> str:
        """The block's width as a formula in the dims ("2*D", "K", "1")."""
        parts = ["*".join(self.free[s]) or "1" for s in self.states]
        counts = {p: parts.count(p) for p in dict.fromkeys(parts)}
        terms = [p if n == 1 else (f"{n}*{p}" if p != "1" else str(n)) for p, n in counts.items()]
        text = " + ".join(terms)
        return f"({text})" if len(terms) > 1 else text

    def describe(self) -> str:
        names = ", ".join(self.states)
        if self.kind == "diagonal":
            return (f"Jacobian diagonal: every entry of ({names}) depends only on the same entry "
                    f"of the previous state; the linear solve is an elementwise scan")
        cross = sorted(f"{a}<-{b}" for a, b in self.couplings if a != b)
        coupled = f"; coupled: {', '.join(cross)}" if cross else ""
        if self.kind == "block":
            return (f"Jacobian block-diagonal: one {self.size_text()} x {self.size_text()} block "
                    f"per channel of ({', '.join(self.channels)}) over ({names}){coupled}")
        return (f"Jacobian dense: one {self.size_text()} x {self.size_text()} matrix over "
                f"({names}){coupled}")


def _merge(ties: list) -> tuple:
    """Ties of a value read through several operands: an axis stays tied only when every
    operand ties it to the same axis."""
    first = ties[0]
    return tuple(a if all(t[i] == a for t in ties) else None for i, a in enumerate(first))


def _dependences(program) -> tuple:
    """Val id -> {state: ties (per state axis: the value's axis it is tied to, or None)}; and
    the TopkMask ops whose argument reads a state."""
    deps = {}
    masked = []
    for op in program.ops:
        if isinstance(op, Source):
            rank = len(op.out.shape)
            deps[op.out.id] = {op.name: tuple(range(rank))} if op.kind == "state" else {}
        elif isinstance(op, Elementwise):
            for out, expr in zip(op.outs, op.exprs):
                reads = {}
                for leaf in op.leaves:
                    if leaf.sym not in expr.free_symbols or sympy.diff(expr, leaf.sym) == 0:
                        continue
                    for state, ties in deps[leaf.val.id].items():
                        mapped = tuple(leaf.axes[a] if a is not None else None for a in ties)
                        reads.setdefault(state, []).append(mapped)
                deps[out.id] = {s: _merge(t) for s, t in reads.items()}
        elif isinstance(op, Reduce):
            deps[op.out.id] = {s: tuple(op.keep.index(a) if a in op.keep else None for a in ties)
                               for s, ties in deps[op.arg.id].items()}
        elif isinstance(op, MatMul):
            a = {s: tuple(0 if x == 0 else None for x in ties) for s, ties in deps[op.a.id].items()}
            b = {s: tuple(1 if x == 1 else None for x in ties) for s, ties in deps[op.b.id].items()}
            deps[op.out.id] = {s: _merge([t for t in (a.get(s), b.get(s)) if t is not None])
                               for s in {**a, **b}}
        elif isinstance(op, TopkMask):
            if deps[op.arg.id]:
                masked.append(op)
            deps[op.out.id] = {}  # a selection: piecewise constant, no derivative
        else:
            raise AssertionError(op)
    return deps, masked


def structure(rule: CheckedRule, dim_sizes: dict | None = None) -> Structure:
    """The Jacobian structure of ``rule``'s token in its states. Loops are unrolled (at size 2
    unless ``dim_sizes`` gives them: the pattern does not depend on it). Raises
    ``NotDifferentiable`` when a keep_topk selects among entries that depend on the states."""
    sizes = {d: 2 for d in rule.loop_dims()}
    sizes.update(dim_sizes or {})
    program = lower(rule, sizes)
    deps, masked = _dependences(program)
    names = tuple(v.name for v in rule.states)
    dims = {v.name: tuple(v.dims) for v in rule.states}
    # keep_topk that reads a state's entries: where the selection changes, f jumps
    for op in masked:
        reaches = any(_reaches(program, op.out, out) for out in program.states_out.values())
        if reaches:
            raise NotDifferentiable(f"keep_topk selects among entries that depend on the states "
                                    f"({', '.join(deps[op.arg.id])}): the step jumps where the "
                                    f"selection changes, so it has no Jacobian there")
    pairs = {}
    for new in names:
        for old, ties in deps[program.states_out[new].id].items():
            pairs[(new, old)] = ties
    # channel dims: in every state exactly once, tied to themselves by every dependence
    channels = [d for d in dims[names[0]] if all(dims[s].count(d) == 1 for s in names)]
    for (new, old), ties in pairs.items():
        channels = [d for d in channels if ties[dims[old].index(d)] == dims[new].index(d)]
    free = {s: tuple(d for d in dims[s] if d not in channels) for s in names}
    cross = any(a != b for a, b in pairs)
    if not channels:
        kind = "dense"
    elif all(not f for f in free.values()) and not cross:
        kind = "diagonal"
    else:
        kind = "block"
    return Structure(kind, names, tuple(channels), free, frozenset(pairs), dims)


def jointly_affine(rule: CheckedRule) -> bool:
    """Whether the token's new states are affine in the old states taken together: states that
    read each other linearly (an LRU's real and imaginary parts, LinOSS's position and
    velocity, Titans' memory and momentum) are coupled, not nonlinear. Each value is state-free
    (0), affine in the states (1) or not (2); an elementwise op is affine when its derivative in
    each affine leaf reads no affine leaf, a product of two matrices when one is state-free."""
    program = lower(rule, {d: 2 for d in rule.loop_dims()})
    degree = {}
    for op in program.ops:
        if isinstance(op, Source):
            degree[op.out.id] = 1 if op.kind == "state" else 0
        elif isinstance(op, Elementwise):
            for out, expr in zip(op.outs, op.exprs):
                used = [leaf for leaf in op.leaves if leaf.sym in expr.free_symbols]
                if any(degree[leaf.val.id] == 2 for leaf in used):
                    degree[out.id] = 2
                    continue
                linear = {leaf.sym for leaf in used if degree[leaf.val.id] == 1}
                nonlinear = any(linear & sympy.diff(expr, x).free_symbols for x in linear)
                degree[out.id] = 2 if nonlinear else int(bool(linear))
        elif isinstance(op, Reduce):
            arg = degree[op.arg.id]
            degree[op.out.id] = 2 if arg and op.kind != "sum" else arg
        elif isinstance(op, MatMul):
            a, b = degree[op.a.id], degree[op.b.id]
            degree[op.out.id] = 2 if (a and b) else max(a, b)
        else:  # TopkMask: a selection among state-dependent entries is not affine
            degree[op.out.id] = 2 if degree[op.arg.id] else 0
    return all(degree[v.id] <= 1 for v in program.states_out.values())


def _reaches(program, start, target) -> bool:
    """Does value ``start`` feed value ``target`` in the program?"""
    live = {start.id}
    for op in program.ops:
        if isinstance(op, Source):
            continue
        ins = ([leaf.val.id for leaf in op.leaves] if isinstance(op, Elementwise)
               else [op.a.id, op.b.id] if isinstance(op, MatMul) else [op.arg.id])
        if live.intersection(ins):
            live.update(o.id for o in (op.outs if isinstance(op, Elementwise) else [op.out]))
    return target.id in live


def plan(rule: CheckedRule) -> str:
    """The Newton planner's verdict: what the structure is and what the newton backend does
    with it, or a ``Refusal`` (a step that is not differentiable in the states)."""
    from .family import Refusal
    try:
        s = structure(rule)
    except NotDifferentiable as err:
        raise Refusal(str(err)) from None
    except NotImplementedError as err:  # a form the per-token program does not lower
        raise Refusal(f"the token cannot be lowered to a program ({err})") from None
    wide = [n for n in s.states if s.kind == "dense" and len(s.free[n]) > 1]
    if wide:  # (K*V)^2 Jacobian entries per token: far slower than the loop, and memory
        raise Refusal(f"the Jacobian is dense over the matrix state {wide[0]} (one {s.size_text()} "
                      f"x {s.size_text()} matrix per token): no Newton form")
    size = f"{s.size_text()} x {s.size_text()}"
    # what runtime.newton does with it: on the CPU the forward is the sequential pass of the
    # generated step (measured faster there); on a GPU Newton iterations with Triton solves
    if s.kind == "dense":  # a parallel scan of dense matrices would cost k^3 per token
        cpu_back = f"the transposed recurrence token by token (one batched {size} product each)"
        gpu = f"a kernel walking T with one {size} matrix-vector product per token"
    else:
        cpu_back = {"diagonal": "an elementwise scan over T",
                    "block": f"a scan of {size} blocks over T (token by token for wide blocks)"}[s.kind]
        gpu = {"diagonal": "the elementwise scan kernel",
               "block": f"a kernel carrying the {size} blocks' vectors over T"}[s.kind]
    return (f"{s.describe()}. On the CPU: the sequential pass of the generated step forward, "
            f"backward {cpu_back} with generated Jacobians; on a GPU: Newton iterations, each "
            f"linearised recurrence solved by {gpu} (Triton), backward the same in the "
            f"transposed Jacobians")
