"""Staged states: compute a small non-affine state first, then the rest as an affine rule.

mLSTM's stabiliser ``m = max(lf + m, i)`` is not affine in ``m``, so the rule has no parallel
form as written. But ``m`` reads no other state: it can be computed first, for every token,
and given ``m`` the updates of ``C`` and ``n`` are ordinary affine (diagonal-family) updates.

``staging(checked)`` finds such a split, independent of the families:

- the states are ordered by dependency: the states each state's update reads, directly or
  through lets (strongly connected components, dependencies first);
- a LEADING stage is the set of states of the source components (they read no state outside
  their component) whose updates are not affine and that are small (scalars or vectors);
- the rest becomes a DERIVED rule (text, compiled with ``recdsl.compile``) in which every
  read of a leading state ``m`` is a read of a new per-token input: ``m`` before the token's
  updates (``m_before``) or after them (``m_after``); the leading updates are dropped. Its
  updates are then affine, and it lands in a family of its own (mLSTM: the diagonal family,
  with its outputs through the read lowering ``recdsl.ir.reads``).

Each leading state also gets a FORM: ``maxplus`` when its single update is ``m = max(a + m, b)``
(or ``max(b, m + a)``, ``max(m, b)``, ``m - c``), with ``a`` and ``b`` free of states — a
tropical recurrence computed in parallel (``recdsl.runtime.staged``) — else ``sequential``: a
pass over that state's own statements alone, token by token.

``staging(checked)`` returns a ``Staged`` or None; ``why_not(checked)`` says why it is None.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from ..grammar import ast
from .checked import CheckedRule
from .derived import FreshNames, compile_derived
from .family import Refusal
from .pretty import describe, unparse

class NotStaged(Refusal):
    """Why a rule has no staging."""


@dataclass(eq=False)
class Leading:
    """One state of the leading stage.

    ``form``: "maxplus" (``m = max(a + m, b)``: ``a``, ``b`` expressions of the rule, ``a``
    None for 0, ``a_sign`` -1 for ``m - a``) or "sequential" (``why``: why not max-plus).
    ``before`` / ``after``: the derived rule's inputs carrying the state before and after the
    token's updates (None when the derived rule does not read that version)."""
    name: str
    form: str
    why: str = ""
    a: object = None
    a_sign: int = 1
    b: object = None
    before: Optional[str] = None
    after: Optional[str] = None


@dataclass(eq=False)
class Staged:
    checked: CheckedRule
    leading: list  # Leading, in declaration order
    rest: tuple  # the names of the other states, in declaration order
    statements: list  # the leading states' own statements (needed lets and updates), in order
    text: str  # the derived rule's text
    order: list  # the components (tuples of state names), dependencies first
    _derived: object = field(default=None, repr=False)

    @property
    def derived(self):
        """The derived rule, compiled (``recdsl.runtime.rule.Rule``)."""
        if self._derived is None:
            self._derived = compile_derived(self.text, f"<{self.checked.name} staged>")
        return self._derived

    @property
    def family(self) -> str:
        """The derived rule's family (that of its read lowering where it has one)."""
        info = self.derived.family_info
        if self.through_reads:
            return info.lowered.family
        return info.name

    @property
    def through_reads(self) -> bool:
        """The derived rule runs chunkwise through the read lowering (``recdsl.ir.reads``)."""
        info = self.derived.family_info
        return info.chunk is None and getattr(info, "lowered", None) is not None

    def describe(self) -> str:
        """A few lines for ``recdsl show``: the stages, each with how it runs."""
        lines = []
        for st in self.leading:
            if st.form == "maxplus":
                a = "0" if st.a is None else ("-" if st.a_sign < 0 else "") + unparse(st.a)
                how = (f"max-plus recurrence {st.name} = max(a + {st.name}, b) with a = {a}, "
                       f"b = {unparse(st.b)}: parallel (cumulative max)")
            else:
                how = f"sequential: {st.why}"
            lines.append(f"stage 1: {st.name}: {how}")
        reads = " through the read lowering" if self.through_reads else ""
        lines.append(f"stage 2: {', '.join(self.rest)}: the {self.family} family{reads}, given "
                     f"{', '.join(st.name for st in self.leading)} per token")
        return "\n".join(lines)


