"""``Mixer``: a rule as a token mixer, ``[B, T, hidden] -> [B, T, hidden]``, ready for a model.

Around the bare recurrence (``RuleLayer``) a mixer adds what the canonical models add, read
off the rule's text:

* a linear projection for every token input, sized from its declaration (``q[K]`` gets
  ``hidden -> heads * K``);
* causal depthwise short convolutions (kernel 4, SiLU) on the vector inputs, as
  flash-linear-attention and Mamba-2 do (``conv=False`` turns them off, ``conv=[names]``
  picks them); a vector that the rule only reads through a nonlinearity (raven's router
  logits under ``sigmoid``) is not convolved by default (a read through ``softmax``, an
  attention-like read, counts as linear);
* each scalar or gate input parametrised by its role in the rule (see ``input_roles``):

  - ``decay``: the direct argument of ``exp`` (``g``, ``gk``), a log-decay: Mamba's
    ``-exp(A_log) * softplus(x W + dt_bias)``, ``A ~ U(1, 16)`` and ``dt_bias`` the inverse
    softplus of ``dt ~ logU(1e-3, 1e-1)``, so decays start near 1;
  - ``step``: a factor of a product inside an ``exp`` (Mamba-2's ``dt`` in
    ``exp(-exp(A_log) * dt)``): ``softplus(x W + dt_bias)``, ``dt_bias`` as above;
  - ``forget``: the direct argument of ``logsigmoid`` (mLSTM's ``f``): linear, bias
    ``linspace(3, 6)`` over heads, so the forget gate starts near 1;
  - ``raw``: read through a nonlinearity of the rule, or additively inside ``exp`` (mLSTM's
    ``i``, raven's ``a`` and ``route``): linear;
  - ``sigmoid``: any other scalar (write strengths ``beta``, ``eta``): ``sigmoid``, or
    ``2 * sigmoid`` with ``allow_neg_eigval=True`` (the range (0, 2) of DeltaProduct);

  ``gates={"beta": "sigmoid"}`` overrides any of them with a role name (or ``"logsigmoid"``,
  ``logsigmoid(x W + b) / 16`` as in GLA, or ``"2sigmoid"``), or with a callable applied to
  the projection ``[B, T, H, *dims]``;
* the rule's ``param``s learnable, initialised by role: an ``A_log`` under two ``exp`` as in
  Mamba, a ``dt_bias`` added to a softplus argument as in Mamba, a scalar multiplying a state
  as RetNet's ``gamma = 1 - 2^(-5 - h)``, a log-decay param near 0, other scalars 1;
* a gated RMSNorm of the rule's output per head (times SiLU of a gate projection) and an
  output projection back to ``hidden``.

With ``cp_group`` (a ``torch.distributed`` group) each rank passes its slice of the time axis:
the rule runs context parallel (``recdsl.runtime.context_parallel``) and each short
convolution starts from the previous ranks' last inputs.

``mixer(x, past=past, use_cache=True)`` returns ``(y, past)``; ``past`` holds the last 3
inputs of every convolved stream and the rule's recurrent state, so that feeding a sequence
piece by piece equals one full call.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RecdslError
from ..grammar import ast
from .sample import NORMAL, value_kinds

CONV_KERNEL = 4
ROLES = ("decay", "step", "forget", "raw", "sigmoid", "2sigmoid", "logsigmoid", "vector")
_NONLINEAR = {"sigmoid", "softplus", "logsigmoid", "tanh", "silu", "relu", "keep_topk",
              "log", "sqrt", "rsqrt", "abs", "max", "min", "cos", "sin"}


# ----------------------------------------------------------------------------- rule analysis

def _uses(rule):
    """Every use of an input, param or state name: ``(name, chain)`` where ``chain`` is the list
    of its ancestors, nearest first. ``let`` names are expanded in place."""
    lets = {}
    found = []

    def visit(e, chain):
        if isinstance(e, ast.Name):
            if e.kind == "let" and e.id in lets:
                visit(lets[e.id], chain)
            elif e.kind in ("input", "param", "state"):
                found.append((e.id, chain))
            return
        if isinstance(e, ast.Index):
            if e.target.kind in ("input", "param", "state"):
                found.append((e.target.id, chain))
            return
        inner = [e] + chain
        if isinstance(e, ast.BinOp):
            visit(e.left, inner)
            visit(e.right, inner)
        elif isinstance(e, ast.Neg):
            visit(e.operand, inner)
        elif isinstance(e, ast.Call):
            for a in e.args:
                visit(a, inner)

    for st in ast.walk_statements(rule.body):
        if isinstance(st, ast.For):
            continue
        if isinstance(st, ast.Let):
            lets[st.name] = st.value
            continue
        visit(st.value, [])
    return found


def _is_call(e, *fns):
    return isinstance(e, ast.Call) and e.fn in fns


def _in_exp(chain):
    return any(_is_call(a, "exp") for a in chain)


def _under_nonlinearity(chain):
    """Read through a nonlinear function before any exp (``softplus(a)`` inside an exp counts)."""
    for a in chain:
        if _is_call(a, "exp"):
            return False
        if isinstance(a, ast.Call) and a.fn in _NONLINEAR:
            return True
    return False


def _factor_in_exp(chain):
    """A direct operand of a product (through negation) that lies inside an exp."""
    parent = next((a for a in chain if not isinstance(a, ast.Neg)), None)
    return isinstance(parent, ast.BinOp) and parent.op == "*" and _in_exp(chain)


def input_roles(rule) -> dict:
    """Every token input's role (see the module docstring): input name -> role."""
    ir = getattr(rule, "ir", rule)
    kinds = value_kinds(ir)
    uses = _uses(ir)
    roles = {}
    for var in ir.inputs:
        chains = [c for n, c in uses if n == var.name]
        direct = [c[0] for c in chains if c]
        if any(_is_call(p, "exp") for p in direct):
            roles[var.name] = "decay"
        elif any(_is_call(p, "logsigmoid") for p in direct):
            roles[var.name] = "forget"
        elif kinds[var.name] == NORMAL:  # a vector: raw only when every read is nonlinear
            roles[var.name] = "raw" if chains and all(map(_under_nonlinearity, chains)) else "vector"
        elif any(_under_nonlinearity(c) for c in chains):
            roles[var.name] = "raw"
        elif any(_factor_in_exp(c) for c in chains):
            roles[var.name] = "step"
        elif any(_in_exp(c) for c in chains):
            roles[var.name] = "raw"
        else:
            roles[var.name] = "sigmoid"
    return roles


