"""CPU benchmark of the diagonal family's chunkwise PyTorch path (backend="torch-chunk").

GLA, retention, Mamba-2 (K = V = 64, N = P = 64) and Raven (M = 256 slots, topk = 32,
K = V = 64: the paper's defaults), from examples/*.rec, at B=1, H=4, fp32, over several
sequence lengths: the naive loop, torch-chunk and, when fla-core is installed,
flash-linear-attention's PyTorch references (loaded from their files, without importing the
fla package): naive_recurrent_gla for GLA, naive_chunk_simple_gla for retention (log-decay
log(gamma)) and for Mamba-2 (q = C, k = dt * B, v = x, g = -exp(A_log) * dt, scale 1, plus
D * x). Raven has no fla counterpart. Forward (no_grad) and forward+backward: median wall
time (perf_counter) and CPU time (process_time) of several runs in this process, the methods
interleaved, one torch thread by default (the machine's cores are shared: more threads wait
on each other); a table on stdout and a PNG plot (wall time).

The per-token loops (recdsl's naive loop, fla's naive_recurrent_gla) are timed only up to
--loop-max-t and extrapolated linearly in T beyond it (marked ~ in the table, hollow in the
plot). Run from the repository root:

    python3 benchmarks/bench_diagonal.py            # T = 1K, 4K, 16K
    python3 benchmarks/bench_diagonal.py --quick    # T = 1K, 4K, one run each
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import recdsl  # noqa: E402
from recdsl.bench import run_once, timed  # noqa: E402,F401
from recdsl.runtime.sample import sample_inputs  # noqa: E402

B, H = 1, 4
DIMS = {"K": 64, "V": 64, "N": 64, "P": 64, "M": 256}
TOPK = 32
RULES = ("gla", "retention", "mamba2", "raven")
LOOPS = ("naive loop", "fla naive_recurrent_gla")  # per-token Python loops


# ---------------------------------------------------------------- timing


# ---------------------------------------------------------------- the contenders


def load_fla(folder, name):
    """fla/ops/<folder>/naive.py loaded by path, or None (fla-core or einops missing)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "ops" / folder / "naive.py"
    try:
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        return module
    except Exception as err:  # einops missing, or moved in another release
        print(f"# fla found but {path} could not be loaded ({err!r}): skipped")
        return None


def contenders(name, rule, fla):
    """method -> fn(inputs) -> output [B, T, H, V]."""
    out = {
        "naive loop": lambda x: rule(**x, backend="naive")[0],
        "torch-chunk": lambda x: rule(**x, backend="torch-chunk")[0],
    }
    gla, simple = fla
    if name == "gla" and gla is not None:
        out["fla naive_recurrent_gla"] = lambda x: gla.naive_recurrent_gla(
            x["q"], x["k"], x["v"], x["gk"])[0]
    if name == "retention" and simple is not None:
        def retention(x):
            g = torch.log(x["gamma"]).expand(x["q"].shape[:3])
            return simple.naive_chunk_simple_gla(x["q"], x["k"], x["v"], g)[0]
        out["fla naive_chunk_simple_gla"] = retention
    if name == "mamba2" and simple is not None:
        def mamba2(x):
            dt = x["dt"]
            y = simple.naive_chunk_simple_gla(x["C"], x["B"] * dt.unsqueeze(-1), x["x"],
                                              -torch.exp(x["A_log"]) * dt, scale=1.0)[0]
            return y + x["D"].unsqueeze(-1) * x["x"]
        out["fla naive_chunk_simple_gla"] = mamba2
    return out


