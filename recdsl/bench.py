"""Timing of a rule's backends (``recdsl bench``) and the timing helpers the benchmark scripts
share.

``timed`` and ``run_once`` are what ``benchmarks/bench_*.py`` time with: the methods run
interleaved (A B C, A B C, ...) after one warm-up each, the median wall and CPU time kept.
``bench`` times every backend that can run a rule on a device against the naive loop (timed
at up to ``loop_t`` tokens and extrapolated linearly in T beyond, marked ``~``) and, when
installed, the peer reference of the same name (fla's PyTorch references for gated_delta,
gla, retention and kda; mlstm_kernels' chunkwise PyTorch kernel for mlstm); ``table`` prints
the result and ``plot`` draws time against T when matplotlib is importable. Nothing here
imports matplotlib, fla or mlstm_kernels at module level.

Ops per call (CPU): the number of ATen operators one call dispatches (``count_ops``: a
``TorchDispatchMode`` that counts them, the backward's included for forward+backward). On a
busy machine each op can be a stall (an OpenMP barrier; README, "Threads on the CPU"), so a
CPU path should have few and large ones; a count that grows with T faster than its chunks or
windows is worth a look.

Peak memory: on CUDA the rise of ``torch.cuda.max_memory_allocated`` over the memory already
allocated before the run; on the CPU the rise of a fresh process's max RSS (``getrusage``)
over its level after importing torch and building the inputs, one process per method and
pass running its T values in increasing order (so each figure is the process's high-water
mark up to that T, which grows with T).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# ---------------------------------------------------------------- timing


def _sync(device=None):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize(device)


def timed(fns: dict, reps, budget) -> dict:
    """name -> (wall, cpu): median seconds of each ``fns[name]()`` over ``reps`` runs after
    one warm-up, the methods interleaved (A B C, A B C, ...) so that a change in the machine's
    load hits them alike; a method whose warm-up takes more than ``budget`` seconds (or every
    method, when ``reps`` is 0) is timed by that one run. Wall time by perf_counter (CUDA
    synchronised before and after); CPU time of this process by process_time, which on a
    shared machine leaves out the time spent waiting for a core."""
    def one(fn):
        _sync()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        _sync()
        return time.perf_counter() - wall, time.process_time() - cpu
    runs = {name: [one(fn)] for name, fn in fns.items()}  # the warm-ups
    again = [name for name in fns if runs[name][0][0] < budget] if reps else []
    for name in again:
        runs[name] = []
    for _ in range(reps):
        for name in again:
            runs[name].append(one(fns[name]))
    return {name: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r))
            for name, r in runs.items()}


def run_once(fn, inputs, backward):
    """A thunk: ``fn(inputs)`` under no_grad, or with every input requiring grad and a
    backward pass of the sum of its output(s) (a tensor or a tuple of tensors)."""
    def go():
        x = {n: t.detach().requires_grad_(backward) for n, t in inputs.items()}
        if backward:
            out = fn(x)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            outs = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        else:
            with torch.no_grad():
                fn(x)
    return go


def count_ops(fn) -> int:
    """How many ATen operators ``fn()`` dispatches (below autograd: what actually runs)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.count += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.count


# ---------------------------------------------------------------- peers


L2NORM_EPS = 1e-6  # recdsl's l2norm: x / sqrt(sum(x^2) + 1e-6)


