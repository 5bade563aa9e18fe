"""The text ``recdsl show`` prints: the family (for recurrent rules the reason, at
``file:line:col``), the per-token lets, each state's recurrence in mathematical form and the
reads, e.g. for gated_delta::

    S_t = exp(g_t) (I - beta_t kn_t kn_tᵀ) S_{t-1} + beta_t kn_t v_tᵀ

Notation: per-token values carry ``_t`` (``_{t,j}`` inside ``for j``), params, consts and dims
none; a state is ``S_{t-1}`` before the token's updates, ``S_t`` after them, ``S^(n)`` after
its n-th update when it has more; ``*`` and ``@`` are juxtaposition, vectors are columns
(``x @ S`` is ``xᵀ S``, ``outer(a, b)`` is ``a bᵀ``).
"""
from __future__ import annotations

from typing import Optional

from ..grammar import ast
from .affine import Analysis, StateAnalysis, analyse
from .checked import CheckedRule
from .family import Family, classify
from .shapes import Diag

_SUM, _PRODUCT, _UNARY, _POWER, _ATOM = range(5)
_LEVEL = {"+": _SUM, "-": _SUM, "*": _PRODUCT, "/": _PRODUCT, "@": _PRODUCT, "**": _POWER}
_T = "ᵀ"


# ============================================================ expressions in math form


class _Math:
    """AST expression -> math text. ``labels`` names each state (``S_{t-1}``, ``S_t``);
    ``loop_names`` are lets bound inside a ``for`` (they vary with j too)."""

    def __init__(self, labels: dict, loop_names: dict):
        self.labels = labels
        self.loop_names = loop_names  # let name -> loop variable

    def level(self, e) -> int:
        if isinstance(e, ast.BinOp):
            return _LEVEL[e.op]
        if isinstance(e, ast.Neg):
            return _UNARY
        if isinstance(e, ast.Call) and e.fn in ("outer", "dot"):
            return _PRODUCT
        return _ATOM

    def wrap(self, e, tightest: int) -> str:
        text = self(e)
        return f"({text})" if self.level(e) < tightest else text

    def transposed(self, e) -> str:
        return self.wrap(e, _ATOM) + _T

    def __call__(self, e) -> str:
        if isinstance(e, ast.Num):
            return e.text or f"{e.value:g}"
        if isinstance(e, ast.Name):
            if e.kind == "state":
                return self.labels.get(e.id, e.id)
            if e.kind in ("input", "let", "output"):
                var = self.loop_names.get(e.id)
                return f"{e.id}_{{t,{var}}}" if var else f"{e.id}_t"
            return e.id
        if isinstance(e, ast.Index):
            if e.target.kind == "input":
                return f"{e.target.id}_{{t,{e.index.id}}}"
            return f"{e.target.id}_{e.index.id}"
        if isinstance(e, ast.Neg):
            return f"-{self.wrap(e.operand, _PRODUCT)}"
        if isinstance(e, ast.Call):
            if e.fn == "outer":
                return f"{self.wrap(e.args[0], _PRODUCT)} {self.transposed(e.args[1])}"
            if e.fn == "dot":
                return f"{self.transposed(e.args[0])} {self.wrap(e.args[1], _POWER)}"
            if e.fn == "abs":
                return f"|{self(e.args[0])}|"
            return f"{e.fn}({', '.join(self(a) for a in e.args)})"
        if isinstance(e, ast.BinOp):
            if e.op == "**":
                return f"{self.wrap(e.left, _ATOM)}^{self.exponent(e.right)}"
            if e.op in "+-/":
                level = _LEVEL[e.op]
                return f"{self.wrap(e.left, level)} {e.op} {self.wrap(e.right, level + 1)}"
            left = self.wrap(e.left, _PRODUCT)
            # a scalar times a product reads the same without parentheses: beta_t kn_t v_tᵀ
            tight = _PRODUCT if e.op == "*" and e.left.shape == () else _PRODUCT + 1
            right = self.wrap(e.right, tight if e.op == "*" else _POWER)
            if isinstance(e.right, ast.Neg):
                right = f"({self(e.right)})"
            if e.op == "@" and _is_vector(e.left) and not isinstance(e.right.shape, Diag):
                left = self.transposed(e.left) if self.level(e.left) == _ATOM else f"({self(e.left)}){_T}"
            return f"{left} {right}"
        raise TypeError(type(e).__name__)

    def exponent(self, e) -> str:
        if isinstance(e, (ast.Num, ast.Name)) or (isinstance(e, ast.Neg) and isinstance(e.operand, ast.Num)):
            return self(e)
        return f"({self(e)})"


def _is_vector(e) -> bool:
    return isinstance(e.shape, tuple) and len(e.shape) == 1


# ============================================================ where each statement stands


