"""A corpus of malformed rules: each must fail with a SpecError at the exact line and column,
with a message (and hint, where it guides the fix) that says what is wrong."""
from __future__ import annotations

import pytest

import recdsl
from recdsl.errors import SpecError

# 5 lines: statements after it start on line 6
HEAD = ("rule r\n"
        "dims K, V\n"
        "state S[K, V]\n"
        "input q[K], k[K], v[V]\n"
        "input g\n")
# a rule with a stepped dim NH: statements start on line 6 as well
STEPPED = ("rule r\n"
           "dims K, V, NH\n"
           "state S[K, V]\n"
           "input q[K], k[NH, K], v[NH, V]\n"
           "input g\n")
UPDATE = "S = S + outer(k, v)\n"
OUT = "output o = q @ S\n"
TAIL = UPDATE + OUT


def case(id, text, line, column, message, hint=()):
    """``message`` and ``hint``: words that must appear in the message and in the hint."""
    message = [message] if isinstance(message, str) else list(message)
    hint = [hint] if isinstance(hint, str) else list(hint)
    return pytest.param(text, line, column, message, hint, id=id)


CASES = [
    # ------------------------------------------------------------ syntax
    case("unexpected-character", HEAD + "S = S + outer(k, v) $\n" + OUT, 6, 21,
         "unexpected character '$'", "comments start with '#'"),
    case("string-literal", HEAD + UPDATE + 'output o = "q"\n', 7, 12, "unexpected character '\"'"),
    case("non-ascii-name", HEAD + "let é = g\n" + TAIL, 6, 5, "unexpected character 'é'", "ASCII letters"),
    case("nul-character", HEAD + "let a = g\x00\n" + TAIL, 6, 10, "unexpected character U+0000"),
    case("missing-equals-update", HEAD + "S  S + outer(k, v)\n" + OUT, 6, 4,
         ["unexpected 'S'", "expected '='"]),
    case("missing-equals-let", HEAD + "let a exp(g)\n" + TAIL, 6, 7, ["unexpected 'exp'", "expected '='"]),
    case("missing-equals-const", HEAD + "const c 3\n" + TAIL, 6, 9, ["unexpected '3'", "expected '='"]),
    case("unclosed-paren", HEAD + "S = S + outer(k, v\n" + OUT, 6, 14, "'(' is never closed", "')'"),
    case("unclosed-paren-at-end-of-file", HEAD + UPDATE + "output o = (q @ S", 7, 12,
         "'(' is never closed", "')'"),
    case("unclosed-bracket", STEPPED + "for j in NH:\n    let a = k[j\n    S = S + outer(a, v[j])\n" + OUT,
         7, 14, "'[' is never closed", "']'"),
    case("unclosed-paren-before-an-update", HEAD + "let z = ((g)\n" + TAIL, 6, 9, "'(' is never closed"),
    case("equals-inside-a-call-over-two-lines", HEAD + "let z = outer(k,\n    v = 3)\n" + TAIL, 7, 7,
         ["unexpected '='", "an operator"]),
    case("index-with-two-subscripts", STEPPED + "S = S + outer(k[j, v)\n" + OUT, 6, 18,
         ["unexpected ','", "expected ']'"]),
    case("extra-close-paren", HEAD + "S = S + outer(k, v))\n" + OUT, 6, 20,
         ["unexpected ')'", "expected the end of the line"]),
    case("dangling-operator", HEAD + UPDATE + "output o = q @ S +\n", 7, 19,
         ["unexpected end of line", "a name", "a number"]),
    case("two-operators", HEAD + UPDATE + "output o = q @@ S\n", 7, 15, ["unexpected '@'", "a name"]),
    case("two-operands", HEAD + "let a = 3 .5\n" + TAIL, 6, 11,
         ["unexpected '.5'", "expected an operator or the end of the line"]),
    case("const-from-expression", HEAD + "const c = g\n" + TAIL, 6, 11, ["unexpected 'g'", "a number"]),
    case("empty-shape", "rule r\ndims K\ninput q[]\n", 3, 9, ["unexpected ']'", "expected a name"]),
    case("number-too-large", HEAD + UPDATE + "output o = 1e400 * (q @ S)\n", 7, 12,
         "the number 1e400 is too large", "64-bit float"),
    case("empty-file", "", 1, 1, ["must start with 'rule NAME'", "found end of file"], "rule my_rule"),
    case("missing-rule-line", "dims K, V\nstate S[K, V]\n", 1, 1,
         ["must start with 'rule NAME'", "found 'dims'"], "rule my_rule"),
    case("missing-rule-line-after-comments", "# a comment\n\ninput q[K]\n", 3, 1,
         "must start with 'rule NAME'", "rule my_rule"),
    case("rule-without-name", "rule\ndims K\n", 1, 5, ["unexpected end of line", "expected a name"]),
    case("second-rule-line", HEAD + "rule s\n" + TAIL, 6, 1, "'rule' is a keyword", "first line"),
    case("unexpected-indentation", HEAD + "  S = S + outer(k, v)\n" + OUT, 6, 3,
         "unexpected indentation", "'for'"),
    case("indentation-after-blank-and-comment-lines", HEAD + UPDATE + "\n# note\n\n    " + OUT, 10, 5,
         "unexpected indentation"),
    case("bad-dedent", HEAD + "for j in K:\n    let a = g\n  let b = g\n" + TAIL, 8, 3,
         "indented by 2 but no enclosing block", "same amount"),
    case("for-without-indented-body", HEAD + "for j in K:\nlet a = g\n" + TAIL, 7, 1,
         ["expected an indented block", "found 'let'"], "indent the body"),
    case("for-without-body-at-end-of-file", HEAD + "for j in K:", 6, 12,
         ["expected an indented block", "found end of file"], "indent the body"),
    case("for-without-colon", HEAD + "for j in K\n    let a = g\n" + TAIL, 6, 11,
         ["unexpected end of line", "expected ':'"]),

    # ------------------------------------------------------------ keywords as names
    case("keyword-as-let-name", HEAD + "let for = 1\n" + TAIL, 6, 5,
         "'for' is a keyword and cannot be used as a name", "the keywords are"),
    case("keyword-as-state-name", "rule r\ndims K\nstate in[K]\n", 3, 7, "'in' is a keyword", "the keywords are"),
    case("keyword-as-dim-name", "rule r\ndims K, param\n", 2, 9, "'param' is a keyword", "the keywords are"),
    case("keyword-as-output-name", HEAD + UPDATE + "output let = q @ S\n", 7, 8, "'let' is a keyword"),
    case("keyword-in-expression", HEAD + UPDATE + "output o = q @ S * input\n", 7, 20, "'input' is a keyword"),
    case("keyword-as-loop-variable", HEAD + "for rule in K:\n    let a = g\n" + TAIL, 6, 5, "'rule' is a keyword"),
    case("output-without-name", HEAD + UPDATE + "output = q @ S\n", 7, 1,
         "'output' is a keyword and cannot be used as a name", "output NAME = ..."),

    # ------------------------------------------------------------ names and functions
    case("unknown-name", HEAD + "S = S + outer(kk, v)\n" + OUT, 6, 15, "unknown name 'kk'", "did you mean 'k'?"),
    case("unknown-function", HEAD + "S = S + outr(k, v)\n" + OUT, 6, 9, "unknown function 'outr'",
         "did you mean 'outer'?"),
    case("unknown-function-far-from-any", HEAD + "S = S + frobnicate(k)\n" + OUT, 6, 9,
         "unknown function 'frobnicate'", ["the built-ins are", "keep_topk"]),
    case("function-without-call", HEAD + UPDATE + "output o = q @ S + exp\n", 7, 20,
         "'exp' is a function; call it with arguments"),
    case("input-called-as-function", HEAD + UPDATE + "output o = q(k)\n", 7, 12, "'q' is an input, not a function"),
    case("wrong-arity-outer", HEAD + "S = S + outer(k)\n" + OUT, 6, 9, "outer() takes 2 arguments, 1 given"),
    case("wrong-arity-exp", HEAD + "S = exp(g, g) * S\n" + OUT, 6, 5, "exp() takes 1 argument, 2 given"),
    case("let-bound-twice", HEAD + "let a = g\nlet a = g\n" + TAIL, 7, 5,
         "'a' is already bound as a let on line 6", "bound once"),
    case("output-bound-twice", HEAD + UPDATE + OUT + OUT, 8, 8, "'o' is already bound as an output on line 7"),
    case("input-declared-twice", "rule r\ndims K\ninput q[K], q\n", 3, 13, "'q' is already bound as an input on line 3"),
    case("let-rebinds-input", HEAD + "let q = exp(g)\n" + TAIL, 6, 5,
         ["'q' is already declared as an input (line 4)", "inputs cannot be re-bound"]),
    case("let-rebinds-param", HEAD + "param p\nlet p = g\n" + TAIL, 7, 5,
         ["'p' is already declared as a param (line 6)", "params cannot be re-bound"]),
    case("let-rebinds-const", HEAD + "const c = 1\nlet c = g\n" + TAIL, 7, 5,
         ["'c' is already declared as a const (line 6)", "consts cannot be re-bound"]),
    case("let-rebinds-dim", HEAD + "let K = 2\n" + TAIL, 6, 5, "'K' is already declared as a dim (line 2)"),
    case("let-rebinds-state", HEAD + "let S = 2\n" + TAIL, 6, 5, "'S' is already declared as a state (line 3)"),
    case("input-named-like-a-call-argument", HEAD + "input initial_state\n" + TAIL, 6, 7,
         "input 'initial_state' has the name of a keyword argument of the rule call", "rename it"),

    # ------------------------------------------------------------ updates
    case("assign-to-non-state", HEAD + "T = S\n" + TAIL, 6, 1, "'T' is not a state", "let T = ..."),
    case("assign-to-input", HEAD + "g = 1\n" + TAIL, 6, 1, "cannot assign to input 'g': only states take updates",
         "let"),
    case("assign-to-let", HEAD + "let a = g\na = 2\n" + TAIL, 7, 1, "cannot assign to let 'a'"),
    case("update-shape-mismatch", HEAD + "S = outer(v, k)\n" + OUT, 6, 5,
         "state 'S' is [K, V] but the new value is [V, K]"),
    case("update-with-a-vector", HEAD + "S = S @ v\n" + OUT, 6, 5, "state 'S' is [K, V] but the new value is [K]"),

    # ------------------------------------------------------------ shapes
    case("add-matrix-and-vector", HEAD + UPDATE + "let z = S + k\n" + OUT, 7, 9, "cannot add [K, V] and [K]",
         "equal shapes"),
    case("subtract-different-dims", HEAD + "let z = k - v\n" + TAIL, 6, 9, "cannot subtract [K] and [V]"),
    case("vector-times-matrix-rows", HEAD + "S = k * S\n" + OUT, 6, 5,
         ["cannot multiply [K] and [K, V]", "a vector times a matrix is not elementwise"], "diag(x) @ S"),
    case("matrix-times-vector-columns", HEAD + "S = S * v\n" + OUT, 6, 5,
         "cannot multiply [K, V] and [V]", "S @ diag(x)"),
    case("matrix-divided-by-vector", HEAD + "S = S / k\n" + OUT, 6, 5, "cannot divide [K, V] and [K]",
         "diag(x) @ S"),
    case("diag-outside-matmul", HEAD + "let d = diag(k)\n" + TAIL, 6, 9, "diag(x) can only be a factor of '@'",
         ["diag(x) @ S", "S @ diag(x)"]),
    case("diag-times-matrix", HEAD + "S = diag(k) * S\n" + OUT, 6, 5, "diag(x) can only be a factor of '@'"),
    case("diag-of-the-wrong-dim", HEAD + "S = diag(v) @ S\n" + OUT, 6, 5,
         "cannot multiply diag[V] @ [K, V]", "x must be [K]"),
    case("two-diags", HEAD + UPDATE + "output o = diag(k) @ diag(k)\n", 7, 12, "cannot multiply two diag() factors",
         "diag(x * y)"),
    case("matmul-inner-dims", HEAD + UPDATE + "output o = v @ S\n", 7, 12,
         "cannot multiply [V] @ [K, V]: the inner dims do not match", "x @ S contracts x with the first axis"),
    case("matmul-with-a-scalar", HEAD + UPDATE + "output o = g @ S\n", 7, 12,
         "'@' needs vectors or matrices, not a scalar and [K, V]", "use '*'"),
    case("vector-exponent", HEAD + UPDATE + "output o = q @ S ** k\n", 7, 21, "the exponent of '**' must be a scalar, not [K]"),
    case("dot-of-different-dims", HEAD + "let m = dot(k, v)\n" + TAIL, 6, 16,
         "dot() needs two vectors of the same dim; got [K], [V]"),
    case("dot-of-a-matrix", HEAD + "let m = dot(S, k)\n" + TAIL, 6, 13, "dot() takes two vectors; got [K, V], [K]"),
    case("outer-of-a-matrix", HEAD + "let m = outer(S, v)\n" + TAIL, 6, 15,
         "outer() takes two vectors; got [K, V], [V]"),
    case("softmax-of-a-scalar", HEAD + "let m = softmax(g)\n" + TAIL, 6, 17, "softmax() takes a vector; got a scalar"),
    case("max-of-different-dims", HEAD + UPDATE + "output o = max(q, v)\n", 7, 19,
         "max() needs arguments of the same shape or a scalar; got [K], [V]"),
    case("keep-topk-non-constant-count", HEAD + "let m = keep_topk(k, g)\n" + TAIL, 6, 22,
         "the count of keep_topk must be known before the sequence runs"),
    case("keep-topk-count-from-a-call", HEAD + "let m = keep_topk(k, exp(1))\n" + TAIL, 6, 22,
         "the count of keep_topk must be a number, a const or a dim"),
    case("keep-topk-non-integer-count", HEAD + "let m = keep_topk(k, 2.5)\n" + TAIL, 6, 22,
         "the count of keep_topk must be a positive whole number, not 2.5"),
    case("keep-topk-infinite-count", HEAD + "let m = keep_topk(k, 1 / 0)\n" + TAIL, 6, 22,
         "positive whole number, not inf"),
    case("keep-topk-of-a-matrix", HEAD + "let m = keep_topk(S, 2)\n" + TAIL, 6, 19,
         "keep_topk() takes a vector as its first argument"),

    # ------------------------------------------------------------ loops and indexing
    case("index-outside-a-loop", STEPPED + "let a = k[j]\n" + TAIL, 6, 11,
         "'j' is not a loop variable", "for j in NH:"),
    case("index-by-a-non-loop-name", STEPPED + "for j in NH:\n    let a = k[NH]\n" + TAIL, 7, 15,
         "'NH' is not a loop variable"),
    case("index-a-non-stepped-input", STEPPED + "for j in NH:\n    let a = q[j]\n" + TAIL, 7, 13,
         "'q' cannot be indexed by 'j': only an input whose leading dim is NH can be", "input q[NH, ...]"),
    case("index-a-state", STEPPED + "for j in NH:\n    let a = S[j]\n" + TAIL, 7, 13, "'S' cannot be indexed by 'j'"),
    case("bare-loop-variable", STEPPED + "for j in NH:\n    let a = j\n" + TAIL, 7, 13,
         "loop variable 'j' can only index an input", "k[j]"),
    case("for-over-an-input", STEPPED + "for j in g:\n    let a = g\n" + TAIL, 6, 10,
         "'g' is not a dim; a 'for' loop runs over a dim", "'g' is an input"),
    case("for-over-an-unknown-name", STEPPED + "for j in Q:\n    let a = g\n" + TAIL, 6, 10, "'Q' is not a dim",
         "dims ..., Q"),
    case("output-inside-a-for", STEPPED + "for j in NH:\n    output a = k[j]\n" + TAIL, 7, 5,
         "an output cannot be inside a 'for' block", "after it"),
    case("let-of-a-block-used-after-it", STEPPED + "for j in NH:\n    let a = k[j]\nlet b = a * g\n" + TAIL,
         8, 9, ["'a' is not visible here", "'for' block of line 6"]),

    # ------------------------------------------------------------ declarations
    case("declaration-after-statements", HEAD + UPDATE + "input z\n" + OUT, 7, 1,
         "declarations come before statements", "move this declaration above"),
    case("unknown-dim-in-shape", "rule r\ndims K, V\nstate S[K, W]\ninput q[K], k[K], v[V]\n" + TAIL, 3, 12,
         "unknown dim 'W' in the shape of state 'S'", "dims W"),
    case("input-as-dim-in-shape", "rule r\ndims K\ninput q[K], w[q]\n", 3, 15, "unknown dim 'q' in the shape of input 'w'",
         "'q' is an input, not a dim"),
    case("rank-above-two", "rule r\ndims K, V\nstate S[K, V]\ninput q[K], k[K], v[V], x[K, V, K]\n" + TAIL, 4, 25,
         "input 'x' has rank 3; ranks 0 to 2 are supported"),
    case("dim-in-no-input", "rule r\ndims K, V, M\nstate S[K, V]\ninput q[K], k[K], v[V]\n" + TAIL, 2, 12,
         "dim 'M' is in no input or param shape", "use it in the shape of an input or param"),
    case("state-never-updated", "rule r\ndims K, V\nstate S[K, V], Z[K]\ninput q[K], k[K], v[V]\n" + TAIL, 3, 16,
         "state 'Z' is never updated", "Z = ..."),
    case("no-output", HEAD + UPDATE + "\n", 6, 1, "rule 'r' has no output", "output o ="),
    case("no-input", "rule r\ndims K, V\nstate S[K, V]\nparam p[K], w[V]\nS = S + outer(p, w)\noutput o = p @ S\n",
         1, 6, "rule 'r' has no input", "input q[K]"),
]


