"""The autotester (``recdsl test FILE``): every backend of a rule against the naive loop.

For each shape of a small grid and each dtype, the rule runs on random inputs
(``runtime.sample``) three ways: the naive loop in float64 on the same numbers (the
*golden* result), the naive loop in the tested dtype (the *reference*: how far plain
arithmetic in that dtype drifts from golden) and each candidate backend. Outputs, final
states and, for full-precision dtypes, the gradients of every input, param and initial state
(with random upstream gradients for outputs and final states, the same for every run) are
compared against golden.

The pass rule is TESTING.md's "How close is close enough": a quantity passes when

    rms(backend - golden) <= FACTOR[dtype] * max(rms(reference - golden),
                                                 FLOOR[dtype] * rms(golden), ABS_FLOOR[dtype])

i.e. a backend may be a small factor less exact than the naive loop in the same dtype, and
the floor keeps a quantity the reference gets exactly (or almost) right from demanding a
bit-exact backend. A backend that raises, returns non-finite values where golden is finite,
gives no gradient where golden has one, or modifies its inputs fails.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from ..options import add_const_option, add_dims_option, merged

from ..errors import RecdslError
from . import backends as registry
from .sample import dim_sizes, sample_initial_state, sample_inputs

HALF = (torch.float16, torch.bfloat16)
# Allowed error, as a multiple of the naive loop's own error in the same dtype.
FACTOR = {torch.float64: 10.0, torch.float32: 10.0, torch.float16: 2.0, torch.bfloat16: 2.0}
# The least error always allowed, relative to rms(golden), so that a quantity the naive loop
# gets (almost) exactly does not demand a bit-exact backend; and an absolute one for a
# golden that is exactly zero (dg at T = 1 from a zero state). Inputs are O(1).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
ABS_FLOOR = {torch.float64: 1e-15, torch.float32: 1e-9, torch.float16: 1e-6, torch.bfloat16: 1e-5}
DTYPE_NAMES = {"float32": torch.float32, "float64": torch.float64,
               "float16": torch.float16, "bfloat16": torch.bfloat16}

TIMES = (1, 17, 64, 65, 200)
QUICK_TIMES = (1, 17, 65)
# Default sizes of the dims a `for` loop does not run over: K, then V, then the others in
# declaration order. None is a power of two, so padded lanes and masks are exercised.
DEFAULT_SIZES = (48, 40, 24)
DEFAULT_LOOP_SIZE = 2


# ---------------------------------------------------------------- what is tested


@dataclass(frozen=True)
class Shape:
    """One call's shape: batch, time and heads, packed sequence boundaries (then batch is 1
    and there is one initial-state row per sequence) and whether an initial state is given."""
    batch: int
    time: int
    heads: int
    cu_seqlens: tuple | None = None
    initial_state: bool = False

    @property
    def sequences(self) -> int:
        return len(self.cu_seqlens) - 1 if self.cu_seqlens else self.batch

    def label(self, dims: dict) -> str:
        text = f"B={self.batch} T={self.time} H={self.heads}"
        text += "".join(f" {d}={n}" for d, n in dims.items())
        if self.cu_seqlens:
            bounds = self.cu_seqlens
            text += " packed " + "+".join(str(b - a) for a, b in zip(bounds, bounds[1:]))
        if self.initial_state:
            text += " +init"
        return text


def default_shapes(quick: bool = False) -> list:
    """(B, H) = (1, 1) and (2, 2) at every T, then three packed sequences of unequal lengths
    (one a single token) without and with initial states, and B = H = 2 with initial states."""
    shapes = [Shape(b, t, h) for t in (QUICK_TIMES if quick else TIMES) for b, h in ((1, 1), (2, 2))]
    packed = (0, 1, 30, 65)
    shapes += [Shape(1, 65, 2, cu_seqlens=packed), Shape(1, 65, 2, cu_seqlens=packed, initial_state=True),
               Shape(2, 65, 2, initial_state=True)]
    return shapes


def default_dims(rule) -> dict:
    """Dim sizes for testing: 2 for a dim a ``for`` loop runs over, else 48 for K, 40 for V
    and 24 for the others (non-powers of two)."""
    ir = rule.ir
    loops = ir.loop_dims()
    free = [d for d in ("K", "V") if d in ir.dims] + [d for d in ir.dims if d not in ("K", "V")]
    free = [d for d in free if d not in loops]
    sizes = {d: DEFAULT_SIZES[min(i, len(DEFAULT_SIZES) - 1)] for i, d in enumerate(free)}
    sizes.update({d: DEFAULT_LOOP_SIZE for d in loops})
    return {d: sizes[d] for d in ir.dims}


# ---------------------------------------------------------------- results


@dataclass
class Quantity:
    """One compared tensor of one case. ``score`` is rms(x - golden) / max(rms(reference -
    golden), floors): the number the pass rule bounds by ``factor``."""
    name: str
    rms_ratio: float  # rms(x - golden) / rms(golden)
    max_abs: float  # max |x - golden|
    reference_ratio: float  # the same-dtype naive loop's rms ratio
    score: float
    factor: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return not self.note and self.score <= self.factor  # False for NaN


@dataclass
class CaseResult:
    """One backend at one shape and dtype."""
    backend: str
    shape: Shape
    dims: dict
    dtype: torch.dtype
    quantities: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # messages: raised, modified inputs, ...
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.problems and all(q.passed for q in self.quantities)

    @property
    def worst(self) -> Quantity | None:
        """The failing quantity, else the one closest to its limit."""
        if not self.quantities:
            return None
        return max(self.quantities, key=lambda q: (not q.passed, _sortable(q.score)))

    @property
    def label(self) -> str:
        return self.shape.label(self.dims)


def _sortable(x: float) -> float:
    return math.inf if math.isnan(x) else x


@dataclass
class AutotestReport:
    rule: str
    backends: list
    dtypes: list
    cases: list = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole run, golden and reference included

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    @property
    def failures(self) -> list:
        return [c for c in self.cases if not c.passed]

    def table(self, verbose: bool = False) -> str:
        """One line per case naming its worst quantity; every quantity (and any error) below
        each failing case, or below every case when ``verbose``."""
        if not self.cases:
            return f"nothing to test: rule '{self.rule}' has no backend besides the naive loop"
        header = ["backend", "shape", "dtype", "worst", "rms ratio", "max abs", "x ref", "verdict"]
        rows, details = [], []
        for case in self.cases:
            w = case.worst
            rows.append([case.backend, case.label, _dtype_name(case.dtype),
                         w.name if w else "-", _num(w.rms_ratio) if w else "-",
                         _num(w.max_abs) if w else "-", _times(w.score) if w else "-",
                         "ok" if case.passed else "FAIL"])
            details.append(_detail(case) if verbose or not case.passed else [])
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        align = "<<<<>>><"

        def line(r):
            return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, align, widths)).rstrip()

        lines = [line(header)]
        for row, extra in zip(rows, details):
            lines.append(line(row))
            lines += ["    " + x for x in extra]
        lines += ["", "rms ratio = rms(x - golden) / rms(golden); golden = the naive loop in float64 "
                  "on the same inputs",
                  "x ref = rms(x - golden) / max(rms(naive loop in the same dtype - golden), "
                  "floor * rms(golden)); passes up to the limit",
                  "; ".join(f"{_dtype_name(d)}: limit {FACTOR[d]:g}, floor {FLOOR[d]:g}" for d in self.dtypes)]
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: PASS or FAIL and the essentials."""
        if not self.cases:
            return f"PASS (nothing tested): rule '{self.rule}' has only the naive loop, the reference"
        what = f"{len(self.cases)} case{'s' if len(self.cases) != 1 else ''} ({', '.join(self.backends)}; " \
               f"{', '.join(_dtype_name(d) for d in self.dtypes)}) in {self.seconds:.0f} s"
        failed = self.failures
        if not failed:
            worst = max(self.cases, key=lambda c: _sortable(c.worst.score) if c.worst else -1.0)
            w = worst.worst
            tail = f"; worst: {w.name} at {_times(w.score)}x ref ({worst.backend} " \
                   f"{worst.label} {_dtype_name(worst.dtype)})" if w else ""
            return f"PASS  {self.rule}: {what}" + tail
        named = [f"{c.backend} {c.label} {_dtype_name(c.dtype)}: {_failed_names(c)}" for c in failed[:3]]
        more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
        return f"FAIL  {self.rule}: {len(failed)} of {what} failed: " + "; ".join(named) + more