def _walk(body, loop=None):
    for st in body:
        yield st, loop
        if isinstance(st, ast.For):
            yield from _walk(st.body, st)


def _versions(rule: CheckedRule):
    """(statement id -> {state: label of its value there}, {state: total updates})."""
    total = {s.name: 0 for s in rule.states}
    for st, _ in _walk(rule.body):
        if isinstance(st, ast.Update):
            total[st.state] += 1
    counts = {s.name: 0 for s in rule.states}
    labels = {}

    def run(body, loop, in_loop):
        for st in body:
            labels[id(st)] = {s: _label(s, counts[s], total[s]) for s in counts}
            for s, n in in_loop.items():  # inside for j: the value at step j
                labels[id(st)][s] = f"{s}_{{t,{loop.var}}}" + (f"^({n})" if n else "")
            if isinstance(st, ast.Update):
                counts[st.state] += 1
                if st.state in in_loop:
                    in_loop[st.state] += 1
            elif isinstance(st, ast.For):
                updated = {u.state: 0 for u, _ in _walk(st.body) if isinstance(u, ast.Update)}
                run(st.body, st, updated)

    run(rule.body, None, {})
    return labels, total


def _label(state: str, version: int, total: int) -> str:
    if version == 0:
        return f"{state}_{{t-1}}"
    if version == total:
        return f"{state}_t"
    return f"{state}^({version})"


class _Printer:
    def __init__(self, rule: CheckedRule):
        self.rule = rule
        self.labels, self.total = _versions(rule)
        self.loop_names = {}
        for st, loop in _walk(rule.body):
            if isinstance(st, ast.Let) and loop is not None:
                self.loop_names[st.name] = loop.var

    def math_at(self, stmt) -> _Math:
        return _Math(self.labels[id(stmt)], self.loop_names)

    def math(self, labels=None) -> _Math:
        return _Math(labels or {}, self.loop_names)


# ============================================================ the recurrence of a state


def _factor_texts(factors, m: _Math):
    """(scalars, left factors in application order, right factors in application order)."""
    scalars, left, right = [], [], []
    for f in factors:
        if f.kind == "scalar":
            scalars.append(f.decay)
        elif f.kind in ("rows", "cols", "entries"):
            (right if f.kind == "cols" else left).append(_elementwise_text(f, m))
        elif f.kind == "rank_one":
            coef, sign = (f.coef, "-") if f.coef.sign == 1 else (f.coef.negate(), "+")
            b = coef.scaled(f.vec)
            diag = "I" if f.diag is None else (
                f"{m.wrap(f.diag.decay, _PRODUCT)} I" if f.diag.kind == "scalar"
                else _elementwise_text(f.diag, m).rstrip(" ⊙"))
            if f.side == "right":
                right.append(f"({diag} {sign} {m.wrap(f.key, _PRODUCT)} {m.transposed(b)})")
            else:
                left.append(f"({diag} {sign} {m.wrap(b, _PRODUCT)} {m.transposed(f.key)})")
    return scalars, left, right


def _elementwise_text(f, m: _Math) -> str:
    """A row or column decay as diag(x), a per-entry one as ``D ⊙``."""
    if f.decay is not None:
        text = m(f.decay)
    else:  # a sum of row and column decays: no single expression
        terms = []
        for coef, ops in f.parts:
            body = " ".join(f"diag({m(x)})" if k != "entries" else m.wrap(x, _PRODUCT)
                            for k, x in ops)
            terms.append(body if coef.is_one else f"{m.wrap(coef.expr(), _PRODUCT)} {body}".strip())
        return f"({' + '.join(terms)}) ⊙"
    if f.kind == "entries":
        return f"{m.wrap(f.decay, _POWER)} ⊙"
    return f"diag({text})"


def _scalar_text(scalars, m: _Math) -> list:
    out = []
    for i, s in enumerate(scalars):
        text = m(s)
        divided = isinstance(s, ast.BinOp) and s.op == "/"
        if m.level(s) < _PRODUCT or divided or (i > 0 and isinstance(s, ast.Neg)):
            text = f"({text})"
        out.append(text)
    return out


def _apply(factors, inner: str, m: _Math) -> str:
    scalars, left, right = _factor_texts(factors, m)
    return " ".join(_scalar_text(scalars, m) + left[::-1] + [inner] + right)


def _write_expr(w):
    at = ast.expr_span(w.node)
    if w.kind == "scalar":
        return w.coef.expr(at)
    if w.kind == "outer":
        value = ast.Call("outer", [w.left, w.right], at, shape=(w.left.shape[0], w.right.shape[0]))
    else:
        value = w.left if w.kind == "vector" else w.value
    return w.coef.scaled(value, at)


