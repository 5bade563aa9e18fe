"""backend="chunk" for the diagonal family: the chunkwise Triton kernels of
``recdsl.codegen.chunk_diagonal`` behind a torch.autograd.Function per pass.

A pass is one state read along one axis with one write per token (see the codegen module).
A rule becomes passes from its analysis (``recdsl.ir.affine``):

* each state's factors, over all its update statements, give per-token log-decays: a scalar
  part (``decay * S``), a row part (``diag(x) @ S``) and a column part (``S @ diag(x)``); the
  scalar part goes on the read's contracted axis, so it never needs the per-channel mode;
* each write ``coef * outer(a, b)`` is a pass of its own (the recurrence is linear, so a
  state with several writes is the sum of one state per write, the initial state going to
  the first); factors of later statements in the same token scale its vectors;
* each output term ``coef * (x @ S)`` (or ``S @ x``) reads with ``coef * x``; the output's
  per-token ``extra`` (Mamba-2's ``D * x``) is added by the kernel of its first pass;
* a let that is a function of reads (Raven's ``p = softmax(Sk @ q)``) is evaluated per token
  once its reads are done, and later reads use it as their vector: passes run in source order.

The per-token quantities (read vectors, write vectors, log-decays, extras, chained lets) are
evaluated by generated token-parallel kernels (``codegen.chunk_diagonal.generate_prologue``:
the rule's own expressions and their adjoints), one per stage, each behind a
torch.autograd.Function; autograd joins stages and passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import triton

from ..codegen import chunk_diagonal as codegen
from ..codegen import precision as dot_precision
from ..codegen.chunk_diagonal import CHANNEL, PassShape
from ..errors import BackendError
from .cache import cache_key, load_generated, load_module
from .recurrent import check_device

# Tokens per chunk; tests lower it to exercise chunk boundaries at small T.
CHUNK_SIZE = 64
# Tile caps (BX, BV) of the passes: None takes PassShape's (sized for GPU registers) on CUDA
# and whole axes under the interpreter, where fewer, larger programs run faster.
TILE_CAPS = None


def kernels():
    """The generated kernel module (one for every rule: the kernels take their shapes as
    constexprs)."""
    key = cache_key("chunk-diagonal", codegen.VERSION, codegen.SOURCE)
    return load_module(key, "chunk_diagonal", lambda: codegen.SOURCE)


# ====================================================================== one pass


@dataclass
class PassLaunch:
    """What a pass's kernels need besides its tensors."""
    shape: PassShape
    batch: int
    time: int
    heads: int
    num_sequences: int
    cu: Optional[torch.Tensor]  # int64 sequence boundaries, or None
    chunk_offsets: torch.Tensor  # int64 [N + 1]: each sequence's first slot of chunk states
    chunk_bounds: torch.Tensor  # int64 [chunks, 3]: first token, its sequence's end, state slot
    state_dims: tuple  # the rule's layout of the state: (DX, DY) or (DY, DX) when transposed
    precision: dot_precision.Precision  # the dots' formats: the call's policy for its dtype

    @staticmethod
    def make(shape: PassShape, call) -> "PassLaunch":
        device = call.device
        chunk = shape.chunk
        bounds = call.cu_seqlens if call.packed else [b * call.time for b in range(call.batch + 1)]
        # chunk states: one slot per chunk plus one for the state leaving the last chunk
        slots, rows = [0], []
        for s, e in zip(bounds[:-1], bounds[1:]):
            rows += [[t, e, slots[-1] + i] for i, t in enumerate(range(s, e, chunk))]
            slots.append(slots[-1] + -(-(e - s) // chunk) + 1)
        cu = torch.tensor(bounds, dtype=torch.int64, device=device) if call.packed else None
        offsets = torch.tensor(slots, dtype=torch.int64, device=device)
        chunk_bounds = torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 3)
        dims = (shape.dy, shape.dx) if shape.transposed else (shape.dx, shape.dy)
        return PassLaunch(shape, call.batch, call.time, call.heads, call.num_sequences, cu,
                          offsets, chunk_bounds, dims,
                          dot_precision.for_call(call, interpreted=device.type == "cpu"))

    @property
    def total_chunks(self) -> int:
        return self.chunk_bounds.shape[0]

    @property
    def total_slots(self) -> int:
        return int(self.chunk_offsets[-1].item())

    def sequences(self, device):
        """cu_seqlens (or a dummy), chunk offsets, T, H: the sequential kernels' arguments."""
        dummy = torch.empty(1, dtype=torch.int64, device=device)
        return (self.cu if self.cu is not None else dummy, self.chunk_offsets, self.time, self.heads)


def _decay_grid(launch: PassLaunch, D: int):
    return (launch.num_sequences * launch.heads, triton.cdiv(D, codegen.column_block(D)))


def _decays(module, launch: PassLaunch, g: torch.Tensor) -> torch.Tensor:
    """The five planes of a log-decay [B, T, H] or [B, T, H, D] the kernels read (g and its
    sums over spans: see chunk_decays), fp32 [5, B, T, H(, D)]."""
    D = g.shape[3] if g.dim() == 4 else 1
    out = torch.empty((5,) + tuple(g.shape), dtype=torch.float32, device=g.device)
    cu, _, T, H = launch.sequences(g.device)
    module.chunk_decays[_decay_grid(launch, D)](
        g, out, cu, T, H, launch.batch * T * H, D=D, BD=codegen.column_block(D),
        BT=launch.shape.chunk, BC=launch.shape.bc, IS_VARLEN=launch.cu is not None)
    return out


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The sum of per-tile partial results (the leading axis)."""
    return t.sum(0) if t.shape[0] > 1 else t[0]


class _PassFunction(torch.autograd.Function):
    """(u, kx, vy, gx, gy, extra, h0) -> (o, S_T) for one pass; see the codegen module."""

    @staticmethod
    def forward(ctx, launch: PassLaunch, u, kx, vy, gx, gy, extra, h0):
        module = kernels()
        shape, device = launch.shape, u.device
        u, kx, vy = u.contiguous(), kx.contiguous(), vy.contiguous()
        f32 = dict(dtype=torch.float32, device=device)
        gxc = _decays(module, launch, gx.contiguous()) if gx is not None else None
        gyc = _decays(module, launch, gy.contiguous()) if gy is not None else None
        needs_grad = any(ctx.needs_input_grad[1:])
        N, H = launch.num_sequences, launch.heads
        B, T, NX, NY = launch.batch, launch.time, shape.x_tiles, shape.y_tiles
        out = torch.empty([NX, B, T, H, shape.dy], **f32)  # partial sums over X tiles
        ht = torch.empty([N, H, *launch.state_dims], **f32)
        ckpt = (torch.empty([launch.total_slots, H, shape.dx, shape.dy], **f32) if needs_grad
                else torch.empty(1, **f32))
        dummy = torch.empty(1, **f32)
        extra_c = extra.contiguous() if extra is not None else None
        h0_c = h0.contiguous() if h0 is not None else None
        module.chunk_fwd[(N * H, NX * NY)](
            u, kx, vy, gxc if gxc is not None else dummy, gyc if gyc is not None else dummy,
            extra_c if extra_c is not None else dummy, h0_c if h0_c is not None else dummy,
            out, ht, ckpt, *launch.sequences(device), B * T * H,
            **shape.constexprs(USE_INITIAL=h0 is not None, HAS_EXTRA=extra is not None,
                               STORE_CKPT=needs_grad, IS_VARLEN=launch.cu is not None,
                               **codegen.precision_flags("chunk_fwd", launch.precision)),
            num_warps=shape.num_warps)
        ctx.launch = launch
        ctx.meta = [(t.dtype, t.shape) if t is not None else None
                    for t in (u, kx, vy, gx, gy, extra, h0)]
        ctx.save_for_backward(u, kx, vy, gxc, gyc, ckpt)
        return _whole(out), ht

    @staticmethod
    def backward(ctx, d_out, d_ht):
        module = kernels()
        launch = ctx.launch
        shape = launch.shape
        u, kx, vy, gxc, gyc, ckpt = ctx.saved_tensors
        device = u.device
        f32 = dict(dtype=torch.float32, device=device)
        dummy = torch.empty(1, **f32)
        N, H, NX, NY = launch.num_sequences, launch.heads, shape.x_tiles, shape.y_tiles
        B, T = launch.batch, launch.time
        d_out = d_out.contiguous() if d_out is not None else torch.zeros([B, T, H, shape.dy], **f32)
        use_final = d_ht is not None
        gx_dims = [shape.dx] if shape.gx == CHANNEL else []
        gx_tiles = NY if shape.gx == CHANNEL else NX * NY
        # 1. the state gradient walked backwards: dS leaving every chunk
        dckpt = torch.empty([launch.total_slots, H, shape.dx, shape.dy], **f32)
        dh0 = torch.empty([N, H, *launch.state_dims], **f32)
        module.chunk_bwd_dh[(N * H, NX * NY)](
            u, gxc if gxc is not None else dummy, gyc if gyc is not None else dummy, d_out,
            d_ht.contiguous() if use_final else dummy, dckpt, dh0, *launch.sequences(device),
            B * T * H,
            **{k: v for k, v in shape.constexprs().items() if k != "EXACT"},
            USE_FINAL_GRAD=use_final, IS_VARLEN=launch.cu is not None,
            **codegen.precision_flags("chunk_bwd_dh", launch.precision), num_warps=shape.num_warps)
        # 2. every chunk's gradients at once (X side, Y side)
        dux = torch.empty([2, NY, B, T, H, shape.dx], **f32)  # du, dkx
        dvy = torch.empty([NX, B, T, H, shape.dy], **f32)
        dgx = (torch.empty([2, gx_tiles, B, T, H] + gx_dims, **f32) if gxc is not None
               else torch.empty(2, 1, **f32))
        dgy = (torch.empty([2, NX, B, T, H, shape.dy], **f32) if gyc is not None
               else torch.empty(2, 1, **f32))
        grid = (launch.total_chunks, NX * NY, H)
        tensors = (u, kx, vy, gxc if gxc is not None else dummy, gyc if gyc is not None else dummy,
                   ckpt, dckpt, d_out)
        flags = {k: v for k, v in shape.constexprs(
            **codegen.precision_flags("chunk_bwd_x", launch.precision)).items() if k != "TRANSPOSED"}
        for side in (0, 1):
            module.chunk_bwd_x[grid](*tensors, dux[side], dgx[side], launch.chunk_bounds, H,
                                     B * T * H, **flags, SIDE=side, num_warps=shape.num_warps)
        for side in (0, 1) if gyc is not None else (0,):
            module.chunk_bwd_y[grid](*tensors, dvy, dgy[side], launch.chunk_bounds, H, B * T * H,
                                     **flags, SIDE=side, num_warps=shape.num_warps)
        du, dkx = dux[0], dux[1]
        dgx = dgx.flatten(0, 1) if gxc is not None else None  # both sides' partial sums
        dgy = dgy.flatten(0, 1) if gyc is not None else None
        grads = [_whole(du), _whole(dkx), _whole(dvy), _whole(dgx) if dgx is not None else None,
                 _whole(dgy) if dgy is not None else None, d_out, dh0]
        result = []
        for g, meta, need in zip(grads, ctx.meta, ctx.needs_input_grad[1:]):
            result.append(g.to(meta[0]).reshape(meta[1]) if need and meta is not None else None)
        return (None, *result)


def run_pass(launch: PassLaunch, u, kx, vy, gx=None, gy=None, extra=None, h0=None):
    """One pass: ``(o [B, T, H, DY] fp32, S_T [N, H, *state] fp32)``, differentiable."""
    return _PassFunction.apply(launch, u, kx, vy, gx, gy, extra, h0)


# ====================================================================== the prologue

TOKENS_PER_PROGRAM = 16  # prologue: tokens per program
INTERPRETER_BLOCK = 256  # tile caps under the interpreter (whole axes, up to this)


def _plan(rule) -> codegen.DiagonalPlan:
    cached = rule.__dict__.get("_chunk_diagonal_plan")
    if cached is None:
        cached = rule.__dict__["_chunk_diagonal_plan"] = codegen.plan(rule)
    return cached


def _prologue(rule, the_plan, dim_sizes: dict):
    """The generated stage kernels of a rule at these sizes (cached on disk)."""
    sizes = {d: dim_sizes[d] for d in rule.ir.dims}
    key = cache_key(rule.ir.canonical(), "chunk-diagonal-prologue", codegen.VERSION,
                    repr(sorted(sizes.items())))
    return load_generated(key, f"{rule.name}_chunk_diagonal_prologue",
                          lambda: codegen.generate_prologue(rule, sizes, the_plan))


@dataclass
class _StageLaunch:
    module: object
    info: dict  # names of the kernels, inputs, quantities and their dims
    call: object
    n_inputs: int  # token inputs, the read values included
    n_params: int


class _StageFunction(torch.autograd.Function):
    """(token inputs, params, read values) -> the stage's quantities [B, T, H, *dims]."""

    @staticmethod
    def forward(ctx, launch: _StageLaunch, *flat):
        call = launch.call
        flat = [t.contiguous() for t in flat]
        B, T, H = call.batch, call.time, call.heads
        sizes = call.dim_sizes
        quantities = [torch.empty([B, T, H] + [sizes[d] for d in dims], dtype=torch.float32,
                                  device=call.device) for dims in launch.info["values"].values()]
        ntok = B * T
        getattr(launch.module, launch.info["forward"])[(triton.cdiv(ntok, TOKENS_PER_PROGRAM), H)](
            *flat, *quantities, ntok, H, TOKB=TOKENS_PER_PROGRAM)
        ctx.launch = launch
        ctx.save_for_backward(*flat)
        return tuple(quantities)

    @staticmethod
    def backward(ctx, *grads):
        launch = ctx.launch
        call = launch.call
        flat = ctx.saved_tensors
        inputs, params = flat[:launch.n_inputs], flat[launch.n_inputs:]
        f32 = dict(dtype=torch.float32, device=call.device)
        B, T, H = call.batch, call.time, call.heads
        sizes = call.dim_sizes
        d_q = [g.contiguous() if g is not None else
               torch.zeros([B, T, H] + [sizes[d] for d in dims], **f32)
               for g, dims in zip(grads, launch.info["values"].values())]
        ntok = B * T
        blocks = triton.cdiv(ntok, TOKENS_PER_PROGRAM)
        reaches = [launch.info["grad_inputs"][n] for n in launch.info["inputs"]]
        dummy = torch.empty(1, **f32)  # an input this stage's values do not depend on
        d_in = [torch.zeros(t.shape, **f32) if r else dummy for t, r in zip(inputs, reaches)]
        d_par = [torch.empty([blocks, H, *p.shape[1:]], **f32) for p in params]
        getattr(launch.module, launch.info["backward"])[(blocks, H)](
            *inputs, *params, *d_q, *d_in, *d_par, ntok, H, TOKB=TOKENS_PER_PROGRAM)
        grads_in = [g.to(t.dtype) if r else None for g, t, r in zip(d_in, inputs, reaches)]
        grads_par = [g.sum(0).to(p.dtype) for g, p in zip(d_par, params)]
        return (None, *grads_in, *grads_par)


# ====================================================================== the backend


def problem(rule) -> Optional[str]:
    """Why backend "chunk" cannot run ``rule`` (a ``Rule``), or None."""
    if rule.family != "diagonal":
        return f"rule '{rule.name}' is in the {rule.family} family, not diagonal"
    try:
        _plan(rule)
    except codegen.Unsupported as e:
        return str(e)
    return None


def run(rule, call, chunk_size: Optional[int] = None):
    """Outputs and final states of ``rule`` on a bound call, ``chunk_size`` tokens per chunk
    (a power of two >= 16; default ``CHUNK_SIZE``)."""
    check_device(call.device, "chunk")
    reason = problem(rule)
    if reason is not None:
        raise BackendError(f"backend 'chunk' is not available for rule '{rule.name}': {reason}")
    chunk = chunk_size or CHUNK_SIZE
    try:
        codegen.check_chunk(chunk)
    except ValueError as e:
        raise BackendError(str(e)) from None
    the_plan = _plan(rule)
    spec, module = _prologue(rule, the_plan, call.dim_sizes)
    inputs = [call.tensors[v.name] for v in rule.inputs]
    params = [call.tensors[v.name] for v in rule.params]
    values, reads, results = {}, {}, {}
    launches = {}
    for stage, info in zip(the_plan.stages, spec.stages):
        launch = _StageLaunch(module, info, call, len(inputs) + len(stage.reads_in), len(params))
        flat = inputs + [reads[n] for n in stage.reads_in] + params
        values.update(zip(info["values"], _StageFunction.apply(launch, *flat)))
        caps = TILE_CAPS or (None if call.device.type == "cuda" else
                             (INTERPRETER_BLOCK, INTERPRETER_BLOCK))
        for p in stage.passes:
            shape = p.shape(call.dim_sizes, chunk, caps)
            if shape not in launches:
                launches[shape] = PassLaunch.make(shape, call)
            get = lambda name: values[name] if name is not None else None  # noqa: E731
            results[p.index] = run_pass(launches[shape], get(p.u), get(p.kx), get(p.vy),
                                        get(p.gx_value), get(p.gy_value), get(p.extra),
                                        call.initial.get(p.state) if p.initial else None)
        for name, indices in the_plan.read_passes.items():
            if name not in reads and all(i in results for i in indices):
                reads[name] = _sum(results[i][0] for i in indices)
    outputs = []
    for o in rule.outputs:
        parts = [results[i][0] for i in the_plan.outputs[o.name]]
        if o.name in the_plan.output_extra:
            parts.append(values[the_plan.output_extra[o.name]])
        outputs.append(_sum(parts))
    finals = [_sum(results[i][1] for i in the_plan.finals[s.name]).to(call.compute_dtype)
              for s in rule.states]
    return outputs, finals


def _sum(items):
    items = list(items)
    total = items[0]
    for x in items[1:]:
        total = total + x
    return total