def param_roles(rule) -> dict:
    """Every param's initialisation: ``A_log``, ``dt_bias``, ``decay`` (a scalar multiplying a
    state), ``log_decay`` (exp of it multiplies a state), ``one`` or ``normal``."""
    ir = getattr(rule, "ir", rule)
    kinds = value_kinds(ir)
    uses = _uses(ir)
    states = {s.name for s in ir.states}
    roles = {}
    for var in ir.params:
        chains = [c for n, c in uses if n == var.name]
        role = "one" if var.rank == 0 or kinds[var.name] != NORMAL else "normal"
        for c in chains:
            if c and _is_call(c[0], "exp"):
                role = "A_log" if any(_is_call(a, "exp") for a in c[1:]) else "log_decay"
                break
            if (len(c) >= 2 and isinstance(c[0], ast.BinOp) and c[0].op == "+"
                    and _is_call(c[1], "softplus")):
                role = "dt_bias"
                break
            if c and isinstance(c[0], ast.BinOp) and c[0].op == "*":
                other = c[0].right if _names(c[0].left, var.name) else c[0].left
                if isinstance(other, ast.Name) and other.id in states:
                    role = "decay"
        roles[var.name] = role
    return roles


def _names(e, name):
    return (isinstance(e, ast.Name) and e.id == name) or (isinstance(e, ast.Index) and e.target.id == name)


