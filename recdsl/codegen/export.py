"""``recdsl compile FILE -o DIR [--arch sm_90 --report]``: the generated code of a rule as
files, and optionally an ahead-of-time build report for a GPU architecture.

Every generator in ``GENERATORS`` turns (checked rule, dim sizes) into a ``GeneratedModule``
(its source and the kernels in it, with how to build them); a new family of kernels (the
chunkwise ones) is one more entry there. Each file written gets a header naming the rule,
its file, the dims, the consts and the recdsl and Triton versions. Next to the kernel
modules goes the token's forward and adjoint programs as PyTorch: the readable reference
the kernels are printed from.

The lead wires this into the CLI with ``add_arguments(parser)`` and ``command(args)``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import RecdslError
from ..ir.checked import CheckedRule
from ..ir.ssa import lower
from ..ir.vjp import adjoint
from ..options import add_const_option, add_dims_option, merged
from . import aot, precision
from .printers import torch_program
from .recurrent import generate as generate_recurrent

DEFAULT_DIM = 64  # a typical head dim; the build report's default sizes
DEFAULT_LOOP_DIM = 2  # a dim a `for` loop runs over (unrolled in the kernels): e.g. NH

# the variant built for the report: every feature on (the superset of the work a launch does)
_RECURRENT_FORWARD = {"USE_INITIAL": True, "STORE_FINAL": True, "IS_VARLEN": True, "CKPT": 16}
_RECURRENT_BACKWARD = {"USE_FINAL_GRAD": True, "IS_VARLEN": True, "CKPT": 16}
_VARIANT = "initial state, final state, packed sequences, checkpoints every 16 tokens"


# --------------------------------------------------------------------- dims


def default_dims(rule: CheckedRule, given: dict | None = None) -> dict:
    """Every dim's size: ``given``, else 2 for a dim a ``for`` loop runs over, else 64."""
    return rule.dim_sizes(given, DEFAULT_DIM, DEFAULT_LOOP_DIM)


# --------------------------------------------------------------------- generators


def _recurrent_arg_types(args: list) -> dict:
    """Argument types by the generator's naming: inputs, params, outputs and output
    gradients have the caller's dtype; states, checkpoints and gradients are fp32."""
    types = {}
    for name in args:
        if name.startswith(("p_in_", "p_par_", "p_out_", "p_do_")):
            types[name] = aot.DATA
        elif name.startswith("p_"):
            types[name] = "*fp32"
        elif name == "cu_seqlens":
            types[name] = "*i64"
        else:
            types[name] = "i32"
    return types


def recurrent_module(rule: CheckedRule, sizes: dict) -> aot.GeneratedModule:
    spec = generate_recurrent(rule, sizes)
    kernels = [
        aot.KernelEntry(spec.forward_name, _recurrent_arg_types(spec.forward_args),
                        dict(_RECURRENT_FORWARD), spec.num_warps, _VARIANT),
        aot.KernelEntry(spec.backward_name, _recurrent_arg_types(spec.backward_args),
                        dict(_RECURRENT_BACKWARD), spec.backward_num_warps, _VARIANT),
    ]
    return aot.GeneratedModule("recurrent", f"{rule.name}_recurrent.py", spec.source, kernels)


def chunk_delta_modules(rule: CheckedRule, sizes: dict, precision=None) -> list:
    """The chunkwise kernels of a delta-family rule: its generated prologue and the fixed
    WY core at the rule's sizes, its products in ``precision``'s formats (none for a rule the
    chunk backend refuses)."""
    from ..runtime.rule import Rule
    from . import chunk_delta, prologue
    full = Rule(rule)
    if full.family != "delta" or prologue.problem(full) is not None:
        return []
    plan = prologue.plan(full, sizes)
    return [prologue.aot_module(full, sizes),
            chunk_delta.aot_module(sizes[plan.key_dim], sizes[plan.value_dim], plan.steps,
                                   read=plan.read_log is not None, precision=precision)]


def chunk_dplr_modules(rule: CheckedRule, sizes: dict, precision=None) -> list:
    """The fixed DPLR chunk core, for a rule the chunk backend runs in the DPLR family, at
    each of its states' (K, V) and the rows of a chunk at the rule's sizes; else none. Its
    products are tf32x3 whatever ``precision`` says (the core has one DOT constexpr; the
    policy is not plugged in yet)."""
    from ..runtime import backends
    from ..runtime import chunk_dplr as runtime
    from ..runtime.rule import Rule
    from . import chunk_dplr
    full = Rule(rule)
    if backends._family_of(full, backends._BY_NAME["chunk"]) != "dplr" \
            or runtime.problem(full) is not None:
        return []
    return [chunk_dplr.aot_module(k, v, rows) for k, v, rows in runtime.core_shapes(full, sizes)]


