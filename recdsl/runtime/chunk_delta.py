"""backend="chunk" for the delta family: the generated prologue and the fixed WY/UT core
(``recdsl.codegen.prologue``, ``recdsl.codegen.chunk_delta``) behind a torch.autograd.Function.

Forward: prologue (per token: keys, betas, writes, log-decay, read vector, and for an erase
beside a decay its log read scale) -> core (chunks; the core's READ variant when the rule has
that read scale).
Backward: core (state gradients walked back over chunks, then every chunk's gradients in
parallel) -> prologue's adjoint (gradients of the rule's inputs and params).

Every sequence, packed or not, is a token range: a batch [B, T] is the packed layout with
boundaries 0, T, 2T, ... so one code path serves both. fp16/bf16/fp64 inputs are read as
fp32; everything is accumulated in fp32, the products' operands in the formats of the call's
precision policy (``recdsl.codegen.precision``; half operands for half inputs by default).
"""
from __future__ import annotations

import torch
import triton

from ..codegen import precision
from ..codegen import prologue as prologue_gen
from ..errors import BackendError
from .cache import cache_key, load_generated
from .recurrent import check_device

TOKENS_PER_PROGRAM = prologue_gen.TOKENS_PER_PROGRAM


def problem(rule) -> str | None:
    return prologue_gen.problem(rule)


