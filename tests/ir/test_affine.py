"""The state-affine analysis: factors, writes and reads of the canonical rules and of rules
written here, and the position and reason of every term it cannot place."""
from pathlib import Path

import pytest

from recdsl.grammar.parser import parse
from recdsl.ir.affine import Coef, analyse, same_expr
from recdsl.ir.checker import check
from recdsl.ir.pretty import unparse

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(name):
    path = EXAMPLES / f"{name}.rec"
    return analyse(check(parse(path.read_text(), path.name)))


def rule(text, name="test.rec"):
    return analyse(check(parse(text, name)))


def kinds(sa):
    return [f.kind for f in sa.factors]


def text(e):
    return None if e is None else unparse(e)


# ------------------------------------------------------------------ canonical rules


def test_gated_delta_is_a_decay_then_a_householder_erase_then_a_write():
    S = example("gated_delta").states["S"]
    assert S.affine and S.problem is None
    assert [st.node.pos.line for st in S.steps] == [10, 11, 12]
    assert [[f.kind for f in st.factors] for st in S.steps] == [["scalar"], ["rank_one"], ["identity"]]
    decay, erase = S.factors
    assert text(decay.decay) == "exp(g)" and decay.loop is None
    assert (text(erase.vec), text(erase.key), erase.coef.text()) == ("kn", "kn", "beta")
    assert erase.householder
    assert (erase.node.start.line, erase.node.start.column) == (11, 9)  # beta * outer(kn, kn @ S)
    [w] = S.writes
    assert (w.kind, w.coef.text(), text(w.left), text(w.right)) == ("outer", "beta", "kn", "v")


def test_delta_in_one_statement_gives_the_same_factor():
    S = example("delta").states["S"]
    [step] = S.steps
    [erase] = step.factors
    assert erase.kind == "rank_one" and erase.householder and erase.coef.text() == "beta"
    [w] = step.writes
    assert (w.coef.text(), text(w.left), text(w.right)) == ("beta", "kn", "v")


def test_kla_keeps_its_step_as_the_coefficient():
    S = example("kla").states["S"]
    assert kinds(S) == ["scalar", "rank_one"]
    erase = S.factors[1]
    assert erase.householder and erase.coef.text() == "beta" and text(erase.key) == "k"


def test_deltaproduct_repeats_a_householder_factor_per_step_of_the_loop():
    S = example("deltaproduct").states["S"]
    decay, erase = S.factors
    assert decay.kind == "scalar" and decay.loop is None and text(decay.decay) == "exp(g)"
    assert erase.kind == "rank_one" and erase.householder
    assert (erase.loop.var, erase.loop.dim) == ("j", "NH")
    assert (text(erase.key), erase.coef.text()) == ("kj", "beta[j]")
    [w] = S.writes
    assert w.loop is erase.loop
    assert (w.coef.text(), text(w.left), text(w.right)) == ("beta[j]", "kj", "v[j]")


def test_gla_decays_rows():
    S = example("gla").states["S"]
    [f] = S.factors
    assert f.kind == "rows" and text(f.decay) == "exp(gk)"
    [w] = S.writes
    assert w.coef.is_one and (text(w.left), text(w.right)) == ("k", "v")


def test_retention_and_mamba2_decay_by_a_scalar():
    [f] = example("retention").states["S"].factors
    assert (f.kind, text(f.decay)) == ("scalar", "gamma")
    S = example("mamba2").states["S"]
    [f] = S.factors
    assert (f.kind, text(f.decay)) == ("scalar", "exp(-exp(A_log) * dt)")
    [w] = S.writes
    assert (w.coef.text(), text(w.left), text(w.right)) == ("dt", "B", "x")


def test_linear_attention_has_only_identity():
    S = example("linear_attention").states["S"]
    assert S.factors == [] and [f.kind for f in S.steps[0].factors] == ["identity"]
    assert len(S.writes) == 1


