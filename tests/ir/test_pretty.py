"""pretty.unparse: rule text back from a tree, minimal parentheses, same tree on re-parsing."""
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from recdsl.errors import SpecError
from recdsl.grammar import ast
from recdsl.grammar.parser import parse
from recdsl.ir import pretty
from recdsl.ir.checker import check

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.rec"))


def parse_expr(text):
    return parse(f"rule r\nlet x = {text}\n").items[0].value


def structure(node):
    """A tree as nested tuples, positions and checker annotations left out."""
    if isinstance(node, ast.Num):
        return ("num", node.value)
    if isinstance(node, ast.Name):
        return ("name", node.id)
    if isinstance(node, ast.Index):
        return ("index", node.target.id, node.index.id)
    if isinstance(node, ast.Call):
        return ("call", node.fn, tuple(structure(a) for a in node.args))
    if isinstance(node, ast.BinOp):
        return (node.op, structure(node.left), structure(node.right))
    if isinstance(node, ast.Neg):
        return ("neg", structure(node.operand))
    if isinstance(node, ast.Let):
        return ("let", node.name, structure(node.value))
    if isinstance(node, ast.Update):
        return ("update", node.state, structure(node.value))
    if isinstance(node, ast.Output):
        return ("output", node.name, structure(node.value))
    if isinstance(node, ast.For):
        return ("for", node.var, node.dim, tuple(structure(s) for s in node.body))
    raise TypeError(node)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_statements_round_trip(path):
    rule = check(parse(path.read_text(), path.name))
    assert rule.body
    for stmt in rule.body:
        text = pretty.describe(stmt)
        if isinstance(stmt, ast.For):
            text = pretty.unparse_body([stmt])
        reparsed = parse(f"rule r\n{text}\n").items
        assert [structure(s) for s in reparsed] == [structure(stmt)], text


def test_examples_whole_body_round_trips_through_the_checker():
    # the text of a checked body, put back under its declarations, checks to the same tree
    for path in EXAMPLES:
        source = path.read_text()
        rule = check(parse(source, path.name))
        declarations = source.splitlines()[: rule.body[0].pos.line - 1]
        rebuilt = check(parse("\n".join(declarations) + "\n" + pretty.unparse_body(rule.body) + "\n"))
        assert [structure(s) for s in rebuilt.body] == [structure(s) for s in rule.body], path.name


@pytest.mark.parametrize("text, expected", [
    ("K ** -0.5 * (l2norm(q) @ S)", "K ** -0.5 * (l2norm(q) @ S)"),
    ("((a + b)) + c", "a + b + c"),
    ("a + (b + c)", "a + (b + c)"),
    ("a - (b - c)", "a - (b - c)"),
    ("a - (b + c)", "a - (b + c)"),
    ("(a * b) / c", "a * b / c"),
    ("a / (b * c)", "a / (b * c)"),
    ("(a @ b) * c", "a @ b * c"),
    ("a * (b @ c)", "a * (b @ c)"),
    ("(a + b) * c", "(a + b) * c"),
    ("a * b + c * d", "a * b + c * d"),
    ("-(a + b)", "-(a + b)"),
    ("-(a * b)", "-(a * b)"),
    ("(-a) * b", "-a * b"),
    ("a * (-b)", "a * -b"),
    ("a - (-b)", "a - -b"),
    ("-(-a)", "- -a"),
    ("-(a ** 2)", "-a ** 2"),
    ("(-a) ** 2", "(-a) ** 2"),
    ("a ** (b ** c)", "a ** b ** c"),
    ("(a ** b) ** c", "(a ** b) ** c"),
    ("a ** (-b)", "a ** -b"),
    ("a ** (b * c)", "a ** (b * c)"),
    ("(a + b) ** 2", "(a + b) ** 2"),
    ("exp(-exp(A_log) * dt) * S", "exp(-exp(A_log) * dt) * S"),
    ("max(abs(dot(n, qs)), exp(-m)) + 1e-6", "max(abs(dot(n, qs)), exp(-m)) + 1e-6"),
    ("beta[j] * outer(kj, v[j])", "beta[j] * outer(kj, v[j])"),
    ("(x)", "x"),
    ("+x", "x"),
    (".5e3", ".5e3"),
])
def test_minimal_parentheses(text, expected):
    assert pretty.unparse(parse_expr(text)) == expected
    assert structure(parse_expr(expected)) == structure(parse_expr(text))


def test_describe_statements():
    rule = check(parse((EXAMPLES[0].parent / "deltaproduct.rec").read_text()))
    assert pretty.unparse_body(rule.body).splitlines() == [
        "S = exp(g) * S",
        "for j in NH:",
        "    let kj = l2norm(k[j])",
        "    S = S - beta[j] * outer(kj, kj @ S) + beta[j] * outer(kj, v[j])",
        "output o = K ** -0.5 * (l2norm(q) @ S)",
    ]
    assert [(depth, type(s).__name__) for depth, s in pretty.lines(rule.body)] == [
        (0, "Update"), (0, "For"), (1, "Let"), (1, "Update"), (0, "Output")]


def test_shape_text():
    from recdsl.ir.shapes import Diag
    assert pretty.shape_text(()) == "scalar"
    assert pretty.shape_text(("K", "V")) == "[K, V]"
    assert pretty.shape_text(Diag("K")) == "diag[K]"


def test_unparse_rejects_non_expressions():
    with pytest.raises(TypeError, match="not an expression node: Let"):
        pretty.unparse(ast.Let("x", None, ast.Pos(1, 1)))


# ---------------------------------------------------------------- random trees

_P = ast.Pos(1, 1)
_leaves = st.one_of(
    st.sampled_from(["a", "b", "S", "K"]).map(lambda n: ast.Name(n, _P)),
    st.sampled_from(["0.5", "2", "1e-6"]).map(lambda t: ast.Num(float(t), t, _P)),
    st.just(ast.Index(ast.Name("k", _P), ast.Name("j", _P), _P)),
)


def _grow(children):
    return st.one_of(
        st.builds(lambda op, l, r: ast.BinOp(op, l, r, _P, _P),
                  st.sampled_from(["+", "-", "*", "/", "@", "**"]), children, children),
        children.map(lambda e: ast.Neg(e, _P)),
        st.builds(lambda fn, args: ast.Call(fn, args, _P), st.sampled_from(["exp", "max", "outer"]),
                  st.lists(children, min_size=1, max_size=2)),
    )


@settings(max_examples=300, deadline=None)
@given(st.recursive(_leaves, _grow, max_leaves=12))
def test_random_trees_round_trip(tree):
    text = pretty.unparse(tree)
    assert structure(parse_expr(text)) == structure(tree), text
    # minimal: dropping any one pair of parentheses changes the tree or breaks the parse
    for start in [i for i, c in enumerate(text) if c == "(" and (i == 0 or not text[i - 1].isalnum())]:
        depth = 0
        for end in range(start, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        stripped = text[:start] + text[start + 1:end] + text[end + 1:]
        try:
            same = structure(parse_expr(stripped)) == structure(tree)
        except SpecError:
            same = False
        assert not same, f"{text!r}: parentheses at {start} are not needed"
