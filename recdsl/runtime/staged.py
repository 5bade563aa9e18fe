"""Running a rule through its staging (``recdsl.ir.stages``): the leading states first, for
every token, then the derived rule on a parallel backend.

``run(rule, call, backend)``:

1. computes every leading state for every token, before and after the token's updates:

   - a max-plus state ``m_t = max(a_t + m_{t-1}, b_t)`` in parallel: unrolled,
     ``m_t = max(F_t + m_0, max_{s<=t} (b_s + F_t - F_s))`` with ``F_t = a_1 + ... + a_t``
     (per sequence), i.e. ``m_t = F_t + max(m_0, cummax_{s<=t}(b_s - F_s))``; the sums are
     taken in float64 so that ``F`` stays exact enough over long sequences;
   - else (or where the max-plus form has an exact tie, see below) a sequential pass over that
     state's own statements (the naive evaluator on them alone, batched over B and H);

2. runs the derived rule (the other states, the leading ones as per-token inputs) on
   ``backend`` with the original inputs, params and the other states' initial states;
3. returns the outputs and the final states of ALL states in declaration order (a leading
   state's final value from step 1).

Gradients: everything is torch autograd. The naive loop's ``torch.maximum`` splits the
gradient 0.5/0.5 at a tie (``a_t + m_{t-1} == b_t``), while ``torch.cummax`` gives it all to
one index; away from ties both are the one derivative. So a call whose max-plus recurrence has
an exact tie at some token (in the compute dtype, as the naive loop would see it) takes the
sequential pass, which is the naive loop's own arithmetic: ties match. (Ties happen with real
gates when ``lf + m == i`` exactly, e.g. a forget gate so large that ``lf`` rounds away next to
``m`` and a constant input gate.)
"""
from __future__ import annotations

import torch

from ..codegen.naive import NaiveStep
from ..ir.stages import NotStaged, Staged, stage
from .rule import of_derived
from .tokenwise import Tokenwise

BACKENDS = ("torch-chunk", "chunk", "torch-scan", "scan")


def _staged(rule) -> Staged:
    """The rule's staging: the one classify found (``rule.family_info.staged``, once hooked
    in), else computed here once and kept on the rule."""
    cached = getattr(rule.family_info, "staged", None) or getattr(rule, "_staging", None)
    if cached is None:
        cached = stage(rule.ir, rule.analysis)
        rule._staging = cached
    return cached


def derived_inputs(staged, tensors: dict, values: dict) -> dict:
    """The derived rule's inputs: ``tensors`` plus each leading state's values before and
    after every token (``values``: name -> (before, after), from ``leading_values``)."""
    tensors = dict(tensors)
    for lead in staged.leading:
        before, after = values[lead.name]
        if lead.before:
            tensors[lead.before] = before
        if lead.after:
            tensors[lead.after] = after
    return tensors


def leading_values(rule, call, staged: Staged | None = None, force_sequential=False) -> dict:
    """Every leading state before and after each token's updates: name -> (before, after),
    each ``[B, T, H, *dims]`` in the compute dtype."""
    staged = staged or _staged(rule)
    dtype = call.compute_dtype
    out, sequential = {}, []
    tw = None
    for lead in staged.leading:
        if lead.form == "maxplus" and not force_sequential:
            tw = tw or Tokenwise(rule.ir, call)
            got = _maxplus(lead, call, tw, rule.ir.var(lead.name).dims)
            if got is not None:
                out[lead.name] = got
                continue
        sequential.append(lead.name)
    if sequential:  # all of them at once: their statements may share lets
        out = _sequential(rule.ir, call, staged, [st.name for st in staged.leading])
    return {k: (b.to(dtype), a.to(dtype)) for k, (b, a) in out.items()}


def _broadcast(x, call, dims, dtype):
    """A per-token value ``[B, T, H, ...]`` (or a constant) as ``[B, T, H, *dims]``."""
    shape = [call.batch, call.time, call.heads] + [call.dim_sizes[d] for d in dims]
    x = x.to(dtype)
    while x.dim() < len(shape):
        x = x.unsqueeze(-1)
    return x.expand(shape)


