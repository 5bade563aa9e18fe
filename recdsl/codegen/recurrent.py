"""The fused recurrent kernels: one Triton program per (sequence, head), or per tile of the
states, walks the tokens one at a time with the states held on chip.

Forward: loads the token's inputs, runs the token's ssa program (``triton_ops``), stores the
outputs, and every ``CKPT`` tokens stores the states entering the token (a checkpoint).
Backward: walks the checkpoint segments last to first; inside a segment it recomputes the
states entering each token into a scratch buffer of ``CKPT`` states, then walks the segment
backwards running the token's adjoint program. Memory: O(T / CKPT) checkpoints plus CKPT
scratch states per program, never O(T) states.

The kernels are specialised to the dim sizes (loops over dims like NH are unrolled, blocks
are sized per dim). Large states are split across programs (``tiling``): the forward along a
dim it never reduces over, the backward along one or two dims, with the values the forward
reduces over a split dim stored per token (residuals). ``KernelSpec`` records everything a
launcher needs.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..ir.checked import CheckedRule
from ..ir.ssa import Program, Source, lower
from ..ir.vjp import adjoint
from . import tiling
from .triton_ops import TOPK_HELPER, block, emit_ops, mask_of, zeros


@dataclass
class KernelSpec:
    """The generated source and what a launcher needs to call its two kernels."""
    rule_name: str
    source: str
    dim_sizes: dict
    forward_tiles: dict  # dim -> tile size of the forward's split (empty: none)
    backward_tiles: dict  # the same for the backward
    forward_args: list = field(default_factory=list)  # pointer / scalar argument names, in order
    backward_args: list = field(default_factory=list)
    grad_inputs: dict = field(default_factory=dict)  # input name -> has a gradient
    grad_params: dict = field(default_factory=dict)
    grad_states: dict = field(default_factory=dict)
    num_warps: int = 4  # launch widths of the forward and backward kernels (``launch_widths``)
    backward_num_warps: int = 4
    forward_programs: int = 1  # programs per (sequence, head): the grids are (N * H, programs)
    backward_programs: int = 1
    # input/param/state name -> its gradient comes back whole (else one partial sum per program)
    gradient_whole: dict = field(default_factory=dict)
    scratch_numel: dict = field(default_factory=dict)  # state -> elements of one program's scratch state
    residuals: list = field(default_factory=list)  # (argument name, dims) stored by the forward

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
    # the kernel being generated: its tiling and how its block sizes are named (``use``);
    # the token-parallel generators that reuse the loads and stores never tile
    kernel_tiling = tiling.Tiling()
    block_of = staticmethod(block)
    sums_held = True  # param gradients summed in registers (``__init__`` decides for a rule)

    def __init__(self, rule: CheckedRule, dim_sizes: dict):
        self.rule = rule
        self.sizes = dict(dim_sizes)
        # block sizes: powers of two (Triton's aranges need them); no triton import here, so
        # that generating code never fixes Triton's interpreter setting for the process
        self.blocks = {d: 1 << (n - 1).bit_length() for d, n in self.sizes.items()}
        self.forward = lower(rule, self.sizes)
        self.adjoint = adjoint(self.forward)  # its first ops are the forward's own: same names
        self.forward_tiling = tiling.forward_tiling(rule, self.forward, self.sizes, self.blocks)
        self.backward_plan = tiling.backward_plan(rule, self.adjoint, self.sizes, self.blocks)
        # the param gradients' sums in registers, or (too large) in memory
        self.sums_held = self.holds_params(self.backward_plan.tiling, sums=False)

    # ------------------------------------------------------------ shared pieces

    def use(self, kernel: str, tiles: tiling.Tiling):
        """Generate ``kernel`` ("F" forward, "B" backward) under ``tiles``: each kernel has its
        own block-size constants (``FB_V``, ``BB_V``), since the two may tile V differently."""
        self.kernel_tiling = tiles
        self.block_of = lambda d: f"{kernel}B_{d}"

    def block_sizes(self, tiles: tiling.Tiling) -> dict:
        return {d: tiles.tiles.get(d, b) for d, b in self.blocks.items()}

    def state_elements(self, tiles: tiling.Tiling) -> int:
        """Entries of the state blocks one program holds."""
        sizes = self.block_sizes(tiles)
        return sum(math.prod(sizes[d] for d in s.dims) for s in self.rule.states)

    def param_elements(self) -> int:
        """Entries of the params (loaded whole by every program): an LSTM's R[D, D]s are 128
        times its states."""
        return sum(math.prod(self.blocks[d] for d in p.dims) for p in self.rule.params)

    def holds_params(self, tiles: tiling.Tiling, sums: bool) -> bool:
        """Whether a program can keep the params (and with ``sums`` their gradients' sums) in
        registers for its whole walk beside its states; if not, they are loaded at every
        token (from cache) and the sums kept in memory."""
        held = self.state_elements(tiles) + self.param_elements() * (2 if sums else 1)
        return held <= HELD_ELEMENTS

    def launch_width(self, tiles: tiling.Tiling, backward: bool) -> int:
        """num_warps of a kernel: from the elements a program holds for its walk; a kernel
        that streams its params gets STREAMING_WARPS (few threads, many registers each: the
        [D, D] products it forms one at a time need them)."""
        sums = backward and self.sums_held
        if not self.holds_params(tiles, sums=sums):
            return STREAMING_WARPS
        held = self.state_elements(tiles) + self.param_elements() * (2 if sums else 1)
        return launch_widths(held)[1 if backward else 0]

    def prologue(self, e: _Emitter):
        """Program ids, sequence bounds, lanes and masks of every dim: a tiled dim's lanes
        start at its tile, and ``first_tile_<dim>`` is 1.0 in the first tile along it."""
        e("i_nh = tl.program_id(0)")
        e("i_tile = tl.program_id(1)  # which tile of the split states (0 when nothing is split)")
        e("i_n = i_nh // H")
        e("i_h = i_nh % H")
        e("if IS_VARLEN:")
        e("    bos = tl.load(cu_seqlens + i_n).to(tl.int64)")
        e("    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)")
        e("else:")
        e("    bos = tl.cast(i_n, tl.int64) * T")
        e("    eos = bos + T")
        stride = 1
        strides = {}
        for d in reversed(list(self.kernel_tiling.tiles)):
            strides[d] = stride
            stride *= self.kernel_tiling.counts[d]
        for d in self.rule.dims:
            b = self.block_of(d)
            if d in self.kernel_tiling.tiles:
                e(f"t_{d} = (i_tile // {strides[d]}) % {self.kernel_tiling.counts[d]}")
                e(f"{tiling.first_tile(d)} = tl.where(t_{d} == 0, 1.0, 0.0)")
                e(f"o_{d} = t_{d} * {b} + tl.arange(0, {b})")
            else:
                e(f"o_{d} = tl.arange(0, {b})")
            e(f"m_{d} = o_{d} < {self.sizes[d]}")

    def zeros(self, dims):
        return zeros(dims, self.block_of)

    def emit(self, ops, prefix=""):
        return emit_ops(ops, self.sizes, prefix=prefix, block_of=self.block_of)

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

    def param_loads(self, program: Program) -> list:
        """``(value name, its load line)`` per param of ``program``."""
        out = []
        for name, val in program.params.items():
            var = self.rule.var(name)
            out.append((val.id, self._load(val.id, f"p_par_{name} + i_h * {_numel(var.dims, self.sizes)}",
                                           var.dims)))
        return out

    def load_params(self, e: _Emitter, program: Program):
        for _, line in self.param_loads(program):
            e(line)

    def with_param_loads(self, lines: list, program: Program) -> list:
        """``lines`` with each param loaded again just before every line that uses it: a
        streamed param (an LSTM's R[D, D]) is live only while one product with it is formed,
        not beside the others nor from the forward's recomputation to the backward's use."""
        loads = self.param_loads(program)
        out = []
        for line in lines:
            out += [load for name, load in loads if re.search(rf"\b{name}\b", line)]
            out.append(line)
        return out

    def state_base(self, kind, name, extra=""):
        var = self.rule.var(name)
        return f"p_{kind}_{name} + {extra}i_nh * {_numel(var.dims, self.sizes)}"

    def ckpt_base(self, name, slot):
        var = self.rule.var(name)
        n = _numel(var.dims, self.sizes)
        return f"p_ckpt_{name} + (i_nh * NCKPT + {slot}) * {n}"

    def token_base(self, kind, name, dims):
        return f"p_{kind}_{name} + (tok * H + i_h) * {_numel(dims, self.sizes)}"

    def keep_padding_zero(self, name, value):
        dims = self.rule.var(name).dims
        return f"tl.where({mask_of(dims)}, {value}, 0.0)" if dims else value

    # ------------------------------------------------------------ forward kernel

    def forward_kernel(self):
        rule, prog = self.rule, self.forward
        self.use("F", self.forward_tiling)
        residuals = self.backward_plan.residuals
        args = ([f"p_in_{v.name}" for v in rule.inputs] + [f"p_par_{v.name}" for v in rule.params]
                + [f"p_h0_{s.name}" for s in rule.states] + [f"p_out_{o.name}" for o in rule.outputs]
                + [f"p_ht_{s.name}" for s in rule.states] + [f"p_ckpt_{s.name}" for s in rule.states]
                + [f"p_res_{r.id}" for r in residuals] + ["cu_seqlens", "T", "H", "NCKPT"])
        e = _Emitter()
        e("@triton.jit")
        e(f"def {_ident(rule.name)}_recurrent_fwd({', '.join(args)}, USE_INITIAL: tl.constexpr, "
          "STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr, CKPT: tl.constexpr):")
        e.depth = 1
        self.prologue(e)
        hold = self.holds_params(self.forward_tiling, sums=False)
        if hold:
            self.load_params(e, prog)
        for s in rule.states:
            val = prog.states_in[s.name]
            e("if USE_INITIAL:")
            e("    " + self._load(val.id, self.state_base("h0", s.name), s.dims))
            e("else:")
            e(f"    {val.id} = {self.zeros(s.dims)}")
        e("for t in range(0, eos - bos):")
        e.depth = 2
        e("tok = bos + t")
        e("if CKPT > 0:")
        e("    if t % CKPT == 0:")
        for s in rule.states:
            e("        " + self._store(self.ckpt_base(s.name, "t // CKPT"), s.dims, prog.states_in[s.name].id))
        self.load_token(e, prog)
        e.block(self.emit(prog.ops) if hold else self.with_param_loads(self.emit(prog.ops), prog))
        for o in rule.outputs:
            e(self._store(self.token_base("out", o.name, o.dims), o.dims, prog.outputs[o.name].id,
                          f".to(p_out_{o.name}.dtype.element_ty)"))
        if residuals:  # only when a backward will follow; a value not spanning the split is stored once
            e("if CKPT > 0:")
            for r in residuals:
                store = self._store(self.token_base("res", r.id, r.shape), r.shape, r.id)
                if self.kernel_tiling.covers(r.shape):
                    e(f"    {store}")
                else:
                    e("    if i_tile == 0:")
                    e(f"        {store}")
        for s in rule.states:  # carry the states to the next token
            e(f"{prog.states_in[s.name].id} = {self.keep_padding_zero(s.name, prog.states_out[s.name].id)}")
        e.depth = 1
        e("if STORE_FINAL:")
        for s in rule.states:
            e("    " + self._store(self.state_base("ht", s.name), s.dims, prog.states_in[s.name].id))
        return args, e.lines

    # ------------------------------------------------------------ backward kernel

    def backward_kernel(self):
        rule, adj, plan = self.rule, self.adjoint, self.backward_plan
        self.use("B", plan.tiling)
        prog = tiling.used_program(adj.program, plan.ops)
        recompute = tiling.used_program(self.forward, plan.recompute)
        fwd = self.forward
        args = ([f"p_in_{v.name}" for v in rule.inputs] + [f"p_par_{v.name}" for v in rule.params]
                + [f"p_ckpt_{s.name}" for s in rule.states] + [f"p_scratch_{s.name}" for s in rule.states]
                + [f"p_res_{r.id}" for r in plan.residuals]
                + [f"p_do_{o.name}" for o in rule.outputs] + [f"p_dht_{s.name}" for s in rule.states]
                + [f"p_din_{v.name}" for v in rule.inputs] + [f"p_dpar_{v.name}" for v in rule.params]
                + [f"p_dh0_{s.name}" for s in rule.states] + ["cu_seqlens", "T", "H", "NCKPT", "NTOKENS"])
        e = _Emitter()
        e("@triton.jit")
        e(f"def {_ident(rule.name)}_recurrent_bwd({', '.join(args)}, USE_FINAL_GRAD: tl.constexpr, "
          "IS_VARLEN: tl.constexpr, CKPT: tl.constexpr):")
        e.depth = 1
        self.prologue(e)
        reload = not self.holds_params(plan.tiling, sums=self.sums_held)
        if not reload:
            self.load_params(e, fwd)
        # gradient accumulators of params (summed over the sequence in the program)
        self.init_param_gradients(e)
        # the state gradient walked backwards: dS after the last token
        for s in rule.states:
            seed = adj.grad_states_out[s.name].id
            e("if USE_FINAL_GRAD:")
            e("    " + self._load(seed, self.state_base("dht", s.name), s.dims))
            if plan.carried[s.name]:
                e(f"    {seed} = {self.first_tiles(plan.carried[s.name], seed)}  # a share: the first tile's")
            e("else:")
            e(f"    {seed} = {self.zeros(s.dims)}")
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
            e(self.scratch(s, "t - start", fwd.states_in[s.name].id))
        self.load_token(e, recompute)
        self.load_residuals(e, plan.recompute)
        lines = self.emit(plan.recompute, prefix="r")
        e.block(self.with_param_loads(lines, fwd) if reload else lines)
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
            if s.name in prog.states_in:
                e(self.scratch(s, "t - start", prog.states_in[s.name].id, load=True))
        self.load_token(e, prog)
        self.load_residuals(e, plan.ops)
        for op in plan.ops:
            if isinstance(op, Source) and op.kind == "grad_output":
                dims = rule.var(op.name).dims
                e(self._load(op.out.id, self.token_base("do", op.name, dims), dims))
        lines = self.emit(plan.ops, prefix="b")
        if not self.sums_held:
            lines = self.with_param_sums(lines)
        e.block(self.with_param_loads(lines, fwd) if reload else lines)
        self.store_input_gradients(e, prog)
        self.accumulate_param_gradients(e)
        # carry the state gradient to the previous token, a share where it is one
        for s in rule.states:
            grad = adj.grad_states_in.get(s.name)
            seed = adj.grad_states_out[s.name].id
            if grad is None:
                e(f"{seed} = {self.zeros(s.dims)}")
                continue
            missing = plan.carried[s.name] - plan.partial.get(grad, frozenset())
            e(f"{seed} = {self.keep_padding_zero(s.name, self.first_tiles(missing, grad.id))}")
        e.depth = 2
        e("tl.debug_barrier()")
        e.depth = 1
        for s in rule.states:
            seed = adj.grad_states_out[s.name].id
            missing = set(plan.tiling.tiles) - set(s.dims) - plan.carried[s.name]
            e(self._store(self._partial_base("dh0", s.name, s.dims), s.dims, self.first_tiles(missing, seed)))
        self.store_param_gradients(e)
        return args, e.lines

    def first_tiles(self, dims, value) -> str:
        """``value`` kept in the first tile along each of ``dims`` only."""
        for d in sorted(dims):
            value = f"{value} * {tiling.first_tile(d)}"
        return value

    def whole_or_share(self, grad, dims) -> str:
        """A gradient of a value of ``dims`` as this program's share of the sum the launcher
        forms: a replicated one is counted by the first tile along each split dim only."""
        across = set(self.kernel_tiling.tiles) - set(dims)
        if not across:
            return grad.id
        return self.first_tiles(across - self.backward_plan.partial.get(grad, frozenset()), grad.id)

    def init_param_gradients(self, e: _Emitter):
        """Accumulators of the param gradients, summed over the tokens a program walks (in
        registers, or where they do not fit, in the program's own zeroed partial-sum slot)."""
        if not self.sums_held:
            return
        for name in self.adjoint.program.params:  # every one is stored, zero if no gradient
            e(f"acc_{name} = {self.zeros(self.rule.var(name).dims)}")

    def param_gradient_lines(self) -> list:
        """``(gradient value name, the line adding this token's share to its sum)`` per param
        with a gradient."""
        out = []
        for name, grad in self.adjoint.grad_params.items():
            if grad is None:
                continue
            dims = self.rule.var(name).dims
            share = self.whole_or_share(grad, dims)
            line = (f"acc_{name} += {share}" if self.sums_held
                    else self._accumulate(self._partial_base("dpar", name, dims), dims, share))
            out.append((grad.id, line))
        return out

    def accumulate_param_gradients(self, e: _Emitter):
        if self.sums_held:  # else each is summed as soon as it is formed (with_param_sums)
            for _, line in self.param_gradient_lines():
                e(line)

    def with_param_sums(self, lines: list) -> list:
        """``lines`` with each param gradient's share added to its sum in memory right after
        the line that forms it: one ``[D, D]`` share live at a time, not one per param."""
        pending = dict(self.param_gradient_lines())
        out = []
        for line in lines:
            out.append(line)
            target = line.split(" = ", 1)[0].strip()
            if target in pending:
                out.append(pending.pop(target))
        assert not pending, f"param gradients never formed: {sorted(pending)}"
        return out

    def store_param_gradients(self, e: _Emitter):
        if not self.sums_held:
            return  # summed in place
        for name in self.adjoint.program.params:
            var = self.rule.var(name)
            e(self._store(self._partial_base("dpar", name, var.dims), var.dims, f"acc_{name}"))

    def store_input_gradients(self, e: _Emitter, prog: Program):
        """Input gradients of this token; an input used whole and as slices k[j] gets the
        whole part stored first and the slices added to it."""
        adj = self.adjoint
        entries = sorted(prog.inputs.items(), key=lambda item: item[0][1] is not None)
        for (name, index), _ in entries:
            grad = adj.grad_inputs.get((name, index))
            if grad is None:
                continue  # the gradient buffers start at zero
            var = self.rule.var(name)
            dims = var.dims if index is None else var.dims[1:]
            base = self.token_base("din", name, var.dims)
            if not self.kernel_tiling.covers(var.dims):  # one partial sum per program: [programs, B, T, H, ...]
                base += f" + i_tile * NTOKENS * H * {_numel(var.dims, self.sizes)}"
            if index is not None:
                base += f" + {index * int(_numel(dims, self.sizes))}"
            value = self.whole_or_share(grad, var.dims)
            whole_too = index is not None and adj.grad_inputs.get((name, None)) is not None
            e(self._accumulate(base, dims, value) if whole_too else self._store(base, dims, value))

    def load_residuals(self, e: _Emitter, ops):
        for op in ops:
            if isinstance(op, Source) and op.kind == "residual":
                e(self._load(op.out.id, self.token_base("res", op.out.id, op.out.shape), op.out.shape))

    def scratch(self, state, slot, value, load=False) -> str:
        """Store (or load) this program's tile of ``state`` in its scratch slot: a block of
        its own (padding lanes included, so no masks), one per program."""
        dims = state.dims
        n = math.prod(self.block_sizes(self.kernel_tiling)[d] for d in dims)  # elements of one tile
        base = f"p_scratch_{state.name} + ((i_nh * {self.kernel_tiling.programs} + i_tile) * CKPT + {slot}) * {n}"
        if len(dims) == 0:
            offs = "0"
        elif len(dims) == 1:
            offs = f"tl.arange(0, {self.block_of(dims[0])})"
        else:
            a, b = (self.block_of(d) for d in dims)
            offs = f"tl.arange(0, {a})[:, None] * {b} + tl.arange(0, {b})[None, :]"
        if load:
            return f"{value} = tl.load({base} + {offs})"
        return f"tl.store({base} + {offs}, {value})"

    def _partial_base(self, kind, name, dims):
        """Per (sequence, head) results; those the backward's tiles do not each own a slice of
        are one partial sum per program: [programs, N * H, ...]."""
        n = _numel(dims, self.sizes)
        if self.kernel_tiling.covers(dims):
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
        adj, rule, plan = self.adjoint, self.rule, self.backward_plan
        header = [
            f'"""Fused recurrent kernels for rule {rule.name}, generated by recdsl.',
            f"Dims: {', '.join(f'{d}={n}' for d, n in self.sizes.items())}.",
            '"""',
            "import triton",
            "import triton.language as tl",
            "",
        ]
        # compiled kernels read only globals that are constexpr instances (an annotated plain
        # int works under the interpreter but is refused by triton.compile)
        blocks = []
        for kernel, tiles in (("F", self.forward_tiling), ("B", plan.tiling)):
            blocks += [f"{kernel}B_{d} = tl.constexpr({b})" for d, b in self.block_sizes(tiles).items()]
        source = "\n".join(header + blocks + [TOPK_HELPER, ""] + fwd_lines + ["", ""] + bwd_lines) + "\n"


        return KernelSpec(
            rule_name=rule.name, source=source, dim_sizes=self.sizes,
            forward_tiles=dict(self.forward_tiling.tiles), backward_tiles=dict(plan.tiling.tiles),
            num_warps=self.launch_width(self.forward_tiling, backward=False),
            backward_num_warps=self.launch_width(plan.tiling, backward=True),
            forward_programs=self.forward_tiling.programs, backward_programs=plan.tiling.programs,
            gradient_whole={v.name: plan.tiling.covers(v.dims) for v in rule.inputs + rule.params + rule.states},
            scratch_numel={s.name: math.prod(self.block_sizes(plan.tiling)[d] for d in s.dims) for s in rule.states},
            residuals=[(f"p_res_{r.id}", r.shape) for r in plan.residuals],
            forward_args=fwd_args, backward_args=bwd_args,
            grad_inputs={name: any(adj.grad_inputs.get(k) is not None for k in adj.program.inputs if k[0] == name)
                         for name in (v.name for v in rule.inputs)},
            grad_params={name: adj.grad_params.get(name) is not None for name in adj.program.params},
            grad_states={name: adj.grad_states_in.get(name) is not None for name in adj.program.states_in})


# Elements a program may hold in registers: launch_widths' widest launches (16 warps of 32
# elements a thread forward, 32 warps of 16 backward).
HELD_ELEMENTS = 16 * 32 * 32
# num_warps of kernels that stream their params. Measured (recdsl compile --report, an LSTM
# with four R[D, D]): at 8 warps 0 spills at D = 64 and 128 on sm_80 and sm_90 (127-248
# registers); at 32 warps the backward spilled 0.5-0.7 KB.
STREAMING_WARPS = 8


def launch_widths(state_elements: int) -> tuple:
    """num_warps of the forward and backward kernels for this many elements (block sizes of
    all states, and params) held by one program. Measured with ``recdsl compile --arch sm_90
    --report`` on the canonical rules: the forward needs about 4 registers per state
    element, the backward (several state-sized temporaries live at once) about 16, and a
    program has 64K registers, at most 255 per thread. So about 32 elements per thread
    forward and 16 backward: 64x64 states get 4 and 8 warps."""
    def warps(per_warp, most):
        return max(1, min(most, 1 << max(0, round(math.log2(state_elements / per_warp)))))
    return warps(32 * 32, 16), warps(32 * 16, 32)


def generate(rule: CheckedRule, dim_sizes: dict) -> KernelSpec:
    return _RecurrentGenerator(rule, dim_sizes).generate()