def shown(line: str) -> str:
    return "".join(c if c.isprintable() or c == "\t" else "?" for c in line)


@pytest.mark.parametrize("text, line, column, message, hint", CASES)
def test_malformed_rule(text, line, column, message, hint):
    with pytest.raises(SpecError) as info:
        recdsl.compile(text)
    err = info.value
    assert (err.line, err.column) == (line, column), str(err)
    for words in message:
        assert words in err.message, str(err)
    for words in hint:
        assert words in err.hint, str(err)
    rendered = str(err)
    assert rendered.startswith(f"<rule>:{line}:{column}: error: {err.message}")
    for leak in ("lark", "Traceback", "sympy", "Token"):
        assert leak.lower() not in rendered.lower() if leak != "Token" else leak not in rendered
    source_line = text.split("\n")[line - 1] if text else ""
    assert err.source_line == source_line
    lines = rendered.split("\n")
    if source_line:
        # the offending line, then a caret under the column (tabs kept so it lines up)
        assert lines[1] == "    " + shown(source_line)
        caret_at = 4 + column - 1
        assert lines[2][caret_at] == "^" and lines[2][:caret_at].strip(" \t") == ""
        assert lines[2][:caret_at].count("\t") == source_line[:column - 1].count("\t")
    if hint:
        assert lines[-1] == f"hint: {err.hint}"


