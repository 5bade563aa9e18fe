"""recdsl: recurrent update rules as ten-line text files, lowered to kernels.

    rule = recdsl.load("examples/gated_delta.rec")
    o, final = rule(q, k, v, g=g, beta=beta, output_final_state=True)
"""
from .errors import BackendError, InputError, RecdslError, SpecError
from .runtime.rule import Rule, compile_text, load_file

__version__ = "0.1.0"

__all__ = ["compile", "load", "Rule", "RecdslError", "SpecError", "InputError", "BackendError",
           "__version__"]


def compile(text: str, **consts) -> Rule:  # noqa: A001 - the contract's name
    """Compile rule text; keyword arguments override the rule's ``const`` values."""
    return compile_text(text, "<rule>", consts)


def load(path, **consts) -> Rule:
    """Read and compile a ``.rec`` file; keyword arguments override its ``const`` values."""
    return load_file(path, consts)
