"""Syntax tree -> checked rule: resolve names and dims, infer every expression's symbolic
shape, and enforce the rules of LANGUAGE.md. Every violation is a positioned SpecError."""
from __future__ import annotations

import difflib
import math

from ..errors import RecdslError, SpecError, source_lines
from ..grammar import ast
from . import builtins, shapes
from .checked import CheckedRule, Var
from .shapes import Diag

_VERBS = {"+": "add", "-": "subtract", "*": "multiply", "/": "divide"}

# The keyword arguments of a rule call (Rule.__call__, Rule.bind): an input or param of one
# of these names could not be passed by name.
CALL_KEYWORDS = ("self", "initial_state", "output_final_state", "backend", "cu_seqlens")


def _a(kind: str) -> str:
    """'an input', 'a state', 'a loop variable': a kind of name with its article."""
    word = "loop variable" if kind == "loop" else kind
    return ("an " if word[0] in "aeiou" else "a ") + word


class _Scope:
    """Names visible at a point of the rule: declarations, lets, outputs, loop variables."""

    def __init__(self, parent=None):
        self.parent = parent
        self.names = {}  # name -> (kind, shape, pos)

    def lookup(self, name):
        scope = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.parent
        return None

    def all_names(self):
        scope, out = self, set()
        while scope is not None:
            out |= set(scope.names)
            scope = scope.parent
        return out


