"""What the rules the analysis derives from a user's rule share (the read lowering's rule of
plain reads, the staging's later stages): new names that clash with nothing in the rule, and
the derived rule checked and classified from its text. The runtime makes a callable rule of
it (``recdsl.runtime.rule.of_derived``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..grammar import ast
from ..grammar.parser import KEYWORDS, parse
from .checked import CheckedRule
from .checker import check


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


@dataclass(eq=False)
class DerivedRule:
    """A derived rule, checked and classified: what the backends ask of a rule."""
    ir: CheckedRule
    family_info: object  # recdsl.ir.family.Family
    runtime: object = field(default=None, repr=False)  # its callable Rule, made when first run

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def family(self) -> str:
        return self.family_info.name

    @property
    def family_reason(self) -> str:
        f = self.family_info
        return f.reason if f.pos is None else f"{f.reason} ({f.where(self.ir.filename)})"

    @property
    def analysis(self):
        return self.family_info.analysis


def compile_derived(text: str, label: str) -> DerivedRule:
    """The derived rule's text checked and classified; ``label`` names it in messages, e.g.
    ``<mlstm staged>``."""
    from .family import classify  # family asks the read lowering and the staging in turn
    checked = check(parse(text, label))
    return DerivedRule(checked, classify(checked))
