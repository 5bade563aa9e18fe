"""The per-token prologue of the delta-family chunk kernels, generated from the rule.

The chunk core (``recdsl.codegen.chunk_delta``) runs one fixed recurrence: per token a scalar
log-decay ``g``, then ``NH`` Householder-like steps ``S <- (I - beta_j k_j k_jᵀ) S + k_j u_jᵀ``,
then the read ``o = Sᵀ q``. Everything else the rule says is per-token math free of the state
(``l2norm(k)``, KLA's ``eta / (dot(k, k) + eps)``, ``2 * sigmoid(b)``, a Mamba-style gate from
params, the read scale). ``plan`` reads that math off the affine analysis as expressions of
the rule (lets inlined, loops unrolled); ``generate`` lowers them into one ssa program
(``ssa.lower_values``), prints it with ``triton_ops.emit_ops`` into a token-parallel kernel, and
prints its adjoint (``vjp.adjoint``) into the backward kernel that maps the core's gradients
back to the rule's inputs and params. So the prologue's math and its derivatives are the
rule's own, never hand-written.

How the analysis maps onto the core, per token, in application order:
- a scalar decay ``d`` adds ``log(d)`` to ``g`` (taken in log space: ``exp(x)`` gives ``x``), and
  scales the writes made before it in the same token (scalars commute with the erases, so
  every decay can be applied first);
- a Householder-like erase ``I - c k kᵀ`` starts step j: ``k_j = k``, ``beta_j = c``;
- an erase beside a scalar decay, ``(a I - c k kᵀ) S`` (the erase reads the undecayed state:
  KLA as its author writes it), adds ``log(a)`` to ``g`` and gives the token a read scale
  ``r``, the product of the token's other decays, as its log ``g_read`` (``u_0 = c (v - r
  S_{t-1}ᵀ k)``). Only the token's first erase may stand beside a decay, outside any for
  block: the later erases read the state after all of the token's decays, as the core
  applies them (a later erase beside a decay would need a division). The decays here are
  positive (a negative one is refused), so the read scale has no sign to carry;
- a write ``c * outer(k, v)`` after it adds ``c * v`` to ``u_j``.
The output ``o = sum(c_i * x_i @ S) + extra`` gives ``q = sum(c_i * x_i)`` and ``extra``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import triton

from ..grammar import ast
from ..ir.checked import CheckedRule
from ..ir.ssa import loop_dims, lower_values
from ..ir.vjp import adjoint
from .recurrent import _Emitter, _RecurrentGenerator, _ident, _numel
from .triton_ops import TOPK_HELPER, block, emit_ops

# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    """The core's per-token quantities as expressions of the rule (no lets, no loop vars)."""
    state: str
    key_dim: str  # K: the state's rows
    value_dim: str  # V: its columns
    keys: list = field(default_factory=list)  # per step j: vector [K]
    betas: list = field(default_factory=list)  # per step j: scalar
    writes: list = field(default_factory=list)  # per step j: vector [V]
    log_decay: object = None  # scalar, or None (no decay)
    read_log: object = None  # scalar log of the first erase's read scale, or None (r = d)
    read: object = None  # vector [K]
    output: str = ""
    extra: object = None  # [V] or None

    @property
    def steps(self) -> int:
        return len(self.keys)

    def values(self) -> dict:
        """name -> expression, in the order the kernel stores them."""
        out = {}
        for j in range(self.steps):
            out[f"key_{j}"] = self.keys[j]
            out[f"beta_{j}"] = self.betas[j]
            out[f"u_{j}"] = self.writes[j]
        out["g"] = self.log_decay if self.log_decay is not None else _num(0.0)
        if self.read_log is not None:
            out["gr"] = self.read_log
        out["q"] = self.read
        if self.extra is not None:
            out["extra"] = self.extra
        return out


