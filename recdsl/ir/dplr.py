"""The DPLR family's planner: diagonal-plus-low-rank transitions, read from the affine normal
form (``recdsl.ir.affine``).

A state is in the family when each token's update is a sequence of

    decay      S <- Diag(d) S            d a per-channel vector on the key axis, or a scalar
    rank-one   S <- (D - a bᵀ) S         D the identity, a scalar or a per-channel Diag(d)
    write      S <- S + x yᵀ             any number of outer products

in either orientation: a state whose rank-one factors sit on its right, ``S (D - k bᵀ)``
(RWKV-7's ``[V, K]`` state), is planned as its transpose, ``(D - b kᵀ) Sᵀ``, with its column
decays as row decays, its writes ``outer(x, y)`` as ``outer(y, x)`` and its reads ``S @ x``
as ``x @ Sᵀ``. ``(D - a bᵀ)`` is kept whole (never ``D (I - D⁻¹ a bᵀ)``: D may be 0).

``plan(analysis)`` returns a ``DplrPlan`` (per state, the per-token ops in application order in
that canonical left orientation; per output, its reads) or raises ``NotDplr(reason, pos)``.
Outputs must be linear reads ``x @ S`` (canonically) of the states after the token's updates,
plus a state-free per-token term; ``for`` loops may be one level deep.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..grammar import ast
from .affine import Analysis, Coef, loop_groups
from .family import Refusal
from .pretty import unparse


class NotDplr(Refusal):
    """Why a rule is not in the DPLR family."""


@dataclass(eq=False)
class Decay:
    """``S <- Diag(decay) S`` (``kind`` rows: a vector on the key axis; scalar: a scalar)."""
    kind: str
    decay: object  # the expression of the decay itself (``exp(gk)``)
    node: object = None


@dataclass(eq=False)
class RankOne:
    """``S <- (D - coef * vec keyᵀ) S``, D the identity (``diag`` None) or a ``Decay``:
    canonically ``D S + a (bᵀ S)`` with ``a = -coef * vec`` and ``b = key``."""
    coef: Coef
    vec: object
    key: object
    diag: Optional[Decay] = None
    node: object = None


@dataclass(eq=False)
class WriteOp:
    """``S <- S + coef * outer(left, right)`` (canonical orientation)."""
    coef: Coef
    left: object
    right: object
    node: object = None


@dataclass(eq=False)
class LoopOps:
    """``for var in dim:`` the ops repeated per loop value."""
    var: str
    dim: str
    ops: list


@dataclass(eq=False)
class StatePlan:
    name: str
    orientation: str  # left: S itself; right: the plan is of Sᵀ
    key_dim: str  # canonical first axis (the axis decays and rank-one factors act on)
    value_dim: str
    items: list  # Decay / RankOne / WriteOp / LoopOps, application order


@dataclass(eq=False)
class ReadPlan:
    state: str
    coef: Coef
    vector: object  # canonical: vector @ S (S canonical)


@dataclass(eq=False)
class OutputPlan:
    name: str
    reads: list  # ReadPlan
    extra: object = None  # a state-free per-token term, or None


@dataclass(eq=False)
class DplrPlan:
    states: dict  # name -> StatePlan
    outputs: list = field(default_factory=list)  # OutputPlan, one per output, source order

    def describe(self) -> str:
        parts = []
        for sp in self.states.values():
            kinds = []

            def walk(items, suffix=""):
                for it in items:
                    if isinstance(it, LoopOps):
                        walk(it.ops, f" (for {it.var} in {it.dim})")
                    elif isinstance(it, Decay):
                        kinds.append(f"{'row' if it.kind == 'rows' else 'scalar'} decay "
                                     f"{unparse(it.decay)}{suffix}")
                    elif isinstance(it, RankOne):
                        d = f" beside the decay {unparse(it.diag.decay)}" if it.diag else ""
                        kinds.append(f"rank-one factor along {unparse(it.key)}{d}{suffix}")
                    else:
                        kinds.append(f"write outer({unparse(it.left)}, {unparse(it.right)})"
                                     f"{suffix}")

            walk(sp.items)
            t = "ᵀ (planned transposed)" if sp.orientation == "right" else ""
            parts.append(f"{sp.name}{t}: " + ", ".join(kinds or ["no decay"]))
        return "DPLR transitions: " + "; ".join(parts)


def _pos(node):
    return ast.expr_span(node) if node is not None else None


def plan(analysis: Analysis) -> DplrPlan:
    """The rule's DPLR plan, or raise NotDplr."""
    states = {}
    for sa in analysis.states.values():
        if not sa.affine:
            p = sa.problem
            raise NotDplr(f"the update of {sa.name} is not affine in the states: {p.message}",
                          p.pos)
        if sa.var.rank != 2:
            what = "a scalar" if sa.var.rank == 0 else "a vector"
            raise NotDplr(f"state {sa.name} is {what}; the DPLR form takes matrix states",
                          sa.var.pos)
        states[sa.name] = _state(sa)
    return DplrPlan(states, _outputs(analysis, states))


