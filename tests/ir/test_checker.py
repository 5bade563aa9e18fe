"""The checker: names resolved, every expression's symbolic shape, const overrides, and the
rules on diag, '**' and dims."""
from __future__ import annotations

from pathlib import Path

import pytest

import recdsl
from recdsl.errors import RecdslError, SpecError
from recdsl.grammar import ast
from recdsl.grammar.parser import parse
from recdsl.ir.checker import check
from recdsl.ir.shapes import Diag

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

HEAD = ("rule r\n"
        "dims K, V\n"
        "state S[K, V]\n"
        "input q[K], k[K], v[V]\n"
        "input g\n")  # 5 lines: the first statement below is on line 6


def checked(name, **consts):
    return check(parse((EXAMPLES / f"{name}.rec").read_text(), f"{name}.rec"), consts)


def checked_text(text, **consts):
    return check(parse(text), consts)


def shape_of(rule_text: str):
    """The shape of ``let z = ...``, the last statement before the standard tail."""
    rule = checked_text(HEAD + rule_text + "\nS = S + outer(k, v)\noutput o = q @ S\n")
    lets = [s for s in rule.body if isinstance(s, ast.Let)]
    return lets[-1].value.shape


def walk(e):
    yield e
    if isinstance(e, ast.BinOp):
        yield from walk(e.left)
        yield from walk(e.right)
    elif isinstance(e, ast.Neg):
        yield from walk(e.operand)
    elif isinstance(e, ast.Call):
        for a in e.args:
            yield from walk(a)
    elif isinstance(e, ast.Index):
        yield e.target
        yield e.index


def all_exprs(body):
    for s in body:
        if isinstance(s, ast.For):
            yield from all_exprs(s.body)
        else:
            yield from walk(s.value)


# ---------------------------------------------------------------- the canonical rules

@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.rec")), ids=lambda p: p.stem)
def test_every_expression_of_every_example_has_a_shape(path):
    rule = check(parse(path.read_text()))
    for e in all_exprs(rule.body):
        assert e.shape is not None, e
        if isinstance(e, ast.Name):
            assert e.kind in ("dim", "const", "state", "input", "param", "let", "output", "loop"), e


def test_gated_delta_shapes():
    rule = checked("gated_delta")
    assert rule.dims == ("K", "V")
    assert [(v.name, v.dims) for v in rule.states] == [("S", ("K", "V"))]
    assert [(v.name, v.dims) for v in rule.inputs] == [("q", ("K",)), ("k", ("K",)), ("v", ("V",)),
                                                         ("g", ()), ("beta", ())]
    let, decay, erase, write, out = rule.body
    assert let.value.shape == ("K",)  # l2norm(k)
    assert decay.value.shape == ("K", "V") and decay.value.left.shape == ()  # exp(g) * S
    assert decay.value.left.args[0].kind == "input"
    # S - beta * outer(kn, kn @ S)
    outer_erase = erase.value.right.right
    read = outer_erase.args[1]
    assert read.op == "@" and read.shape == ("V",)  # kn @ S
    assert read.left.kind == "let" and read.right.kind == "state"
    assert outer_erase.shape == ("K", "V")
    assert erase.value.right.shape == ("K", "V") and erase.value.right.left.shape == ()
    # S + beta * outer(kn, v)
    assert write.value.right.right.shape == ("K", "V")
    # K ** -0.5 * (l2norm(q) @ S)
    assert out.value.shape == ("V",)
    power = out.value.left
    assert power.shape == () and power.left.kind == "dim" and power.right.shape == ()
    assert out.value.right.shape == ("V",) and out.value.right.left.shape == ("K",)
    assert [(o.name, o.dims, o.kind) for o in rule.outputs] == [("o", ("V",), "output")]
    assert rule.consts == {}


def test_raven_shapes():
    rule = checked("raven")
    m, r, lam, upd_k, upd_v, p, out = rule.body
    assert m.value.shape == ("M",) and m.value.fn == "keep_topk"
    assert m.value.args[1].kind == "const"
    assert r.value.shape == ("M",) and r.value.right.left.shape == ()  # sum(m)
    assert lam.value.shape == ("M",)
    scaled = upd_k.value.left  # diag(lam) @ Sk
    assert scaled.shape == ("M", "K") and scaled.left.shape == Diag("M")
    assert upd_k.value.right.shape == ("M", "K")  # outer(1 - lam, k)
    assert upd_v.value.shape == ("M", "V")
    assert p.value.shape == ("M",) and p.value.args[0].shape == ("M",)  # softmax(Sk @ q)
    assert out.value.shape == ("V",)
    assert [v.name for v in rule.params] == ["A_log", "dt_bias"] and rule.params[0].dims == ()
    assert rule.consts == {"topk": 8.0}


