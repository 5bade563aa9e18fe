"""The kernel family of a rule, from its affine structure (``recdsl.ir.affine``).

- ``delta``: every state decays (scalar, or per channel on its rows before the erase) and goes
  through Householder-like erases ``I - beta k kᵀ``, each followed by writes along the same
  key: delta, gated_delta, kla, deltaproduct.
- ``diagonal``: every state has only scalar or diagonal decays (rows or columns) and writes
  that are outer products: linear_attention, retention, mamba2, gla, raven.
- ``recurrent``: anything else, with the reason and the position of the term that breaks the
  chunkwise form.

Both chunkwise families also need every state to be a matrix, every output to be a linear read
of the states after the token's updates (``coef * x @ S + extra``), and the vectors of those
reads to be state-free or per-token functions of earlier linear reads (Raven's softmax).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..grammar import ast
from .affine import Analysis, StateAnalysis, analyse, loop_groups, same_expr
from .checked import CheckedRule
from .pretty import unparse


@dataclass
class Family:
    name: str  # delta, diagonal or recurrent
    reason: str  # for recurrent: why; for the chunk families: what was recognised
    pos: Optional[ast.Pos] = None  # for recurrent: the offending term
    analysis: Optional[Analysis] = field(default=None, repr=False, compare=False)

    def where(self, filename: str) -> str:
        """``file:line:col`` of the offending term, or the file alone."""
        return f"{filename}:{self.pos.line}:{self.pos.column}" if self.pos else filename


class _Recurrent(Exception):
    def __init__(self, reason: str, pos: ast.Pos):
        self.reason, self.pos = reason, pos


def classify(checked: CheckedRule, analysis: Optional[Analysis] = None) -> Family:
    """The family of a checked rule (``analysis`` is computed when not given)."""
    analysis = analysis or analyse(checked)
    try:
        _affine(analysis)
        for sa in analysis.states.values():
            if sa.var.rank != 2:
                what = "a scalar" if sa.var.rank == 0 else "a vector"
                raise _Recurrent(f"state {sa.name} is {what}; the chunkwise forms take matrix "
                                 f"states", sa.var.pos)
        forms = {name: _form(sa) for name, sa in analysis.states.items()}
        if len(set(forms.values())) > 1:
            first = next(iter(forms))
            other = next(n for n in forms if forms[n] != forms[first])
            raise _Recurrent(f"state {first} has the {forms[first]} form and state {other} the "
                             f"{forms[other]} form: no single chunkwise form fits both",
                             analysis.states[other].var.pos)
        _reads(analysis)
    except _Recurrent as e:
        return Family("recurrent", e.reason, e.pos, analysis)
    name = next(iter(forms.values()))
    reason = "; ".join(f"{sa.name}: {describe(sa)}" for sa in analysis.states.values())
    return Family(name, reason, None, analysis)


def _affine(analysis: Analysis):
    """Every state's update must be affine; report the root cause (mlstm: the max that feeds
    the other updates through m)."""
    states = analysis.states
    for sa in states.values():
        if sa.affine:
            continue
        root, seen = sa, {sa.name}
        while True:
            nxt = next((states[s] for s in root.problem.states
                        if s not in seen and s in states and not states[s].affine), None)
            if nxt is None or root.problem.kind not in ("gate", "write", "cross", "stale"):
                break
            seen.add(nxt.name)
            root = nxt
        reason = f"the update of {root.name} is not affine in the states: {root.problem.message}"
        fed = [s.name for s in states.values() if s is not root and not s.affine
               and root.name in s.problem.states]
        if fed:
            verb = "depends" if len(fed) == 1 else "depend"
            reason += f"; the update{'s' if len(fed) > 1 else ''} of {_and(fed)} {verb} on {root.name}"
        raise _Recurrent(reason, root.problem.pos)


def _form(sa: StateAnalysis) -> str:
    """diagonal or delta, or raise _Recurrent with the term that fits neither."""
    for w in sa.writes:
        if w.kind != "outer":
            raise _Recurrent(f"the write {unparse(w.node)} to {sa.name} is not an outer product "
                             f"outer(a, b)", ast.expr_span(w.node))
    erases = [f for f in sa.factors if f.kind == "rank_one"]
    if not erases:
        return "diagonal"
    for f in sa.factors:
        if f.kind == "cols":
            raise _Recurrent(f"{unparse(f.node)} decays the value axis of {sa.name}, which also "
                             f"has an erase: no chunkwise form has both", ast.expr_span(f.node))
    # each write must follow an erase of the same step and write along its key
    latest = {}
    for step in sa.steps:
        for f in step.factors:
            if f.kind == "rank_one":
                latest[id(step.loop)] = f
        for w in step.writes:
            f = latest.get(id(step.loop))
            if f is None:
                raise _Recurrent(f"the write {unparse(w.node)} to {sa.name} comes before any "
                                 f"erase: the delta form writes after the erase",
                                 ast.expr_span(w.node))
            if not same_expr(w.left, f.key):
                raise _Recurrent(f"the write {unparse(w.node)} is along {unparse(w.left)}, but "
                                 f"the erase on line {ast.expr_span(f.node).line} is along "
                                 f"{unparse(f.key)}: the delta form writes along the erased keys",
                                 ast.expr_span(w.node))
    for f in erases:
        if not same_expr(f.vec, f.key):
            raise _Recurrent(f"the rank-one term {unparse(f.node)} is along {unparse(f.vec)}, "
                             f"not along its key {unparse(f.key)}: not a Householder-like erase",
                             ast.expr_span(f.node))
        if not f.householder:
            raise _Recurrent(f"the erase {unparse(f.node)} has no write along {unparse(f.key)} "
                             f"in the same step", ast.expr_span(f.node))
    # per-channel decays must come before every erase (a loop body counts twice)
    seen_erase = None
    for f in _unrolled(sa):
        if f.kind == "rank_one":
            seen_erase = seen_erase or f
        elif f.kind == "rows" and seen_erase is not None:
            raise _Recurrent(f"the per-channel decay {unparse(f.node)} comes after the erase on "
                             f"line {ast.expr_span(seen_erase.node).line}: the delta form decays "
                             f"rows before erasing", ast.expr_span(f.node))
    return "delta"


def _unrolled(sa: StateAnalysis):
    """The factors in application order with each loop's body taken twice."""
    for loop, steps in loop_groups(sa.steps):
        for _ in range(2 if loop is not None else 1):
            for step in steps:
                yield from step.factors


