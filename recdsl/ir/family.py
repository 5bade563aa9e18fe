"""The kernel families that can run a rule, from its affine normal form (``recdsl.ir.affine``).

Each family is a planner that accepts the normal form or refuses it with a reason and the
position of the term that breaks it; ``PLANNERS`` asks them in order of preference, and the
first that accepts is the rule's family:

- ``delta``: every state decays (scalar, or per channel on its rows before the erase) and goes
  through Householder-like erases ``I - beta k kᵀ``, each followed by writes along the same
  key: delta, gated_delta, kla, deltaproduct.
- ``diagonal``: every state has only scalar or diagonal decays (rows or columns) and writes
  that are outer products: linear_attention, retention, mamba2, gla, raven.
- ``dplr``: every state's transition is, per token, a sequence of per-channel or scalar decays
  and rank-one factors ``(D - a bᵀ)`` with any vectors a and b, in either orientation, and its
  writes outer products: KDA, RWKV-7, GDN-2, Comba, IPLR, DeltaProduct with per-channel gates
  (``recdsl.ir.dplr``).
- ``scan``: every state's transition is elementwise (scalar, row, column or per-entry decays,
  any state shape, writes of any form): an associative scan over time, with the outputs any
  per-token function of the states before, between or after the token's updates: minGRU,
  HGRN, Mamba-1, and every rule of the diagonal family too.
- ``recurrent``: none accepts; the reason is the refusal of the family closest to fitting.

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

CHUNK_FAMILIES = ("delta", "diagonal", "dplr")


@dataclass
class Verdict:
    """One planner's answer: accepted (``reason`` says what it recognised) or refused (why,
    with the position of the offending term)."""
    family: str
    accepted: bool
    reason: str
    pos: Optional[ast.Pos] = None

    def where(self, filename: str) -> str:
        return f"{filename}:{self.pos.line}:{self.pos.column}" if self.pos else filename


@dataclass
class Family:
    name: str  # delta, diagonal, scan or recurrent
    reason: str  # for recurrent: why; for the others: what was recognised
    pos: Optional[ast.Pos] = None  # for recurrent: the offending term
    analysis: Optional[Analysis] = field(default=None, repr=False, compare=False)
    verdicts: dict = field(default_factory=dict, repr=False, compare=False)  # name -> Verdict
    # a rule the chunk planners refuse for its reads alone: its read lowering
    # (``recdsl.ir.reads.Lowered``: plain reads of a derived chunkwise rule plus an epilogue)
    lowered: Optional[object] = field(default=None, repr=False, compare=False)
    # a recurrent rule whose small non-affine states can go first (mLSTM's m): its staging
    # (``recdsl.ir.stages.Staged``: those states by a scan or a sequential pass, the rest as a
    # derived affine rule given them per token)
    staged: Optional[object] = field(default=None, repr=False, compare=False)

    def where(self, filename: str) -> str:
        """``file:line:col`` of the offending term, or the file alone."""
        return f"{filename}:{self.pos.line}:{self.pos.column}" if self.pos else filename

    def accepts(self, name: str) -> bool:
        v = self.verdicts.get(name)
        return v is not None and v.accepted

    @property
    def chunk(self) -> Optional[str]:
        """The chunkwise family (delta or diagonal) that runs the rule, or None."""
        return next((n for n in CHUNK_FAMILIES if self.accepts(n)), None)


class Refusal(Exception):
    """Why a planner (or the read lowering, or the staging) does not take a rule: ``reason``,
    and ``pos``, the position of the offending term when there is one."""

    def __init__(self, reason: str, pos: Optional[ast.Pos] = None):
        super().__init__(reason)
        self.reason, self.pos = reason, pos


_Recurrent = Refusal  # a chunk planner's refusal: the rule stays recurrent unless another fits


def _describe_states(analysis) -> str:
    return "; ".join(f"{sa.name}: {describe(sa)}" for sa in analysis.states.values())


def _plan_chunk(analysis: Analysis, name: str) -> str:
    """Accept for the delta or diagonal family, or raise _Recurrent."""
    _affine(analysis)
    for sa in analysis.states.values():
        if sa.var.rank != 2:
            what = "a scalar" if sa.var.rank == 0 else "a vector"
            raise _Recurrent(f"state {sa.name} is {what}; the chunkwise forms take matrix "
                             f"states", sa.var.pos)
    forms = {n: _form(sa) for n, sa in analysis.states.items()}
    if len(set(forms.values())) > 1:
        first = next(iter(forms))
        other = next(n for n in forms if forms[n] != forms[first])
        raise _Recurrent(f"state {first} has the {forms[first]} form and state {other} the "
                         f"{forms[other]} form: no single chunkwise form fits both",
                         analysis.states[other].var.pos)
    form = next(iter(forms.values()))
    if form != name:
        sa = next(iter(analysis.states.values()))
        raise _Recurrent(f"the update of {sa.name} has the {form} form, not the {name} form",
                         sa.var.pos)
    _reads(analysis)
    return _describe_states(analysis)


def _plan_scan(analysis: Analysis) -> str:
    """Accept when every state's transition is elementwise, or raise _Recurrent."""
    _affine(analysis)
    for sa in analysis.states.values():
        for f in sa.factors:
            if not f.elementwise:
                raise _Recurrent(f"{unparse(f.node)} is a rank-one factor of {sa.name}: its "
                                 f"transition is not elementwise, so no elementwise scan",
                                 ast.expr_span(f.node))
    return _describe_states(analysis)


