"""The CPU path on a busy machine: torch-chunk gated_delta under background BLAS load.

Starts ``--load`` (default 2) background processes that multiply small (64 x 64) matrices in
a tight loop, each with its library's default threads, then times batches of ``--calls``
(default 10) calls of ``rule(**inputs, backend="torch-chunk")`` for examples/gated_delta.rec
(B=1, H=2, K=V=64, T=65536, forward under no_grad; with ``--bwd-t`` also forward+backward at
a smaller T) under each thread policy, ``--reps`` (default 3) times, the policies interleaved
batch by batch. Reports each batch's median, worst and worst/median. The policies:

    torch-default   RECDSL_CPU_THREADS=torch, torch's own count (the machine's cores)
    1-thread        RECDSL_CPU_THREADS=torch and torch.set_num_threads(1) around the whole
                    batch (the caller's workaround; it also covers the backward)
    recdsl          RECDSL_CPU_THREADS unset: recdsl's default (recdsl/runtime/threads.py),
                    which holds only during the call (the forward), not the backward

The load processes are bounded: each stops by itself after ``--load-seconds`` (default 900)
or when this process goes away, and all are killed when the benchmark ends, however it ends
(Ctrl-C, an exception). A batch stops early once it has run ``--batch-budget`` seconds (the
row is marked *: its worst is then a lower bound). Run from the repository root:

    python3 benchmarks/bench_contention.py              # load 2, then the same quiet (--load 0)
    python3 benchmarks/bench_contention.py --quick      # T = 8192, 1 rep: a smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import recdsl  # noqa: E402
from recdsl.runtime import threads  # noqa: E402
from recdsl.runtime.sample import sample_inputs  # noqa: E402

B, H, K, V = 1, 2, 64, 64

# A load process: small matmuls until its deadline or until its parent is gone.
LOADER = r"""
import os, sys, time
kind, deadline, parent = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
if kind == "numpy":
    import numpy as np
    a = np.random.rand(64, 64); b = np.random.rand(64, 64)
    mm = lambda: a @ b
else:
    import torch
    a = torch.rand(64, 64); b = torch.rand(64, 64)
    mm = lambda: a @ b
while time.time() < deadline and os.getppid() == parent:
    for _ in range(200):
        mm()
"""


@contextlib.contextmanager
def background_load(n, kind, seconds):
    """``n`` load processes for the body's duration (at most ``seconds``), always killed."""
    procs = []
    deadline = time.time() + seconds
    try:
        for _ in range(n):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", LOADER, kind, str(deadline), str(os.getpid())],
                stdin=subprocess.DEVNULL))
        if procs:
            time.sleep(1.0)  # let them import and start multiplying
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


POLICIES = {"torch-default": ("torch", None), "1-thread": ("torch", 1), "recdsl": (None, None)}


@contextlib.contextmanager
def policy_env(policy):
    value, count = policy
    old = os.environ.get(threads.ENV)
    if value is None:
        os.environ.pop(threads.ENV, None)
    else:
        os.environ[threads.ENV] = value
    try:
        with threads.cpu_threads(count):
            yield
    finally:
        if old is None:
            os.environ.pop(threads.ENV, None)
        else:
            os.environ[threads.ENV] = old


def batch(fn, calls, budget):
    """Wall seconds of up to ``calls`` calls; (times, stopped early)."""
    times = []
    start = time.perf_counter()
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget and len(times) < calls:
            return times, True
    return times, False


def make_cases(rule, t_fwd, t_bwd):
    cases = {}
    inputs = sample_inputs(rule, batch=B, time=t_fwd, heads=H, dims={"K": K, "V": V})

    def fwd():
        with torch.no_grad():
            rule(**inputs, backend="torch-chunk")
    cases[f"fwd T={t_fwd}"] = fwd
    if t_bwd:
        grad_inputs = sample_inputs(rule, batch=B, time=t_bwd, heads=H, dims={"K": K, "V": V})
        for x in grad_inputs.values():
            x.requires_grad_(True)

        def fwd_bwd():
            for x in grad_inputs.values():
                x.grad = None
            out, _ = rule(**grad_inputs, backend="torch-chunk")
            out.sum().backward()
        cases[f"fwd+bwd T={t_bwd}"] = fwd_bwd
    return cases


def run(args, load):
    rule = recdsl.load(ROOT / "examples" / "gated_delta.rec")
    cases = make_cases(rule, args.t, args.bwd_t)
    default_threads = torch.get_num_threads()
    rows = []
    with background_load(load, args.load_kind, args.load_seconds):
        for case, fn in cases.items():
            for name in args.policies:
                with policy_env(POLICIES[name]):
                    fn()  # warm-up
            for rep in range(args.reps):
                for name in args.policies:
                    with policy_env(POLICIES[name]):
                        times, stopped = batch(fn, args.calls, args.batch_budget)
                    med, worst = statistics.median(times), max(times)
                    rows.append((load, case, name, rep, len(times), med, worst, worst / med,
                                 stopped))
                    print(f"  load={load} {case:16s} {name:14s} rep {rep}: median "
                          f"{med:7.3f} s  worst {worst:7.3f} s  worst/median "
                          f"{worst / med:5.2f}{' *' if stopped else ''}", flush=True)
                    assert torch.get_num_threads() == default_threads
    return rows


def table(rows):
    lines = ["| load | case | policy | median s (per rep) | worst s (per rep) | "
             "worst/median (per rep) | max ratio |",
             "|---|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        if r[:3] not in keys:
            keys.append(r[:3])
    for key in keys:
        rs = [r for r in rows if r[:3] == key]
        star = lambda r: "*" if r[8] else ""
        meds = " / ".join(f"{r[5]:.3f}" for r in rs)
        worsts = " / ".join(f"{r[6]:.3f}{star(r)}" for r in rs)
        ratios = " / ".join(f"{r[7]:.2f}{star(r)}" for r in rs)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {meds} | {worsts} | {ratios} | "
                     f"{max(r[7] for r in rs):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", type=int, default=2, help="background load processes")
    p.add_argument("--load-kind", choices=("numpy", "torch"), default="numpy")
    p.add_argument("--load-seconds", type=float, default=900.0,
                   help="hard limit on the load processes' life")
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the same without load (the policy's quiet-machine cost)")
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--bwd-t", type=int, default=8192, help="0: no forward+backward case")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch-budget", type=float, default=60.0)
    p.add_argument("--policies", nargs="+", choices=tuple(POLICIES), default=list(POLICIES))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.t, args.bwd_t, args.reps = 8192, 2048, 1
    # a SIGTERM ends the run through the finally blocks (the load processes are killed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, B={B} H={H} K={K} V={V}, {args.calls} calls per batch")
    rows = run(args, args.load)
    if args.quiet and args.load:
        rows += run(args, 0)
    print()
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
