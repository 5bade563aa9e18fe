"""The backend registry: which backends exist, which can run a given rule here, and which
one "auto" picks. A backend is a function ``run(rule, call) -> (outputs, final_states)``."""
from __future__ import annotations

import torch

from ..codegen.naive import run_naive
from ..errors import BackendError

# Every backend name the call accepts.
NAMES = ("chunk", "torch-chunk", "recurrent", "naive")


def _recurrent(rule, call):
    from .recurrent import run_recurrent  # imports Triton only when used
    return run_recurrent(rule, call)


def _family_module(rule, prefix):
    """The module ``<prefix>_<family>`` running this rule's family chunkwise (exposing
    ``problem(rule)`` and ``run(rule, call)``), or None when the family has none (recurrent)
    or the module is not written yet."""
    import importlib
    if rule.family not in ("delta", "diagonal"):
        return None
    name = f"{__package__}.{prefix}_{rule.family}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:  # the module exists but something it imports does not
            raise
        return None
    # a module still without the backend interface is not a backend yet
    return module if hasattr(module, "problem") and hasattr(module, "run") else None


def _chunk_problem(rule, prefix, missing):
    """Why a chunkwise backend cannot run this rule, or None. Each family module may refuse a
    rule with its own reason through ``problem(rule)``."""
    if rule.family == "recurrent":
        return f"rule '{rule.name}' has no chunkwise form: {rule.family_reason}"
    module = _family_module(rule, prefix)
    if module is None:
        return missing.format(family=rule.family)
    return module.problem(rule)


def _torch_chunk_problem(rule):
    return _chunk_problem(rule, "torch_chunk",
                          "the chunkwise PyTorch path for the {family} family is not built yet")


def _triton_chunk_problem(rule):
    return _chunk_problem(rule, "chunk",
                          "the chunkwise Triton kernels for the {family} family are not built yet")


def _torch_chunk(rule, call):
    return _family_module(rule, "torch_chunk").run(rule, call)


def _triton_chunk(rule, call):
    return _family_module(rule, "chunk").run(rule, call)


_RUNNERS = {
    "naive": lambda rule, call: run_naive(rule.ir, call),
    "recurrent": _recurrent,
    "torch-chunk": _torch_chunk,
    "chunk": _triton_chunk,
}

_PROBLEMS = {"torch-chunk": _torch_chunk_problem, "chunk": _triton_chunk_problem}


def refusals(rule) -> dict:
    """Every backend name -> why it cannot run ``rule`` (None: it can). About the rule only:
    where a backend can run (CUDA, or the Triton interpreter) is ``available``'s concern."""
    return {name: (_PROBLEMS[name](rule) if name in _PROBLEMS else None) for name in NAMES}


def _triton_usable(device) -> bool:
    from .recurrent import triton_usable
    return triton_usable(device)


def available(rule, device=None) -> list:
    """The backends that can run ``rule`` on ``device`` (default: CPU) here, naive last."""
    device = torch.device(device or "cpu")
    names = []
    chunk = _triton_usable(device) and _triton_chunk_problem(rule) is None
    if chunk and device.type == "cuda":
        names.append("chunk")
    if _torch_chunk_problem(rule) is None:
        names.append("torch-chunk")
    if chunk and device.type != "cuda":
        names.append("chunk")
    if _triton_usable(device):
        names.append("recurrent")
    names.append("naive")
    return names


def _auto(rule, device) -> str:
    # On a GPU the Triton kernels (chunkwise where the rule has that form); on the CPU the
    # PyTorch paths (interpreted Triton is for tests).
    if device.type == "cuda":
        return "chunk" if _triton_chunk_problem(rule) is None else "recurrent"
    return "torch-chunk" if _torch_chunk_problem(rule) is None else "naive"


def resolve(rule, backend: str, call):
    if backend == "auto":
        return _RUNNERS[_auto(rule, call.device)]
    if backend not in NAMES:
        raise BackendError(f"unknown backend '{backend}'; choose one of: auto, " + ", ".join(NAMES))
    if backend in _PROBLEMS:
        problem = _PROBLEMS[backend](rule)
        if problem is not None:
            raise BackendError(f"backend '{backend}' is not available for rule '{rule.name}': "
                               f"{problem}; use backend='naive' or 'auto'")
    return _RUNNERS[backend]