def _prologue(rule, dim_sizes: dict):
    """The generated prologue module and its spec for a rule at these sizes (cached)."""
    sizes = {d: dim_sizes[d] for d in rule.ir.dims}
    key = cache_key(rule.ir.canonical(), "chunk-delta-prologue", repr(sorted(sizes.items())))
    return load_generated(key, f"{rule.name}_chunk_prologue", lambda: prologue_gen.generate(rule, sizes))


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
        gpu = call.device.type != "cpu"
        self.precision = precision.for_call(call, interpreted=not gpu)
        try:
            cfg = self.core.config(self.KD, self.VD, self.NH, chunk_size, gpu=gpu,
                                   precision=self.precision)
        except ValueError as err:
            raise BackendError(str(err)) from None
        self.R, self.BV, self.NHP, self.C = cfg["R"], cfg["BV"], cfg["NHP"], cfg["C"]
        self.cfg = cfg
        self.NV = triton.cdiv(self.VD, self.BV)
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

    def _launch(self, kernel, grid, args, flags):
        name = f"chunk_delta_{kernel}"
        getattr(self.core, name)[grid](*args, **self.core.constexprs(name, self.cfg), **flags,
                                       num_warps=self.core.num_warps(name, self.cfg))

    def chunks(self, kernel, *args, v_tiles=False, k_tiles=False, **flags):
        """A core kernel with one program per (chunk, head[, V or K tile])."""
        grid = (self.n_chunks, self.H)
        if v_tiles or k_tiles:
            grid += (self.NV if v_tiles else triton.cdiv(self.KD, self.cfg["BKT"]),)
        self._launch(kernel, grid, args + (self.chunk_starts, self.chunk_ends, self.H), flags)

    def sequences(self, kernel, *args, **flags):
        """A core kernel walking the chunks: one program per (sequence, head, V tile)."""
        self._launch(kernel, (self.N, self.H, self.NV),
                     args + (self.cu, self.chunk_offsets, self.H), flags)

    def f32(self, *shape):
        return torch.empty(shape, dtype=torch.float32, device=self.call.device)

    def quantity_shapes(self) -> dict:
        """The prologue's outputs: name -> shape."""
        n, H = self.ntok, self.H
        shapes = {"key": (n, H, self.NH, self.KD), "beta": (n, H, self.NH),
                  "u": (n, H, self.NH, self.VD), "g": (n, H), "q": (n, H, self.KD)}
        if self.spec.has_read:
            shapes["gr"] = (n, H)
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
        key, beta, u, g, q = (quantities[n] for n in ("key", "beta", "u", "g", "q"))
        read = launch.spec.has_read
        gr = quantities["gr"] if read else g  # not read unless READ
        KD, VD, H = launch.KD, launch.VD, launch.H
        t = launch.f32(launch.n_chunks, H, launch.R, launch.R)
        w, u_t, delta = torch.empty_like(key), torch.empty_like(u), torch.empty_like(u)
        launch.chunks("prepare", key, beta, u, g, gr, t, w, u_t, READ=read)
        ht = launch.f32(launch.N, H, KD, VD)
        states = launch.f32(launch.n_chunks, H, KD, VD)
        use_initial = h0 is not None
        h0_arg = h0.to(torch.float32).contiguous() if use_initial else launch.f32(1)
        launch.sequences("fwd_h", key, g, w, u_t, h0_arg, delta, ht, states, USE_INITIAL=use_initial)
        del w, u_t
        o = launch.f32(launch.ntok, H, VD)
        launch.chunks("fwd_o", key, g, q, delta, states, o, v_tiles=True)
        if launch.spec.has_extra:
            o = o + quantities["extra"]
        ctx.launch = launch
        ctx.initial_dtype = h0.dtype if use_initial else None
        ctx.save_for_backward(*inputs, *params, key, beta, g, gr, q, t, delta, states)
        return o.view(call.batch, call.time, H, VD), ht

    @staticmethod
    def backward(ctx, d_out, d_ht):
        launch = ctx.launch
        rule, call = launch.rule, launch.call
        n_in, n_par = len(rule.inputs), len(rule.params)
        saved = ctx.saved_tensors
        inputs, params = saved[:n_in], saved[n_in:n_in + n_par]
        key, beta, g, gr, q, t, delta, states = saved[n_in + n_par:]
        read = launch.spec.has_read
        KD, VD, H = launch.KD, launch.VD, launch.H
        do = (d_out.reshape(launch.ntok, H, VD).to(torch.float32).contiguous() if d_out is not None
              else torch.zeros(launch.ntok, H, VD, dtype=torch.float32, device=call.device))
        use_final = d_ht is not None
        dht = d_ht.to(torch.float32).contiguous() if use_final else launch.f32(1)
        grads = {name: launch.f32(*shape) for name, shape in launch.quantity_shapes().items()}
        dstates = launch.f32(launch.n_chunks, H, KD, VD)
        dread = launch.f32(launch.n_chunks, H, KD, VD)
        dh0 = launch.f32(launch.N, H, KD, VD)
        launch.chunks("bwd_dv", key, g, q, do, grads["u"], dread, v_tiles=True)
        launch.sequences("bwd_dh", key, beta, g, gr, t, dread, dht, grads["u"], dstates, dh0,
                         USE_FINAL_GRAD=use_final, READ=read)
        del dread
        sym, dpm = t, torch.empty_like(t)  # T is not needed any more: its buffer takes sym
        dgr = grads["gr"] if read else grads["g"]  # not written unless READ
        launch.chunks("bwd_dm", key, beta, g, gr, delta, grads["u"], grads["beta"], grads["g"],
                      dgr, sym, READ=read)
        launch.chunks("bwd_dk", key, beta, g, gr, delta, grads["u"], states, dstates,
                      grads["key"], grads["beta"], grads["g"], dgr, READ=read)
        launch.chunks("bwd_dq", key, g, q, delta, states, do, grads["q"], grads["g"], dpm)
        launch.chunks("bwd_dk_tail", key, q, sym, dpm, grads["key"], grads["q"], k_tiles=True)
        if "extra" in grads:
            grads["extra"] = do
        blocks = launch.prologue_grid()[0]
        d_in = [torch.zeros(x.shape, dtype=torch.float32, device=call.device) for x in inputs]
        d_par = [launch.f32(blocks, H, *p.shape[1:]) for p in params]
        getattr(launch.module, launch.spec.backward_name)[launch.prologue_grid()](
            *inputs, *params, *grads.values(), *d_in, *d_par, launch.ntok, H,
            TOKB=TOKENS_PER_PROGRAM)
        grads_in = [gr.to(x.dtype) for gr, x in zip(d_in, inputs)]
        grads_par = [gr.sum(0).to(p.dtype) for gr, p in zip(d_par, params)]
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
