"""Text -> syntax tree (``recdsl.grammar.ast``), with positions on every node.

lark does the parsing (LALR, tables cached); this module turns lark's tree into our own
dataclasses and every lark exception into a positioned ``SpecError``.
"""
from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import lark
from lark.indenter import Indenter
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from ..errors import SpecError, describe_char, source_lines
from . import ast

KEYWORDS = ("rule", "dims", "state", "input", "param", "const", "let", "for", "in", "output")
_KEYWORDS_HINT = "rename it; the keywords are " + ", ".join(KEYWORDS)

# How deep expressions and 'for' blocks may nest. Every later stage walks the tree
# recursively; this bound keeps them far from Python's recursion limit. A real rule nests
# about ten levels.
MAX_DEPTH = 100

# What to call a terminal in an error message.
_TERMINAL_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "_NL": "the end of the line", "$END": "the end of the file",
    "_INDENT": "an indented block", "_DEDENT": "the end of the indented block",
}


class _IndentationError(Exception):
    def __init__(self, line, column, message):
        self.line, self.column, self.message = line, column, message


class _KeywordAsName(Exception):
    """A keyword where a name stands: lark's contextual lexer reads it as a NAME there."""

    def __init__(self, token):
        self.token = token


class _RuleIndenter(Indenter):
    NL_type = "_NL"
    OPEN_PAREN_types = ["LPAR", "LSQB"]
    CLOSE_PAREN_types = ["RPAR", "RSQB"]
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = 4

    def process(self, stream):
        def checked(tokens):
            for token in tokens:
                if token.type == "NAME" and str(token) in KEYWORDS:
                    raise _KeywordAsName(token)
                yield token
        return super().process(checked(stream))

    def handle_NL(self, token):
        if self.paren_level > 0:
            return
        yield token
        indent_str = token.rsplit("\n", 1)[1]
        indent = indent_str.count(" ") + indent_str.count("\t") * self.tab_len
        # The newline token may span blank and comment lines: place the indentation tokens on
        # the line they indent, at its first non-blank character.
        line, column = token.line + str(token).count("\n"), len(indent_str) + 1

        def marker(kind):
            return lark.Token(kind, indent_str, token.start_pos, line, column, line, column, token.end_pos)

        if indent > self.indent_level[-1]:
            self.indent_level.append(indent)
            yield marker(self.INDENT_type)
            return
        while indent < self.indent_level[-1]:
            self.indent_level.pop()
            yield marker(self.DEDENT_type)
        if indent != self.indent_level[-1]:
            raise _IndentationError(line, column, f"this line is indented by {indent} but no "
                                    f"enclosing block is indented by that much")


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

    def _number(self, text, pos):
        value = float(text)
        if not math.isfinite(value):
            shown = text if len(text) <= 20 else text[:17] + "..."
            raise SpecError(f"the number {shown} is too large", line=pos.line, column=pos.column,
                            source=self.source, filename=self.filename, length=pos.length,
                            hint="numbers must fit in a 64-bit float (below about 1.8e308)")
        return value

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
        return ast.ConstDecl(str(name), self._number(text, value_pos), text, _pos(name), value_pos)

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
        return ast.Num(self._number(str(tok), _pos(tok)), str(tok), _pos(tok))

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


_OPERATORS = {"PLUS", "MINUS", "STAR", "SLASH", "AT", "POW"}
_BRACKETS = {"(": ")", "[": "]"}
# Trees that stand for a whole line (or block): the statement being parsed starts after them.
_STATEMENT_TREES = {"rule_line", "dims_decl", "state_decl", "input_decl", "param_decl",
                    "const_decl", "let_stmt", "update_stmt", "output_stmt", "for_block"}


def _describe_expected(expected) -> str:
    parser = _lark()
    words = []
    if _OPERATORS <= expected:  # after an operand: any binary operator may follow
        words.append("an operator")
        expected = expected - _OPERATORS
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


