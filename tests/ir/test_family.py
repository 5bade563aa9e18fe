"""Families: every canonical rule, and rules written here that sit on either side of each
family's boundary, with the reason and position when a rule is recurrent only."""
from pathlib import Path

import pytest

from recdsl.grammar.parser import parse
from recdsl.ir.checker import check
from recdsl.ir.family import classify

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def family(text, name="test.rec"):
    return classify(check(parse(text, name)))


@pytest.mark.parametrize("name, expected", [
    ("delta", "delta"), ("gated_delta", "delta"), ("kla", "delta"), ("deltaproduct", "delta"),
    ("linear_attention", "diagonal"), ("retention", "diagonal"), ("mamba2", "diagonal"),
    ("gla", "diagonal"), ("raven", "diagonal"), ("mlstm", "recurrent"),
])
def test_canonical_families(name, expected):
    path = EXAMPLES / f"{name}.rec"
    f = classify(check(parse(path.read_text(), path.name)))
    assert f.name == expected
    assert (f.pos is None) == (expected != "recurrent")


def test_mlstm_reason_is_the_max_that_feeds_the_update_through_m():
    path = EXAMPLES / "mlstm.rec"
    f = classify(check(parse(path.read_text(), path.name)))
    assert (f.pos.line, f.pos.column) == (12, 10)
    assert f.reason == ("the update of m is not affine in the states: state m inside max(); "
                        "the updates of C and n depend on m")
    assert f.where("mlstm.rec") == "mlstm.rec:12:10"


def test_chunk_family_reasons_say_what_was_recognised():
    path = EXAMPLES / "gated_delta.rec"
    f = classify(check(parse(path.read_text(), path.name)))
    assert f.reason == ("S: scalar decay exp(g), Householder-like erase along kn, "
                        "writes beta * outer(kn, v)")


HEAD = "dims K, V\nstate S[K, V]\n"


def test_per_channel_gated_delta_is_delta():
    f = family("rule kda\n" + HEAD + "input q[K], k[K], v[V], gk[K], beta\nlet kn = l2norm(k)\n"
               "S = diag(exp(gk)) @ S\nS = S - beta * outer(kn, kn @ S)\nS = S + beta * outer(kn, v)\n"
               "output o = l2norm(q) @ S\n")
    assert f.name == "delta"


def test_value_axis_gated_linear_attention_is_diagonal():
    f = family("rule vg\n" + HEAD + "input q[K], k[K], v[V], gv[V]\n"
               "S = S @ diag(exp(gv)) + outer(k, v)\noutput o = q @ S\n")
    assert f.name == "diagonal"
    assert f.reason == "S: column decay diag(exp(gv)), writes outer(k, v)"


def test_delta_with_negative_eigenvalues_is_delta():
    f = family("rule d2\n" + HEAD + "input q[K], k[K], v[V], b\nlet beta = 2 * sigmoid(b)\n"
               "let kn = l2norm(k)\nS = S - beta * outer(kn, kn @ S) + beta * outer(kn, v)\n"
               "output o = l2norm(q) @ S\n")
    assert f.name == "delta"


def test_mamba_style_gate_from_params_is_diagonal():
    f = family("rule mg\n" + HEAD + "input q[K], k[K], v[V], a\nparam A_log, dt_bias\n"
               "let g = -exp(A_log) * softplus(a + dt_bias)\nS = exp(g) * S + outer(k, v)\n"
               "output o = q @ S\n")
    assert f.name == "diagonal" and f.reason == "S: scalar decay exp(g), writes outer(k, v)"


def test_gated_delta_with_the_mamba_gate_and_beta_inside_the_outer_is_delta():
    f = family("rule gd\n" + HEAD + "input q[K], k[K], v[V], a, b\nparam A_log, dt_bias\n"
               "let g = -exp(A_log) * softplus(a + dt_bias)\nlet kn = l2norm(k)\n"
               "S = exp(g) * S\nS = S - outer(sigmoid(b) * kn, kn @ S) + outer(kn, sigmoid(b) * v)\n"
               "output o = q @ S\n")
    assert f.name == "delta"


