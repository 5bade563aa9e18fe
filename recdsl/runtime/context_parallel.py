"""Context parallelism: one rule call split along time over the ranks of a ``torch.distributed``
process group, ``rule(..., cp_group=group)`` (README, "Context parallelism").

Every rank holds a contiguous slice of the tokens. Each state's update is affine in the state,
so the state at the end of a slice is affine in the state at its start, ``S_out = L(S_in) + F``,
and the normal form (``recdsl.ir.affine``) says the shape of ``L`` (``transition``):
elementwise decays give ``L(X) = E ⊙ X``; left factors (row decays, erases ``(D - b kᵀ) S``)
give ``P X``; right ones ``X Q``. Each rank then

1. runs the sequence that continues into its slice (its *head*) from a zero state and from
   probe states (ones; identity column or row blocks) batched along B, with the rule's own
   backend: ``F = run(0)`` and ``L(X) = run(X) - run(0)`` by linearity, no per-family code.
   This pass goes piece by piece along time, carrying the states, and each piece is recomputed
   in backward (``torch.utils.checkpoint``), so its memory is one piece's, not the slice's;
2. runs the sequences that start inside its slice from their own initial states (exact as is);
3. all-gathers every rank's ``(L, F, finals)`` in ONE differentiable collective
   (``torch.distributed.nn.functional.all_gather``: its backward sends each rank the sum of
   the gradients of its summaries), so forward and backward each make one collective call;
4. composes, in fp32 (fp64 for fp64 calls), the state entering every rank and every
   sequence's final state, the same on every rank;
5. reruns its head from its true incoming state: its outputs are then exact.

Packed sequences (``cu_seqlens``, global positions, B = 1): only the sequence running into a
slice's start takes an incoming state, and a sequence starting inside a slice cuts the chain.

A staged rule (``recdsl.ir.stages``: mLSTM's stabiliser ``m = max(a + m, b)``) goes stage by
stage: the max-plus leading states first (a slice's summary is ``max(A + m_in, B)``, composed
in float64), then the derived affine rule, as above, given every token's leading values. Its
all-gather is tied to the leading one, so that on every rank the backward of the second comes
first. A state that is neither affine nor a max-plus leading state is refused.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..errors import BackendError, InputError

PIECE = 1024  # tokens of one recomputed piece of the summary pass (step 1): memory vs launches


# ----------------------------------------------------------------------------- transitions

def transitions(rule) -> dict:
    """State name -> the shape of its slice transition: "hadamard", "left" or "right". Raises
    BackendError when a state's update is not affine or mixes left and right factors."""
    out = {}
    for sa in rule.analysis.states.values():
        if not sa.affine:
            raise BackendError(
                f"rule '{rule.name}' cannot run with cp_group: the update of state {sa.name} is not "
                f"affine in the states ({sa.problem.message}), so a slice's effect on the state "
                f"has no summary to exchange; run it on one process (cp_group=None)")
        if all(f.elementwise for f in sa.factors):
            out[sa.name] = "hadamard"
            continue
        sides = set()
        for f in sa.factors:
            for part in (f, f.diag) if f.kind == "rank_one" else (f,):
                if part is None or part.kind == "scalar":
                    continue
                sides.add({"rank_one": part.side, "rows": "left", "cols": "right"}.get(part.kind, "both"))
        if len(sides) != 1 or "both" in sides or sa.var.rank > 2:
            raise BackendError(
                f"rule '{rule.name}' cannot run with cp_group: the transition of state {sa.name} "
                f"multiplies it from both sides (or mixes per-entry decays with rank-one factors), "
                f"which has no compact summary; run it on one process (cp_group=None)")
        out[sa.name] = sides.pop()
    return out


def _matrix(shape) -> tuple:
    """A state's per-head shape seen as a matrix [R, C] (a vector is a column, a scalar 1 x 1)."""
    return (tuple(shape) + (1, 1))[:2]


def _probe_count(kind, rows, cols) -> int:
    return {"hadamard": 1, "left": math.ceil(rows / cols), "right": math.ceil(cols / rows)}[kind]


