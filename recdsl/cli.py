"""The ``recdsl`` command line.

Each subcommand is one ``_add_<name>`` function that adds its parser and sets ``handler`` to
a function ``(args) -> exit code``; ``COMMANDS`` lists them in the order ``--help`` shows.
A ``RecdslError`` is printed as its message (positioned for rule text), never as a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import __version__, load
from .errors import RecdslError, SpecError
from .ir import pretty
from .options import add_const_option, add_dims_option, merged
from .runtime import sample

# ---------------------------------------------------------------- shared pieces


def _report(err: RecdslError) -> None:
    # a SpecError already reads "file:line:col: error: ..."
    print(str(err) if isinstance(err, SpecError) else f"error: {err}", file=sys.stderr)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
        if value < 1:
            raise ValueError(text)
        return value
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None


def _rule_path(arg: str) -> str:
    """A FILE argument: an existing file as given, else the shipped example of that name
    (``recdsl check gated_delta``, see recdsl.examples); a name that is neither is an error
    listing the shipped examples. A path with a directory or a .rec suffix stays a path."""
    from . import examples
    if os.path.exists(arg) or os.sep in arg:
        return arg
    stem = arg[:-4] if arg.endswith(".rec") else arg
    if stem not in examples.names() and arg.endswith(".rec"):
        return arg  # a missing file: loading it says so
    return str(examples.path(stem))


# ---------------------------------------------------------------- recdsl check


def _add_check(sub):
    p = sub.add_parser("check", help="parse and check rule files, and summarise each",
                       description="Parse and check each rule file and print a summary: its "
                       "declarations, then every per-token statement with its line and the "
                       "shape of its value. Exits 1 if any file has an error.")
    p.add_argument("files", nargs="+", metavar="FILE", help="a .rec rule file")
    add_const_option(p)
    p.set_defaults(handler=_check)


def _check(args) -> int:
    failed = shown = 0
    for path in args.files:
        try:
            rule = load(_rule_path(path), **merged(args.const))
        except RecdslError as err:
            _report(err)
            failed += 1
            continue
        print(("\n" if shown else "") + pretty.summary(rule.ir))
        shown += 1
    return 1 if failed else 0


# ---------------------------------------------------------------- recdsl run


def _add_run(sub):
    p = sub.add_parser("run", help="run a rule's naive loop on random inputs",
                       description="Run a rule's naive loop forward on random inputs (see "
                       "recdsl.runtime.sample for how they are chosen), then a backward pass "
                       "of the sum of its outputs, and print statistics of the outputs, final "
                       "states and gradients. Exits 1 if any of them is not finite.")
    p.add_argument("file", metavar="FILE", help="a .rec rule file")
    add_dims_option(p, "default 32, or 2 for a dim a 'for' loop runs over")
    p.add_argument("--batch", type=_positive_int, default=2, help="batch size (default 2)")
    p.add_argument("--time", type=_positive_int, default=64, help="sequence length (default 64)")
    p.add_argument("--heads", type=_positive_int, default=2, help="heads (default 2)")
    add_const_option(p)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="dtype of the inputs (default float32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(handler=_run)


def _stats_row(name, what, t):
    t = t.detach().double()
    finite = bool(torch.isfinite(t).all())
    shape = "[" + ", ".join(map(str, t.shape)) + "]"
    numbers = (t.mean(), t.std(correction=0), t.min(), t.max())
    return [name, what, shape, *(f"{x.item():.4g}" for x in numbers), "yes" if finite else "NO"]


def _table(rows) -> str:
    header = ["name", "what", "shape", "mean", "std", "min", "max", "finite"]
    rows = [header] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    # names and shapes to the left, numbers to the right
    align = ["<", "<", "<", ">", ">", ">", ">", ">"]
    return "\n".join("  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, align, widths)).rstrip()
                     for r in rows)


def _run(args) -> int:
    rule = load(args.file, **merged(args.const))
    dims = merged(args.dims)
    dtype = getattr(torch, args.dtype)
    inputs = sample.sample_inputs(rule, batch=args.batch, time=args.time, heads=args.heads,
                                  dims=dims, dtype=dtype, seed=args.seed)
    sizes = sample.dim_sizes(rule, dims)
    kinds = sample.value_kinds(rule)
    print(f"rule {rule.name} ({args.file}): naive loop, {args.dtype}, seed {args.seed}")
    print(f"  B={args.batch} T={args.time} H={args.heads}  "
          + " ".join(f"{d}={n}" for d, n in sizes.items()))
    by_kind = {}
    for name, kind in kinds.items():
        by_kind.setdefault(kind, []).append(name)
    print("  inputs: " + "; ".join(f"{kind}: {', '.join(names)}" for kind, names in by_kind.items()))
    for t in inputs.values():
        t.requires_grad_(True)

    start = time.perf_counter()
    outputs, finals = rule(**inputs, output_final_state=True, backend="naive")
    forward = time.perf_counter() - start
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    finals = finals if isinstance(finals, tuple) else (finals,)
    start = time.perf_counter()
    sum(o.sum() for o in outputs).backward()
    backward = time.perf_counter() - start

    rows = [_stats_row(v.name, "output", o) for v, o in zip(rule.outputs, outputs)]
    rows += [_stats_row(v.name, "final state", s) for v, s in zip(rule.states, finals)]
    rows += [_stats_row(n, "gradient", t.grad) for n, t in inputs.items() if t.grad is not None]
    print()
    print(_table(rows))
    print()
    print(f"elapsed: forward {forward:.3f} s, backward {backward:.3f} s")
    bad = [f"{r[0]} ({r[1]})" for r in rows if r[-1] != "yes"]
    if bad:
        print("error: not finite: " + ", ".join(bad), file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- recdsl show


def _add_show(sub):
    p = sub.add_parser("show", help="print a rule's family, recurrence and reads",
                       description="Print the rule's family (for a rule with no chunkwise form, "
                       "the reason and where it is), each state's recurrence in mathematical "
                       "form, and the reads. With --grad, also the generated PyTorch code of one "
                       "token's forward and reverse-mode step.")
    p.add_argument("file", metavar="FILE", help="a .rec rule file")
    p.add_argument("--grad", action="store_true", help="also print the derivative code")
    add_dims_option(p, "for the derivative code; default 32, or 2 for a dim a 'for' loop runs over")
    add_const_option(p)
    p.set_defaults(handler=_show)


def _show(args) -> int:
    from .codegen.torch_step import step_source
    from .ir.family import classify
    from .runtime import backends
    from .ir.show import render

    rule = load(args.file, **merged(args.const))
    grad = None
    if args.grad:
        sizes = sample.dim_sizes(rule, merged(args.dims))
        grad = step_source(rule.ir, sizes, grad=True).source
    order = {"the CPU": backends.available(rule, "cpu"),
             "a GPU": backends.available(rule, "cuda")}
    print(render(rule.ir, grad_code=grad, family=classify(rule.ir, rule.analysis),
                 backends=backends.refusals(rule), order=order))
    return 0


# ---------------------------------------------------------------- recdsl test


def _add_test(sub):
    from .runtime import autotest  # its options and command live beside the autotester

    p = sub.add_parser("test", help="test every backend of a rule against the float64 naive loop",
                       description="Run the rule with each backend on a grid of shapes and "
                       "compare outputs, final states and gradients with the naive loop in "
                       "float64. A backend passes when its error is at most a small factor above "
                       "the naive loop's own error in the same dtype. Exits 1 if any case fails.")
    autotest.add_arguments(p)
    p.set_defaults(handler=autotest.command)


# ---------------------------------------------------------------- the parser and main

# ---------------------------------------------------------------- recdsl compile


def _add_compile(sub):
    from .codegen import export  # its options and command live beside the exporter

    p = sub.add_parser("compile", help="write a rule's generated code; build it for a GPU",
                       description="Write every generated source file of the rule (-o DIR), and "
                       "with --arch build each kernel ahead of time for that GPU architecture "
                       "(no GPU needed); --report prints registers, spills, shared memory and "
                       "build time per kernel and exits 1 if a kernel spills or needs more shared "
                       "memory than the architecture has.")
    export.add_arguments(p)
    p.set_defaults(handler=export.command)


# ---------------------------------------------------------------- recdsl bench


def _lengths(text: str) -> list:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
        if not values or min(values) < 1:
            raise ValueError(text)
        return values
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected T[,T...] of positive whole numbers, got {text!r}") from None


def _add_bench(sub):
    from .runtime.backends import NAMES

    p = sub.add_parser("bench", help="time a rule's backends against the naive loop",
                       description="Time every backend that can run the rule on this machine's "
                       "device (or those named), forward (no_grad) and forward+backward, over "
                       "several sequence lengths, against the naive loop (timed at up to "
                       "--loop-t tokens and extrapolated linearly, marked ~) and, when "
                       "installed, the peer reference of the same name (fla for gated_delta, "
                       "gla, retention, kda; mlstm_kernels for mlstm). Prints a table (time, "
                       "tokens/s, peak memory, speed-up) and writes a plot of time against T "
                       "when matplotlib is installed. Progress goes to stderr.")
    p.add_argument("file", metavar="FILE", help="a .rec rule file")
    p.add_argument("--T", type=_lengths, metavar="1024,4096,16384",
                   help="sequence lengths (default 1024,4096,16384; --quick: 256,1024)")
    p.add_argument("--backend", action="append", metavar="NAME", choices=NAMES,
                   help="a backend to time (repeatable; default: every one that runs the rule "
                   "here, Triton's CPU interpreter excluded)")
    add_dims_option(p, "default 64 each, or 2 for a dim a 'for' loop runs over")
    p.add_argument("--batch", type=_positive_int, default=2, help="batch size (default 2)")
    p.add_argument("--heads", type=_positive_int, default=4, help="heads (default 4)")
    add_const_option(p)
    p.add_argument("--vs", default="naive", metavar="METHOD",
                   help="the method the speed-up column divides by (default naive)")
    p.add_argument("--plot", metavar="OUT.png", help="where to write the plot (default "
                   "bench_<rule>.png in the current directory)")
    p.add_argument("--quick", action="store_true", help="T = 256, 1024 (unless --T), one run each")
    p.add_argument("--reps", type=_positive_int, default=3, help="timed runs per figure (median)")
    p.add_argument("--loop-t", type=_positive_int, default=1024,
                   help="time the naive loop at up to this T, extrapolate beyond (default 1024)")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.set_defaults(handler=_bench)


def _bench(args) -> int:
    from . import bench

    rule = load(args.file, **merged(args.const))
    loops = rule.ir.loop_dims()
    dims = {d: (2 if d in loops else 64) for d in rule.ir.dims}
    dims.update(merged(args.dims))
    torch.set_num_threads(args.threads)
    lengths = args.T or ([256, 1024] if args.quick else [1024, 4096, 16384])
    tty = sys.stderr.isatty()

    def progress(done, total, text):
        head = f"[{done}/{total}] " if done is not None else ""
        end = "\r" if tty else "\n"
        print(f"{head}{text}".ljust(70 if tty else 0), end=end, file=sys.stderr, flush=True)

    result = bench.bench(rule, lengths, backends=args.backend, dims=dims, batch=args.batch,
                         heads=args.heads, device=args.device, reps=1 if args.quick else args.reps,
                         loop_t=args.loop_t, vs=args.vs, memory=not args.no_memory,
                         rule_path=args.file, consts=merged(args.const), progress=progress)
    if tty:
        print(file=sys.stderr)
    print(bench.table(result))
    print(bench.plot(result, args.plot or f"bench_{rule.name}.png"))
    return 0


COMMANDS = (_add_check, _add_show, _add_run, _add_test, _add_compile, _add_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recdsl", description="Recurrent update rules as text files, lowered to kernels.")
    parser.add_argument("--version", action="version", version=f"recdsl {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version or a usage error, already printed
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 2
    try:
        if isinstance(getattr(args, "file", None), str):
            args.file = _rule_path(args.file)
        return args.handler(args)
    except RecdslError as err:
        _report(err)
        return 1
    except BrokenPipeError:  # the reader stopped early (recdsl check ... | head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