def _kernel_args(source: str) -> dict:
    """Function name -> its non-constexpr argument names, read from generated source."""
    import ast as pyast
    return {f.name: [a.arg for a in f.args.args if a.annotation is None]
            for f in pyast.parse(source).body if isinstance(f, pyast.FunctionDef)}


def chunk_diagonal_modules(rule: CheckedRule, sizes: dict, precision=None) -> list:
    """The chunkwise kernels of a diagonal-family rule: its generated stage prologues and the
    fixed pass kernels, once per distinct pass shape at the rule's sizes (the GPU tiles and the
    default chunk of ``recdsl.runtime.chunk_diagonal``); none for a rule the backend refuses."""
    from ..runtime import chunk_diagonal as runtime
    from ..runtime.rule import Rule
    from . import chunk_diagonal
    full = Rule(rule)
    if full.family != "diagonal" or chunk_diagonal.problem(full) is not None:
        return []
    the_plan = chunk_diagonal.plan(full)
    spec = chunk_diagonal.generate_prologue(full, sizes, the_plan)
    args = _kernel_args(spec.source)
    caller = {f"p_in_{v.name}" for v in rule.inputs} | {f"p_par_{v.name}" for v in rule.params}

    def types(names):  # inputs and params in the caller's dtype; read values and the rest fp32
        return {n: aot.DATA if n in caller else "*fp32" if n.startswith("p_") else "i32"
                for n in names}

    variant = ", ".join(f"{d}={n}" for d, n in sizes.items())
    entries = [aot.KernelEntry(name, types(args[name]), {"TOKB": runtime.TOKENS_PER_PROGRAM}, 4,
                               variant)
               for info in spec.stages for name in (info["forward"], info["backward"])]
    modules = [aot.GeneratedModule("chunk-diagonal-prologue", f"{rule.name}_chunk_diagonal_prologue.py",
                                   spec.source, entries)]
    passes = aot.GeneratedModule("chunk-diagonal", "chunk_diagonal.py", chunk_diagonal.SOURCE, [])
    shapes = {}  # passes of one shape run the same kernels
    for p in the_plan.passes:
        shapes.setdefault(p.shape(sizes, runtime.CHUNK_SIZE), []).append(p)
    for shape, same in shapes.items():
        name = "pass " + ", ".join(f"{p.index} ({p.x_dim} x {p.y_dim})" for p in same)
        passes.kernels += chunk_diagonal.aot_module(shape, name, precision).kernels
    return modules + [passes]


def scan_modules(rule: CheckedRule, sizes: dict, precision=None) -> list:
    """The fixed linear-scan kernels of a scan-family rule, for the channels of its widest
    state (a head's entries; the launch multiplies them by the heads); none for other rules."""
    import math

    from ..runtime.rule import Rule
    from . import scan_kernels
    full = Rule(rule)
    if not full.family_info.accepts("scan"):
        return []
    channels = max(math.prod(sizes[d] for d in s.dims) for s in rule.states)
    return [scan_kernels.aot_module(channels)]


def derived_modules(rule: CheckedRule, sizes: dict, precision=None) -> list:
    """The kernels of the derived rule a staged rule (mLSTM: C and n given m) or a rule with
    its reads lowered runs on the chunk and scan backends: that rule's chunk and scan modules
    (a dim the derivation adds, the lifted vector states' ONE, has size 1)."""
    from ..runtime.rule import Rule
    info = Rule(rule).family_info
    derived = info.staged.derived if info.staged is not None else (
        info.lowered.derived if info.lowered is not None else None)
    if derived is None:
        return []
    inner = {d: sizes.get(d, 1) for d in derived.ir.dims}
    modules = [m for make in (chunk_delta_modules, chunk_diagonal_modules, chunk_dplr_modules,
                              scan_modules, derived_modules)
               for m in make(derived.ir, inner, precision)]
    return modules