def _probes(kind, shape, count, dtype, device):
    """``count`` probe states [count, *shape]: ones (hadamard); identity column blocks (left:
    ``P X_j`` is columns j*C.. of P); identity row blocks (right: ``X_j Q`` is rows j*R.. of Q).
    Probes past the state's own count are zero."""
    rows, cols = _matrix(shape)
    x = torch.zeros(count, rows, cols, dtype=dtype, device=device)
    if kind == "hadamard":
        x[0] = 1
    elif kind == "left":
        eye = torch.eye(rows, dtype=dtype, device=device)
        for j in range(_probe_count(kind, rows, cols)):
            block = eye[:, j * cols:(j + 1) * cols]
            x[j, :, :block.shape[1]] = block
    else:
        eye = torch.eye(cols, dtype=dtype, device=device)
        for j in range(_probe_count(kind, rows, cols)):
            block = eye[j * rows:(j + 1) * rows]
            x[j, :block.shape[0]] = block
    return x.reshape(count, *shape)


def _assemble(kind, shape, responses):
    """L from the probes' responses ``L(X_j)`` [count, N, H, *shape]: E [N, H, *shape],
    P [N, H, R, R] or Q [N, H, C, C]."""
    rows, cols = _matrix(shape)
    if kind == "hadamard":
        return responses[0]
    count, n, h = responses.shape[:3]
    y = responses.reshape(count, n, h, rows, cols)
    if kind == "left":  # columns of P, block after block
        return y.permute(1, 2, 3, 0, 4).reshape(n, h, rows, count * cols)[..., :rows]
    return y.permute(1, 2, 0, 3, 4).reshape(n, h, count * rows, cols)[:, :, :cols]


def _summary_shape(kind, shape) -> tuple:
    rows, cols = _matrix(shape)
    return {"hadamard": tuple(shape), "left": (rows, rows), "right": (cols, cols)}[kind]


def _apply(kind, summary, x):
    """L(x) for states x [N, H, *shape]."""
    if kind == "hadamard":
        return summary * x
    n, h = x.shape[:2]
    rows, cols = _matrix(x.shape[2:])
    m = x.reshape(n, h, rows, cols)
    return (summary @ m if kind == "left" else m @ summary).reshape(x.shape)


# ----------------------------------------------------------------------------- the call

class _Layout:
    """Which sequences each rank continues (head) and starts (rest), from the slice lengths
    and the global ``cu_seqlens``; the same on every rank."""

    def __init__(self, lengths, batch, cu):
        self.offsets = [0]
        for t in lengths:
            self.offsets.append(self.offsets[-1] + t)
        self.cu = cu
        self.head, self.rest, self.head_len, self.local_cu = [], [], [], []
        for r, t in enumerate(lengths):
            start, end = self.offsets[r], self.offsets[r + 1]
            if cu is None:  # every row runs through every slice
                rows = list(range(batch))
                self.head.append(rows if r > 0 else [])
                self.rest.append(rows if r == 0 else [])
                self.head_len.append(t if r > 0 else 0)
                self.local_cu.append(None)
                continue
            head = [n for n in range(len(cu) - 1) if cu[n] < start < cu[n + 1]]
            h = min(cu[head[0] + 1], end) - start if head else 0
            rest = [n for n in range(len(cu) - 1) if start <= cu[n] < end and cu[n + 1] > cu[n]]
            self.head.append(head)
            self.head_len.append(h)
            self.rest.append(rest)
            self.local_cu.append([start + h] + [min(cu[n + 1], end) for n in rest])


class _Split:
    """Where this call's tokens sit: the group, this rank, the layout, sizes and precision."""

    def __init__(self, **values):
        self.__dict__.update(values)