def problem(rule) -> str | None:
    """Why the delta chunk core cannot run ``rule`` (a ``Rule``), or None. The plan does not
    depend on sizes except through loop unrolling: it is tried with every loop of one step."""
    try:
        plan(rule, {d: 1 for d in loop_dims(rule.ir)})
    except _Unsupported as e:
        return str(e)
    return None


class _Unsupported(Exception):
    pass


def _structure(rule):
    """The checks that need no sizes: (state analysis, read value)."""
    if rule.family != "delta":
        raise _Unsupported(f"rule '{rule.name}' is in the {rule.family} family, not delta")
    analysis = rule.analysis
    if len(analysis.states) != 1:
        raise _Unsupported("the delta chunk kernel takes one state; this rule has "
                           f"{len(analysis.states)}")
    (sa,) = analysis.states.values()
    for f in sa.factors:
        if f.kind in ("rows", "cols"):
            raise _Unsupported(f"the per-channel decay {_text(f.node)} before the erase is not "
                               f"supported chunkwise (use the recurrent backend)")
        if f.kind == "rank_one" and f.diag is not None and f.diag.kind != "scalar":
            raise _Unsupported(f"{_text(f.node)} erases {sa.name} beside a decay that is not a "
                               f"scalar")
        for d in (f, f.diag) if f.kind == "rank_one" else (f,):
            if (d is not None and d.kind == "scalar" and d.coef is not None
                    and d.coef.sign < 0):
                raise _Unsupported(f"the decay {_text(d.node)} is negative; the chunk kernel "
                                   f"takes decays in log space")
    erases = [(s, f) for s in sa.steps for f in s.factors if f.kind == "rank_one"]
    for i, (s, f) in enumerate(erases):
        if f.diag is None:
            continue
        if i > 0 or s.loop is not None:
            raise _Unsupported(f"{_text(f.node)} erases the undecayed {sa.name} beside a decay "
                               f"after the token's first erase or in a for block; the chunk "
                               f"kernel takes that form on the first erase only "
                               f"(backend='torch-chunk' runs it)")
    for s in sa.steps:
        if s.loop is not None and s.loop.parent is not None:
            raise _Unsupported("nested for blocks are not supported chunkwise")
    outputs = [rv for rv in analysis.reads if rv.kind == "output"]
    if len(outputs) != 1 or len(rule.outputs) != 1:
        raise _Unsupported("the delta chunk kernel takes one output")
    (rv,) = outputs
    if rv.chain or not rv.terms:
        raise _Unsupported(f"output {rv.name} is not a plain read q @ {sa.name}")
    for t in rv.terms:
        if t.read.side != "left" or t.read.state != sa.name:
            raise _Unsupported(f"output {rv.name} reads {sa.name} as {_text(t.read.node)}; the "
                               f"chunk kernel reads q @ {sa.name}")
    return sa, rv


def plan(rule, dim_sizes: dict) -> Plan:
    """The core's quantities for ``rule`` at these sizes (loops unrolled)."""
    sa, rv = _structure(rule)
    ir: CheckedRule = rule.ir
    lets = _lets(ir.body)
    key_dim, value_dim = sa.var.dims
    p = Plan(sa.name, key_dim, value_dim, output=rv.name)
    logs = []  # log-decays of the token so far
    beside = None  # log of the decay beside the first erase, (a I - c k kᵀ) S
    writes = []  # per step: list of [expression, log-decays applied after it]
    for loop, steps in _groups(sa.steps):
        for j in range(dim_sizes[loop.dim]) if loop is not None else [None]:
            env = {loop.var: j} if loop is not None else {}
            resolve = lambda e: _resolve(e, lets, env)  # noqa: E731
            for step in steps:
                for f in step.factors:
                    if f.kind == "scalar":
                        log = _log_of(resolve(f.decay))
                        logs.append(log)
                        for w in (w for step_writes in writes for w in step_writes):
                            w[1].append(log)
                    elif f.kind == "rank_one":
                        if f.diag is not None:  # the first erase (_structure): no writes yet
                            beside = _log_of(resolve(f.diag.decay))
                        p.keys.append(resolve(f.key))
                        p.betas.append(resolve(f.coef.expr()))
                        writes.append([])
                for w in step.writes:
                    writes[-1].append([resolve(w.coef.scaled(w.right)), []])
    if beside is not None:  # g counts it, the erase's read scale the other decays
        p.read_log = _sum(logs) if logs else _num(0.0)
        logs = logs + [beside]
    p.log_decay = _sum(logs) if logs else None
    for step_writes in writes:
        terms = []
        for value, later in step_writes:
            if later:  # decays after the write scale it
                value = ast.BinOp("*", ast.Call("exp", [_sum(later)], _AT, shape=()), value, _AT,
                                  _AT, shape=value.shape)
            terms.append(value)
        p.writes.append(_sum(terms) if terms else None)
    if any(w is None for w in p.writes):
        raise _Unsupported("an erase without a write")
    reads = [_resolve(t.coef.scaled(t.read.vector), lets, {}) for t in rv.terms]
    p.read = _sum(reads)
    p.extra = _resolve(rv.extra, lets, {}) if rv.extra is not None else None
    return p


