"""backend="chunk" for the delta family: the generated prologue and the fixed WY/UT core
(``recdsl.codegen.prologue``, ``recdsl.codegen.chunk_delta``) behind a torch.autograd.Function.

Forward: prologue (per token: keys, betas, writes, log-decay, read vector) -> core (chunks).
Backward: core (state gradients walked back over chunks, then every chunk's gradients in
parallel) -> prologue's adjoint (gradients of the rule's inputs and params).

Every sequence, packed or not, is a token range: a batch [B, T] is the packed layout with
boundaries 0, T, 2T, ... so one code path serves both. fp16/bf16/fp64 inputs are read as
fp32; everything is computed and accumulated in fp32.
"""
from __future__ import annotations

import torch
import triton

from ..codegen import prologue as prologue_gen
from ..errors import BackendError
from .cache import cache_key, load_module
from .recurrent import check_device

CHUNK_SIZES = (16, 32, 64)
ROWS = 64  # rows (token steps) per chunk by default: 64 tokens of one step, 32 of two, ...
TOKENS_PER_PROGRAM = 16  # prologue: tokens per program


def problem(rule) -> str | None:
    return prologue_gen.problem(rule)


def default_chunk_size(steps: int) -> int:
    return max(16, ROWS // triton.next_power_of_2(steps))


def _prologue(rule, dim_sizes: dict):
    """The generated prologue module and its spec for a rule at these sizes (cached)."""
    sizes = {d: dim_sizes[d] for d in rule.ir.dims}
    key = cache_key(rule.ir.canonical(), "chunk-delta-prologue", repr(sorted(sizes.items())))
    holder = {}

    def make_source():
        holder["spec"] = prologue_gen.generate(rule, sizes)
        return holder["spec"].source

    module = load_module(key, f"{rule.name}_chunk_prologue", make_source)
    spec = getattr(module, "_recdsl_spec", None)
    if spec is None:
        spec = holder.get("spec") or prologue_gen.generate(rule, sizes)
        module._recdsl_spec = spec
    return spec, module


def _core():
    from ..codegen import chunk_delta  # triton.jit runs at import: after TRITON_INTERPRET is set
    return chunk_delta


class _Launch:
    """Everything one call needs: sizes, sequence boundaries, chunk bookkeeping, kernels."""

    def __init__(self, rule, call, chunk_size):
        self.rule, self.call = rule, call
        self.spec, self.module = _prologue(rule, call.dim_sizes)
        self.core = _core()
        spec = self.spec
        self.KD = call.dim_sizes[spec.key_dim]
        self.VD = call.dim_sizes[spec.value_dim]
        self.NH = spec.steps
        self.NHP = triton.next_power_of_2(self.NH)
        self.C = chunk_size or default_chunk_size(self.NH)
        if self.C not in CHUNK_SIZES:
            raise BackendError(f"chunk_size must be one of {', '.join(map(str, CHUNK_SIZES))}; "
                               f"got {self.C}")
        self.R = self.C * self.NHP
        self.BK = max(16, triton.next_power_of_2(self.KD))
        # V tiles: the whole V under the interpreter (fewer programs), 32 columns on a GPU
        full = max(16, triton.next_power_of_2(self.VD))
        self.BV = full if call.device.type == "cpu" else min(full, 32)
        self.NV = triton.cdiv(self.VD, self.BV)
        self.num_warps = 4 if self.BK <= 64 else 8
        device = call.device
        bounds = call.cu_seqlens if call.packed else [b * call.time for b in range(call.batch + 1)]
        self.N = len(bounds) - 1
        self.H = call.heads
        self.ntok = call.batch * call.time
        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        counts = [-(-n // self.C) for n in lengths]
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        self.n_chunks = offsets[-1]
        starts, ends = [], []
        for s, e, c in zip(bounds[:-1], bounds[1:], counts):
            starts += [s + i * self.C for i in range(c)]
            ends += [e] * c
        i64 = dict(dtype=torch.int64, device=device)
        self.cu = torch.tensor(bounds, **i64)
        self.chunk_offsets = torch.tensor(offsets[:-1], **i64)
        self.chunk_starts = torch.tensor(starts, **i64)
        self.chunk_ends = torch.tensor(ends, **i64)

    def constexprs(self):
        return dict(KD=self.KD, VD=self.VD, NH=self.NH, NHP=self.NHP, C=self.C, R=self.R,
                    BK=self.BK, BV=self.BV)

    def f32(self, *shape):
        return torch.empty(shape, dtype=torch.float32, device=self.call.device)

    def quantity_shapes(self) -> dict:
        """The prologue's outputs: name -> shape."""
        n, H = self.ntok, self.H
        shapes = {"key": (n, H, self.NH, self.KD), "beta": (n, H, self.NH),
                  "u": (n, H, self.NH, self.VD), "g": (n, H), "q": (n, H, self.KD)}
        if self.spec.has_extra:
            shapes["extra"] = (n, H, self.VD)
        return shapes

    def prologue_grid(self):
        return (triton.cdiv(self.ntok, TOKENS_PER_PROGRAM), self.H)


class _ChunkDeltaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, launch: _Launch, *flat):
        rule, call = launch.rule, launch.call
        n_in, n_par = len(rule.inputs), len(rule.params)
        inputs = [t.contiguous() for t in flat[:n_in]]
        params = [t.contiguous() for t in flat[n_in:n_in + n_par]]
        (h0,) = flat[n_in + n_par:]
        quantities = {name: launch.f32(*shape) for name, shape in launch.quantity_shapes().items()}
        getattr(launch.module, launch.spec.forward_name)[launch.prologue_grid()](
            *inputs, *params, *quantities.values(), launch.ntok, launch.H, TOKB=TOKENS_PER_PROGRAM)
        needs_grad = any(ctx.needs_input_grad[1:])
        KD, VD, H = launch.KD, launch.VD, launch.H
        o = launch.f32(launch.ntok, H, VD)
        ht = launch.f32(launch.N, H, KD, VD)
        states = launch.f32(launch.n_chunks, H, KD, VD) if needs_grad else launch.f32(1)
        use_initial = h0 is not None
        h0_arg = h0.to(torch.float32).contiguous() if use_initial else launch.f32(1)
        launch.core.chunk_delta_fwd[(launch.N, H, launch.NV)](
            quantities["key"], quantities["beta"], quantities["u"], quantities["g"], quantities["q"],
            h0_arg, o, ht, states, launch.cu, launch.chunk_offsets, H, **launch.constexprs(),
            USE_INITIAL=use_initial, STORE_STATES=needs_grad, num_warps=launch.num_warps)
        if launch.spec.has_extra:
            o = o + quantities["extra"]
        ctx.launch = launch
        ctx.initial_dtype = h0.dtype if use_initial else None
        ctx.save_for_backward(*inputs, *params, *quantities.values(), states)
        out = o.view(call.batch, call.time, H, VD)
        return out, ht

    @staticmethod
    def backward(ctx, d_out, d_ht):
        launch = ctx.launch
        rule, call = launch.rule, launch.call
        n_in, n_par = len(rule.inputs), len(rule.params)
        saved = ctx.saved_tensors
        inputs, params = saved[:n_in], saved[n_in:n_in + n_par]
        names = list(launch.quantity_shapes())
        quantities = dict(zip(names, saved[n_in + n_par:n_in + n_par + len(names)]))
        states = saved[-1]
        KD, VD, H = launch.KD, launch.VD, launch.H
        do = (d_out.reshape(launch.ntok, H, VD).to(torch.float32).contiguous() if d_out is not None
              else torch.zeros(launch.ntok, H, VD, dtype=torch.float32, device=call.device))
        use_final = d_ht is not None
        dht = d_ht.to(torch.float32).contiguous() if use_final else launch.f32(1)
        dstates = launch.f32(launch.n_chunks, H, KD, VD)
        dh0 = launch.f32(launch.N, H, KD, VD)
        launch.core.chunk_delta_bwd_dh[(launch.N, H, launch.NV)](
            quantities["key"], quantities["beta"], quantities["g"], quantities["q"], do, dht,
            dstates, dh0, launch.cu, launch.chunk_offsets, H, **launch.constexprs(),
            USE_FINAL_GRAD=use_final, num_warps=launch.num_warps)
        grads = {name: launch.f32(*t.shape) for name, t in quantities.items()}
        launch.core.chunk_delta_bwd[(launch.n_chunks, H)](
            quantities["key"], quantities["beta"], quantities["u"], quantities["g"], quantities["q"],
            states, dstates, do, grads["key"], grads["beta"], grads["u"], grads["g"], grads["q"],
            launch.chunk_starts, launch.chunk_ends, H, **launch.constexprs(),
            num_warps=launch.num_warps)
        if "extra" in grads:
            grads["extra"] = do
        blocks = launch.prologue_grid()[0]
        d_in = [torch.zeros(t.shape, dtype=torch.float32, device=call.device) for t in inputs]
        d_par = [launch.f32(blocks, H, *p.shape[1:]) for p in params]
        getattr(launch.module, launch.spec.backward_name)[launch.prologue_grid()](
            *inputs, *params, *grads.values(), *d_in, *d_par, launch.ntok, H,
            TOKB=TOKENS_PER_PROGRAM)
        grads_in = [g.to(t.dtype) for g, t in zip(d_in, inputs)]
        grads_par = [g.sum(0).to(p.dtype) for g, p in zip(d_par, params)]
        dh0 = dh0.to(ctx.initial_dtype) if ctx.initial_dtype is not None else None
        return (None, *grads_in, *grads_par, dh0)


def run(rule, call, chunk_size=None):
    """Outputs and final states of ``rule`` on a bound call (``chunk_size`` tokens per chunk:
    16, 32 or 64; default 64 rows of steps)."""
    check_device(call.device, "chunk")
    reason = problem(rule)
    if reason is not None:
        raise BackendError(f"backend 'chunk' is not available for rule '{rule.name}': {reason}")
    launch = _Launch(rule, call, chunk_size)
    flat = [call.tensors[v.name] for v in rule.inputs] + [call.tensors[v.name] for v in rule.params]
    (state,) = rule.states
    flat.append(call.initial.get(state.name))
    out, final = _ChunkDeltaFunction.apply(launch, *flat)
    return [out], [final.to(call.compute_dtype)]