def default_dims(rule, hidden_size: int, num_heads: int) -> dict:
    """hidden_size // num_heads for every dim, 2 for a dim a ``for`` loop runs over, 64 for a
    slot dim (the shape of a ``softmax`` or ``keep_topk`` argument)."""
    ir = getattr(rule, "ir", rule)
    slots = set()
    for e in ast.walk_body_expressions(ir.body):
        if _is_call(e, "softmax", "keep_topk") and isinstance(e.args[0].shape, tuple) and len(e.args[0].shape) == 1:
            slots.add(e.args[0].shape[0])
    head = max(hidden_size // num_heads, 1)
    sizes = ir.dim_sizes(None, head, 2)
    for d in slots:
        if d in sizes and d not in ir.loop_dims():
            sizes[d] = 64
    return sizes


# ----------------------------------------------------------------------------- initialisation

def _inverse_softplus_dt(shape, dt_min=1e-3, dt_max=1e-1, generator=None):
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


def _A_log(shape, generator=None):
    return torch.log(1 + 15 * torch.rand(shape, generator=generator, dtype=torch.float64))


def _per_head(values, shape):
    """``values`` [H] broadcast to ``shape`` [H, ...]."""
    return values.reshape([-1] + [1] * (len(shape) - 1)).expand(shape).clone()


class GatedRMSNorm(nn.Module):
    """RMSNorm over the last axis, times SiLU of a gate."""

    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x, gate):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps) * self.weight
        return (y * F.silu(gate.float())).to(x.dtype)


# ----------------------------------------------------------------------------- the mixer