def test_raven_slots_decay_by_rows_and_write_one_minus_lambda():
    a = example("raven")
    for name, value in (("Sk", "k"), ("Sv", "v")):
        sa = a.states[name]
        [f] = sa.factors
        assert f.kind == "rows" and text(f.decay) == "lam"
        [w] = sa.writes
        assert (text(w.left), text(w.right), w.coef.is_one) == ("1 - lam", value, True)


def test_mamba2_read_has_a_per_token_term():
    y = example("mamba2").read("y")
    assert y.kind == "output" and y.linear and y.problem is None
    [t] = y.terms
    assert t.coef.is_one
    assert (t.read.state, text(t.read.vector), t.read.side, t.read.after_update) == ("S", "C", "left", True)
    assert text(y.extra) == "D * x"


def test_gated_delta_read_is_scaled():
    o = example("gated_delta").read("o")
    [t] = o.terms
    assert t.coef.text() == "K ** -0.5"
    assert (t.read.state, text(t.read.vector), t.read.side) == ("S", "l2norm(q)", "left")
    assert o.extra is None and o.chain == []


def test_raven_reads_are_chained_through_the_softmax():
    a = example("raven")
    assert [r.name for r in a.reads] == ["p", "o"]
    p, o = a.reads
    assert p.kind == "let" and not p.linear and p.problem is None
    [r] = p.reads
    assert (r.state, text(r.vector), r.side, r.after_update) == ("Sk", "q", "right", True)
    assert o.linear and o.chain == ["p"]
    [t] = o.terms
    assert (t.read.state, text(t.read.vector), t.read.side) == ("Sv", "p", "left")


def test_mlstm_states_are_not_affine():
    a = example("mlstm")
    C, n, m = (a.states[s] for s in ("C", "n", "m"))
    assert not (C.affine or n.affine or m.affine)
    assert (m.problem.kind, m.problem.message) == ("nonlinear", "state m inside max()")
    assert (m.problem.line, m.problem.column) == (12, 10)
    assert (C.problem.kind, C.problem.message) == ("gate", "the gate fg depends on state m")
    assert (C.problem.line, C.problem.column) == (15, 5)
    assert C.problem.states == ("m",)
    h = a.read("h")
    assert not h.linear
    assert h.problem.message.startswith("h is divided by max(abs(dot(n, qs)), exp(-m)) + 1e-6")
    assert (h.problem.line, h.problem.column) == (20, 24)


# ------------------------------------------------------------------ rules written here

HEAD = "dims K, V\nstate S[K, V]\n"


def test_per_channel_gated_delta():
    a = rule("rule kda\n" + HEAD + "input q[K], k[K], v[V], gk[K], beta\nlet kn = l2norm(k)\n"
             "S = diag(exp(gk)) @ S\nS = S - beta * outer(kn, kn @ S)\nS = S + beta * outer(kn, v)\n"
             "output o = q @ S\n")
    S = a.states["S"]
    assert kinds(S) == ["rows", "rank_one"]
    assert text(S.factors[0].decay) == "exp(gk)" and S.factors[1].householder


def test_value_axis_decay():
    S = rule("rule vg\n" + HEAD + "input q[K], k[K], v[V], gv[V]\n"
             "S = S @ diag(exp(gv)) + outer(k, v)\noutput o = q @ S\n").states["S"]
    [f] = S.factors
    assert f.kind == "cols" and text(f.decay) == "exp(gv)"
    assert (f.node.start.line, f.node.start.column) == (5, 5)


def test_scalar_coefficients_cancel_when_the_decay_is_distributed():
    S = rule("rule d\n" + HEAD + "input q[K], k[K], v[V], g, beta\n"
             "S = exp(g) * (S - beta * outer(k, k @ S)) + exp(g) * beta * outer(k, v)\n"
             "output o = q @ S\n").states["S"]
    decay, erase = S.factors
    assert (decay.kind, text(decay.decay)) == ("scalar", "exp(g)")
    assert erase.coef.text() == "beta" and erase.householder
    [w] = S.writes
    assert w.coef.text() == "exp(g) * beta"


