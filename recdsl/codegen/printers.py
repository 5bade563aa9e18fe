"""sympy -> PyTorch text and sympy -> Triton text, and ssa programs -> PyTorch source.

The expression printers are small subclasses of sympy's ``StrPrinter``: a table from
function to target text, plus the few forms that need care (powers, max/min, Heaviside).
Symbols print through a mapping the caller gives (a leaf may print as a broadcast view).
"""
from __future__ import annotations

import sympy
from sympy.printing.str import StrPrinter

from ..ir import symbolic
from ..ir.ssa import Elementwise, MatMul, Program, Reduce, Source, TopkMask, Val


class _ExprPrinter(StrPrinter):
    """Shared logic; subclasses give ``functions`` (name -> format with {0}, {1})."""

    functions: dict = {}

    def __init__(self, names: dict | None = None):
        super().__init__({"order": "none"})
        self.names = names or {}

    def _print_Symbol(self, expr):
        return self.names.get(expr, expr.name)

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Rational(self, expr):
        return repr(float(expr))

    def _print_Integer(self, expr):
        return str(int(expr))

    def _call(self, name, *args):
        return self.functions[name].format(*[self._print(a) for a in args])

    def _print_Function(self, expr):
        name = type(expr).__name__
        if name in self.functions:
            return self._call(name, *expr.args)
        raise NotImplementedError(f"no printer for the function {name}")

    def _print_exp(self, expr):
        return self._call("exp", expr.args[0])

    def _print_log(self, expr):
        return self._call("log", expr.args[0])

    def _print_tanh(self, expr):
        return self._call("tanh", expr.args[0])

    def _print_cos(self, expr):
        return self._call("cos", expr.args[0])

    def _print_sin(self, expr):
        return self._call("sin", expr.args[0])

    def _print_Abs(self, expr):
        return self._call("abs", expr.args[0])

    def _print_sign(self, expr):
        return self._call("sign", expr.args[0])

    def _print_Heaviside(self, expr):
        at_zero = expr.args[1] if len(expr.args) > 1 else sympy.Rational(1, 2)
        return self._call("heaviside", expr.args[0], at_zero)

    def _fold(self, name, args):
        text = self._print(args[0])
        for a in args[1:]:
            text = self.functions[name].format(text, self._print(a))
        return text

    def _print_Max(self, expr):
        return self._fold("max", expr.args)

    def _print_Min(self, expr):
        return self._fold("min", expr.args)

    def _print_Pow(self, expr, rational=False):
        base, e = expr.args
        if e == sympy.Rational(1, 2):
            return self._call("sqrt", base)
        if e == -sympy.Rational(1, 2):
            return self._call("rsqrt", base)
        if e == -1:
            return f"(1 / {self.parenthesize(base, 100)})"
        if e.is_Integer and 1 < int(e) <= 4:
            factor = self.parenthesize(base, 100)
            return "(" + " * ".join([factor] * int(e)) + ")"
        if e.is_Integer and -4 <= int(e) < -1:
            factor = self.parenthesize(base, 100)
            return "(1 / (" + " * ".join([factor] * -int(e)) + "))"
        return self.power(base, e)

    def power(self, base, e):
        return f"({self.parenthesize(base, 100)} ** {self.parenthesize(e, 100)})"


class TorchPrinter(_ExprPrinter):
    """Expressions over batched tensors (or numbers); ``_rt`` is recdsl.codegen.torch_support."""

    functions = {
        "exp": "torch.exp({0})", "log": "torch.log({0})", "sqrt": "torch.sqrt({0})",
        "rsqrt": "torch.rsqrt({0})", "abs": "torch.abs({0})", "tanh": "torch.tanh({0})",
        "sigmoid": "torch.sigmoid({0})", "logsigmoid": "_rt.logsigmoid({0})",
        "softplus": "_rt.softplus({0})", "silu": "_rt.silu({0})", "relu": "torch.relu({0})",
        "max": "_rt.maximum({0}, {1})", "min": "_rt.minimum({0}, {1})", "sign": "torch.sign({0})",
        "heaviside": "_rt.heaviside({0}, {1})", "cos": "torch.cos({0})", "sin": "torch.sin({0})",
    }