def _open_brackets(source: str, line: int, column: int) -> list:
    """The brackets still open before (line, column), innermost last, as (char, line, column).
    The language has no strings, so only comments need skipping."""
    stack = []
    for number, text in enumerate(source_lines(source)[:line], start=1):
        if number == line:
            text = text[: column - 1]
        for col, char in enumerate(text.split("#", 1)[0], start=1):
            if char in _BRACKETS:
                stack.append((char, number, col))
            elif char in ")]" and stack:
                stack.pop()
    return stack


def _parser_state(err: UnexpectedToken):
    """(expected terminals, values shifted so far) from the parser state at the error.

    lark's ``err.expected`` is what the contextual lexer would have read there, which always
    includes the newline; the parser's own table says what the grammar allows."""
    try:
        state = err.interactive_parser.parser_state
        expected = {t for t in err.interactive_parser.choices() if t.isupper()}
        return expected, list(state.value_stack)
    except AttributeError:
        return set(err.expected), []


def _statement_tokens(values) -> list:
    """The tokens of the statement being parsed (the shifted values after the last newline)."""
    out = []
    for value in reversed(values):
        if isinstance(value, lark.Token):
            if value.type in ("_NL", "_INDENT", "_DEDENT"):
                break
            out.append(value)
        elif isinstance(value, lark.Tree):
            if value.data in _STATEMENT_TREES or value.data.startswith(("__start_", "__for_block_")):
                break
            out.extend(value.scan_values(lambda v: isinstance(v, lark.Token)))
    return out[::-1]


_STATEMENT_START = re.compile(r"\s*(?:(?:rule|dims|state|input|param|const|let|output|for)\b"
                              r"|[A-Za-z_][A-Za-z0-9_]*\s*=)")


def _unclosed_bracket(source: str, filename: str, tok: lark.Token):
    """(an error for a bracket left open, or None; the brackets open before ``tok``).

    Inside brackets newlines are dropped (an expression may go on over several lines), so a
    missing ')' shows up only at the end of the file or on a later line that starts a new
    statement: point at the bracket itself."""
    lines = source_lines(source)
    at_end = _open_brackets(source, len(lines), len(lines[-1]) + 1)
    stack = at_end if tok.type == "$END" else _open_brackets(source, tok.line, tok.column)
    if not stack:
        return None, stack
    char, line, column = stack[-1]
    never_closed = stack[-1] in at_end
    if never_closed and (tok.type == "$END" or (line < tok.line <= len(lines)
                                                and _STATEMENT_START.match(lines[tok.line - 1]))):
        return SpecError(f"'{char}' is never closed", line=line, column=column, source=source,
                         filename=filename, hint=f"add the matching '{_BRACKETS[char]}'; inside "
                         f"brackets an expression may go on over several lines"), stack
    return None, stack