def test_a_row_decay_shared_by_every_term_is_taken_out():
    S = rule("rule d\n" + HEAD + "input q[K], k[K], v[V], gk[K], beta\n"
             "S = diag(exp(gk)) @ (S - beta * outer(k, k @ S) + beta * outer(k, v))\n"
             "output o = q @ S\n").states["S"]
    assert kinds(S) == ["rank_one", "rows"]  # the decay is applied after the erase
    assert text(S.factors[1].decay) == "exp(gk)" and S.factors[0].coef.text() == "beta"
    [w] = S.writes
    assert (w.coef.text(), text(w.left), text(w.right)) == ("beta", "exp(gk) * k", "v")


def test_a_let_holding_the_read_is_inlined():
    S = rule("rule d\n" + HEAD + "input q[K], k[K], v[V], beta\nlet u = k @ S\n"
             "S = S - beta * outer(k, u) + beta * outer(k, v)\noutput o = q @ S\n").states["S"]
    [erase] = S.factors
    assert erase.kind == "rank_one" and erase.householder


def test_a_different_write_key_is_not_householder():
    S = rule("rule w\n" + HEAD + "input q[K], k[K], w[K], v[V], beta\n"
             "S = S - beta * outer(k, k @ S) + beta * outer(w, v)\noutput o = q @ S\n").states["S"]
    assert S.affine
    [erase] = S.factors
    assert erase.kind == "rank_one" and not erase.householder
    assert text(S.writes[0].left) == "w"


def test_rank_one_with_a_minus_sign_written_as_plus():
    S = rule("rule r\n" + HEAD + "input q[K], k[K], a[K], v[V], c\n"
             "S = S + c * outer(a, k @ S)\noutput o = q @ S\n").states["S"]
    [f] = S.factors
    assert f.kind == "rank_one" and f.coef.sign == -1 and f.coef.factors[0].id == "c"
    assert (text(f.vec), text(f.key)) == ("a", "k")


@pytest.mark.parametrize("update, kind, message, column", [
    ("S = tanh(S) + outer(k, v)", "nonlinear", "state S inside tanh()", 5),
    ("S = S + dot(n, k) * S + outer(k, v)", "product", "a product of two states (n and S)", 9),
    ("S = S @ S + outer(k, v)", "product", "a product of two states (S and S)", 5),
    ("S = exp(sum(n)) * S + outer(k, v)", "gate", "the gate exp(sum(n)) depends on state n", 5),
    ("S = S + outer(n, v)", "write", "the write outer(n, v) depends on state n", 9),
    ("S = S + outer(k, v) / sum(n)", "nonlinear", "division by sum(n), which depends on state n", 23),
    ("S = G @ S + outer(k, v)", "unrecognised", "G @ S is not a recognised factor of the update of S", 5),
])
def test_terms_that_cannot_be_placed(update, kind, message, column):
    a = rule("rule bad\ndims K\nstate S[K, K], n[K]\ninput q[K], k[K], v[K], G[K, K]\n"
             f"n = n + k\n{update}\noutput o = q @ S\n")
    S = a.states["S"]
    assert not S.affine and S.steps == []
    assert (S.problem.kind, S.problem.message) == (kind, message)
    assert (S.problem.line, S.problem.column) == (6, column)


def test_a_gate_that_depends_on_the_state_itself():
    S = rule("rule sg\n" + HEAD + "input q[K], k[K], v[V]\nlet g = sigmoid(sum(k @ S))\n"
             "S = g * S + outer(k, v)\noutput o = q @ S\n").states["S"]
    assert (S.problem.kind, S.problem.message) == ("gate", "the gate g depends on state S")
    assert (S.problem.line, S.problem.column) == (6, 5)


