"""Read lowering: run a rule whose outputs are per-token functions of linear reads on a
chunkwise family that accepts only plain linear reads of the states after the token's updates.

The chunk families (``recdsl.ir.family``) take outputs ``o = coef * (x @ S) + extra`` read
after the token's updates. Many rules read the states in other ways that are still cheap:

- a per-token function of reads: ``sigmoid(og) * (q @ S)``, ``(q @ S) / (dot(q, z) + eps)``;
- a read before the update, ``o_t = q_t @ S_{t-1}``: the state after the previous token's
  updates, i.e. the read ``q_t @ S`` done at token t-1 after its updates;
- a read ``dot(x, n)`` of a vector state ``n[K]``, or ``n`` itself as a [K] value, or a
  scalar state ``w`` as a value, which the chunk families refuse.

``lowering(checked)`` rewrites such a rule into a DERIVED rule (text, compiled with
``recdsl.compile``) that the chunk families accept, plus an EPILOGUE:

- the derived rule keeps every declaration and every update (and the lets the updates use);
  its outputs are the plain reads ``x @ S`` / ``S @ x``, one per distinct read, after all
  updates;
- a read before the update becomes the read, after the update, of a new input ``p`` that
  carries the read vector shifted one token back (``p_{t-1} = x_t``); the runtime computes
  the read at a sequence's first token, ``x_0 @ S_init``, directly;
- a vector state ``n[K]`` becomes a matrix state ``n[K, ONE]`` (``ONE`` a new dim of size 1,
  bound by a new input ``one[ONE]`` of ones): its updates are lifted (``w`` -> ``outer(w, one)``,
  ``a * n`` -> ``diag(a) @ n``), ``dot(x, n)`` becomes ``x @ n`` and a direct use of ``n``
  (a [K] value) the right-side read ``n @ one``;
- a scalar state ``w`` becomes a matrix state ``w[ONE, ONE]``: a scalar decay stays a scalar
  decay, a state-free (scalar) term ``c`` becomes ``c * outer(one, one)``, and a use of ``w``
  the read ``one @ w`` (a [ONE] vector whose one entry is ``w``);
- the epilogue is each original output with every read replaced by a name bound to the read's
  value (``Read.name``), evaluated per token for all tokens at once
  (``recdsl.runtime.lowered``).

``lowering`` returns a ``Lowered`` or ``None``; ``why_not(checked)`` says why it is None.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..grammar import ast
from .checked import CheckedRule
from .derived import FreshNames, compile_derived
from .family import Refusal
from .pretty import describe, unparse

class NotLowerable(Refusal):
    """Why a rule cannot be lowered."""


@dataclass(eq=False)
class ReadPlan:
    """One distinct read of a state by the outputs.

    ``name``: the derived rule's output holding it, also the epilogue's name for its value.
    ``side``: left (``x @ S`` -> [V]), right (``S @ x`` -> [K]), dot (``dot(x, n)`` of a
    vector state, a scalar), vector (a vector state ``n`` itself, [K]: the read ``n @ one`` of
    the lifted state) or scalar (a scalar state ``w`` itself: ``one @ w`` of the lifted one,
    [ONE]). ``before``: the read is of the state before the token's updates; then ``shifted``
    names the derived rule's input carrying ``vector`` one token back (for vector and scalar
    reads ``vector`` is None and the shifted input carries ones)."""
    name: str
    state: str
    side: str
    vector: object  # the rule's (state-free) read vector expression
    before: bool
    shifted: Optional[str] = None


@dataclass(eq=False)
class Lowered:
    checked: CheckedRule  # the original rule
    text: str  # the derived rule's text
    reads: list  # ReadPlan, in the derived rule's output order
    epilogue: dict  # original output name -> expression over the reads' names
    vector_states: tuple = ()  # states lifted from [K] to [K, ONE]
    ones_input: Optional[str] = None  # the input of ones binding ONE (when states are lifted)
    scalar_states: tuple = ()  # states lifted from scalars to [ONE, ONE]
    _derived: object = field(default=None, repr=False)

    @property
    def family(self) -> str:
        """The chunkwise family (delta or diagonal) of the derived rule."""
        return self.derived.family_info.chunk

    @property
    def derived(self):
        """The derived rule, compiled (``recdsl.runtime.rule.Rule``)."""
        if self._derived is None:
            self._derived = compile_derived(self.text, f"<{self.checked.name} reads lowered>")
        return self._derived


_DEPTH = 0  # > 0 while a derived rule compiles (its family is classified then)


def lowering(checked: CheckedRule) -> Optional[Lowered]:
    """The read lowering of ``checked``, or None when it does not apply or the derived rule
    has no chunkwise form (``why_not`` says why)."""
    try:
        return lower(checked)
    except NotLowerable:
        return None


def for_family(checked: CheckedRule, family) -> Optional[Lowered]:
    """The hook for ``recdsl.ir.family.classify``: the read lowering of a rule that no chunkwise
    planner accepts (``family``: its ``Family``), or None (the rule already has a chunkwise
    form, or the lowering does not apply: ``why_not``)."""
    if family.chunk is not None:
        return None
    # an elementwise scan (minGRU's y = h) is lowered too: its chunk backends are listed after
    # the scan, which is measured faster for states with an axis of 1 (backends.SCAN_BELOW)
    return lowering(checked)


def why_not(checked: CheckedRule) -> Optional[str]:
    """Why ``lowering(checked)`` is None (None when it is not)."""
    try:
        lower(checked)
    except NotLowerable as e:
        return e.reason
    return None


def lower(checked: CheckedRule) -> Lowered:
    """The read lowering of ``checked``; raises ``NotLowerable``, also when the derived rule
    has no chunkwise form."""
    global _DEPTH
    if _DEPTH:  # the derived rule is being compiled: never lower it in turn
        raise NotLowerable("a derived rule is not lowered again")
    lowered = _Lowerer(checked).run()
    _DEPTH += 1
    try:
        derived = lowered.derived
    except Exception as err:  # a bug here must not break the rule: no lowering
        raise NotLowerable(f"the derived rule does not compile: {err}") from None
    finally:
        _DEPTH -= 1
    if derived.family_info.chunk is None:
        raise NotLowerable(f"the derived rule has no chunkwise form: {derived.family_reason}")
    return lowered


# ============================================================ the analysis


def _children(e) -> list:
    if isinstance(e, ast.BinOp):
        return [e.left, e.right]
    if isinstance(e, ast.Neg):
        return [e.operand]
    if isinstance(e, ast.Call):
        return list(e.args)
    return []


def _names(e):
    return {n.id for n in ast.walk(e) if isinstance(n, ast.Name)}


class _Lowerer:
    def __init__(self, checked: CheckedRule):
        self.rule = checked
        self.names = FreshNames(checked)
        self.rank = {v.name: v.rank for v in checked.states}
        self.total = {v.name: 0 for v in checked.states}  # update statements per state
        self.bound = {}  # top-level let/output name -> (statement, versions, state deps)
        self.reads = []
        self.by_key = {}
        self.one_dim = self.ones_input = None

    def ones(self):
        """The new dim ONE and the input of ones binding it (created on first use)."""
        if self.one_dim is None:
            self.one_dim, self.ones_input = self.fresh("ONE"), self.fresh("one")
        return self.one_dim, self.ones_input

    def fresh(self, base: str) -> str:
        return self.names.fresh(base)

    # ---------------------------------------------------------------- walking the body

    def state_deps(self, e) -> frozenset:
        out = set()
        for n in ast.walk(e):
            if isinstance(n, ast.Name):
                if n.kind == "state":
                    out.add(n.id)
                elif n.kind in ("let", "output") and n.id in self.bound:
                    out |= self.bound[n.id][2]
        return frozenset(out)

    def run(self) -> Lowered:
        rule = self.rule
        for st in ast.walk_statements(rule.body):
            if isinstance(st, ast.Update):
                self.total[st.state] += 1
        versions = {s: 0 for s in self.total}
        outputs = []
        for st in rule.body:
            if isinstance(st, ast.For):
                if any(isinstance(s, ast.Output) for s in ast.walk_statements(st.body)):
                    raise NotLowerable("an output inside a for block", st.pos)
                for s in ast.walk_statements(st.body):
                    if isinstance(s, ast.Update):
                        versions[s.state] += 1
            elif isinstance(st, ast.Update):
                versions[st.state] += 1
            elif isinstance(st, (ast.Let, ast.Output)):
                self.bound[st.name] = (st, dict(versions), self.state_deps(st.value))
                if isinstance(st, ast.Output):
                    outputs.append(st)
        # what the updates need: lets (transitively), never an output or a vector state's read
        needed = set()
        stack = [s.value for s in ast.walk_statements(rule.body) if isinstance(s, ast.Update)]
        for st in ast.walk_statements(rule.body):
            if isinstance(st, ast.Let) and not (st.name in self.bound
                                                and self.bound[st.name][0] is st):
                stack.append(st.value)  # lets inside for blocks stay with their block
        while stack:
            for n in ast.walk(stack.pop()):
                if isinstance(n, ast.Name) and n.kind == "output":
                    raise NotLowerable(f"output {n.id} is used by an update", n.pos)
                if isinstance(n, ast.Name) and n.kind == "let" and n.id in self.bound \
                        and n.id not in needed:
                    needed.add(n.id)
                    stack.append(self.bound[n.id][0].value)

        epilogue = {}
        for st in outputs:
            epilogue[st.name] = self.rewrite(st.value, self.bound[st.name][1])
        if not self.reads:
            raise NotLowerable("no output reads a state")

        vector_states = tuple(n for n, r in self.rank.items() if r == 1)
        scalar_states = tuple(n for n, r in self.rank.items() if r == 0)
        lifted = set(vector_states + scalar_states)
        if lifted:
            self.ones()
            kind = lambda n: "vector" if self.rank[n] == 1 else "scalar"
            for st in ast.walk_statements(rule.body):
                top = isinstance(st, ast.Let) and st.name in self.bound \
                    and self.bound[st.name][0] is st
                if isinstance(st, ast.Let) and (st.name in needed or not top):
                    used = _names(st.value) & lifted
                    if used:
                        name = sorted(used)[0]
                        raise NotLowerable(f"let {st.name} uses the {kind(name)} state "
                                           f"{name} in an update", st.pos)
                if isinstance(st, ast.Update):
                    used = _names(st.value) & (lifted - {st.state})
                    if used:
                        name = sorted(used)[0]
                        raise NotLowerable(f"the update of {st.state} uses the {kind(name)} "
                                           f"state {name}", st.pos)

        text = self.derived_text(needed, vector_states, scalar_states)
        return Lowered(rule, text, self.reads, epilogue, vector_states, self.ones_input,
                       scalar_states)

    # ---------------------------------------------------------------- outputs -> reads

    def rewrite(self, e, versions):
        """``e`` with every read replaced by a name bound to its value (nodes without reads are
        kept, so names keep resolving as in the rule)."""
        if not self.state_deps(e):
            return e
        if isinstance(e, ast.Name):
            if e.kind == "state":
                if self.rank[e.id] == 2:
                    raise NotLowerable(f"state {e.id} is used directly, not through a read "
                                       f"x @ {e.id}", e.pos)
                side = "vector" if self.rank[e.id] == 1 else "scalar"
                return self.read(e, e.id, None, side, versions)
            st, let_versions, _ = self.bound[e.id]
            return self.rewrite(st.value, let_versions)
        read = self.match_read(e)
        if read is not None:
            state, vector, side = read
            return self.read(e, state, vector, side, versions)
        if isinstance(e, ast.BinOp):
            left, right = self.rewrite(e.left, versions), self.rewrite(e.right, versions)
            return ast.BinOp(e.op, left, right, e.pos, e.start, shape=e.shape)
        if isinstance(e, ast.Neg):
            return ast.Neg(self.rewrite(e.operand, versions), e.pos, shape=e.shape)
        if isinstance(e, ast.Call):
            return ast.Call(e.fn, [self.rewrite(a, versions) for a in e.args], e.pos,
                            shape=e.shape)
        raise NotLowerable(f"{unparse(e)} reads a state in a form the lowering does not know",
                           ast.expr_span(e))

    def match_read(self, e):
        is_state = lambda x: isinstance(x, ast.Name) and x.kind == "state"
        # a vector state times a matrix (``n @ M``) is no read: ``n`` is read directly
        vec = lambda x: isinstance(x.shape, tuple) and len(x.shape) == 1
        if isinstance(e, ast.BinOp) and e.op == "@":
            if is_state(e.right) and not is_state(e.left):
                if self.rank[e.right.id] == 2:
                    return e.right.id, e.left, "left"
                if self.rank[e.right.id] == 1 and vec(e.left):
                    return e.right.id, e.left, "dot"
            if is_state(e.left) and not is_state(e.right):
                if self.rank[e.left.id] == 2:
                    return e.left.id, e.right, "right"
                if self.rank[e.left.id] == 1 and vec(e.right):
                    return e.left.id, e.right, "dot"
        if isinstance(e, ast.Call) and e.fn == "dot":
            a, b = e.args
            for s, x in ((a, b), (b, a)):
                if is_state(s) and not is_state(x) and self.rank[s.id] == 1:
                    return s.id, x, "dot"
        return None

    def read(self, node, state, vector, side, versions):
        if vector is None:  # a vector or scalar state used directly
            pass
        elif self.state_deps(vector):
            raise NotLowerable(f"the read {unparse(node)} is along a vector that depends on "
                               f"a state", ast.expr_span(node))
        elif not isinstance(vector.shape, tuple) or len(vector.shape) != 1:
            raise NotLowerable(f"the read {unparse(node)} is along a {vector.shape} value, not "
                               f"a vector", ast.expr_span(node))
        version, total = versions[state], self.total[state]
        if version == total:
            before = False
        elif version == 0:
            before = True
        else:
            raise NotLowerable(f"{unparse(node)} reads {state} between two of its updates",
                               ast.expr_span(node))
        key = (state, side, None if vector is None else unparse(vector), before)
        if key not in self.by_key:
            plan = ReadPlan(self.fresh(f"read_{state}"), state, side, vector, before)
            if before:
                plan.shifted = self.fresh(f"next_{state}")
            self.by_key[key] = plan
            self.reads.append(plan)
        plan = self.by_key[key]
        return ast.Name(plan.name, ast.expr_span(node), shape=node.shape, kind="let")

    # ---------------------------------------------------------------- the derived rule

    def derived_text(self, needed, vector_states, scalar_states) -> str:
        rule = self.rule
        one_dim, ones_input = self.one_dim, self.ones_input
        decl = lambda v, extra=(): v.name + (f"[{', '.join(tuple(v.dims) + tuple(extra))}]"
                                             if tuple(v.dims) + tuple(extra) else "")
        extra = lambda v: ((one_dim,) if v.name in vector_states else
                           (one_dim, one_dim) if v.name in scalar_states else ())
        lines = [f"rule {self.fresh(rule.name + '_reads')}", ""]
        dims = list(rule.dims) + ([one_dim] if one_dim else [])
        if dims:
            lines.append("dims " + ", ".join(dims))
        lines.append("state " + ", ".join(decl(v, extra(v)) for v in rule.states))
        inputs = [decl(v) for v in rule.inputs]
        if ones_input:
            inputs.append(f"{ones_input}[{one_dim}]")
        for r in self.reads:
            if r.before:
                size = one_dim if r.vector is None else r.vector.shape[0]
                inputs.append(f"{r.shifted}[{size}]")
        if inputs:
            lines.append("input " + ", ".join(inputs))
        if rule.params:
            lines.append("param " + ", ".join(decl(v) for v in rule.params))
        for name, value in rule.consts.items():
            lines.append(f"const {name} = {float(value)!r}")
        lines.append("")
        body = []
        for st in rule.body:
            if isinstance(st, ast.Output):
                continue
            if isinstance(st, ast.Let) and st.name not in needed and self.bound[st.name][2]:
                continue  # a let reading states that only the outputs use
            body.append(st)
        for depth, st in _lines(body):
            pad = "    " * depth
            if isinstance(st, ast.Update) and st.state in vector_states + scalar_states:
                lines.append(f"{pad}{st.state} = {self.lift(st.value, st.state, ones_input)}")
            else:
                lines.append(pad + describe(st))
        for r in self.reads:
            vec = r.shifted if r.before else ones_input if r.vector is None else \
                _paren(unparse(r.vector))
            value = {"left": f"{vec} @ {r.state}", "right": f"{r.state} @ {vec}",
                     "dot": f"{vec} @ {r.state}", "vector": f"{r.state} @ {vec}",
                     "scalar": f"{vec} @ {r.state}"}[r.side]
            lines.append(f"output {r.name} = {value}")
        return "\n".join(lines) + "\n"

    def lift(self, e, state, ones) -> str:
        """An update term of vector state ``state`` as a [K, ONE] matrix term, or of scalar
        state ``state`` as a [ONE, ONE] one."""
        deps = lambda x: state in _names(x) or any(
            isinstance(n, ast.Name) and n.kind == "state" for n in ast.walk(x))
        scalar = self.rank[state] == 0
        if not deps(e):
            if scalar:
                return f"({unparse(e)}) * outer({ones}, {ones})"
            if e.shape == ():
                raise NotLowerable(f"{unparse(e)} adds a scalar to the vector state {state}",
                                   ast.expr_span(e))
            return f"outer({unparse(e)}, {ones})"
        if isinstance(e, ast.Name) and e.id == state:
            return state
        if isinstance(e, ast.Neg):
            return f"-({self.lift(e.operand, state, ones)})"
        if isinstance(e, ast.BinOp) and e.op in "+-":
            return f"({self.lift(e.left, state, ones)} {e.op} {self.lift(e.right, state, ones)})"
        if isinstance(e, ast.BinOp) and e.op == "*":
            for a, x in ((e.left, e.right), (e.right, e.left)):
                if deps(a):
                    continue
                if a.shape == ():
                    return f"({unparse(a)}) * ({self.lift(x, state, ones)})"
                return f"diag({unparse(a)}) @ ({self.lift(x, state, ones)})"
        if isinstance(e, ast.BinOp) and e.op == "/" and not deps(e.right) and e.right.shape == ():
            return f"({self.lift(e.left, state, ones)}) / ({unparse(e.right)})"
        kind = "scalar" if scalar else "vector"
        raise NotLowerable(f"{unparse(e)} in the update of the {kind} state {state} is not "
                           f"linear in it", ast.expr_span(e))


def _paren(text: str) -> str:
    simple = text.replace("_", "a").isalnum() or (text.endswith(")") and text.find("(") > 0
                                                  and text[:text.find("(")].isidentifier()
                                                  and text.count("(") == 1)
    return text if simple else f"({text})"


def _lines(body, depth=0):
    for st in body:
        yield depth, st
        if isinstance(st, ast.For):
            yield from _lines(st.body, depth + 1)
