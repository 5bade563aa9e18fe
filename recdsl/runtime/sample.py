"""Random tensors for any rule: inputs and params that keep a rule stable over long sequences.

Used by ``recdsl run``, the tests and (later) the autotester, so that every rule can be run
without hand-written input code. The values follow a heuristic read off the rule's text, in
the spirit of how the canonical models feed their rules:

* **log-gates** -- a token input or param that stands directly as the argument of ``exp``
  (``g`` in ``exp(g)``, ``gk`` in ``diag(exp(gk))``, ``A_log`` in ``exp(A_log)``) gets
  ``logsigmoid(randn)``: negative values, so ``exp`` of it is a decay in (0, 1) (for ``A_log``
  the decay ``exp(-exp(A_log) * dt)`` is then in (0, 1) too);
* **unit scalars** -- every other input or param that is a scalar per token and head (``beta``,
  ``eta``, ``dt``, ``gamma``, ...) gets ``uniform(0.05, 0.95)``: write strengths and step sizes
  inside (0, 1) keep the delta rules' transitions contractive;
* **vectors and matrices** (``q``, ``k``, ``v``, router logits) get ``randn``.

An input declared ``beta[NH]`` and read as ``beta[j]`` inside ``for j in NH`` counts as what
the loop reads, a scalar; ``k[NH, K]`` read as ``k[j]`` is a vector.

Sizes: every dim is 32, except a dim that a ``for`` loop runs over (``NH``), which is 2;
``dims={"K": 48}`` overrides any of them. Values are drawn in float64 from a generator seeded
with ``seed`` in declaration order, then cast, so float32 and float64 runs see the same numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import RecdslError
from ..grammar import ast
from ..ir.checked import CheckedRule

DEFAULT_DIM = 32
DEFAULT_LOOP_DIM = 2

# The three kinds of values, named by how they are drawn.
LOG_GATE, UNIT, NORMAL = "logsigmoid(randn)", "uniform(0.05, 0.95)", "randn"


def _checked(rule) -> CheckedRule:
    """Accept a ``Rule`` or a ``CheckedRule``."""
    return getattr(rule, "ir", rule)


def _expressions(rule: CheckedRule):
    yield from ast.walk_body_expressions(rule.body)


def _variable(e):
    """The input or param an expression names directly (``g`` or ``beta[j]``), else None."""
    if isinstance(e, ast.Name) and e.kind in ("input", "param"):
        return e.id
    if isinstance(e, ast.Index):
        return e.target.id
    return None


def value_kinds(rule) -> dict:
    """The heuristic as data: input or param name -> LOG_GATE, UNIT or NORMAL."""
    rule = _checked(rule)
    exp_args, indexed = set(), set()
    for e in _expressions(rule):
        if isinstance(e, ast.Call) and e.fn == "exp" and _variable(e.args[0]):
            exp_args.add(_variable(e.args[0]))
        if isinstance(e, ast.Index):
            indexed.add(e.target.id)
    kinds = {}
    for var in rule.inputs + rule.params:
        per_step_rank = var.rank - (1 if var.name in indexed else 0)
        kinds[var.name] = LOG_GATE if var.name in exp_args else UNIT if per_step_rank == 0 else NORMAL
    return kinds


def dim_sizes(rule, dims: dict | None = None) -> dict:
    """The size of every dim: 32, or 2 for a dim a ``for`` loop runs over, or ``dims[name]``."""
    return _checked(rule).dim_sizes(dims, DEFAULT_DIM, DEFAULT_LOOP_DIM)


def _positive(**counts):
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RecdslError(f"{name} must be a positive whole number, not {value!r}")


def _draw(kind, shape, generator):
    if kind == LOG_GATE:
        return F.logsigmoid(torch.randn(shape, generator=generator, dtype=torch.float64))
    if kind == UNIT:
        return 0.05 + 0.9 * torch.rand(shape, generator=generator, dtype=torch.float64)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def sample_inputs(rule, batch=2, time=64, heads=2, dims=None, dtype=torch.float32, seed=0,
                  device="cpu") -> dict:
    """Random inputs and params for ``rule``, by name, in the call contract's layouts:
    token inputs ``[batch, time, heads, *dims]``, params ``[heads, *dims]``. Pass them as
    ``rule(**sample_inputs(rule))``. See the module docstring for how values are chosen."""
    rule = _checked(rule)
    _positive(batch=batch, time=time, heads=heads)
    sizes = dim_sizes(rule, dims)
    kinds = value_kinds(rule)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for var in rule.inputs + rule.params:
        lead = [batch, time, heads] if var.kind == "input" else [heads]
        shape = lead + [sizes[d] for d in var.dims]
        out[var.name] = _draw(kinds[var.name], shape, generator).to(dtype=dtype, device=device)
    return out


def sample_initial_state(rule, batch=2, heads=2, dims=None, dtype=torch.float32, seed=0,
                         device="cpu"):
    """A random (randn) initial state ``[batch, heads, *dims]`` per state, in the contract's
    form: a tensor when the rule has one state, else a tuple in declaration order. Drawn from
    its own generator (seeded with ``seed + 1``), so it does not shift the inputs' values."""
    rule = _checked(rule)
    _positive(batch=batch, heads=heads)
    sizes = dim_sizes(rule, dims)
    generator = torch.Generator().manual_seed(seed + 1)
    states = tuple(
        torch.randn([batch, heads] + [sizes[d] for d in s.dims], generator=generator,
                    dtype=torch.float64).to(dtype=dtype, device=device)
        for s in rule.states)
    return states[0] if len(states) == 1 else states