def test_a_let_read_before_an_earlier_update_is_stale():
    S = rule("rule st\n" + HEAD + "input q[K], k[K], v[V], g, beta\nlet u = k @ S\nS = exp(g) * S\n"
             "S = S - beta * outer(k, u) + beta * outer(k, v)\noutput o = q @ S\n").states["S"]
    assert S.problem.kind == "stale"
    assert S.problem.message == "'u' holds the value of state S from before its update on line 6"
    assert (S.problem.line, S.problem.column) == (7, 25)


def test_a_read_before_the_update_is_recorded():
    a = rule("rule early\n" + HEAD + "input q[K], k[K], v[V]\nlet r = q @ S\nS = S + outer(k, v)\n"
             "output o = r + q @ S\n")
    o = a.read("o")
    assert o.linear
    assert [(t.read.state, t.read.version, t.read.after_update) for t in o.terms] == [
        ("S", 0, False), ("S", 1, True)]
    assert (o.terms[0].read.node.start.line, o.terms[0].read.node.start.column) == (5, 9)


def test_vector_and_scalar_states():
    a = rule("rule vs\ndims K\nstate n[K], m\ninput q[K], k[K], g, gk[K], beta\n"
             "n = exp(g) * n + k\nn = diag(gk) @ n\nn = n - beta * dot(k, n) * k\nm = g * m + 1\n"
             "output o = dot(q, n)\n")
    n, m = a.states["n"], a.states["m"]
    assert kinds(n) == ["scalar", "rows", "rank_one"]
    assert n.writes[0].kind == "vector" and text(n.writes[0].left) == "k"
    assert n.factors[2].coef.text() == "beta" and text(n.factors[2].key) == "k"
    assert kinds(m) == ["scalar"] and m.writes[0].kind == "scalar" and m.writes[0].coef.text() == "1"
    [t] = a.read("o").terms
    assert (t.read.state, t.read.side, text(t.read.vector)) == ("n", "dot", "q")


def test_a_sum_of_a_row_decay_and_an_erase_is_one_dplr_factor():
    n = rule("rule vs\ndims K\nstate n[K]\ninput q[K], k[K], gk[K], beta\n"
             "n = diag(gk) @ n - beta * dot(k, n) * k\noutput o = dot(q, n)\n").states["n"]
    assert n.affine
    [f] = n.factors
    assert (f.kind, f.side, f.coef.text(), text(f.vec), text(f.key)) == (
        "rank_one", "left", "beta", "k", "k")
    assert (f.diag.kind, text(f.diag.decay)) == ("rows", "gk")


# ---------------------------------------------------------------- the normal form (wave 2)

def _only(text_):
    a = rule(text_)
    [sa] = a.states.values()
    assert sa.affine, sa.problem
    return sa


def test_mingru_sum_is_one_elementwise_decay():
    h = _only("rule mingru\ndims D\nstate h[D]\ninput zl[D], hh[D]\nlet z = sigmoid(zl)\n"
              "h = (1 - z) * h + z * hh\noutput y = h\n")
    [f] = h.factors
    assert (f.kind, text(f.decay)) == ("rows", "1 - z")
    [w] = h.writes
    assert w.kind == "vector" and text(w.node) == "z * hh"


@pytest.mark.parametrize("update", ["h = h - z * h + z * hh", "h = h + z * (hh - h)",
                                    "h = z * hh + (1 - z) * h"])
def test_the_same_decay_however_it_is_spelled(update):
    h = _only(f"rule g\ndims D\nstate h[D]\ninput z[D], hh[D]\n{update}\noutput y = h\n")
    [f] = h.factors
    assert (f.kind, text(f.decay)) == ("rows", "1 - z")


