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
        lines = source.splitlines()
        self.source_line = lines[line - 1] if 0 < line <= len(lines) else ""
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"{self.filename}:{self.line}:{self.column}: error: {self.message}"
        if self.source_line:
            # Keep the caret under the token even when the line is indented with tabs.
            prefix = "".join(c if c == "\t" else " " for c in self.source_line[: self.column - 1])
            room = max(1, len(self.source_line) - self.column + 1)
            text += f"\n    {self.source_line}\n    {prefix}{'^' * min(self.length, room)}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class InputError(RecdslError):
    """A tensor passed to a rule has the wrong shape, dtype or device, or is missing."""


class BackendError(RecdslError):
    """A backend is unknown, unavailable here, or cannot run this rule or shape."""