# ---------------------------------------------------------------- expression helpers

_AT = ast.Pos(0, 0)


def _num(value):
    return ast.Num(float(value), repr(float(value)), _AT, shape=())


def _text(node) -> str:
    from ..ir.pretty import unparse
    return unparse(node)


def _lets(body) -> dict:
    """name -> expression of every let (names are bound once in a rule)."""
    out = {}
    for st in body:
        if isinstance(st, ast.Let):
            out[st.name] = st.value
        elif isinstance(st, ast.For):
            out.update(_lets(st.body))
    return out


def _groups(steps):
    """Consecutive steps of the same loop (or of no loop), in order."""
    groups = []
    for step in steps:
        if groups and step.loop is not None and groups[-1][0] is step.loop:
            groups[-1][1].append(step)
        else:
            groups.append((step.loop, [step]))
    return groups


def _resolve(e, lets, env):
    """``e`` with lets inlined and loop variables replaced by their values."""
    if isinstance(e, ast.Name):
        if e.kind == "let":
            return _resolve(lets[e.id], lets, env)
        if e.kind == "state":
            raise _Unsupported(f"{e.id} is read where the chunk kernel needs a per-token value")
        return e
    if isinstance(e, ast.Index):
        if isinstance(e.index, ast.Num):
            return e
        j = env[e.index.id]
        return ast.Index(e.target, ast.Num(float(j), str(j), e.index.pos, shape=()), e.pos, e.shape)
    if isinstance(e, ast.Num):
        return e
    if isinstance(e, ast.Neg):
        return ast.Neg(_resolve(e.operand, lets, env), e.pos, e.shape)
    if isinstance(e, ast.BinOp):
        return ast.BinOp(e.op, _resolve(e.left, lets, env), _resolve(e.right, lets, env), e.pos,
                         e.start, e.shape)
    if isinstance(e, ast.Call):
        return ast.Call(e.fn, [_resolve(a, lets, env) for a in e.args], e.pos, e.shape)
    raise AssertionError(e)


def _log_of(e):
    """log(e) as an expression, in log space where the rule allows it: log(exp(x)) is x."""
    if isinstance(e, ast.Call) and e.fn == "exp":
        return e.args[0]
    if isinstance(e, ast.BinOp) and e.op in "*/" and e.left.shape == () and e.right.shape == ():
        a, b = _log_of(e.left), _log_of(e.right)
        return ast.BinOp("+" if e.op == "*" else "-", a, b, _AT, _AT, shape=())
    if isinstance(e, ast.Num):
        if e.value <= 0:
            raise _Unsupported(f"the decay {e.text} is not positive")
        return _num(math.log(e.value))
    return ast.Call("log", [e], _AT, shape=())


def _sum(items):
    value = items[0]
    for item in items[1:]:
        value = ast.BinOp("+", value, item, _AT, _AT, shape=value.shape)
    return value


# ---------------------------------------------------------------- the kernels