def test_mamba1_per_entry_decay():
    S = _only("rule mamba1\ndims D, N\nstate S[D, N]\ninput x[D], dt[D], Bm[N], Cm[N]\n"
              "param A_log[D, N]\nlet delta = softplus(dt)\n"
              "S = exp(-(diag(delta) @ exp(A_log))) * S + outer(delta * x, Bm)\n"
              "output y = S @ Cm\n")
    [f] = S.factors
    assert (f.kind, text(f.decay)) == ("entries", "exp(-(diag(delta) @ exp(A_log)))")
    [w] = S.writes
    assert (w.kind, text(w.left), text(w.right)) == ("outer", "delta * x", "Bm")


def test_rwkv7_own_orientation_is_a_right_rank_one_factor():
    S = _only("rule rwkv7\ndims V, K\nstate S[V, K]\ninput r[K], w[K], kk[K], a[K], k[K], v[V]\n"
              "S = S @ diag(exp(w))\nS = S - outer(S @ kk, kk * a)\nS = S + outer(v, k)\n"
              "output o = S @ r\n")
    kinds_ = [f.kind for f in S.factors]
    assert kinds_ == ["cols", "rank_one"]
    f = S.factors[1]
    assert (f.side, f.coef.text(), text(f.vec), text(f.key)) == ("right", "1", "kk * a", "kk")


def test_dplr_sum_of_a_row_decay_and_a_rank_one_term():
    S = _only("rule dplr\ndims K, V\nstate S[K, V]\ninput q[K], gk[K], a[K], b[K], k[K], v[V]\n"
              "S = diag(exp(gk)) @ S + outer(b, a @ S) + outer(k, v)\noutput o = q @ S\n")
    [f] = S.factors
    assert (f.kind, f.coef.text(), text(f.vec), text(f.key)) == ("rank_one", "-1", "b", "a")
    assert (f.diag.kind, text(f.diag.decay)) == ("rows", "exp(gk)")


def test_kla_author_form_keeps_the_sum_without_dividing_by_alpha():
    S = _only("rule kla2\ndims K, V\nstate S[K, V]\ninput q[K], k[K], v[V], alpha, beta\n"
              "S = alpha * S + beta * outer(k, v - k @ S)\noutput o = q @ S\n")
    [f] = S.factors
    assert (f.kind, f.coef.text(), text(f.key)) == ("rank_one", "beta", "k")
    assert (f.diag.kind, f.diag.coef.text()) == ("scalar", "alpha")
    assert not any(c.divisors for c in [f.coef, f.diag.coef])


def test_a_factored_decay_still_gives_a_product():
    S = _only("rule gd\ndims K, V\nstate S[K, V]\ninput q[K], k[K], v[V], g, beta\n"
              "S = exp(g) * (S - beta * outer(k, k @ S)) + beta * outer(k, v)\noutput o = q @ S\n")
    assert [f.kind for f in S.factors] == ["scalar", "rank_one"]
    assert S.factors[1].diag is None and S.factors[1].coef.text() == "beta"


def test_a_rank_one_term_without_the_state_is_refused_at_its_column():
    n = rule("rule r1\ndims K\nstate n[K]\ninput q[K], k[K], beta\n"
             "n = beta * dot(k, n) * k\noutput o = dot(q, n)\n").states["n"]
    assert n.problem.kind == "unrecognised" and (n.problem.line, n.problem.column) == (5, 5)


def test_coef_algebra():
    a = rule("rule c\n" + HEAD + "input q[K], k[K], v[V], g, beta\n"
             "S = -(beta * exp(g)) / exp(g) * S + outer(k, v)\noutput o = q @ S\n")
    [f] = a.states["S"].factors
    assert f.coef.sign == -1 and f.coef.text() == "-beta"
    assert Coef().is_one and Coef().expr().value == 1


def test_same_expr_ignores_positions():
    a = rule("rule d\n" + HEAD + "input q[K], k[K], v[V], beta\n"
             "S = S - beta * outer(l2norm(k), l2norm(k) @ S) + beta * outer(l2norm(k), v)\n"
             "output o = q @ S\n")
    [erase] = a.states["S"].factors
    assert erase.householder
    assert same_expr(erase.vec, erase.key) and erase.vec is not erase.key
