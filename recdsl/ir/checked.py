"""The checked rule: what every later stage consumes.

Declarations are resolved into ``Var``s; the statements are the parser's nodes with every
expression's ``shape`` and every name's ``kind`` filled in by the checker.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import RecdslError
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

    def loop_dims(self) -> tuple:
        """The dims ``for`` blocks run over (kernels unroll those loops)."""
        return tuple(dict.fromkeys(s.dim for s in ast.walk_statements(self.body) if isinstance(s, ast.For)))

    def dim_sizes(self, given: dict | None, default: int, loop_default: int) -> dict:
        """Every dim's size: ``given[name]`` (validated), else ``loop_default`` for a dim a
        ``for`` block runs over, else ``default``."""
        loops = self.loop_dims()
        sizes = {d: loop_default if d in loops else default for d in self.dims}
        for name, size in (given or {}).items():
            if name not in sizes:
                raise RecdslError(f"rule '{self.name}' has no dim '{name}'; its dims are: "
                                  + (", ".join(self.dims) or "none"))
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise RecdslError(f"dim {name} must be a positive whole number, not {size!r}")
            sizes[name] = size
        return sizes

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
