"""``RuleLayer``: a rule as a ``torch.nn.Module``, its params as learnable parameters.

The layer is the recurrence only: projections to q, k, v and gates belong to the model around
it. Params start from the same heuristic as ``recdsl.runtime.sample`` (a param under ``exp``
starts as a log-gate, a scalar one in (0, 1), others normal), deterministic under ``seed``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from .sample import _draw, dim_sizes, value_kinds


class RuleLayer(nn.Module):
    def __init__(self, rule, heads: int, dims: dict | None = None, backend: str = "auto",
                 seed: int = 0, dtype=torch.float32):
        super().__init__()
        self.rule, self.heads, self.backend = rule, heads, backend
        sizes = dim_sizes(rule, dims)
        kinds = value_kinds(rule)
        generator = torch.Generator().manual_seed(seed)
        # parameters live in a dict keyed by the rule's names (validated identifiers)
        self.params = nn.ParameterDict({
            p.name: nn.Parameter(_draw(kinds[p.name], [heads] + [sizes[d] for d in p.dims], generator).to(dtype))
            for p in rule.params})

    def forward(self, *inputs, initial_state=None, output_final_state=False, cu_seqlens=None, **named):
        clash = sorted(set(named) & set(self.params))
        if clash:
            raise InputError(f"{', '.join(clash)} {'is a' if len(clash) == 1 else 'are'} learnable "
                             f"param{'s' if len(clash) > 1 else ''} of this layer; do not pass "
                             f"{'it' if len(clash) == 1 else 'them'}")
        return self.rule(*inputs, initial_state=initial_state, output_final_state=output_final_state,
                         backend=self.backend, cu_seqlens=cu_seqlens, **named, **dict(self.params.items()))

    def step(self, *inputs, state=None, **named):
        return self.rule.step(*inputs, state=state, backend=self.backend, **named,
                              **dict(self.params.items()))

    def extra_repr(self):
        return f"rule={self.rule.name}, heads={self.heads}, backend={self.backend!r}"
