"""The checked rule: what every later stage consumes.

Declarations are resolved into ``Var``s; the statements are the parser's nodes with every
expression's ``shape`` and every name's ``kind`` filled in by the checker.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..grammar import ast


@dataclass(frozen=True)
class Var:
    name: str
    dims: tuple  # dim names; () for a scalar
    kind: str  # state, input, param, output
    pos: ast.Pos = field(compare=False, hash=False, default=None)

    @property
    def rank(self) -> int:
        return len(self.dims)

    def layout(self) -> list:
        """The tensor layout at call time, as dim names (see LANGUAGE.md)."""
        lead = {"input": ["B", "T", "H"], "output": ["B", "T", "H"], "state": ["B", "H"],
                "param": ["H"]}[self.kind]
        return lead + list(self.dims)


@dataclass
class CheckedRule:
    name: str
    filename: str
    source: str
    dims: tuple  # dim names in declaration order
    states: tuple  # Vars
    inputs: tuple
    params: tuple
    consts: dict  # name -> value (after overrides)
    body: list  # checked statements (ast.Let / ast.Update / ast.Output / ast.For)
    outputs: tuple  # Vars, in declaration order

    def var(self, name: str) -> Var:
        for v in self.states + self.inputs + self.params + self.outputs:
            if v.name == name:
                return v
        raise KeyError(name)

    def canonical(self) -> str:
        """A text that identifies the rule's meaning: the source without comments and blank
        lines, plus the const values in force. Used as a cache key."""
        lines = []
        for line in self.source.splitlines():
            code = line.split("#", 1)[0].rstrip()
            if code.strip():
                lines.append(code)
        consts = ", ".join(f"{k}={v!r}" for k, v in sorted(self.consts.items()))
        return "\n".join(lines) + f"\n# consts: {consts}\n"