def test_mamba2_names_b_and_c_are_ordinary_inputs():
    rule = checked("mamba2")
    update, out = rule.body
    assert [v.name for v in rule.inputs] == ["x", "B", "C", "dt"]
    assert update.value.shape == ("N", "P")
    assert update.value.right.right.shape == ("N", "P")  # outer(B, x)
    assert out.value.left.shape == ("P",)  # C @ S
    assert out.value.right.shape == ("P",) and out.value.right.left.kind == "param"  # D * x


def test_mlstm_scalar_state_and_reads():
    rule = checked("mlstm")
    assert [(v.name, v.dims) for v in rule.states] == [("C", ("K", "V")), ("n", ("K",)), ("m", ())]
    lets = {s.name: s for s in rule.body if isinstance(s, ast.Let)}
    assert lets["m1"].value.shape == () and lets["qs"].value.shape == ("K",)
    out = rule.body[-1].value
    assert out.shape == ("V",) and out.left.shape == ("V",)
    denominator = out.right
    assert denominator.shape == ()
    assert denominator.left.args[0].args[0].shape == ()  # dot(n, qs)


def test_deltaproduct_indexing_shapes():
    rule = checked("deltaproduct")
    loop = rule.body[1]
    assert isinstance(loop, ast.For) and (loop.var, loop.dim) == ("j", "NH")
    let, update = loop.body
    index = let.value.args[0]  # k[j]
    assert index.shape == ("K",)
    assert index.target.kind == "input" and index.target.shape == ("NH", "K")
    assert index.index.kind == "loop"
    beta_j = update.value.right.left
    assert isinstance(beta_j, ast.Index) and beta_j.shape == ()
    assert update.value.shape == ("K", "V")


@pytest.mark.parametrize("name, outputs, states", [
    ("delta", [("o", ("V",))], [("S", ("K", "V"))]),
    ("gla", [("o", ("V",))], [("S", ("K", "V"))]),
    ("kla", [("o", ("V",))], [("S", ("K", "V"))]),
    ("linear_attention", [("o", ("V",))], [("S", ("K", "V"))]),
    ("mamba2", [("y", ("P",))], [("S", ("N", "P"))]),
    ("raven", [("o", ("V",))], [("Sk", ("M", "K")), ("Sv", ("M", "V"))]),
    ("retention", [("o", ("V",))], [("S", ("K", "V"))]),
])
def test_example_outputs_and_states(name, outputs, states):
    rule = checked(name)
    assert [(o.name, o.dims) for o in rule.outputs] == outputs
    assert [(s.name, s.dims) for s in rule.states] == states


# ---------------------------------------------------------------- consts

def test_const_override_through_compile():
    text = (EXAMPLES / "raven.rec").read_text()
    assert recdsl.compile(text).consts == {"topk": 8.0}
    rule = recdsl.compile(text, topk=4)
    assert rule.consts == {"topk": 4}
    assert recdsl.load(EXAMPLES / "kla.rec", eps=1e-3).consts == {"eps": 1e-3}


def test_unknown_const_is_an_error_naming_the_known_ones():
    with pytest.raises(RecdslError) as err:
        recdsl.compile((EXAMPLES / "raven.rec").read_text(), topk=4, top_k=2)
    message = str(err.value)
    assert "no const 'top_k'" in message and "its consts are: topk" in message
    with pytest.raises(RecdslError) as err:
        recdsl.load(EXAMPLES / "gla.rec", eps=1.0)
    assert "rule 'gla' has no const 'eps'" in str(err.value) and "none" in str(err.value)


@pytest.mark.parametrize("value", ["4", None, True, [4]])
def test_const_override_must_be_a_number(value):
    with pytest.raises(RecdslError) as err:
        recdsl.compile((EXAMPLES / "raven.rec").read_text(), topk=value)
    assert "const 'topk' must be a number" in str(err.value)


@pytest.mark.parametrize("value, shown", [(0, "0"), (2.5, "2.5"), (-3, "-3")])
def test_const_override_is_checked_where_it_is_used(value, shown):
    with pytest.raises(SpecError) as err:
        recdsl.compile((EXAMPLES / "raven.rec").read_text(), topk=value)
    # let m = keep_topk(sigmoid(route), topk): the count is at line 12, column 35
    assert (err.value.line, err.value.column) == (12, 35)
    assert err.value.message == f"the count of keep_topk must be a positive whole number, not {shown}"


def test_keep_topk_count_may_use_dims_and_arithmetic():
    assert shape_of("let z = keep_topk(k, K)") == ("K",)
    assert shape_of("let z = keep_topk(k, 2 * 3 - 1)") == ("K",)