def newton_modules(rule: CheckedRule, sizes: dict, precision=None) -> list:
    """The linear-solve kernels of the newton backend for a rule it runs: the elementwise scan
    over a head's entries for a diagonal Jacobian (its forward kernels: the backward solves
    the transposed recurrence forward again), else the k x k solve at the rule's block width
    (``recdsl.codegen.newton_kernels``); none for other rules."""
    import math

    from ..ir.jacobian import structure
    from ..runtime import newton
    from ..runtime.rule import Rule
    from . import newton_kernels, scan_kernels
    full = Rule(rule)
    if newton.problem(full) is not None:
        return []
    s = structure(rule, sizes)
    if s.kind == "diagonal":
        scan = scan_kernels.aot_module(math.prod(sizes[d] for d in s.channels) * s.block_size(sizes))
        return [aot.GeneratedModule("newton", scan.filename, scan.source,
                                    [k for k in scan.kernels if k.name.startswith("linear_scan_fwd")])]
    return [newton_kernels.aot_module([s.block_size(sizes)])]


# Each generator gives a list of modules for (checked rule, sizes, the chunk kernels'
# ``recdsl.codegen.precision.Precision`` or None): empty where it does not apply.
GENERATORS = (lambda rule, sizes, precision=None: [recurrent_module(rule, sizes)],
              chunk_delta_modules, chunk_diagonal_modules, chunk_dplr_modules, scan_modules,
              derived_modules, newton_modules)


def generated_modules(rule: CheckedRule, sizes: dict, precision=None) -> list:
    return [module for make in GENERATORS for module in make(rule, sizes, precision)]


def torch_programs(rule: CheckedRule, sizes: dict) -> str:
    """One token's forward and adjoint programs as PyTorch functions (the ssa programs the
    kernels are printed from). Every value is batched: [B, H, *its dims]."""
    forward = lower(rule, sizes)
    fwd_results = list(forward.outputs.values()) + list(forward.states_out.values())
    adj = adjoint(lower(rule, sizes))
    prog = adj.program
    bwd_results = ([adj.grad_inputs.get(k) for k in prog.inputs] + [adj.grad_params.get(p) for p in prog.params]
                   + [adj.grad_states_in.get(s) for s in prog.states_in])
    doc = [
        '"""One token of the rule as PyTorch: every value is [B, H, *its dims].',
        "",
        "token_forward(sources...) -> (outputs..., states after the token...)",
        "token_backward(sources..., output gradients..., state gradients...) ->",
        "    (input gradients..., param gradients..., gradients of the states entering the token...)",
        "None marks a quantity no gradient reaches. The arguments:",
    ]
    for source in prog.sources():
        what = f"{source.name}[{source.index}]" if source.index is not None else source.name
        shape = f"[{', '.join(source.out.shape)}]" if source.out.shape else "scalar"
        doc.append(f"    {source.out.id}: {source.kind.replace('_', ' ')} {what} {shape}")
    doc += [
        '"""',
        "import torch",
        "",
        "from recdsl.codegen import torch_support as _rt",
        "",
        "",
    ]
    fwd = torch_program(forward, "token_forward", [s.out for s in forward.sources()], fwd_results, sizes)
    bwd = torch_program(prog, "token_backward", [s.out for s in prog.sources()], bwd_results, sizes)
    return "\n".join(doc) + fwd + "\n\n" + bwd


def _number(v) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else repr(v)


def header(rule: CheckedRule, sizes: dict, what: str) -> str:
    """Comment lines naming the rule, its file, the dims, the consts and the versions."""
    import triton

    from .. import __version__
    dims = ", ".join(f"{d}={n}" for d, n in sizes.items())
    consts = ", ".join(f"{k}={_number(v)}" for k, v in rule.consts.items()) or "none"
    lines = [
        f"# {what} for rule '{rule.name}' ({rule.filename}).",
        f"# Generated by recdsl {__version__} (Triton {triton.__version__}); do not edit: regenerate with",
        f"#   recdsl compile {rule.filename} -o DIR --dims {','.join(f'{d}={n}' for d, n in sizes.items())}"
        + "".join(f" --const {k}={_number(v)}" for k, v in rule.consts.items()),
        f"# Dims: {dims}. Consts: {consts}.",
        "# The rule:",
    ]
    lines += [f"#   {line}".rstrip() for line in rule.source.strip().splitlines()]
    return "\n".join(lines) + "\n\n"


_WHAT = {"recurrent": "Fused recurrent Triton kernels (forward and backward)"}


