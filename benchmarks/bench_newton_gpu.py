"""GPU benchmark of the newton backend's Triton solves (recdsl.codegen.newton_kernels); not run yet.

(a) the linear solves alone, ``h_t = A_t h_{t-1} + c_t`` at B=2 H=4 D=64 and 128, fp32: the
    Triton kernels (``newton_triton.solve``) against the backend's PyTorch solver
    (``newton._solve``: blocked scan of small matrices, or token by token for wide ones) on
    the same tensors, for a diagonal J, 2 x 2 blocks per channel and a dense 2D x 2D matrix;
(b) whole calls, forward+backward, of the cells of ``bench_newton.py`` (ParaGRU, ParaLSTM, the
    LSTM with dense R) with backend="newton" against the fused ``recurrent`` kernel, at a few
    T, with newton's iteration counts: the crossover that ``newton.AUTO_MIN_TOKENS_CUDA``
    would encode (None until measured: "auto" keeps the fused kernel on CUDA).

    python benchmarks/bench_newton_gpu.py                 # on a CUDA machine
    python benchmarks/bench_newton_gpu.py --T 256,1024,4096 --quick
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import recdsl  # noqa: E402
from bench_newton import CELLS, B, D, H, inputs_for  # noqa: E402
from recdsl.bench import run_once, timed  # noqa: E402
from recdsl.runtime import newton, newton_triton  # noqa: E402


def solve_rows(T, dims, device, reps):
    """(label, T, torch seconds, triton seconds, max |difference|) per solve shape."""
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for d in dims:
        for label, C, k, diagonal in (("diagonal", d, 1, True), ("2 x 2 blocks", d, 2, False),
                                      (f"dense {2 * d} x {2 * d}", 1, 2 * d, False)):
            shape = (B, T, H, C, k) if diagonal else (B, T, H, C, k, k)
            A = torch.rand(shape, generator=g, device=device) if diagonal else \
                0.5 * torch.randn(shape, generator=g, device=device) / k ** 0.5
            c = torch.randn(B, T, H, C, k, generator=g, device=device)
            h0 = torch.randn(B, H, C, k, generator=g, device=device)
            plan = SimpleNamespace(diagonal=diagonal, k=k)

            def pytorch(plan=plan, A=A, c=c, h0=h0):  # newton._solve without the Triton hook
                with mock.patch.object(newton_triton, "wanted", lambda device: False):
                    return newton._solve(plan, A, c, h0)
            fns = {"torch": pytorch, "triton": lambda A=A, c=c, h0=h0, diagonal=diagonal:
                   newton_triton.solve(A, c, h0, diagonal)}
            t = timed(fns, reps, budget=30)
            diff = (fns["triton"]() - fns["torch"]()).abs().max().item()
            rows.append((f"{label} (D={d})", T, t["torch"][0], t["triton"][0], diff))
    return rows


def call(rule, backend):
    def fn(x):
        out, _ = rule(**x, backend=backend)
        return out
    return fn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", default="256,1024,4096", help="T values of the whole calls")
    p.add_argument("--solve-t", type=int, default=4096, help="T of the solves alone")
    p.add_argument("--dense-t", type=int, default=1024, help="largest T for the dense LSTM")
    p.add_argument("--quick", action="store_true", help="one timed run each")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_newton_gpu: needs a CUDA device", file=sys.stderr)
        return 2
    device, reps = torch.device("cuda"), 1 if args.quick else 3
    print(f"(a) linear solves alone, B={B} H={H}, fp32, T={args.solve_t}, {torch.cuda.get_device_name()}")
    print(f"{'solve':<26} {'torch':>9} {'triton':>9} {'speed-up':>9} {'max diff':>9}")
    for label, T, slow, fast, diff in solve_rows(args.solve_t, (64, 128), device, reps):
        print(f"{label:<26} {slow * 1e3:>7.2f}ms {fast * 1e3:>7.2f}ms {slow / fast:>8.1f}x {diff:>9.1e}")
    print(f"\n(b) forward+backward, B={B} H={H} D={D}, fp32: newton against the fused recurrent kernel")
    print(f"{'cell':<22} {'T':>6} {'recurrent':>10} {'newton':>9} {'speed-up':>9} {'iters':>6}")
    for name, text, dense in CELLS:
        rule = recdsl.compile(text)
        for T in [int(t) for t in args.T.split(",") if t]:
            if dense and T > args.dense_t:
                continue
            x = {n: v.to(device) for n, v in inputs_for(rule, T).items()}
            t = timed({b: run_once(call(rule, b), x, True) for b in ("recurrent", "newton")}, reps, budget=60)
            print(f"{name:<22} {T:>6} {t['recurrent'][0]:>9.4f}s {t['newton'][0]:>8.4f}s "
                  f"{t['recurrent'][0] / t['newton'][0]:>8.1f}x {newton.last_run['iterations']!s:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