def test_the_corpus_is_large_and_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) >= 35 and len(set(ids)) == len(ids)


def test_load_puts_the_file_name_in_the_message(tmp_path):
    path = tmp_path / "broken.rec"
    path.write_text(HEAD + "S = k * S\n" + OUT)
    with pytest.raises(SpecError) as info:
        recdsl.load(path)
    assert info.value.filename == str(path)
    assert str(info.value).startswith(f"{path}:6:5: error: cannot multiply [K] and [K, V]")
    assert "    S = k * S\n        ^^^^^" in str(info.value)


def test_load_of_a_missing_or_binary_file(tmp_path):
    with pytest.raises(recdsl.RecdslError) as info:
        recdsl.load(tmp_path / "absent.rec")
    assert "cannot read rule file" in str(info.value) and "absent.rec" in str(info.value)
    binary = tmp_path / "binary.rec"
    binary.write_bytes(b"rule r\n\xff\xfe\n")
    with pytest.raises(recdsl.RecdslError) as info:
        recdsl.load(binary)
    assert "is not UTF-8 text" in str(info.value)


def test_caret_lines_up_under_a_tab_indented_line():
    text = STEPPED + "for j in NH:\n\tlet a = kk[j]\n" + TAIL
    with pytest.raises(SpecError) as info:
        recdsl.compile(text)
    assert (info.value.line, info.value.column) == (7, 10)
    assert "\n    \tlet a = kk[j]\n    \t        ^^\n" in str(info.value)


def test_a_long_line_is_cut_around_the_error():
    text = HEAD + "let a = " + " + ".join(["g"] * 40) + " + zz + " + " + ".join(["g"] * 40) + "\n" + TAIL
    with pytest.raises(SpecError) as info:
        recdsl.compile(text)
    err = info.value
    assert err.message == "unknown name 'zz'" and err.column == 8 + 40 * 4 + 1
    _, code, caret = str(err).split("\n")[:3]
    assert code.startswith("    ...") and code.endswith("...") and len(code) < 120
    assert code[caret.index("^"):caret.index("^") + 2] == "zz"