def call(rule, inputs, named, *, cp_group, initial_state=None, output_final_state=False,
         backend="auto", cu_seqlens=None, precision="auto"):
    """``rule(*inputs, **named, cp_group=...)``: this rank's slice of the outputs, and with
    ``output_final_state`` the global final states (see the module docstring)."""
    staging = _staging(rule)
    if staging is None:
        kinds = transitions(rule)
    else:
        from .rule import of_derived
        kinds = transitions(of_derived(staging.derived))
    if not dist.is_available() or not dist.is_initialized():
        raise InputError("cp_group was given but torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group first (or pass cp_group=None)")
    bound = rule.bind(*inputs, **named)  # checks the local tensors; cu_seqlens are global
    world, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    given = [t for t in (initial_state if isinstance(initial_state, (tuple, list)) else [initial_state])
             if isinstance(t, torch.Tensor)]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in list(bound.tensors.values()) + given)
    meta = torch.tensor([bound.time, bound.batch, bound.heads, grad], dtype=torch.int64,
                        device=bound.device)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=cp_group)
    # a rank needing no gradient still joins the collectives of the backward of those that do
    needs_grad = any(bool(m[3]) for m in metas)
    metas = [m.tolist()[:3] for m in metas]
    if any(m[1:] != metas[0][1:] for m in metas):
        raise InputError(f"the ranks of cp_group disagree on B or H: [T, B, H] per rank = {metas}; "
                         f"every rank passes its slice of T with the same B and H")
    if any(m[0] == 0 for m in metas):
        raise InputError(f"a rank of cp_group has no token (slice lengths {[m[0] for m in metas]}); "
                         f"give every rank at least one token")
    lengths = [m[0] for m in metas]
    cu = _global_cu(cu_seqlens, bound.batch, sum(lengths))
    sequences = len(cu) - 1 if cu is not None else bound.batch
    shapes = {s.name: [bound.dim_sizes[d] for d in s.dims] for s in rule.ir.states}
    initial = _initial(rule, initial_state, sequences, bound, shapes)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in
                                 list(bound.tensors.values()) + initial) else torch.float32
    split = _Split(group=cp_group, world=world, rank=rank, layout=_Layout(lengths, bound.batch, cu),
                   cu=cu, sequences=sequences, dtype=dtype, device=bound.device, heads=bound.heads,
                   rows=bound.batch if cu is None else 1,  # rows of a head: B, or one sequence
                   dim_sizes=bound.dim_sizes, needs_grad=needs_grad)
    initial = {s.name: t.to(dtype) for s, t in zip(rule.ir.states, initial)}
    options = {"backend": backend, "precision": precision}  # for every call on a piece
    if staging is None:
        outputs, finals, gathered = _affine(rule, kinds, bound.tensors, initial, split, options)
    else:
        outputs, finals, gathered = _staged(rule, staging, kinds, bound.tensors, initial, split,
                                            options)
    if needs_grad:
        # every rank's backward must reach the collective, even where no output depends on it
        outputs = tuple(_Tie.apply(o, gathered) for o in outputs)
    outputs = tuple(o.to(bound.output_dtype) for o in outputs)
    out = outputs[0] if len(outputs) == 1 else outputs
    final = None
    if output_final_state:
        finals = [finals[s.name] for s in rule.ir.states]
        final = finals[0] if len(finals) == 1 else tuple(finals)
    return out, final


def _local_cu(split, skip_head: bool):
    """This rank's local ``cu_seqlens`` (a tensor; None unpacked): of the sequences starting in
    its slice, or (``skip_head`` False) of its head and those."""
    layout, rank = split.layout, split.rank
    if split.cu is None:
        return None
    bounds = layout.local_cu[rank]
    if not skip_head and layout.head_len[rank]:
        bounds = [bounds[0] - layout.head_len[rank]] + bounds
    return torch.tensor([c - bounds[0] for c in bounds], device=split.device)


