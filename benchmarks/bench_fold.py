"""Could the delta family be folded into the DPLR family (issue 11, item 4)? The delta rules
run through both PyTorch chunk paths: ``torch_chunk_delta`` (what ``backend="torch-chunk"``
picks for them) and ``torch_chunk_dplr`` (which takes every delta rule too), called directly
on the same bound call. B=2, H=4, K=V=64, fp32, one torch thread; forward (no_grad) and
forward+backward, the median of interleaved runs (``recdsl.bench.timed``), and the largest
difference of the two paths' outputs.

    python3 benchmarks/bench_fold.py                 # T = 4096
    python3 benchmarks/bench_fold.py --T 1024 --rules gated_delta
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import recdsl.examples  # noqa: E402
from recdsl.bench import run_once, timed  # noqa: E402
from recdsl.runtime import torch_chunk_delta, torch_chunk_dplr  # noqa: E402
from recdsl.runtime.sample import sample_inputs  # noqa: E402

MODULES = {"delta": torch_chunk_delta, "dplr": torch_chunk_dplr}


def through(rule, module):
    def fn(x):
        return module.run(rule, rule.bind(**x))[0]
    return fn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--rules", nargs="+", default=["delta", "gated_delta", "kla", "deltaproduct"])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# B=2 H=4 K=V=64 fp32 T={args.T}, one thread, torch {torch.__version__}")
    print(f"{'rule':13} {'pass':8} {'delta path':>11} {'dplr path':>10} {'dplr/delta':>11} "
          f"{'max |diff|':>11}")
    for name in args.rules:
        rule = recdsl.examples.load(name)
        dims = {d: 64 for d in rule.dims if d in ("K", "V")}
        x = sample_inputs(rule, batch=2, time=args.T, heads=4, dims=dims)
        with torch.no_grad():
            outs = [through(rule, m)(x) for m in MODULES.values()]
        diff = max((a - b).abs().max().item() for a, b in zip(outs[0], outs[1]))
        for backward in (False, True):
            t = timed({k: run_once(through(rule, m), x, backward) for k, m in MODULES.items()},
                      args.reps, budget=120)
            d, r = t["delta"][0], t["dplr"][0]
            mode = "fwd+bwd" if backward else "fwd"
            print(f"{name:13} {mode:8} {d:10.3f}s {r:9.3f}s {r / d:10.2f}x {diff:11.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
