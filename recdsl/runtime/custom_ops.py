"""A rule call as one opaque ``torch.library`` custom op, so ``torch.compile`` (dynamo,
AOTAutograd, Inductor) runs a model around a rule with no graph break and any backend.

While dynamo traces, ``Rule.__call__`` hands its arguments to ``call`` here, which flattens them
into ``recdsl::run``. The graph then holds one node per recurrence call; the backends (the
torch-chunk family paths, torch-scan, naive, the staged and lowered runners, and on GPUs the
Triton kernels) run eagerly inside it, exactly as an eager call runs them:

* ``recdsl::run`` runs the eager call (``Rule.__call__``) and returns the outputs, then the final
  states when asked. Its fake (meta) implementation binds the call with ``BoundCall``, so the
  shapes, dtypes and errors of a traced call are those of the eager call.
* Its backward is a second op, ``recdsl::run_backward``: it re-runs the eager call with
  gradients on and takes ``torch.autograd.grad`` of it, so every backend's own backward
  (autograd Functions, fixed kernels) gives the gradients, and nothing has to be stored
  between the two ops (recompute, as flash-linear-attention's kernels do). The price: a
  compiled training step runs the recurrence's forward twice.

Rules are not tensors: an op names its rule by a string key (``register``, done once per
``Rule``), looked up in a registry that does not keep rules alive.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from typing import Optional

import torch

from ..codegen.precision import check as check_precision
from ..errors import RecdslError
from .threads import cpu_threads

_RULES = weakref.WeakValueDictionary()  # key -> Rule
_COUNTER = itertools.count()

# how the caller gave ``initial_state`` (the op's ``initial_layout``): "" for None, "T" for one
# tensor, else one character per entry of the sequence, "1" given, "0" None
_ONE_INITIAL = "T"


def register(rule) -> str:
    """A key naming ``rule`` in the ops (unique per Rule object, valid while it lives)."""
    key = f"{rule.name}#{next(_COUNTER)}"
    _RULES[key] = rule
    return key


def compiling() -> bool:
    """Whether dynamo is tracing (``torch.compile``, ``torch.export``) this call."""
    return torch.compiler.is_compiling()


def _rule(key: str):
    rule = _RULES.get(key)
    if rule is None:
        raise RecdslError(f"recdsl op: rule '{key}' no longer exists (the compiled graph outlived "
                          f"the Rule it was traced from); compile again")
    return rule


# ----------------------------------------------------------------------------- the traced side

def call(rule, inputs, named, initial_state, output_final_state, backend, cu_seqlens,
         precision="auto"):
    """``Rule.__call__``'s result, through ``recdsl::run``. Dynamo traces this function: it
    only flattens arguments; every check runs in the op's fake implementation."""
    backend = f"{backend}{_PRECISION}{precision}"  # one string argument carries both
    tensors = list(inputs) + list(named.values())
    # the op takes the given states only (a list holding None would lose their gradients)
    if initial_state is None:
        layout, initial = "", []
    elif isinstance(initial_state, torch.Tensor):
        layout, initial = _ONE_INITIAL, [initial_state]
    else:
        layout = "".join("0" if s is None else "1" for s in initial_state)
        initial = [s for s in initial_state if s is not None]
    results = torch.ops.recdsl.run(rule.op_key, backend, len(inputs), ",".join(named), tensors,
                                   initial, layout, cu_seqlens, output_final_state)
    count = len(rule.ir.outputs)
    outputs = results[:count]
    out = outputs[0] if count == 1 else tuple(outputs)
    final = None
    if output_final_state:
        finals = results[count:]
        final = finals[0] if len(finals) == 1 else tuple(finals)
    return out, final


# ----------------------------------------------------------------------------- the ops
# Arguments shared by both ops: ``key`` (the rule), ``backend``, ``tensors`` (the first
# ``num_positional`` given by position, the rest by the comma-separated ``names``), ``initial``
# (the given initial states, laid out as the caller gave them by ``initial_layout``),
# ``cu_seqlens``, ``output_final_state``.

def _initial_state(initial, layout):
    """The caller's ``initial_state`` back from the op's arguments."""
    if not layout:
        return None
    if layout == _ONE_INITIAL:
        return initial[0]
    present = iter(initial)
    return tuple(next(present) if g == "1" else None for g in layout)


def _names(names: str) -> list:
    return names.split(",") if names else []


_PRECISION = "@precision="  # joins the call's backend and precision into the ops' ``backend``


def _backend_precision(backend: str):
    """The call's backend and precision, from the ops' ``backend`` argument."""
    name, _, precision = backend.partition(_PRECISION)
    return name, precision or "auto"


def _eager(key, backend, num_positional, names, tensors, initial, initial_layout,
           cu_seqlens, output_final_state):
    """The eager call's results, flat: outputs, then final states when asked."""
    backend, precision = _backend_precision(backend)
    out, final = _rule(key)(*tensors[:num_positional],
                            initial_state=_initial_state(initial, initial_layout),
                            output_final_state=output_final_state, backend=backend,
                            cu_seqlens=cu_seqlens, precision=precision,
                            **dict(zip(_names(names), tensors[num_positional:])))
    results = list(out) if isinstance(out, tuple) else [out]
    if output_final_state:
        results += list(final) if isinstance(final, tuple) else [final]
    return results


