"""Text -> syntax tree (``recdsl.grammar.ast``), with positions on every node.

lark does the parsing (LALR, tables cached); this module turns lark's tree into our own
dataclasses and every lark exception into a positioned ``SpecError``.
"""
from __future__ import annotations

import functools
from pathlib import Path

import lark
from lark.indenter import Indenter
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from ..errors import SpecError
from . import ast

KEYWORDS = ("rule", "dims", "state", "input", "param", "const", "let", "for", "in", "output")

# What to call a terminal in an error message.
_TERMINAL_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "_NL": "the end of the line", "$END": "the end of the file",
    "_INDENT": "an indented block", "_DEDENT": "the end of the indented block",
}


class _IndentationError(Exception):
    def __init__(self, token, message):
        self.token, self.message = token, message


class _RuleIndenter(Indenter):
    NL_type = "_NL"
    OPEN_PAREN_types = ["LPAR", "LSQB"]
    CLOSE_PAREN_types = ["RPAR", "RSQB"]
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = 4

    def handle_NL(self, token):
        if self.paren_level > 0:
            return
        yield token
        indent_str = token.rsplit("\n", 1)[1]
        indent = indent_str.count(" ") + indent_str.count("\t") * self.tab_len
        if indent > self.indent_level[-1]:
            self.indent_level.append(indent)
            yield lark.Token.new_borrow_pos(self.INDENT_type, indent_str, token)
            return
        while indent < self.indent_level[-1]:
            self.indent_level.pop()
            yield lark.Token.new_borrow_pos(self.DEDENT_type, indent_str, token)
        if indent != self.indent_level[-1]:
            raise _IndentationError(token, f"this line is indented by {indent} but no enclosing "
                                    f"block is indented by that much")


@functools.lru_cache(maxsize=1)
def _lark() -> lark.Lark:
    grammar = (Path(__file__).parent / "rec.lark").read_text()
    return lark.Lark(grammar, parser="lalr", postlex=_RuleIndenter(), propagate_positions=True,
                     maybe_placeholders=False, cache=True)


def _pos(tok_or_meta, length=None) -> ast.Pos:
    if isinstance(tok_or_meta, lark.Token):
        return ast.Pos(tok_or_meta.line, tok_or_meta.column, length or len(str(tok_or_meta)) or 1)
    meta = tok_or_meta
    span = 1
    if getattr(meta, "end_line", None) == meta.line:
        span = meta.end_column - meta.column
    return ast.Pos(meta.line, meta.column, length or span)


@lark.v_args(meta=True)
class _ToAst(lark.Transformer):
    def __init__(self, source, filename):
        super().__init__()
        self.source, self.filename = source, filename

    def NAME(self, tok):
        # lark's contextual lexer reads a keyword as a NAME where only a name can stand.
        if str(tok) in KEYWORDS:
            raise SpecError(f"'{tok}' is a keyword and cannot be used as a name", line=tok.line,
                            column=tok.column, source=self.source, filename=self.filename,
                            length=len(tok), hint="rename it; the keywords are " + ", ".join(KEYWORDS))
        return tok

    def start(self, meta, children):
        name_tok = children[0]
        return ast.RuleFile(str(name_tok), _pos(name_tok), list(children[1:]), self.source, self.filename)

    def rule_line(self, meta, children):
        return children[0]

    # declarations
    def dims_decl(self, meta, children):
        return ast.DimsDecl([str(t) for t in children], [_pos(t) for t in children], _pos(meta))

    def var(self, meta, children):
        name, *dims = children
        return ast.VarDecl(str(name), [str(d) for d in dims], _pos(name), [_pos(d) for d in dims])

    def _vars(kind):
        def build(self, meta, children):
            return ast.VarsDecl(kind, list(children), _pos(meta))
        return build

    state_decl, input_decl, param_decl = _vars("state"), _vars("input"), _vars("param")

    def signed_number(self, meta, children):
        text = "".join(str(c) for c in children)
        return text, _pos(meta)

    def const_decl(self, meta, children):
        name, (text, value_pos) = children
        return ast.ConstDecl(str(name), float(text), text, _pos(name), value_pos)

    # statements
    def let_stmt(self, meta, children):
        return ast.Let(str(children[0]), children[1], _pos(children[0]))

    def update_stmt(self, meta, children):
        return ast.Update(str(children[0]), children[1], _pos(children[0]))

    def output_stmt(self, meta, children):
        return ast.Output(str(children[0]), children[1], _pos(meta, 6), _pos(children[0]))

    def for_block(self, meta, children):
        var, dim, *body = children
        return ast.For(str(var), str(dim), body, _pos(meta, 3), _pos(var), _pos(dim))

    # expressions
    def number(self, meta, children):
        tok = children[0]
        return ast.Num(float(tok), str(tok), _pos(tok))

    def name(self, meta, children):
        return ast.Name(str(children[0]), _pos(children[0]))

    def call(self, meta, children):
        fn, *args = children
        return ast.Call(str(fn), [a for a in args if a is not None], _pos(meta))

    def index(self, meta, children):
        target, idx = children
        return ast.Index(ast.Name(str(target), _pos(target)), ast.Name(str(idx), _pos(idx)), _pos(meta))

    def binop(self, meta, children):
        left, op, right = children
        return ast.BinOp(str(op), left, right, _pos(op), _pos(meta))

    def neg(self, meta, children):
        return ast.Neg(children[1], _pos(meta))

    def pos(self, meta, children):
        return children[1]