def _maxplus(lead, call, tw: Tokenwise, dims):
    """(before, after) of a max-plus state for all tokens, or None where the recurrence has
    an exact tie (the naive loop's gradient splits there: the sequential pass takes it)."""
    dtype = call.compute_dtype
    wide = torch.float64
    b = _broadcast(tw.value(lead.b), call, dims, dtype)
    if lead.a is None:
        a = torch.zeros_like(b)
    else:
        a = _broadcast(tw.value(lead.a), call, dims, dtype)
        if lead.a_sign < 0:
            a = -a
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return None  # -inf + inf in the unrolled form: the sequential pass is exact
    befores, afters = [], []
    for seq, (start, end) in enumerate(call.segments()):
        if end == start:
            continue
        rows = slice(seq, seq + 1) if call.packed else slice(None)
        m0 = call.initial_state(lead.name, rows).to(dtype)  # [B or 1, H, *dims]
        aa, bb = a[:, start:end].to(wide), b[:, start:end].to(wide)
        F = aa.cumsum(1)
        run = torch.cummax(bb - F, dim=1).values
        after = F + torch.maximum(m0.to(wide).unsqueeze(1), run)
        after = after.to(dtype)
        before = torch.cat([m0.unsqueeze(1), after[:, :-1]], dim=1)
        # an exact tie of the naive loop's max at some token: the sequential pass
        if bool((a[:, start:end] + before == b[:, start:end]).any()):
            return None
        befores.append(before)
        afters.append(after)
    return torch.cat(befores, dim=1), torch.cat(afters, dim=1)


def _sequential(ir, call, staged: Staged, names) -> dict:
    """(before, after) of the leading states ``names`` by the naive evaluator over their own
    statements alone, token by token."""
    dtype = call.compute_dtype
    step = NaiveStep(ir, call.dim_sizes, dtype, call.device)
    body = staged.statements
    params = {p.name: call.tensors[p.name].to(dtype) for p in ir.params}
    befores = {n: [] for n in names}
    afters = {n: [] for n in names}
    for seq, (start, end) in enumerate(call.segments()):
        rows = slice(seq, seq + 1) if call.packed else slice(None)
        nb = 1 if call.packed else call.batch
        states = {n: call.initial_state(n, rows).to(dtype) for n in names}
        seq_params = {n: p.unsqueeze(0).expand(nb, *p.shape) for n, p in params.items()}
        for t in range(start, end):
            token = {i.name: call.tensors[i.name][:, t].to(dtype) for i in ir.inputs}
            for n in names:
                befores[n].append(states[n])
            step._run(body, {}, token, seq_params, states, {})
            for n in names:
                afters[n].append(states[n])
    return {n: (torch.stack(befores[n], dim=1), torch.stack(afters[n], dim=1)) for n in names}


def run(rule, call, backend: str = "torch-chunk", staged: Staged | None = None,
        force_sequential=False):
    """Outputs ``[B, T, H, *shape]`` and final states ``[N, H, *dims]`` (all states, in
    declaration order) of ``rule`` for a bound ``call``, through its staging."""
    from . import backends
    staged = staged or _staged(rule)
    derived = of_derived(staged.derived)
    ir = rule.ir
    values = leading_values(rule, call, staged, force_sequential)

    tensors = derived_inputs(staged, {v.name: call.tensors[v.name] for v in ir.inputs + ir.params},
                             values)
    initial = None
    if call.initial:
        initial = tuple(call.initial.get(name) for name in staged.rest)
        if all(x is None for x in initial):
            initial = None
    cu = (torch.tensor(call.cu_seqlens, dtype=torch.int64, device=call.device)
          if call.packed else None)
    dcall = derived.bind(initial_state=initial, cu_seqlens=cu, **tensors)
    outputs, finals = backends.resolve(derived, backend, dcall)(derived, dcall)
    finals = dict(zip(staged.rest, finals))
    for lead in staged.leading:
        after = values[lead.name][1]
        pieces = []
        for seq, (start, end) in enumerate(call.segments()):
            rows = slice(seq, seq + 1) if call.packed else slice(None)
            if end == start:  # an empty sequence keeps its initial state
                pieces.append(call.initial_state(lead.name, rows).to(after.dtype))
            else:
                pieces.append(after[:, end - 1])
        finals[lead.name] = torch.cat(pieces, dim=0)
    return tuple(outputs), tuple(finals[v.name] for v in ir.states)


def runner(backend: str):
    """``run`` on one backend, as a registry runner ``(rule, call) -> results``."""
    if backend not in BACKENDS:
        raise ValueError(f"a staged rule runs on {', '.join(BACKENDS)}, not {backend}")
    return lambda rule, call: run(rule, call, backend)


def problem(rule, backend: str):
    """Why ``backend`` cannot run ``rule`` through its staging (None: it can)."""
    from . import backends
    if backend not in BACKENDS:
        return f"a staged rule runs on {', '.join(BACKENDS)} only"
    try:
        staged = _staged(rule)
    except NotStaged as e:
        return f"no staging: {e.reason}"
    reason = backends.problem(of_derived(staged.derived), backend)
    return None if reason is None else f"given {', '.join(s.name for s in staged.leading)} " \
                                       f"per token: {reason}"