def _fresh(results, tensors):
    """``results`` contiguous (the strides the fake implementation promises) and sharing no
    memory with the op's inputs or with each other (a custom op's outputs may not alias)."""
    seen = {t.untyped_storage().data_ptr() for t in tensors}
    fresh = []
    for r in results:
        r = r.contiguous()
        if r.untyped_storage().data_ptr() in seen:
            r = r.clone()
        seen.add(r.untyped_storage().data_ptr())
        fresh.append(r)
    return fresh


@torch.library.custom_op("recdsl::run", mutates_args=())
def run(key: str, backend: str, num_positional: int, names: str, tensors: list[torch.Tensor],
        initial: list[torch.Tensor], initial_layout: str,
        cu_seqlens: Optional[torch.Tensor], output_final_state: bool) -> list[torch.Tensor]:
    """The call's outputs, then its final states when ``output_final_state``."""
    results = _eager(key, backend, num_positional, names, tensors, initial, initial_layout,
                     cu_seqlens, output_final_state)
    return _fresh(results, tensors + initial)


@run.register_fake
def _run_fake(key, backend, num_positional, names, tensors, initial, initial_layout,
              cu_seqlens, output_final_state):
    from . import backends
    rule = _rule(key)
    named = dict(zip(_names(names), tensors[num_positional:]))
    packed = cu_seqlens is not None
    # the sequence boundaries are data: a packed call is bound as one sequence (outputs and
    # checks do not depend on them) and its final states have one row per packed sequence
    initial_state = None if packed else _initial_state(initial, initial_layout)
    bound = rule.bind(*tensors[:num_positional], initial_state=initial_state, **named)
    backend, precision = _backend_precision(backend)
    check_precision(precision)  # an unknown backend or precision fails here, as in eager
    backends.resolve(rule, backend, bound)
    results = [torch.empty([bound.batch, bound.time, bound.heads] + [bound.dim_sizes[d] for d in var.dims],
                           dtype=bound.output_dtype, device=bound.device)
               for var in rule.ir.outputs]
    if output_final_state:
        for var in rule.ir.states:
            shape = bound.state_shape(var.name)
            if packed:
                shape[0] = cu_seqlens.shape[0] - 1
            results.append(torch.empty(shape, dtype=bound.compute_dtype, device=bound.device))
    return results


@torch.library.custom_op("recdsl::run_backward", mutates_args=())
def run_backward(key: str, backend: str, num_positional: int, names: str,
                 tensors: list[torch.Tensor], initial: list[torch.Tensor], initial_layout: str,
                 cu_seqlens: Optional[torch.Tensor],
                 output_final_state: bool, needs: list[bool],
                 grads: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
    """The gradients of ``tensors + initial`` flagged in ``needs``, in that order, for upstream
    gradients ``grads`` of ``run``'s results (None: no gradient)."""
    leaves = [t.detach().requires_grad_(n) for t, n in zip(tensors + initial, needs)]
    with _autograd_on():
        results = _eager(key, backend, num_positional, names, leaves[:len(tensors)],
                         leaves[len(tensors):], initial_layout, cu_seqlens,
                         output_final_state)
    wanted = [t for t in leaves if t.requires_grad]
    pairs = [(r, g) for r, g in zip(results, grads) if g is not None and r.requires_grad]
    found = [None] * len(wanted)
    if pairs:
        # the CPU thread policy (threads.py) holds for this backward too, as for the re-run
        cpu = leaves[0].device.type == "cpu"
        with cpu_threads() if cpu else contextlib.nullcontext():
            found = torch.autograd.grad([r for r, _ in pairs], wanted, [g for _, g in pairs],
                                        allow_unused=True)
    return [torch.zeros_like(t) if g is None else g.contiguous() for t, g in zip(wanted, found)]


@run_backward.register_fake
def _run_backward_fake(key, backend, num_positional, names, tensors, initial, initial_layout,
                       cu_seqlens, output_final_state, needs, grads):
    return [torch.empty_like(t, memory_format=torch.contiguous_format)
            for t, n in zip(tensors + initial, needs) if n]


def _autograd_on():
    """Gradients recorded inside an op: a custom op's kernel runs with the autograd dispatch
    keys excluded, which ``torch.enable_grad`` alone does not undo."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for k in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor,
              keys.ADInplaceOrView):
        exclude = exclude.remove(k)
    stack = contextlib.ExitStack()
    stack.enter_context(torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                                        exclude))
    stack.enter_context(torch.enable_grad())
    return stack


# ----------------------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    (key, backend, num_positional, names, tensors, initial, initial_layout,
     cu_seqlens, output_final_state) = inputs
    ctx.needs = [t.requires_grad for t in tensors + initial]
    ctx.args = (key, backend, num_positional, names, initial_layout, output_final_state)
    ctx.count = len(tensors)
    ctx.packed = cu_seqlens is not None
    ctx.save_for_backward(*tensors, *initial, *([cu_seqlens] if ctx.packed else []))


def _backward(ctx, grads):
    key, backend, num_positional, names, initial_layout, output_final_state = ctx.args
    saved = list(ctx.saved_tensors)
    cu_seqlens = saved.pop() if ctx.packed else None
    tensors, initial = saved[:ctx.count], saved[ctx.count:]
    if not any(ctx.needs):
        return (None,) * 9
    found = iter(torch.ops.recdsl.run_backward(key, backend, num_positional, names, tensors,
                                               initial, initial_layout, cu_seqlens,
                                               output_final_state, ctx.needs, list(grads)))
    flat = [next(found) if n else None for n in ctx.needs]
    return (None, None, None, None, flat[:ctx.count], flat[ctx.count:], None, None, None)


run.register_autograd(_backward, setup_context=_setup_context)
