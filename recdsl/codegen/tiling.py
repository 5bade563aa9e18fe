"""How a recurrent kernel's states are split across programs (a grid axis of tiles).

A state too large for one program's registers is cut into tiles along some of its dims, one
program per tile (per sequence and head).

Forward: the split dim must be one the forward never reduces over (V for the delta rules:
each column of S evolves on its own). Values that do not span it are recomputed by every
tile.

Backward: reverse mode is linear in the upstream gradients, which allows more. Every value
of the backward is, with respect to each split dim ``d``, either

- *sliced*: it spans ``d`` and each program holds its own slice;
- *replicated*: it does not span ``d`` and each program holds the whole, the same value;
- *partial*: it does not span ``d`` and each program holds a share; the shares sum to it.

Forward values are sliced or replicated, except those the forward reduces over a split dim
(the scores ``Sk @ q`` of Raven when K is split): the forward kernel stores them per token
(*residuals*) and the backward loads them. Gradients become partial where the adjoint sums
over a split dim; a replicated gradient added to a partial one is counted by the first tile
only (multiplied by ``first_tile_<d>``); a partial gradient may never be broadcast back along
``d`` (that would need the other programs' shares): a split needing it is refused. Results
that are partial, or replicated, along some split dim are stored one slot per program and
summed by the launcher.

So Raven's backward at M=64, K=V=128 splits both K and V: every program holds a 64 x 32 slice
of ``Sk`` and of ``Sv``, and the forward stores the slot scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations

import sympy

from ..ir.ssa import Elementwise, MatMul, Program, Reduce, Source, TopkMask, outs_of
from ..ir.vjp import Adjoint

# State elements one program holds before the states are split across programs: measured with
# `recdsl compile --arch sm_90 --report`, a backward holding 128 x 32 fp32 states builds
# without spills, 128 x 64 spills.
SPLIT_ABOVE = 4096
SMALLEST_TILE = 16


class NotSplittable(Exception):
    """The backward cannot be split along these dims (the message says why)."""


def first_tile(dim: str) -> str:
    """The kernel's name for 1.0 in the first program along ``dim``, 0.0 in the others."""
    return f"first_tile_{dim}"


@dataclass
class Tiling:
    """A split of the states: dim -> tile size (empty: one program holds everything)."""
    tiles: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)  # dim -> number of tiles along it

    @property
    def programs(self) -> int:
        return math.prod(self.counts.values())

    def covers(self, dims) -> bool:
        """Does a value of these dims get one disjoint slice per program (no partial slots)?"""
        return all(d in dims for d in self.tiles)


@dataclass
class BackwardPlan:
    """The backward kernel's per-token work under a tiling."""
    tiling: Tiling
    ops: list  # forward ops (residuals as Source ops of kind "residual"), then the adjoint's
    recompute: list  # the ops giving the next states from the states entering a token
    residuals: list  # forward Vals the forward kernel stores per token
    partial: dict  # Val -> frozenset of split dims over which it is a partial sum
    carried: dict  # state name -> frozenset of split dims over which its carried gradient is partial


def _elements(states, blocks: dict, tiles: dict) -> int:
    return sum(math.prod(tiles.get(d, blocks[d]) for d in dims) for dims in states)