@pytest.mark.parametrize("body, reason, line, column", [
    # a write along another key than the erase
    ("S = S - beta * outer(k, k @ S) + beta * outer(w, v)",
     "the write beta * outer(w, v) is along w, but the erase on line 5 is along k: the delta "
     "form writes along the erased keys", 5, 34),
    # an erase with no write
    ("S = S - beta * outer(k, k @ S)",
     "the erase beta * outer(k, k @ S) has no write along k in the same step", 5, 9),
    # an erase along another vector than its key
    ("S = S - beta * outer(w, k @ S) + beta * outer(k, v)",
     "the rank-one term beta * outer(w, k @ S) is along w, not along its key k: not a "
     "Householder-like erase", 5, 9),
    # a write before the erase
    ("S = S + outer(k, v)\nS = S - beta * outer(k, k @ S)",
     "the write outer(k, v) to S comes before any erase: the delta form writes after the erase",
     5, 9),
    # a per-channel decay after the erase
    ("S = S - beta * outer(k, k @ S) + beta * outer(k, v)\nS = diag(exp(gk)) @ S",
     "the per-channel decay diag(exp(gk)) @ S comes after the erase on line 5: the delta form "
     "decays rows before erasing", 6, 5),
    # a decay on the value axis with an erase
    ("S = S @ diag(gv)\nS = S - beta * outer(k, k @ S) + beta * outer(k, v)",
     "S @ diag(gv) decays the value axis of S, which also has an erase: no chunkwise form has "
     "both", 5, 5),
    # a state inside tanh
    ("S = tanh(S) + outer(k, v)",
     "the update of S is not affine in the states: state S inside tanh()", 5, 5),
    # a write that is not an outer product
    ("S = S + W", "the write W to S is not an outer product outer(a, b)", 5, 9),
])
def test_recurrent_rules_with_reason_and_position(body, reason, line, column):
    f = family("rule r\n" + HEAD + "input q[K], k[K], w[K], v[V], gk[K], gv[V], W[K, V], beta\n"
               f"{body}\noutput o = q @ S\n")
    # not the delta or diagonal form; a general rank-one factor is still DPLR, an elementwise
    # transition still has the scan
    chunk = f.verdicts["delta" if "erase" in reason else "diagonal"]
    expected = "scan" if "W" in body else "recurrent" if ("tanh" in body or "gv" in body) else "dplr"
    assert f.name == expected
    assert not chunk.accepted and chunk.reason == reason
    assert (chunk.pos.line, chunk.pos.column) == (line, column)
    if f.name == "recurrent":
        assert (f.reason, f.pos) == (chunk.reason, chunk.pos)


def test_a_product_of_two_states_is_recurrent():
    f = family("rule p\n" + HEAD + "state n[K]\ninput q[K], k[K], v[V]\nn = n + k\n"
               "S = S + dot(n, k) * S + outer(k, v)\noutput o = q @ S\n")
    assert f.name == "recurrent"
    assert f.reason == "the update of S is not affine in the states: a product of two states (n and S)"
    assert (f.pos.line, f.pos.column) == (7, 9)


def test_coupled_affine_states_are_called_coupled_not_non_affine():
    """Momentum (Titans-style): S reads M, M is affine on its own. The update is affine in
    the two states together; the reason says so instead of "not affine"."""
    f = family("rule m\n" + HEAD + "state M[K, V]\ninput q[K], k[K], v[V], eta, th\n"
               "M = sigmoid(eta) * M + outer(k, v)\nS = sigmoid(th) * S + M\n"
               "output o = q @ S\n")
    assert f.name == "recurrent"
    assert f.reason == ("the states are coupled: the update of S reads state M (affine in the "
                        "states together, but each parallel family takes a state's update in "
                        "that state alone; newton solves them together)")
    assert (f.pos.line, f.pos.column) == (7, 23)
    assert f.staged is None


def test_a_gate_depending_on_a_state_is_recurrent():
    f = family("rule g\n" + HEAD + "input q[K], k[K], v[V]\nlet g = sigmoid(sum(k @ S))\n"
               "S = g * S + outer(k, v)\noutput o = q @ S\n")
    assert f.name == "recurrent"
    assert f.reason == "the update of S is not affine in the states: the gate g depends on state S"
    assert (f.pos.line, f.pos.column) == (6, 5)


def test_a_read_before_the_update_has_the_scan_not_the_chunk_form():
    f = family("rule e\n" + HEAD + "input q[K], k[K], v[V]\nlet r = q @ S\nS = S + outer(k, v)\n"
               "output o = r\n")
    assert f.name == "scan"
    chunk = f.verdicts["diagonal"]
    assert chunk.reason == ("o reads S before its update on line 6; the chunkwise forms read the "
                            "state after the token's updates")
    assert (chunk.pos.line, chunk.pos.column) == (5, 9)