def _reads(analysis: Analysis):
    for rv in analysis.reads:
        if rv.problem is not None:
            what = ("an output must be a linear read of the states" if rv.kind == "output" else
                    "a value that feeds a read must be a per-token function of linear reads")
            raise _Recurrent(f"{rv.problem.message}: {what}", rv.problem.pos)
        for r in rv.reads:
            if not r.after_update:
                sa = analysis.states[r.state]
                line = _last_update_line(sa, analysis)
                raise _Recurrent(f"{rv.name} reads {r.state} before its update on line {line}; "
                                 f"the chunkwise forms read the state after the token's updates",
                                 ast.expr_span(r.node))


def _last_update_line(sa: StateAnalysis, analysis: Analysis) -> int:
    lines = [st.pos.line for st in _updates(analysis.rule.body) if st.state == sa.name]
    return lines[-1]


def _updates(body):
    for st in body:
        if isinstance(st, ast.Update):
            yield st
        elif isinstance(st, ast.For):
            yield from _updates(st.body)


def describe(sa: StateAnalysis) -> str:
    """What the analysis recognised in one affine state's update, in a few words."""
    parts = []
    for f in sa.factors:
        loop = f" (for {f.loop.var} in {f.loop.dim})" if f.loop else ""
        if f.kind == "scalar":
            parts.append(f"scalar decay {unparse(f.decay)}{loop}")
        elif f.kind == "rows":
            parts.append(f"row decay diag({unparse(f.decay)}){loop}")
        elif f.kind == "cols":
            parts.append(f"column decay diag({unparse(f.decay)}){loop}")
        elif f.kind == "rank_one":
            what = "Householder-like erase" if f.householder else "rank-one factor"
            parts.append(f"{what} along {unparse(f.key)}{loop}")
    if not parts:
        parts.append("no decay")
    writes = [w for w in sa.writes]
    if writes:
        parts.append("writes " + ", ".join(_write_text(w) for w in writes))
    return ", ".join(parts)


def _write_text(w) -> str:
    if w.kind != "outer":
        return unparse(w.node)
    text = f"outer({unparse(w.left)}, {unparse(w.right)})"
    if w.coef.is_one:
        return text
    if w.coef.sign == -1:
        magnitude = w.coef.negate()
        return f"-{text}" if magnitude.is_one else f"-{_factor_text(magnitude)} * {text}"
    return f"{_factor_text(w.coef)} * {text}"


def _factor_text(coef) -> str:
    text = coef.text()
    return f"({text})" if isinstance(coef.expr(), ast.BinOp) and coef.expr().op in "+-" else text


def _and(names) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