def _plan_dplr(analysis: Analysis) -> str:
    from .dplr import plan  # its refusal (NotDplr) is a Refusal
    _affine(analysis)  # the root cause first, as the other planners say it
    return plan(analysis).describe()


def _plan_newton(analysis: Analysis) -> str:
    from .jacobian import plan  # the state Jacobian's structure (recdsl.ir.jacobian)
    return plan(analysis.rule)


PLANNERS = (
    ("delta", lambda a: _plan_chunk(a, "delta")),
    ("diagonal", lambda a: _plan_chunk(a, "diagonal")),
    ("dplr", _plan_dplr),
    ("scan", _plan_scan),
)


def classify(checked: CheckedRule, analysis: Optional[Analysis] = None) -> Family:
    """The family of a checked rule (``analysis`` is computed when not given), with every
    planner's verdict and, where the chunk planners refuse only its reads, its read lowering."""
    from .reads import for_family
    from .stages import for_family as staging_for
    family = _classify(checked, analysis)
    family.lowered = for_family(checked, family)
    family.staged = staging_for(checked, family)
    return family


def _classify(checked: CheckedRule, analysis: Optional[Analysis]) -> Family:
    analysis = analysis or analyse(checked)
    verdicts = {}
    for name, plan in PLANNERS:
        try:
            verdicts[name] = Verdict(name, True, plan(analysis))
        except _Recurrent as e:
            verdicts[name] = Verdict(name, False, e.reason, e.pos)
    accepted = next((v for v in verdicts.values() if v.accepted), None)
    # Newton (ParaRNN) takes any rule differentiable in its states: a backend, never the family
    try:
        verdicts["newton"] = Verdict("newton", True, _plan_newton(analysis))
    except _Recurrent as e:
        verdicts["newton"] = Verdict("newton", False, e.reason, e.pos)
    if accepted is not None:
        return Family(accepted.family, accepted.reason, None, analysis, verdicts)
    # the refusal of the family closest to fitting: an erase asks for the delta form, a
    # non-elementwise rule without one for the diagonal form
    closest = verdicts["diagonal"]
    if any(f.kind == "rank_one" for sa in analysis.states.values() if sa.affine
           for f in sa.factors):
        closest = verdicts["delta"]
    return Family("recurrent", closest.reason, closest.pos, analysis, verdicts)


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
        coupled = root.problem.kind in ("cross", "stale", "write", "gate") and _jointly_affine(analysis)
        if coupled:  # affine in the states together, which no family takes
            reason = (f"the states are coupled: {root.problem.message} (affine in the states "
                      f"together, but each parallel family takes a state's update in that "
                      f"state alone; newton solves them together)")
        else:
            reason = f"the update of {root.name} is not affine in the states: {root.problem.message}"
        fed = [s.name for s in states.values() if s is not root and not s.affine
               and root.name in s.problem.states]
        if fed:
            verb = "depends" if len(fed) == 1 else "depend"
            reason += f"; the update{'s' if len(fed) > 1 else ''} of {_and(fed)} {verb} on {root.name}"
        raise _Recurrent(reason, root.problem.pos)


