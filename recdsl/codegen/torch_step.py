"""One token of a rule as PyTorch source: the forward step, or the forward step followed by
its adjoint (what ``recdsl show --grad`` prints and ``recdsl compile`` writes out).

The function takes one argument per ``Source`` of the program, in program order (inputs,
slices ``k[j]`` of stepped inputs, params, states, then upstream gradients of the outputs and
final states), each batched ``[B, H, *shape]``; it returns the gradients of the inputs,
params and initial states (None where none reaches), then the outputs and final states.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.checked import CheckedRule
from ..ir.ssa import Source, lower
from ..ir.vjp import adjoint
from .printers import torch_program


@dataclass
class StepSource:
    source: str
    name: str
    sources: list  # the Source ops, in argument order
    results: list  # names of the returned values, in order
    program: object  # the ssa Program printed


def step_source(rule: CheckedRule, dim_sizes: dict, grad: bool = True, fuse: bool = False) -> StepSource:
    """``fuse``: sums of products as einsums (``printers.fused_sums``)."""
    forward = lower(rule, dim_sizes)
    if not grad:
        program = forward
        results = list(forward.outputs.values()) + list(forward.states_out.values())
        labels = [f"{n}" for n in forward.outputs] + [f"final {n}" for n in forward.states_out]
        name = f"rule_{rule.name}_step"
    else:
        adj = adjoint(forward)
        program = adj.program
        results = ([adj.grad_inputs.get(k) for k in program.inputs]
                   + [adj.grad_params.get(p) for p in program.params]
                   + [adj.grad_states_in.get(s) for s in program.states_in]
                   + list(program.outputs.values()) + list(program.states_out.values()))
        labels = ([f"d{n}" + (f"[{j}]" if j is not None else "") for n, j in program.inputs]
                  + [f"d{p}" for p in program.params] + [f"d{s} (initial)" for s in program.states_in]
                  + [f"{n}" for n in program.outputs] + [f"final {n}" for n in program.states_out])
        name = f"rule_{rule.name}_step_backward"
    sources = [op for op in program.ops if isinstance(op, Source)]
    text = torch_program(program, name, [s.out for s in sources], results, dim_sizes, fuse)
    header = (f"# rule {rule.name}: one token, batched [B, H, ...]; dims "
              + ", ".join(f"{d}={n}" for d, n in dim_sizes.items())
              + f"\n# returns: {', '.join(labels)}\n")
    return StepSource(header + text, name, sources, labels, program)
