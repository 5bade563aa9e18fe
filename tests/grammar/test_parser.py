"""The parser: text -> syntax tree. Tree shapes, positions, layout (comments, blank lines,
indentation, line endings) and operator precedence."""
from __future__ import annotations

from pathlib import Path

import pytest

from recdsl.errors import SpecError
from recdsl.grammar import ast
from recdsl.grammar.parser import parse

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.rec"))


def sexpr(e) -> str:
    """An expression as a fully parenthesised prefix form, e.g. ``(* (@ a b) c)``."""
    if isinstance(e, ast.Num):
        return e.text
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Neg):
        return f"(neg {sexpr(e.operand)})"
    if isinstance(e, ast.BinOp):
        return f"({e.op} {sexpr(e.left)} {sexpr(e.right)})"
    if isinstance(e, ast.Call):
        return f"({e.fn}{''.join(' ' + sexpr(a) for a in e.args)})"
    if isinstance(e, ast.Index):
        return f"{e.target.id}[{e.index.id}]"
    raise AssertionError(e)


def value_of(text: str):
    """The right-hand side of the single statement after a minimal header."""
    tree = parse("rule r\n" + text)
    return tree.items[-1].value


def statements(tree):
    return [i for i in tree.items if isinstance(i, (ast.Let, ast.Update, ast.Output, ast.For))]


# ---------------------------------------------------------------- the canonical rules

# name in the file, number of declarations, kinds of the top-level statements
EXPECTED_EXAMPLES = {
    "delta": ("delta", 4, ["Let", "Update", "Output"]),
    "deltaproduct": ("gated_deltaproduct", 4, ["Update", "For", "Output"]),
    "gated_delta": ("gated_delta", 4, ["Let", "Update", "Update", "Update", "Output"]),
    "gla": ("gla", 4, ["Update", "Output"]),
    "kla": ("kla", 5, ["Let", "Update", "Update", "Output"]),
    "linear_attention": ("linear_attention", 3, ["Update", "Output"]),
    "mamba2": ("mamba2", 5, ["Update", "Output"]),
    "mlstm": ("mlstm", 4, ["Let"] * 4 + ["Update"] * 3 + ["Let", "Output"]),
    "raven": ("raven", 6, ["Let"] * 3 + ["Update"] * 2 + ["Let", "Output"]),
    "retention": ("retention", 4, ["Update", "Output"]),
}