def _failed_names(case: CaseResult) -> str:
    names = [q.name for q in case.quantities if not q.passed]
    if case.problems:
        names.insert(0, case.problems[0].splitlines()[0][:80])
    return ", ".join(names)


def _detail(case: CaseResult) -> list:
    lines = [("error: " if i == 0 else "       ") + text
             for p in case.problems for i, text in enumerate(p.splitlines())]
    if case.quantities:
        header = ["quantity", "rms ratio", "max abs", "naive ratio", "x ref", "verdict"]
        rows = [[q.name, _num(q.rms_ratio), _num(q.max_abs), _num(q.reference_ratio), _times(q.score),
                 ("ok" if q.passed else "FAIL") + (f"  ({q.note})" if q.note else "")]
                for q in case.quantities]
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        lines += ["  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, "<>>>><", widths)).rstrip()
                  for r in [header] + rows]
    return lines


def _num(x: float) -> str:
    return f"{x:.1e}" if math.isfinite(x) else str(x)


def _times(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2f}" if x < 100 else f"{x:.0f}" if x < 1e4 else f"{x:.1e}"


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- measuring


def _rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item() if t.numel() else 0.0


def measure(name, value, golden, reference, dtype, missing="no gradient") -> Quantity:
    """Compare ``value`` (a backend's) and ``reference`` (the naive loop's in ``dtype``)
    with ``golden``; None stands for "no gradient" (zero), and a None ``value`` where golden
    is not zero fails with the note ``missing``. Applies the pass rule."""
    factor = FACTOR[dtype]
    note = ""
    if golden is None and value is None:  # no gradient, rightly (the input does not matter)
        return Quantity(name, 0.0, 0.0, 0.0, 0.0, factor)
    if golden is None:
        golden = torch.zeros_like(value)
    if reference is None:
        reference = torch.zeros_like(golden)
    if value is None:
        note = missing if golden.count_nonzero() else ""
        value = torch.zeros_like(golden)
    golden, value, reference = golden.double(), value.double(), reference.double()
    if value.shape != golden.shape:
        return Quantity(name, math.nan, math.nan, math.nan, math.nan, factor,
                        f"shape [{', '.join(map(str, value.shape))}], expected "
                        f"[{', '.join(map(str, golden.shape))}]")
    if not torch.isfinite(golden).all():
        note = "golden (float64 naive loop) not finite"
    elif not torch.isfinite(value).all():
        note = "not finite"
    scale = _rms(golden)
    error = _rms(value - golden)
    ref_error = _rms(reference - golden)
    max_abs = (value - golden).abs().max().item() if value.numel() else 0.0
    if not math.isfinite(ref_error):  # the naive loop overflows in this dtype: no bound to keep
        ref_error = math.inf
    allowance = max(ref_error, FLOOR[dtype] * scale, ABS_FLOOR[dtype])
    score = 0.0 if error == 0 else error / allowance
    return Quantity(name, _ratio(error, scale), max_abs, _ratio(ref_error, scale), score, factor, note)


