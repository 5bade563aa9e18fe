"""Binding the tensors of one rule call to the rule's declarations, and checking them.

Every problem with a tensor is an ``InputError`` naming the tensor, the expected layout and
what was given. Backends receive a ``BoundCall`` and never look at raw arguments.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from ..ir.checked import CheckedRule, Var

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Keys for the implicit axes, apart from dim names (a rule may name a dim H).
_BATCH, _TIME, _HEADS = "(B)", "(T)", "(H)"
_LEADING = {"input": (_BATCH, _TIME, _HEADS), "param": (_HEADS,)}


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


class BoundCall:
    """The tensors of one call, checked: dims bound to sizes, dtypes and device agreed."""

    def __init__(self, rule: CheckedRule, args: tuple, named: dict, initial_state, cu_seqlens):
        self.rule = rule
        self.tensors = self._collect(args, named)
        self._device_source = None  # (device, which tensor) of the first tensor seen
        self.sizes = {}  # layout letter or dim name -> (size, which tensor set it)
        self._shapes = {}  # layout letter or dim name -> the shape of the tensor that set it
        for var in rule.inputs + rule.params:
            self._check_tensor(var.name, self.tensors[var.name], var)
        self.batch = self.sizes[_BATCH][0]
        self.time = self.sizes[_TIME][0]
        self.heads = self.sizes[_HEADS][0]
        self.dim_sizes = {d: self.sizes[d][0] for d in rule.dims}
        for d, size in self.dim_sizes.items():
            if size == 0:
                raise InputError(f"dim {d} has size 0 (from {self.sizes[d][1]} of shape {self._shapes[d]}); "
                                 f"every dim needs at least 1 entry: pass tensors whose {d} axis is not empty")
        self.device = self._device_source[0]
        if self.device.type == "meta":
            raise InputError(f"{self._device_source[1]} is a meta tensor; meta tensors (shapes without "
                             f"data) are not supported: pass real tensors, on the CPU or a GPU")
        self.cu_seqlens = self._check_cu_seqlens(cu_seqlens)
        self.packed = self.cu_seqlens is not None
        self.num_sequences = len(self.cu_seqlens) - 1 if self.packed else self.batch
        token_dtypes = [self.tensors[v.name].dtype for v in rule.inputs]
        all_dtypes = token_dtypes + [self.tensors[v.name].dtype for v in rule.params]
        self.initial = self._check_initial(initial_state)
        all_dtypes += [t.dtype for t in self.initial.values()]
        # fp32 states and accumulation; fp64 throughout when any tensor is fp64 (for checking)
        self.compute_dtype = torch.float64 if torch.float64 in all_dtypes else torch.float32
        out = token_dtypes[0] if token_dtypes else self.compute_dtype
        for d in token_dtypes[1:]:
            out = torch.promote_types(out, d)
        self.output_dtype = out
        self.precision = "auto"  # the Triton chunk kernels' policy (recdsl.codegen.precision)
        # no sequence, no head or no token: nothing to compute (see empty_result)
        self.empty = self.num_sequences == 0 or self.heads == 0 or self.time == 0

    # ------------------------------------------------------------ collecting arguments

    def _collect(self, args, named) -> dict:
        rule = self.rule
        if len(args) > len(rule.inputs):
            params = f"; pass params by name ({', '.join(p.name + '=...' for p in rule.params)})" \
                if rule.params else ""
            raise InputError(f"rule '{rule.name}' takes {len(rule.inputs)} token inputs "
                             f"({', '.join(v.name for v in rule.inputs)}) positionally; {len(args)} were given"
                             + params)
        tensors = {v.name: a for v, a in zip(rule.inputs, args)}
        known = {v.name for v in rule.inputs + rule.params}
        for name, value in named.items():
            if name not in known:
                raise InputError(f"rule '{rule.name}' has no input or param '{name}'; it takes: "
                                 + ", ".join(v.name for v in rule.inputs + rule.params))
            if name in tensors:
                raise InputError(f"input '{name}' was given both by position and by name")
            tensors[name] = value
        for var in rule.inputs + rule.params:
            if var.name not in tensors or tensors[var.name] is None:
                raise InputError(f"missing {var.kind} '{var.name}': expected a tensor of shape "
                                 f"[{', '.join(var.layout())}]")
        return tensors

    def _agree(self, key, size, who, expected_layout, tensor):
        if key in self.sizes and self.sizes[key][0] != size:
            known, source = self.sizes[key]
            name = key.strip("()")
            raise InputError(
                f"{who} has shape {_shape(tensor)} but expected [{', '.join(expected_layout)}] with "
                f"{name} = {known} (from {source}); here {name} = {size}")
        self.sizes.setdefault(key, (size, who))
        self._shapes.setdefault(key, _shape(tensor))

    def _check_device_dtype(self, who, t, layout):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{who} must be a torch.Tensor of shape [{', '.join(layout)}], "
                             f"not {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise InputError(f"{who} has dtype {t.dtype}; expected a floating dtype "
                             f"(float16, bfloat16, float32 or float64)")
        if self._device_source is None:
            self._device_source = (t.device, who)
        elif t.device != self._device_source[0]:
            device, first = self._device_source
            raise InputError(f"{who} is on {t.device} but {first} is on {device}; "
                             f"put every tensor on one device")

    def _check_tensor(self, name, t, var: Var):
        who = f"{var.kind} '{name}'"
        layout = var.layout()
        self._check_device_dtype(who, t, layout)
        if var.kind == "param" and var.rank == 0 and t.dim() == 0:
            raise InputError(f"param '{name}' has shape []; expected [H] (one value per head)")
        if t.dim() != len(layout):
            raise InputError(f"{who} has shape {_shape(t)} (rank {t.dim()}) but expected "
                             f"[{', '.join(layout)}] (rank {len(layout)})")
        keys = _LEADING[var.kind] + var.dims
        for key, size in zip(keys, t.shape):
            self._agree(key, size, who, layout, t)

    def _check_cu_seqlens(self, cu):
        if cu is None:
            return None
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) \
                or cu.is_meta:
            given = (f"a tensor of dtype {str(cu.dtype).replace('torch.', '')} and shape {_shape(cu)}"
                     + (" on meta" if cu.is_meta else "")
                     if isinstance(cu, torch.Tensor) else type(cu).__name__)
            raise InputError("cu_seqlens must be a 1-d int32 or int64 tensor of sequence boundaries, "
                             f"e.g. torch.tensor([0, 5, 12]); got {given}")
        if self.batch != 1:
            raise InputError(f"with cu_seqlens the batch size must be 1 (sequences packed along T); "
                             f"got B = {self.batch}")
        values = cu.tolist()
        if len(values) < 2 or values[0] != 0 or values[-1] != self.time or any(
                b < a for a, b in zip(values, values[1:])):
            raise InputError(f"cu_seqlens must rise from 0 to T = {self.time}; got {values}")
        return values

    def _check_initial(self, initial_state) -> dict:
        states = self.rule.states
        if initial_state is None:
            return {}
        if isinstance(initial_state, torch.Tensor) and len(states) == 1:
            initial_state = (initial_state,)
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != len(states):
            if len(states) == 1:
                expected = f"a tensor (state '{states[0].name}')"
            else:
                expected = (f"a tuple of {len(states)} tensors, one per state "
                            f"({', '.join(s.name for s in states)})")
            if isinstance(initial_state, (tuple, list)):
                count = len(initial_state)
                given = f"a {type(initial_state).__name__} of {count} item{'s' if count != 1 else ''}"
            else:
                given = "a tensor" if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
            raise InputError(f"initial_state must be {expected} or None; got {given}")
        out = {}
        for var, t in zip(states, initial_state):
            if t is None:
                continue
            who = f"initial state '{var.name}'"
            names = ["N" if self.packed else "B", "H"] + list(var.dims)
            self._check_device_dtype(who, t, names)
            expected = [self.num_sequences, self.heads] + [self.dim_sizes[d] for d in var.dims]
            if list(t.shape) != expected:
                raise InputError(f"{who} has shape {_shape(t)} but expected [{', '.join(names)}] = "
                                 f"[{', '.join(map(str, expected))}]")
            out[var.name] = t
        return out

    # ------------------------------------------------------------ what backends use

    def segments(self):
        """(start, end) token ranges of the sequences: one range, or one per packed sequence."""
        if self.packed:
            return list(zip(self.cu_seqlens[:-1], self.cu_seqlens[1:]))
        return [(0, self.time)]

    def state_shape(self, name) -> list:
        var = self.rule.var(name)
        return [self.num_sequences, self.heads] + [self.dim_sizes[d] for d in var.dims]

    def empty_result(self):
        """(outputs, finals) of a call with no sequence, no head or no token (B, H or T = 0):
        empty outputs of the right shapes, and the initial states (or zeros) as final states. Tied to
        the graph of every tensor that needs a gradient, so a backward pass gives them zeros."""
        anchor = sum((t.flatten()[:0].sum() for t in self.tensors.values() if t.requires_grad),
                     torch.zeros((), dtype=self.compute_dtype, device=self.device))
        outputs = tuple(torch.zeros([self.batch, self.time, self.heads]
                                    + [self.dim_sizes[d] for d in var.dims],
                                    dtype=self.output_dtype, device=self.device) + anchor
                        for var in self.rule.outputs)
        finals = [self.initial_state(var.name).to(self.compute_dtype) + anchor
                  for var in self.rule.states]
        return outputs, finals

    def initial_state(self, name, rows=slice(None)):
        """The initial value of a state (zeros if none given), rows selecting sequences."""
        if name in self.initial:
            return self.initial[name][rows]
        shape = self.state_shape(name)
        count = len(range(*rows.indices(shape[0])))
        return torch.zeros([count] + shape[1:], dtype=self.compute_dtype, device=self.device)
