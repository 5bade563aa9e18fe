"""The backend registry: which backends exist, which can run a given rule on which device, and
which one "auto" picks. A backend is a function ``run(rule, call) -> (outputs, final_states)``.

Each parallel backend belongs to the families it runs (``FAMILY_MODULES``: family -> the
runtime module exposing ``problem(rule)`` and ``run(rule, call)``); whether the rule is in a
family is the planners' verdict (``recdsl.ir.family``), so ``rule.backends(device)``,
``recdsl show`` and the call read one answer and cannot disagree.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ..codegen.naive import run_naive
from ..errors import BackendError


@dataclass(frozen=True)
class Backend:
    name: str
    triton: bool  # runs Triton kernels (CUDA, or the interpreter on the CPU)
    family_modules: tuple  # ((family, module name), ...); () runs any rule
    missing: str = ""  # why it cannot run a rule of a family it has no module for


BACKENDS = (
    Backend("chunk", True, (("delta", "chunk_delta"), ("diagonal", "chunk_diagonal"),
                            ("dplr", "chunk_dplr"))),
    Backend("scan", True, (("scan", "scan"),)),
    Backend("torch-chunk", False, (("delta", "torch_chunk_delta"),
                                   ("diagonal", "torch_chunk_diagonal"),
                                   ("dplr", "torch_chunk_dplr"))),
    Backend("torch-scan", False, (("scan", "torch_scan"),)),
    Backend("newton", False, (("newton", "newton"),)),  # any differentiable rule (ParaRNN)
    Backend("recurrent", True, ()),
    Backend("naive", False, ()),
)
_BY_NAME = {b.name: b for b in BACKENDS}

# Every backend name the call accepts.
NAMES = tuple(b.name for b in BACKENDS)


def _module(backend: Backend, family: str):
    """The runtime module of ``backend`` for ``family``, or None when it is not written yet."""
    name = dict(backend.family_modules).get(family)
    if name is None:
        return None
    full = f"{__package__}.{name}"
    try:
        module = importlib.import_module(full)
    except ModuleNotFoundError as err:
        if err.name != full:  # the module exists but something it imports does not
            raise
        return None
    return module if hasattr(module, "problem") and hasattr(module, "run") else None


def _family_of(rule, backend: Backend):
    """The family whose module runs ``rule`` on ``backend``: the first of the backend's
    families that the planners accepted and whose module takes the rule (a rule the delta
    family accepts but whose delta module refuses, KDA's per-channel decay before the erase,
    goes on to the dplr module), else the first accepted one (its refusal is the reason), or
    None."""
    accepted = [f for f, _ in backend.family_modules if rule.family_info.accepts(f)]
    for family in accepted:
        module = _module(backend, family)
        if module is not None and module.problem(rule) is None:
            return family
    return accepted[0] if accepted else None


def problem(rule, name: str):
    """Why backend ``name`` cannot run ``rule`` (None: it can). About the rule only: where a
    backend can run (CUDA, or the Triton interpreter) is ``available``'s concern."""
    backend = _BY_NAME.get(name)
    if backend is None or not backend.family_modules:  # runs any rule
        return None
    family = _family_of(rule, backend)
    if family is None and name == "newton":
        from .newton import problem as newton_problem
        return newton_problem(rule)
    if family is None and rule.family_info.staged is not None:
        from . import staged  # the leading states first (recdsl.ir.stages), then the rest
        return staged.problem(rule, name)
    if family is None and rule.family_info.lowered is not None and name in ("torch-chunk", "chunk"):
        from . import lowered  # outputs through the read lowering (recdsl.ir.reads)
        return lowered.problem(rule, name)
    if family is None:
        wanted = [f for f, _ in backend.family_modules]
        refusals = [rule.family_info.verdicts[f] for f in wanted]
        # the refusal of the family the rule is closest to (the first one asked)
        reason = refusals[0].reason
        where = refusals[0].where(rule.ir.filename) if refusals[0].pos else None
        kind = "chunkwise" if "scan" not in wanted else "elementwise scan"
        return (f"rule '{rule.name}' has no {kind} form: {reason}"
                + (f" ({where})" if where else ""))
    module = _module(backend, family)
    if module is None:
        kind = "PyTorch path" if not backend.triton else "Triton kernels"
        return f"the {kind} of the {family} family are not built yet"
    return module.problem(rule)


def refusals(rule) -> dict:
    """Every backend name -> why it cannot run ``rule`` (None: it can)."""
    return {name: problem(rule, name) for name in NAMES}