class Mixer(nn.Module):
    def __init__(self, rule, hidden_size: int, num_heads: int, dims: dict | None = None,
                 conv=True, gates: dict | None = None, allow_neg_eigval: bool = False,
                 backend: str = "auto", output: str | None = None, norm_eps: float = 1e-5,
                 seed: int | None = None, cp_group=None):
        super().__init__()
        ir = rule.ir
        self.rule, self.hidden_size, self.num_heads, self.backend = rule, hidden_size, num_heads, backend
        self.cp_group = cp_group  # T split over its ranks (README, "Context parallelism")
        self.sizes = default_dims(rule, hidden_size, num_heads)
        for name, size in (dims or {}).items():
            if name not in self.sizes:
                raise RecdslError(f"rule '{rule.name}' has no dim '{name}'; its dims are: "
                                  + (", ".join(self.sizes) or "none"))
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise RecdslError(f"dim {name} must be a positive whole number, not {size!r}")
            self.sizes[name] = size
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        H = num_heads

        roles = input_roles(rule)
        for name, gate in (gates or {}).items():
            if name not in roles:
                raise RecdslError(f"rule '{rule.name}' has no input '{name}'; its inputs are: "
                                  + ", ".join(roles))
            if not callable(gate) and gate not in ROLES:
                raise RecdslError(f"gate for '{name}' must be a callable or one of {', '.join(ROLES)}, "
                                  f"not {gate!r}")
            roles[name] = gate
        if allow_neg_eigval:
            roles = {k: ("2sigmoid" if r == "sigmoid" else r) for k, r in roles.items()}
        self.roles = roles

        if conv is True:
            conv_names = [n for n, r in roles.items() if r == "vector" and ir.var(n).rank > 0]
        elif conv is False or conv is None:
            conv_names = []
        else:
            conv_names = list(conv)
            unknown = [n for n in conv_names if n not in roles]
            if unknown:
                raise RecdslError(f"conv names unknown inputs: {', '.join(unknown)}")
        self.conv_names = conv_names

        self.shapes = {v.name: [H] + [self.sizes[d] for d in v.dims] for v in ir.inputs}
        self.proj = nn.ModuleDict()
        self.convs = nn.ParameterDict()
        self.gate_params = nn.ParameterDict()
        for v in ir.inputs:
            shape = self.shapes[v.name]
            width = math.prod(shape)
            role = roles[v.name]
            bias = callable(role) or role not in ("vector", "decay", "step")
            self.proj[v.name] = nn.Linear(hidden_size, width, bias=bias)
            if role in ("decay", "step"):
                self.gate_params[f"{v.name}_dt_bias"] = nn.Parameter(
                    _inverse_softplus_dt(shape, generator=generator).float())
            if role == "decay":
                self.gate_params[f"{v.name}_A_log"] = nn.Parameter(_A_log(shape, generator).float())
            if role == "forget":
                with torch.no_grad():
                    self.proj[v.name].bias.copy_(_per_head(torch.linspace(3, 6, H), shape).reshape(-1))
            if v.name in conv_names:
                w = torch.empty(width, 1, CONV_KERNEL)
                nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator) if generator else \
                    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                self.convs[v.name] = nn.Parameter(w)

        self.params = nn.ParameterDict()
        for p, role in param_roles(rule).items():
            shape = [H] + [self.sizes[d] for d in ir.var(p).dims]
            if role == "A_log":
                value = _A_log(shape, generator)
            elif role == "dt_bias":
                value = _inverse_softplus_dt(shape, generator=generator)
            elif role == "decay":
                value = _per_head(1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64)), shape)
            elif role == "log_decay":
                value = _per_head(torch.log(1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))), shape)
            elif role == "one":
                value = torch.ones(shape, dtype=torch.float64)
            else:
                value = 0.02 * torch.randn(shape, generator=generator, dtype=torch.float64)
            self.params[p] = nn.Parameter(value.float())

        outs = ir.outputs
        self.output = output or outs[0].name
        out_var = ir.var(self.output)
        self.out_size = math.prod(self.sizes[d] for d in out_var.dims) if out_var.dims else 1
        self.gate_proj = nn.Linear(hidden_size, H * self.out_size, bias=False)
        self.norm = GatedRMSNorm(self.out_size, eps=norm_eps)
        self.o_proj = nn.Linear(H * self.out_size, hidden_size, bias=False)

    # -- pieces

    def _conv(self, name, x, cache):
        """Causal depthwise conv of ``x`` [B, T, C] with SiLU; ``cache`` [B, K-1, C] or None.
        Returns the output and the new cache (the last K-1 inputs)."""
        B, T, C = x.shape
        if cache is None:
            cache = x.new_zeros(B, CONV_KERNEL - 1, C)
        full = torch.cat([cache.to(x.dtype), x], dim=1)
        y = F.conv1d(full.transpose(1, 2), self.convs[name].to(x.dtype), groups=C).transpose(1, 2)
        return F.silu(y), full[:, -(CONV_KERNEL - 1):]

    def _gate(self, name, z):
        role = self.roles[name]
        if callable(role):
            return role(z)
        if role in ("decay", "step"):
            dt = F.softplus(z + self.gate_params[f"{name}_dt_bias"])
            if role == "step":
                return dt
            return -torch.exp(self.gate_params[f"{name}_A_log"]) * dt
        if role == "sigmoid":
            return torch.sigmoid(z)
        if role == "2sigmoid":
            return 2 * torch.sigmoid(z)
        if role == "logsigmoid":
            return F.logsigmoid(z) / 16
        return z  # vector, raw, forget

    def inputs(self, x, past=None):
        """The rule's token inputs for ``x`` [B, T, hidden], by name, and the new conv caches."""
        B, T, _ = x.shape
        caches = (past or {}).get("conv", {})
        new_caches, values = {}, {}
        projected = {name: proj(x) for name, proj in self.proj.items()}
        if self.cp_group is not None and self.convs and not caches:
            from .context_parallel import previous_tokens  # the previous rank's last inputs
            caches = previous_tokens({n: projected[n] for n in self.convs}, CONV_KERNEL - 1,
                                     self.cp_group)
        for name, z in projected.items():
            if name in self.convs:
                z, new_caches[name] = self._conv(name, z, caches.get(name))
            z = z.reshape(B, T, *self.shapes[name])
            values[name] = self._gate(name, z)
        return values, new_caches

    def forward(self, x, past=None, use_cache=False):
        B, T, _ = x.shape
        values, caches = self.inputs(x, past)
        state = (past or {}).get("state")
        # params.items(), not dict(params): dynamo (torch 2.13) unpacks a ParameterDict wrongly
        out, final = self.rule(**values, **dict(self.params.items()), initial_state=state,
                               output_final_state=use_cache, backend=self.backend,
                               cp_group=self.cp_group)
        if isinstance(out, tuple):
            out = out[[v.name for v in self.rule.ir.outputs].index(self.output)]
        o = out.reshape(B, T, self.num_heads, self.out_size).to(x.dtype)
        gate = self.gate_proj(x).reshape(B, T, self.num_heads, self.out_size)
        y = self.o_proj(self.norm(o, gate).reshape(B, T, -1))
        if use_cache:
            return y, {"conv": caches, "state": final}
        return y

    def extra_repr(self):
        dims = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        roles = ", ".join(f"{k}:{v if not callable(v) else 'callable'}" for k, v in self.roles.items())
        return (f"rule={self.rule.name}, hidden_size={self.hidden_size}, heads={self.num_heads}, "
                f"dims=({dims}), roles=({roles}), conv={self.conv_names}, backend={self.backend!r}")
