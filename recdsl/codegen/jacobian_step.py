"""One token's step and its state Jacobian in one pass, as generated PyTorch source.

Forward-mode propagation of tangent matrices, decided at generation time from the ssa program
(``recdsl.ir.ssa``): every value that reads a state carries, per state ``s`` it reads, its
derivative with respect to ``s``'s *free* entries (the block's columns, ``ir.jacobian``), with
the tangent 1 on every channel at once (exact because ``J`` is block-diagonal over them).
A tangent is stored as ``[B, H, *value axes, *columns]`` with size 1 where it is constant,
and *tied* along a free axis of ``s`` when the value's entry i reads only ``s``'s entry i along
it (``ir.jacobian``'s ties): then that column is not stored (it is the diagonal), so a state's
own tangent is the number 1, ``sigmoid(x + R @ h)``'s is ``sigmoid' * R`` (``R``'s entries,
no matrix product) and a diagonal Jacobian is elementwise expressions.

- an elementwise op multiplies each operand's tangent by the operand's derivative (sympy's
  ``diff``, printed by ``TorchPrinter`` after ``cse``, reading the op's own outputs where the
  derivative contains them) and adds with ``addcmul``; operands tied differently are untied
  first (``_rt.untie``: times an identity). A single product stays *scaled* (a value-shaped
  factor times a tangent, not multiplied out): the next op folds the factor into its own
  coefficient, so ``c * sigmoid'(.) * R`` is one pass over ``R``'s shape, not two;
- a sum: a tied axis summed over becomes a column (the derivative of ``sum_j R[i, j] h[j]`` in
  ``h[f]`` is ``R[i, f]``), an untied one is summed (``_rt.tangent_sum``);
- a matrix product ``A @ B``: ``dA @ B + A @ dB`` over untied tangents (``_rt.tangent_mm``);
- a max (softmax's shift, which cancels) and a top-k mask carry no tangent (as in ``ir.vjp``).

The function takes the step's arguments (``torch_step``'s order) and returns the outputs, the
new states, then one block per coupled pair (new state ``s``, old state ``o``): ``d s / d o``
as ``[B, H, *s's dims, *o's free dims]`` (``JacobianSource.blocks`` lists the pairs).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import sympy

from ..ir.checked import CheckedRule
from ..ir.jacobian import Structure, structure
from ..ir.ssa import Elementwise, MatMul, Reduce, Source, TopkMask, lower
from ..ir.symbolic import symbol
from .printers import TorchPrinter, _torch_view, cse_lines, fused_sums, substitute_dims, torch_op_lines


@dataclass
class JacobianSource:
    source: str
    name: str
    sources: list  # the Source ops, in argument order
    n_outputs: int
    states: list  # state names, in order (the new states returned)
    blocks: list  # (new state, old state) per returned block, in order
    structure: Structure
    widest: int  # entries per batch row of the largest tangent (or block) it computes


@dataclass
class _Tan:
    name: str  # the variable holding it
    ties: tuple  # per free axis of the state: the value axis it is tied to, or None (a column)
    one: bool = False  # the state's own tangent: 1 (a product with it is the coefficient)
    scale: str | None = None  # the tangent is scale (value-shaped) times this one: not yet formed

    def cols(self):
        return [a for a, t in enumerate(self.ties) if t is None]


def _index(axes, rank):
    """Subscript viewing a tangent of an operand spanning ``axes`` inside a rank-``rank`` op."""
    if axes == tuple(range(rank)):
        return ""
    return "[:, :, " + ", ".join(":" if a in axes else "None" for a in range(rank)) + ", ...]"


class _Generator:
    def __init__(self, program, s: Structure, dim_sizes: dict):
        self.program, self.s, self.sizes = program, s, dim_sizes
        self.lines = []
        self.tan = {}  # (val id, state) -> _Tan
        self.count = 0
        self.widest = 1
        self.ref = program.sources()[0].out.id

    def note(self, shape, state, ties):
        """Track the largest tangent: its value's entries times its columns'."""
        size = prod(self.sizes[d] for d in shape)
        size *= prod(n for n, t in zip(self.free_sizes(state), ties) if t is None)
        self.widest = max(self.widest, size)

    def var(self, hint):
        self.count += 1
        return f"{hint}_t{self.count}"

    def free_sizes(self, state):
        return [self.sizes[d] for d in self.s.free[state]]

    def untie(self, t: _Tan, state, a, rank) -> _Tan:
        """``t`` with free axis ``a`` of ``state`` made a column."""
        cols = sorted(t.cols() + [a])
        name = self.var("u")
        n = self.free_sizes(state)[a]
        self.lines.append(f"{name} = _rt.untie({t.name}, {2 + t.ties[a]}, {2 + rank + cols.index(a)}, {n})")
        return _Tan(name, tuple(None if i == a else x for i, x in enumerate(t.ties)))

    def untie_all(self, t: _Tan, state, rank) -> _Tan:
        for a, x in enumerate(t.ties):
            if x is not None:
                t = self.untie(t, state, a, rank)
        return t

    # one rule per op
    def source(self, op: Source):
        if op.kind == "state":
            rank = len(op.out.shape)
            name = f"d_{op.out.id}"
            ones = ", ".join(["1"] * (2 + rank))
            self.lines.append(f"{name} = torch.ones(({ones},), dtype={self.ref}.dtype, "
                              f"device={self.ref}.device)")
            dims = self.s.dims[op.name]
            self.tan[(op.out.id, op.name)] = _Tan(name, tuple(dims.index(d) for d in self.s.free[op.name]),
                                                  one=True)

    def elementwise(self, op: Elementwise, k, computed=True):
        """``computed``: the op's outputs exist (not a product an einsum consumed), so a
        derivative reads them instead of recomputing (sigmoid' = s * (1 - s) from s)."""
        rank = len(op.shape)
        live = [leaf for leaf in op.leaves if any((leaf.val.id, s) in self.tan for s in self.s.states)]
        if not live:
            return
        pairs, exprs = [], []
        known = {e: symbol(out.id) for out, e in zip(op.outs, op.exprs) if computed and not e.is_Symbol}
        for i, (out, expr) in enumerate(zip(op.outs, op.exprs)):
            for j, leaf in enumerate(live):
                if leaf.sym in expr.free_symbols:
                    d = sympy.diff(expr, leaf.sym)
                    if d != 0:
                        pairs.append((i, leaf))
                        exprs.append(substitute_dims(d.xreplace(known), self.sizes))
        if not exprs:
            return
        names = {leaf.sym: _torch_view(leaf.val, leaf.axes, rank) for leaf in op.leaves}
        names.update({sym: out.id for out, sym in zip(op.outs, known.values())})
        printer = TorchPrinter(names)
        temps, reduced = cse_lines(exprs, f"e{k}_")
        for sym, e in temps:
            self.lines.append(f"{sym.name} = {printer.doprint(e)}")
        coefs = []
        for n, e in enumerate(reduced):
            if e.free_symbols:
                name = f"j{k}_{n}"
                self.lines.append(f"{name} = {printer.doprint(e)}")
                coefs.append(name)
            else:
                coefs.append(f"({printer.doprint(e)})")
        for i, out in enumerate(op.outs):
            for state in self.s.states:
                terms = []
                for (oi, leaf), coef in zip(pairs, coefs):
                    t = self.tan.get((leaf.val.id, state))
                    if oi != i or t is None:
                        continue
                    ties = tuple(leaf.axes[x] if x is not None else None for x in t.ties)
                    terms.append((coef, leaf, _Tan(t.name, ties, t.one, t.scale)))
                if terms:
                    self.combine(out, state, terms, rank)

    def form(self, t: _Tan, state, rank) -> _Tan:
        """A scaled tangent multiplied out (one pass over it)."""
        if t.scale is None:
            return t
        name = self.var("f")
        pad = len(t.cols())
        scale = f"{t.scale}[..., {', '.join(['None'] * pad)}]" if pad else t.scale
        self.lines.append(f"{name} = {scale} * {t.name}")
        return _Tan(name, t.ties)

    def combine(self, out, state, terms, rank):
        """The tangent of ``out`` in ``state``: the sum of coefficient times operand tangent.
        One term with a tensor coefficient stays a scaled tangent (a gate's ``sigmoid' * R``
        is never formed: the next product folds its scale in); a sum is formed with addcmul."""
        free = len(self.s.free[state])
        ties = tuple(terms[0][2].ties[a] if all(t.ties[a] == terms[0][2].ties[a] for _, _, t in terms)
                     else None for a in range(free))
        parts = []  # (coefficient text or None, is a number, tangent text or None for the seed)
        for coef, leaf, t in terms:
            # the operand's tangent, viewed in the op's axes (its ties already mapped)
            index = _index(leaf.axes, rank)
            view = _Tan(f"{t.name}{index}", t.ties, t.one, t.scale and f"{t.scale}{index}")
            number = coef.startswith("(")
            if any(ties[a] is None and view.ties[a] is not None for a in range(free)):
                view = self.form(view, state, rank)
                for a in range(free):
                    if ties[a] is None and view.ties[a] is not None:
                        view = self.untie(view, state, a, rank)
            if view.scale is not None:  # fold the scale into the coefficient (value-shaped)
                folded = self.var("k")
                self.lines.append(f"{folded} = {coef} * {view.scale}")
                coef, number = folded, False
            if view.one and not number:  # times the seed 1: the coefficient (its shape broadcasts)
                parts.append((coef, number, None))
            else:
                parts.append((coef, number, view.name))
        pad = len([a for a in ties if a is None])
        padded = lambda c: f"{c}[..., {', '.join(['None'] * pad)}]" if pad else c  # noqa: E731
        if len(parts) == 1 and parts[0][2] is not None and not parts[0][1]:
            coef, _, tangent = parts[0]
            self.tan[(out.id, state)] = _Tan(tangent, ties, scale=coef)
            self.note(out.shape, state, ties)
            return
        text = None
        for coef, number, tangent in parts:
            if tangent is None:  # the seed: the coefficient itself
                term = coef
                text = term if text is None else f"{text} + {term}"
            elif number:
                text = f"{coef} * {tangent}" if text is None else f"{text} + {coef} * {tangent}"
            else:
                text = (f"{padded(coef)} * {tangent}" if text is None
                        else f"torch.addcmul({text}, {padded(coef)}, {tangent})")
        name = self.var(f"d_{out.id}_{state}")
        self.lines.append(f"{name} = {text}")
        self.tan[(out.id, state)] = _Tan(name, ties)
        self.note(out.shape, state, ties)

    def reduce(self, op: Reduce):
        if op.kind != "sum":
            return  # a max: softmax's shift, which cancels (as in ir.vjp)
        rank = len(op.arg.shape)
        for state in self.s.states:
            t = self.tan.get((op.arg.id, state))
            if t is None:
                continue
            t = self.form(t, state, rank)
            gone = [x for x in range(rank) if x not in op.keep]
            moved = {x: a for a, x in enumerate(t.ties) if x in gone}  # tied, summed: a column
            summed = [x for x in gone if x not in moved]
            # dims after the sum: kept value axes, then the old columns; put the columns in order
            left = [x for x in range(rank) if x not in summed]
            cols = {a: 2 + rank - len(summed) + i for i, a in enumerate(t.cols())}
            for x, a in moved.items():
                cols[a] = 2 + left.index(x)
            perm = [0, 1] + [2 + left.index(x) for x in op.keep] + [cols[a] for a in sorted(cols)]
            sizes = [self.sizes[op.arg.shape[x]] for x in summed]
            ties = tuple(op.keep.index(x) if x is not None and x in op.keep else None for x in t.ties)
            if not summed and perm == list(range(len(perm))):  # the same tensor, renamed
                self.tan[(op.out.id, state)] = _Tan(t.name, ties)
                continue
            name = self.var(f"d_{op.out.id}_{state}")
            self.lines.append(f"{name} = _rt.tangent_sum({t.name}, {tuple(2 + x for x in summed)}, "
                              f"{sizes}, {perm})")
            self.tan[(op.out.id, state)] = _Tan(name, ties)
            self.note(op.out.shape, state, ties)

    def matmul(self, op: MatMul):
        shape_a = [self.sizes[d] for d in op.a.shape]
        shape_b = [self.sizes[d] for d in op.b.shape]
        for state in self.s.states:
            parts = []
            for val, left, shape in ((op.a, True, shape_a), (op.b, False, shape_b)):
                t = self.tan.get((val.id, state))
                if t is None:
                    continue
                t = self.untie_all(self.form(t, state, 2), state, 2)
                full = f"({self.ref}.shape[0], {self.ref}.shape[1], {shape[0]}, {shape[1]})"
                cols = len(t.cols())
                parts.append(f"_rt.tangent_mm({t.name}, {op.b.id}, {full}, {cols}, True)" if left else
                             f"_rt.tangent_mm({op.a.id}, {t.name}, {full}, {cols}, False)")
            if parts:
                name = self.var(f"d_{op.out.id}_{state}")
                self.lines.append(f"{name} = {' + '.join(parts)}")
                self.tan[(op.out.id, state)] = _Tan(name, (None,) * len(self.s.free[state]))
                for shape in (op.out.shape, op.a.shape, op.b.shape):  # the factors untied
                    self.note(shape, state, self.tan[(op.out.id, state)].ties)

    def block(self, new, old) -> str | None:
        """The returned block d new / d old: untied, expanded to its full shape."""
        val = self.program.states_out[new]
        t = self.tan.get((val.id, old))
        if t is None:
            return None
        t = self.untie_all(self.form(t, old, len(val.shape)), old, len(val.shape))
        dims = [self.sizes[d] for d in val.shape] + self.free_sizes(old)
        self.note(val.shape, old, (None,) * len(dims[len(val.shape):]))
        name = self.var(f"J_{new}_{old}")
        self.lines.append(f"{name} = _rt.full({t.name}, {self.ref}, {tuple(dims)})")
        return name


def jacobian_source(rule: CheckedRule, dim_sizes: dict) -> JacobianSource:
    """The generated step-with-Jacobian of ``rule`` at ``dim_sizes`` (see the module notes)."""
    program = lower(rule, dim_sizes)
    s = structure(rule, dim_sizes)
    gen = _Generator(program, s, dim_sizes)
    sources = program.sources()
    fused = fused_sums(program)  # the product's own value is then never needed
    for k, op in enumerate(program.ops):
        gen.lines.extend(fused[id(op)] if id(op) in fused else torch_op_lines(op, k, gen.ref, dim_sizes))
        if isinstance(op, Source):
            gen.source(op)
        elif isinstance(op, Elementwise):
            gen.elementwise(op, k, id(op) not in fused)
        elif isinstance(op, Reduce):
            gen.reduce(op)
        elif isinstance(op, MatMul):
            gen.matmul(op)
        elif not isinstance(op, TopkMask):  # a mask: piecewise constant, no tangent
            raise AssertionError(op)
    blocks, names = [], []
    for new in s.states:
        for old in s.states:
            name = gen.block(new, old)
            if name is not None:
                blocks.append((new, old))
                names.append(name)
    results = ([v.id for v in program.outputs.values()] + [v.id for v in program.states_out.values()]
               + names)
    fn = f"rule_{rule.name}_step_jacobian"
    args = ", ".join(op.out.id for op in sources)
    header = (f"# rule {rule.name}: one token and d(new states)/d(states), batched [B, H, ...]; "
              + ", ".join(f"{d}={n}" for d, n in dim_sizes.items()) + "\n")
    text = (header + f"def {fn}({args}):\n" + "".join(f"    {line}\n" for line in gen.lines)
            + "    return (" + "".join(f"{r}, " for r in results) + ")\n")
    return JacobianSource(text, fn, sources, len(program.outputs), list(s.states), blocks, s,
                          gen.widest)
