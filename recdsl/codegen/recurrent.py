"""The fused recurrent kernels: one Triton program per (sequence, head) walks the tokens one
at a time with the states held on chip.

Forward: loads the token's inputs, runs the token's ssa program (``triton_ops``), stores the
outputs, and every ``CKPT`` tokens stores the states entering the token (a checkpoint).
Backward: walks the checkpoint segments last to first; inside a segment it recomputes the
states entering each token into a scratch buffer of ``CKPT`` states, then walks the segment
backwards running the token's adjoint program. Memory: O(T / CKPT) checkpoints plus CKPT
scratch states per program, never O(T) states.

The kernels are specialised to the dim sizes (loops over dims like NH are unrolled, blocks
are sized per dim). ``KernelSpec`` records everything a launcher needs.

Large states are split across programs along one dim (a grid axis of tiles): a dim the
forward never reduces over (V for the delta rules: each column of S evolves on its own).
Values that do not span that dim are recomputed by every tile. In the backward their
gradients are partial sums, one per tile, summed by the launcher: reverse mode is linear in
the upstream gradients, so each tile carries its share, and the upstream gradients of
values that do not span the split dim are fed to the first tile only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..ir.checked import CheckedRule
from ..ir.ssa import MatMul, Program, Reduce, TopkMask, lower
from ..ir.vjp import adjoint
from .triton_ops import TOPK_HELPER, block, emit_ops, mask_of, zeros


@dataclass
class KernelSpec:
    """The generated source and the argument lists of its two kernels."""
    rule_name: str
    source: str
    dim_sizes: dict
    blocks: dict  # dim -> block size
    forward_args: list = field(default_factory=list)  # pointer / scalar argument names, in order
    backward_args: list = field(default_factory=list)
    constexprs: tuple = ("USE_INITIAL", "STORE_FINAL", "IS_VARLEN", "CKPT")
    grad_inputs: dict = field(default_factory=dict)  # input name -> has a gradient
    grad_params: dict = field(default_factory=dict)
    grad_states: dict = field(default_factory=dict)
    num_warps: int = 4  # launch widths of the forward and backward kernels (``launch_widths``)
    backward_num_warps: int = 4
    split_dim: str | None = None  # the dim tiled across programs, if any
    tiles: int = 1  # programs per (sequence, head): the grid is (N * H, tiles)
    spans_split: dict = field(default_factory=dict)  # input/param/state name -> spans split_dim

    @property
    def forward_name(self):
        return f"{_ident(self.rule_name)}_recurrent_fwd"

    @property
    def backward_name(self):
        return f"{_ident(self.rule_name)}_recurrent_bwd"


def _ident(name: str) -> str:
    return "rule_" + name  # a validated identifier; the prefix keeps it clear of Python names


def _numel(dims, sizes) -> str:
    n = 1
    for d in dims:
        n *= sizes[d]
    return str(n)


def _inner_offsets(dims: tuple, sizes: dict) -> str:
    """Offsets of a [*dims] row-major block relative to its start."""
    if len(dims) == 0:
        return "0"
    if len(dims) == 1:
        return f"o_{dims[0]}"
    return f"o_{dims[0]}[:, None] * {sizes[dims[1]]} + o_{dims[1]}[None, :]"


class _Emitter:
    def __init__(self):
        self.lines = []
        self.depth = 0

    def __call__(self, line=""):
        self.lines.append("    " * self.depth + line if line else "")

    def block(self, lines):
        for line in lines:
            self(line)


class _RecurrentGenerator:
    def __init__(self, rule: CheckedRule, dim_sizes: dict):
        self.rule = rule
        self.sizes = dict(dim_sizes)
        # block sizes: powers of two (Triton's aranges need them); no triton import here, so
        # that generating code never fixes Triton's interpreter setting for the process
        self.blocks = {d: 1 << (n - 1).bit_length() for d, n in self.sizes.items()}
        self.forward = lower(rule, self.sizes)
        self.adjoint = adjoint(self.forward)  # its first ops are the forward's own: same names
        self.split, tile = choose_split(rule, self.forward, self.blocks)
        self.tiles = 1
        if self.split is not None:
            self.tiles = -(-self.sizes[self.split] // tile)
            self.blocks[self.split] = tile

    def spans(self, dims) -> bool:
        return self.split is not None and self.split in dims

    # ------------------------------------------------------------ shared pieces

    def prologue(self, e: _Emitter):
        """Program ids, sequence bounds, lanes and masks of every dim."""
        e("i_nh = tl.program_id(0)")
        e("i_tile = tl.program_id(1)  # tile of the split dim (always 0 when nothing is split)")
        e("first_tile = tl.where(i_tile == 0, 1.0, 0.0)")
        e("i_n = i_nh // H")
        e("i_h = i_nh % H")
        e("if IS_VARLEN:")
        e("    bos = tl.load(cu_seqlens + i_n).to(tl.int64)")
        e("    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)")
        e("else:")
        e("    bos = tl.cast(i_n, tl.int64) * T")
        e("    eos = bos + T")
        for d in self.rule.dims:
            start = f"i_tile * {block(d)} + " if d == self.split else ""
            e(f"o_{d} = {start}tl.arange(0, {block(d)})")
            e(f"m_{d} = o_{d} < {self.sizes[d]}")

    def load_token(self, e: _Emitter, program: Program, token="tok"):
        for (name, index), val in program.inputs.items():
            var = self.rule.var(name)
            dims = var.dims if index is None else var.dims[1:]
            base = f"p_in_{name} + ({token} * H + i_h) * {_numel(var.dims, self.sizes)}"
            if index is not None:
                base += f" + {index * int(_numel(dims, self.sizes))}"
            e(self._load(val.id, base, dims))

    def _load(self, target, base, dims):
        if not dims:
            return f"{target} = tl.load({base}).to(tl.float32)"
        return (f"{target} = tl.load({base} + {_inner_offsets(dims, self.sizes)}, "
                f"mask={mask_of(dims)}, other=0.0).to(tl.float32)")

    def _store(self, base, dims, value, cast=""):
        value = f"{value}{cast}"
        if not dims:
            return f"tl.store({base}, {value})"
        return f"tl.store({base} + {_inner_offsets(dims, self.sizes)}, {value}, mask={mask_of(dims)})"

    def load_params(self, e: _Emitter, program: Program):
        for name, val in program.params.items():
            var = self.rule.var(name)
            e(self._load(val.id, f"p_par_{name} + i_h * {_numel(var.dims, self.sizes)}", var.dims))

    def state_base(self, kind, name, extra=""):
        var = self.rule.var(name)
        return f"p_{kind}_{name} + {extra}i_nh * {_numel(var.dims, self.sizes)}"

    def ckpt_base(self, name, slot):
        var = self.rule.var(name)
        n = _numel(var.dims, self.sizes)
        return f"p_ckpt_{name} + (i_nh * NCKPT + {slot}) * {n}"

    def scratch_base(self, name, slot):
        var = self.rule.var(name)
        n = _numel(var.dims, self.sizes)
        return f"p_scratch_{name} + (i_nh * CKPT + {slot}) * {n}"

    def keep_padding_zero(self, name, value):
        dims = self.rule.var(name).dims
        return f"tl.where({mask_of(dims)}, {value}, 0.0)" if dims else value

    # ------------------------------------------------------------ forward kernel

    def forward_kernel(self):
        rule, prog = self.rule, self.forward
        args = ([f"p_in_{v.name}" for v in rule.inputs] + [f"p_par_{v.name}" for v in rule.params]
                + [f"p_h0_{s.name}" for s in rule.states] + [f"p_out_{o.name}" for o in rule.outputs]
                + [f"p_ht_{s.name}" for s in rule.states] + [f"p_ckpt_{s.name}" for s in rule.states]
                + ["cu_seqlens", "T", "H", "NCKPT"])
        e = _Emitter()
        e("@triton.jit")
        e(f"def {_ident(rule.name)}_recurrent_fwd({', '.join(args)}, USE_INITIAL: tl.constexpr, "
          "STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr, CKPT: tl.constexpr):")
        e.depth = 1
        self.prologue(e)
        self.load_params(e, prog)
        for s in rule.states:
            val = prog.states_in[s.name]
            e("if USE_INITIAL:")
            e("    " + self._load(val.id, self.state_base("h0", s.name), s.dims))
            e("else:")
            e("    " + (f"{val.id} = {zeros(s.dims)}" if s.dims else f"{val.id} = tl.zeros([], tl.float32)"))
        e("for t in range(0, eos - bos):")
        e.depth = 2
        e("tok = bos + t")
        e("if CKPT > 0:")
        e("    if t % CKPT == 0:")
        for s in rule.states:
            e("        " + self._store(self.ckpt_base(s.name, "t // CKPT"), s.dims, prog.states_in[s.name].id))
        self.load_token(e, prog)
        e.block(emit_ops(prog.ops, self.sizes))
        for o in rule.outputs:
            base = f"p_out_{o.name} + (tok * H + i_h) * {_numel(o.dims, self.sizes)}"
            e(self._store(base, o.dims, prog.outputs[o.name].id, f".to(p_out_{o.name}.dtype.element_ty)"))
        for s in rule.states:  # carry the states to the next token
            e(f"{prog.states_in[s.name].id} = {self.keep_padding_zero(s.name, prog.states_out[s.name].id)}")
        e.depth = 1
        e("if STORE_FINAL:")
        for s in rule.states:
            e("    " + self._store(self.state_base("ht", s.name), s.dims, prog.states_in[s.name].id))
        return args, e.lines

    # ------------------------------------------------------------ backward kernel

    def backward_kernel(self):
        rule, adj = self.rule, self.adjoint
        prog, fwd = adj.program, self.forward
        args = ([f"p_in_{v.name}" for v in rule.inputs] + [f"p_par_{v.name}" for v in rule.params]
                + [f"p_ckpt_{s.name}" for s in rule.states] + [f"p_scratch_{s.name}" for s in rule.states]
                + [f"p_do_{o.name}" for o in rule.outputs] + [f"p_dht_{s.name}" for s in rule.states]
                + [f"p_din_{v.name}" for v in rule.inputs] + [f"p_dpar_{v.name}" for v in rule.params]
                + [f"p_dh0_{s.name}" for s in rule.states] + ["cu_seqlens", "T", "H", "NCKPT", "NTOKENS"])
        e = _Emitter()
        e("@triton.jit")
        e(f"def {_ident(rule.name)}_recurrent_bwd({', '.join(args)}, USE_FINAL_GRAD: tl.constexpr, "
          "IS_VARLEN: tl.constexpr, CKPT: tl.constexpr):")
        e.depth = 1
        self.prologue(e)
        self.load_params(e, fwd)
        # gradient accumulators of params (summed over the sequence in the program)
        for name in prog.params:
            dims = rule.var(name).dims
            e(f"acc_{name} = {zeros(dims) if dims else 'tl.zeros([], tl.float32)'}")
        # the state gradient walked backwards: dS after the last token
        for s in rule.states:
            seed = adj.grad_states_out[s.name].id
            e("if USE_FINAL_GRAD:")
            e("    " + self._load(seed, self.state_base("dht", s.name), s.dims))
            if not self.spans(s.dims):
                e(f"    {seed} = {seed} * first_tile  # the other tiles carry no share of it")
            e("else:")
            e("    " + (f"{seed} = {zeros(s.dims)}" if s.dims else f"{seed} = tl.zeros([], tl.float32)"))
        e("length = eos - bos")
        e("n_seg = (length + CKPT - 1) // CKPT")
        e("for i_seg in range(0, n_seg):")
        e.depth = 2
        e("seg = n_seg - 1 - i_seg")
        e("start = seg * CKPT")
        e("stop = tl.minimum(start + CKPT, length)")
        # recompute the states entering each token of the segment into the scratch buffer
        for s in rule.states:
            e(self._load(fwd.states_in[s.name].id, self.ckpt_base(s.name, "seg"), s.dims))
        e("for t in range(start, stop):")
        e.depth = 3
        e("tok = bos + t")
        for s in rule.states:
            e(self._store(self.scratch_base(s.name, "t - start"), s.dims, fwd.states_in[s.name].id))
        self.load_token(e, fwd)
        e.block(emit_ops(_state_ops(fwd), self.sizes, prefix="r"))
        for s in rule.states:
            e(f"{fwd.states_in[s.name].id} = {self.keep_padding_zero(s.name, fwd.states_out[s.name].id)}")
        e.depth = 2
        e("tl.debug_barrier()")
        # walk the segment backwards
        e("for i_t in range(0, stop - start):")
        e.depth = 3
        e("t = stop - 1 - i_t")
        e("tok = bos + t")
        for s in rule.states:
            e(self._load(prog.states_in[s.name].id, self.scratch_base(s.name, "t - start"), s.dims))
        self.load_token(e, prog)
        for o in rule.outputs:
            base = f"p_do_{o.name} + (tok * H + i_h) * {_numel(o.dims, self.sizes)}"
            e(self._load(adj.grad_outputs[o.name].id, base, o.dims))
            if not self.spans(o.dims):
                e(f"{adj.grad_outputs[o.name].id} = {adj.grad_outputs[o.name].id} * first_tile")
        e.block(emit_ops(prog.ops, self.sizes, prefix="b"))
        # input gradients of this token; an input used whole and as slices k[j] gets the
        # whole part stored first and the slices added to it
        entries = sorted(prog.inputs.items(), key=lambda item: item[0][1] is not None)
        for (name, index), val in entries:
            grad = adj.grad_inputs.get((name, index))
            if grad is None:
                continue  # the gradient buffers start at zero
            var = rule.var(name)
            dims = var.dims if index is None else var.dims[1:]
            base = f"p_din_{name} + (tok * H + i_h) * {_numel(var.dims, self.sizes)}"
            if not self.spans(var.dims):  # a partial sum per tile: [tiles, B, T, H, ...]
                base += f" + i_tile * NTOKENS * H * {_numel(var.dims, self.sizes)}"
            if index is not None:
                base += f" + {index * int(_numel(dims, self.sizes))}"
            whole_too = index is not None and adj.grad_inputs.get((name, None)) is not None
            e(self._accumulate(base, dims, grad.id) if whole_too else self._store(base, dims, grad.id))
        for name in prog.params:
            grad = adj.grad_params.get(name)
            if grad is not None:
                e(f"acc_{name} += {grad.id}")
        # carry the state gradient to the previous token
        for s in rule.states:
            grad = adj.grad_states_in.get(s.name)
            seed = adj.grad_states_out[s.name].id
            value = self.keep_padding_zero(s.name, grad.id) if grad is not None else (
                zeros(s.dims) if s.dims else "tl.zeros([], tl.float32)")
            e(f"{seed} = {value}")
        e.depth = 2
        e("tl.debug_barrier()")
        e.depth = 1
        for s in rule.states:
            e(self._store(self._partial_base("dh0", s.name, s.dims), s.dims, adj.grad_states_out[s.name].id))
        for name in prog.params:
            var = rule.var(name)
            e(self._store(self._partial_base("dpar", name, var.dims), var.dims, f"acc_{name}"))
        return args, e.lines

    def _partial_base(self, kind, name, dims):
        """Per (sequence, head) results; those not spanning the split dim are partial sums,
        one slot per tile: [tiles, N * H, ...]."""
        n = _numel(dims, self.sizes)
        if self.spans(dims):
            return f"p_{kind}_{name} + i_nh * {n}"
        return f"p_{kind}_{name} + (i_tile * tl.num_programs(0) + i_nh) * {n}"

    def _accumulate(self, base, dims, value):
        if not dims:
            return f"tl.store({base}, tl.load({base}) + {value})"
        offs = _inner_offsets(dims, self.sizes)
        m = mask_of(dims)
        return f"tl.store({base} + {offs}, tl.load({base} + {offs}, mask={m}, other=0.0) + {value}, mask={m})"

    def generate(self) -> KernelSpec:
        fwd_args, fwd_lines = self.forward_kernel()
        bwd_args, bwd_lines = self.backward_kernel()
        adj = self.adjoint
        header = [
            f'"""Fused recurrent kernels for rule {self.rule.name}, generated by recdsl.',
            f"Dims: {', '.join(f'{d}={n}' for d, n in self.sizes.items())}.",
            '"""',
            "import triton",
            "import triton.language as tl",
            "",
        ]
        # compiled kernels read only globals that are constexpr instances (an annotated plain
        # int works under the interpreter but is refused by triton.compile)
        blocks = [f"{block(d)} = tl.constexpr({b})" for d, b in self.blocks.items()]
        source = "\n".join(header + blocks + [TOPK_HELPER, ""] + fwd_lines + ["", ""] + bwd_lines) + "\n"
        elements = sum(math.prod(self.blocks[d] for d in s.dims) for s in self.rule.states)
        forward_warps, backward_warps = launch_widths(elements)
        rule = self.rule
        return KernelSpec(
            rule_name=self.rule.name, source=source, dim_sizes=self.sizes, blocks=self.blocks,
            num_warps=forward_warps, backward_num_warps=backward_warps,
            split_dim=self.split, tiles=self.tiles,
            spans_split={v.name: self.spans(v.dims) for v in rule.inputs + rule.params + rule.states},
            forward_args=fwd_args, backward_args=bwd_args,
            grad_inputs={name: any(adj.grad_inputs.get(k) is not None for k in adj.program.inputs if k[0] == name)
                         for name in (v.name for v in self.rule.inputs)},
            grad_params={name: adj.grad_params.get(name) is not None for name in adj.program.params},
            grad_states={name: adj.grad_states_in.get(name) is not None for name in adj.program.states_in})


