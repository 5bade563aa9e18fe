"""``Rule``: a compiled rule, callable on tensors. It binds and checks the call, picks a
backend and returns ``(outputs, final_state)`` in the contract's form."""
from __future__ import annotations

from pathlib import Path

from ..errors import BackendError, RecdslError
from ..grammar.parser import parse
from ..ir.checked import CheckedRule
from ..ir.checker import check
from ..ir.family import classify
from . import backends
from .call import BoundCall


class Rule:
    """A checked rule. Call it with tensors (see README, "The call contract")."""

    def __init__(self, checked: CheckedRule):
        self.ir = checked
        self.name = checked.name
        family = classify(checked)
        self.family_info = family  # every planner's verdict (recdsl.ir.family.Family)
        self.family = family.name  # "delta", "diagonal", "scan" or "recurrent"
        # what was recognised, or why the rule has no chunkwise form (with file:line:col)
        self.family_reason = (family.reason if family.pos is None
                              else f"{family.reason} ({family.where(checked.filename)})")
        self.analysis = family.analysis

    # names, in declaration order
    @property
    def dims(self):
        return self.ir.dims

    @property
    def inputs(self):
        return self.ir.inputs

    @property
    def params(self):
        return self.ir.params

    @property
    def states(self):
        return self.ir.states

    @property
    def outputs(self):
        return self.ir.outputs

    @property
    def consts(self):
        return dict(self.ir.consts)

    def backends(self, device=None) -> list:
        """The backends that would run this rule on ``device`` ("cpu", the default, or
        "cuda"), best first, naive last; "cuda" is answered on any machine."""
        return backends.available(self, device)

    def bind(self, *inputs, initial_state=None, cu_seqlens=None, **named) -> BoundCall:
        return BoundCall(self.ir, inputs, named, initial_state, cu_seqlens)

    def __call__(self, *inputs, initial_state=None, output_final_state=False, backend="auto",
                 cu_seqlens=None, **named):
        call = self.bind(*inputs, initial_state=initial_state, cu_seqlens=cu_seqlens, **named)
        run = backends.resolve(self, backend, call)
        outputs, finals = run(self, call)
        outputs = tuple(o.to(call.output_dtype) for o in outputs)
        out = outputs[0] if len(outputs) == 1 else outputs
        final = None
        if output_final_state:
            final = finals[0] if len(finals) == 1 else tuple(finals)
        return out, final

    def step(self, *inputs, state=None, backend="auto", **named):
        """One decode step. Token inputs are ``[B, H, *dims]`` (no time axis), params as in a
        full call, ``state`` as ``initial_state``. Returns ``(outputs, new_state)`` with
        outputs ``[B, H, *shape]``; the same generated code as the full call runs it."""
        token_names = [v.name for v in self.ir.inputs]
        positional = [_add_time_axis(x, name) for x, name in zip(inputs, token_names)]
        named = {k: (_add_time_axis(v, k) if k in token_names else v) for k, v in named.items()}
        out, final = self(*positional, initial_state=state, output_final_state=True,
                          backend=backend, **named)
        if isinstance(out, tuple):
            return tuple(o.squeeze(1) for o in out), final
        return out.squeeze(1), final

    def layer(self, heads: int, dims: dict | None = None, backend: str = "auto", seed: int = 0):
        """This rule as a torch.nn.Module whose params are learnable (see RuleLayer)."""
        from .module import RuleLayer
        return RuleLayer(self, heads, dims=dims, backend=backend, seed=seed)

    def __repr__(self):
        return f"<recdsl.Rule {self.name} ({self.ir.filename})>"


def compile_text(text: str, filename: str = "<rule>", consts: dict | None = None) -> Rule:
    return Rule(check(parse(text, filename), consts))


def load_file(path, consts: dict | None = None) -> Rule:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise RecdslError(f"cannot read rule file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise RecdslError(f"rule file {path} is not UTF-8 text") from None
    return compile_text(text, str(path), consts)


def _add_time_axis(x, name):
    """A decode step's token input [B, H, ...] as a one-token sequence [B, 1, H, ...]."""
    import torch
    from ..errors import InputError
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise InputError(f"input '{name}' of a step must be a tensor [B, H, ...]; got "
                         f"{type(x).__name__ if not isinstance(x, torch.Tensor) else list(x.shape)}")
    return x.unsqueeze(1)