class Checker:
    def __init__(self, tree: ast.RuleFile, consts: dict | None = None):
        self.tree = tree
        self.overrides = dict(consts or {})
        self.global_scope = _Scope()
        self.dims: list = []
        self.vars = {"state": [], "input": [], "param": []}
        self.consts: dict = {}
        self.outputs: list = []
        self.updated: set = set()
        self.loops: dict = {}  # loop variable -> dim, for enclosing loops
        self.block_lets: dict = {}  # name -> line of its 'for', for lets of finished blocks

    # ------------------------------------------------------------ errors

    def error(self, message, pos: ast.Pos, hint=""):
        return SpecError(message, line=pos.line, column=pos.column, source=self.tree.source,
                         filename=self.tree.filename, hint=hint, length=pos.length)

    def _suggest(self, name, candidates):
        close = difflib.get_close_matches(name, sorted(candidates), n=1)
        return f"did you mean '{close[0]}'?" if close else ""

    # ------------------------------------------------------------ declarations

    def bind(self, scope, name, kind, shape, pos):
        previous = scope.lookup(name)
        if previous is not None:
            kind0, _, pos0 = previous
            if kind == "let" and kind0 in ("input", "param", "const", "state", "dim"):
                message = f"'{name}' is already declared as {_a(kind0)} (line {pos0.line}); {kind0}s cannot be re-bound"
            else:
                message = f"'{name}' is already bound as {_a(kind0)} on line {pos0.line}"
            raise self.error(message, pos, "a name may be bound once; choose a new name")
        scope.names[name] = (kind, shape, pos)

    def declare(self, item):
        if isinstance(item, ast.DimsDecl):
            for name, pos in zip(item.names, item.positions):
                self.bind(self.global_scope, name, "dim", (), pos)
                self.dims.append(name)
        elif isinstance(item, ast.VarsDecl):
            for var in item.vars:
                for dim, pos in zip(var.dims, var.dim_pos):
                    if dim not in self.dims:
                        found = self.global_scope.lookup(dim)
                        hint = (f"declare it first: 'dims {dim}'" if found is None
                                else f"'{dim}' is {_a(found[0])}, not a dim")
                        raise self.error(f"unknown dim '{dim}' in the shape of {item.kind} '{var.name}'", pos, hint)
                if len(var.dims) > 2:
                    raise self.error(f"{item.kind} '{var.name}' has rank {len(var.dims)}; "
                                     f"ranks 0 to 2 are supported", var.pos)
                if item.kind in ("input", "param") and var.name in CALL_KEYWORDS:
                    raise self.error(f"{item.kind} '{var.name}' has the name of a keyword argument of "
                                     f"the rule call, so it could not be passed by name", var.pos,
                                     "rename it; the call's own arguments are " + ", ".join(CALL_KEYWORDS[1:]))
                self.bind(self.global_scope, var.name, item.kind, tuple(var.dims), var.pos)
                self.vars[item.kind].append(Var(var.name, tuple(var.dims), item.kind, var.pos))
        elif isinstance(item, ast.ConstDecl):
            value = item.value
            if item.name in self.overrides:
                value = self.overrides.pop(item.name)
            self.bind(self.global_scope, item.name, "const", (), item.pos)
            self.consts[item.name] = value
        else:
            raise AssertionError(item)

    # ------------------------------------------------------------ expressions

    def expr(self, e, scope, allow_diag=False):
        shape = self._expr(e, scope)
        if isinstance(shape, Diag) and not allow_diag:
            raise self.error("diag(x) can only be a factor of '@'", ast.expr_span(e),
                             "write diag(x) @ S to scale the rows of S, or S @ diag(x) to scale its columns")
        e.shape = shape
        return shape

    def _expr(self, e, scope):
        if isinstance(e, ast.Num):
            return ()
        if isinstance(e, ast.Name):
            return self.name(e, scope)
        if isinstance(e, ast.Index):
            return self.index(e, scope)
        if isinstance(e, ast.Neg):
            return self.expr(e.operand, scope)
        if isinstance(e, ast.Call):
            return self.call(e, scope)
        if isinstance(e, ast.BinOp):
            return self.binop(e, scope)
        raise AssertionError(e)

    def name(self, e: ast.Name, scope):
        found = scope.lookup(e.id)
        if found is None:
            if e.id in builtins.ALL:
                raise self.error(f"'{e.id}' is a function; call it with arguments: {e.id}(...)", e.pos)
            if e.id in self.block_lets:
                raise self.error(f"'{e.id}' is not visible here: it is bound inside the 'for' block of "
                                 f"line {self.block_lets[e.id]}, and a let in a block lives for one step",
                                 e.pos, "compute the value after the block, or accumulate it in a state")
            raise self.error(f"unknown name '{e.id}'", e.pos, self._suggest(e.id, scope.all_names()))
        kind, shape, _ = found
        if kind == "loop":
            raise self.error(f"loop variable '{e.id}' can only index an input", e.pos,
                             f"write e.g. k[{e.id}] for an input declared k[{self.loops[e.id]}, ...]")
        e.kind = kind
        return shape

    def index(self, e: ast.Index, scope):
        target, idx = e.target, e.index
        found = scope.lookup(target.id)
        if found is None:
            raise self.error(f"unknown name '{target.id}'", target.pos, self._suggest(target.id, scope.all_names()))
        loop = scope.lookup(idx.id)
        if loop is None or loop[0] != "loop":
            raise self.error(f"'{idx.id}' is not a loop variable; only inputs can be indexed, "
                             f"by the variable of an enclosing 'for'", idx.pos,
                             "write 'for j in NH:' and index k[j] inside it")
        kind, shape, _ = found
        dim = self.loops[idx.id]
        if kind not in ("input", "param") or not shape or shape[0] != dim:
            raise self.error(f"'{target.id}' cannot be indexed by '{idx.id}': only an input whose "
                             f"leading dim is {dim} can be", e.pos,
                             f"declare it as 'input {target.id}[{dim}, ...]'")
        target.kind, target.shape = kind, shape
        idx.kind, idx.shape = "loop", ()
        return shape[1:]

    def call(self, e: ast.Call, scope):
        if e.fn not in builtins.ALL:
            found = scope.lookup(e.fn)
            if found is not None:
                raise self.error(f"'{e.fn}' is {_a(found[0])}, not a function", e.pos)
            raise self.error(f"unknown function '{e.fn}'", e.pos,
                             self._suggest(e.fn, builtins.ALL) or "the built-ins are " + ", ".join(builtins.ALL))
        arity = builtins.ARITY[e.fn]
        if len(e.args) != arity:
            raise self.error(f"{e.fn}() takes {arity} argument{'s' if arity > 1 else ''}, "
                             f"{len(e.args)} given", e.pos)
        if e.fn == "keep_topk":
            arg_shapes = [self.expr(e.args[0], scope), self.constant_int(e.args[1], scope)]
        else:
            arg_shapes = [self.expr(a, scope) for a in e.args]
        shape, problem = builtins.result_shape(e.fn, arg_shapes)
        if problem is not None:
            message, hint, i = problem
            got = ", ".join(shapes.show(s) for s in arg_shapes)
            raise self.error(f"{message}; got {got}", ast.expr_span(e.args[i]), hint)
        return shape

    def constant_int(self, e, scope):
        """keep_topk's count: numbers, consts and dims only (known before the sequence runs)."""
        for node in ast.walk(e):
            if isinstance(node, ast.Name):
                found = scope.lookup(node.id)
                if found is None or found[0] not in ("const", "dim"):
                    raise self.error("the count of keep_topk must be known before the sequence runs: "
                                     "use numbers, consts and dims only", node.pos)
            elif isinstance(node, ast.Call):
                raise self.error("the count of keep_topk must be a number, a const or a dim", node.pos)
        self.expr(e, scope)
        if not any(isinstance(n, ast.Name) and scope.lookup(n.id)[0] == "dim" for n in ast.walk(e)):
            value = evaluate_constant(e, self.consts, {})
            if not math.isfinite(value) or value != int(value) or value < 1:
                raise self.error(f"the count of keep_topk must be a positive whole number, not {value:g}",
                                 ast.expr_span(e))
        return ()

    def binop(self, e: ast.BinOp, scope):
        if e.op == "@":
            a = self.expr(e.left, scope, allow_diag=True)
            b = self.expr(e.right, scope, allow_diag=True)
            out = shapes.matmul(a, b)
            if out is None:
                raise self.error(self._matmul_problem(a, b), e.start, self._matmul_hint(a, b))
            return out
        a = self.expr(e.left, scope)
        b = self.expr(e.right, scope)
        if e.op == "**":
            if b != ():
                raise self.error(f"the exponent of '**' must be a scalar, not {shapes.show(b)}", ast.expr_span(e.right))
            return a
        out = shapes.elementwise(a, b)
        if out is None:
            hint = ""
            if e.op in "*/" and {len(a), len(b)} == {1, 2}:
                vec, mat = (a, b) if len(a) == 1 else (b, a)
                if vec[0] == mat[0]:
                    hint = f"to scale the rows of a {shapes.show(mat)} matrix write diag(x) @ S"
                elif vec[0] == mat[1]:
                    hint = f"to scale the columns of a {shapes.show(mat)} matrix write S @ diag(x)"
                else:
                    hint = "write diag(x) @ S to scale rows, S @ diag(x) to scale columns"
                message = f"cannot {_VERBS[e.op]} {shapes.show(a)} and {shapes.show(b)}: a vector times a matrix is not elementwise"
            else:
                message = f"cannot {_VERBS[e.op]} {shapes.show(a)} and {shapes.show(b)}"
                hint = "elementwise operations need equal shapes, or a scalar on one side"
            raise self.error(message, e.start, hint)
        return out

    @staticmethod
    def _matmul_problem(a, b):
        if a == () or b == ():
            return f"'@' needs vectors or matrices, not {shapes.show(a)} and {shapes.show(b)}"
        if isinstance(a, Diag) and isinstance(b, Diag):
            return "cannot multiply two diag() factors"
        return f"cannot multiply {shapes.show(a)} @ {shapes.show(b)}: the inner dims do not match"

    @staticmethod
    def _matmul_hint(a, b):
        if a == () or b == ():
            return "use '*' to scale by a scalar"
        if isinstance(a, Diag) and isinstance(b, Diag):
            return "write diag(x * y) for the product of diag(x) and diag(y)"
        if isinstance(a, Diag):
            return f"diag(x) @ S scales the rows of S: x must be [{b[0]}], the first dim of S"
        if isinstance(b, Diag):
            return f"S @ diag(x) scales the columns of S: x must be [{a[-1]}], the last dim of S"
        return "x @ S contracts x with the first axis of S; S @ x contracts with its last"

    # ------------------------------------------------------------ statements

    def statements(self, items, scope, in_loop=False):
        body = []
        for item in items:
            if isinstance(item, (ast.DimsDecl, ast.VarsDecl, ast.ConstDecl)):
                raise self.error("declarations come before statements", item.pos,
                                 "move this declaration above the first let, update, for or output")
            if isinstance(item, ast.Let):
                shape = self.expr(item.value, scope)
                self.bind(scope, item.name, "let", shape, item.pos)
            elif isinstance(item, ast.Update):
                self.update(item, scope)
            elif isinstance(item, ast.Output):
                if in_loop:
                    raise self.error("an output cannot be inside a 'for' block", item.pos,
                                     "compute a value in the block and write the output after it")
                shape = self.expr(item.value, scope)
                self.bind(scope, item.name, "output", shape, item.name_pos)
                self.outputs.append(Var(item.name, shape, "output", item.name_pos))
            elif isinstance(item, ast.For):
                if item.dim not in self.dims:
                    found = scope.lookup(item.dim)
                    hint = (f"declare it: 'dims ..., {item.dim}'" if found is None else
                            f"'{item.dim}' is {_a(found[0])}; declare a dim (e.g. 'dims NH') and loop over it")
                    raise self.error(f"'{item.dim}' is not a dim; a 'for' loop runs over a dim", item.dim_pos, hint)
                inner = _Scope(scope)
                self.bind(inner, item.var, "loop", (), item.var_pos)
                self.loops[item.var] = item.dim
                self.statements(item.body, inner, in_loop=True)
                del self.loops[item.var]
                for name, (kind, _, _) in inner.names.items():
                    if kind == "let":
                        self.block_lets.setdefault(name, item.pos.line)
            else:
                raise AssertionError(item)
            body.append(item)
        return body

    def update(self, item: ast.Update, scope):
        found = scope.lookup(item.state)
        if found is None or found[0] != "state":
            if found is None:
                message = f"'{item.state}' is not a state"
                hint = f"to bind a per-token value write 'let {item.state} = ...'; to declare a state, 'state {item.state}[...]'"
            else:
                kind = found[0]
                message = f"cannot assign to {kind} '{item.state}': only states take updates"
                hint = f"bind a new name with 'let'" if kind in ("input", "param", "const", "let", "output") else ""
            raise self.error(message, item.pos, hint)
        shape = self.expr(item.value, scope)
        if shape != found[1]:
            raise self.error(f"state '{item.state}' is {shapes.show(found[1])} but the new value is {shapes.show(shape)}",
                             ast.expr_span(item.value))
        self.updated.add(item.state)

    # ------------------------------------------------------------ the whole rule

    def check(self) -> CheckedRule:
        items = list(self.tree.items)
        first_statement = next((i for i, it in enumerate(items)
                                if not isinstance(it, (ast.DimsDecl, ast.VarsDecl, ast.ConstDecl))), len(items))
        for item in items[:first_statement]:
            self.declare(item)
        if self.overrides:
            names = ", ".join(sorted(self.consts)) or "none"
            raise RecdslError(f"{self.tree.filename}: rule '{self.tree.name}' has no const "
                              f"{', '.join(repr(k) for k in sorted(self.overrides))}; its consts are: {names}")
        self._check_dims_bindable()
        scope = _Scope(self.global_scope)
        body = self.statements(items[first_statement:], scope)
        for var in self.vars["state"]:
            if var.name not in self.updated:
                raise self.error(f"state '{var.name}' is never updated", var.pos,
                                 f"add an update such as '{var.name} = ...', or make it an input")
        if not self.outputs:
            last = len(source_lines(self.tree.source.rstrip("\n"))) or 1
            raise self.error(f"rule '{self.tree.name}' has no output", ast.Pos(last, 1),
                             "add e.g. 'output o = q @ S'")
        return CheckedRule(
            name=self.tree.name, filename=self.tree.filename, source=self.tree.source,
            dims=tuple(self.dims), states=tuple(self.vars["state"]), inputs=tuple(self.vars["input"]),
            params=tuple(self.vars["param"]), consts=dict(self.consts), body=body,
            outputs=tuple(self.outputs))

    def _check_dims_bindable(self):
        if not self.vars["input"]:
            raise self.error(f"rule '{self.tree.name}' has no input", self.tree.name_pos,
                             "declare the per-token inputs, e.g. 'input q[K], k[K], v[V]'")
        used = {d for kind in ("input", "param") for v in self.vars[kind] for d in v.dims}
        for name in self.dims:
            if name not in used:
                _, _, pos = self.global_scope.lookup(name)
                raise self.error(f"dim '{name}' is in no input or param shape, so its size cannot be "
                                 f"read from the tensors passed in", pos,
                                 "use it in the shape of an input or param, or remove it")