def _ratio(error: float, scale: float) -> float:
    if scale > 0:
        return error / scale
    return 0.0 if error == 0 else math.inf


@dataclass
class _CaseData:
    """The shared numbers of one shape and dtype: inputs, initial states, upstream gradients."""
    shape: Shape
    dtype: torch.dtype
    inputs: dict
    initial: tuple | None
    upstream: dict  # quantity name -> tensor (outputs and final states)
    device: torch.device

    @property
    def backward(self) -> bool:
        return self.dtype not in HALF


def _prepare(rule, shape: Shape, dims: dict, dtype, seed: int, device) -> _CaseData:
    common = dict(heads=shape.heads, dims=dims, dtype=dtype, seed=seed, device=device)
    inputs = sample_inputs(rule, batch=shape.batch, time=shape.time, **common)
    initial = None
    if shape.initial_state:
        initial = sample_initial_state(rule, batch=shape.sequences, **common)
        initial = initial if isinstance(initial, tuple) else (initial,)
    sizes = dim_sizes(rule, dims)
    generator = torch.Generator().manual_seed(seed + 2)  # sample uses seed and seed + 1
    upstream = {}
    for var in rule.outputs:
        upstream[var.name] = [shape.batch, shape.time, shape.heads] + [sizes[d] for d in var.dims]
    for var in rule.states:
        upstream["final " + var.name] = [shape.sequences, shape.heads] + [sizes[d] for d in var.dims]
    upstream = {n: torch.randn(s, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
                for n, s in upstream.items()}
    return _CaseData(shape, dtype, inputs, initial, upstream, device)


def _run(rule, backend: str, data: _CaseData, run_dtype) -> tuple:
    """Run one backend on ``data`` cast to ``run_dtype``: (quantity name -> tensor or None,
    names of inputs it modified in place)."""
    given = {n: t.to(run_dtype) for n, t in data.inputs.items()}
    args = {n: t.clone().requires_grad_(data.backward) for n, t in given.items()}
    initial = None
    if data.initial is not None:
        initial = tuple(t.to(run_dtype).clone().requires_grad_(data.backward) for t in data.initial)
    cu = None
    if data.shape.cu_seqlens:
        cu = torch.tensor(data.shape.cu_seqlens, dtype=torch.int64, device=data.device)
    out, final = rule(**args, initial_state=initial, output_final_state=True, backend=backend,
                      cu_seqlens=cu)
    outs = out if isinstance(out, tuple) else (out,)
    finals = final if isinstance(final, tuple) else (final,)
    values = {v.name: o for v, o in zip(rule.outputs, outs)}
    values.update({"final " + v.name: s for v, s in zip(rule.states, finals)})
    modified = [n for n, t in args.items() if not torch.equal(t.detach(), given[n])]
    if data.backward:
        leaves = list(args.values()) + list(initial or ())
        names = ["d" + n for n in args] + ["d initial " + v.name for v in rule.states][:len(initial or ())]
        pairs = [(t, data.upstream[n].to(run_dtype)) for n, t in values.items()
                 if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = [None] * len(leaves)
        if pairs:
            grads = torch.autograd.grad([t for t, _ in pairs], leaves, [u for _, u in pairs],
                                        allow_unused=True)
        values.update(zip(names, grads))
    values = {n: (t.detach() if isinstance(t, torch.Tensor) else t) for n, t in values.items()}
    return values, modified


def _run_case(rule, backend, data, golden, reference, dims) -> CaseResult:
    case = CaseResult(backend, data.shape, dims, data.dtype)
    start = time.perf_counter()
    try:
        values, modified = _run(rule, backend, data, data.dtype)
    except Exception as err:  # noqa: BLE001 - a failing backend is a result, not a crash
        case.problems.append(f"{type(err).__name__}: {err}")
        case.seconds = time.perf_counter() - start
        return case
    case.seconds = time.perf_counter() - start
    if modified:
        case.problems.append("modified its inputs in place: " + ", ".join(modified))
    for name, gold in golden.items():
        value = values.get(name)
        if value is not None and not isinstance(value, torch.Tensor):
            case.quantities.append(Quantity(name, math.nan, math.nan, math.nan, math.nan,
                                            FACTOR[data.dtype], f"returned {type(value).__name__}"))
            continue
        missing = "not returned" if name in data.upstream else "no gradient"
        case.quantities.append(measure(name, value, gold, reference[name], data.dtype, missing))
    return case


# ---------------------------------------------------------------- the harness


def _dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype) and d in FACTOR:
        return d
    if isinstance(d, str) and d in DTYPE_NAMES:
        return DTYPE_NAMES[d]
    raise RecdslError(f"cannot test dtype {d!r}; choose from: " + ", ".join(DTYPE_NAMES))


def run_autotest(rule, backends=None, dims=None, shapes=None, dtypes=None, seed=0, progress=print,
                 device=None) -> AutotestReport:
    """Test ``rule``'s backends against the naive loop in float64.

    ``backends``: names to test; default every backend available for the rule on
    ``device`` (default CUDA if present, else CPU) except "naive" (the reference). Naming
    "naive" explicitly tests the naive loop like any other backend (a check of the harness). ``dims``: dim sizes overriding
    ``default_dims(rule)``. ``shapes``: ``Shape``s, default ``default_shapes()``.
    ``dtypes``: torch dtypes or their names, default float32; half types are tested
    forward only. ``progress``: called with one short line per case (None: silent).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if backends is None:
        backends = [b for b in registry.available(rule, device) if b != "naive"]
    backends = list(backends)
    for name in backends:
        if name not in registry.NAMES:
            raise RecdslError(f"unknown backend '{name}'; choose from: " + ", ".join(registry.NAMES))
    dims = {**default_dims(rule), **(dims or {})}
    dim_sizes(rule, dims)  # checks the names and sizes
    shapes = list(shapes) if shapes is not None else default_shapes()
    dtypes = [_dtype(d) for d in (dtypes or [torch.float32])]
    progress = progress or (lambda line: None)
    report = AutotestReport(rule.name, backends, dtypes)
    if not backends:
        return report
    total = len(shapes) * len(dtypes) * len(backends)
    start = time.perf_counter()
    for dtype in dtypes:
        for shape in shapes:
            data = _prepare(rule, shape, dims, dtype, seed, device)
            golden, _ = _run(rule, "naive", data, torch.float64)
            reference, _ = _run(rule, "naive", data, dtype)
            for backend in backends:
                case = _run_case(rule, backend, data, golden, reference, dims)
                report.cases.append(case)
                progress(_progress_line(len(report.cases), total, case))
    report.seconds = time.perf_counter() - start
    return report


def _progress_line(index, total, case: CaseResult) -> str:
    head = f"[{index}/{total}] {case.backend} {case.label} {_dtype_name(case.dtype)}: "
    if case.passed:
        w = case.worst
        tail = f"ok (worst {w.name} {_times(w.score)}x ref)" if w else "ok"
    else:
        tail = "FAIL (" + _failed_names(case) + ")"
    return head + tail + f" {case.seconds:.1f}s"


# ---------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``recdsl test``; ``command`` runs it."""
    parser.add_argument("file", metavar="FILE", help="a .rec rule file")
    parser.add_argument("--backend", action="append", metavar="NAME",
                        help="a backend to test (repeatable; default: every available one "
                        "except the naive loop, which is the reference)")
    add_dims_option(parser, "default K=48, V=40, 24 for other dims, 2 for a dim a 'for' loop "
                    "runs over", metavar="K=48,V=40")
    parser.add_argument("--dtype", action="append", choices=list(DTYPE_NAMES),
                        help="dtype of the inputs (repeatable; default float32; float16 and "
                        "bfloat16 test the forward only)")
    parser.add_argument("--quick", action="store_true", help="T = 1, 17, 65 only")
    parser.add_argument("--verbose", action="store_true",
                        help="every quantity of every case, not only of failing ones")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_const_option(parser)


def command(args) -> int:
    """Run ``recdsl test``: progress to stderr, then the table and a summary line. Exit 0 if
    every case passes, else 1."""
    from .. import load  # the package imports the runtime: import it late

    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        # Triton backends can run on CPU tensors only through the interpreter; it must be
        # set before any kernel is built.
        os.environ["TRITON_INTERPRET"] = "1"
        print("no GPU: Triton backends run under TRITON_INTERPRET=1 (slow)", file=sys.stderr)
    consts = merged(args.const)
    rule = load(args.file, **consts)
    dims = merged(args.dims)
    report = run_autotest(rule, backends=args.backend, dims=dims,
                          shapes=default_shapes(quick=args.quick), dtypes=args.dtype, seed=args.seed,
                          progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(report.table(verbose=args.verbose))
    print()
    print(report.summary())
    return 0 if report.passed else 1
