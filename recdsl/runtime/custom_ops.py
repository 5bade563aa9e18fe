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

import itertools
import weakref
from typing import Optional

import torch

from ..errors import RecdslError

_RULES = weakref.WeakValueDictionary()  # key -> Rule
_COUNTER = itertools.count()

# how the caller gave ``initial_state``: None, one tensor, or a sequence (entries may be None)
_NO_INITIAL, _ONE_INITIAL, _SEQUENCE_INITIAL = 0, 1, 2


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

def call(rule, inputs, named, initial_state, output_final_state, backend, cu_seqlens):
    """``Rule.__call__``'s result, through ``recdsl::run``. Dynamo traces this function: it
    only flattens arguments; every check runs in the op's fake implementation."""
    tensors = list(inputs) + list(named.values())
    if initial_state is None:
        kind, initial = _NO_INITIAL, []
    elif isinstance(initial_state, torch.Tensor):
        kind, initial = _ONE_INITIAL, [initial_state]
    else:
        kind, initial = _SEQUENCE_INITIAL, list(initial_state)
    results = torch.ops.recdsl.run(rule.op_key, backend, len(inputs), ",".join(named), tensors,
                                   initial, kind, cu_seqlens, output_final_state)
    count = len(rule.ir.outputs)
    outputs = results[:count]
    out = outputs[0] if count == 1 else tuple(outputs)
    final = None
    if output_final_state:
        finals = results[count:]
        final = finals[0] if len(finals) == 1 else tuple(finals)
    return out, final


# ----------------------------------------------------------------------------- the ops

def _names(names: str) -> list:
    return names.split(",") if names else []


def _eager(key, backend, num_positional, names, tensors, initial, initial_kind, cu_seqlens,
           output_final_state):
    """The eager call's results, flat: outputs, then final states when asked."""
    rule = _rule(key)
    initial_state = (None if initial_kind == _NO_INITIAL else
                     initial[0] if initial_kind == _ONE_INITIAL else tuple(initial))
    out, final = rule(*tensors[:num_positional], initial_state=initial_state,
                      output_final_state=output_final_state, backend=backend,
                      cu_seqlens=cu_seqlens, **dict(zip(_names(names), tensors[num_positional:])))
    results = list(out) if isinstance(out, tuple) else [out]
    if output_final_state:
        results += list(final) if isinstance(final, tuple) else [final]
    return results


def _fresh(results, tensors):
    """``results`` contiguous (the strides the fake implementation promises) and sharing no
    memory with the op's inputs or with each other (a custom op's outputs may not alias)."""
    seen = {t.untyped_storage().data_ptr() for t in tensors if t is not None}
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
        initial: list[Optional[torch.Tensor]], initial_kind: int, cu_seqlens: Optional[torch.Tensor],
        output_final_state: bool) -> list[torch.Tensor]:
    """The call's outputs, then its final states when ``output_final_state``. ``tensors``: the
    first ``num_positional`` given by position, the rest by the comma-separated ``names``."""
    results = _eager(key, backend, num_positional, names, tensors, initial, initial_kind,
                     cu_seqlens, output_final_state)
    return _fresh(results, tensors + list(initial))


@run.register_fake
def _run_fake(key, backend, num_positional, names, tensors, initial, initial_kind, cu_seqlens,
              output_final_state):
    from . import backends
    rule = _rule(key)
    named = dict(zip(_names(names), tensors[num_positional:]))
    initial_state = (None if initial_kind == _NO_INITIAL else
                     initial[0] if initial_kind == _ONE_INITIAL else tuple(initial))
    packed = cu_seqlens is not None
    # the sequence boundaries are data: a packed call is bound as one sequence (outputs and
    # checks do not depend on them) and its final states have one row per packed sequence
    bound = rule.bind(*tensors[:num_positional], initial_state=None if packed else initial_state,
                      **named)
    backends.resolve(rule, backend, bound)  # an unknown or unavailable backend fails here
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
                 tensors: list[torch.Tensor], initial: list[Optional[torch.Tensor]], initial_kind: int,
                 cu_seqlens: Optional[torch.Tensor], output_final_state: bool,
                 needs: list[bool], grads: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
    """The gradients of the tensors (then the given initial states) flagged in ``needs``, in
    that order, for upstream gradients ``grads`` of ``run``'s results."""
    leaves = [t.detach().requires_grad_(n) for t, n in zip(tensors, needs)]
    present = [s for s in initial if s is not None]
    state_leaves = iter(s.detach().requires_grad_(n) for s, n in zip(present, needs[len(tensors):]))
    initial_leaves = [None if s is None else next(state_leaves) for s in initial]
    with _autograd_on():
        results = _eager(key, backend, num_positional, names, leaves, initial_leaves, initial_kind,
                         cu_seqlens, output_final_state)
    wanted = [t for t in leaves + [s for s in initial_leaves if s is not None] if t.requires_grad]
    pairs = [(r, g) for r, g in zip(results, grads) if g is not None and r.requires_grad]
    found = [None] * len(wanted)
    if pairs and wanted:
        found = torch.autograd.grad([r for r, _ in pairs], wanted, [g for _, g in pairs],
                                    allow_unused=True)
    return [torch.zeros_like(t) if g is None else g.contiguous() for t, g in zip(wanted, found)]


@run_backward.register_fake
def _run_backward_fake(key, backend, num_positional, names, tensors, initial, initial_kind,
                       cu_seqlens, output_final_state, needs, grads):
    present = tensors + [s for s in initial if s is not None]
    return [torch.empty_like(t, memory_format=torch.contiguous_format)
            for t, n in zip(present, needs) if n]


def _autograd_on():
    """Gradients recorded inside an op: a custom op's kernel runs with the autograd dispatch
    keys excluded, which ``torch.enable_grad`` alone does not undo."""
    import contextlib
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
    (key, backend, num_positional, names, tensors, initial, initial_kind, cu_seqlens,
     output_final_state) = inputs
    present = [s for s in initial if s is not None]
    ctx.needs = [t.requires_grad for t in tensors + present]
    ctx.args = (key, backend, num_positional, names, initial_kind, output_final_state)
    ctx.layout = (len(tensors), [s is not None for s in initial])
    ctx.save_for_backward(*tensors, *present, *([cu_seqlens] if cu_seqlens is not None else []))
    ctx.packed = cu_seqlens is not None


def _backward(ctx, grads):
    key, backend, num_positional, names, initial_kind, output_final_state = ctx.args
    count, given = ctx.layout
    saved = list(ctx.saved_tensors)
    cu_seqlens = saved.pop() if ctx.packed else None
    tensors, present = saved[:count], iter(saved[count:])
    initial = [next(present) if g else None for g in given]
    if not any(ctx.needs):
        return (None,) * 9
    found = iter(torch.ops.recdsl.run_backward(key, backend, num_positional, names, tensors, initial,
                                               initial_kind, cu_seqlens, output_final_state,
                                               ctx.needs, list(grads)))
    flat = [next(found) if n else None for n in ctx.needs]
    tensor_grads = flat[:count]
    state_grads = iter(flat[count:])
    initial_grads = [next(state_grads) if g else None for g in given]
    return (None, None, None, None, tensor_grads, initial_grads, None, None, None)


run.register_autograd(_backward, setup_context=_setup_context)