def _triton_usable(device) -> bool:
    from .recurrent import triton_usable
    return triton_usable(device)


def _prefer_scan(rule, dim_sizes=None) -> bool:
    """Where a rule has both a chunkwise form and an elementwise scan, which is faster: the
    scan materialises every token's state, the chunk form only one state per chunk, so the
    chunk form wins once both axes of the matrix states are wide (benchmarks/bench_scan.py
    measures the crossover: a [D, 1] state scans faster, a 16 x 16 one runs chunkwise)."""
    staging = rule.family_info.staged
    states = rule.ir.states
    if staging is not None:  # the states the derived rule runs (mLSTM's C and n, not m)
        states = staging.derived.ir.states
    if any(v.rank == 2 for v in states):  # the matrix states cost the most: a normaliser
        states = [v for v in states if v.rank == 2]  # vector beside them does not decide
    for var in states:
        if var.rank < 2:
            return True
        if dim_sizes is not None and min(dim_sizes[d] for d in var.dims) < SCAN_BELOW:
            return True
    return False


# the narrower axis of a matrix state below which the scan beats the chunk form (measured)
SCAN_BELOW = 8


def _order(rule, names, dim_sizes=None):
    """``names`` with the scan before the chunk form where it is faster."""
    names = list(names)
    if _prefer_scan(rule, dim_sizes):
        for chunk, scan in (("chunk", "scan"), ("torch-chunk", "torch-scan")):
            if chunk in names and scan in names:
                names.remove(scan)
                names.insert(names.index(chunk), scan)
    return names


def available(rule, device=None, dim_sizes=None) -> list:
    """The backends that would run ``rule`` on ``device`` (default: CPU), best first, naive
    last. For "cuda" the list is the same on a machine without a GPU: the Triton paths first.
    On the CPU the PyTorch paths come first; the Triton ones are listed only under the
    interpreter (TRITON_INTERPRET=1), where they run, slowly, for testing."""
    device = torch.device(device or "cpu")
    ok = {name for name in NAMES if problem(rule, name) is None}
    if device.type == "cuda":
        order = ["chunk", "scan", "recurrent", "torch-chunk", "torch-scan", "newton"]
    else:
        order = ["torch-chunk", "torch-scan", "newton"]
        if _triton_usable(device):
            order += ["chunk", "scan", "recurrent"]
    names = [n for n in _order(rule, order, dim_sizes) if n in ok]
    return names + ["naive"]


def _auto(rule, call) -> str:
    # the best backend for the call's device and dims; interpreted Triton (CPU) is for tests
    from .newton import pays_off  # newton only where measured faster (long T, narrow blocks)
    if call.device.type == "cuda":
        names = available(rule, "cuda", call.dim_sizes)
        if names[0] == "recurrent" and "newton" in names and pays_off(rule, call):
            return "newton"
        return names[0]
    names = available(rule, call.device, call.dim_sizes)
    return next(n for n in names if not _BY_NAME[n].triton and (n != "newton" or pays_off(rule, call)))


_RUNNERS = {
    "naive": lambda rule, call: run_naive(rule.ir, call),
}


def _runner(rule, name):
    if name in _RUNNERS:
        return _RUNNERS[name]
    if name == "recurrent":
        from .recurrent import run_recurrent  # imports Triton only when used
        return run_recurrent
    backend = _BY_NAME[name]
    if _family_of(rule, backend) is None and rule.family_info.staged is not None:
        from . import staged
        return staged.runner(name)
    if _family_of(rule, backend) is None and rule.family_info.lowered is not None:
        from . import lowered
        return lowered.runner(name)
    return _module(backend, _family_of(rule, backend)).run


def resolve(rule, backend: str, call):
    run = _resolve(rule, backend, call)
    if call.device.type != "cpu":
        return run
    from .threads import on_cpu  # the CPU thread policy (README, "Threads on the CPU")
    return on_cpu(run)


def _resolve(rule, backend: str, call):
    if backend == "auto":
        return _runner(rule, _auto(rule, call))
    if backend not in NAMES:
        raise BackendError(f"unknown backend '{backend}'; choose one of: auto, " + ", ".join(NAMES))
    reason = problem(rule, backend)
    if reason is not None:
        raise BackendError(f"backend '{backend}' is not available for rule '{rule.name}': "
                           f"{reason}; use backend='naive' or 'auto'")
    return _runner(rule, backend)