def _affine(rule, kinds, tensors, initial, split, options, anchor=None):
    """Steps 1 to 5 for a rule whose states are all affine: (outputs, final states by name, the
    all-gather's first tensor). ``anchor``: a tensor the summaries are tied to before they go
    round, so that its collective's backward comes after this one's on every rank."""
    states = rule.ir.states
    shapes = {s.name: [split.dim_sizes[d] for d in s.dims] for s in states}
    dtype, device, rank = split.dtype, split.device, split.rank
    layout = split.layout
    params = {v.name: tensors[v.name] for v in rule.ir.params}
    tokens = {v.name: tensors[v.name] for v in rule.ir.inputs}
    head, rest, h = layout.head[rank], layout.rest[rank], layout.head_len[rank]

    # 1. the head's summary (L, F) per state; 2. the sequences starting here, exact
    summary = None
    if h:
        summary = _summarise(rule, options, kinds, shapes, {n: x[:, :h] for n, x in tokens.items()},
                             params, dtype, device)
    rest_out, rest_final = None, None
    if rest:
        out, final = rule(**{n: x[:, h:] for n, x in tokens.items()}, **params,
                          initial_state=tuple(initial[s.name][rest] for s in states),
                          output_final_state=True, **options,
                          cu_seqlens=_local_cu(split, skip_head=True))
        rest_out, rest_final = _tuple(out), _tuple(final)

    # 3. one all-gather of every rank's (L, F) of its head and finals of the sequences it starts
    parts = []
    for i, s in enumerate(states):
        kind, shape = kinds[s.name], shapes[s.name]
        lshape = [split.rows, split.heads, *_summary_shape(kind, shape)]
        fshape = [split.rows, split.heads, *shape]
        parts.append(summary[0][i] if summary else torch.zeros(lshape, dtype=dtype, device=device))
        parts.append(summary[1][i] if summary else torch.zeros(fshape, dtype=dtype, device=device))
        finals = torch.zeros([split.sequences, split.heads, *shape], dtype=dtype, device=device)
        if rest:
            finals = finals.index_copy(0, torch.tensor(rest, device=device), rest_final[i].to(dtype))
        parts.append(finals)
    sizes = [p.shape for p in parts]
    flat = torch.cat([p.reshape(-1) for p in parts])
    if anchor is not None and split.needs_grad:
        flat = _Tie.apply(flat, anchor)
    gathered = _all_gather(flat, split.group, split.needs_grad)

    # 4. compose, in the same order on every rank
    current = [initial[s.name] for s in states]
    incoming = None
    for r in range(split.world):
        pieces = list(torch.split(gathered[r], [math.prod(z) for z in sizes]))
        pieces = [p.reshape(z) for p, z in zip(pieces, sizes)]
        if r == rank and layout.head[r]:
            incoming = [c[layout.head[r]] for c in current]
        if layout.head[r]:
            rows = torch.tensor(layout.head[r], device=device)
            current = [c.index_copy(0, rows, _apply(kinds[s.name], pieces[3 * i], c[rows])
                                    + pieces[3 * i + 1])
                       for i, (s, c) in enumerate(zip(states, current))]
        if layout.rest[r]:
            rows = torch.tensor(layout.rest[r], device=device)
            current = [c.index_copy(0, rows, pieces[3 * i + 2][rows]) for i, c in enumerate(current)]

    # 5. the head again from its true incoming state
    outs = []
    if h:
        out, _ = rule(**{n: x[:, :h] for n, x in tokens.items()}, **params,
                      initial_state=tuple(incoming), **options)
        outs.append(_tuple(out))
    if rest:
        outs.append(rest_out)
    outputs = tuple(torch.cat(o, dim=1) if len(o) > 1 else o[0] for o in zip(*outs))
    return outputs, {s.name: c for s, c in zip(states, current)}, gathered[0]


# ----------------------------------------------------------------------------- staged rules

def _staging(rule):
    """The rule's staging when some state is not affine (None when all are); refuses a rule
    with no staging, or whose leading states are not max-plus."""
    if all(sa.affine for sa in rule.analysis.states.values()):
        return None
    staging = rule.family_info.staged
    bad = next((l for l in staging.leading if l.form != "maxplus"), None) if staging else None
    if staging is None:
        transitions(rule)  # raises, naming the state that is not affine
    if bad is not None:
        raise BackendError(f"rule '{rule.name}' cannot run with cp_group: its leading state "
                           f"{bad.name} is not max-plus ({bad.why}); run it on one process")
    return staging