def l2norm(x):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def load_fla_naive(folder: str):
    """fla/ops/<folder>/naive.py loaded by path (without importing the fla package, whose
    __init__ needs Triton and a GPU), or None when fla-core or einops is missing."""
    try:
        spec = importlib.util.find_spec("fla")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "ops" / folder / "naive.py"
    if not path.exists():
        return None
    try:
        file_spec = importlib.util.spec_from_file_location(f"_recdsl_fla_{folder}_naive", path)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        return module
    except Exception:  # noqa: BLE001 - einops missing, or moved in another release: skip
        return None


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def peers(rule) -> dict:
    """label -> (fn(inputs) -> output, is_loop) for the installed peer references of a rule
    named like one of the canonical models, given that its inputs have the expected names;
    {} when none applies or none is installed. ``is_loop``: a per-token loop, timed like the
    naive loop."""
    names = {v.name for v in rule.ir.inputs + rule.ir.params}
    out = {}
    if rule.name == "gated_delta" and names == {"q", "k", "v", "g", "beta"}:
        fla = load_fla_naive("gated_delta_rule")
        if fla is not None:
            out["fla naive_chunk_gated_delta_rule"] = (lambda x: fla.naive_chunk_gated_delta_rule(
                l2norm(x["q"]), l2norm(x["k"]), x["v"], x["g"], x["beta"])[0], False)
    elif rule.name == "gla" and names == {"q", "k", "v", "gk"}:
        fla = load_fla_naive("gla")
        if fla is not None:
            out["fla naive_recurrent_gla"] = (lambda x: fla.naive_recurrent_gla(
                x["q"], x["k"], x["v"], x["gk"])[0], True)
    elif rule.name == "retention" and names == {"q", "k", "v", "gamma"}:
        fla = load_fla_naive("simple_gla")
        if fla is not None:
            def retention(x):
                g = torch.log(x["gamma"]).expand(x["q"].shape[:3])
                return fla.naive_chunk_simple_gla(x["q"], x["k"], x["v"], g)[0]
            out["fla naive_chunk_simple_gla"] = (retention, False)
    elif rule.name == "kda" and names in ({"q", "k", "v", "gk", "beta"}, {"q", "k", "v", "g", "beta"}):
        fla = load_fla_naive("kda")
        if fla is not None:
            gate = "gk" if "gk" in names else "g"
            out["fla naive_chunk_kda"] = (lambda x: fla.naive_chunk_kda(
                l2norm(x["q"]), l2norm(x["k"]), x["v"], x[gate], x["beta"])[0], False)
    elif rule.name == "mlstm" and names == {"q", "k", "v", "i", "f"}:
        try:
            from mlstm_kernels.torch.chunkwise.native import mlstm_chunkwise__native_autograd
        except Exception:  # noqa: BLE001 - optional
            return out

        def mlstm(x):  # its layout: [B, H, T, ...]; q scaled by K ** -0.5 inside, as the rule does
            t = lambda a: a.transpose(1, 2)  # noqa: E731
            return mlstm_chunkwise__native_autograd(
                t(x["q"]), t(x["k"]), t(x["v"]), t(x["i"]), t(x["f"]), chunk_size=64).transpose(1, 2)
        out["mlstm_kernels chunkwise native"] = (mlstm, False)
    return out


# ---------------------------------------------------------------- what runs


NAIVE = "naive"


def parallel_backends(rule, device) -> list:
    """The backends that run ``rule`` on ``device`` besides the naive loop, best first;
    on the CPU without Triton's interpreter's slow paths."""
    from .runtime import backends as registry

    device = torch.device(device)
    names = registry.available(rule, device)
    if device.type != "cuda":
        triton = {b.name for b in registry.BACKENDS if b.triton}
        names = [n for n in names if n not in triton]
    return [n for n in names if n != NAIVE]


def methods(rule, device, backends=None, with_peers=True) -> dict:
    """method label -> (fn(inputs) -> output, is_loop): the backends (``backends`` or
    ``parallel_backends``), the naive loop, then the peers."""
    names = list(backends) if backends else parallel_backends(rule, device)
    out = {}
    for name in names:
        if name != NAIVE:
            out[name] = (_call(rule, name), False)
    out[NAIVE] = (_call(rule, NAIVE), True)
    if with_peers:
        out.update(peers(rule))
    return out


def _call(rule, backend):
    def fn(x):
        return rule(**x, backend=backend)[0]
    return fn


# ---------------------------------------------------------------- the measurement


@dataclass
class Entry:
    seconds: float  # median wall seconds
    cpu: float  # median CPU seconds of this process
    extrapolated: bool = False  # a loop timed at a smaller T, scaled linearly
    memory: float | None = None  # peak bytes (see the module docstring), None: not measured
    ops: int | None = None  # ATen ops a call dispatches (CPU only; count_ops)


@dataclass
class BenchResult:
    rule: str
    device: str
    batch: int
    heads: int
    dims: dict
    lengths: list
    methods: list
    vs: str
    loop_t: int
    memory_note: str
    notes: list = field(default_factory=list)
    entries: dict = field(default_factory=dict)  # (method, T, backward) -> Entry