def _closed_form(steps, prev: str, m: _Math) -> str:
    """``A prev + W`` for consecutive steps outside loops (writes carry the later factors)."""
    factors, writes = [], []
    for step in steps:
        for w in writes:
            w[1].extend(step.factors)
        factors.extend(step.factors)
        writes.extend((w, []) for w in step.writes)
    text = _apply(factors, prev, m)
    for w, later in writes:
        e = _write_expr(w)
        negative = isinstance(e, ast.Neg)
        inner = m.wrap(e.operand if negative else e, _PRODUCT)
        term = _apply(later, inner, m) if later else inner
        text += f" {'-' if negative else '+'} {term}"
    return text


def _segments(steps):
    groups = []
    for step in steps:
        if groups and groups[-1][0] is step.loop:
            groups[-1][1].append(step)
        else:
            groups.append((step.loop, [step]))
    return groups


def _recurrence(sa: StateAnalysis, m: _Math) -> list:
    name = sa.name
    segments = _segments(sa.steps)
    if all(loop is None for loop, _ in segments):
        return [f"{name}_t = {_closed_form(sa.steps, f'{name}_{{t-1}}', m)}"]
    loops = [loop for loop, _ in segments if loop is not None]
    # one loop: S_{t,j} is the value entering step j; more: H1_j, H2_j, ...
    names = {id(loop): (f"{name}_{{t," if len(loops) == 1 else f"H{i + 1}_{{")
             for i, loop in enumerate(loops)}
    sub = lambda h, index: f"{h}{index}}}"
    lines, prev = [], f"{name}_{{t-1}}"
    for i, (loop, steps) in enumerate(segments):
        last = i == len(segments) - 1
        if loop is None:
            nxt = segments[i + 1][0] if not last else None
            target = f"{name}_t" if last else sub(names[id(nxt)], 0)
            lines.append(f"{target} = {_closed_form(steps, prev, m)}")
            prev = target
            continue
        h, j = names[id(loop)], loop.var
        if prev != sub(h, 0):
            lines.append(f"{sub(h, 0)} = {prev}")
        lines.append(f"{sub(h, j + '+1')} = {_closed_form(steps, sub(h, j), m)},   "
                     f"{j} = 0..{loop.dim}-1")
        prev = sub(h, loop.dim)
        if last:
            lines.append(f"{name}_t = {prev}")
    # the transition alone: a product over each loop
    parts = []
    for loop, steps in segments:
        factors = [f for s in steps for f in s.factors if f.kind != "identity"]
        if not factors:
            continue
        scalars, left, right = _factor_texts(factors, m)
        body = " ".join(_scalar_text(scalars, m) + left[::-1] + right)
        if loop is not None:
            body = body if len(factors) == 1 else f"[{body}]"
            body = f"∏_{{{loop.var}={loop.dim}-1..0}} {body}"
        parts.append(body)
    lines.append(f"A_t = {' '.join(parts[::-1]) or 'I'}   (transition: {name}_t = A_t {name}_{{t-1}} + W_t)")
    return lines


# ============================================================ the whole text


def _caret(rule: CheckedRule, pos: ast.Pos) -> list:
    lines = rule.source.splitlines()
    if not 0 < pos.line <= len(lines):
        return []
    text = lines[pos.line - 1]
    room = max(1, len(text) - pos.column + 1)
    return [f"      {text}", "      " + " " * (pos.column - 1) + "^" * min(pos.length, room)]