def _staged(rule, staging, kinds, tensors, initial, split, options):
    """A staged rule (mLSTM): every leading state ``m = max(a + m, b)`` first, summarised per
    slice as ``m_out = max(A + m_in, B)`` (A the sum of a, B the slice from m_in = -inf), the
    summaries all-gathered and composed in float64; then each rank's leading values per token
    from its true incoming m (``recdsl.runtime.staged.leading_values``), and the derived affine
    rule through ``_affine`` with them as inputs."""
    from .call import BoundCall
    from .rule import of_derived
    from .staged import _broadcast, derived_inputs, leading_values
    from .tokenwise import Tokenwise
    wide = torch.float64
    layout, rank, device = split.layout, split.rank, split.device
    head, rest, h = layout.head[rank], layout.rest[rank], layout.head_len[rank]
    local = rule.bind(**tensors)  # the slice unpacked: the per-token values need no packing
    tw = Tokenwise(rule.ir, local)
    bounds = _local_cu(split, skip_head=True)
    bounds = [0, local.time] if bounds is None else [b + h for b in bounds.tolist()]
    parts, sizes = [], []
    for lead in staging.leading:
        dims = rule.ir.var(lead.name).dims
        b = _broadcast(tw.value(lead.b), local, dims, wide)
        a = (torch.zeros_like(b) if lead.a is None
             else lead.a_sign * _broadcast(tw.value(lead.a), local, dims, wide))

        def summary(start, end):  # (A, B) of tokens [start, end)
            total = a[:, start:end].cumsum(1)
            return total[:, -1], total[:, -1] + (b[:, start:end] - total).max(1).values

        shape = [split.rows, split.heads, *[split.dim_sizes[d] for d in dims]]
        A, B = summary(0, h) if h else (torch.zeros(shape, dtype=wide, device=device),) * 2
        finals = torch.zeros([split.sequences, *shape[1:]], dtype=wide, device=device)
        segments = ([(rest, 0, local.time)] if split.cu is None and rest else
                    [([n], start, end) for n, start, end in zip(rest, bounds[:-1], bounds[1:])])
        for rows, start, end in segments:  # the sequences starting here, from their initial m
            A_n, B_n = summary(start, end)
            value = torch.maximum(A_n + initial[lead.name][rows].to(wide), B_n)
            finals = finals.index_copy(0, torch.tensor(rows, device=device), value)
        parts += [A, B, finals]
        sizes += [A.shape, B.shape, finals.shape]
    gathered = _all_gather(torch.cat([p.reshape(-1) for p in parts]), split.group,
                           split.needs_grad)

    current = {lead.name: initial[lead.name].to(wide) for lead in staging.leading}
    incoming = {}
    for r in range(split.world):
        pieces = list(torch.split(gathered[r], [math.prod(z) for z in sizes]))
        pieces = [p.reshape(z) for p, z in zip(pieces, sizes)]
        for i, lead in enumerate(staging.leading):
            c = current[lead.name]
            if r == rank and layout.head[r]:
                incoming[lead.name] = c[layout.head[r]]
            if layout.head[r]:
                rows = torch.tensor(layout.head[r], device=device)
                c = c.index_copy(0, rows, torch.maximum(pieces[3 * i] + c[rows], pieces[3 * i + 1]))
            if layout.rest[r]:
                rows = torch.tensor(layout.rest[r], device=device)
                c = c.index_copy(0, rows, pieces[3 * i + 2][rows])
            current[lead.name] = c

    # the leading values of every token of this slice, from the true incoming m
    start_rows = [incoming[lead.name] if h else None for lead in staging.leading]
    leading_initial = []
    for var in rule.ir.states:
        lead = next((i for i, l in enumerate(staging.leading) if l.name == var.name), None)
        if lead is None:
            leading_initial.append(None)
            continue
        own = initial[var.name][rest] if rest else None
        rows = [x for x in (start_rows[lead], own) if x is not None]
        leading_initial.append(torch.cat(rows).to(split.dtype))
    call = BoundCall(rule.ir, (), dict(tensors), tuple(leading_initial),
                     _local_cu(split, skip_head=False))
    values = leading_values(rule, call, staging)
    derived_tensors = derived_inputs(staging, tensors, values)
    derived = of_derived(staging.derived)
    outputs, finals, last = _affine(derived, kinds, derived_tensors,
                                    {n: initial[n] for n in staging.rest}, split, options,
                                    anchor=gathered[0])
    finals.update({n: c.to(split.dtype) for n, c in current.items()})
    return outputs, finals, last


def _summarise(rule, options, kinds, shapes, tokens, params, dtype, device):
    """(L per state, F per state) of the head ``tokens`` [N, h, H, ...]: runs from the zero state
    and from the probes, batched along B, piece by piece (recomputed in backward)."""
    n, heads = next(iter(tokens.values())).shape[0], next(iter(tokens.values())).shape[2]
    names = list(shapes)
    counts = {s: _probe_count(kinds[s], *_matrix(shapes[s])) for s in names}
    count = max(counts.values())
    carry = []
    for s in names:
        probes = _probes(kinds[s], shapes[s], count, dtype, device)
        start = torch.cat([torch.zeros_like(probes[:1]), probes])  # [1 + count, *shape]
        carry.append(start[:, None, None].expand(1 + count, n, heads, *shapes[s])
                     .reshape((1 + count) * n, heads, *shapes[s]))
    length = next(iter(tokens.values())).shape[1]
    recompute = torch.is_grad_enabled() and any(
        t.requires_grad for t in list(tokens.values()) + list(params.values()))
    token_names = list(tokens)

    def piece(*args):
        xs = dict(zip(token_names, args[:len(token_names)]))
        ps = dict(zip(params, args[len(token_names):len(token_names) + len(params)]))
        init = args[len(token_names) + len(params):]
        xs = {k: x.repeat(1 + count, *[1] * (x.dim() - 1)) for k, x in xs.items()}
        _, final = rule(**xs, **ps, initial_state=tuple(init), output_final_state=True,
                        **options)
        return tuple(f.to(dtype) for f in _tuple(final))

    for start in range(0, length, PIECE):
        args = [tokens[k][:, start:start + PIECE] for k in token_names] + list(params.values()) + carry
        if recompute:
            from torch.utils.checkpoint import checkpoint
            carry = list(checkpoint(piece, *args, use_reentrant=False))
        else:
            carry = list(piece(*args))
    ls, fs = [], []
    for s, y in zip(names, carry):
        y = y.reshape(1 + count, n, heads, *shapes[s])
        fs.append(y[0])
        ls.append(_assemble(kinds[s], shapes[s], y[1:] - y[:1]))
    return ls, fs