def _syntax_error(err: UnexpectedInput, source: str, filename: str) -> SpecError:
    line, column = max(1, getattr(err, "line", 1) or 1), max(1, getattr(err, "column", 1) or 1)

    def fail(message, hint="", length=1, at=None):
        at_line, at_column = at or (line, column)
        return SpecError(message, line=at_line, column=at_column, source=source, filename=filename,
                         hint=hint, length=length)

    if isinstance(err, UnexpectedCharacters):
        lines = source_lines(source)
        text = lines[line - 1] if line <= len(lines) else ""
        char = text[column - 1] if column <= len(text) else "\n"
        return fail(f"unexpected character {describe_char(char)}",
                    "names are ASCII letters, digits and '_'; operators are + - * / @ **; "
                    "comments start with '#'")
    if not isinstance(err, UnexpectedToken):
        return fail("syntax error")
    tok = err.token
    expected, values = _parser_state(err)
    statement = _statement_tokens(values)
    previous = statement[0] if statement else None
    text = str(tok)
    length = len(text) if tok.type not in ("_NL", "$END", "_INDENT", "_DEDENT") else 1
    what = _token_words(tok)

    unclosed, open_brackets = _unclosed_bracket(source, filename, tok)
    if unclosed is not None:
        return unclosed
    if open_brackets:
        expected.discard("_NL")
    else:
        expected -= {"RPAR", "RSQB"}
        if any(t.type == "EQUAL" for t in statement):
            expected.discard("COMMA")  # no ',' in an expression outside a call

    if tok.type == "_INDENT":
        return fail("unexpected indentation", "only the body of a 'for' block is indented")
    if "_INDENT" in expected:
        return fail(f"expected an indented block, found {what}",
                    "indent the body of 'for j in N:' (e.g. by four spaces)", length)
    if "RULE" in expected:
        return fail(f"a rule file must start with 'rule NAME', found {what}",
                    "write e.g. 'rule my_rule' on the first line", length)
    if (tok.type == "EQUAL" and previous is not None and len(statement) == 1
            and str(previous) in KEYWORDS):
        # 'output = ...', 'let = ...': the keyword was meant as a name, or the name is missing.
        return fail(f"'{previous}' is a keyword and cannot be used as a name",
                    f"write '{previous} NAME = ...'" if str(previous) in ("let", "output") else _KEYWORDS_HINT,
                    len(str(previous)), at=(previous.line, previous.column))
    message = f"unexpected {what}"
    expected_words = _describe_expected(expected)
    if expected_words:
        message += f"; {expected_words}"
    return fail(message, length=length)


def _keyword_error(tok: lark.Token, source: str, filename: str) -> SpecError:
    hint = _KEYWORDS_HINT
    if str(tok) == "rule":
        hint = "'rule NAME' is the first line of a file, and only the first"
    return SpecError(f"'{tok}' is a keyword and cannot be used as a name", line=tok.line,
                     column=tok.column, source=source, filename=filename, length=len(tok), hint=hint)


def _check_depth(tree: lark.Tree, source: str, filename: str) -> None:
    """Refuse trees deeper than MAX_DEPTH (walked with a stack: no recursion here)."""
    statements = ("let_stmt", "update_stmt", "output_stmt")
    stack = [(tree, 0, None)]
    while stack:
        node, depth, root = stack.pop()
        if depth > MAX_DEPTH:
            if root is None:
                message, at = f"'for' blocks nested more than {MAX_DEPTH} deep", node.meta
                hint = "nest fewer blocks"
            else:
                message, at = f"expression nested too deeply (more than {MAX_DEPTH} levels)", root.meta
                hint = "split it into several 'let' statements"
            raise SpecError(message, line=at.line, column=at.column, source=source,
                            filename=filename, hint=hint)
        for child in node.children:
            if isinstance(child, lark.Tree):
                inner = root
                if root is None and node.data in statements:
                    inner = child  # the whole right-hand side, where the message points
                # Only blocks and expressions nest; count from the statement on.
                step = 1 if root is not None or node.data in statements or child.data == "for_block" else 0
                stack.append((child, depth + step, inner))


def parse(source: str, filename: str = "<rule>") -> ast.RuleFile:
    """Parse rule text into a ``RuleFile``; raises ``SpecError`` on any syntax error."""
    if not isinstance(source, str):
        raise TypeError("rule text must be a str")
    text = source if source.endswith("\n") else source + "\n"
    try:
        tree = _lark().parse(text)
    except _IndentationError as err:
        raise SpecError(err.message, line=err.line, column=err.column, source=source,
                        filename=filename, hint="indent every line of a block by the same amount") from None
    except _KeywordAsName as err:
        unclosed, _ = _unclosed_bracket(source, filename, err.token)
        raise (unclosed or _keyword_error(err.token, source, filename)) from None
    except UnexpectedInput as err:
        raise _syntax_error(err, source, filename) from None
    _check_depth(tree, source, filename)
    try:
        return _ToAst(source, filename).transform(tree)
    except VisitError as err:  # never show lark's wrapper: re-raise what went wrong inside
        raise err.orig_exc from None
