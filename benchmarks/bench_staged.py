"""CPU benchmark of a staged rule: mLSTM (examples/mlstm.rec) through recdsl's stages (m by a
cumulative max, then C and n chunkwise: backend "torch-chunk") against NX-AI's mlstm_kernels
pure-PyTorch chunkwise kernel (``mlstm_chunkwise__native_autograd``, when installed:
``pip install mlstm-kernels``; it runs on the CPU) and the naive loop (timed at --loop-t tokens
and extrapolated), at B=2, H=4, K=V=64, fp32, one torch thread; forward (no_grad) and
forward+backward, median of a few runs interleaved (``recdsl.bench.timed``). First the
two implementations are compared on the same inputs.

    python3 benchmarks/bench_staged.py [--T 4096] [--quick]
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

B, H, K, V = 2, 4, 64, 64


def inputs(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(B, T, H, K, generator=g), "k": torch.randn(B, T, H, K, generator=g),
            "v": torch.randn(B, T, H, V, generator=g), "i": torch.randn(B, T, H, generator=g),
            "f": torch.randn(B, T, H, generator=g) + 3.0}


def recdsl_fn(rule, backend):
    def fn(x):
        out, _ = rule(**x, backend=backend)
        return out
    return fn


def peer_fn():
    try:
        from mlstm_kernels.torch.chunkwise.native import mlstm_chunkwise__native_autograd
    except ImportError:
        return None

    def fn(x):  # its layout: [B, H, T, ...]; q is scaled by K ** -0.5 inside, as the rule does
        t = lambda a: a.transpose(1, 2)
        out = mlstm_chunkwise__native_autograd(t(x["q"]), t(x["k"]), t(x["v"]), t(x["i"]),
                                               t(x["f"]), chunk_size=64)
        return out.transpose(1, 2)
    return fn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--loop-t", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rule = recdsl.load(HERE.parent / "examples" / "mlstm.rec")
    peer = peer_fn()
    if peer is not None:
        x = inputs(256)
        with torch.no_grad():
            diff = (recdsl_fn(rule, "auto")(x) - peer(x)).abs().max().item()
        print(f"recdsl (staged) against mlstm_kernels at T=256: max |difference| {diff:.2e}")
    else:
        print("mlstm_kernels is not installed: pip install mlstm-kernels")
    reps = 1 if args.quick else 3
    print(f"mLSTM B={B} H={H} K=V={K}, fp32, {args.threads} thread(s), T={args.T}; naive ~ from "
          f"T={args.loop_t}")
    print(f"{'pass':<8} {'recdsl':>9} {'mlstm_kernels':>14} {'naive':>9} {'vs peer':>8} {'vs naive':>9}")
    for backward in (False, True):
        x, short = inputs(args.T), inputs(args.loop_t)
        fns = {"recdsl": run_once(recdsl_fn(rule, "auto"), x, backward)}
        if peer is not None:
            fns["peer"] = run_once(peer, x, backward)
        t = timed(fns, reps, budget=60)
        naive = timed({"n": run_once(recdsl_fn(rule, "naive"), short, backward)}, 1,
                      budget=60)["n"][0] * args.T / args.loop_t
        ours = t["recdsl"][0]
        theirs = t["peer"][0] if peer is not None else float("nan")
        print(f"{'fwd+bwd' if backward else 'fwd':<8} {ours:>8.3f}s {theirs:>13.3f}s "
              f"{naive:>8.2f}s {theirs / ours:>7.2f}x {naive / ours:>8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
