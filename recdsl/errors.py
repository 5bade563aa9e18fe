"""The errors recdsl raises. Users see these, never a traceback from lark, sympy or Triton."""
from __future__ import annotations


class RecdslError(Exception):
    """Base class of every error recdsl raises on purpose."""


class SpecError(RecdslError):
    """A rule text is malformed or breaks a rule of the language.

    Carries the position (1-based line and column), the offending source line and a hint.
    ``str(err)`` reads like a compiler diagnostic::

        gated_delta.rec:5:9: error: cannot add [K, V] and [K]
            S = S + k
                ^^^^^
        hint: ...
    """

    def __init__(self, message: str, *, line: int, column: int, source: str = "",
                 filename: str = "<rule>", hint: str = "", length: int = 1):
        self.message = message
        self.line = line
        self.column = column
        self.filename = filename
        self.hint = hint
        self.length = max(1, length)
        lines = source_lines(source)
        self.source_line = lines[line - 1] if 0 < line <= len(lines) else ""
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"{self.filename}:{self.line}:{self.column}: error: {self.message}"
        if self.source_line:
            shown, column = _window(self.source_line, self.column)
            # Keep the caret under the token even when the line is indented with tabs.
            prefix = "".join(c if c == "\t" else " " for c in shown[: column - 1])
            room = max(1, len(shown) - column + 1)
            text += f"\n    {shown}\n    {prefix}{'^' * min(self.length, room)}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


def source_lines(source: str) -> list:
    """The lines of a rule text as the parser counts them: only '\n' ends a line (a form
    feed or a lone '\r' does not), and a '\r' before the '\n' is not part of the line."""
    return [line[:-1] if line.endswith("\r") else line for line in source.split("\n")]


_WIDTH = 100  # characters of a long source line shown around the error


def _window(line: str, column: int):
    """The part of a source line to show (a long line is cut around the column), with
    characters that would garble a terminal escaped, and the column within that part."""
    start = 0
    if len(line) > _WIDTH:
        start = max(0, min(column - 1 - _WIDTH // 2, len(line) - _WIDTH))
    part = line[start:start + _WIDTH]
    part = "".join(c if c.isprintable() or c == "\t" else "?" for c in part)
    column -= start
    if start > 0:
        part, column = "..." + part, column + 3
    if start + _WIDTH < len(line):
        part += "..."
    return part, column


def describe_char(char: str) -> str:
    """A character as an error message shows it: itself if printable, else its code point."""
    return f"'{char}'" if char.isprintable() else f"U+{ord(char):04X}"


class InputError(RecdslError):
    """A tensor passed to a rule has the wrong shape, dtype or device, or is missing."""


class BackendError(RecdslError):
    """A backend is unknown, unavailable here, or cannot run this rule or shape."""
