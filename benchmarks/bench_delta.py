"""CPU benchmark of the delta family's chunkwise PyTorch path (backend="torch-chunk").

Gated DeltaNet (examples/gated_delta.rec) at B=2, H=4, K=V=64 over several sequence lengths:
the naive loop, torch-chunk, and, when fla-core is installed, flash-linear-attention's
PyTorch references naive_chunk_gated_delta_rule and naive_recurrent_gated_delta_rule (loaded
from their file, without importing the fla package). Forward and forward+backward, median
wall and CPU time of several runs in this process; torch-chunk's achieved GFLOP/s against the
machine's fp32 matmul rate measured in the same run; a table on stdout and a PNG plot.

The per-token loops (recdsl's naive loop, fla's recurrent reference) are timed only up to
--loop-max-t and extrapolated linearly in T beyond it (marked ~ in the table, hollow in the
plot). Run from the repository root:

    python3 benchmarks/bench_delta.py            # T = 1K, 4K, 16K, then a T=65536 forward
    python3 benchmarks/bench_delta.py --quick    # T = 256, 1K: a smoke run
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import recdsl  # noqa: E402
from recdsl.runtime import torch_chunk_delta  # noqa: E402
from recdsl.runtime.sample import sample_inputs  # noqa: E402

B, H, K, V = 2, 4, 64, 64
# torch-chunk's own chunk size on the CPU (the forward-only path and the gradient path alike)
CHUNK = torch_chunk_delta.DEVICE_CHUNK_SIZES.get("cpu", torch_chunk_delta.DEFAULT_CHUNK_SIZE)
FLA_CHUNK = 64  # fla's reference at its default chunk size
L2NORM_EPS = 1e-6  # recdsl's l2norm: x / sqrt(sum(x^2) + 1e-6)


# ---------------------------------------------------------------- timing


def seconds(fn):
    """(wall, CPU) seconds of one call; the CPU time (this process's, all threads) leaves out
    the time spent waiting for a core that other processes share."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def timed(fn, reps, budget):
    """Median wall seconds of ``fn()`` over ``reps`` runs after one warm-up; fewer runs when
    one run takes more than ``budget`` seconds (never fewer than one)."""
    first = seconds(fn)[0]
    if first >= budget:
        return first
    return statistics.median(seconds(fn)[0] for _ in range(reps))


def timed_together(fns: dict, reps, budget) -> dict:
    """(median wall, median CPU) seconds of each function, the runs interleaved (A B C,
    A B C, ...) after one warm-up each, so that a change in the machine's load hits every
    contender alike. A function whose warm-up takes more than ``budget`` seconds is timed by
    that run alone."""
    first = {name: seconds(fn) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if first[name][0] < budget:
                times[name].append(seconds(fn))
    median = lambda runs, i: statistics.median(r[i] for r in runs)
    return {name: (median(times[name], 0), median(times[name], 1)) if times[name] else first[name]
            for name in fns}


def matmul_rate(reps=10) -> float:
    """The machine's fp32 matmul rate in GFLOP/s: a 1024 x 1024 by 1024 x 1024 product."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024 ** 3 / timed(lambda: a @ b, reps, 1.0) / 1e9


def chunk_flops(T, chunk=CHUNK, m=1) -> float:
    """Floating-point operations of torch-chunk's forward-only path (chunk_delta_core's
    _forward_only: its matmuls and the blocked inverse), counted from the algorithm."""
    L, C = chunk * m, chunk
    nc = math.ceil(T / chunk)
    block = min(L, 16)  # SOLVE_BLOCK
    per_chunk = (
        2 * L * L * K  # A = (b a k)(a' k)ᵀ
        + 2 * C * L * K  # P = (q a)(a' k)ᵀ
        + (L // block) * block ** 3 // 3 + 2 * L * L * L // 3  # (I + A)^-1: blocks, then below
        + 2 * L * L * (K + V)  # [W | U] = (I + A)^-1 [b start k | u]
        + 2 * L * K * V * 2  # V' = U - W S and the state update K_endᵀ V'
        + 2 * C * K * V  # the read of the entering state
        + 2 * C * L * V  # P V'
    )
    return nc * B * H * per_chunk


# ---------------------------------------------------------------- the contenders


def load_fla():
    """fla's naive.py for the gated delta rule, loaded by path, or None."""
    spec = importlib.util.find_spec("fla")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "ops" / "gated_delta_rule" / "naive.py"
    try:
        file_spec = importlib.util.spec_from_file_location("fla_gated_delta_naive", path)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        return module
    except Exception as err:  # einops missing, or moved in another release
        print(f"# fla found but {path} could not be loaded ({err!r}): skipped")
        return None


def l2norm(x):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def torch_chunk(rule, chunk):
    """torch-chunk at a forced chunk size (None: the backend's own choice)."""
    def fn(x):
        before, torch_chunk_delta.CHUNK_SIZE = torch_chunk_delta.CHUNK_SIZE, chunk
        try:
            return rule(**x, backend="torch-chunk")[0]
        finally:
            torch_chunk_delta.CHUNK_SIZE = before
    return fn


def contenders(rule, fla, chunks=(CHUNK,)):
    """name -> fn(inputs) -> output. fla gets the same tensors, q and k normalised the way
    the rule does (inside the timed region, as in the rule)."""
    out = {"naive loop": lambda x: rule(**x, backend="naive")[0]}
    out["torch-chunk"] = torch_chunk(rule, None)
    for chunk in chunks:
        if chunk != CHUNK:
            out[f"torch-chunk C={chunk}"] = torch_chunk(rule, chunk)
    if fla is not None:
        out["fla naive_chunk"] = lambda x: fla.naive_chunk_gated_delta_rule(
            l2norm(x["q"]), l2norm(x["k"]), x["v"], x["g"], x["beta"], chunk_size=FLA_CHUNK)[0]
        out["fla naive_recurrent"] = lambda x: fla.naive_recurrent_gated_delta_rule(
            l2norm(x["q"]), l2norm(x["k"]), x["v"], x["beta"], x["g"])[0]
    return out


LOOPS = ("naive loop", "fla naive_recurrent")  # per-token Python loops: timed at small T only


def run_once(fn, inputs, backward):
    def go():
        x = {n: t.detach().requires_grad_(backward) for n, t in inputs.items()}
        if backward:
            out = fn(x)
            out.backward(torch.ones_like(out))
        else:
            with torch.no_grad():
                fn(x)
    return go


# ---------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T = 256, 1024 only; no long run")
    p.add_argument("--T", type=int, nargs="+", help="sequence lengths (default 1024 4096 16384)")
    p.add_argument("--reps", type=int, default=5, help="timed runs per figure (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--loop-max-t", type=int, default=1024,
                   help="time the per-token loops only up to this T, extrapolate beyond")
    p.add_argument("--long", type=int, default=65536,
                   help="T of the final torch-chunk forward finiteness run (0: skip)")
    p.add_argument("--chunks", type=int, nargs="+", default=[64],
                   help=f"torch-chunk chunk sizes to time besides the backend's own ({CHUNK} on "
                        f"the CPU; default: 64)")
    p.add_argument("--plot", default="bench_delta.png", help="where to write the PNG plot")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = args.T or ([256, 1024] if args.quick else [1024, 4096, 16384])
    long_t = 0 if args.quick else args.long

    rule = recdsl.load(ROOT / "examples" / "gated_delta.rec")
    fla = load_fla()
    fns = contenders(rule, fla, args.chunks)
    rate = matmul_rate()
    print(f"# gated_delta, B={B} H={H} K={K} V={V}, fp32, torch-chunk chunk {CHUNK} (fla {FLA_CHUNK}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# fp32 matmul rate (1024 x 1024 x 1024): {rate:.1f} GFLOP/s")
    if fla is None:
        print("# fla-core is not installed: its references are skipped")

    results = {}  # (name, T, backward) -> (wall seconds, CPU seconds, extrapolated)
    for T in lengths:
        inputs = sample_inputs(rule, batch=B, time=T, heads=H, dims={"K": K, "V": V})
        if fla is not None and T == lengths[0]:
            with torch.no_grad():
                ours, theirs = fns["torch-chunk"](inputs), fns["fla naive_chunk"](inputs)
            print(f"# check at T={T}: max |torch-chunk - fla naive_chunk| = "
                  f"{(ours - theirs).abs().max().item():.2e}")
        for backward in (False, True):
            measured = {}
            for name, fn in fns.items():
                if name in LOOPS and T > args.loop_max_t and T != lengths[0]:
                    base = max([t for t in lengths if t <= args.loop_max_t] or lengths[:1])
                    wall, cpu, _ = results[(name, base, backward)]
                    results[(name, T, backward)] = (wall * T / base, cpu * T / base, True)
                else:
                    measured[name] = run_once(fn, inputs, backward)
            for name, (wall, cpu) in timed_together(measured, args.reps, budget=20.0).items():
                results[(name, T, backward)] = (wall, cpu, False)

    print_table(results, fns, lengths, rate)
    if long_t:
        long_run(rule, long_t)
    plot(results, fns, lengths, args.plot)


def fmt(entry, i=0):
    seconds, extrapolated = entry[i], entry[2]
    text = f"{seconds * 1e3:,.0f}" if seconds >= 0.01 else f"{seconds * 1e3:.2f}"
    return ("~" if extrapolated else "") + text


def print_table(results, fns, lengths, rate):
    ref = "fla naive_chunk"
    head = (f"{'T':>6}  {'method':<20} {'fwd ms':>9} {'fwd+bwd ms':>11}   {'CPU: fwd':>8} "
            f"{'fwd+bwd':>8}")
    if ref in fns:
        head += f"   {'fla chunk / this: fwd':>21} {'fwd+bwd':>8}   {'CPU: fwd':>8} {'fwd+bwd':>8}"
    print()
    print(head)
    print("-" * len(head))
    for T in lengths:
        for name in fns:
            fwd, both = results[(name, T, False)], results[(name, T, True)]
            line = (f"{T:>6}  {name:<20} {fmt(fwd):>9} {fmt(both):>11}   {fmt(fwd, 1):>8} "
                    f"{fmt(both, 1):>8}")
            if ref in fns:
                rf, rb = results[(ref, T, False)], results[(ref, T, True)]
                line += (f"   {rf[0] / fwd[0]:>20.1f}x {rb[0] / both[0]:>7.1f}x   "
                         f"{rf[1] / fwd[1]:>7.1f}x {rb[1] / both[1]:>7.1f}x")
            print(line)
    print()
    print("torch-chunk achieved rate (forward flops counted from the algorithm; forward+backward "
          "counted as 3x forward)")
    print(f"{'T':>6}  {'method':<20} {'fwd GFLOP/s':>11} {'% matmul':>9}  {'fwd+bwd GFLOP/s':>15} "
          f"{'% matmul':>9}")
    for T in lengths:
        for name in fns:
            if not name.startswith("torch-chunk"):
                continue
            chunk = int(name.split("=")[1]) if "=" in name else CHUNK  # forward-only flops
            flops = chunk_flops(T, chunk)
            f = flops / results[(name, T, False)][0] / 1e9
            fb = 3 * flops / results[(name, T, True)][0] / 1e9
            print(f"{T:>6}  {name:<20} {f:>11.1f} {100 * f / rate:>8.0f}%  {fb:>15.1f} "
                  f"{100 * fb / rate:>8.0f}%")


def long_run(rule, T):
    inputs = sample_inputs(rule, batch=B, time=T, heads=H, dims={"K": K, "V": V})
    start = time.perf_counter()
    with torch.no_grad():
        out, state = rule(**inputs, backend="torch-chunk", output_final_state=True)
    seconds = time.perf_counter() - start
    finite = bool(torch.isfinite(out).all() and torch.isfinite(state).all())
    print(f"\nT={T} torch-chunk forward: {seconds:.2f} s, outputs and final state finite: {finite}")


def plot(results, fns, lengths, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed (pip install matplotlib): no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, backward in zip(axes, (False, True)):
        for name in fns:
            pts = [(T, results[(name, T, backward)][0], results[(name, T, backward)][2])
                   for T in lengths]
            line, = ax.plot([t for t, _, _ in pts], [s for _, s, _ in pts], marker="o", label=name)
            for t, s, extrapolated in pts:
                if extrapolated:
                    ax.plot([t], [s], marker="o", markerfacecolor="white", color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens)")
        ax.set_title("forward + backward" if backward else "forward")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("seconds (median)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"gated_delta on CPU, B={B} H={H} K=V={K} (hollow: extrapolated)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"# plot written to {path}")


if __name__ == "__main__":
    main()
