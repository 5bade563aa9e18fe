"""Peak memory per rank of a context-parallel call (``rule(..., cp_group=group)``) against
the single-process call: Gated DeltaNet (examples/gated_delta.rec), backend "auto"
(torch-chunk on the CPU), B=1, H=2, K=V=64, float32, T = 65536 split evenly over 4 ranks
(gloo on this machine), forward (no_grad) and forward+backward (every input requiring grad).

Memory: each process (the single one, and every rank) is fresh; it makes one small warm-up
call (the first call imports and caches), makes its inputs, then reads its resident set size
(``/proc/self/statm``), runs the call once and reports the rise of its peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``) above that: the memory
the call itself needed at its peak, inputs excluded (a rank's inputs are T/P of them). The
table gives the largest rise over the ranks.

    python3 benchmarks/bench_cp_memory.py [--T 65536] [--ranks 4] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import recdsl  # noqa: E402
from recdsl.runtime.sample import sample_inputs  # noqa: E402

B, H, K, V = 1, 2, 64, 64
MIB = 2 ** 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(rank, world, port, T, backward, threads, queue):
    torch.set_num_threads(threads)
    group = None
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        group = dist.group.WORLD
    rule = recdsl.load(HERE.parent / "examples" / "gated_delta.rec")
    def run(time):
        inputs = sample_inputs(rule, batch=B, time=time, heads=H, dims={"K": K, "V": V}, seed=0)
        part = slice(rank * time // world, (rank + 1) * time // world)
        inputs = {n: x[:, part].contiguous().requires_grad_(backward) for n, x in inputs.items()}
        base = _rss()
        with torch.set_grad_enabled(backward):
            out, _ = rule(**inputs, cp_group=group)
            if backward:
                out.backward(torch.ones_like(out))
        return base

    run(256 * world)  # a warm-up: the first call's imports and caches are not the call's memory
    base = run(T)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put((rank, peak - base))
    if group is not None:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


def measure(world, T, backward, threads) -> list:
    """The rise of peak RSS of every rank (bytes), rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_measure, args=(r, world, port, T, backward, threads, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    got = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    return [got[r] for r in range(world)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, default=65536)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    print(f"gated_delta, B={B}, H={H}, K={K}, V={V}, float32, T={args.T}; peak RSS rise of the "
          f"call (MiB), fresh process each")
    print(f"{'pass':<14}{'1 process':>12}{f'{args.ranks} ranks (max)':>18}{'ratio':>8}   per rank")
    for backward in (False, True):
        single = measure(1, args.T, backward, args.threads)[0]
        ranks = measure(args.ranks, args.T, backward, args.threads)
        per = " ".join(f"{r / MIB:.0f}" for r in ranks)
        print(f"{'fwd+bwd' if backward else 'fwd':<14}{single / MIB:>12.0f}{max(ranks) / MIB:>18.0f}"
              f"{max(ranks) / single:>8.2f}   {per}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