def _describe_expected(expected) -> str:
    parser = _lark()
    words = []
    for name in sorted(expected):
        if name in _TERMINAL_WORDS:
            words.append(_TERMINAL_WORDS[name])
            continue
        try:
            pattern = parser.get_terminal(name).pattern
        except KeyError:
            continue
        if pattern.type == "str":
            words.append(f"'{pattern.value}'")
    words = sorted(set(words))
    if not words:
        return ""
    if len(words) > 6:
        words = words[:6] + ["..."]
    return "expected " + (words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1])


def _token_words(tok: lark.Token) -> str:
    if tok.type == "$END":
        return "end of file"
    if tok.type == "_NL":
        return "end of line"
    if tok.type == "_DEDENT":
        return "end of the indented block"
    return f"'{tok}'"


def _after_block_header(err: UnexpectedToken) -> bool:
    """True when the parser has just read 'for j in N:' and its newline (lark then reports
    the newline as what it expected, not the indentation it really wants)."""
    try:
        stack = err.interactive_parser.parser_state.value_stack
    except AttributeError:
        return False
    return len(stack) >= 2 and getattr(stack[-2], "type", None) == "COLON"


def _syntax_error(err: UnexpectedInput, source: str, filename: str) -> SpecError:
    line, column = max(1, getattr(err, "line", 1) or 1), max(1, getattr(err, "column", 1) or 1)
    if isinstance(err, UnexpectedCharacters):
        char = source.splitlines()[line - 1][column - 1] if line <= len(source.splitlines()) else "?"
        return SpecError(f"unexpected character '{char}'", line=line, column=column, source=source,
                         filename=filename, hint="names are letters, digits and '_'; operators are "
                         "+ - * / @ **; comments start with '#'")
    if isinstance(err, UnexpectedToken):
        tok = err.token
        if tok.type in ("_INDENT", "_DEDENT"):
            # These borrow the position of the newline before them: point at the line itself.
            line, column = tok.line + 1, len(str(tok)) + 1
        expected = set(err.expected)
        what = _token_words(tok)
        hint = ""
        if str(tok) in KEYWORDS and "NAME" in expected:
            message = f"'{tok}' is a keyword and cannot be used as a name"
            hint = "rename it; the keywords are " + ", ".join(KEYWORDS)
        elif tok.type == "_INDENT":
            message = "unexpected indentation"
            hint = "only the body of a 'for' block is indented"
        elif "_INDENT" in expected or _after_block_header(err):
            message = f"expected an indented block, found {what}"
            hint = "indent the body of 'for j in N:' (e.g. by four spaces)"
        elif line == 1 and "RULE" in expected:
            message = f"a rule file must start with 'rule NAME', found {what}"
            hint = "write e.g. 'rule my_rule' on the first line"
        else:
            message = f"unexpected {what}"
            expected_words = _describe_expected(expected)
            if expected_words:
                message += f"; {expected_words}"
        return SpecError(message, line=line, column=column, source=source, filename=filename,
                         hint=hint, length=len(str(tok)) if tok.type not in ("_NL", "$END", "_INDENT", "_DEDENT") else 1)
    return SpecError("syntax error", line=line, column=column, source=source, filename=filename)


def parse(source: str, filename: str = "<rule>") -> ast.RuleFile:
    """Parse rule text into a ``RuleFile``; raises ``SpecError`` on any syntax error."""
    if not isinstance(source, str):
        raise TypeError("rule text must be a str")
    text = source if source.endswith("\n") else source + "\n"
    try:
        tree = _lark().parse(text)
    except _IndentationError as err:
        tok = err.token
        line = tok.line + str(tok).count("\n")
        raise SpecError(err.message, line=line, column=1, source=source, filename=filename,
                        hint="indent every line of a block by the same amount") from None
    except UnexpectedInput as err:
        raise _syntax_error(err, source, filename) from None
    try:
        return _ToAst(source, filename).transform(tree)
    except VisitError as err:  # never show lark's wrapper: re-raise what went wrong inside
        raise err.orig_exc from None