class TritonPrinter(_ExprPrinter):
    """Expressions over Triton blocks; stable forms for the log-sum-exp family."""

    functions = {
        "exp": "tl.exp({0})", "log": "tl.log({0})", "sqrt": "tl.sqrt({0})",
        "rsqrt": "tl.rsqrt({0})", "abs": "tl.abs({0})",
        "tanh": "(2.0 * tl.sigmoid(2.0 * ({0})) - 1.0)",
        "sigmoid": "tl.sigmoid({0})",
        "logsigmoid": "(tl.minimum({0}, 0.0) - tl.log(1.0 + tl.exp(-tl.abs({0}))))",
        "softplus": "(tl.maximum({0}, 0.0) + tl.log(1.0 + tl.exp(-tl.abs({0}))))",
        "silu": "(({0}) * tl.sigmoid({0}))", "relu": "tl.maximum({0}, 0.0)",
        "max": "tl.maximum({0}, {1})", "min": "tl.minimum({0}, {1})",
        "sign": "tl.where(({0}) > 0, 1.0, tl.where(({0}) < 0, -1.0, 0.0))",
        "heaviside": "tl.where(({0}) > 0, 1.0, tl.where(({0}) == 0, {1}, 0.0))",
        "cos": "tl.cos({0})", "sin": "tl.sin({0})",
    }

    def power(self, base, e):
        # Triton has no general power: exp(e * log(base)), valid for base > 0 as in the language
        return f"tl.exp({self.parenthesize(e, 100)} * tl.log({self._print(base)}))"


def cse_lines(exprs: list, prefix: str):
    """Common subexpressions bound once: returns ([(temp symbol, expr)], reduced exprs)."""
    replacements, reduced = sympy.cse(exprs, symbols=sympy.numbered_symbols(prefix),
                                      optimizations="basic", order="none")
    return replacements, reduced


def substitute_dims(expr, dim_sizes: dict | None):
    if not dim_sizes:
        return expr
    return expr.xreplace({symbolic.dim_symbol(d): sympy.Integer(n) for d, n in dim_sizes.items()})


# ---------------------------------------------------------------- ssa -> PyTorch source

def _torch_view(val: Val, axes: tuple, rank: int) -> str:
    """A batched value [B, H, *its axes] as a view broadcastable to a rank-``rank`` op."""
    if axes == tuple(range(rank)):
        return val.id
    index = ", ".join(":" if a in axes else "None" for a in range(rank))
    return f"{val.id}[:, :, {index}]"


def torch_program(program: Program, fn_name: str, args: list, results: list,
                  dim_sizes: dict | None = None, fuse: bool = False) -> str:
    """PyTorch source of ``def fn_name(*args)`` running ``program`` on batched tensors
    ([B, H, *shape] per value) and returning ``results`` (a Val, or None for no gradient).
    ``fuse``: a sum of a product of two operands is one einsum (``fused_sums``)."""
    lines = [f"def {fn_name}({', '.join(a.id for a in args)}):"]
    body = []
    given = {a.id for a in args}
    fused = fused_sums(program) if fuse else {}
    for k, op in enumerate(program.ops):
        if isinstance(op, Source) and op.out.id not in given:
            raise ValueError(f"{op.out.id} is not among the arguments")
        body.extend(fused[id(op)] if id(op) in fused else torch_op_lines(op, k, args[0].id, dim_sizes))
    body.append("return (" + "".join(f"{r.id if r is not None else 'None'}, " for r in results) + ")")
    return "\n".join(lines + ["    " + line for line in body]) + "\n"