def bench(rule, lengths, backends=None, dims=None, batch=2, heads=4, device=None, reps=3,
          loop_t=1024, vs=NAIVE, memory=True, rule_path=None, consts=None, progress=None,
          budget=30.0) -> BenchResult:
    """Time ``rule``'s backends forward (no_grad) and forward+backward over the sequence
    lengths ``lengths``. ``backends``: names (default ``parallel_backends``); the naive loop
    and the installed peers are always timed, the per-token loops at ``min(T, loop_t)``
    tokens and extrapolated. ``memory``: also measure peak memory (on the CPU this needs
    ``rule_path``, the rule's file, for the fresh processes). ``progress``: called with
    (done, total, text)."""
    from .runtime.sample import dim_sizes, sample_inputs

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = dim_sizes(rule, dims)
    fns = methods(rule, device, backends)
    lengths = sorted(set(lengths))
    cuda = device.type == "cuda"
    memory_note = ("peak MiB: rise of torch.cuda.max_memory_allocated during the run"
                   if cuda else
                   "peak MiB: rise of a fresh process's max RSS over its level after import "
                   "and input creation (high-water mark over T so far)")
    result = BenchResult(rule.name, str(device), batch, heads, sizes, lengths, list(fns),
                         vs if vs in fns else NAIVE, loop_t, memory_note)
    if not parallel_backends(rule, device) and not backends:
        result.notes.append(f"rule '{rule.name}' has no parallel path on {device.type}: "
                            f"only the naive loop runs")
    if vs not in fns:
        result.notes.append(f"--vs {vs}: no such method here; ratios against the naive loop")
    if not memory:
        result.memory_note = "peak memory not measured"
    elif not cuda and rule_path is None:
        memory = False
        result.memory_note = "peak memory not measured (the rule has no file to rerun)"

    # the T each method is actually run at
    run_at = {m: {T: (min(T, loop_t) if loop else T) for T in lengths}
              for m, (_, loop) in fns.items()}
    todo = [(T, bw) for T in sorted({t for m in run_at.values() for t in m.values()})
            for bw in (False, True)]
    total = sum(1 for T, _ in todo for m in fns if T in run_at[m].values()) * (2 if memory and cuda else 1)
    done = 0
    measured = {}  # (method, T actually run, backward) -> Entry
    for T, backward in todo:
        inputs = sample_inputs(rule, batch=batch, time=T, heads=heads, dims=sizes, device=device)
        here = {m: run_once(fn, inputs, backward) for m, (fn, _) in fns.items()
                if T in run_at[m].values()}
        failed = {}
        for m in list(here):  # a method that raises (a peer on odd sizes) is noted and dropped
            try:
                here[m]()
            except Exception as err:  # noqa: BLE001
                failed[m] = err
                del here[m]
        for m, err in failed.items():
            result.notes.append(f"{m} failed at T={T}: {type(err).__name__}: {str(err)[:120]}")
        for m, (wall, cpu) in timed(here, reps, budget).items():
            measured[(m, T, backward)] = Entry(wall, cpu)
            done += 1
            if progress:
                progress(done, total, f"{m} T={T} {'fwd+bwd' if backward else 'fwd'} {wall:.3g}s")
        if not cuda:  # after the timings: counting slows each op down
            for m, go in here.items():
                measured[(m, T, backward)].ops = count_ops(go)
        if memory and cuda:
            for m, go in here.items():
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                go()
                torch.cuda.synchronize()
                measured[(m, T, backward)].memory = torch.cuda.max_memory_allocated() - base
                done += 1
                if progress:
                    progress(done, total, f"{m} T={T} memory")
        del inputs, here
    if memory and not cuda:
        peaks = _cpu_memory(rule_path, consts or {}, rule, run_at, batch, heads, sizes, progress)
        for key, value in peaks.items():
            if key in measured:
                measured[key].memory = value

    for m in fns:
        for T in lengths:
            at = run_at[m][T]
            for backward in (False, True):
                e = measured.get((m, at, backward))
                if e is None:
                    continue
                if at == T:
                    result.entries[(m, T, backward)] = e
                else:
                    ops = round(e.ops * T / at) if e.ops is not None else None
                    result.entries[(m, T, backward)] = Entry(e.seconds * T / at, e.cpu * T / at, True,
                                                             ops=ops)
    result.methods = [m for m in fns if any(k[0] == m for k in result.entries)]
    return result


# ---------------------------------------------------------------- CPU memory, in fresh processes


