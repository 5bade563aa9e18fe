"""Long calls in windows of tokens, one after the other, the final states of one window the
initial states of the next: the same algebra, with temporaries the size of a window. Fresh
whole-sequence temporaries are fresh pages on every call (glibc returns large freed blocks to
the system), whose page faults cost as much as the arithmetic; a window's are memory the
allocator hands out again, and stay in the caches."""
from __future__ import annotations

import torch


def run_in_windows(run, rule, call, length):
    """``run(window) -> (outputs, final states)`` over the windows ``[first, first + length)``
    of every sequence; outputs joined in the call's token order."""
    states = None
    pieces = []  # (outputs, token positions in the call or None)
    longest = max(end - start for start, end in call.segments())
    for first in range(0, longest, length):
        window = Window(call, first, length, states)
        outputs, states = run(window)
        pieces.append((outputs, window.positions))
    outputs = [torch.cat([out[i] for out, _ in pieces], dim=1) for i in range(len(rule.outputs))]
    if call.packed:  # the windows' tokens in the call's order
        order = torch.argsort(torch.cat([at for _, at in pieces])).to(call.device)
        outputs = [o.index_select(1, order) for o in outputs]
    return outputs, states


class Window:
    """The tokens ``[first, first + length)`` of every sequence of a call, as a call (what
    ``_Run`` reads of one): the token inputs sliced (packed sequences: each sequence's part,
    possibly empty, packed again), the initial states those given or carried in."""

    def __init__(self, call, first, length, states):
        self.rule, self.heads, self.dim_sizes = call.rule, call.heads, call.dim_sizes
        self.device, self.compute_dtype = call.device, call.compute_dtype
        self.packed, self.num_sequences = call.packed, call.num_sequences
        self.batch = call.batch
        inputs = {v.name for v in call.rule.inputs}
        if call.packed:
            parts = [(min(start + first, end), min(start + first + length, end))
                     for start, end in call.segments()]
            self.positions = torch.cat([torch.arange(a, b) for a, b in parts])
            self.cu_seqlens = [0]
            for a, b in parts:
                self.cu_seqlens.append(self.cu_seqlens[-1] + b - a)
            at = self.positions.to(call.device)
            take = lambda t: t.index_select(1, at)
            self.time = self.cu_seqlens[-1]
        else:
            self.positions = None
            take = lambda t: t[:, first:first + length]
            self.time = min(length, call.time - first)
        self.tensors = {name: take(t) if name in inputs else t for name, t in call.tensors.items()}
        self.initial = None if states is None else dict(zip((s.name for s in call.rule.states), states))
        self.call = call

    def segments(self):
        if self.packed:
            return list(zip(self.cu_seqlens[:-1], self.cu_seqlens[1:]))
        return [(0, self.time)]

    def initial_state(self, name, rows=slice(None)):
        if self.initial is None:
            return self.call.initial_state(name, rows)
        return self.initial[name][rows]