def render(checked: CheckedRule, grad_code: Optional[str] = None,
           family: Optional[Family] = None, backends: Optional[dict] = None,
           order: Optional[dict] = None) -> str:
    """What ``recdsl show`` prints for a checked rule; ``backends`` (name -> the reason it
    refuses the rule, or None), ``order`` (device -> the backends that run there, best
    first) and ``grad_code`` are appended under headings when given."""
    analysis: Analysis = family.analysis if family and family.analysis else analyse(checked)
    family = family or classify(checked, analysis)
    p = _Printer(checked)
    out = [f"rule {checked.name} ({checked.filename})", f"family: {family.name}"]
    if family.staged is not None and family.name == "recurrent":
        out[-1] = "family: staged: no parallel form as a whole, its states run in stages (below)"
        out.append(f"  reason: {family.where(checked.filename)}: {family.reason}")
        if family.pos is not None:
            out += _caret(checked, family.pos)
    elif family.lowered is not None and family.name == "recurrent":
        out[-1] = f"family: {family.lowered.family}, with its reads lowered"
        out.append(f"  the updates and plain reads of the states run as the "
                   f"{family.lowered.family} family; each output is then a per-token function of "
                   f"those reads (as written: {family.reason}, "
                   f"{family.where(checked.filename)})")
    elif family.name == "recurrent":
        out.append(f"  reason: {family.where(checked.filename)}: {family.reason}")
        if family.pos is not None:
            out += _caret(checked, family.pos)
    else:
        out.append(f"  {family.reason}")
    if family.verdicts:
        out += ["", "families (asked in order):"]
        width = max(map(len, family.verdicts))
        for name, v in family.verdicts.items():
            if name == "newton":  # a backend's verdict, not a family: its own section below
                continue
            verdict = "yes" if v.accepted else f"no: {v.reason}" + (
                f" ({v.where(checked.filename)})" if v.pos else "")
            out.append(f"  {name:<{width}}  {verdict}")
        if family.lowered is not None:
            out.append(f"  {family.lowered.family} with its reads lowered: yes")
    newton = family.verdicts.get("newton")
    if newton is not None:  # the state Jacobian (recdsl.ir.jacobian) and the newton backend's plan
        line = newton.reason if newton.accepted else f"no Newton form: {newton.reason}"
        if newton.accepted and (family.staged is not None or any(
                family.accepts(f) for f in ("delta", "diagonal", "dplr", "scan"))):
            # the structure alone (the plan's first sentence): the plan is not carried out
            line = line.split(". ", 1)[0] + " (not run: the rule has a parallel form)"
        out += ["", "newton: " + line]
    if family.staged is not None:
        out += ["", "stages:"] + [f"  {line}" for line in family.staged.describe().splitlines()]
    elif family.name == "recurrent":
        from .stages import why_not
        reason = why_not(checked)
        if reason:
            out += ["", f"stages: none: {reason}"]

    read_lets = {rv.name for rv in analysis.reads if rv.kind == "let"}
    lets = []
    for st, loop in _walk(checked.body):
        if isinstance(st, ast.Let) and st.name not in read_lets:
            prefix = f"  [for {loop.var} in {loop.dim}] " if loop is not None else "  "
            lets.append(f"{prefix}{p.math_at(st)(ast.Name(st.name, st.pos, kind='let'))} = "
                        f"{p.math_at(st)(st.value)}")
    if lets:
        out += ["", "per token:"] + lets

    out += ["", "recurrence:"]
    for sa in analysis.states.values():
        if sa.affine:
            out += [f"  {line}" for line in _recurrence(sa, p.math())]
            continue
        pb = sa.problem
        coupled = pb.kind == "cross" and all(
            analysis.states[s].affine for s in pb.states if s in analysis.states)
        verdict = "coupled to other states" if coupled else "not affine in the states"
        out.append(f"  {sa.name}: {verdict}: {pb.message} "
                   f"({checked.filename}:{pb.line}:{pb.column})")
        updates = [(st, loop) for st, loop in _walk(checked.body)
                   if isinstance(st, ast.Update) and st.state == sa.name]
        for st, loop in updates:
            rhs = p.math_at(st)(st.value)
            if loop is None:
                lhs = _label(sa.name, _count_before(checked, st) + 1, p.total[sa.name])
                out.append(f"    {lhs} = {rhs}")
            else:
                out.append(f"    [for {loop.var} in {loop.dim}] {sa.name} ← {rhs}")

    out += ["", "reads:"]
    for rv in analysis.reads:
        m = p.math_at(rv.node)
        text = f"  {rv.name}_t = {m(rv.node.value)}"
        out.append(f"{text:<44}  {_read_note(rv)}")

    if backends is not None:
        out += ["", "backends:"]
        width = max(map(len, backends))
        for name, reason in backends.items():
            out.append(f"  {name:<{width}}  " + ("yes" if reason is None else f"no: {reason}"))
    for device, names in (order or {}).items():
        out.append(f"  on {device}, best first: {', '.join(names)}")

    if grad_code is not None:
        out += ["", "derivatives:", grad_code.rstrip("\n")]
    return "\n".join(out) + "\n"


def _count_before(rule: CheckedRule, stmt) -> int:
    """How many updates of stmt's state precede it."""
    n = 0
    for st, _ in _walk(rule.body):
        if st is stmt:
            return n
        if isinstance(st, ast.Update) and st.state == stmt.state:
            n += 1
    raise AssertionError(stmt)


def _read_note(rv) -> str:
    if rv.problem is not None:
        what = "a linear read" if rv.kind == "output" else "a function of linear reads"
        return f"not {what}: {rv.problem.message}"
    stale = [r.state for r in rv.reads if not r.after_update]
    notes = []
    if rv.kind == "let":
        states = sorted({r.state for r in rv.reads})
        notes.append(f"per-token function of a read of {', '.join(states)}")
    else:
        states = sorted({t.read.state for t in rv.terms})
        if states:
            notes.append(f"linear read of {', '.join(states)}")
        else:
            notes.append("per-token value (reads no state)")
        if rv.chain:
            notes.append(f"chained through {', '.join(rv.chain)}")
        if rv.extra is not None and states:
            notes.append("plus a per-token term")
    if stale:
        notes.append(f"reads {', '.join(sorted(set(stale)))} before its update")
    return "; ".join(notes)
