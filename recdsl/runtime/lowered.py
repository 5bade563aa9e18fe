"""Running a rule through its read lowering (``recdsl.ir.reads``) on a chunkwise backend.

``run(rule, call, backend)``:

1. evaluates, for every token at once, the vectors of the reads done before the token's
   updates (``Tokenwise``), and shifts each one token back within each sequence (``p_{t-1} =
   x_t``; zero at a sequence's last token, where it is not used);
2. runs the derived rule (plain reads after the updates) on ``backend`` ("torch-chunk" or
   "chunk") with the same inputs, params and initial states (a vector state's as [K, 1], a
   scalar state's as [1, 1]), plus the shifted vectors and, for lifted vector and scalar
   states, an input of ones;
3. assembles each read's value per token: a read after the update is the derived output; a
   read before it is the derived output of the previous token, and at a sequence's first token
   ``x_0 @ S_init``, computed here (for a direct read of a vector or scalar state, ``S_init``
   itself); a scalar state's read ``one @ w`` ([ONE]) gives its one entry;
4. evaluates the epilogue (each original output over the read values) for all tokens at once.

Everything is torch autograd, so gradients reach inputs, params and initial states.
"""
from __future__ import annotations

import torch

from ..ir.reads import Lowered, lower
from .rule import of_derived
from .tokenwise import Tokenwise

CHUNK_BACKENDS = ("torch-chunk", "chunk")


def _lowered(rule) -> Lowered:
    """The rule's lowering: the one classify found (``rule.family_info.lowered``, once hooked
    in), else computed here once and kept on the rule."""
    cached = getattr(rule.family_info, "lowered", None) or getattr(rule, "_read_lowering", None)
    if cached is None:
        cached = lower(rule.ir)
        rule._read_lowering = cached
    return cached


def run(rule, call, backend: str = "torch-chunk", lowered: Lowered | None = None):
    """Outputs ``[B, T, H, *shape]`` and final states ``[N, H, *dims]`` of ``rule`` for a bound
    ``call``, through the read lowering on the chunk ``backend``."""
    from . import backends  # the registry imports this module's users; import late
    lowered = lowered or _lowered(rule)
    derived = of_derived(lowered.derived)
    ir = rule.ir
    tw = Tokenwise(ir, call)
    dtype = call.compute_dtype
    B, T, H = call.batch, call.time, call.heads
    segments = call.segments()

    # 1. the read vectors of the reads before the update, and their shift one token back
    vectors, shifted = {}, {}
    for r in lowered.reads:
        if r.before:
            if r.vector is None:  # a direct read: the shifted input carries ones
                x = torch.ones(B, T, H, 1, dtype=dtype, device=call.device)
            else:
                x = tw.value(r.vector)  # [B, T, H, D]
            vectors[r.name] = x
            pieces = []
            for start, end in segments:
                pieces.append(x[:, start + 1:end])
                pieces.append(torch.zeros_like(x[:, :1]))
            shifted[r.shifted] = torch.cat(pieces, dim=1)

    # 2. the derived rule on the chunk backend
    tensors = {v.name: call.tensors[v.name] for v in ir.inputs + ir.params}
    tensors.update(shifted)
    if lowered.ones_input is not None:
        tensors[lowered.ones_input] = torch.ones(B, T, H, 1, dtype=dtype, device=call.device)
    vector_states = set(lowered.vector_states)
    scalar_states = set(getattr(lowered, "scalar_states", ()))
    initial = None
    if call.initial:
        initial = tuple(
            None if v.name not in call.initial else
            call.initial[v.name].unsqueeze(-1) if v.name in vector_states else
            call.initial[v.name].unsqueeze(-1).unsqueeze(-1) if v.name in scalar_states else
            call.initial[v.name] for v in ir.states)
    cu = (torch.tensor(call.cu_seqlens, dtype=torch.int64, device=call.device)
          if call.packed else None)
    dcall = derived.bind(initial_state=initial, cu_seqlens=cu, **tensors)
    outputs, finals = backends.resolve(derived, backend, dcall)(derived, dcall)
    derived_out = dict(zip((o.name for o in derived.outputs), outputs))
    finals = tuple(f.squeeze(-1) if v.name in vector_states else
                   f.squeeze(-1).squeeze(-1) if v.name in scalar_states else f
                   for v, f in zip(ir.states, finals))

    # 3. each read's value per token
    for r in lowered.reads:
        value = derived_out[r.name].to(dtype)
        if r.side in ("dot", "scalar"):
            value = value.squeeze(-1)  # [B, T, H, ONE] -> [B, T, H]
        if r.before:
            x = vectors[r.name]
            pieces = []
            for i, (start, end) in enumerate(segments):
                if end == start:
                    continue
                rows = slice(i, i + 1) if call.packed else slice(None)
                s0 = call.initial_state(r.state, rows).to(dtype)  # [B or 1, H, *dims]
                pieces.append(_read(r.side, x[:, start], s0).unsqueeze(1))
                pieces.append(value[:, start:end - 1])
            value = torch.cat(pieces, dim=1)
        tw.bound[r.name] = value.reshape(B * T, *value.shape[2:])

    # 4. the epilogue
    results = tuple(tw.value(lowered.epilogue[o.name]) for o in ir.outputs)
    return results, finals


def _read(side: str, x, state):
    """One token's read of a state: ``x`` [B, H, D], ``state`` [B, H, *dims]."""
    if side == "left":
        return torch.einsum("bhk,bhkv->bhv", x, state)
    if side == "right":
        return torch.einsum("bhkv,bhv->bhk", state, x)
    if side in ("vector", "scalar"):  # the state itself
        return state
    return torch.einsum("bhk,bhk->bh", x, state)


def runner(backend: str):
    """``run`` for one chunk backend, as a registry runner ``(rule, call) -> results``."""
    if backend not in CHUNK_BACKENDS:
        raise ValueError(f"the read lowering runs on {', '.join(CHUNK_BACKENDS)}, not {backend}")
    return lambda rule, call: run(rule, call, backend)


def problem(rule, backend: str):
    """Why ``backend`` cannot run ``rule`` through the read lowering (None: it can)."""
    from ..ir.reads import NotLowerable
    from . import backends
    if backend not in CHUNK_BACKENDS:
        return f"the read lowering runs on {', '.join(CHUNK_BACKENDS)} only"
    try:
        lowered = _lowered(rule)
    except NotLowerable as e:
        return f"no read lowering: {e.reason}"
    return backends.problem(of_derived(lowered.derived), backend)
