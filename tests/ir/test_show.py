"""The text of ``recdsl show``: family, reason, recurrence in mathematical form, reads."""
from pathlib import Path

import pytest

from recdsl.grammar.parser import parse
from recdsl.ir.checker import check
from recdsl.ir.show import render

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def show(name, **kw):
    path = EXAMPLES / f"{name}.rec"
    return render(check(parse(path.read_text(), path.name)), **kw)


def lines(text):
    return [line.strip() for line in text.splitlines()]


def test_gated_delta():
    out = show("gated_delta")
    assert out.startswith("rule gated_delta (gated_delta.rec)\nfamily: delta\n")
    assert "S_t = exp(g_t) (I - beta_t kn_t kn_tᵀ) S_{t-1} + beta_t kn_t v_tᵀ" in lines(out)
    assert "kn_t = l2norm(k_t)" in lines(out)
    assert any(line.startswith("o_t = K^-0.5 l2norm(q_t)ᵀ S_t ") and line.endswith("linear read of S")
               for line in lines(out))
    assert "derivatives:" not in out


def test_grad_code_is_appended_under_a_heading():
    out = show("gated_delta", grad_code="d_beta = 1.0\n")
    assert out.endswith("\nderivatives:\nd_beta = 1.0\n")


def test_mlstm_prints_the_reason_with_its_position():
    out = show("mlstm")
    assert "family: staged: no parallel form as a whole, its states run in stages (below)" in out
    assert ("stages:\n  stage 1: m: max-plus recurrence m = max(a + m, b) with a = lf, b = i: "
            "parallel (cumulative max)\n  stage 2: C, n: the diagonal family through the read "
            "lowering, given m per token\n") in out
    assert ("  reason: mlstm.rec:12:10: the update of m is not affine in the states: state m "
            "inside max(); the updates of C and n depend on m\n"
            "      let m1 = max(lf + m, i)\n"
            "               ^^^^^^^^^^^^^^\n") in out
    assert "m1_t = max(lf_t + m_{t-1}, i_t)" in lines(out)
    assert "C: not affine in the states: the gate fg depends on state m (mlstm.rec:15:5)" in lines(out)
    assert "C_t = fg_t C_{t-1} + ig_t k_t v_tᵀ" in lines(out)


def test_deltaproduct_prints_the_steps_and_the_product_over_j():
    out = lines(show("deltaproduct"))
    assert "S_{t,0} = exp(g_t) S_{t-1}" in out
    assert ("S_{t,j+1} = (I - beta_{t,j} kj_{t,j} kj_{t,j}ᵀ) S_{t,j} + beta_{t,j} kj_{t,j} v_{t,j}ᵀ,"
            "   j = 0..NH-1") in out
    assert "S_t = S_{t,NH}" in out
    assert ("A_t = ∏_{j=NH-1..0} (I - beta_{t,j} kj_{t,j} kj_{t,j}ᵀ) exp(g_t)   "
            "(transition: S_t = A_t S_{t-1} + W_t)") in out
    assert "[for j in NH] kj_{t,j} = l2norm(k_{t,j})" in out


def test_raven_prints_row_decays_and_the_chained_reads():
    out = lines(show("raven"))
    assert "Sk_t = diag(lam_t) Sk_{t-1} + (1 - lam_t) k_tᵀ" in out
    assert "Sv_t = diag(lam_t) Sv_{t-1} + (1 - lam_t) v_tᵀ" in out
    assert "lam_t = exp(-exp(A_log) softplus(a_t + dt_bias) r_t)" in out
    assert any(line.startswith("p_t = softmax(Sk_t q_t) ") and line.endswith("per-token function of a read of Sk")
               for line in out)
    assert any(line.startswith("o_t = p_tᵀ Sv_t ") and line.endswith("linear read of Sv; chained through p")
               for line in out)


@pytest.mark.parametrize("name, recurrence", [
    ("delta", "S_t = (I - beta_t kn_t kn_tᵀ) S_{t-1} + beta_t kn_t v_tᵀ"),
    ("kla", "S_t = exp(g_t) (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ"),
    ("gla", "S_t = diag(exp(gk_t)) S_{t-1} + k_t v_tᵀ"),
    ("linear_attention", "S_t = S_{t-1} + k_t v_tᵀ"),
    ("retention", "S_t = gamma S_{t-1} + k_t v_tᵀ"),
    ("mamba2", "S_t = exp(-exp(A_log) dt_t) S_{t-1} + dt_t B_t x_tᵀ"),
])
def test_recurrences(name, recurrence):
    assert recurrence in lines(show(name))


def test_mamba2_read_has_the_skip_term():
    out = lines(show("mamba2"))
    assert any(line.startswith("y_t = C_tᵀ S_t + D x_t ") for line in out)


def test_written_rules_value_axis_decay_and_a_write_before_a_decay():
    text = ("rule wf\ndims K, V\nstate S[K, V]\ninput q[K], k[K], v[V], g, gv[V]\n"
            "S = S @ diag(exp(gv)) + outer(k, v)\nS = exp(g) * S\noutput o = q @ S\n")
    out = lines(render(check(parse(text, "wf.rec"))))
    assert "S_t = exp(g_t) S_{t-1} diag(exp(gv_t)) + exp(g_t) k_t v_tᵀ" in out


def test_coupled_affine_states_say_coupled_in_the_recurrence_and_the_stages():
    text = ("rule momentum\ndims K, V\nstate S[K, V], M[K, V]\ninput q[K], k[K], v[V], eta, th\n"
            "M = sigmoid(eta) * M + outer(k, v)\nS = sigmoid(th) * S + M\noutput o = q @ S\n")
    out = render(check(parse(text, "momentum.rec")))
    assert ("S: coupled to other states: the update of S reads state M (momentum.rec:6:23)"
            in lines(out))
    assert ("stages: none: the update of S reads state M, whose own update is affine: a leading "
            "stage is a non-affine scalar or vector state; coupled affine states are not staged"
            in lines(out))
    assert "M_t = sigmoid(eta_t) M_{t-1} + k_t v_tᵀ" in lines(out)