def _jointly_affine(analysis: Analysis) -> bool:
    """Whether the updates are affine in all the states together (``ir.jacobian``), once per
    analysis: every planner asks."""
    if not hasattr(analysis, "jointly_affine"):
        from .jacobian import jointly_affine
        try:
            analysis.jointly_affine = jointly_affine(analysis.rule)
        except NotImplementedError:  # a form the per-token program does not lower
            analysis.jointly_affine = False
    return analysis.jointly_affine


def _form(sa: StateAnalysis) -> str:
    """diagonal or delta, or raise _Recurrent with the term that fits neither."""
    for w in sa.writes:
        if w.kind != "outer":
            raise _Recurrent(f"the write {unparse(w.node)} to {sa.name} is not an outer product "
                             f"outer(a, b)", ast.expr_span(w.node))
    for f in sa.factors:
        if f.kind == "entries":
            raise _Recurrent(f"the per-entry decay {_decay_text(f)} of {sa.name} is not a product "
                             f"of a row and a column decay: no chunked matmul form (the "
                             f"elementwise scan runs it)", ast.expr_span(f.node))
        if f.kind == "rank_one" and f.side == "right":
            raise _Recurrent(f"{unparse(f.node)} is a rank-one factor on the right of {sa.name} "
                             f"({sa.name} (I - b kᵀ)): the chunkwise forms take erases on the "
                             f"left", ast.expr_span(f.node))
        # (a I - b k kᵀ) S with a scalar a: the delta form's erase may read the undecayed
        # state (no division by a); a per-channel or per-entry D beside the erase has no form
        if f.kind == "rank_one" and f.diag is not None and f.diag.kind != "scalar":
            raise _Recurrent(f"{unparse(f.node)} erases the undecayed {sa.name} beside the decay "
                             f"{_decay_text(f.diag)}, which is not a scalar: the delta form "
                             f"takes a scalar decay beside an erase", ast.expr_span(f.node))
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
        elif f.kind == "rows" and sa.var.rank == 1:
            parts.append(f"elementwise decay {_decay_text(f)}{loop}")
        elif f.kind == "rows":
            parts.append(f"row decay diag({_decay_text(f)}){loop}")
        elif f.kind == "cols":
            parts.append(f"column decay diag({_decay_text(f)}){loop}")
        elif f.kind == "entries":
            parts.append(f"per-entry decay {_decay_text(f)}{loop}")
        elif f.kind == "rank_one":
            what = "Householder-like erase" if f.householder else "rank-one factor"
            side = " on the right" if f.side == "right" else ""
            diag = f" beside the decay {_decay_text(f.diag)}" if f.diag is not None else ""
            parts.append(f"{what}{side} along {unparse(f.key)}{diag}{loop}")
    if not parts:
        parts.append("no decay")
    writes = [w for w in sa.writes]
    if writes:
        parts.append("writes " + ", ".join(_write_text(w) for w in writes))
    return ", ".join(parts)


def _decay_text(f) -> str:
    """An elementwise factor's decay: its expression, or its parts as a sum."""
    if f.decay is not None:
        return unparse(f.decay)
    terms = []
    for coef, ops in f.parts:
        body = " * ".join(f"{'diag' if k != 'entries' else ''}({unparse(x)})" for k, x in ops)
        terms.append(f"{_factor_text(coef)} * {body}" if body and not coef.is_one
                     else body or coef.text())
    return " + ".join(terms)


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
