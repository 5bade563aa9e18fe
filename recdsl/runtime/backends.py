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


def _torch_chunk_module(rule):
    """The module running this rule's family chunkwise in PyTorch, or None."""
    import importlib
    name = {"delta": "torch_chunk_delta", "diagonal": "torch_chunk_diagonal"}.get(rule.family)
    if name is None:
        return None
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError:
        return None


def _torch_chunk_problem(rule):
    """Why torch-chunk cannot run this rule, or None. Each family module may refuse a rule
    with its own reason through ``problem(rule)``."""
    module = _torch_chunk_module(rule)
    if rule.family == "recurrent":
        return f"rule '{rule.name}' has no chunkwise form: {rule.family_reason}"
    if module is None:
        return f"the chunkwise PyTorch path for the {rule.family} family is not built yet"
    return module.problem(rule)


def _torch_chunk(rule, call):
    return _torch_chunk_module(rule).run(rule, call)


_RUNNERS = {
    "naive": lambda rule, call: run_naive(rule.ir, call),
    "recurrent": _recurrent,
    "torch-chunk": _torch_chunk,
}

# Why a known backend cannot run yet (shown to the user).
_NOT_YET = {
    "chunk": "the chunkwise Triton kernels are not built yet",
}


def _triton_usable(device) -> bool:
    from .recurrent import triton_usable
    return triton_usable(device)


def available(rule, device=None) -> list:
    """The backends that can run ``rule`` on ``device`` (default: CPU) here, naive last."""
    device = torch.device(device or "cpu")
    names = []
    if _torch_chunk_problem(rule) is None:
        names.append("torch-chunk")
    if _triton_usable(device):
        names.append("recurrent")
    names.append("naive")
    return names


def _auto(rule, device) -> str:
    # On a GPU the fused kernel; on the CPU the PyTorch paths (interpreted Triton is for tests).
    if device.type == "cuda":
        return "recurrent"
    return "torch-chunk" if _torch_chunk_problem(rule) is None else "naive"


def resolve(rule, backend: str, call):
    if backend == "auto":
        return _RUNNERS[_auto(rule, call.device)]
    if backend not in NAMES:
        raise BackendError(f"unknown backend '{backend}'; choose one of: auto, " + ", ".join(NAMES))
    if backend not in _RUNNERS:
        raise BackendError(f"backend '{backend}' is not available for rule '{rule.name}': "
                           f"{_NOT_YET[backend]}; use backend='naive' or 'auto'")
    if backend == "torch-chunk":
        problem = _torch_chunk_problem(rule)
        if problem is not None:
            raise BackendError(f"backend 'torch-chunk' is not available for rule '{rule.name}': "
                               f"{problem}; use backend='naive' or 'auto'")
    return _RUNNERS[backend]