def previous_tokens(streams: dict, count: int, group) -> dict:
    """For each stream ``[B, T, C]`` (this rank's slice), the ``count`` tokens just before the
    slice ``[B, count, C]``: the previous ranks' last ones, zeros before the first token (a short
    convolution's cache). One differentiable all-gather for all streams."""
    names = list(streams)
    x = torch.cat([streams[n] for n in names], dim=-1)
    batch, time, width = x.shape
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    lengths = [torch.empty(1, dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([time], dtype=torch.int64, device=x.device), group=group)
    lengths = [min(int(t), count) for t in lengths]
    tail = torch.cat([x.new_zeros(batch, count - lengths[rank], width), x[:, time - lengths[rank]:]], 1)
    tails = _all_gather(tail, group, torch.is_grad_enabled() and tail.requires_grad)
    # the previous ranks' real tokens in order (a rank shorter than count gives fewer), last count
    before = [x.new_zeros(batch, count, width)] + [tails[r][:, count - lengths[r]:] for r in range(rank)]
    out = torch.cat(before, 1)[:, -count:]
    if torch.is_grad_enabled() and tails[0].requires_grad:
        out = _Tie.apply(out, tails[0])  # rank 0 too joins the backward collective
    return dict(zip(names, torch.split(out, [streams[n].shape[-1] for n in names], dim=-1)))


def _all_gather(x, group, differentiable: bool) -> list:
    """Every rank's ``x``, in rank order; ``differentiable`` (the same on every rank): its
    backward sends each rank the sum of the gradients of its tensor (all-to-all on gloo)."""
    x = x.contiguous()
    if differentiable and not x.requires_grad:  # made from nothing that needs a gradient here
        x = x.detach().requires_grad_()
    if not differentiable:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x, group=group)
        return out
    import warnings
    from torch.distributed.nn.functional import all_gather
    with warnings.catch_warnings():  # deprecated for a private API; still the public one
        warnings.simplefilter("ignore", FutureWarning)
        return list(all_gather(x, group=group))


class _Tie(torch.autograd.Function):
    """``x`` unchanged, with ``anchor`` in its graph (zero gradient): puts the all-gather's
    backward in every rank's graph, so that every rank joins its collective."""

    @staticmethod
    def forward(ctx, x, anchor):
        ctx.anchor_shape = anchor.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.anchor_shape)


def _tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _global_cu(cu, batch, total):
    """The global ``cu_seqlens`` as a list, checked against the global length."""
    if cu is None:
        return None
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        raise InputError("cu_seqlens must be a 1-d int32 or int64 tensor of sequence boundaries "
                         "over the whole (global) sequence, e.g. torch.tensor([0, 5, 12])")
    if batch != 1:
        raise InputError(f"with cu_seqlens the batch size must be 1 (sequences packed along T); "
                         f"got B = {batch}")
    values = cu.tolist()
    if len(values) < 2 or values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
        raise InputError(f"with cp_group, cu_seqlens are global: they must rise from 0 to the sum "
                         f"of the ranks' slice lengths, T = {total}; got {values}")
    return values


def _initial(rule, initial_state, sequences, bound, shapes) -> list:
    """The global initial states, one [N, H, *dims] tensor per state (zeros where not given)."""
    states = rule.ir.states
    if initial_state is None:
        initial_state = (None,) * len(states)
    if isinstance(initial_state, torch.Tensor) and len(states) == 1:
        initial_state = (initial_state,)
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != len(states):
        raise InputError(f"initial_state must be a tensor per state ({', '.join(s.name for s in states)}) "
                         f"or None")
    out = []
    for s, t in zip(states, initial_state):
        expected = [sequences, bound.heads] + shapes[s.name]
        if t is None:
            t = torch.zeros(expected, dtype=torch.float32, device=bound.device)
        if not isinstance(t, torch.Tensor) or list(t.shape) != expected:
            given = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"initial state '{s.name}' must be the global initial state "
                             f"{expected} ([N or B, H, *dims]) on every rank of cp_group; got {given}")
        out.append(t)
    return out
