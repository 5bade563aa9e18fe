"""The state Jacobian's structure (recdsl.ir.jacobian) of the example rules and of forms that
test its ties: what couples, along which axes, and what recdsl show says about it."""
import pytest

import recdsl
from recdsl.cli import main
from recdsl.ir.jacobian import structure
from tests.helpers import EXAMPLES


@pytest.mark.parametrize("name, kind, channels, size", [
    ("gla", "diagonal", ("K", "V"), "1"),  # per-entry decay: every entry its own recurrence
    ("linear_attention", "diagonal", ("K", "V"), "1"),
    ("gated_delta", "block", ("V",), "K"),  # (I - b k kᵀ) mixes a column's K entries only
    ("deltaproduct", "block", ("V",), "K"),
    ("mlstm", "dense", (), "(K*V + K + 1)"),  # the scalar stabiliser m reaches every entry
])
def test_examples(name, kind, channels, size):
    s = structure(recdsl.load(EXAMPLES / f"{name}.rec").ir)
    assert (s.kind, s.channels, s.size_text()) == (kind, channels, size)


def test_a_sum_over_an_axis_frees_it():
    # v @ S sums over K: entry [i, j] reads column j whole, so the columns (V) stay channels
    rule = recdsl.compile("rule r\ndims K, V\nstate S[K, V]\ninput k[V], v[K]\n"
                          "S = S + outer(v, tanh(k * (v @ S)))\noutput o = S @ k\n")
    s = structure(rule.ir)
    assert (s.kind, s.channels, s.free["S"]) == ("block", ("V",), ("K",))
    # S @ k sums over V: entry [i, j] reads row i whole, so the rows (K) stay channels
    rule = recdsl.compile("rule r\ndims K, V\nstate S[K, V]\ninput k[V], u[K]\n"
                          "S = S + diag(tanh(S @ k)) @ S\noutput o = u @ S\n")
    s = structure(rule.ir)
    assert (s.kind, s.channels, s.free["S"]) == ("block", ("K",), ("V",))
    # both: no channel left
    rule = recdsl.compile("rule r\ndims K, V\nstate S[K, V]\ninput k[V], v[K]\n"
                          "S = S + diag(tanh(S @ k)) @ S + outer(v, v @ S)\noutput o = S @ k\n")
    assert structure(rule.ir).kind == "dense"


def test_a_derivative_that_vanishes_is_no_dependence():
    rule = recdsl.compile("rule r\ndims D\nstate a[D], b[D]\ninput x[D]\n"
                          "a = tanh(x + b - b) * a\nb = sigmoid(b + x)\noutput y = a\n")
    s = structure(rule.ir)
    assert s.couplings == {("a", "a"), ("b", "b")} and s.kind == "diagonal"


def test_show_prints_the_structure_and_the_plan(tmp_path, capsys):
    path = tmp_path / "cell.rec"
    path.write_text("rule cell\ndims D\nstate c[D], h[D]\ninput x[D], f[D]\nparam r[D]\n"
                    "let g = sigmoid(f + r * h)\nc = g * c + (1 - g) * tanh(x)\nh = tanh(c)\n"
                    "output y = h\n")
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert ("newton: Jacobian block-diagonal: one 2 x 2 block per channel of (D) over (c, h); "
            "coupled: c<-h, h<-c. On the CPU: the sequential pass of the generated step forward, "
            "backward a scan of 2 x 2 blocks over T (token by token for wide blocks) with "
            "generated Jacobians; on a GPU: Newton iterations, each linearised recurrence solved "
            "by a kernel carrying the 2 x 2 blocks' vectors over T (Triton), backward the same in "
            "the transposed Jacobians") in out
    assert "  newton       yes" in out.split("backends:", 1)[1]


def test_show_says_why_there_is_no_newton_form(tmp_path, capsys):
    path = tmp_path / "pick.rec"
    path.write_text("rule pick\ndims D\nstate h[D]\ninput x[D]\n"
                    "h = tanh(keep_topk(h, 2) + x)\noutput y = h\n")
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "newton: no Newton form: keep_topk selects among entries that depend on the states" in out


def test_no_newton_form_for_a_dense_jacobian_over_a_matrix_state():
    rule = recdsl.load(EXAMPLES / "mlstm.rec")
    verdict = rule.family_info.verdicts["newton"]
    assert not verdict.accepted and "dense over the matrix state C" in verdict.reason
    assert "newton" not in rule.backends()


def test_show_says_newton_does_not_run_a_rule_with_a_parallel_form(capsys):
    assert main(["show", str(EXAMPLES / "gated_delta.rec")]) == 0
    newton = [line for line in capsys.readouterr().out.splitlines() if line.startswith("newton:")]
    assert newton == ["newton: Jacobian block-diagonal: one K x K block per channel of (V) over "
                      "(S) (not run: the rule has a parallel form)"]