# ---------------------------------------------------------------- diag, '**', dims

@pytest.mark.parametrize("text, shape", [
    ("let z = diag(k) @ S", ("K", "V")),
    ("let z = S @ diag(v)", ("K", "V")),
    ("let z = diag(k) @ k", ("K",)),
    ("let z = v @ diag(v)", ("V",)),
    ("let z = q @ (diag(exp(k)) @ S)", ("V",)),
])
def test_diag_is_accepted_as_a_factor_of_matmul(text, shape):
    assert shape_of(text) == shape


@pytest.mark.parametrize("text, column", [
    ("let z = diag(k)", 9),
    ("let z = diag(k) * S", 9),
    ("let z = exp(diag(k))", 13),
    ("let z = S + diag(k)", 13),
    ("let z = -diag(k) @ S", 10),
    ("let z = outer(diag(k), v)", 15),
])
def test_diag_anywhere_else_is_an_error(text, column):
    with pytest.raises(SpecError) as err:
        shape_of(text)
    assert (err.value.line, err.value.column) == (6, column)
    assert err.value.message == "diag(x) can only be a factor of '@'"
    assert "diag(x) @ S" in err.value.hint and "S @ diag(x)" in err.value.hint


@pytest.mark.parametrize("text, shape", [
    ("let z = K ** -0.5", ()),
    ("let z = K ** -0.5 * q", ("K",)),
    ("let z = k ** 2", ("K",)),
    ("let z = S ** g", ("K", "V")),
    ("let z = (K + V) / 2", ()),
    ("let z = -k", ("K",)),
    ("let z = max(k, g) - min(g, 0)", ("K",)),
    ("let z = sum(k) + norm(q) + dot(q, k)", ()),
    ("let z = softmax(v) * l2norm(v)", ("V",)),
])
def test_shapes_of_arithmetic(text, shape):
    assert shape_of(text) == shape


def test_dims_never_match_each_other():
    # K and V are distinct symbols even though a call could give them the same size
    with pytest.raises(SpecError) as err:
        shape_of("let z = k + v")
    assert err.value.message == "cannot add [K] and [V]"
    with pytest.raises(SpecError) as err:
        shape_of("let z = v @ S")
    assert err.value.message == "cannot multiply [V] @ [K, V]: the inner dims do not match"
    with pytest.raises(SpecError) as err:
        checked_text(HEAD + "S = outer(k, k)\noutput o = q @ S\n")
    assert err.value.message == "state 'S' is [K, V] but the new value is [K, K]"


def test_let_in_a_block_is_fresh_each_block():
    text = ("rule r\ndims K, V, NH\nstate S[K, V]\ninput q[K], k[NH, K], v[NH, V]\n"
            "for j in NH:\n    let a = k[j]\n    S = S + outer(a, v[j])\n"
            "for i in NH:\n    let a = 2 * k[i]\n    S = S - outer(a, v[i])\n"
            "output o = q @ S\n")
    rule = checked_text(text)
    first, second, _ = rule.body
    assert first.body[0].value.shape == ("K",) and second.body[0].value.shape == ("K",)


def test_names_of_the_call_contract_are_refused_for_inputs_and_params():
    for kind in ("input", "param"):
        text = (f"rule r\ndims K, V\nstate S[K, V]\ninput q[K], k[K], v[V]\n{kind} backend\n"
                "S = S + outer(k, v)\noutput o = q @ S\n")
        with pytest.raises(SpecError) as err:
            checked_text(text)
        assert (err.value.line, err.value.column) == (5, len(kind) + 2)
        assert "keyword argument of the rule call" in err.value.message
        assert "initial_state" in err.value.hint
    # a state or a let may use such a name: it is never passed by name
    rule = checked_text("rule r\ndims K, V\nstate backend[K, V]\ninput q[K], k[K], v[V]\n"
                        "let cu_seqlens = k\nbackend = backend + outer(cu_seqlens, v)\noutput o = q @ backend\n")
    assert rule.states[0].name == "backend"


def test_checked_rule_records_declaration_order_and_layouts():
    rule = checked("mamba2")
    assert rule.dims == ("N", "P")
    assert [v.layout() for v in rule.inputs] == [["B", "T", "H", "P"], ["B", "T", "H", "N"],
                                                 ["B", "T", "H", "N"], ["B", "T", "H"]]
    assert [v.layout() for v in rule.params] == [["H"], ["H"]]
    assert rule.states[0].layout() == ["B", "H", "N", "P"]
    assert rule.outputs[0].layout() == ["B", "T", "H", "P"]
