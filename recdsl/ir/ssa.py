"""One token of a rule as a straight-line program of a few structured operations.

The checked statements are lowered into single-assignment values (``Val``) computed by:

- ``Source``: an input (or one slice ``k[j]`` of a stepped input), a param, a state's value at
  the start of the token, or (in an adjoint program) an upstream gradient;
- ``Elementwise``: sympy expressions over operands that each span some axes of the result
  (``Leaf.axes``): a scalar broadcasts everywhere, a vector along one axis of a matrix. So
  ``outer(a, b)``, ``diag(x) @ S``, ``beta * S`` are all elementwise with broadcasting;
- ``Reduce``: a sum (or a max, which carries no gradient) over the axes not kept: this with
  broadcasting gives ``x @ S``, ``S @ x``, ``dot``, ``sum``, ``norm`` and the norm of
  ``l2norm``;
- ``TopkMask``: 1 on the n largest entries of a vector, 0 elsewhere (no gradient), so
  ``keep_topk(x, n) = x * mask``; softmax is ``exp(x - max) / sum``;
- ``MatMul``: a matrix product of two matrices.

``for`` blocks are unrolled: the program is specialised to the sizes of loop dims. Dims stay
symbols (``dim_K``) in expressions; consts are numbers. Names in the program are prefixed
(``let_kn``, ``in_q``), never raw rule text, so printed code cannot collide with Python.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

import sympy

from ..grammar import ast
from . import builtins
from .checked import CheckedRule
from .checker import topk_count
from .shapes import Diag
from .symbolic import FUNCTIONS, dim_symbol, symbol


@dataclass(eq=False)
class Val:
    id: str
    shape: tuple  # dim names

    def __repr__(self):
        return f"{self.id}{list(self.shape)}"


@dataclass(eq=False)
class Leaf:
    """An operand of an elementwise op: value ``val`` spanning axes ``axes`` of the op."""
    val: Val
    axes: tuple
    sym: sympy.Symbol


@dataclass(eq=False)
class Source:
    out: Val
    kind: str  # input, param, state, grad_output, grad_state
    name: str
    index: int | None = None  # j for k[j]


@dataclass(eq=False)
class Elementwise:
    outs: list
    exprs: list  # one sympy expression per out
    leaves: list
    shape: tuple


@dataclass(eq=False)
class Reduce:
    out: Val
    arg: Val
    keep: tuple  # axes of arg that remain, in order
    kind: str = "sum"  # or "max" (no gradient)


@dataclass(eq=False)
class TopkMask:
    out: Val
    arg: Val
    count: int


@dataclass(eq=False)
class MatMul:
    out: Val
    a: Val
    b: Val
    ta: bool = False  # use a transposed (adjoint programs only)
    tb: bool = False


NO_GRADIENT = (TopkMask,)


def outs_of(op) -> list:
    return op.outs if isinstance(op, Elementwise) else [op.out]


@dataclass
class Program:
    ops: list
    inputs: dict = field(default_factory=dict)  # (name, index or None) -> Val
    params: dict = field(default_factory=dict)  # name -> Val
    states_in: dict = field(default_factory=dict)  # name -> Val
    states_out: dict = field(default_factory=dict)  # name -> Val
    outputs: dict = field(default_factory=dict)  # name -> Val
    dims: tuple = ()  # dim names whose symbols may appear in expressions

    def sources(self):
        return [op for op in self.ops if isinstance(op, Source)]


# ---------------------------------------------------------------- lowering

@dataclass
class _Term:
    """A value not yet materialised: a sympy expression over leaves, of a given shape."""
    expr: sympy.Expr
    shape: tuple
    leaves: dict  # sympy Symbol -> Leaf


@dataclass
class _DiagTerm:
    vector: _Term


class _Lowering:
    def __init__(self, rule: CheckedRule, dim_sizes: dict):
        self.rule = rule
        self.loop_sizes = dim_sizes
        self.ops = []
        self.program = Program(self.ops, dims=rule.dims)
        self.ids = count()
        self._syms = {}  # (Val, axes) -> Symbol
        self.state_version = {}

    # values and leaves
    def new_val(self, hint, shape):
        # the counter after the last '_' makes every id unique, whatever the rule's names are
        return Val(f"{hint}_{next(self.ids)}", tuple(shape))

    def leaf_term(self, val: Val, shape=None, axes=None) -> _Term:
        shape = val.shape if shape is None else shape
        axes = tuple(range(len(val.shape))) if axes is None else axes
        key = (val, axes)
        if key not in self._syms:
            # the same value broadcast along other axes is another operand: another symbol
            plain = axes == tuple(range(len(val.shape)))
            self._syms[key] = symbol(val.id if plain else val.id + "__ax" + "".join(map(str, axes)))
        sym = self._syms[key]
        return _Term(sym, tuple(shape), {sym: Leaf(val, axes, sym)})

    def embed(self, term: _Term, shape, mapping) -> _Term:
        """The same term seen inside a larger shape: its axis i becomes axis mapping[i]."""
        subs, leaves = {}, {}
        for sym, leaf in term.leaves.items():
            axes = tuple(mapping[a] for a in leaf.axes)
            new = self.leaf_term(leaf.val, shape, axes)
            subs[sym] = new.expr
            leaves.update(new.leaves)
        return _Term(term.expr.xreplace(subs), tuple(shape), leaves)

    def materialize(self, term: _Term, hint="t") -> Val:
        if isinstance(term.expr, sympy.Symbol) and term.expr in term.leaves:
            leaf = term.leaves[term.expr]
            if leaf.axes == tuple(range(len(term.shape))) and leaf.val.shape == term.shape:
                return leaf.val
        out = self.new_val(hint, term.shape)
        self.ops.append(Elementwise([out], [term.expr], list(term.leaves.values()), term.shape))
        return out

    def source(self, kind, name, shape, index=None):
        prefix = {"input": "in", "param": "par", "state": "st"}[kind]
        out = self.new_val(f"{prefix}_{name}" + (f"_j{index}" if index is not None else ""), shape)
        self.ops.append(Source(out, kind, name, index))
        return out

    # expressions
    def combine(self, op, a: _Term, b: _Term) -> _Term:
        shape = a.shape if a.shape else b.shape
        expr = {"+": sympy.Add, "-": lambda x, y: x - y, "*": sympy.Mul, "/": lambda x, y: x / y,
                "**": sympy.Pow}[op](a.expr, b.expr)
        return _Term(expr, shape, {**a.leaves, **b.leaves})

    def reduce(self, term: _Term, keep, kind="sum", hint="r") -> _Term:
        arg = self.materialize(term)
        out = self.new_val(hint, tuple(term.shape[a] for a in keep))
        self.ops.append(Reduce(out, arg, tuple(keep), kind))
        return self.leaf_term(out)

    def matmul(self, a, b) -> _Term:
        if isinstance(a, _DiagTerm):
            d = a.vector
            if len(b.shape) == 2:
                return self.combine("*", self.embed(d, b.shape, {0: 0}), b)
            return self.combine("*", d, b)
        if isinstance(b, _DiagTerm):
            d = b.vector
            if len(a.shape) == 2:
                return self.combine("*", a, self.embed(d, a.shape, {0: 1}))
            return self.combine("*", a, d)
        ra, rb = len(a.shape), len(b.shape)
        if ra == 1 and rb == 2:  # x @ S: contract x with the rows of S
            return self.reduce(self.combine("*", self.embed(a, b.shape, {0: 0}), b), (1,))
        if ra == 2 and rb == 1:  # S @ x: contract with its columns
            return self.reduce(self.combine("*", a, self.embed(b, a.shape, {0: 1})), (0,))
        if ra == 1 and rb == 1:
            return self.reduce(self.combine("*", a, b), ())
        out = self.new_val("mm", (a.shape[0], b.shape[1]))
        self.ops.append(MatMul(out, self.materialize(a), self.materialize(b)))
        return self.leaf_term(out)

    def expr(self, e, env):
        if isinstance(e, ast.Num):
            value = sympy.Integer(int(e.value)) if e.value == int(e.value) and "." not in e.text and "e" not in e.text.lower() else sympy.Float(e.value)
            return _Term(value, (), {})
        if isinstance(e, ast.Name):
            if e.kind == "dim":
                return _Term(dim_symbol(e.id), (), {})
            if e.kind == "const":
                value = self.rule.consts[e.id]
                return _Term(sympy.Integer(value) if isinstance(value, int) else sympy.Float(value), (), {})
            return self.leaf_term(env[e.id])
        if isinstance(e, ast.Index):
            # k[j] inside an unrolled loop; k[1] (a number) in expressions built by later stages
            j = int(e.index.value) if isinstance(e.index, ast.Num) else env[e.index.id]
            return self.leaf_term(env[(e.target.id, j)])
        if isinstance(e, ast.Neg):
            t = self.expr(e.operand, env)
            return _Term(-t.expr, t.shape, t.leaves)
        if isinstance(e, ast.BinOp):
            a, b = self.expr(e.left, env), self.expr(e.right, env)
            if e.op == "@":
                return self.matmul(a, b)
            return self.combine(e.op, a, b)
        if isinstance(e, ast.Call):
            return self.call(e, env)
        raise AssertionError(e)

    def call(self, e: ast.Call, env):
        fn = e.fn
        if fn == "diag":
            return _DiagTerm(self.expr(e.args[0], env))
        args = [self.expr(a, env) for a in e.args] if fn != "keep_topk" else [self.expr(e.args[0], env)]
        if fn in FUNCTIONS and fn not in ("max", "min"):
            x = args[0]
            return _Term(FUNCTIONS[fn](x.expr), x.shape, x.leaves)
        if fn in ("max", "min"):
            return _Term(FUNCTIONS[fn](args[0].expr, args[1].expr), args[0].shape or args[1].shape,
                         {**args[0].leaves, **args[1].leaves})
        x = args[0]
        if fn == "dot":
            return self.reduce(self.combine("*", x, args[1]), ())
        if fn == "sum":
            return self.reduce(x, ())
        if fn == "norm":
            sq = self.reduce(self.combine("*", x, x), ())
            return _Term(sympy.sqrt(sq.expr), (), sq.leaves)
        if fn == "l2norm":
            sq = self.reduce(self.combine("*", x, x), ())
            inv = FUNCTIONS["rsqrt"](sq.expr + sympy.Float(builtins.L2NORM_EPS))
            return self.combine("*", x, _Term(inv, (), sq.leaves))
        if fn == "outer":
            shape = (x.shape[0], args[1].shape[0])
            return self.combine("*", self.embed(x, shape, {0: 0}), self.embed(args[1], shape, {0: 1}))
        if fn == "softmax":
            v = self.leaf_term(self.materialize(x))
            peak = self.reduce(v, (), kind="max", hint="peak")
            e_ = self.leaf_term(self.materialize(_Term(sympy.exp(v.expr - peak.expr), v.shape,
                                                       {**v.leaves, **peak.leaves}), "e"))
            total = self.reduce(e_, ())
            return _Term(e_.expr / total.expr, v.shape, {**e_.leaves, **total.leaves})
        if fn == "keep_topk":
            v = self.leaf_term(self.materialize(x))
            n = topk_count(e, self.rule, self.loop_sizes)
            mask = self.new_val("mask", v.shape)
            self.ops.append(TopkMask(mask, v.leaves[v.expr].val, n))
            return self.combine("*", v, self.leaf_term(mask))
        raise AssertionError(fn)

    # statements
    def run(self):
        env = self.bind_sources()
        self.statements(self.rule.body, env, "")
        for var in self.rule.states:
            self.program.states_out[var.name] = env[var.name]
        return self.program

    def bind_sources(self, states=True) -> dict:
        """Source ops for every input (and slice k[j]), param and (optionally) state."""
        rule = self.rule
        env = {}
        for var in rule.inputs:
            stepped = [st for st in _loops(rule.body) if var.dims and var.dims[0] == st.dim]
            if stepped and _indexed(rule.body, var.name):
                size = self.loop_sizes[var.dims[0]]
                for j in range(size):
                    val = self.source("input", var.name, var.dims[1:], j)
                    env[(var.name, j)] = val
                    self.program.inputs[(var.name, j)] = val
            if not stepped or _used_whole(rule.body, var.name):
                val = self.source("input", var.name, var.dims)
                env[var.name] = val
                self.program.inputs[(var.name, None)] = val
        for var in rule.params:
            env[var.name] = self.program.params[var.name] = self.source("param", var.name, var.dims)
            if var.dims and var.dims[0] in self.loop_sizes and _indexed(rule.body, var.name):
                raise NotImplementedError("indexing a param inside a loop")
        if states:
            for var in rule.states:
                env[var.name] = self.program.states_in[var.name] = self.source("state", var.name, var.dims)
        return env

    def statements(self, body, env, suffix):
        for st in body:
            if isinstance(st, ast.Let):
                env[st.name] = self.materialize(self.expr(st.value, env), f"let_{st.name}{suffix}")
            elif isinstance(st, ast.Update):
                env[st.state] = self.materialize(self.expr(st.value, env), f"st_{st.state}")
            elif isinstance(st, ast.Output):
                env[st.name] = self.program.outputs[st.name] = self.materialize(
                    self.expr(st.value, env), f"out_{st.name}")
            elif isinstance(st, ast.For):
                for j in range(self.loop_sizes[st.dim]):
                    inner = dict(env)
                    inner[st.var] = j
                    self.statements(st.body, inner, f"{suffix}_{st.var}{j}")
                    for var in self.rule.states:  # states carry out of each step; lets do not
                        env[var.name] = inner[var.name]
            else:
                raise AssertionError(st)


def _loops(body):
    return (st for st in ast.walk_statements(body) if isinstance(st, ast.For))


def _indexed(body, name):
    return any(isinstance(e, ast.Index) and e.target.id == name for e in ast.walk_body_expressions(body))


def _used_whole(body, name):
    return any(isinstance(e, ast.Name) and e.id == name for e in ast.walk_body_expressions(body))


def loop_dims(rule: CheckedRule) -> tuple:
    """The dims that ``for`` blocks run over; the program is specialised to their sizes."""
    return rule.loop_dims()


def lower(rule: CheckedRule, dim_sizes: dict | None = None) -> Program:
    """Lower one token of ``rule``. ``dim_sizes`` must give the size of every loop dim (loops
    are unrolled) and of dims in keep_topk counts; other dims stay symbols."""
    sizes = dict(dim_sizes or {})
    missing = [d for d in loop_dims(rule) if d not in sizes]
    if missing:
        raise ValueError(f"the sizes of the loop dims {missing} are needed to unroll the loops")
    return _Lowering(rule, sizes).run()


def lower_values(rule: CheckedRule, dim_sizes: dict, values: dict) -> Program:
    """A program computing named state-free per-token values (the prologue of the chunkwise
    kernels): ``values`` maps a name to an expression with no lets and no loop variables
    (lets inlined, ``k[j]`` written with a number). Every input and param is a source; the
    values are the program's ``outputs``, under their names."""
    low = _Lowering(rule, dict(dim_sizes))
    env = low.bind_sources(states=False)
    for name, e in values.items():
        low.program.outputs[name] = low.materialize(low.expr(e, env), f"val_{name}")
    return low.program