TOKENS_PER_PROGRAM = 16  # each program walks this many tokens of one head


@dataclass
class PrologueSpec:
    rule_name: str
    source: str
    steps: int  # NH: Householder steps per token
    key_dim: str
    value_dim: str
    has_extra: bool
    forward_args: list
    backward_args: list
    grad_inputs: dict  # input name -> has a gradient
    grad_params: dict
    has_read: bool = False  # the quantity gr: the first erase's log read scale per token

    @property
    def forward_name(self):
        return f"{_ident(self.rule_name)}_prologue_fwd"

    @property
    def backward_name(self):
        return f"{_ident(self.rule_name)}_prologue_bwd"


# quantity name -> (buffer argument, how many per token and head, its dims)
def _buffers(p: Plan) -> list:
    out = [("key", p.steps, (p.key_dim,)), ("beta", p.steps, ()), ("u", p.steps, (p.value_dim,)),
           ("g", 1, ()), ("q", 1, (p.key_dim,))]
    if p.read_log is not None:
        out.append(("gr", 1, ()))
    if p.extra is not None:
        out.append(("extra", 1, (p.value_dim,)))
    return out


class _PrologueGenerator(_RecurrentGenerator):
    """Token-parallel kernels: program (token block, head). Reuses the recurrent generator's
    token loads and stores (``load_token``, ``load_params``, ``_load``, ``_store``,
    ``_accumulate``); its own lowering is ``ssa.lower_values`` instead of the whole token."""

    def __init__(self, rule, dim_sizes: dict):  # noqa: the parent lowers the whole token
        self.rule = rule.ir
        self.sizes = dict(dim_sizes)
        self.blocks = {d: triton.next_power_of_2(n) for d, n in self.sizes.items()}
        self.plan = plan(rule, self.sizes)
        self.forward = lower_values(self.rule, self.sizes, self.plan.values())
        self.adjoint = adjoint(self.forward)

    def header(self, e: _Emitter, name, args):
        e("@triton.jit")
        e(f"def {name}({', '.join(args)}, TOKB: tl.constexpr):")
        e.depth = 1
        e("i_b = tl.program_id(0)")
        e("i_h = tl.program_id(1)")
        e("start = tl.cast(i_b, tl.int64) * TOKB")
        e("stop = tl.minimum(start + TOKB, NTOK)")
        for d in self.rule.dims:
            e(f"o_{d} = tl.arange(0, {block(d)})")
            e(f"m_{d} = o_{d} < {self.sizes[d]}")

    def slot(self, buffer, count, index, dims):
        """Base address of quantity ``buffer`` (item ``index``) of token ``tok``, head i_h."""
        n = _numel(dims, self.sizes)
        return f"p_{buffer} + ((tok * H + i_h) * {count} + {index}) * {n}"

    def _quantities(self):
        """(value name, buffer, count, index, dims) for every quantity."""
        out = []
        for buffer, count, dims in _buffers(self.plan):
            for j in range(count):
                name = f"{buffer}_{j}" if buffer in ("key", "beta", "u") else buffer
                out.append((name, buffer, count, j, dims))
        return out

    def _buffer_names(self) -> list:
        return [b for b, _, _ in _buffers(self.plan)]

    def _kernel_name(self, direction: str) -> str:
        return f"{_ident(self.rule.name)}_prologue_{direction}"

    def forward_kernel(self):
        rule, prog = self.rule, self.forward
        args = ([f"p_in_{v.name}" for v in rule.inputs] + [f"p_par_{v.name}" for v in rule.params]
                + [f"p_{b}" for b in self._buffer_names()] + ["NTOK", "H"])
        e = _Emitter()
        self.header(e, self._kernel_name("fwd"), args)
        self.load_params(e, prog)
        e("for tok in range(start, stop):")
        e.depth = 2
        self.load_token(e, prog)
        e.block(emit_ops(prog.ops, self.sizes))
        for name, buffer, count, j, dims in self._quantities():
            e(self._store(self.slot(buffer, count, j, dims), dims, prog.outputs[name].id))
        return args, e.lines

    def backward_kernel(self):
        rule, adj = self.rule, self.adjoint
        prog = adj.program
        args = ([f"p_in_{v.name}" for v in rule.inputs] + [f"p_par_{v.name}" for v in rule.params]
                + [f"p_d{b}" for b in self._buffer_names()]
                + [f"p_din_{v.name}" for v in rule.inputs] + [f"p_dpar_{v.name}" for v in rule.params]
                + ["NTOK", "H"])
        e = _Emitter()
        self.header(e, self._kernel_name("bwd"), args)
        self.load_params(e, self.forward)
        self.init_param_gradients(e)
        e("for tok in range(start, stop):")
        e.depth = 2
        self.load_token(e, prog)
        for name, buffer, count, j, dims in self._quantities():
            e(self._load(adj.grad_outputs[name].id, self.slot("d" + buffer, count, j, dims), dims))
        e.block(emit_ops(prog.ops, self.sizes, prefix="b"))
        self.store_input_gradients(e, prog)
        self.accumulate_param_gradients(e)
        e.depth = 1
        for name in prog.params:  # one partial sum per (token block, head)
            var = rule.var(name)
            base = f"p_dpar_{name} + (tl.cast(i_b, tl.int64) * H + i_h) * {_numel(var.dims, self.sizes)}"
            e(self._store(base, var.dims, f"acc_{name}"))
        return args, e.lines

    def generate(self) -> PrologueSpec:
        fwd_args, fwd_lines = self.forward_kernel()
        bwd_args, bwd_lines = self.backward_kernel()
        header = [
            f'"""Chunk-kernel prologue for rule {self.rule.name}, generated by recdsl.',
            f"Dims: {', '.join(f'{d}={n}' for d, n in self.sizes.items())}.",
            '"""',
            "import triton",
            "import triton.language as tl",
            "",
        ]
        blocks = [f"{block(d)} = tl.constexpr({b})" for d, b in self.blocks.items()]
        source = "\n".join(header + blocks + [TOPK_HELPER, ""] + fwd_lines + ["", ""] + bwd_lines) + "\n"
        adj = self.adjoint
        return PrologueSpec(
            rule_name=self.rule.name, source=source, steps=self.plan.steps,
            key_dim=self.plan.key_dim, value_dim=self.plan.value_dim,
            has_extra=self.plan.extra is not None, forward_args=fwd_args, backward_args=bwd_args,
            grad_inputs={v.name: any(adj.grad_inputs.get(k) is not None
                                     for k in adj.program.inputs if k[0] == v.name)
                         for v in self.rule.inputs},
            grad_params={name: adj.grad_params.get(name) is not None for name in adj.program.params},
            has_read=self.plan.read_log is not None)


def generate(rule, dim_sizes: dict) -> PrologueSpec:
    """The prologue kernels of ``rule`` (a ``Rule`` of the delta family) at these sizes."""
    return _PrologueGenerator(rule, dim_sizes).generate()



def aot_module(rule, dim_sizes: dict):
    """The prologue kernels as an ``aot.GeneratedModule`` for a build report: inputs and
    params in the caller's dtype, the quantities and their gradients fp32."""
    from . import aot
    spec = generate(rule, dim_sizes)

    def types(args):
        return {a: aot.DATA if a.startswith(("p_in_", "p_par_")) else "*fp32" if a.startswith("p_")
                else "i32" for a in args}

    variant = ", ".join(f"{d}={n}" for d, n in dim_sizes.items())
    entries = [aot.KernelEntry(name, types(args), {"TOKB": TOKENS_PER_PROGRAM}, 4, variant)
               for name, args in ((spec.forward_name, spec.forward_args),
                                  (spec.backward_name, spec.backward_args))]
    return aot.GeneratedModule("chunk-delta-prologue", f"{rule.name}_chunk_prologue.py", spec.source,
                               entries)
