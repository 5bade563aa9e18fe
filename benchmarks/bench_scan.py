"""CPU benchmark of the elementwise scan family (backend="torch-scan").

minGRU (a vector state h[D]) and Mamba-1 (a [D, N] state with a per-entry decay), written
from the papers (the same rules as tests/runtime/test_scan.py), at B=2, H=4, D=64, N=16, fp32:
the naive loop against torch-scan, forward (no_grad) and forward+backward, the median wall
time of a few runs interleaved (``recdsl.bench.timed``). The naive loop is timed at T; with
--loop-t it is timed at fewer tokens and extrapolated linearly (marked ~), which understates
its forward+backward (that grows faster than T: 11.6 s measured at T=4096 for minGRU against
~3 s extrapolated from 1024). Then the crossover that
``backends.SCAN_BELOW`` encodes: GLA-style [K, V] states with a row decay run by torch-chunk
and by torch-scan at growing K = V.

    python3 benchmarks/bench_scan.py                 # T = 4096 and 65536 (forward only)
    python3 benchmarks/bench_scan.py --T 1024 --quick --loop-t 256
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import recdsl  # noqa: E402
from recdsl.bench import run_once, timed  # noqa: E402
from recdsl.runtime.sample import sample_inputs  # noqa: E402

MINGRU = """rule mingru
dims D
state h[D]
input zl[D], hh[D]
let z = sigmoid(zl)
h = (1 - z) * h + z * hh
output y = h
"""

MAMBA1 = """rule mamba1
dims D, N
state S[D, N]
input x[D], dt[D], Bm[N], Cm[N]
param A_log[D, N], Dskip[D]
let delta = softplus(dt)
S = exp(-(diag(delta) @ exp(A_log))) * S + outer(delta * x, Bm)
output y = S @ Cm + Dskip * x
"""

GLA_LIKE = """rule gla_like
dims K, V
state S[K, V]
input q[K], k[K], v[V], gk[K]
S = diag(exp(gk)) @ S + outer(k, v)
output o = q @ S
"""

B, H = 2, 4


def call(rule, backend):
    def fn(x):
        out, _ = rule(**x, backend=backend)
        return out
    return fn


def speedups(name, text, dims, T, loop_t, reps):
    rule = recdsl.compile(text)
    rows = []
    for backward in (False, True):
        inputs = sample_inputs(rule, batch=B, time=T, heads=H, dims=dims)
        short = sample_inputs(rule, batch=B, time=loop_t, heads=H, dims=dims)
        # interleaved in one timing, so that a change in the machine's load hits both
        t = timed({"torch-scan": run_once(call(rule, "torch-scan"), inputs, backward),
                   "naive": run_once(call(rule, "naive"), short, backward)}, reps, budget=60)
        fast, loop = t["torch-scan"][0], t["naive"][0] * T / loop_t
        rows.append((name, "fwd+bwd" if backward else "fwd", T, loop, fast, loop / fast))
    return rows


def one_pass_floor(T, reps):
    """What a single elementwise pass over Mamba-1's per-token states costs here: ``exp`` and
    ``mul`` over a [B T H, D, N] tensor. Any Mamba-1 path that forms every token's decay (exp),
    scans (mul, add) and reads (mul, sum) spends several of these; the ratio to the naive
    loop's time bounds the speed-up a PyTorch path can reach on this machine."""
    x = -torch.rand(B * T * H, 64, 16)
    y = torch.empty_like(x)
    t = timed({"exp": lambda: torch.exp(x, out=y), "mul": lambda: torch.mul(x, y, out=y)},
              reps, budget=30)
    return t["exp"][0], t["mul"][0]


def crossover(T, reps):
    rule = recdsl.compile(GLA_LIKE)
    rows = []
    for size in (1, 2, 4, 8, 16, 32):
        inputs = sample_inputs(rule, batch=B, time=T, heads=H, dims={"K": size, "V": size})
        t = timed({b: run_once(call(rule, b), inputs, True) for b in ("torch-chunk", "torch-scan")},
                  reps, budget=30)
        rows.append((size, t["torch-chunk"][0], t["torch-scan"][0]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--loop-t", type=int, default=0,
                   help="tokens the naive loop is timed at (default: T, measured)")
    p.add_argument("--long", type=int, default=65536, help="a forward run at this T (0: none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="one timed run each")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = 1 if args.quick else 3
    args.loop_t = args.loop_t or args.T
    mark = "~" if args.loop_t != args.T else ""
    print(f"torch-scan against the naive loop, B={B} H={H} D=64 N=16, fp32, "
          f"{args.threads} thread(s)" + (f"; ~ = extrapolated from T={args.loop_t}" if mark else ""))
    print(f"{'rule':<8} {'pass':<8} {'T':>6} {'naive':>10} {'torch-scan':>11} {'speed-up':>9}")
    mamba_fwd = None
    for name, text, dims in (("minGRU", MINGRU, {"D": 64}), ("Mamba-1", MAMBA1, {"D": 64, "N": 16})):
        for row in speedups(name, text, dims, args.T, args.loop_t, reps):
            print(f"{row[0]:<8} {row[1]:<8} {row[2]:>6} {mark + '%.3f s' % row[3]:>10} "
                  f"{'%.3f s' % row[4]:>11} {row[5]:>8.1f}x")
            if name == "Mamba-1" and row[1] == "fwd":
                mamba_fwd = row[3]
    exp, mul = one_pass_floor(args.T, reps)
    print(f"one pass over Mamba-1's [B T H, D, N] states at T={args.T}: exp {exp:.3f} s, "
          f"mul {mul:.3f} s: the naive loop's forward is {mamba_fwd / exp:.0f} exp passes")
    if args.long:
        for name, text, dims in (("minGRU", MINGRU, {"D": 64}), ("Mamba-1", MAMBA1, {"D": 64, "N": 16})):
            rule = recdsl.compile(text)
            inputs = sample_inputs(rule, batch=B, time=args.long, heads=H, dims=dims)
            t = timed({"f": run_once(call(rule, "torch-scan"), inputs, False)}, 0, budget=0)["f"][0]
            with torch.no_grad():
                out, final = rule(**inputs, backend="torch-scan", output_final_state=True)
            finite = bool(torch.isfinite(out).all() and torch.isfinite(final).all())
            print(f"{name} forward at T={args.long}: {t:.2f} s, finite: {finite}")
    print(f"\ncrossover (forward+backward, T={args.T}): a [K, V] state with a row decay")
    print(f"{'K = V':>6} {'torch-chunk':>12} {'torch-scan':>11}")
    for size, chunk, scan in crossover(args.T, reps):
        print(f"{size:>6} {chunk:>11.3f}s {scan:>10.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