def evaluate_constant(e, consts: dict, dim_sizes: dict) -> float:
    """The value of an expression of numbers, consts and dims (keep_topk's count)."""
    if isinstance(e, ast.Num):
        return e.value
    if isinstance(e, ast.Name):
        return consts[e.id] if e.id in consts else dim_sizes[e.id]
    if isinstance(e, ast.Neg):
        return -evaluate_constant(e.operand, consts, dim_sizes)
    if isinstance(e, ast.BinOp):
        a, b = evaluate_constant(e.left, consts, dim_sizes), evaluate_constant(e.right, consts, dim_sizes)
        return _arithmetic(e.op, a, b)
    raise AssertionError(e)


def topk_count(call: ast.Call, rule, dim_sizes: dict) -> int:
    """keep_topk's count for these dim sizes; a clear error when it is not a positive whole
    number (a count written with dims is only known at call time)."""
    value = evaluate_constant(call.args[1], rule.consts, dim_sizes)
    if not (value == value and abs(value) != math.inf and value == int(value) and value >= 1):
        pos = call.args[1].start if isinstance(call.args[1], ast.BinOp) else call.args[1].pos
        raise RecdslError(f"{rule.filename}:{pos.line}:{pos.column}: the count of keep_topk is "
                          f"{value:g} for dims {dim_sizes}; it must be a positive whole number")
    return int(value)


def _arithmetic(op: str, a: float, b: float) -> float:
    """``a op b`` in floats, never raising: an undefined result is nan, an overflow inf
    (Python's own ``**`` raises on overflow and returns complex numbers for (-8) ** 0.5)."""
    try:
        if op == "/":
            return a / b if b else (math.copysign(math.inf, a) if a else math.nan)
        if op == "**":
            return math.pow(a, b)
        return {"+": a + b, "-": a - b, "*": a * b}[op]
    except OverflowError:
        return math.inf
    except (ValueError, ZeroDivisionError):
        return math.nan


def check(tree: ast.RuleFile, consts: dict | None = None) -> CheckedRule:
    """Check a parsed rule; ``consts`` override the values of its ``const`` declarations."""
    for name, value in (consts or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecdslError(f"const '{name}' must be a number, not {type(value).__name__}")
    return Checker(tree, consts).check()
