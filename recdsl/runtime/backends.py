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


_RUNNERS = {
    "naive": lambda rule, call: run_naive(rule.ir, call),
    "recurrent": _recurrent,
}

# Why a known backend cannot run yet (shown to the user).
_NOT_YET = {
    "chunk": "the chunkwise Triton kernels are not built yet",
    "torch-chunk": "the chunkwise PyTorch path is not built yet",
}


def _triton_usable(device) -> bool:
    from .recurrent import triton_usable
    return triton_usable(device)


def available(rule, device=None) -> list:
    """The backends that can run ``rule`` on ``device`` (default: CPU) here, naive last."""
    device = torch.device(device or "cpu")
    names = []
    if _triton_usable(device):
        names.append("recurrent")
    names.append("naive")
    return names


def _auto(rule, device) -> str:
    # On a GPU the fused kernel; on the CPU the PyTorch paths (interpreted Triton is for tests).
    if device.type == "cuda":
        return "recurrent"
    return "naive"


def resolve(rule, backend: str, call):
    if backend == "auto":
        return _RUNNERS[_auto(rule, call.device)]
    if backend not in NAMES:
        raise BackendError(f"unknown backend '{backend}'; choose one of: auto, " + ", ".join(NAMES))
    if backend not in _RUNNERS:
        raise BackendError(f"backend '{backend}' is not available for rule '{rule.name}': "
                           f"{_NOT_YET[backend]}; use backend='naive' or 'auto'")
    return _RUNNERS[backend]
