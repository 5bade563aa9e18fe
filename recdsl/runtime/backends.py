"""The backend registry: which backends exist, which can run a given rule here, and which
one "auto" picks. A backend is a function ``run(rule, call) -> (outputs, final_states)``."""
from __future__ import annotations

from ..codegen.naive import run_naive
from ..errors import BackendError

# Every backend name the call accepts, best first for "auto"; later issues add runners.
NAMES = ("chunk", "torch-chunk", "recurrent", "naive")

_RUNNERS = {
    "naive": lambda rule, call: run_naive(rule.ir, call),
}

# Why a known backend cannot run yet (shown to the user).
_NOT_YET = {
    "chunk": "the chunkwise Triton kernels are not built yet",
    "torch-chunk": "the chunkwise PyTorch path is not built yet",
    "recurrent": "the fused recurrent Triton kernel is not built yet",
}


def available(rule) -> list:
    return [name for name in NAMES if name in _RUNNERS]


def resolve(rule, backend: str, call):
    if backend == "auto":
        return _RUNNERS[available(rule)[0]]
    if backend not in NAMES:
        raise BackendError(f"unknown backend '{backend}'; choose one of: auto, " + ", ".join(NAMES))
    if backend not in _RUNNERS:
        raise BackendError(f"backend '{backend}' is not available for rule '{rule.name}': "
                           f"{_NOT_YET[backend]}; use backend='naive' or 'auto'")
    return _RUNNERS[backend]