def write_sources(rule: CheckedRule, sizes: dict, out_dir) -> list:
    """Write every generated module and the PyTorch token programs into ``out_dir``."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RecdslError(f"cannot create the output folder {out}: {err.strerror}") from None
    files = [(m.filename, header(rule, sizes, _WHAT.get(m.kind, f"{m.kind} kernels")) + m.source)
             for m in generated_modules(rule, sizes)]
    files.append((f"{rule.name}_token_torch.py",
                  header(rule, sizes, "One token's forward and adjoint programs in PyTorch")
                  + torch_programs(rule, sizes)))
    written = []
    for name, text in files:
        path = out / name
        try:
            path.write_text(text)
        except OSError as err:
            raise RecdslError(f"cannot write {path}: {err.strerror}") from None
        written.append(path)
    return written


# --------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a .rec rule file")
    parser.add_argument("-o", "--output", metavar="DIR",
                        help="write the generated source files into DIR")
    add_dims_option(parser, f"default {DEFAULT_DIM}, or {DEFAULT_LOOP_DIM} for a dim a 'for' loop "
                    "runs over")
    add_const_option(parser)
    parser.add_argument("--arch", choices=sorted(aot.ARCHS), action="append",
                        help="build every kernel ahead of time for this GPU architecture "
                        "(no GPU needed; repeatable)")
    parser.add_argument("--report", action="store_true",
                        help="with --arch: print registers, spills, shared memory and build "
                        "time per kernel; exit 1 if a kernel spills or needs too much shared memory")
    parser.add_argument("--dtype", choices=sorted(aot.DTYPES), default="float32",
                        help="dtype of the inputs and outputs the kernels are built for "
                        "(default float32)")
    parser.add_argument("--precision", choices=precision.NAMES, default="auto",
                        help="the chunk kernels' precision policy (as rule(..., precision=); "
                        "default auto: by --dtype)")


def command(args) -> int:
    """Run ``recdsl compile``; returns the exit code. RecdslErrors propagate to the CLI."""
    from .. import load
    if not args.output and not args.arch:
        raise RecdslError("nothing to do: give -o DIR to write the generated sources, "
                          "and/or --arch sm_80|sm_90 --report to build them")
    if args.report and not args.arch:
        raise RecdslError("--report needs --arch sm_80 or sm_90")
    rule = load(args.file, **merged(args.const)).ir
    given = {}
    for d in args.dims or ():
        given.update(d)
    sizes = default_dims(rule, given)
    if args.output:
        for path in write_sources(rule, sizes, args.output):
            print(f"wrote {path}")
    failed = False
    for name in args.arch or ():
        failed |= not report(rule, sizes, aot.ARCHS[name], args.dtype, verbose=args.report,
                             policy=args.precision)
    return 1 if failed else 0


def report(rule: CheckedRule, sizes: dict, arch: aot.Arch, dtype: str = "float32",
           verbose: bool = True, out=None, err=None, policy: str = "auto") -> bool:
    """Build every kernel for ``arch``, the chunk kernels' products in the formats of the
    precision ``policy`` for ``dtype`` inputs; print the table (``verbose``) to ``out`` and
    any problem to ``err``. True when no kernel spills or needs more shared memory than
    ``arch`` has."""
    import torch
    out, err = out or sys.stdout, err or sys.stderr
    dims = " ".join(f"{d}={n}" for d, n in sizes.items())
    dots = precision.resolve(policy, getattr(torch, dtype), interpreted=False)
    builds = []
    for module in generated_modules(rule, sizes, dots):
        builds += aot.build_module(module, arch, dtype,
                                   progress=lambda text: print(f"  {text} ...", file=err, flush=True))
    found = aot.problems(builds, arch)
    repeated = aot.repeated_names(builds)  # their variants are in the table, after the name
    variants = list(dict.fromkeys(b.variant for b in builds if b.variant and b.kernel not in repeated))
    if verbose:
        print(f"rule {rule.name} ({rule.filename}) on {arch.name}: {dims}, {dtype} inputs, "
              f"precision {policy} ({dots.policy}: {dots.describe()}), "
              f"built with {aot.ptxas_version(arch)}", file=out)
        for v in variants:
            print(f"variant built: {v}", file=out)
        print(aot.format_table(builds, arch), file=out)
    out.flush()
    for text in found:
        print(f"error: {text}", file=err)
    if verbose and not found:
        print(f"ok: no kernel spills; shared memory within {arch.limit_text}", file=out)
    return not found
