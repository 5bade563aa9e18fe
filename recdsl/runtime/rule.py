"""``Rule``: a compiled rule, callable on tensors. It binds and checks the call, picks a
backend and returns ``(outputs, final_state)`` in the contract's form."""
from __future__ import annotations

from pathlib import Path

from ..errors import BackendError, RecdslError
from ..grammar.parser import parse
from ..ir.checked import CheckedRule
from ..ir.checker import check
from ..ir.family import classify
from ..codegen.precision import check as check_precision
from . import backends
from .call import BoundCall


class Rule:
    """A checked rule. Call it with tensors (see README, "The call contract")."""

    def __init__(self, checked: CheckedRule, family=None):
        self.ir = checked
        self.name = checked.name
        family = family or classify(checked)
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
                 cu_seqlens=None, precision="auto", **named):
        call = self.bind(*inputs, initial_state=initial_state, cu_seqlens=cu_seqlens, **named)
        call.precision = check_precision(precision)  # the chunk kernels' products (codegen.precision)
        run = backends.resolve(self, backend, call)
        if call.empty:
            outputs, finals = call.empty_result()
        else:
            # the backends choose their own precisions (fp32 states): autocast off inside
            with _no_autocast(call.device):
                outputs, finals = run(self, call)
        outputs = tuple(o.to(call.output_dtype) for o in outputs)
        out = outputs[0] if len(outputs) == 1 else outputs
        final = None
        if output_final_state:
            # float32 (float64 when the call computes in float64), whatever autocast did
            finals = [f.to(call.compute_dtype) if f is not None else None for f in finals]
            final = finals[0] if len(finals) == 1 else tuple(finals)
        return out, final

    def step(self, *inputs, state=None, initial_state=None, backend="auto", **named):
        """One decode step. Token inputs are ``[B, H, *dims]`` (no time axis), params as in a
        full call, ``state`` (or ``initial_state``, the same) as ``initial_state``. Returns
        ``(outputs, new_state)`` with outputs ``[B, H, *shape]``; the same generated code as the
        full call runs it."""
        from ..errors import InputError
        if state is not None and initial_state is not None:
            raise InputError("step got both state= and initial_state=; they are the same "
                             "argument: pass one of them")
        if state is None:
            state = initial_state
        token = {v.name: v for v in self.ir.inputs}
        positional = [_add_time_axis(x, var) for x, var in zip(inputs, self.ir.inputs)]
        positional += inputs[len(positional):]  # too many: the call says so
        named = {k: (_add_time_axis(v, token[k]) if k in token else v) for k, v in named.items()}
        out, final = self(*positional, initial_state=state, output_final_state=True,
                          backend=backend, **named)
        if isinstance(out, tuple):
            return tuple(o.squeeze(1) for o in out), final
        return out.squeeze(1), final

    def layer(self, heads: int, dims: dict | None = None, backend: str = "auto", seed: int = 0):
        """This rule as a torch.nn.Module whose params are learnable (see RuleLayer)."""
        from .module import RuleLayer
        return RuleLayer(self, heads, dims=dims, backend=backend, seed=seed)

    def mixer(self, hidden_size: int, num_heads: int, **options):
        """This rule as a token mixer [B, T, hidden_size] -> [B, T, hidden_size] (see Mixer)."""
        from .mixer import Mixer
        return Mixer(self, hidden_size, num_heads, **options)

    def __repr__(self):
        return f"<recdsl.Rule {self.name} ({self.ir.filename})>"


def of_derived(derived) -> Rule:
    """The callable rule of a rule the analysis derived (``recdsl.ir.derived.DerivedRule``),
    made once."""
    if derived.runtime is None:
        derived.runtime = Rule(derived.ir, derived.family_info)
    return derived.runtime


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


def _no_autocast(device):
    import contextlib
    import torch
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _add_time_axis(x, var):
    """A decode step's token input [B, H, ...] as a one-token sequence [B, 1, H, ...]."""
    import torch
    from ..errors import InputError
    expected = "[" + ", ".join(["B", "H"] + list(var.dims)) + "]"
    if not isinstance(x, torch.Tensor):
        raise InputError(f"input '{var.name}' of a step must be a tensor {expected}; got "
                         f"{type(x).__name__}")
    if x.dim() != 2 + var.rank:
        shape = "[" + ", ".join(map(str, x.shape)) + "]"
        hint = (f": a step's token inputs have no time axis; pass {var.name}[:, 0] for one token"
                if x.dim() == 3 + var.rank else "")
        raise InputError(f"input '{var.name}' of a step has shape {shape} but expected "
                         f"{expected}{hint}")
    return x.unsqueeze(1)