def test_every_example_is_listed():
    assert sorted(p.stem for p in EXAMPLE_FILES) == sorted(EXPECTED_EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_example_parses(path):
    name, n_decls, kinds = EXPECTED_EXAMPLES[path.stem]
    tree = parse(path.read_text(), str(path))
    assert tree.name == name
    assert tree.filename == str(path)
    decls = [i for i in tree.items if isinstance(i, (ast.DimsDecl, ast.VarsDecl, ast.ConstDecl))]
    assert len(decls) == n_decls
    assert [type(s).__name__ for s in statements(tree)] == kinds
    # declarations come first in every canonical rule
    assert tree.items[:n_decls] == decls


def test_gated_delta_tree_and_positions():
    tree = parse((EXAMPLES / "gated_delta.rec").read_text())
    assert tree.name_pos == ast.Pos(2, 6, 11)
    dims, state, inputs, scalars = tree.items[:4]
    assert dims.names == ["K", "V"] and dims.positions == [ast.Pos(4, 6, 1), ast.Pos(4, 9, 1)]
    assert state.kind == "state" and [(v.name, v.dims) for v in state.vars] == [("S", ["K", "V"])]
    assert state.vars[0].pos == ast.Pos(5, 7, 1)
    assert state.vars[0].dim_pos == [ast.Pos(5, 9, 1), ast.Pos(5, 12, 1)]
    assert [(v.name, v.dims) for v in inputs.vars] == [("q", ["K"]), ("k", ["K"]), ("v", ["V"])]
    assert [v.pos.column for v in inputs.vars] == [7, 13, 19]
    assert [(v.name, v.dims) for v in scalars.vars] == [("g", []), ("beta", [])]
    assert scalars.vars[1].pos == ast.Pos(7, 10, 4)

    let, decay, erase, write, out = statements(tree)
    # let kn = l2norm(k)
    assert let.name == "kn" and let.pos == ast.Pos(9, 5, 2)
    assert sexpr(let.value) == "(l2norm k)"
    assert let.value.pos == ast.Pos(9, 10, 9)
    assert let.value.args[0].pos == ast.Pos(9, 17, 1)
    # S = exp(g) * S         # decay
    assert decay.state == "S" and decay.pos == ast.Pos(10, 1, 1)
    assert sexpr(decay.value) == "(* (exp g) S)"
    assert decay.value.pos == ast.Pos(10, 12, 1)  # the operator
    assert decay.value.start == ast.Pos(10, 5, 10)  # the whole expression, comment excluded
    # S = S - beta * outer(kn, kn @ S)
    assert sexpr(erase.value) == "(- S (* beta (outer kn (@ kn S))))"
    inner = erase.value.right.right.args[1]
    assert inner.pos == ast.Pos(11, 29, 1) and inner.start == ast.Pos(11, 26, 6)
    assert sexpr(write.value) == "(+ S (* beta (outer kn v)))"
    # output o = K ** -0.5 * (l2norm(q) @ S)
    assert out.name == "o" and out.pos == ast.Pos(14, 1, 6) and out.name_pos == ast.Pos(14, 8, 1)
    assert sexpr(out.value) == "(* (** K (neg 0.5)) (@ (l2norm q) S))"
    assert out.value.pos.column == 22
    power = out.value.left
    assert power.pos == ast.Pos(14, 14, 2) and power.right.pos.column == 17
    assert power.right.operand.value == 0.5
    read = out.value.right
    assert read.pos.column == 35 and read.left.pos == ast.Pos(14, 25, 9)
    assert read.right.pos == ast.Pos(14, 37, 1)


def test_deltaproduct_for_block_positions():
    tree = parse((EXAMPLES / "deltaproduct.rec").read_text())
    loop = statements(tree)[1]
    assert (loop.var, loop.dim) == ("j", "NH")
    assert loop.pos == ast.Pos(10, 1, 3)
    assert loop.var_pos == ast.Pos(10, 5, 1) and loop.dim_pos == ast.Pos(10, 10, 2)
    let, update = loop.body
    assert let.name == "kj" and let.pos == ast.Pos(11, 9, 2)
    assert sexpr(let.value) == "(l2norm k[j])"
    index = let.value.args[0]
    assert index.pos == ast.Pos(11, 21, 4)
    assert index.target.pos == ast.Pos(11, 21, 1) and index.index.pos == ast.Pos(11, 23, 1)
    assert update.pos == ast.Pos(12, 5, 1)
    assert sexpr(update.value) == "(+ (- S (* beta[j] (outer kj (@ kj S)))) (* beta[j] (outer kj v[j])))"
    # the output after the block is at top level again
    assert isinstance(tree.items[-1], ast.Output) and tree.items[-1].pos == ast.Pos(14, 1, 6)


def test_const_and_param_declarations():
    tree = parse((EXAMPLES / "raven.rec").read_text())
    const = tree.items[5]
    assert isinstance(const, ast.ConstDecl)
    assert (const.name, const.value, const.text) == ("topk", 8.0, "8")
    assert const.pos == ast.Pos(10, 7, 4) and const.value_pos.line == 10
    params = tree.items[4]
    assert params.kind == "param" and [v.name for v in params.vars] == ["A_log", "dt_bias"]
    negative = parse("rule r\nconst eps = -1.5e-3\n").items[0]
    assert negative.value == -1.5e-3 and negative.text == "-1.5e-3"


# ---------------------------------------------------------------- layout

def test_comments_blank_lines_and_no_trailing_newline():
    text = ("# a comment before the rule line\n\n"
            "rule r   # trailing comment\n"
            "\n   \n"
            "dims K  # K\n"
            "# a comment line between declarations\n"
            "      # an indented comment line does not open a block\n"
            "input q[K]\n"
            "\n\n"
            "output o = q  # no newline after this")
    tree = parse(text)
    assert tree.name == "r" and tree.name_pos.line == 3
    dims, inputs, out = tree.items
    assert dims.pos.line == 6 and inputs.pos.line == 9
    assert out.pos == ast.Pos(12, 1, 6) and sexpr(out.value) == "q"


def test_windows_line_endings_give_the_same_tree_and_positions():
    text = (EXAMPLES / "gated_delta.rec").read_text()
    unix, windows = parse(text), parse(text.replace("\n", "\r\n"))
    for a, b in zip(statements(unix), statements(windows)):
        assert sexpr(a.value) == sexpr(b.value) and a.pos == b.pos
    with pytest.raises(SpecError) as err:
        parse("rule r\r\ndims K\r\nlet a = q $ k\r\n")
    assert (err.value.line, err.value.column) == (3, 11)
    assert err.value.source_line == "let a = q $ k"


@pytest.mark.parametrize("indent", ["    ", "\t", "  ", "        "], ids=["4 spaces", "tab", "2 spaces", "8 spaces"])
def test_for_block_indentation(indent):
    text = ("rule r\n"
            "for j in NH:\n"
            f"{indent}let a = k[j]\n"
            "\n"
            f"{indent}# a comment in the block\n"
            "# a comment at column 1 inside the block\n"
            f"{indent}S = S + a\n"
            "output o = q @ S\n")
    tree = parse(text)
    loop, out = tree.items
    assert isinstance(loop, ast.For) and len(loop.body) == 2
    let, update = loop.body
    assert let.pos == ast.Pos(3, len(indent) + 5, 1)
    assert update.pos == ast.Pos(7, len(indent) + 1, 1)
    assert isinstance(out, ast.Output) and out.pos.line == 8


def test_nested_for_blocks_and_block_at_end_of_file():
    text = ("rule r\n"
            "for i in A:\n"
            "    for j in B:\n"
            "        let x = k[j]\n"
            "    let y = k[i]\n"
            "for i in C:\n"
            "\tS = S")  # a block that ends the file, without a newline
    outer, second = parse(text).items
    inner, let_y = outer.body
    assert isinstance(inner, ast.For) and inner.pos == ast.Pos(3, 5, 3)
    assert inner.body[0].pos == ast.Pos(4, 13, 1)
    assert let_y.pos == ast.Pos(5, 9, 1)
    assert second.dim == "C" and second.body[0].pos == ast.Pos(7, 2, 1)


def test_line_continuation_inside_brackets_and_with_backslash():
    text = ("rule r\n"
            "let a = outer(k,   # a comment inside the call\n"
            "              v) + \\\n"
            "    b\n"
            "let c = 1\n")
    let_a, let_c = parse(text).items
    assert sexpr(let_a.value) == "(+ (outer k v) b)"
    assert let_c.pos.line == 5


# ---------------------------------------------------------------- precedence

@pytest.mark.parametrize("text, tree", [
    ("-x ** 2", "(neg (** x 2))"),
    ("a @ b * c", "(* (@ a b) c)"),
    ("a * b @ c", "(@ (* a b) c)"),
    ("K ** -0.5", "(** K (neg 0.5))"),
    ("K ** -0.5 * q", "(* (** K (neg 0.5)) q)"),
    ("2 ** 3 ** 2", "(** 2 (** 3 2))"),
    ("a - b - c", "(- (- a b) c)"),
    ("a / b / c", "(/ (/ a b) c)"),
    ("a + b * c", "(+ a (* b c))"),
    ("(a + b) * c", "(* (+ a b) c)"),
    ("a - -b", "(- a (neg b))"),
    ("--a", "(neg (neg a))"),
    ("+a", "a"),
    ("-a @ S", "(@ (neg a) S)"),
    ("-exp(g) * S", "(* (neg (exp g)) S)"),
    ("exp(-exp(A) * dt) * S + dt * outer(B, x)", "(+ (* (exp (* (neg (exp A)) dt)) S) (* dt (outer B x)))"),
    ("max(abs(dot(n, q)), exp(-m)) + 1e-6", "(+ (max (abs (dot n q)) (exp (neg m))) 1e-6)"),
    ("a ** b[j]", "(** a b[j])"),
    ("((((x))))", "x"),
    ("f()", "(f)"),
    ("1.5e3 + .5 + 2. + 7E-2", "(+ (+ (+ 1.5e3 .5) 2.) 7E-2)"),
])
def test_precedence_and_associativity(text, tree):
    assert sexpr(value_of(f"let z = {text}\n")) == tree


def test_number_values():
    value = value_of("let z = 1.5e3 * .25\n")
    assert (value.left.value, value.right.value) == (1500.0, 0.25)
    assert value.left.pos == ast.Pos(2, 9, 5)


def test_keywords_inside_names_are_names():
    # 'input', 'format', 'rules', 'let_' merely start with keywords
    value = value_of("let letter = input_gate + format + rules + let_ + in_ + for_x\n")
    assert sexpr(value) == "(+ (+ (+ (+ (+ input_gate format) rules) let_) in_) for_x)"


def test_parse_rejects_non_text():
    with pytest.raises(TypeError):
        parse(b"rule r\n")