def _cpu_memory(path, consts, rule, run_at, batch, heads, sizes, progress) -> dict:
    """(method, T, backward) -> peak bytes, one fresh process per method and pass, two at a
    time (after the timings, so they do not disturb them)."""
    jobs = []
    for m, at in run_at.items():
        ts = sorted(set(at.values()))
        for backward in (False, True):
            jobs.append({"path": str(Path(path).resolve()), "consts": consts, "method": m, "lengths": ts,
                         "backward": backward, "batch": batch, "heads": heads, "dims": sizes,
                         "threads": torch.get_num_threads()})
    out, running = {}, []
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)

    def finish(job, proc):
        stdout = proc.stdout.read()
        proc.stdout.close()
        proc.wait()
        try:
            peaks = json.loads(stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return
        for T, value in zip(job["lengths"], peaks):
            if value is not None:
                out[(job["method"], T, job["backward"])] = float(value)
        if progress:
            progress(None, None, f"memory: {job['method']} {'fwd+bwd' if job['backward'] else 'fwd'}")

    for job in jobs:
        if len(running) >= 2:
            finish(*running.pop(0))
        proc = subprocess.Popen([sys.executable, "-c", "import recdsl.bench as b; b._memory_child()"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=env)
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
        running.append((job, proc))
    for job, proc in running:
        finish(job, proc)
    return out


def _memory_child():
    """A fresh process: one method, one pass, its T values in increasing order; prints the
    rise of its max RSS (bytes) after each, as a JSON list."""
    import resource

    import recdsl
    from .runtime.sample import sample_inputs

    job = json.loads(sys.stdin.read())
    torch.set_num_threads(job["threads"])
    rule = recdsl.load(job["path"], **job["consts"])
    from .runtime.backends import NAMES

    m = job["method"]
    fn = _call(rule, m) if m in NAMES else peers(rule).get(m, (None,))[0]
    peaks = []
    for T in job["lengths"]:
        if fn is None:
            peaks.append(None)
            continue
        inputs = sample_inputs(rule, batch=job["batch"], time=T, heads=job["heads"],
                               dims=job["dims"])
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            run_once(fn, inputs, job["backward"])()
            peaks.append((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
        except Exception:  # noqa: BLE001
            peaks.append(None)
    print(json.dumps(peaks))


# ---------------------------------------------------------------- the table and the plot


def _ms(e: Entry) -> str:
    s = e.seconds * 1e3
    text = f"{s:,.0f}" if s >= 10 else f"{s:.2f}"
    return ("~" if e.extrapolated else "") + text


def _rate(e: Entry, tokens) -> str:
    r = tokens / e.seconds if e.seconds > 0 else math.inf
    text = f"{r / 1e6:.2f}M" if r >= 1e6 else f"{r / 1e3:.1f}K" if r >= 1e3 else f"{r:.0f}"
    return ("~" if e.extrapolated else "") + text


def _mib(e: Entry | None) -> str:
    if e is None or e.memory is None:
        return "-"
    mib = e.memory / 2 ** 20
    return f"{mib:.1f}" if mib >= 10 else f"{mib:.2f}"


def _ops(fwd: Entry | None, both: Entry | None) -> str:
    counts = [e for e in (fwd, both) if e is not None and e.ops is not None]
    if not counts:
        return "-"
    return ", ".join(("~" if e.extrapolated else "") + f"{e.ops:,}" for e in counts)


def table(result: BenchResult) -> str:
    """A markdown table: one row per T and method."""
    lines = []
    dims = " ".join(f"{d}={n}" for d, n in result.dims.items())
    lines.append(f"# {result.rule} on {result.device}: B={result.batch} H={result.heads} {dims}, "
                 f"float32, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for note in result.notes:
        lines.append(f"# {note}")
    vs = result.vs
    lines.append("")
    lines.append(f"| T | method | fwd ms | fwd tok/s | fwd+bwd ms | fwd+bwd tok/s | fwd peak MiB "
                 f"| fwd+bwd peak MiB | {vs} / this: fwd | fwd+bwd | ops/call fwd, fwd+bwd |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for T in result.lengths:
        tokens = result.batch * T
        for m in result.methods:
            fwd, both = (result.entries.get((m, T, bw)) for bw in (False, True))
            if fwd is None and both is None:
                continue
            ratios = []
            for bw, e in ((False, fwd), (True, both)):
                base = result.entries.get((vs, T, bw))
                ratios.append(f"{base.seconds / e.seconds:.1f}x" if e and base and m != vs else "")
            cells = [str(T), m,
                     _ms(fwd) if fwd else "-", _rate(fwd, tokens) if fwd else "-",
                     _ms(both) if both else "-", _rate(both, tokens) if both else "-",
                     _mib(fwd), _mib(both), *ratios, _ops(fwd, both)]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"~: a per-token loop timed at T={result.loop_t} (or less) and extrapolated "
                 f"linearly in T. Times are medians of wall time; tok/s = B*T / time. "
                 f"{result.memory_note}. ops/call: ATen operators one call dispatches "
                 f"(CPU; the backward's included in fwd+bwd).")
    return "\n".join(lines)


def plot(result: BenchResult, path) -> str:
    """Write a PNG of time against T (forward, forward+backward); returns a line saying what
    was done (matplotlib missing: skipped)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "# matplotlib is not installed: no plot (pip install matplotlib)"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), squeeze=False)
    for col, backward in enumerate((False, True)):
        ax = axes[0][col]
        for m in result.methods:
            pts = [(T, result.entries[(m, T, backward)]) for T in result.lengths
                   if (m, T, backward) in result.entries]
            if not pts:
                continue
            line, = ax.plot([T for T, _ in pts], [e.seconds for _, e in pts], label=m)
            for T, e in pts:
                ax.plot([T], [e.seconds], "o", color=line.get_color(),
                        markerfacecolor="none" if e.extrapolated else line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{result.rule}, {'forward+backward' if backward else 'forward'}")
        ax.set_xlabel("T")
        ax.set_ylabel("wall seconds")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result.rule} on {result.device}, B={result.batch} H={result.heads} "
                 f"(hollow: extrapolated)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"# plot: {path}"