def fused_sums(program: Program) -> dict:
    """id(op) -> its lines, for the ops a sum of a two-operand product becomes: the product
    (used only by the sum) prints nothing and the sum is ``torch.einsum`` (``R @ h`` as one
    batched matrix product, not an [R's shape] temporary per token). Operands broadcast over
    B and H (a param may come as [1, H, ...])."""
    uses = {}
    for op in program.ops:
        for v in ([leaf.val for leaf in op.leaves] if isinstance(op, Elementwise) else
                  [op.arg] if isinstance(op, (Reduce, TopkMask)) else
                  [op.a, op.b] if isinstance(op, MatMul) else []):
            uses[v.id] = uses.get(v.id, 0) + 1
    for v in list(program.outputs.values()) + list(program.states_out.values()):
        uses[v.id] = uses.get(v.id, 0) + 1
    producers = {op.outs[0].id: op for op in program.ops
                 if isinstance(op, Elementwise) and len(op.outs) == 1}
    out = {}
    for op in program.ops:
        if not (isinstance(op, Reduce) and op.kind == "sum" and uses.get(op.arg.id) == 1):
            continue
        prod = producers.get(op.arg.id)
        if prod is None:
            continue
        expr = prod.exprs[0]
        leaves = {leaf.sym: leaf for leaf in prod.leaves}
        if not (isinstance(expr, sympy.Mul) and len(expr.args) == 2
                and all(a in leaves for a in expr.args)):
            continue
        letters = "ijklmnopqrstuvw"
        a, b = (leaves[x] for x in expr.args)
        spec = (f"bh{''.join(letters[x] for x in a.axes)},bh{''.join(letters[x] for x in b.axes)}"
                f"->bh{''.join(letters[x] for x in op.keep)}")
        out[id(prod)] = []
        out[id(op)] = [f"{op.out.id} = torch.einsum({spec!r}, {a.val.id}, {b.val.id})"]
    return out


def torch_op_lines(op, k: int, ref: str, dim_sizes: dict | None) -> list:
    """The PyTorch lines computing op number ``k`` (none for a Source: an argument); ``ref``
    names a batched argument (B and H of broadcast constants)."""
    body = []
    if isinstance(op, Source):
        return body
    if isinstance(op, Elementwise):
        rank = len(op.shape)
        names = {leaf.sym: _torch_view(leaf.val, leaf.axes, rank) for leaf in op.leaves}
        printer = TorchPrinter(names)
        exprs = [substitute_dims(e, dim_sizes) for e in op.exprs]
        temps, reduced = cse_lines(exprs, f"c{k}_")
        for sym, e in temps:
            body.append(f"{sym.name} = {printer.doprint(e)}")
        for out, e, original in zip(op.outs, reduced, exprs):
            text = printer.doprint(e)
            if not _covers(op, original):  # e.g. a constant, or a vector broadcast to a matrix
                text = f"_rt.broadcast({text}, {ref}, {_dims_text(out, dim_sizes)})"
            body.append(f"{out.id} = {text}")
    elif isinstance(op, Reduce):
        rank = len(op.arg.shape)
        axes = tuple(2 + a for a in range(rank) if a not in op.keep)
        if op.kind == "sum":
            body.append(f"{op.out.id} = {op.arg.id}.sum(dim={axes})" if axes else f"{op.out.id} = {op.arg.id}")
        else:
            body.append(f"{op.out.id} = {op.arg.id}.amax(dim={axes})" if axes else f"{op.out.id} = {op.arg.id}")
    elif isinstance(op, TopkMask):
        body.append(f"{op.out.id} = _rt.topk_mask({op.arg.id}, {op.count})")
    elif isinstance(op, MatMul):
        a = f"{op.a.id}.transpose(-1, -2)" if op.ta else op.a.id
        b = f"{op.b.id}.transpose(-1, -2)" if op.tb else op.b.id
        body.append(f"{op.out.id} = {a} @ {b}")
    else:
        raise AssertionError(op)
    return body


def _covers(op: Elementwise, expr) -> bool:
    """Does ``expr`` have an operand spanning every axis (so it already has the op's shape)?"""
    full = tuple(range(len(op.shape)))
    return any(leaf.axes == full and leaf.sym in expr.free_symbols for leaf in op.leaves)


def _dims_text(val: Val, dim_sizes):
    if dim_sizes is None:
        return "(" + "".join(f"dim_{d}, " for d in val.shape) + ")"
    return "(" + "".join(f"{dim_sizes[d]}, " for d in val.shape) + ")"