def _state_ops(program: Program):
    """The ops a state update needs (no outputs): for recomputing states in the backward."""
    needed = set(program.states_out.values())
    keep = []
    for op in reversed(program.ops):
        outs = op.outs if hasattr(op, "outs") else [op.out]
        if any(o in needed for o in outs):
            keep.append(op)
            for v in _operands(op):
                needed.add(v)
    return list(reversed(keep))


def _operands(op):
    if hasattr(op, "leaves"):
        return [leaf.val for leaf in op.leaves]
    if hasattr(op, "arg"):
        return [op.arg]
    if hasattr(op, "a"):
        return [op.a, op.b]
    return []


# State elements one program holds before the state is split across programs: measured with
# `recdsl compile --arch sm_90 --report`, a backward holding 128 x 32 fp32 states builds
# without spills, 128 x 64 spills.
SPLIT_ABOVE = 4096
SMALLEST_TILE = 16


def choose_split(rule: CheckedRule, forward: Program, blocks: dict):
    """``(dim, tile)`` to split the states along, or ``(None, None)`` when they fit one
    program or no dim can be split (the forward reduces over every dim of the states)."""
    def elements(tiles: dict):
        return sum(math.prod(tiles.get(d, blocks[d]) for d in s.dims) for s in rule.states)

    if elements({}) <= SPLIT_ABOVE:
        return None, None
    reduced = set()
    for op in forward.ops:
        if isinstance(op, Reduce):
            reduced |= {op.arg.shape[a] for a in range(len(op.arg.shape)) if a not in op.keep}
        elif isinstance(op, TopkMask):
            reduced |= set(op.arg.shape)
        elif isinstance(op, MatMul):
            reduced.add(op.a.shape[-1])
    shapes = [v.dims for v in rule.inputs + rule.params + rule.states + rule.outputs]
    candidates = [d for d in dict.fromkeys(d for s in rule.states for d in s.dims)
                  if d not in reduced and all(s.count(d) <= 1 for s in shapes)
                  and blocks[d] > SMALLEST_TILE]
    best = None
    for d in candidates:
        tile = blocks[d]
        while tile > SMALLEST_TILE and elements({d: tile}) > SPLIT_ABOVE:
            tile //= 2
        if best is None or elements({d: tile}) < elements({best[0]: best[1]}):
            best = (d, tile)
    return best if best else (None, None)


def launch_widths(state_elements: int) -> tuple:
    """num_warps of the forward and backward kernels for states of this many elements (block
    sizes, all states) held by one program. Measured with ``recdsl compile --arch sm_90
    --report`` on the canonical rules: the forward needs about 4 registers per state
    element, the backward (several state-sized temporaries live at once) about 16, and a
    program has 64K registers, at most 255 per thread. So about 32 elements per thread
    forward and 16 backward: 64x64 states get 4 and 8 warps."""
    def warps(per_warp, most):
        return max(1, min(most, 1 << max(0, round(math.log2(state_elements / per_warp)))))
    return warps(32 * 32, 16), warps(32 * 16, 32)


def generate(rule: CheckedRule, dim_sizes: dict) -> KernelSpec:
    return _RecurrentGenerator(rule, dim_sizes).generate()
