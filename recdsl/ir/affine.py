"""State-affine analysis: is each state's per-token update ``S' = A(S) + W``, and how do the
outputs read the states?

Works on the checked syntax tree (``recdsl.ir.checked.CheckedRule``). Every per-token value
below is an AST expression (``recdsl.grammar.ast``), either a node of the rule itself (so it
keeps its position) or a small node built here (``Coef.expr``) positioned at its first factor.

The data model, outermost first:

``Analysis``           ``analyse(checked)``: ``states`` (name -> ``StateAnalysis``, in declaration
                       order) and ``reads`` (``ReadValue`` per output and per chained let, in
                       source order).
``StateAnalysis``      one state: ``affine``; if so ``steps``, else ``problem``. ``factors`` and
                       ``writes`` flatten the steps (identity factors left out).
``Step``               one update statement ``S = expr`` read as ``S <- F_n ... F_1 S + sum(writes)``:
                       ``factors`` in application order (first applied first), ``writes``, and
                       ``loop`` (a ``Loop`` when the statement is inside ``for j in NH``: the step
                       is repeated NH times, ``j = 0 .. NH-1``).
``Factor``             ``kind`` is one of
                         identity                S
                         scalar    decay coef    decay * S              (decay a per-token scalar,
                                                                         coef the same as a Coef)
                         rows      decay         diag(decay) @ S        (a vector state: decay * h)
                         cols      decay         S @ diag(decay)
                         entries   parts         D ⊙ S, D = sum(coef * product of ops): the
                                                 per-entry (Hadamard) decay (Mamba-1's
                                                 exp(dt ⊗ A)), or a sum of row and column decays
                         rank_one  vec key coef  (D - coef * vec keyᵀ) S   (side "left")
                                   diag          S (D - coef * key vecᵀ)   (side "right")
                       D is the identity when ``diag`` is None, else ``diag``, an elementwise
                       Factor (scalar, rows, cols or entries): the sum ``alpha * S - beta *
                       outer(k, k @ S)`` is ``(alpha I - beta k kᵀ) S``, never ``alpha (I - beta /
                       alpha k kᵀ) S``, which divides by a coefficient that may be 0.
                       ``parts`` (every elementwise factor): ``((Coef, ops), ...)``, each op
                       ``("rows", x)``, ``("cols", y)`` or ``("entries", M)``: the decay as a sum of
                       products, whatever the kind (a scalar decay is ``((coef, ()),)``).
                       ``householder`` is true for a left rank_one factor whose ``vec`` is its
                       ``key`` and that a write of the same step (before the next erase, in the same
                       loop iteration) writes along that key: ``(I - beta k kᵀ)``.
``Write``              a term free of states: ``kind`` outer (``coef * outer(left, right)``),
                       vector (``coef * left``), scalar (``coef``) or other (``coef * value``, a
                       matrix that is not an outer product).
``Coef``               a per-token scalar ``sign * prod(factors) / prod(divisors)``; ``expr()``
                       is it as one expression, ``scaled(e)`` is ``coef * e``.
``Problem``            why something is not in the form above: ``kind`` (nonlinear, product, gate,
                       write, cross, stale, unrecognised, read), a one-line ``message``, ``pos``
                       (line and column of the offending term), ``node`` and ``states`` (the states
                       the term depends on, to trace a root cause).
``Read``               one linear read ``vector @ state`` (side "left") or ``state @ vector``
                       (side "right"), ``dot(vector, n)`` for a vector state (side "dot");
                       ``after_update`` is false when it reads the state before the token's last
                       update of it.
``ReadValue``          an output, or a let that depends on states and feeds an output's read
                       (Raven's ``p = softmax(Sk @ q)``). ``linear``: the value is
                       ``sum(coef * read) + extra`` (``terms``, ``extra``); ``reads``: every read
                       inside; ``chain``: the lets holding reads that this value's read vectors
                       depend on; ``problem``: why it is not a linear read (for an output) or not a
                       per-token function of linear reads (for a let), or None.

Updates are expanded into a sum of terms (``+``, ``-``, scalar ``*`` and ``/`` distribute, and
so do ``diag(x) @`` and ``@ diag(x)``, which are taken out again when every term shares them);
lets that read a state are inlined, lets free of states stay as names. Each problem names the
first term (left to right) that cannot be placed. Nothing symbolic beyond that: coefficients
are kept as products of the rule's own expressions, compared structurally (``same_expr``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..grammar import ast
from .checked import CheckedRule, Var
from .pretty import unparse

# ============================================================ the data model


@dataclass(frozen=True, eq=False)
class Coef:
    """A per-token scalar ``sign * prod(factors) / prod(divisors)``; factors are state-free
    scalar expressions."""
    sign: int = 1
    factors: tuple = ()
    divisors: tuple = ()

    @staticmethod
    def of(e) -> "Coef":
        """Split a scalar expression into its sign, factors and divisors."""
        if isinstance(e, ast.Neg):
            return Coef.of(e.operand).negate()
        if isinstance(e, ast.BinOp) and e.op == "*" and e.left.shape == () and e.right.shape == ():
            return Coef.of(e.left) * Coef.of(e.right)
        if isinstance(e, ast.BinOp) and e.op == "/" and e.left.shape == () and e.right.shape == ():
            return Coef.of(e.left) / Coef.of(e.right)
        return Coef(1, (e,), ())

    @property
    def is_one(self) -> bool:
        return self.sign == 1 and not self.factors and not self.divisors

    def negate(self) -> "Coef":
        return Coef(-self.sign, self.factors, self.divisors)

    def __mul__(self, other: "Coef") -> "Coef":
        return _cancel(self.sign * other.sign, self.factors + other.factors,
                       self.divisors + other.divisors)

    def __truediv__(self, other: "Coef") -> "Coef":
        return _cancel(self.sign * other.sign, self.factors + other.divisors,
                       self.divisors + other.factors)

    def same(self, other: "Coef") -> bool:
        return (self.sign == other.sign and _same_multiset(self.factors, other.factors)
                and _same_multiset(self.divisors, other.divisors))

    def expr(self, at: Optional[ast.Pos] = None):
        """The coefficient as one expression (the rule's own node when it is a single factor)."""
        at = at or (ast.expr_span(self.factors[0]) if self.factors else ast.Pos(0, 0))
        value = _product(self.factors, at) if self.factors else _num(1, at)
        if self.divisors:
            value = _binop("/", value, _product(self.divisors, at), at)
        return value if self.sign == 1 else ast.Neg(value, at, shape=())

    def text(self) -> str:
        return unparse(self.expr())

    def scaled(self, e, at: Optional[ast.Pos] = None):
        """``self * e`` as one expression of e's shape."""
        return _scale(self, e, at or span(e))


@dataclass
class Loop:
    """``for var in dim``: the statements inside are repeated, ``var = 0 .. dim-1``."""
    var: str
    dim: str
    node: ast.For
    parent: Optional["Loop"] = None


ELEMENTWISE = ("scalar", "rows", "cols", "entries")


@dataclass(eq=False)
class Factor:
    kind: str  # identity, scalar, rows, cols, entries, rank_one
    node: object  # the term of the source it comes from
    decay: object = None  # scalar: the scalar; rows/cols: the vector x of diag(x); entries: D
    #                       when it is one expression (None for a sum of row and column decays)
    coef: Optional[Coef] = None  # scalar: the decay as a Coef; rank_one: b = coef * vec
    vec: object = None  # rank_one: the vector b is a multiple of
    key: object = None  # rank_one: k in I - b kᵀ
    householder: bool = False
    loop: Optional[Loop] = None
    side: str = "left"  # rank_one: left (D - b kᵀ) S or right S (D - k bᵀ)
    diag: Optional["Factor"] = None  # rank_one: its elementwise part D (None: the identity)
    sum_parts: tuple = ()  # elementwise factors merged from a sum: ((Coef, ops), ...)

    @property
    def elementwise(self) -> bool:
        return self.kind in ELEMENTWISE

    @property
    def parts(self) -> tuple:
        """An elementwise factor's decay as ``((Coef, ops), ...)``: sum of coef * product of ops."""
        if self.sum_parts:
            return self.sum_parts
        if self.kind == "scalar":
            return ((self.coef if self.coef is not None else Coef.of(self.decay), ()),)
        if self.kind in ("rows", "cols", "entries"):
            return ((Coef(), ((self.kind, self.decay),)),)
        raise ValueError(f"a {self.kind} factor is not elementwise")


@dataclass(eq=False)
class Write:
    kind: str  # outer, vector, scalar, other
    node: object
    coef: Coef = field(default_factory=Coef)
    left: object = None  # outer: a in outer(a, b); vector: the vector
    right: object = None  # outer: b
    value: object = None  # other: the matrix
    loop: Optional[Loop] = None


@dataclass(eq=False)
class Step:
    node: ast.Update
    factors: list  # application order
    writes: list
    loop: Optional[Loop] = None


@dataclass(eq=False)
class Problem:
    kind: str  # nonlinear, product, gate, write, cross, stale, unrecognised, read
    message: str
    pos: ast.Pos
    node: object = None
    states: tuple = ()

    @property
    def line(self) -> int:
        return self.pos.line

    @property
    def column(self) -> int:
        return self.pos.column


@dataclass(eq=False)
class StateAnalysis:
    var: Var
    affine: bool
    steps: list = field(default_factory=list)
    problem: Optional[Problem] = None

    @property
    def name(self) -> str:
        return self.var.name

    @property
    def factors(self) -> list:
        """The non-identity factors of A, in application order (a loop's once)."""
        return [f for s in self.steps for f in s.factors if f.kind != "identity"]

    @property
    def writes(self) -> list:
        return [w for s in self.steps for w in s.writes]


def loop_groups(steps) -> list:
    """``steps`` as ``(loop, [steps])`` runs in order: consecutive steps of one ``for`` body
    together (to be repeated per loop value), each step outside a loop alone (loop None)."""
    groups = []
    for step in steps:
        if groups and step.loop is not None and groups[-1][0] is step.loop:
            groups[-1][1].append(step)
        else:
            groups.append((step.loop, [step]))
    return groups


@dataclass(eq=False)
class Read:
    state: str
    vector: object
    side: str  # left: vector @ S; right: S @ vector; dot: dot(vector, n)
    node: object
    version: int  # how many updates of the state precede it
    after_update: bool


@dataclass(eq=False)
class ReadTerm:
    coef: Coef
    read: Read


@dataclass(eq=False)
class ReadValue:
    name: str
    kind: str  # output or let
    node: object  # the statement
    linear: bool = False
    terms: list = field(default_factory=list)
    extra: object = None  # the per-token term added to the reads, or None
    reads: list = field(default_factory=list)
    chain: list = field(default_factory=list)
    problem: Optional[Problem] = None


@dataclass(eq=False)
class Analysis:
    rule: CheckedRule
    states: dict  # name -> StateAnalysis
    reads: list  # ReadValue, source order

    def read(self, name: str) -> ReadValue:
        return next(r for r in self.reads if r.name == name)


# ============================================================ expressions: helpers


def same_expr(a, b) -> bool:
    """Structural equality of two expressions (positions and annotations ignored)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, ast.Num):
        return a.value == b.value
    if isinstance(a, ast.Name):
        return a.id == b.id
    if isinstance(a, ast.Index):
        return a.target.id == b.target.id and a.index.id == b.index.id
    if isinstance(a, ast.Neg):
        return same_expr(a.operand, b.operand)
    if isinstance(a, ast.BinOp):
        return a.op == b.op and same_expr(a.left, b.left) and same_expr(a.right, b.right)
    if isinstance(a, ast.Call):
        return a.fn == b.fn and len(a.args) == len(b.args) and all(
            same_expr(x, y) for x, y in zip(a.args, b.args))
    return a is b


def _same_multiset(xs, ys) -> bool:
    rest = list(ys)
    for x in xs:
        hit = next((i for i, y in enumerate(rest) if same_expr(x, y)), None)
        if hit is None:
            return False
        rest.pop(hit)
    return not rest


def _cancel(sign, factors, divisors) -> Coef:
    """Drop each divisor that is also a factor: (exp(g) * beta) / exp(g) is beta."""
    factors, kept = list(factors), []
    for d in divisors:
        hit = next((i for i, f in enumerate(factors) if same_expr(f, d)), None)
        if hit is None:
            kept.append(d)
        else:
            factors.pop(hit)
    return Coef(sign, tuple(factors), tuple(kept))


def _num(value, at):
    return ast.Num(float(value), f"{value:g}", at, shape=())


def _binop(op, left, right, at, shape=()):
    return ast.BinOp(op, left, right, at, ast.expr_span(left), shape=shape)


def _product(items, at):
    value = items[0]
    for item in items[1:]:
        value = _binop("*", value, item, at)
    return value


def _scale(coef: Coef, e, at):
    """``coef * e`` as an expression of e's shape."""
    magnitude = Coef(1, coef.factors, coef.divisors)
    value = e if magnitude.is_one else _binop("*", magnitude.expr(at), e, at, shape=e.shape)
    return value if coef.sign == 1 else ast.Neg(value, at, shape=e.shape)


def peel(e):
    """Split a vector or matrix expression into (Coef, rest): ``beta * k`` -> (beta, k)."""
    if isinstance(e, ast.Neg):
        c, rest = peel(e.operand)
        return c.negate(), rest
    if isinstance(e, ast.BinOp) and e.op == "*" and e.shape != ():
        if e.left.shape == ():
            c, rest = peel(e.right)
            return Coef.of(e.left) * c, rest
        if e.right.shape == ():
            c, rest = peel(e.left)
            return c * Coef.of(e.right), rest
    if isinstance(e, ast.BinOp) and e.op == "/" and e.shape != () and e.right.shape == ():
        c, rest = peel(e.left)
        return c / Coef.of(e.right), rest
    return Coef(), e


walk = ast.walk  # exported for the chunk paths


def span(e) -> ast.Pos:
    return ast.expr_span(e)


def _and(names) -> str:
    names = sorted(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _states(states) -> str:
    """``state m`` or ``states m and n``."""
    return ("state " if len(states) == 1 else "states ") + _and(states)


# ============================================================ lets and the walk over the body


_BOUND = ("let", "output")  # names bound by a statement: a later one may use them


@dataclass(eq=False)
class _Let:
    stmt: ast.Let
    deps: frozenset  # the states it reads, through other lets too
    versions: dict  # state -> how many of its updates preceded this let
    loop: Optional[Loop]


class _NotAffine(Exception):
    def __init__(self, problem: Problem):
        self.problem = problem


# term cores of an update: what multiplies the coefficient
@dataclass(eq=False)
class _One:  # the scalar 1 (a scalar write)
    pass


@dataclass(eq=False)
class _Free:  # a state-free vector or matrix
    expr: object


@dataclass(eq=False)
class _Outer:  # outer(a, b), state-free
    left: object
    right: object


@dataclass(eq=False)
class _Lin:  # ops applied to the target state: left ops in application order, right ops
    left: tuple = ()  # ("rows", x) | ("entries", M) | ("rank_one", a, k): a (kᵀ S)
    right: tuple = ()  # ("cols", y) | ("rank_one", b, x): (S x) bᵀ


@dataclass(eq=False)
class _ReadVec:  # vector @ S ("left"), S @ vector ("right"), dot(vector, n) ("dot")
    vector: object
    side: str


@dataclass(eq=False)
class _Term:
    coef: Coef
    core: object
    node: object


class _Context:
    """Where a statement stands: the lets in scope, how many updates each state has had,
    the enclosing loop and the states its body updates."""

    def __init__(self, lets, versions, loop, loop_updates, last_update):
        self.lets = lets
        self.versions = versions
        self.loop = loop
        self.loop_updates = loop_updates  # states updated inside the enclosing loops
        self.last_update = last_update  # state -> the latest Update statement


def deps(e, lets) -> frozenset:
    """The states an expression reads, directly or through lets."""
    found = set()
    for node in walk(e):
        if isinstance(node, ast.Name):
            if node.kind == "state":
                found.add(node.id)
            elif node.kind in _BOUND and node.id in lets:
                found |= lets[node.id].deps
    return frozenset(found)


def _check_fresh(name: str, info: _Let, ctx: _Context, pos):
    """A let holding a state read may only be used before that state is updated again."""
    for state in sorted(info.deps):
        if info.versions.get(state, 0) != ctx.versions.get(state, 0):
            where = f"its update on line {ctx.last_update[state].pos.line}"
        elif ctx.loop is not None and info.loop is not ctx.loop and state in ctx.loop_updates:
            # defined outside the loop: the loop's later steps would read it stale
            where = f"the updates in the for block on line {ctx.loop.node.pos.line}"
        else:
            continue
        raise _NotAffine(Problem(
            "stale", f"'{name}' holds the value of state {state} from before {where}", pos,
            states=(state,)))


# ============================================================ updates -> terms


class _UpdateAnalyser:
    """Expands one update of ``target`` into terms; raises _NotAffine with the first term it
    cannot place."""

    def __init__(self, target: Var, ctx: _Context):
        self.target = target
        self.ctx = ctx

    def deps(self, e):
        return deps(e, self.ctx.lets)

    def fail(self, kind, message, node, states=(), pos=None):
        raise _NotAffine(Problem(kind, message, pos or span(node), node, tuple(sorted(states))))

    def unrecognised(self, node, what=""):
        text = what or unparse(node)
        self.fail("unrecognised", f"{text} is not a recognised factor of the update of "
                                  f"{self.target.name}", node, {self.target.name})

    # ---------------------------------------------------------------- state-free values

    def free(self, e, sign=1):
        """Terms of a state-free expression: sums and scalar products are split so each write is
        one outer product; a free scalar stays whole as a coefficient."""
        if e.shape == ():
            c = Coef.of(e)
            return [_Term(c if sign == 1 else c.negate(), _One(), e)]
        if isinstance(e, ast.BinOp) and e.op in "+-":
            return self.free(e.left, sign) + self.free(e.right, sign if e.op == "+" else -sign)
        coef, rest = peel(e)
        if sign == -1:
            coef = coef.negate()
        if rest is not e:
            return [_Term(coef * t.coef, t.core, e) for t in self.free(rest)]
        if isinstance(e, ast.Call) and e.fn == "outer":
            ca, a = peel(e.args[0])
            cb, b = peel(e.args[1])
            return [_Term(coef * ca * cb, _Outer(a, b), e)]
        return [_Term(coef, _Free(e), e)]

    # ---------------------------------------------------------------- the expansion

    def terms(self, e):
        found = self.deps(e)
        if not found:
            return self.free(e)
        if isinstance(e, ast.Name):
            if e.kind == "state":
                if e.id != self.target.name:
                    self.fail("cross", f"the update of {self.target.name} reads state {e.id}",
                              e, {e.id})
                return [_Term(Coef(), _Lin(), e)]
            info = self.ctx.lets[e.id]
            _check_fresh(e.id, info, self.ctx, e.pos)
            return self.terms(info.stmt.value)
        if isinstance(e, ast.Neg):
            return [_Term(t.coef.negate(), t.core, t.node) for t in self.terms(e.operand)]
        if isinstance(e, ast.BinOp):
            if e.op in "+-":
                left = self.terms(e.left)  # left first: the first offending term is reported
                right = self.terms(e.right)
                if e.op == "-":
                    right = [_Term(t.coef.negate(), t.core, t.node) for t in right]
                return left + right
            if e.op == "*":
                return self.product(e)
            if e.op == "/":
                if self.deps(e.right):
                    self.fail("nonlinear", f"division by {unparse(e.right)}, which depends on "
                                           f"{_states(self.deps(e.right))}",
                              e.right, self.deps(e.right))
                d = Coef.of(e.right) if e.right.shape == () else None
                if d is None:
                    self.unrecognised(e)
                return [_Term(t.coef / d, t.core, e) for t in self.terms(e.left)]
            if e.op == "**":
                self.fail("nonlinear", f"a power of {_states(found)}", e, found)
            if e.op == "@":
                return self.matmul(e)
        if isinstance(e, ast.Call):
            if e.fn == "outer":
                return self.outer(e)
            if e.fn == "dot":
                return self.dot(e)
            self.fail("nonlinear", f"{_states(found)} inside {e.fn}()", e, found)
        raise AssertionError(e)

    def affine_in_states(self, e) -> bool:
        """Whether a value depending on states is affine in them (a read, not a gate)."""
        for node in walk(e):
            if isinstance(node, ast.Name) and node.kind in _BOUND and self.deps(node):
                if not self.affine_in_states(self.ctx.lets[node.id].stmt.value):
                    return False
            elif isinstance(node, ast.Call) and self.deps(node):
                if node.fn not in ("dot", "outer", "sum"):
                    return False
                if sum(1 for a in node.args if self.deps(a)) > 1:
                    return False
            elif isinstance(node, ast.BinOp) and self.deps(node):
                if node.op == "**" or (node.op == "/" and self.deps(node.right)):
                    return False
                if node.op in "*@" and self.deps(node.left) and self.deps(node.right):
                    return False
        return True

    def both_depend(self, e, a, b):
        """``a * b`` or ``a @ b`` with states on both sides: a gate or a product of states."""
        da, db = self.deps(a), self.deps(b)
        for gate, other in ((a, b), (b, a)):
            if gate.shape == () and not self.affine_in_states(gate):
                dg = self.deps(gate)
                self.fail("gate", f"the gate {unparse(gate)} depends on {_states(dg)}",
                          gate, dg)
        self.fail("product", f"a product of two states ({_and(da)} and {_and(db)})", e, da | db)

    def state_scaled_write(self, e, scale, write):
        ds = self.deps(scale)
        kind = "gate" if scale.shape == () and not self.affine_in_states(scale) else "write"
        self.fail(kind, f"the write {unparse(e)} depends on {_states(ds)}", e, ds)

    def product(self, e):
        a, b = e.left, e.right
        da, db = self.deps(a), self.deps(b)
        if da and db:
            self.both_depend(e, a, b)
        dep_side, free_side = (a, b) if da else (b, a)
        if dep_side.shape == () and free_side.shape != ():
            # a value depending on states scales a free vector: a write unless it is the
            # rank-one term a * dot(k, n) of a vector state
            if not (self.target.rank == 1 and self.affine_in_states(dep_side)
                    and self.deps(dep_side) == {self.target.name}):
                self.state_scaled_write(e, dep_side, free_side)
        # the free side scales the state whole ((1 - z) * h is one decay 1 - z); a write it
        # multiplies is split into terms, one outer product each
        whole_coef, whole = peel(free_side)
        whole_core = _One() if whole.shape == () else _Free(whole)
        if whole.shape == ():
            whole_coef = whole_coef * Coef.of(whole)
        out = []
        for td in self.terms(dep_side):
            if isinstance(td.core, (_Lin, _ReadVec)):
                out.append(_Term(whole_coef * td.coef, self.combine(e, whole_core, td.core), e))
                continue
            for tf in self.free(free_side):
                out.append(_Term(tf.coef * td.coef, self.combine(e, tf.core, td.core), e))
        return out

    def combine(self, e, free_core, core):
        """The core of (free value) * (core): elementwise."""
        if isinstance(free_core, _One):
            return core
        x = free_core.expr
        if isinstance(core, _Lin) and len(x.shape) == self.target.rank:
            # an elementwise decay: rows of a vector state, entries of a matrix one
            kind = "rows" if self.target.rank == 1 else "entries"
            return _Lin(core.left + ((kind, x),), core.right)
        if isinstance(core, _ReadVec) and core.side == "dot" and len(x.shape) == 1:
            return _Lin((("rank_one", x, core.vector),), ())
        if isinstance(core, _Free) and core.expr.shape == x.shape:
            return _Free(_binop("*", x, core.expr, span(e), x.shape))
        if isinstance(core, _Outer) and len(x.shape) == 2:
            return _Free(_binop("*", x, _core_expr(core, span(e)), span(e), x.shape))
        self.unrecognised(e)

    def matmul(self, e):
        a, b = e.left, e.right
        if _is_diag(a) or _is_diag(b):
            diag, other = (a, b) if _is_diag(a) else (b, a)
            x = diag.args[0]
            dx = self.deps(x)
            if dx:
                self.fail("gate", f"the gate {unparse(diag)} depends on {_states(dx)}", diag, dx)
            side = "rows" if diag is a else "cols"
            return [_Term(t.coef, self.apply_diag(e, side, x, t.core), e) for t in self.terms(other)]
        da, db = self.deps(a), self.deps(b)
        if da and db:
            self.both_depend(e, a, b)
        vec_side, dep_side = (a, b) if db else (b, a)
        if len(vec_side.shape) != 1:
            self.unrecognised(e)
        out = []
        for t in self.terms(dep_side):
            core = t.core
            if isinstance(core, _Lin) and not core.left and not core.right:
                side = "dot" if self.target.rank == 1 else ("left" if dep_side is b else "right")
                out.append(_Term(t.coef, _ReadVec(vec_side, side), e))
            elif isinstance(core, (_Free, _Outer)):
                value = _binop("@", vec_side, _core_expr(core, e.pos), e.pos, e.shape) \
                    if dep_side is b else _binop("@", _core_expr(core, e.pos), vec_side, e.pos, e.shape)
                if e.shape:
                    out.append(_Term(t.coef, _Free(value), e))
                else:
                    out.append(_Term(t.coef * Coef.of(value), _One(), e))
            else:
                self.unrecognised(e)
        return out

    def apply_diag(self, e, side, x, core):
        if isinstance(core, _Lin) and self.target.rank >= 1:
            if side == "rows":
                return _Lin(core.left + (("rows", x),), core.right)
            return _Lin(core.left, core.right + (("cols", x),))
        if isinstance(core, _Outer):
            if side == "rows":
                return _Outer(_binop("*", x, core.left, e.pos, core.left.shape), core.right)
            return _Outer(core.left, _binop("*", core.right, x, e.pos, core.right.shape))
        if isinstance(core, _Free):
            d = ast.Call("diag", [x], e.pos)
            return _Free(_binop("@", d, core.expr, e.pos, core.expr.shape) if side == "rows"
                         else _binop("@", core.expr, d, e.pos, core.expr.shape))
        self.unrecognised(e)

    def outer(self, e):
        a, b = e.args
        da, db = self.deps(a), self.deps(b)
        if da and db:
            self.both_depend(e, a, b)
        if (da | db) - {self.target.name} or not self.affine_in_states(e):
            d = da | db
            self.fail("write", f"the write {unparse(e)} depends on {_states(d)}", e, d)
        if da:  # outer(S @ x, b): a rank-one factor on the right of S
            cb, b_vec = peel(b)
            out = []
            for t in self.terms(a):
                if isinstance(t.core, _ReadVec) and t.core.side == "right":
                    out.append(_Term(cb * t.coef, _Lin((), (("rank_one", b_vec, t.core.vector),)), e))
                elif isinstance(t.core, _Free):
                    ca, a_vec = peel(t.core.expr)
                    out.append(_Term(ca * t.coef * cb, _Outer(a_vec, b_vec), e))
                else:
                    self.unrecognised(e)
            return out
        ca, a_vec = peel(a)
        out = []
        for t in self.terms(b):
            if isinstance(t.core, _ReadVec) and t.core.side == "left":
                out.append(_Term(ca * t.coef, _Lin((("rank_one", a_vec, t.core.vector),), ()), e))
            elif isinstance(t.core, _Free):
                cb, b_vec = peel(t.core.expr)
                out.append(_Term(ca * t.coef * cb, _Outer(a_vec, b_vec), e))
            else:
                self.unrecognised(e)
        return out

    def dot(self, e):
        a, b = e.args
        da, db = self.deps(a), self.deps(b)
        if da and db:
            self.both_depend(e, a, b)
        vec, dep = (a, b) if db else (b, a)
        out = []
        for t in self.terms(dep):
            if isinstance(t.core, _Lin) and not t.core.left and not t.core.right:
                out.append(_Term(t.coef, _ReadVec(vec, "dot"), e))
            else:
                self.unrecognised(e)
        return out


def _is_diag(e) -> bool:
    return isinstance(e, ast.Call) and e.fn == "diag"


def _core_expr(core, at):
    if isinstance(core, _Free):
        return core.expr
    return ast.Call("outer", [core.left, core.right], at,
                    shape=(core.left.shape[0], core.right.shape[0]))


# ============================================================ terms -> one step


def _sum_coefs(coefs, at) -> Coef:
    if len(coefs) == 1:
        return coefs[0]
    value = coefs[0].expr(at)
    for c in coefs[1:]:
        if c.sign == -1:
            value = _binop("-", value, c.negate().expr(at), at)
        else:
            value = _binop("+", value, c.expr(at), at)
    return Coef(1, (value,), ())


def _step(stmt: ast.Update, var: Var, terms, loop) -> Step:
    linear = [t for t in terms if isinstance(t.core, _Lin)]
    writes = []
    for t in terms:
        core = t.core
        if isinstance(core, _Lin):
            continue
        if isinstance(core, _Outer):
            writes.append(Write("outer", t.node, t.coef, core.left, core.right, loop=loop))
        elif isinstance(core, _One):
            writes.append(Write("scalar", t.node, t.coef, loop=loop))
        elif isinstance(core, _Free) and var.rank == 1:
            writes.append(Write("vector", t.node, t.coef, core.expr, loop=loop))
        elif isinstance(core, _Free):
            writes.append(Write("other", t.node, t.coef, value=core.expr, loop=loop))
        else:  # a bare read such as k @ S in the value of S
            raise _NotAffine(Problem("unrecognised", f"{unparse(t.node)} is not a recognised "
                                     f"term of the update of {var.name}", span(t.node), t.node,
                                     (var.name,)))
    at = span(stmt.value)

    def fail(node, message):
        raise _NotAffine(Problem("unrecognised", message, span(node), node, (var.name,)))

    if not linear:  # S' = W: the old value is dropped
        zero = _num(0, at)
        return Step(stmt, [Factor("scalar", stmt.value, zero, Coef(1, (zero,)), loop=loop)],
                    writes, loop)
    # diag(x) @ (S - b outer(k, k @ S)): take out the row and column decays all terms share
    shared_left, shared_right = _shared_ops([t.core.left for t in linear], from_end=True), \
        _shared_ops([t.core.right for t in linear], from_end=False)
    if shared_left or shared_right:
        nl, nr = len(shared_left), len(shared_right)
        inner = [_Term(t.coef, _Lin(t.core.left[:len(t.core.left) - nl], t.core.right[nr:]), t.node)
                 for t in linear]
        step = _step(stmt, var, inner, loop)  # the same writes, recomputed: they are unchanged
        step.writes = writes
        node = linear[0].node
        step.factors = [f for f in step.factors if f.kind != "identity"] + \
            [Factor("cols", node, op[1], loop=loop) for op in shared_right] + \
            [Factor("rows", node, op[1], loop=loop) for op in shared_left]
        return step
    elementwise = [t for t in linear if _elementwise_ops(t.core)]
    ranks = [t for t in linear if len(t.core.left) + len(t.core.right) == 1
             and (t.core.left or t.core.right)[0][0] == "rank_one"]
    others = [t for t in linear if t not in elementwise and t not in ranks]
    if others:
        t = others[0]
        if len(linear) > 1:
            fail(t.node, f"{unparse(t.node)} is added to other terms in {var.name}: a sum of "
                         f"terms in {var.name} is affine only as elementwise decays plus at most "
                         f"one rank-one term")
        fail(t.node, f"{unparse(t.node)} is not a recognised factor of the update of "
                     f"{var.name}: a rank-one term needs {var.name} itself beside it")
    if len(ranks) > 1:
        fail(ranks[1].node, f"two rank-one terms in one update of {var.name} "
                            f"({unparse(ranks[0].node)} and {unparse(ranks[1].node)}): "
                            f"write them as two statements")
    diag = _elementwise_factor(stmt, var, elementwise, loop) if elementwise else None
    if not ranks:
        return Step(stmt, diag, writes, loop)
    if diag is None:
        fail(ranks[0].node, f"{unparse(ranks[0].node)} without {var.name} itself is not a "
                            f"recognised factor: did you mean {var.name} - ...?")
    t = ranks[0]
    right = bool(t.core.right)
    _, vec, key = (t.core.right if right else t.core.left)[0]
    side = "right" if right else "left"
    if len(diag) == 1 and diag[0].kind == "identity":
        return Step(stmt, [Factor("rank_one", t.node, coef=t.coef.negate(), vec=vec, key=key,
                                  loop=loop, side=side)], writes, loop)
    if len(diag) == 1 and diag[0].kind == "scalar":
        # alpha S - c b kᵀ S is alpha (I - (c / alpha) b kᵀ) S when c / alpha cancels to a
        # product (exp(g) * beta / exp(g)); otherwise the sum stays whole, with no division
        alpha = diag[0].coef
        ratio = t.coef / alpha
        if not ratio.divisors:
            return Step(stmt, [diag[0], Factor("rank_one", t.node, coef=ratio.negate(), vec=vec,
                                               key=key, loop=loop, side=side)], writes, loop)
    part = diag[0] if len(diag) == 1 else _merged(stmt, var, diag, loop)
    return Step(stmt, [Factor("rank_one", t.node, coef=t.coef.negate(), vec=vec, key=key,
                              loop=loop, side=side, diag=part)], writes, loop)


def _elementwise_ops(core) -> bool:
    return all(op[0] in ("rows", "entries") for op in core.left) and all(
        op[0] == "cols" for op in core.right)


def _ops(core) -> tuple:
    return tuple((op[0], op[1]) for op in core.left + core.right)


def _elementwise_factor(stmt, var, terms, loop) -> list:
    """The factors of a sum of elementwise terms ``sum(coef * ops(S))``: one term gives one
    factor per op (a product), several are merged into one decay (a sum)."""
    at = span(stmt.value)
    if len(terms) == 1:
        t = terms[0]
        factors = [Factor(kind, t.node, x, loop=loop) for kind, x in _ops(t.core)]
        if not t.coef.is_one:
            factors.append(Factor("scalar", t.node, t.coef.expr(), t.coef, loop=loop))
        return factors or [Factor("identity", t.node, loop=loop)]
    if all(not _ops(t.core) for t in terms):
        alpha = _sum_coefs([t.coef for t in terms], at)
        if alpha.is_one:
            return [Factor("identity", terms[0].node, loop=loop)]
        return [Factor("scalar", stmt.value, alpha.expr(), alpha, loop=loop)]
    parts = tuple((t.coef, _ops(t.core)) for t in terms)
    kinds = {op[0] for _, ops in parts for op in ops}
    if var.rank == 1:
        kinds = {"rows"}
    kind = next(iter(kinds)) if len(kinds) == 1 and kinds != {"entries"} else "entries"
    decay = _parts_expr(parts, kind, var, at)
    return [Factor(kind, stmt.value, decay, loop=loop, sum_parts=parts)]


def _merged(stmt, var, factors, loop) -> Factor:
    """A product of elementwise factors as one (the D of a rank-one factor D - b kᵀ)."""
    ops = []
    coef = Coef()
    for f in factors:
        if f.kind == "scalar":
            coef = coef * f.coef
        else:
            ops.append((f.kind, f.decay))
    kinds = {k for k, _ in ops}
    kind = next(iter(kinds)) if len(kinds) == 1 and kinds != {"entries"} else "entries"
    parts = ((coef, tuple(ops)),)
    at = span(stmt.value)
    return Factor(kind, stmt.value, _parts_expr(parts, kind, var, at), loop=loop,
                  sum_parts=parts)


def _parts_expr(parts, kind, var, at):
    """The decay of ``parts`` as one expression of the language (a vector for rows or cols, a
    matrix for entries), or None where the language has no way to write it (a row decay
    summed with a column decay)."""
    shape = {"rows": var.dims[:1], "cols": var.dims[-1:], "entries": var.dims}[kind]
    total = None
    for coef, ops in parts:
        value = None
        for op_kind, x in ops:
            if kind == "entries" and op_kind != "entries":
                return None
            value = x if value is None else _binop("*", value, x, at, shape)
        negative = coef.sign == -1 and total is not None  # written as a difference
        magnitude = coef.negate() if negative else coef
        value = magnitude.expr(at) if value is None else _scale(magnitude, value, at)
        total = value if total is None else _binop("-" if negative else "+", total, value, at,
                                                   shape)
    return total


def _shared_ops(op_lists, from_end):
    """The diagonal ops every list has in common, at its end (applied last) or its start."""
    if len(op_lists) < 2:
        return ()
    shared = []
    for i in range(min(len(ops) for ops in op_lists)):
        ops = [o[len(o) - 1 - i] if from_end else o[i] for o in op_lists]
        if all(op[0] in ("rows", "cols") and op[0] == ops[0][0] and same_expr(op[1], ops[0][1])
               for op in ops):
            shared.append(ops[0])
        else:
            break
    return tuple(shared[::-1]) if from_end else tuple(shared)


def _mark_householder(steps):
    """A rank-one factor is Householder-like when it erases along its own vector and a later
    write of the same step (before the next erase, same loop) writes along that key."""
    latest = {}  # loop (or None) -> the latest rank-one factor
    for step in steps:
        for f in step.factors:
            if f.kind == "rank_one":
                latest[id(step.loop)] = f
        for w in step.writes:
            f = latest.get(id(step.loop))
            if f is not None and w.kind == "outer" and same_expr(w.left, f.key) \
                    and same_expr(f.vec, f.key):
                f.householder = True


# ============================================================ reads


class _ReadAnalyser:
    """Outputs and the lets they read through: linear reads of states, possibly chained."""

    def __init__(self, rule: CheckedRule, final_versions: dict, values: dict):
        self.rule = rule
        self.final = final_versions
        self.values = values  # name -> ReadValue, filled as lets are met

    def value(self, name, kind, stmt, lets, versions) -> ReadValue:
        if name in self.values:
            return self.values[name]
        rv = ReadValue(name, kind, stmt)
        self.values[name] = rv
        try:
            terms, extras = self.linear(stmt.value, lets, versions, rv)
            rv.linear, rv.terms = True, terms
            rv.extra = _sum_exprs(extras, span(stmt.value))
        except _NotAffine as e:
            rv.problem = e.problem
        if rv.problem is not None and kind == "let":
            # a chained let need not be linear: any per-token function of linear reads
            rv.problem = None
            rv.reads, rv.chain = [], []
            try:
                self.function_of_reads(stmt.value, lets, versions, rv)
            except _NotAffine as e:
                rv.problem = e.problem
        elif rv.problem is not None:
            # still collect what it reads, for display
            rv.reads, rv.chain = [], []
            try:
                self.function_of_reads(stmt.value, lets, versions, rv)
            except _NotAffine:
                pass
        return rv

    def read(self, state, vector, side, node, versions, lets, rv):
        dv = deps(vector, lets)
        if dv:
            # the vector itself comes from reads: Raven's p in p @ Sv
            for n in walk(vector):
                if isinstance(n, ast.Name) and n.kind in _BOUND and deps(n, lets):
                    info = lets[n.id]
                    chained = self.value(n.id, "let", info.stmt, lets, info.versions)
                    if chained.problem is not None:
                        raise _NotAffine(chained.problem)
                    if n.id not in rv.chain:
                        rv.chain.append(n.id)
                elif isinstance(n, ast.Name) and n.kind == "state":
                    raise _NotAffine(Problem(
                        "read", f"{unparse(node)} reads state {state} along a vector that "
                                f"holds state {n.id} itself", span(node), node, (n.id, state)))
        version = versions.get(state, 0)
        r = Read(state, vector, side, node, version, version == self.final.get(state, 0))
        rv.reads.append(r)
        return r

    def linear(self, e, lets, versions, rv):
        """(terms, extras) of ``e = sum(coef * read) + sum(extras)``."""
        if not deps(e, lets):
            return [], [e]
        problem = lambda msg, node: _NotAffine(Problem(
            "read", msg, span(node), node, tuple(sorted(deps(node, lets)))))
        if isinstance(e, ast.Neg):
            terms, extras = self.linear(e.operand, lets, versions, rv)
            return ([ReadTerm(t.coef.negate(), t.read) for t in terms],
                    [ast.Neg(x, x.pos if not isinstance(x, ast.BinOp) else x.start, shape=x.shape)
                     for x in extras])
        if isinstance(e, ast.BinOp) and e.op in "+-":
            lt, lx = self.linear(e.left, lets, versions, rv)
            rt, rx = self.linear(e.right, lets, versions, rv)
            if e.op == "-":
                rt = [ReadTerm(t.coef.negate(), t.read) for t in rt]
                rx = [ast.Neg(x, span(x), shape=x.shape) for x in rx]
            return lt + rt, lx + rx
        if isinstance(e, ast.BinOp) and e.op in "*/":
            free_scalar = lambda x: not deps(x, lets) and x.shape == ()
            if e.op == "/" and deps(e.right, lets):
                raise problem(f"{rv.name} is divided by {unparse(e.right)}, which depends on "
                              f"{_states(deps(e.right, lets))}", e.right)
            if e.op == "/" and free_scalar(e.right):
                scale, inner = e.right, e.left
            elif e.op == "*" and free_scalar(e.left):
                scale, inner = e.left, e.right
            elif e.op == "*" and free_scalar(e.right):
                scale, inner = e.right, e.left
            elif e.op == "*" and deps(e.left, lets) and deps(e.right, lets):
                raise problem(f"{unparse(e)} multiplies two values that depend on states", e)
            else:
                raise problem(f"{unparse(e)} is not a read x @ S or S @ x scaled by a per-token "
                              f"scalar", e)
            c = Coef.of(scale)
            terms, extras = self.linear(inner, lets, versions, rv)
            c = c if e.op == "*" else Coef() / c
            return ([ReadTerm(c * t.coef, t.read) for t in terms],
                    [_scale(c, x, span(x)) for x in extras])
        if isinstance(e, ast.BinOp) and e.op == "@":
            for state_side, vec_side, side in ((e.right, e.left, "left"), (e.left, e.right, "right")):
                if _is_state(state_side) and not (_is_state(vec_side)):
                    rank = self.rule.var(state_side.id).rank
                    side = "dot" if rank == 1 else side
                    return [ReadTerm(Coef(), self.read(state_side.id, vec_side, side, e, versions,
                                                       lets, rv))], []
            raise problem(f"{unparse(e)} is not a read x @ S or S @ x of a state", e)
        if isinstance(e, ast.Call) and e.fn == "dot":
            a, b = e.args
            for state_side, vec_side in ((a, b), (b, a)):
                if _is_state(state_side) and not _is_state(vec_side):
                    return [ReadTerm(Coef(), self.read(state_side.id, vec_side, "dot", e, versions,
                                                       lets, rv))], []
        if isinstance(e, ast.Name) and e.kind in _BOUND:
            info = lets[e.id]
            inner = ReadValue(e.id, "let", info.stmt)
            try:
                terms, extras = self.linear(info.stmt.value, lets, info.versions, inner)
            except _NotAffine:
                raise problem(f"{rv.name} uses {e.id}, which is not a linear read of a state", e)
            rv.reads.extend(inner.reads)
            rv.chain.extend(c for c in inner.chain if c not in rv.chain)
            return terms, extras
        if isinstance(e, ast.Name) and e.kind == "state":
            raise problem(f"{rv.name} uses state {e.id} directly, not through a read "
                          f"x @ {e.id}", e)
        raise problem(f"{unparse(e)} is not a linear read of a state", e)

    def function_of_reads(self, e, lets, versions, rv):
        """Collect the reads of ``e``; every state must be read through a linear read."""
        if not deps(e, lets):
            return
        if isinstance(e, ast.BinOp) and e.op == "@":
            for state_side, vec_side, side in ((e.right, e.left, "left"), (e.left, e.right, "right")):
                if _is_state(state_side) and not _is_state(vec_side):
                    rank = self.rule.var(state_side.id).rank
                    self.read(state_side.id, vec_side, "dot" if rank == 1 else side, e, versions,
                              lets, rv)
                    return
        if isinstance(e, ast.Call) and e.fn == "dot":
            a, b = e.args
            for state_side, vec_side in ((a, b), (b, a)):
                if _is_state(state_side) and not _is_state(vec_side):
                    self.read(state_side.id, vec_side, "dot", e, versions, lets, rv)
                    return
        if isinstance(e, ast.Name) and e.kind == "state":
            raise _NotAffine(Problem("read", f"state {e.id} is used directly, not through a "
                                             f"read x @ {e.id}", e.pos, e, (e.id,)))
        if isinstance(e, ast.Name) and e.kind in _BOUND:
            info = lets[e.id]
            chained = self.value(e.id, "let", info.stmt, lets, info.versions)
            if chained.problem is not None:
                raise _NotAffine(chained.problem)
            if e.id not in rv.chain:
                rv.chain.append(e.id)
            return
        children = ([e.left, e.right] if isinstance(e, ast.BinOp) else [e.operand]
                    if isinstance(e, ast.Neg) else list(e.args) if isinstance(e, ast.Call) else [])
        for c in children:
            self.function_of_reads(c, lets, versions, rv)


def _is_state(e) -> bool:
    return isinstance(e, ast.Name) and e.kind == "state"


def _sum_exprs(items, at):
    if not items:
        return None
    value = items[0]
    for item in items[1:]:
        if isinstance(item, ast.Neg):
            value = _binop("-", value, item.operand, at, value.shape)
        else:
            value = _binop("+", value, item, at, value.shape)
    return value


# ============================================================ the whole rule


def analyse(rule: CheckedRule) -> Analysis:
    """The affine structure of every state's update and the reads of every output."""
    states = {v.name: StateAnalysis(v, True) for v in rule.states}
    versions = {v.name: 0 for v in rule.states}
    last_update = {}
    pending_reads = []  # (stmt, lets, versions) of outputs

    def run(body, lets, loop, loop_updates):
        for stmt in body:
            ctx = _Context(lets, versions, loop, loop_updates, last_update)
            if isinstance(stmt, ast.Let):
                lets[stmt.name] = _Let(stmt, deps(stmt.value, lets), dict(versions), loop)
            elif isinstance(stmt, ast.Update):
                sa = states[stmt.state]
                if sa.affine:
                    try:
                        terms = _UpdateAnalyser(sa.var, ctx).terms(stmt.value)
                        sa.steps.append(_step(stmt, sa.var, terms, loop))
                    except _NotAffine as e:
                        sa.affine, sa.steps, sa.problem = False, [], e.problem
                versions[stmt.state] += 1
                last_update[stmt.state] = stmt
            elif isinstance(stmt, ast.Output):
                pending_reads.append((stmt, dict(lets), dict(versions)))
                lets[stmt.name] = _Let(stmt, deps(stmt.value, lets), dict(versions), loop)
            elif isinstance(stmt, ast.For):
                inner = Loop(stmt.var, stmt.dim, stmt, loop)
                updated = loop_updates | {s.state for _, s in _statements(stmt.body)
                                          if isinstance(s, ast.Update)}
                run(stmt.body, dict(lets), inner, updated)

    run(rule.body, {}, None, frozenset())
    for sa in states.values():
        if sa.affine:
            _mark_householder(sa.steps)

    values = {}
    analyser = _ReadAnalyser(rule, versions, values)
    outputs = []
    for stmt, lets, snapshot in pending_reads:
        outputs.append(analyser.value(stmt.name, "output", stmt, lets, snapshot))
    # source order: chained lets come before the outputs that read them
    order = {id(s): i for i, (_, s) in enumerate(_statements(rule.body))}
    reads = sorted(values.values(), key=lambda rv: order[id(rv.node)])
    return Analysis(rule, states, reads)


def _statements(body, depth=0):
    for stmt in body:
        yield depth, stmt
        if isinstance(stmt, ast.For):
            yield from _statements(stmt.body, depth + 1)
