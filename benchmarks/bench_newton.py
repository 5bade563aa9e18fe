"""CPU benchmark of the newton backend (ParaRNN: Newton iterations, scans over T; for a dense
Jacobian the sequential pass and the transposed recurrence with generated Jacobians).

A ParaGRU-style cell (diagonal recurrent weights: a diagonal Jacobian), a ParaLSTM-style cell
(2x2 blocks per channel) and an LSTM with dense per-head recurrent matrices R[D, D] (a dense
2D x 2D Jacobian), at B=2, H=4, D=64, fp32: the naive loop against backend="newton", forward
(no_grad) and forward+backward, the median wall time of a few interleaved runs
(``recdsl.bench.timed``), with newton's iteration count (0: the sequential pass, which is the
forward on the CPU unless --iterations asks for Newton's iterations as on a GPU). Every cell
runs at --T (the dense one at --dense-t if given); the naive loop is measured there too unless
--loop-t asks for an extrapolation from fewer tokens (marked ~; its forward+backward grows
faster than T, so an extrapolation understates the loop's time). Then the crossover
in T that ``newton.AUTO_MIN_TOKENS`` encodes (forward and forward+backward, both measured),
and pararnn-torch's CPU path on the same cells where it imports.

    python3 benchmarks/bench_newton.py                # T = 4096, everything measured
    python3 benchmarks/bench_newton.py --T 1024 --quick --loop-t 256   # naive extrapolated
    python3 benchmarks/bench_newton.py --slstm --T 1024 --quick --no-pararnn  # sLSTM too
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import recdsl  # noqa: E402
from recdsl.bench import run_once, timed  # noqa: E402
from recdsl.runtime import newton  # noqa: E402
from recdsl.runtime.sample import sample_inputs  # noqa: E402

PARA_GRU = """rule para_gru
dims D
state h[D]
input xr[D], xz[D], xn[D]
param ar[D], az[D], an[D]
let r = sigmoid(xr + ar * h)
let z = sigmoid(xz + az * h)
let n = tanh(xn + r * (an * h))
h = (1 - z) * n + z * h
output y = h
"""

PARA_LSTM = """rule para_lstm
dims D
state c[D], h[D]
input xi[D], xf[D], xz[D], xo[D]
param ai[D], af[D], az[D], ao[D]
let i = sigmoid(xi + ai * h)
let f = sigmoid(xf + af * h)
let z = tanh(xz + az * h)
let o = sigmoid(xo + ao * h)
c = f * c + i * z
h = o * tanh(c)
output y = h
"""

LSTM = """rule lstm
dims D
state c[D], h[D]
input xi[D], xf[D], xz[D], xo[D]
param Ri[D, D], Rf[D, D], Rz[D, D], Ro[D, D]
let i = sigmoid(xi + Ri @ h)
let f = sigmoid(xf + Rf @ h)
let z = tanh(xz + Rz @ h)
let o = sigmoid(xo + Ro @ h)
c = f * c + i * z
h = o * tanh(c)
output y = h
"""

SLSTM = """rule slstm
dims D
state c[D], n[D], m[D], h[D]
input zx[D], ix[D], fx[D], ox[D]
param Rz[D, D], Ri[D, D], Rf[D, D], Ro[D, D]
let logi = ix + Ri @ h
let logf = logsigmoid(fx + Rf @ h)
let m1 = max(logf + m, logi)
let ig = exp(logi - m1)
let fg = exp(logf + m - m1)
c = fg * c + ig * tanh(zx + Rz @ h)
n = fg * n + ig
m = m1
h = sigmoid(ox + Ro @ h) * c / n
output y = h
"""

B, H, D = 2, 4, 64
# (label, rule, whether timed at --T or, dense, at --dense-t)
CELLS = (("ParaGRU (diagonal J)", PARA_GRU, False), ("ParaLSTM (2x2 blocks)", PARA_LSTM, False),
         ("LSTM R[D,D] (dense J)", LSTM, True))
# --slstm: xLSTM's sLSTM with its stabiliser (a dense 4D x 4D Jacobian, the widest "auto" takes)
SLSTM_CELL = ("sLSTM R[D,D] (dense J)", SLSTM, True)


def inputs_for(rule, T):
    x = sample_inputs(rule, batch=B, time=T, heads=H, dims={"D": D})
    for p in rule.params:  # R[D, D] at the usual 1/sqrt(D) scale; diagonal weights in (-1, 1)
        x[p.name] = x[p.name] / math.sqrt(D) if p.rank == 2 else torch.tanh(x[p.name])
    return x


def call(rule, backend):
    def fn(x):
        out, _ = rule(**x, backend=backend)
        return out
    return fn


def iterations(rule, inputs):
    with torch.no_grad():
        rule(**inputs, backend="newton")
    return newton.last_run["iterations"]


def speedups(name, rule, T, loop_t, reps):
    rows = []
    long, short = inputs_for(rule, T), inputs_for(rule, loop_t)
    its = iterations(rule, long)
    for backward in (False, True):
        t = timed({"newton": run_once(call(rule, "newton"), long, backward),
                   "naive": run_once(call(rule, "naive"), short, backward)}, reps, budget=60)
        fast, loop = t["newton"][0], t["naive"][0] * T / loop_t
        rows.append((name, "fwd+bwd" if backward else "fwd", T, loop, fast, loop / fast, its))
    return rows


def crossover(rule, times, reps):
    rows = []
    for T in times:
        x = inputs_for(rule, T)
        for backward in (False, True):
            t = timed({b: run_once(call(rule, b), x, backward) for b in ("newton", "naive")}, reps,
                      budget=30)
            rows.append((T, "fwd+bwd" if backward else "fwd", t["naive"][0], t["newton"][0],
                         iterations(rule, x)))
    return rows


def pararnn_rows(T, reps):
    """pararnn-torch's ParaGRU and ParaLSTM (diagonal recurrence, hidden H*D, their own input
    projections included) on the CPU: its Newton solver against its sequential one."""
    try:
        import pararnn
    except Exception as err:  # not installed (pip install pararnn-torch)
        return [f"pararnn-torch: not importable ({type(err).__name__}: {err})"]
    lines = []
    for label, cls, kw in (("ParaGRU diag", pararnn.ParaGRU, {"mix": "diag"}),
                           ("ParaLSTM diag", pararnn.ParaLSTM, {})):
        try:
            model = pararnn.ParaRNN(cls(H * D, H * D, **kw), solver="newton")
            x = torch.randn(B, T, H * D)
            seq = pararnn.ParaRNN(cls(H * D, H * D, **kw), solver="sequential")
            seq.load_state_dict(model.state_dict())
            t = timed({"newton": run_once(lambda d: model(d["x"]), {"x": x}, True),
                       "sequential": run_once(lambda d: seq(d["x"]), {"x": x}, True)}, reps, budget=60)
            stats = getattr(model, "last_stats", None)
            its = stats[0].iters if stats else "?"
            lines.append(f"pararnn {label:<14} fwd+bwd T={T}: newton {t['newton'][0]:.3f} s "
                         f"({its} iterations), sequential {t['sequential'][0]:.3f} s")
        except Exception as err:
            lines.append(f"pararnn {label}: did not run on the CPU ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160]})")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--loop-t", type=int, default=0,
                   help="tokens the naive loop is timed at, then extrapolated (default: T, measured; "
                        "its forward+backward grows faster than T)")
    p.add_argument("--dense-t", type=int, default=0, help="T for the dense-Jacobian LSTM (default: --T)")
    p.add_argument("--crossover", default="16,64,256,1024", help="T values of the crossover table")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="one timed run each")
    p.add_argument("--no-pararnn", action="store_true")
    p.add_argument("--slstm", action="store_true", help="also sLSTM (a 4D-wide dense Jacobian)")
    p.add_argument("--iterations", action="store_true",
                   help="Newton's iterations forward on the CPU too (as on a GPU), not the sequential pass")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.iterations:
        newton.SEQUENTIAL_DEVICES = ()
    reps = 1 if args.quick else 3
    print(f"newton against the naive loop, B={B} H={H} D={D}, fp32, {args.threads} thread(s)"
          + (f"; ~ = extrapolated from T={args.loop_t}" if args.loop_t else ""))
    print(f"{'cell':<22} {'pass':<8} {'T':>6} {'naive':>10} {'newton':>9} {'speed-up':>9} {'iters':>6}")
    cells = CELLS + ((SLSTM_CELL,) if args.slstm else ())
    rules = {name: recdsl.compile(text) for name, text, _ in cells}
    for name, text, dense in cells:
        T = (args.dense_t or args.T) if dense else args.T
        for row in speedups(name, rules[name], T, min(args.loop_t or T, T), reps):
            mark = "~" if args.loop_t and args.loop_t < row[2] else ""
            print(f"{row[0]:<22} {row[1]:<8} {row[2]:>6} {mark + '%.3f s' % row[3]:>10} "
                  f"{'%.3f s' % row[4]:>9} {row[5]:>8.1f}x {row[6]:>6}")
    times = [int(t) for t in args.crossover.split(",") if t]
    if times:
        print("\ncrossover (both measured)")
        print(f"{'cell':<22} {'pass':<8} {'T':>6} {'naive':>9} {'newton':>9} {'iters':>6}")
        for name, text, dense in cells:
            for T, kind, loop, fast, its in crossover(rules[name], times, reps):
                print(f"{name:<22} {kind:<8} {T:>6} {loop:>8.3f}s {fast:>8.3f}s {its:>6}")
    if not args.no_pararnn:
        print()
        for line in pararnn_rows(args.T, reps):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
