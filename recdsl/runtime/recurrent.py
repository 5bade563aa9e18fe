"""backend="recurrent": the fused recurrent Triton kernels behind a torch.autograd.Function."""
from __future__ import annotations

import math
import os

import torch

from ..codegen import tiling
from ..codegen.recurrent import KernelSpec, generate
from ..errors import BackendError
from .cache import cache_key, load_generated


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def check_device(device: torch.device, backend: str):
    if not triton_usable(device):
        raise BackendError(
            f"backend '{backend}' runs Triton kernels: it needs CUDA tensors, or CPU tensors with "
            f"TRITON_INTERPRET=1 set in the environment before the first call (slow; for "
            f"testing). Here the tensors are on {device}; use backend='naive' or 'auto'")


def kernels(rule, dim_sizes: dict):
    """The generated module and its KernelSpec for a rule at these dim sizes (cached)."""
    sizes = {d: dim_sizes[d] for d in rule.ir.dims}
    # the split thresholds are part of the key: tests lower them to exercise the split kernels
    key = cache_key(rule.ir.canonical(), "recurrent", repr(sorted(sizes.items())),
                    repr((tiling.SPLIT_ABOVE, tiling.SMALLEST_TILE)))
    return load_generated(key, f"{rule.name}_recurrent", lambda: generate(rule.ir, sizes))


def checkpoint_interval(longest: int) -> int:
    """Tokens between stored states: about sqrt(T), so checkpoints and the backward's scratch
    buffer are both O(sqrt(T)) states."""
    return max(1, min(256, 1 << max(0, math.ceil(math.log2(max(1.0, math.sqrt(longest)))))))


class _Launch:
    """What one call needs to launch the kernels: the spec, the module and the call's sizes."""

    def __init__(self, rule, call, spec: KernelSpec, module):
        self.rule, self.call, self.spec, self.module = rule, call, spec, module
        lengths = [end - start for start, end in call.segments()] if call.packed else [call.time]
        self.longest = max(lengths)
        self.cu = (torch.tensor(call.cu_seqlens, dtype=torch.int64, device=call.device)
                   if call.packed else None)

    def dummy(self):
        return torch.empty(1, dtype=torch.float32, device=self.call.device)

    def numel(self, dims):
        n = 1
        for d in dims:
            n *= self.call.dim_sizes[d]
        return n


