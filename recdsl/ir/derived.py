"""What the rules the analysis derives from a user's rule share (the read lowering's rule of
plain reads, the staging's later stages): new names that clash with nothing in the rule, and
the derived rule compiled from its text."""
from __future__ import annotations

from ..grammar import ast
from ..grammar.parser import KEYWORDS
from .checked import CheckedRule


class FreshNames:
    """Names for a derived rule's new inputs, dims and outputs: ``fresh("m_before")`` is that
    name, or with a number added when the rule (or an earlier fresh name) already has it."""

    def __init__(self, checked: CheckedRule):
        self.taken = set(KEYWORDS) | set(checked.dims) | set(checked.consts) | {checked.name}
        self.taken |= {v.name for v in checked.states + checked.inputs + checked.params
                       + checked.outputs}
        for st in ast.walk_statements(checked.body):
            if isinstance(st, ast.Let):
                self.taken.add(st.name)
            elif isinstance(st, ast.For):
                self.taken.add(st.var)

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}{i}"
        self.taken.add(name)
        return name


def compile_derived(text: str, label: str):
    """The derived rule's text compiled (a ``recdsl.runtime.rule.Rule``); ``label`` names it in
    messages, e.g. ``<mlstm staged>``."""
    from ..runtime.rule import compile_text
    return compile_text(text, label)
