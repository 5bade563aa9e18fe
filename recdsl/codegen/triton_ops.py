"""ssa ops -> straight-line Triton code over blocks.

A value of shape () is a scalar, (D,) a block ``[BD]``, (D, E) a block ``[BD, BE]``; block sizes
are powers of two at least the dim's size, and lanes past the size are padding. Padding may
hold any value, so every reduction and matrix product masks its operand (``m_D`` is the lane
mask of dim D); nothing else needs to, since padded lanes are never stored.
"""
from __future__ import annotations

import sympy

from ..ir.ssa import Elementwise, MatMul, Reduce, Source, TopkMask, Val
from .printers import TritonPrinter, cse_lines, substitute_dims

# A top-k mask by repeated selection of the largest remaining lane (ties: lowest index).
TOPK_HELPER = '''
@triton.jit
def _topk_mask(x, lane_mask, count, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    rest = tl.where(lane_mask, x, float("-inf"))
    kept = tl.zeros([BLOCK], tl.float32)
    for _ in range(count):
        top = tl.max(rest, axis=0)
        first = tl.min(tl.where(rest == top, lanes, BLOCK), axis=0)
        kept = tl.where(lanes == first, 1.0, kept)
        rest = tl.where(lanes == first, float("-inf"), rest)
    return kept
'''


def block(dim: str) -> str:
    return f"B_{dim}"


def mask_of(shape: tuple) -> str:
    if len(shape) == 1:
        return f"m_{shape[0]}"
    return f"(m_{shape[0]}[:, None] & m_{shape[1]}[None, :])"


def zeros(shape: tuple, block_of=block) -> str:
    """A zero block; ``block_of`` names a dim's block size (a kernel may tile some dims)."""
    if not shape:
        return "tl.zeros([], tl.float32)"
    return "tl.zeros([" + ", ".join(block_of(d) for d in shape) + "], tl.float32)"


def _view(val: Val, axes: tuple, rank: int) -> str:
    if axes == tuple(range(rank)) or len(val.shape) == 0:
        return val.id
    if rank == 2 and axes == (0,):
        return f"{val.id}[:, None]"
    if rank == 2 and axes == (1,):
        return f"{val.id}[None, :]"
    raise AssertionError((axes, rank))


def emit_ops(ops, dim_sizes: dict, prefix: str = "", block_of=block) -> list:
    """Lines of Triton for ``ops`` (Source ops are skipped: the kernel template loads them)."""
    lines = []
    for k, op in enumerate(ops):
        if isinstance(op, Source):
            continue
        if isinstance(op, Elementwise):
            rank = len(op.shape)
            printer = TritonPrinter({leaf.sym: _view(leaf.val, leaf.axes, rank) for leaf in op.leaves})
            exprs = [substitute_dims(e, dim_sizes) for e in op.exprs]
            temps, reduced = cse_lines(exprs, f"{prefix}c{k}_")
            for sym, e in temps:
                lines.append(f"{sym.name} = {printer.doprint(e)}")
            for out, e, original in zip(op.outs, reduced, exprs):
                text = printer.doprint(e)
                full = tuple(range(rank))
                covered = any(leaf.axes == full and len(leaf.val.shape) == rank and leaf.sym in original.free_symbols
                              for leaf in op.leaves)
                if rank and not covered:
                    text = f"({text}) + {zeros(op.shape, block_of)}"
                elif not rank and not original.free_symbols:
                    text = f"tl.full([], {text}, tl.float32)"
                lines.append(f"{out.id} = {text}")
        elif isinstance(op, Reduce):
            lines.append(f"{op.out.id} = {_reduce(op)}")
        elif isinstance(op, TopkMask):
            (dim,) = op.arg.shape
            count = min(op.count, dim_sizes[dim])  # keep_topk(x, n) keeps everything when n >= size
            lines.append(f"{op.out.id} = _topk_mask({op.arg.id}, m_{dim}, {count}, {block_of(dim)})")
        elif isinstance(op, MatMul):
            a = f"tl.trans({op.a.id})" if op.ta else op.a.id
            b = f"tl.trans({op.b.id})" if op.tb else op.b.id
            sa = op.a.shape[::-1] if op.ta else op.a.shape
            sb = op.b.shape[::-1] if op.tb else op.b.shape
            ma = f"tl.where({mask_of(sa)}, {a}, 0.0)"
            mb = f"tl.where({mask_of(sb)}, {b}, 0.0)"
            lines.append(f"{op.out.id} = tl.sum({ma}[:, :, None] * {mb}[None, :, :], axis=1)")
        else:
            raise AssertionError(op)
    return lines


def _reduce(op: Reduce) -> str:
    shape = op.arg.shape
    fill, fn = ("0.0", "tl.sum") if op.kind == "sum" else ('float("-inf")', "tl.max")
    x = f"tl.where({mask_of(shape)}, {op.arg.id}, {fill})"
    if len(shape) == 1:
        return f"{fn}({x}, axis=0)" if op.keep == () else op.arg.id
    if op.keep == (0,):
        return f"{fn}({x}, axis=1)"
    if op.keep == (1,):
        return f"{fn}({x}, axis=0)"
    if op.keep == ():
        return f"{fn}({fn}({x}, axis=1), axis=0)"
    return op.arg.id  # keep both axes: nothing to reduce