# ---------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T = 1K, 4K only, one timed run each")
    p.add_argument("--T", type=int, nargs="+", help="sequence lengths (default 1024 4096 16384)")
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--reps", type=int, default=3, help="timed runs per figure (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--loop-max-t", type=int, default=1024,
                   help="time the per-token loops only up to this T, extrapolate beyond")
    p.add_argument("--plot", default=str(ROOT / "benchmarks" / "bench_diagonal.png"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = args.T or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    reps = 1 if args.quick else args.reps

    fla = (load_fla("gla", "fla_gla_naive"), load_fla("simple_gla", "fla_simple_gla_naive"))
    print(f"# B={B} H={H}, K=V=N=P=64, raven M={DIMS['M']} topk={TOPK}, fp32, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    if fla == (None, None):
        print("# fla-core is not installed: its references are skipped")

    results = {}  # (rule, method, T, backward) -> (seconds, extrapolated)
    methods = {}
    for name in args.rules:
        consts = {"topk": TOPK} if name == "raven" else {}
        rule = recdsl.load(ROOT / "examples" / f"{name}.rec", **consts)
        fns = contenders(name, rule, fla)
        methods[name] = list(fns)
        dims = {d: DIMS[d] for d in rule.dims}
        for T in lengths:
            inputs = sample_inputs(rule, batch=B, time=T, heads=H, dims=dims)
            if T == lengths[0]:
                check(name, fns, inputs)
            for backward in (False, True):
                timing = {}
                for method, fn in fns.items():
                    if method in LOOPS and T > args.loop_max_t and T != lengths[0]:
                        base = max([t for t in lengths if t <= args.loop_max_t] or lengths[:1])
                        wall, cpu = results[(name, method, base, backward)][0]
                        results[(name, method, T, backward)] = ((wall * T / base, cpu * T / base), True)
                    else:
                        timing[method] = run_once(fn, inputs, backward)
                for method, seconds in timed(timing, reps, 30.0).items():
                    results[(name, method, T, backward)] = (seconds, False)
            print(f"# {name} T={T} done", file=sys.stderr)
    print_table(results, methods, lengths)
    plot(results, methods, lengths, args.plot)


def check(name, fns, inputs):
    """The contenders compute the same thing: max difference to the naive loop on a prefix."""
    short = {n: (t[:, :256] if t.dim() >= 3 else t) for n, t in inputs.items()}
    with torch.no_grad():
        want = fns["naive loop"](short)
        diffs = ", ".join(f"{m} {(fn(short) - want).abs().max().item():.1e}"
                          for m, fn in fns.items() if m != "naive loop")
    print(f"# check {name} (T=256): max |method - naive loop|: {diffs}")


def fmt(entry, which):
    seconds, extrapolated = entry[0][which], entry[1]
    text = f"{seconds * 1e3:,.0f}" if seconds >= 0.01 else f"{seconds * 1e3:.2f}"
    return ("~" if extrapolated else "") + text


def print_table(results, methods, lengths):
    print()
    print("| rule | T | method | fwd ms | fwd+bwd ms | fwd cpu ms | fwd+bwd cpu ms "
          "| time / torch-chunk's: fwd, fwd+bwd (wall; cpu) |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for name, names in methods.items():
        for T in lengths:
            chunk = [results[(name, "torch-chunk", T, bw)][0] for bw in (False, True)]
            for method in names:
                fwd, both = (results[(name, method, T, bw)] for bw in (False, True))
                ratio = ""
                if method != "torch-chunk":
                    ratio = (f"{fwd[0][0] / chunk[0][0]:.1f}x, {both[0][0] / chunk[1][0]:.1f}x; "
                             f"{fwd[0][1] / chunk[0][1]:.1f}x, {both[0][1] / chunk[1][1]:.1f}x")
                print(f"| {name} | {T} | {method} | {fmt(fwd, 0)} | {fmt(both, 0)} "
                      f"| {fmt(fwd, 1)} | {fmt(both, 1)} | {ratio} |")
    print()
    print("~: extrapolated linearly in T from the largest T timed (per-token loops). A ratio "
          "above 1 means torch-chunk is faster.")


def plot(results, methods, lengths, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed: no plot (pip install matplotlib)")
        return
    names = list(methods)
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        for row, backward in enumerate((False, True)):
            ax = axes[row][col]
            for method in methods[name]:
                pts = [results[(name, method, T, backward)] for T in lengths]
                line, = ax.plot(lengths, [s[0] for s, _ in pts], label=method)
                for T, (s, extrapolated) in zip(lengths, pts):
                    ax.plot([T], [s[0]], "o", color=line.get_color(),
                            markerfacecolor="none" if extrapolated else line.get_color())
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{name}, {'forward+backward' if backward else 'forward'}")
            ax.set_xlabel("T")
            ax.set_ylabel("wall seconds")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"diagonal family on CPU, B={B} H={H}, fp32 (hollow: extrapolated)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"# plot: {path}")


if __name__ == "__main__":
    main()