_DEPTH = 0


def staging(checked: CheckedRule, analysis=None) -> Optional[Staged]:
    """The staging of ``checked`` or None (``why_not`` says why); ``analysis``: its affine
    analysis when already computed."""
    try:
        return stage(checked, analysis)
    except NotStaged:
        return None


def for_family(checked: CheckedRule, family) -> Optional[Staged]:
    """The hook for ``recdsl.ir.family.classify``: the staging of a recurrent rule, or None."""
    if family.name != "recurrent":
        return None
    return staging(checked, family.analysis)


def why_not(checked: CheckedRule) -> Optional[str]:
    try:
        stage(checked)
    except NotStaged as e:
        return e.reason
    return None


def stage(checked: CheckedRule, analysis=None) -> Staged:
    """The staging of ``checked``; raises ``NotStaged``, also when the derived rule has no
    parallel form."""
    global _DEPTH
    if _DEPTH:
        raise NotStaged("a derived rule is not staged again")
    staged = _Stager(checked, analysis).run()
    _DEPTH += 1
    try:
        derived = staged.derived
    except Exception as err:  # a bug here must not break the rule: no staging
        raise NotStaged(f"the derived rule does not compile: {err}") from None
    finally:
        _DEPTH -= 1
    info = derived.family_info
    if info.name == "recurrent" and getattr(info, "lowered", None) is None:
        raise NotStaged(f"given {', '.join(s.name for s in staged.leading)}, the other states "
                        f"still have no parallel form: {derived.family_reason}")
    return staged


# ============================================================ dependencies


def components(graph: dict) -> list:
    """Strongly connected components of ``graph`` (node -> set of nodes it depends on),
    dependencies first (Tarjan's algorithm emits them in that order); nodes in the order of
    ``graph`` within a component."""
    index, low, on, stack, out = {}, {}, set(), [], []
    order = list(graph)

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v], key=order.index):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(tuple(sorted(comp, key=order.index)))

    for v in order:
        if v not in index:
            visit(v)
    return out