class _RecurrentFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, launch: _Launch, *flat):
        rule, call = launch.rule, launch.call
        n_in, n_par = len(rule.inputs), len(rule.params)
        inputs = [t.contiguous() for t in flat[:n_in]]
        params = [t.contiguous() for t in flat[n_in:n_in + n_par]]
        initial = list(flat[n_in + n_par:])
        needs_grad = any(ctx.needs_input_grad[1:])
        ckpt = checkpoint_interval(launch.longest) if needs_grad else 0
        n_ckpt = -(-launch.longest // ckpt) if ckpt else 0
        N, H, device = call.num_sequences, call.heads, call.device
        f32 = dict(dtype=torch.float32, device=device)
        use_initial = any(t is not None for t in initial)
        # with some initial states given, the others start at zero
        h0 = [t.contiguous() if t is not None else
              torch.zeros(call.state_shape(s.name), **f32) if use_initial else launch.dummy()
              for t, s in zip(initial, rule.states)]
        outs = [torch.empty([call.batch, call.time, H] + [call.dim_sizes[d] for d in o.dims],
                            dtype=call.output_dtype, device=device) for o in rule.outputs]
        finals = [torch.empty(call.state_shape(s.name), **f32) for s in rule.states]
        ckpts = [torch.empty([N * H * n_ckpt * launch.numel(s.dims)], **f32) if ckpt else launch.dummy()
                 for s in rule.states]
        # values the backward needs but cannot compute in its tiles, stored per token
        tokens = call.batch * call.time * H
        residuals = [torch.empty([tokens * launch.numel(dims)], **f32) if ckpt else launch.dummy()
                     for _, dims in launch.spec.residuals]
        kernel = getattr(launch.module, launch.spec.forward_name)
        kernel[(N * H, launch.spec.forward_programs)](*inputs, *params, *h0, *outs, *finals, *ckpts, *residuals,
                         launch.cu if launch.cu is not None else launch.dummy(),
                         call.time, H, n_ckpt,
                         USE_INITIAL=use_initial, STORE_FINAL=True,
                         IS_VARLEN=launch.cu is not None, CKPT=ckpt, num_warps=launch.spec.num_warps)
        ctx.launch, ctx.ckpt, ctx.n_ckpt = launch, ckpt, n_ckpt
        ctx.has_initial = [t is not None for t in initial]
        ctx.n_ckpts = len(ckpts)
        ctx.save_for_backward(*inputs, *params, *ckpts, *residuals)
        return (*outs, *finals)

    @staticmethod
    def backward(ctx, *grads):
        launch = ctx.launch
        rule, call = launch.rule, launch.call
        n_in, n_par = len(rule.inputs), len(rule.params)
        saved = ctx.saved_tensors
        inputs, params = saved[:n_in], saved[n_in:n_in + n_par]
        ckpts, residuals = saved[n_in + n_par:n_in + n_par + ctx.n_ckpts], saved[n_in + n_par + ctx.n_ckpts:]
        N, H, device = call.num_sequences, call.heads, call.device
        f32 = dict(dtype=torch.float32, device=device)
        n_out = len(rule.outputs)
        d_out = []
        for g, o in zip(grads[:n_out], rule.outputs):
            shape = [call.batch, call.time, H] + [call.dim_sizes[d] for d in o.dims]
            d_out.append(g.contiguous() if g is not None else torch.zeros(shape, **f32))
        d_final = list(grads[n_out:])
        use_final = any(g is not None for g in d_final)
        dht = [g.contiguous() if g is not None else torch.zeros(call.state_shape(s.name), **f32)
               for g, s in zip(d_final, rule.states)]
        spec = launch.spec
        programs = spec.backward_programs
        scratch = [torch.empty([N * H * programs * ctx.ckpt * spec.scratch_numel[s.name]], **f32)
                   for s in rule.states]

        def partial(name, shape):
            """Gradients the backward's tiles do not each own a slice of come back as one
            partial sum per program."""
            return [1 if spec.gradient_whole.get(name) else programs] + list(shape)

        d_in = [torch.zeros(partial(v.name, t.shape), **f32) for v, t in zip(rule.inputs, inputs)]
        d_par = [torch.zeros(partial(p.name, [N * H] + [call.dim_sizes[d] for d in p.dims]), **f32)
                 for p in rule.params]
        dh0 = [torch.zeros(partial(s.name, call.state_shape(s.name)), **f32) for s in rule.states]
        kernel = getattr(launch.module, spec.backward_name)
        kernel[(N * H, programs)](*inputs, *params, *ckpts, *scratch, *residuals, *d_out, *dht, *d_in, *d_par, *dh0,
                                    launch.cu if launch.cu is not None else launch.dummy(),
                                    call.time, H, ctx.n_ckpt, call.batch * call.time,
                                    USE_FINAL_GRAD=use_final, IS_VARLEN=launch.cu is not None,
                                    CKPT=ctx.ckpt, num_warps=spec.backward_num_warps)
        grads_in = [g.sum(0).to(t.dtype) for g, t in zip(d_in, inputs)]
        grads_par = [g.sum(0).view(N, *p.shape).sum(0).to(p.dtype) for g, p in zip(d_par, params)]
        grads_h0 = [g.sum(0) if has else None for g, has in zip(dh0, ctx.has_initial)]
        return (None, *grads_in, *grads_par, *grads_h0)


def run_recurrent(rule, call):
    check_device(call.device, "recurrent")
    spec, module = kernels(rule, call.dim_sizes)
    launch = _Launch(rule, call, spec, module)
    flat = [call.tensors[v.name] for v in rule.inputs] + [call.tensors[v.name] for v in rule.params]
    flat += [call.initial.get(s.name) for s in rule.states]
    results = _RecurrentFunction.apply(launch, *flat)
    n_out = len(rule.outputs)
    finals = [f.to(call.compute_dtype) for f in results[n_out:]]
    return list(results[:n_out]), finals