def test_a_write_fed_by_a_read_of_the_state_is_recurrent():
    f = family("rule rw\ndims M, K, V\nstate Sk[M, K], Sv[M, V]\ninput q[K], k[K], v[V], r[M]\n"
               "let p = softmax(Sk @ q + r)\nSk = Sk + outer(p, k)\nSv = Sv + outer(p, v)\n"
               "output o = p @ Sv\n")
    assert f.name == "recurrent"
    assert f.reason == ("the update of Sk is not affine in the states: the write outer(p, k) "
                        "depends on state Sk; the update of Sv depends on Sk")
    assert (f.pos.line, f.pos.column) == (6, 11)


def test_an_output_that_is_not_a_linear_read_has_the_scan_not_the_chunk_form():
    f = family("rule t\n" + HEAD + "input q[K], k[K], v[V]\nS = S + outer(k, v)\n"
               "output o = tanh(q @ S)\n")
    assert f.name == "scan"
    chunk = f.verdicts["diagonal"]
    assert chunk.reason == ("tanh(q @ S) is not a linear read of a state: an output must be a "
                            "linear read of the states")
    assert (chunk.pos.line, chunk.pos.column) == (6, 12)


def test_vector_states_scan_and_mixed_forms_are_recurrent():
    f = family("rule v\ndims K\nstate n[K]\ninput q[K], k[K], g\nn = exp(g) * n + k\n"
               "output o = dot(q, n)\n")
    assert f.name == "scan"
    chunk = f.verdicts["diagonal"]
    assert chunk.reason == "state n is a vector; the chunkwise forms take matrix states"
    assert (chunk.pos.line, chunk.pos.column) == (3, 7)
    f = family("rule mix\ndims K, V\nstate S[K, V], T[K, V]\ninput q[K], k[K], v[V], beta\n"
               "S = S - beta * outer(k, k @ S) + beta * outer(k, v)\nT = T + outer(k, v)\n"
               "output o = q @ S + q @ T\n")
    assert f.name == "dplr"  # both states are DPLR (T with no rank-one factor)
    assert f.verdicts["delta"].reason == ("state S has the delta form and state T the diagonal "
                                          "form: no single chunkwise form fits both")


COUPLED = {
    # LRU (Orvieto et al. 2023): a complex diagonal transition as real and imaginary parts
    "lru": ("rule lru\ndims D\nstate hr[D], hi[D]\ninput x[D]\nparam nu[D], th[D]\n"
            "let r = exp(-exp(nu))\nlet nr = r * cos(th) * hr - r * sin(th) * hi + x\n"
            "let ni = r * sin(th) * hr + r * cos(th) * hi\nhr = nr\nhi = ni\noutput y = hr\n",
            "the states are coupled: 'ni' holds the value of state hr from before its update "
            "on line 9 (affine in the states together, but each parallel family takes a "
            "state's update in that state alone; newton solves them together); the update of "
            "hr depends on hi", (10, 6)),
    # LinOSS (Rusch and Rus 2025), implicit-explicit: velocity z, then position y from the new z
    "linoss": ("rule linoss\ndims D\nstate z[D], y[D]\ninput u[D], dt[D]\nparam A[D]\n"
               "let s = sigmoid(dt)\nz = z - s * softplus(A) * y + s * u\ny = y + s * z\n"
               "output o = y\n",
               "the states are coupled: the update of y reads state z (affine in the states "
               "together, but each parallel family takes a state's update in that state alone; "
               "newton solves them together); the update of z depends on y", (8, 13)),
    # Titans-style momentum: the momentum's write reads the memory, the memory adds the momentum
    "titans": ("rule titans\ndims K, V\nstate M[K, V], P[K, V]\ninput k[K], v[V], eta, th\n"
               "P = sigmoid(eta) * P - sigmoid(th) * outer(k, k @ M - v)\nM = M + P\n"
               "output o = k @ M\n",
               "the states are coupled: the write outer(k, k @ M - v) depends on state M (affine "
               "in the states together, but each parallel family takes a state's update in that "
               "state alone; newton solves them together); the update of M depends on P", (5, 38)),
}


@pytest.mark.parametrize("name", sorted(COUPLED))
def test_states_that_read_each_other_linearly_are_called_coupled(name):
    """Affine in the states together (a block transition per channel), however the coupling is
    spelled: a read of the other state, of its value from before its update, or a write that
    reads it. A product of two states stays "not affine" (the test above)."""
    text, reason, (line, column) = COUPLED[name]
    f = family(text)
    assert f.name == "recurrent"
    assert f.reason == reason
    assert (f.pos.line, f.pos.column) == (line, column)