class _Stager:
    def __init__(self, checked: CheckedRule, analysis=None):
        from .affine import analyse
        self.rule = checked
        self.analysis = analysis or analyse(checked)
        self.states = [v.name for v in checked.states]
        self.rank = {v.name: v.rank for v in checked.states}
        self.lets = {}  # name -> [Let] (a name may be bound again in another for block)
        self.top = {}  # name -> the top-level Let
        for st in ast.walk_statements(checked.body):
            if isinstance(st, (ast.Let, ast.Output)):
                self.lets.setdefault(st.name, []).append(st)
        for st in checked.body:
            if isinstance(st, (ast.Let, ast.Output)):
                self.top[st.name] = st
        self.names = FreshNames(checked)
        self._deps = {}

    def fresh(self, base: str) -> str:
        return self.names.fresh(base)

    def deps(self, e, seen=frozenset()) -> dict:
        """The states ``e`` reads -> the lets it reads them through (empty: directly)."""
        out = {}
        for n in ast.walk(e):
            if not isinstance(n, ast.Name):
                continue
            if n.kind == "state":
                out.setdefault(n.id, set())
            elif n.kind in ("let", "output") and n.id not in seen:
                for st in self.lets.get(n.id, ()):
                    for s, via in self.deps(st.value, seen | {n.id}).items():
                        out.setdefault(s, set()).update(via | {n.id})
        return out

    def update_deps(self, state) -> dict:
        out = {}
        for st in ast.walk_statements(self.rule.body):
            if isinstance(st, ast.Update) and st.state == state:
                for s, via in self.deps(st.value).items():
                    out.setdefault(s, set()).update(via)
        return out

    def run(self) -> Staged:
        rule, sa = self.rule, self.analysis.states
        nonaffine = [s for s in self.states if not sa[s].affine]
        if not nonaffine:
            raise NotStaged("every update is affine in the states: no stage needs to go first")
        reads = {s: self.update_deps(s) for s in self.states}
        graph = {s: set(reads[s]) for s in self.states}
        order = components(graph)
        leading = []
        for comp in order:
            outside = {d for s in comp for d in graph[s]} - set(comp)
            if outside:
                continue
            if all(not sa[s].affine and self.rank[s] <= 1 for s in comp):
                leading.extend(comp)
        rest = tuple(s for s in self.states if s not in leading)
        if not leading or (not rest and len(leading) > 1):
            raise NotStaged(*self.no_leading(nonaffine, reads, order))
        if not rest:
            raise NotStaged(f"{leading[0]} is the only state: nothing is left to run after it")
        # the leading updates: top level, read elsewhere only before or after all of them
        total = {s: 0 for s in leading}
        for st in ast.walk_statements(rule.body):
            if isinstance(st, ast.Update) and st.state in total:
                total[st.state] += 1
        for st in rule.body:
            if isinstance(st, ast.For):
                inner = [x for x in ast.walk_statements(st.body)
                         if isinstance(x, ast.Update) and x.state in total]
                if inner:
                    raise NotStaged(f"{inner[0].state} is updated inside a for block: a "
                                    f"leading stage takes top-level updates", inner[0].pos)
        leads = [Leading(s, "sequential") for s in self.states if s in leading]
        by_name = {st.name: st for st in leads}
        statements = self.own_statements(leading)
        for st in leads:
            self.form(st, total[st.name])
        text = self.derived_text(by_name, total)
        return Staged(rule, leads, rest, statements, text, order)

    def no_leading(self, nonaffine, reads, order):
        """Why no stage can go first: the reason and position."""
        # the small non-affine state closest to going first: it reads the fewest others
        small = [s for s in nonaffine if self.rank[s] <= 1] or nonaffine
        first = min(small, key=lambda s: len(set(reads[s]) - {s}))
        problem = self.analysis.states[first].problem
        pos = problem.pos if problem is not None else self.rule.var(first).pos
        others = [s for s in self.states if s in reads[first] and s != first]
        if others:
            other = others[0]
            via = sorted(reads[first][other])
            lets = [n for n in via if n in self.top or n in self.lets]
            if lets:
                what = (f"the gates of {first} ({', '.join(lets)}) read" if len(lets) > 1
                        else f"the gate {lets[0]} of {first} reads")
            else:
                what = f"the update of {first} reads"
            if self.analysis.states[other].affine and problem is not None \
                    and problem.kind == "cross":  # coupled affine states (momentum)
                return (f"{what} state {other}, whose own update is affine: a leading stage "
                        f"is a non-affine scalar or vector state; coupled affine states are "
                        f"not staged", pos)
            return f"{what} state {other}: no stage can go first", pos
        return (f"state {first} is a {'matrix' if self.rank[first] == 2 else 'tensor'}: a "
                f"leading stage takes scalar and vector states", pos)

    def own_statements(self, leading) -> list:
        """The top-level statements the leading updates need: their lets (transitively) and
        the updates themselves, in source order."""
        needed, stack = set(), []
        for st in self.rule.body:
            if isinstance(st, ast.Update) and st.state in leading:
                stack.append(st.value)
        while stack:
            for n in ast.walk(stack.pop()):
                if isinstance(n, ast.Name) and n.kind in ("let", "output") and n.id not in needed:
                    needed.add(n.id)
                    stack.append(self.top[n.id].value)
        return [st for st in self.rule.body
                if (isinstance(st, ast.Update) and st.state in leading)
                or (isinstance(st, ast.Let) and st.name in needed)]

    def form(self, lead: Leading, total: int):
        if total != 1:
            lead.why = f"{lead.name} has {total} updates; the max-plus form takes one"
            return
        upd = next(st for st in self.rule.body
                   if isinstance(st, ast.Update) and st.state == lead.name)
        e = self.inline(upd.value, upd)
        if not (isinstance(e, ast.Call) and e.fn == "max"):
            lead.why = f"the update {describe(upd)} is not max(a + {lead.name}, b)"
            return
        for x, y in (e.args, e.args[::-1]):
            term = self.plus_state(self.inline(x, upd), lead.name)
            if term is None or self.deps(y):
                continue
            lead.form, (lead.a, lead.a_sign), lead.b = "maxplus", term, y
            return
        lead.why = (f"the update {describe(upd)} is not max(a + {lead.name}, b) with a and b "
                    f"free of states")

    def inline(self, e, upd):
        """``e`` with top-level let names defined before ``upd`` replaced by their values."""
        while isinstance(e, ast.Name) and e.kind == "let" and e.id in self.top \
                and self.top[e.id].pos.line < upd.pos.line:
            e = self.top[e.id].value
        return e

    def plus_state(self, e, state):
        """``(a, sign)`` when ``e`` is ``state``, ``a + state``, ``state + a`` or
        ``state - a`` with ``a`` free of states; else None."""
        is_state = lambda x: isinstance(x, ast.Name) and x.kind == "state" and x.id == state
        if is_state(e):
            return None, 1
        if isinstance(e, ast.BinOp) and e.op in "+-":
            if is_state(e.left) and not self.deps(e.right):
                return e.right, (1 if e.op == "+" else -1)
            if e.op == "+" and is_state(e.right) and not self.deps(e.left):
                return e.left, 1
        return None

    # ---------------------------------------------------------------- the derived rule

    def derived_text(self, leading: dict, total: dict) -> str:
        rule = self.rule
        versions = {s: 0 for s in leading}
        body = []  # (depth, text)

        def sub(e):
            return _substitute(e, lambda n: self.version_name(leading[n.id], versions, total)
                               if n.kind == "state" and n.id in leading else None)

        def walk(stmts, depth):
            for st in stmts:
                pad = "    " * depth
                if isinstance(st, ast.Update) and st.state in leading:
                    versions[st.state] += 1
                    continue
                if isinstance(st, ast.For):
                    body.append(pad + describe(st))
                    walk(st.body, depth + 1)
                    continue
                body.append(pad + describe(replace(st, value=sub(st.value))))

        walk(rule.body, 0)
        decl = lambda v: v.name + (f"[{', '.join(v.dims)}]" if v.dims else "")
        lines = [f"rule {self.fresh(rule.name + '_staged')}", ""]
        if rule.dims:
            lines.append("dims " + ", ".join(rule.dims))
        lines.append("state " + ", ".join(decl(v) for v in rule.states if v.name not in leading))
        inputs = [decl(v) for v in rule.inputs]
        for v in rule.states:
            if v.name in leading:
                dims = f"[{', '.join(v.dims)}]" if v.dims else ""
                for name in (leading[v.name].before, leading[v.name].after):
                    if name:
                        inputs.append(name + dims)
        lines.append("input " + ", ".join(inputs))
        if rule.params:
            lines.append("param " + ", ".join(decl(v) for v in rule.params))
        for name, value in rule.consts.items():
            lines.append(f"const {name} = {float(value)!r}")
        lines.append("")
        return "\n".join(lines + body) + "\n"

    def version_name(self, lead: Leading, versions, total) -> str:
        v = versions[lead.name]
        if v == 0:
            lead.before = lead.before or self.fresh(f"{lead.name}_before")
            return lead.before
        if v == total[lead.name]:
            lead.after = lead.after or self.fresh(f"{lead.name}_after")
            return lead.after
        raise NotStaged(f"{lead.name} is read between two of its updates")


def _substitute(e, fn):
    """A copy of ``e`` with each Name ``n`` for which ``fn(n)`` is a string renamed to it (as
    an input)."""
    if isinstance(e, ast.Name):
        new = fn(e)
        return e if new is None else replace(e, id=new, kind="input")
    if isinstance(e, ast.BinOp):
        return replace(e, left=_substitute(e.left, fn), right=_substitute(e.right, fn))
    if isinstance(e, ast.Neg):
        return replace(e, operand=_substitute(e.operand, fn))
    if isinstance(e, ast.Call):
        return replace(e, args=[_substitute(a, fn) for a in e.args])
    return e
