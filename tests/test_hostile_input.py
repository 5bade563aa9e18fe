"""A rule text is data, never code. Hostile names and payloads either fail with a clean
SpecError or compile and run correctly; nothing is ever executed, however the text is
shaped (huge, deeply nested, random)."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recdsl
from recdsl.errors import RecdslError, SpecError
from recdsl.grammar.parser import MAX_DEPTH

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HEAD = ("rule r\n"
        "dims K, V\n"
        "state S[K, V]\n"
        "input q[K], k[K], v[V]\n"
        "input g\n")
TAIL = "S = S + outer(k, v)\noutput o = q @ S\n"
MB = 1 << 20

# A file that a payload would create if any part of a rule text were ever executed.
MARKER = Path("/tmp") / f"recdsl-pwned-{uuid.uuid4().hex}"
TOUCH = f"touch {MARKER}"


@pytest.fixture(autouse=True)
def nothing_is_executed():
    assert not MARKER.exists()
    yield
    assert not MARKER.exists(), "a rule text was executed"


def assert_clean(err: RecdslError, source: str = ""):
    """A message for a person: a position, no internals of the libraries underneath (unless
    the rule text itself says them)."""
    text = str(err)
    for leak in ("Traceback", "lark", "sympy", "Token(", "RecursionError", "File \""):
        assert leak in source or leak not in text, text
    if isinstance(err, SpecError):
        assert text.startswith(f"{err.filename}:{err.line}:{err.column}: error: ")
        assert err.line >= 1 and err.column >= 1


def compile_or_clean_error(text, **consts):
    try:
        return recdsl.compile(text, **consts)
    except RecdslError as err:
        assert_clean(err, text)
        return err


# ---------------------------------------------------------------- hostile names run correctly

HOSTILE_NAMES = ["__import__", "os", "eval", "exec", "__class__", "__builtins__", "__init__",
                 "__dict__", "globals", "open", "print", "sys", "subprocess", "torch", "tl",
                 "triton", "math", "None", "True", "lambda", "import", "def", "return", "class",
                 "B", "T", "H", "_", "__", "o_0", "x" * 5000]
# The names most likely to clash in generated code; every backend runs these (the naive
# loop runs them all), kernels being slow to generate and interpret on the CPU.
CODEGEN_CLASHES = {"__import__", "__class__", "os", "torch", "tl", "triton", "lambda", "None", "B",
                   "x" * 5000}
ROLES = ["rule", "dim", "state", "input", "let", "output"]
TEMPLATE = ("rule {rule}\n"
            "dims {dim}, V\n"
            "state {state}[{dim}, V]\n"
            "input q[{dim}], {input}[{dim}], v[V]\n"
            "let {let} = 2 * {input}\n"
            "{state} = {state} + outer({let}, v)\n"
            "output {output} = q @ {state}\n")
DEFAULTS = {"rule": "r", "dim": "K", "state": "S", "input": "k", "let": "kk", "output": "o"}


def reference(q, k, v):
    """Linear attention with doubled keys, written out in torch: S_t = sum_{s<=t} 2 k_s v_s^T."""
    states = torch.cumsum(2 * k.unsqueeze(-1) * v.unsqueeze(-2), dim=1)
    return torch.einsum("bthk,bthkv->bthv", q, states), states[:, -1]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=lambda n: n if len(n) < 20 else f"long{len(n)}")
def test_hostile_name_compiles_and_runs_correctly(name, role):
    names = dict(DEFAULTS, **{role: name})
    rule = recdsl.compile(TEMPLATE.format(**names))
    assert rule.name == names["rule"] and rule.dims == (names["dim"], "V")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 2, n, generator=gen, dtype=torch.float64) for n in (4, 4, 5))
    expected_o, expected_s = reference(q, k, v)
    backends = rule.backends() if name in CODEGEN_CLASHES else ["naive"]
    assert "naive" in backends
    for backend in backends:
        # passed by name, so a name such as 'lambda' or '__class__' goes through **kwargs
        out, final = rule(output_final_state=True, backend=backend, **{"q": q, names["input"]: k, "v": v})
        # the naive loop runs in float64 here; kernels accumulate in float32
        tol = 1e-10 if backend == "naive" else 1e-5
        torch.testing.assert_close(out, expected_o, rtol=tol, atol=tol)
        torch.testing.assert_close(final, expected_s, rtol=tol, atol=tol)


# ---------------------------------------------------------------- payloads are refused

PAYLOADS = [
    # (text, line, column, words in the message)
    (HEAD + f'let x = __import__("os").system("{TOUCH}")\n' + TAIL, 6, 20, "unexpected character '\"'"),
    (HEAD + f"let x = __import__('os').system('{TOUCH}')\n" + TAIL, 6, 20, "unexpected character '''"),
    (HEAD + "let x = __import__(os)\n" + TAIL, 6, 9, "unknown function '__import__'"),
    (HEAD + "let x = os.system\n" + TAIL, 6, 11, "unexpected character '.'"),
    (HEAD + f"let x = eval(\"open('{MARKER}', 'w')\")\n" + TAIL, 6, 14, "unexpected character '\"'"),
    (HEAD + f"output o = exec(\"import os; os.system('{TOUCH}')\")\n" + TAIL, 6, 17,
     "unexpected character '\"'"),
    (HEAD + "let x = g; import os\n" + TAIL, 6, 10, "unexpected character ';'"),
    (HEAD + "let x = __class__.__bases__[0].__subclasses__()\n" + TAIL, 6, 18, "unexpected character '.'"),
    (f"rule ${{{TOUCH}}}\n" + HEAD[7:] + TAIL, 1, 6, "unexpected character '$'"),
    (f"rule $({TOUCH})\n" + HEAD[7:] + TAIL, 1, 6, "unexpected character '$'"),
    (f"rule `{TOUCH}`\n" + HEAD[7:] + TAIL, 1, 6, "unexpected character '`'"),
    ("rule {__import__('os').system('" + TOUCH + "')}\n" + HEAD[7:] + TAIL, 1, 6, "unexpected character '{'"),
    (HEAD + 'let f"{x}" = g\n' + TAIL, 6, 6, "unexpected character '\"'"),
    (HEAD + "let x = {g}\n" + TAIL, 6, 9, "unexpected character '{'"),
    (HEAD + "let x = g \\\\ g\n" + TAIL, 6, 11, "unexpected character '\\'"),
    (HEAD + "let x = '\\'' + g\n" + TAIL, 6, 9, "unexpected character '''"),
    (HEAD + "let x\x00y = g\n" + TAIL, 6, 6, "unexpected character U+0000"),
    (HEAD + "let x = g\x1b[2J\n" + TAIL, 6, 10, "unexpected character U+001B"),
    (HEAD + "let x\ny = g\n" + TAIL, 6, 6, ["unexpected end of line", "expected '='"]),
    (HEAD + "let x = g\n%s\n" % ("\u202e" + "g = x"), 7, 1, "unexpected character U+202E"),
]


@pytest.mark.parametrize("text, line, column, words", PAYLOADS, ids=range(len(PAYLOADS)))
def test_payload_is_a_clean_spec_error(text, line, column, words):
    with pytest.raises(SpecError) as info:
        recdsl.compile(text)
    err = info.value
    assert_clean(err, text)
    assert (err.line, err.column) == (line, column), str(err)
    for w in [words] if isinstance(words, str) else words:
        assert w in err.message, str(err)
    # the message shows the line without raw control characters
    assert "\x00" not in str(err) and "\x1b" not in str(err)


def test_payload_in_a_comment_is_only_a_comment():
    text = (f"# $({TOUCH}) `{TOUCH}` {{__import__('os').system('{TOUCH}')}}\n"
            + HEAD + f"let x = 2 * k   # \"; __import__('os').system('{TOUCH}'); \"\n"
            + "S = S + outer(x, v)\noutput o = q @ S  # ${TOUCH}\n")
    rule = recdsl.compile(text)
    q, k, v, g = torch.randn(1, 2, 1, 3), torch.randn(1, 2, 1, 3), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1)
    out, _ = rule(q, k, v, g)
    torch.testing.assert_close(out, reference(q, k, v)[0])


def test_hostile_file_name_is_only_shown(tmp_path):
    # a file name cannot hold '/': the payload touches a relative name
    touch = f"touch {MARKER.name}"
    path = tmp_path / f"$({touch}); `{touch}`.rec"
    path.write_text(HEAD + "S = k * S\noutput o = q @ S\n")
    with pytest.raises(SpecError) as info:
        recdsl.load(path)
    assert str(info.value).startswith(f"{path}:6:5: error: cannot multiply")
    assert not (tmp_path / MARKER.name).exists() and not (Path.cwd() / MARKER.name).exists()


def test_hostile_const_override_names():
    text = (EXAMPLES / "raven.rec").read_text()
    for name in ("__class__", "__import__", "topk.__class__"):
        with pytest.raises(RecdslError) as info:
            recdsl.compile(text, **{name: 1})
        assert f"no const '{name}'" in str(info.value)


# ---------------------------------------------------------------- size and depth

def timed_compile(text, limit=60.0):
    start = time.perf_counter()
    result = compile_or_clean_error(text)
    elapsed = time.perf_counter() - start
    assert elapsed < limit, f"took {elapsed:.1f}s"
    return result


def test_one_megabyte_rule_compiles():
    # about 20,000 statements: parsing and checking stay linear
    lets = "".join(f"let {'a' * 40}{i:06d} = g\n" for i in range(MB // 55))
    assert len(lets) > MB * 0.99
    rule = timed_compile(HEAD + lets + TAIL)
    assert isinstance(rule, recdsl.Rule) and rule.name == "r"


@pytest.mark.parametrize("what", ["comment", "name", "blank lines", "garbage", "digits", "unclosed"])
def test_one_megabyte_of_one_thing(what):
    text = {
        "comment": HEAD + "# " + "x" * MB + "\n" + TAIL,
        "name": HEAD + "let " + "a" * MB + " = g\n" + TAIL,
        "blank lines": HEAD + "\n \t\n" * (MB // 4) + TAIL,
        "garbage": HEAD + "$" * MB,
        "digits": HEAD + "let z = " + "9" * MB + "\n" + TAIL,
        "unclosed": HEAD + "let z = " + "(" * (MB // 8) + "\n" + TAIL,
    }[what]
    result = timed_compile(text)
    if what in ("comment", "name", "blank lines"):
        assert isinstance(result, recdsl.Rule)
    else:
        assert isinstance(result, SpecError)
        assert len(str(result)) < 1000  # the offending line is cut, not printed whole
        expected = {"garbage": (6, 1, "unexpected character '$'"),
                    "digits": (6, 9, "is too large"),
                    "unclosed": (6, 9 + MB // 8 - 1, "'(' is never closed")}[what]
        assert (result.line, result.column) == expected[:2] and expected[2] in result.message


def nest(kind, depth):
    return {
        "parentheses": "(" * depth + "g" + ")" * depth,
        "negations": "-" * depth + "g",
        "negated parentheses": "-(" * depth + "g" + ")" * depth,
        "calls": "exp(" * depth + "g" + ")" * depth,
        "sum": " + ".join(["g"] * (depth + 1)),
        "powers": " ** ".join(["g"] * (depth + 1)),
    }[kind]


KINDS = ["parentheses", "negations", "negated parentheses", "calls", "sum", "powers"]


@pytest.mark.parametrize("kind", KINDS)
def test_nesting_at_the_limit_works(kind):
    rule = timed_compile(HEAD + f"let z = {nest(kind, MAX_DEPTH - 2)}\n" + TAIL)
    assert isinstance(rule, recdsl.Rule), str(rule)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5_000])
@pytest.mark.parametrize("kind", KINDS[1:])
def test_deep_nesting_is_a_clean_error(kind, depth):
    err = timed_compile(HEAD + f"let z = {nest(kind, depth)}\n" + TAIL)
    assert isinstance(err, SpecError), err
    assert (err.line, err.column) == (6, 9)
    assert err.message == f"expression nested too deeply (more than {MAX_DEPTH} levels)"
    assert "let" in err.hint


def test_redundant_parentheses_do_not_count_as_nesting():
    rule = timed_compile(HEAD + f"let z = {nest('parentheses', 20_000)}\n" + TAIL)
    assert isinstance(rule, recdsl.Rule)


def test_deeply_nested_for_blocks_are_a_clean_error():
    depth = MAX_DEPTH + 5
    text = ("rule r\ndims K, V, NH\nstate S[K, V]\ninput q[K], k[NH, K], v[V]\n"
            + "".join("    " * i + f"for j{i} in NH:\n" for i in range(depth))
            + "    " * depth + "S = S + outer(k[j0], v)\noutput o = q @ S\n")
    err = timed_compile(text)
    assert isinstance(err, SpecError) and "'for' blocks nested more than" in err.message


@pytest.mark.parametrize("literal, ok", [
    ("1" + "0" * 308, True), ("1" + "0" * 309, False), ("1e308", True), ("1e309", False),
    ("1e999999999999", False), ("0." + "0" * 400 + "1", True), ("1e-999999999999", True),
])
def test_huge_number_literals(literal, ok):
    result = timed_compile(HEAD + f"let z = {literal} * g\n" + TAIL)
    if ok:
        assert isinstance(result, recdsl.Rule)
    else:
        assert isinstance(result, SpecError) and "is too large" in result.message
        assert (result.line, result.column) == (6, 9)


# ---------------------------------------------------------------- random text

def only_clean_errors(text):
    result = compile_or_clean_error(text)
    assert isinstance(result, (recdsl.Rule, RecdslError))


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.text(max_size=300))
def test_random_text(text):
    only_clean_errors(text)


@FUZZ
@given(st.text(max_size=200))
def test_random_text_after_a_valid_header(text):
    only_clean_errors(HEAD + text)


TOKENS = ["rule", "dims", "state", "input", "param", "const", "let", "for", "in", "output",
          "r", "K", "V", "NH", "S", "q", "k", "v", "g", "j", "x", "exp", "outer", "diag", "dot",
          "keep_topk", "softmax", "sum", "max", "l2norm", "0", "1", "2.5", "1e-6", "1e400",
          "+", "-", "*", "/", "@", "**", "=", ",", ":", "(", ")", "[", "]", "#", "\\",
          " ", "  ", "\t", "\n", "\n    ", "\n\t", "\r\n", "\n\n", "$", "\x00", "é"]


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=80))
def test_random_token_soup(tokens):
    only_clean_errors(HEAD + " ".join(tokens))
    only_clean_errors("".join(tokens))


EXAMPLE_TEXTS = [p.read_text() for p in sorted(EXAMPLES.glob("*.rec"))]


@FUZZ
@given(st.sampled_from(EXAMPLE_TEXTS), st.data())
def test_mutated_examples(text, data):
    """Delete, duplicate or replace a slice of a canonical rule."""
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, min(len(text), start + 12)))
    how = data.draw(st.sampled_from(["delete", "duplicate", "replace"]))
    if how == "delete":
        mutated = text[:start] + text[end:]
    elif how == "duplicate":
        mutated = text[:end] + text[start:end] + text[end:]
    else:
        mutated = text[:start] + data.draw(st.sampled_from(TOKENS)) + text[end:]
    only_clean_errors(mutated)


# Random but well-formed statements over a fixed header: they reach deep into the checker
# (shapes, diag, keep_topk counts, indexing), which must only ever answer with a SpecError.
FUZZ_HEAD = ("rule r\ndims K, V, NH\nstate S[K, V], n[K], m\n"
             "input q[K], k[K], v[V], ks[NH, K], g\nparam A\nconst c = 3\n")
ATOMS = ["q", "k", "v", "g", "S", "n", "m", "A", "c", "K", "V", "NH", "1", "2.5", "0", "ks[j]", "j", "zz"]
FUNCTIONS = ["exp", "log", "abs", "max", "min", "dot", "sum", "norm", "l2norm", "outer", "diag",
             "softmax", "keep_topk", "nope"]
EXPRESSIONS = st.recursive(st.sampled_from(ATOMS), lambda inner: st.one_of(
    st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "@", "**"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
    inner.map(lambda e: f"-{e}"),
    st.tuples(st.sampled_from(FUNCTIONS), st.lists(inner, max_size=3)).map(lambda t: f"{t[0]}({', '.join(t[1])})"),
), max_leaves=8)
STATEMENTS = st.one_of(
    EXPRESSIONS.map(lambda e: f"let z = {e}"),
    st.tuples(st.sampled_from(["S", "n", "m", "q", "zz"]), EXPRESSIONS).map(lambda t: f"{t[0]} = {t[1]}"),
    EXPRESSIONS.map(lambda e: f"for j in NH:\n    let w = {e}\n    m = m + sum(w)"),
)


@FUZZ
@given(st.lists(STATEMENTS, min_size=1, max_size=3), EXPRESSIONS)
def test_random_well_formed_statements(statements, output):
    body = "\n".join(s.replace("let z", f"let z{i}") for i, s in enumerate(statements))
    text = FUZZ_HEAD + body + f"\nS = S + outer(k, v)\nn = n + k\nm = m + 1\noutput o = {output}\n"
    result = compile_or_clean_error(text)
    if isinstance(result, recdsl.Rule):
        assert [o.name for o in result.outputs] == ["o"]
    else:
        assert isinstance(result, SpecError) and 7 <= result.line <= len(text.split("\n")), str(result)