def _shrink(states, blocks: dict, dims) -> dict:
    """Tile sizes along ``dims``: halve the tile whose halving saves the most until the
    states fit ``SPLIT_ABOVE`` elements or no tile can shrink."""
    tiles = {d: blocks[d] for d in dims}
    while _elements(states, blocks, tiles) > SPLIT_ABOVE:
        options = [d for d in dims if tiles[d] > SMALLEST_TILE]
        if not options:
            break
        d = min(options, key=lambda d: _elements(states, blocks, {**tiles, d: tiles[d] // 2}))
        tiles[d] //= 2
    return tiles


def _tiling(sizes: dict, tiles: dict) -> Tiling:
    return Tiling(dict(tiles), {d: -(-sizes[d] // t) for d, t in tiles.items()})


def _splittable_dims(rule) -> list:
    """State dims that appear at most once in every declared shape."""
    shapes = [v.dims for v in rule.inputs + rule.params + rule.states + rule.outputs]
    return [d for d in dict.fromkeys(d for s in rule.states for d in s.dims)
            if all(s.count(d) <= 1 for s in shapes)]


def reduced_dims(op) -> set:
    """Dims an op sums (or maxes, or ranks) over: what no tile can compute alone."""
    if isinstance(op, Reduce):
        return {op.arg.shape[a] for a in range(len(op.arg.shape)) if a not in op.keep}
    if isinstance(op, TopkMask):
        return set(op.arg.shape)
    if isinstance(op, MatMul):
        a_shape = op.a.shape[::-1] if op.ta else op.a.shape
        return {a_shape[-1]}
    return set()


def forward_tiling(rule, forward: Program, sizes: dict, blocks: dict) -> Tiling:
    """The forward's split: one dim the forward never reduces over, or none."""
    states = [s.dims for s in rule.states]
    if _elements(states, blocks, {}) <= SPLIT_ABOVE:
        return Tiling()
    reduced = set().union(*(reduced_dims(op) for op in forward.ops))
    best = None
    for d in _splittable_dims(rule):
        if d in reduced or blocks[d] <= SMALLEST_TILE:
            continue
        tiles = _shrink(states, blocks, [d])
        if best is None or _elements(states, blocks, tiles) < _elements(states, blocks, best):
            best = tiles
    return _tiling(sizes, best) if best else Tiling()


def backward_plan(rule, adj: Adjoint, sizes: dict, blocks: dict) -> BackwardPlan:
    """The backward's split: one or two dims (any the analysis allows), the one leaving the
    fewest state elements per program, then the fewest programs, then the fewest dims."""
    states = [s.dims for s in rule.states]
    if _elements(states, blocks, {}) > SPLIT_ABOVE:
        candidates = []
        dims = [d for d in _splittable_dims(rule) if blocks[d] > SMALLEST_TILE]
        for n in (1, 2):
            for chosen in combinations(dims, n):
                tiling = _tiling(sizes, _shrink(states, blocks, chosen))
                try:
                    plan = plan_backward(adj, tiling)
                except NotSplittable:
                    continue
                fits = _elements(states, blocks, tiling.tiles)
                candidates.append(((fits, tiling.programs, n), plan))
        if candidates:
            return min(candidates, key=lambda c: c[0])[1]
    return plan_backward(adj, Tiling())


# ------------------------------------------------------------------ the analysis of one split


def plan_backward(adj: Adjoint, tiling: Tiling) -> BackwardPlan:
    """The backward's ops under ``tiling``, or NotSplittable. The carried state gradients'
    kinds are found by iteration: a state gradient that comes out partial makes the carried
    one partial, which may make more values partial (at most one round per state and dim)."""
    split = set(tiling.tiles)
    program = adj.program
    forward_ops = program.ops[:adj.forward_ops]
    residual_ops = {id(op) for op in forward_ops if reduced_dims(op) & split}
    ops = [Source(op.out, "residual", op.out.id) if id(op) in residual_ops else op for op in program.ops]
    adjoint_vals = {v for op in ops[adj.forward_ops:] for v in outs_of(op)}
    carried = {name: frozenset() for name in adj.grad_states_out}
    while True:
        rewritten, partial = _propagate(ops, adjoint_vals, adj, carried, split)
        grown = {name: carried[name] | partial.get(val, frozenset())
                 for name, val in adj.grad_states_in.items() if val is not None}
        if all(grown[n] == carried[n] for n in grown):
            break
        carried.update(grown)
    roots = [v for v in list(adj.grad_inputs.values()) + list(adj.grad_params.values())
             + list(adj.grad_states_in.values()) if v is not None]
    kept = live_ops(rewritten, roots)
    recompute = live_ops(ops[:adj.forward_ops], list(program.states_out.values()))
    residuals = [op.out for op in kept + recompute if isinstance(op, Source) and op.kind == "residual"]
    return BackwardPlan(tiling, kept, recompute, list(dict.fromkeys(residuals)), partial, carried)


def _propagate(ops, adjoint_vals, adj: Adjoint, carried: dict, split: set):
    """(ops with replicated gradients scaled where they meet partial ones, Val -> partial dims)."""
    partial = {}
    for name, seed in adj.grad_states_out.items():
        partial[seed] = carried[name]
    out_ops = []
    for op in ops:
        if isinstance(op, Source) or not any(v in adjoint_vals for v in outs_of(op)):
            out_ops.append(op)
            continue
        if isinstance(op, Elementwise):
            op = _elementwise(op, partial, adjoint_vals, split)
        elif isinstance(op, Reduce):
            gone = {d for d in reduced_dims(op) if d in split and d in op.arg.shape}
            partial[op.out] = partial.get(op.arg, frozenset()) | gone
        elif isinstance(op, MatMul):
            gone = {d for d in reduced_dims(op) if d in split}
            parts = frozenset().union(*(partial.get(v, frozenset()) for v in (op.a, op.b)))
            for d in parts:
                if d in op.out.shape:
                    raise NotSplittable(f"{op.out.id} needs the whole of a gradient summed over {d}")
            partial[op.out] = parts | gone
        out_ops.append(op)
    return out_ops, partial


def _elementwise(op: Elementwise, partial: dict, adjoint_vals: set, split: set) -> Elementwise:
    """Each term is linear in exactly one gradient leaf: the result is partial along every dim
    some leaf is, and a replicated leaf there is counted by the first tile only."""
    parts = frozenset()
    for leaf in op.leaves:
        if leaf.val in adjoint_vals or leaf.val in partial:
            mine = partial.get(leaf.val, frozenset())
            for d in mine:
                if d in op.shape:
                    raise NotSplittable(f"{leaf.val.id} is summed over {d} and then needed along {d}")
            parts |= mine
    scale = {}
    for leaf in op.leaves:
        if leaf.val in adjoint_vals or leaf.val in partial:
            missing = sorted(parts - partial.get(leaf.val, frozenset()))
            if missing:
                scale[leaf.sym] = leaf.sym * sympy.Mul(*[sympy.Symbol(first_tile(d)) for d in missing])
    for out in op.outs:
        partial[out] = parts
    if not scale:
        return op
    return Elementwise(list(op.outs), [e.xreplace(scale) for e in op.exprs], list(op.leaves), op.shape)


def operands(op) -> list:
    if isinstance(op, Elementwise):
        return [leaf.val for leaf in op.leaves]
    if isinstance(op, (Reduce, TopkMask)):
        return [op.arg]
    if isinstance(op, MatMul):
        return [op.a, op.b]
    return []


def live_ops(ops, roots) -> list:
    """The ops ``roots`` depend on, in program order."""
    needed = set(roots)
    keep = []
    for op in reversed(ops):
        if any(v in needed for v in outs_of(op)):
            keep.append(op)
            needed.update(operands(op))
    return list(reversed(keep))


def used_program(program: Program, ops: list) -> Program:
    """``program`` restricted to ``ops``: only the sources they still read."""
    alive = {v for op in ops for v in outs_of(op)}
    return Program(ops, {k: v for k, v in program.inputs.items() if v in alive},
                   {k: v for k, v in program.params.items() if v in alive},
                   {k: v for k, v in program.states_in.items() if v in alive},
                   program.states_out, program.outputs, program.dims)