def _state(sa) -> StatePlan:
    sides = {f.side for f in sa.factors if f.kind == "rank_one"}
    if len(sides) > 1:
        f = next(f for f in sa.factors if f.kind == "rank_one" and f.side == "right")
        raise NotDplr(f"{sa.name} has rank-one factors on both sides ({unparse(f.node)} is on "
                      f"the right): the DPLR form takes them on one side", _pos(f.node))
    kinds = {f.kind for f in sa.factors}
    if sides:
        orientation = sides.pop()
    else:
        orientation = "right" if "cols" in kinds and "rows" not in kinds else "left"
    own = "rows" if orientation == "left" else "cols"  # the decay on the key axis
    other = "cols" if orientation == "left" else "rows"
    first, last = sa.var.dims
    key_dim, value_dim = (first, last) if orientation == "left" else (last, first)

    def decay(f) -> Decay:
        if f.kind == "scalar":
            return Decay("scalar", f.decay, f.node)
        if f.kind == own and f.decay is not None:
            return Decay("rows", f.decay, f.node)
        if f.kind == other:
            raise NotDplr(f"{unparse(f.node)} decays the value axis ({value_dim}) of {sa.name}: "
                          f"the DPLR form decays the key axis ({key_dim}) only", _pos(f.node))
        raise NotDplr(f"the decay {unparse(f.node)} of {sa.name} is not a scalar or per-channel "
                      f"decay of its key axis ({key_dim})", _pos(f.node))

    def ops(step) -> list:
        out = []
        for f in step.factors:
            if f.kind == "identity":
                continue
            if f.kind == "rank_one":
                d = None
                if f.diag is not None:
                    d = decay(f.diag)
                out.append(RankOne(f.coef, f.vec, f.key, d, f.node))
            else:
                out.append(decay(f))
        for w in step.writes:
            if w.kind != "outer":
                raise NotDplr(f"the write {unparse(w.node)} to {sa.name} is not an outer product "
                              f"outer(a, b)", _pos(w.node))
            left, right = (w.left, w.right) if orientation == "left" else (w.right, w.left)
            out.append(WriteOp(w.coef, left, right, w.node))
        return out

    items = []
    for loop, steps in loop_groups(sa.steps):
        body = [op for s in steps for op in ops(s)]
        if loop is None:
            items.extend(body)
            continue
        if loop.parent is not None:
            raise NotDplr(f"the update of {sa.name} is inside nested 'for' loops: the DPLR form "
                          f"takes one level", loop.node.pos)
        if items and isinstance(items[-1], LoopOps) and items[-1].var == loop.var \
                and items[-1].dim == loop.dim and items[-1].node is loop.node:
            items[-1].ops.extend(body)
        else:
            lo = LoopOps(loop.var, loop.dim, body)
            lo.node = loop.node
            items.append(lo)
    return StatePlan(sa.name, orientation, key_dim, value_dim, items)


def _outputs(analysis, states) -> list:
    out = []
    for rv in analysis.reads:
        if rv.problem is not None:
            raise NotDplr(f"{rv.problem.message}: an output must be a linear read of the states",
                          rv.problem.pos)
        if rv.kind != "output" or rv.chain:
            raise NotDplr(f"{rv.name} reads the states along a vector computed from other reads "
                          f"of the states: the DPLR form reads along state-free vectors",
                          _pos(rv.node.value))
        reads = []
        for term in rv.terms:
            r = term.read
            if not r.after_update:
                raise NotDplr(f"{rv.name} reads {r.state} before the token's last update of it: "
                              f"the DPLR form reads the state after the token's updates",
                              _pos(r.node))
            sp = states[r.state]
            canonical = {"left": "left", "right": "right"}.get(r.side) if sp.orientation == "left" \
                else {"left": "right", "right": "left"}.get(r.side)
            if canonical != "left":
                shown = f"{r.state} @ x" if r.side == "right" else f"x @ {r.state}"
                raise NotDplr(f"{unparse(r.node)} reads {r.state} as {shown}, along its value "
                              f"axis: the DPLR path reads along the key axis "
                              f"({sp.key_dim}) only", _pos(r.node))
            reads.append(ReadPlan(r.state, term.coef, r.vector))
        out.append(OutputPlan(rv.name, reads, rv.extra))
    return out
