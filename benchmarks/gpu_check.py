"""The GPU proof kit: one command that checks and times recdsl on a CUDA machine.

(a) correctness: every example rule (examples/*.rec) with every parallel backend that
    ``rule.backends("cuda")`` lists, against the naive loop in float64, in float32 (forward
    and gradients) and bfloat16 (forward), at T = 1, 65, 2048 and packed sequences with
    initial states, through recdsl's autotester (``recdsl.runtime.autotest``: TESTING.md's
    pass rule, a backend's error at most 10x (float32) or 2x (bfloat16) the naive loop's own
    error in that dtype); the report lists each rule x backend x dtype's worst case; and the
    chunk backend of gated_delta and gla in bfloat16 under every precision policy
    (``rule(..., precision=)``), outputs and gradients by the same rule (the autotester
    checks half types forward only, and the default policy's half operands are in the
    backward);
(b) timing: the chunk, scan and recurrent kernels at B=8 T=4096 H=16 K=V=128 bfloat16,
    forward and forward+backward; the chunk kernels of gated_delta and gla under each other
    precision policy (``rule(..., precision=)``, recdsl.codegen.precision: the plain item is
    "auto", i.e. "mixed" for bfloat16 inputs; items ``chunk@half`` etc.); and fla's Triton
    kernels where fla is installed (chunk_gated_delta_rule, chunk_gla, chunk_simple_gla,
    chunk_kda, chunk_rwkv7);
(c) a markdown report (--out).

The newton backend (rules without a parallel form: bench_newton.py's ParaGRU, ParaLSTM and
LSTM with dense R) is in both: checked like the examples in float32 (its Triton solves have
never run on a GPU), and timed fwd and fwd+bwd at bench_newton.py's B=2 H=4 D=64, T=4096,
float32, against the fused recurrent kernel (what ``newton.AUTO_MIN_TOKENS_CUDA`` waits for).

    python benchmarks/gpu_check.py --out gpu_report.md            # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run                      # anywhere: imports and plan

Sized to finish in under 8 minutes on one H100, Triton compilation included; --budget
SECONDS (default 420) skips what remains once exceeded (correctness stops starting new rules
at 60% of it, leaving the rest to the timings).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import recdsl  # noqa: E402
from recdsl.bench import run_once, timed  # noqa: E402
from recdsl.codegen.precision import NAMES as PRECISIONS  # noqa: E402
from recdsl.runtime.autotest import Shape, run_autotest  # noqa: E402
from recdsl.runtime.sample import sample_inputs  # noqa: E402

PARALLEL = ("chunk", "scan", "torch-chunk", "torch-scan", "recurrent")
DTYPES = ("float32", "bfloat16")
# T = 1, 65, 2048 and three packed sequences (one a single token) with initial states
SHAPES = (Shape(2, 1, 2), Shape(2, 65, 2, initial_state=True), Shape(1, 2048, 2),
          Shape(1, 65, 2, cu_seqlens=(0, 1, 30, 65), initial_state=True))
# the timing problem
TB, TT, TH, TK = 8, 4096, 16, 128
TIMED_RULES = ("gated_delta", "delta", "gla", "retention", "mamba2", "mlstm")
TIMED_BACKENDS = ("chunk", "scan", "recurrent")
# the chunk kernels timed under every precision policy besides the default (auto = mixed here)
POLICY_RULES = ("gated_delta", "gla")
POLICIES = tuple(p for p in PRECISIONS if p not in ("auto", "mixed"))
FLA_KERNELS = ("chunk_gated_delta_rule", "chunk_gla", "chunk_simple_gla", "chunk_kda", "chunk_rwkv7")
# the newton cells: checked (float32, the same shapes) and timed against the fused kernel
NEWTON_BACKENDS = ("newton", "recurrent")
NEWTON_T = 4096


def example_rules():
    return {p.stem: p for p in sorted((ROOT / "examples").glob("*.rec"))}


def newton_cells():
    """bench_newton.py's cells: name -> compiled rule (no parallel form: newton or the loop)."""
    from bench_newton import CELLS
    return {text.split()[1]: recdsl.compile(text) for _, text, _ in CELLS}


def load(path):
    return recdsl.load(path)


def plan():
    """(correctness, timing): correctness is a list of (rule, backend, dtype, shape label),
    every example rule x every parallel backend rule.backends("cuda") lists x dtype x shape;
    timing a list of (rule or "fla", backend or kernel name)."""
    checks = []
    for name, path in example_rules().items():
        rule = load(path)
        for backend in [b for b in rule.backends("cuda") if b in PARALLEL]:
            for dtype in DTYPES:
                for shape in SHAPES:
                    checks.append((name, backend, dtype, shape.label({})))
    timings = []
    rules = example_rules()
    for name in TIMED_RULES:
        if name in rules:
            cuda = load(rules[name]).backends("cuda")
            timings += [(name, b) for b in TIMED_BACKENDS if b in cuda]
    for name in POLICY_RULES:
        if name in rules and "chunk" in load(rules[name]).backends("cuda"):
            timings += [(name, f"chunk@{p}") for p in POLICIES]
    timings += [("fla", k) for k in FLA_KERNELS]
    for name in newton_cells():
        for backend in NEWTON_BACKENDS:
            checks.append((name, backend, "float32", "shapes as above"))
            timings.append((f"newton-cell {name}", backend))
    return checks, timings


# ---------------------------------------------------------------- (a) correctness


def correctness(deadline, log):
    """rows: (rule, backend, dtype, cases, failed, worst quantity, worst x ref, shape)."""
    rows, skipped = [], []
    work = [(name, load(path), [b for b in load(path).backends("cuda") if b in PARALLEL], list(DTYPES))
            for name, path in example_rules().items()]
    work += [(name, rule, list(NEWTON_BACKENDS), ["float32"]) for name, rule in newton_cells().items()]
    for name, rule, backends, dtypes in work:
        if time.perf_counter() > deadline:
            skipped.append(name)
            continue
        start = time.perf_counter()
        try:
            report = run_autotest(rule, backends=backends, shapes=SHAPES, dtypes=dtypes,
                                  device="cuda", progress=None)
        except Exception as err:  # noqa: BLE001 - a crash is a result
            rows.append((name, ",".join(backends), "-", 0, 1, f"crashed: {type(err).__name__}: "
                         f"{str(err)[:100]}", math.nan, "-"))
            log(f"  {name}: crashed ({err!r})")
            continue
        for backend in backends:
            for dtype in report.dtypes:
                cases = [c for c in report.cases if c.backend == backend and c.dtype == dtype]
                failed = [c for c in cases if not c.passed]
                scored = [c for c in cases if c.worst is not None]
                worst = max(scored, key=lambda c: (not c.passed, _finite(c.worst.score)), default=None)
                if failed and failed[0].problems:
                    what, score, where = failed[0].problems[0].splitlines()[0][:100], math.nan, failed[0].label
                elif worst is not None:
                    what, score, where = worst.worst.name, worst.worst.score, worst.label
                else:
                    what, score, where = "-", math.nan, "-"
                rows.append((name, backend, str(dtype).replace("torch.", ""), len(cases),
                             len(failed), what, score, where))
        log(f"  {name}: {len(report.cases)} cases, {len(report.failures)} failed, "
            f"{time.perf_counter() - start:.0f} s")
    return rows, skipped


def _outputs_and_grads(rule, x, dtype, backend, **options):
    """name -> tensor: the output and the gradient of every input under fixed random upstream
    gradients, the inputs ``x`` cast to ``dtype``."""
    leaves = {k: v.to(dtype).clone().requires_grad_(True) for k, v in x.items()}
    out, _ = rule(**leaves, backend=backend, **options)
    up = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(1),
                     dtype=torch.float64, device=out.device)
    grads = torch.autograd.grad((out.double() * up).sum(), list(leaves.values()))
    return {"o": out.detach(), **{f"d{k}": g for k, g in zip(x, grads)}}


def policy_checks(deadline, log):
    """rows: (rule, policy, quantities, failed, worst quantity, worst x ref) for the chunk
    backend in bfloat16 under each precision policy, at B=1 T=2048 H=2 and the timing dims,
    against the float64 naive loop with the naive loop in bfloat16 as the reference."""
    from recdsl.runtime.autotest import measure
    rows = []
    for name in POLICY_RULES:
        rule = load(example_rules()[name])
        if time.perf_counter() > deadline or "chunk" not in rule.backends("cuda"):
            rows += [(name, p, 0, 0, "skipped", math.nan) for p in PRECISIONS]
            continue
        x = sample_inputs(rule, batch=1, time=2048, heads=2, dims=_dims(rule), dtype=torch.float64,
                          device="cuda")
        golden = _outputs_and_grads(rule, x, torch.float64, "naive")
        reference = _outputs_and_grads(rule, x, torch.bfloat16, "naive")
        for policy in PRECISIONS:
            try:
                got = _outputs_and_grads(rule, x, torch.bfloat16, "chunk", precision=policy)
                qs = [measure(q, got[q], golden[q], reference[q], torch.bfloat16) for q in golden]
                worst = max(qs, key=lambda q: (not q.passed, _finite(q.score)))
                rows.append((name, policy, len(qs), sum(not q.passed for q in qs),
                             worst.note or worst.name, worst.score))
            except Exception as err:  # noqa: BLE001 - a crash is a result
                rows.append((name, policy, 0, 1, f"crashed: {type(err).__name__}: {str(err)[:100]}",
                             math.nan))
            log(f"  {name} chunk precision={policy}: {rows[-1][3]} failed, worst {rows[-1][4]} "
                f"{rows[-1][5]:.2f}x")
    return rows


def _finite(x):
    return x if math.isfinite(x) else math.inf


# ---------------------------------------------------------------- (b) timing


def _dims(rule):
    loops = rule.ir.loop_dims()
    return {d: (2 if d in loops else TK) for d in rule.ir.dims}


def time_recdsl(name, backend):
    """``backend`` or ``backend@policy`` (a precision policy, default auto)."""
    backend, _, policy = backend.partition("@")
    rule = load(example_rules()[name])
    x = sample_inputs(rule, batch=TB, time=TT, heads=TH, dims=_dims(rule), dtype=torch.bfloat16,
                      device="cuda")
    fn = lambda a: rule(**a, backend=backend, precision=policy or "auto")[0]  # noqa: E731
    return {bw: timed({"f": run_once(fn, x, bw)}, 3, 30.0)["f"][0] for bw in (False, True)}


def time_newton_cell(name, backend):
    """A newton cell at bench_newton.py's shape, float32, T = NEWTON_T."""
    from bench_newton import inputs_for
    rule = newton_cells()[name]
    x = {k: v.cuda() for k, v in inputs_for(rule, NEWTON_T).items()}
    fn = lambda a: rule(**a, backend=backend)[0]  # noqa: E731
    return {bw: timed({"f": run_once(fn, x, bw)}, 3, 30.0)["f"][0] for bw in (False, True)}


def fla_inputs(kernel):
    """fn(inputs) and inputs of one fla Triton kernel at the timing shape, bfloat16."""
    import fla.ops as ops  # noqa: F401 - fails here when fla is missing
    B, T, H, K = TB, TT, TH, TK
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    gate = lambda *s: torch.nn.functional.logsigmoid(  # noqa: E731
        torch.randn(*s, device="cuda")).to(torch.bfloat16)
    unit = lambda *s: torch.rand(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    qkv = {"q": r(B, T, H, K), "k": r(B, T, H, K), "v": r(B, T, H, K)}
    if kernel == "chunk_gated_delta_rule":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as f
        return (lambda a: f(a["q"], a["k"], a["v"], a["g"].float(), a["beta"],
                            use_qk_l2norm_in_kernel=True)[0]), {**qkv, "g": gate(B, T, H), "beta": unit(B, T, H)}
    if kernel == "chunk_gla":
        from fla.ops.gla import chunk_gla as f
        return (lambda a: f(a["q"], a["k"], a["v"], a["g"])[0]), {**qkv, "g": gate(B, T, H, K)}
    if kernel == "chunk_simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla as f
        return (lambda a: f(a["q"], a["k"], a["v"], a["g"].float())[0]), {**qkv, "g": gate(B, T, H)}
    if kernel == "chunk_kda":
        from fla.ops.kda import chunk_kda as f
        return (lambda a: f(a["q"], a["k"], a["v"], a["g"].float(), a["beta"],
                            use_qk_l2norm_in_kernel=True)[0]), {**qkv, "g": gate(B, T, H, K), "beta": unit(B, T, H)}
    if kernel == "chunk_rwkv7":
        from fla.ops.rwkv7 import chunk_rwkv7 as f
        kk = torch.nn.functional.normalize(torch.randn(B, T, H, K, device="cuda"), dim=-1)
        return (lambda a: f(a["q"], a["w"], a["k"], a["v"], -a["kk"], a["kk"] * a["beta"].unsqueeze(-1))[0]), \
            {**qkv, "w": gate(B, T, H, K), "kk": kk.to(torch.bfloat16), "beta": unit(B, T, H)}
    raise ValueError(kernel)


def time_fla(kernel):
    fn, x = fla_inputs(kernel)
    return {bw: timed({"f": run_once(fn, x, bw)}, 3, 30.0)["f"][0] for bw in (False, True)}


def timings(items, deadline, log):
    rows = []
    for who, what in items:
        if time.perf_counter() > deadline:
            rows.append((who, what, None, None, "skipped: over budget"))
            continue
        start = time.perf_counter()
        try:
            t = (time_fla(what) if who == "fla" else time_newton_cell(who.split()[1], what)
                 if who.startswith("newton-cell") else time_recdsl(who, what))
            note = (f"B=2 H=4 D=64 T={NEWTON_T} float32 (bench_newton.py's cell)"
                    if who.startswith("newton-cell") else "")
            rows.append((who, what, t[False], t[True], note))
        except ImportError as err:
            rows.append((who, what, None, None, f"not installed ({err.name})"))
        except Exception as err:  # noqa: BLE001
            rows.append((who, what, None, None, f"{type(err).__name__}: {str(err)[:100]}"))
        torch.cuda.empty_cache()
        log(f"  {who} {what}: {rows[-1][2:]} ({time.perf_counter() - start:.0f} s incl. compile)")
    return rows


# ---------------------------------------------------------------- (c) the report


def report(path, checks, skipped, times, sections, total, policies=()):
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    import triton
    lines = [f"# recdsl GPU check", "",
             f"{gpu}; torch {torch.__version__}, triton {triton.__version__}, recdsl "
             f"{recdsl.__version__}; {total:.0f} s in all ("
             + ", ".join(f"{k} {v:.0f} s" for k, v in sections.items()) + ").", "",
             "## Correctness against the float64 naive loop", "",
             "Shapes: " + "; ".join(s.label({}) for s in SHAPES) + ", dims from "
             "autotest.default_dims. Pass rule (TESTING.md): error <= 10x (float32) or 2x "
             "(bfloat16, forward only) the naive loop's own error in that dtype. `x ref` is "
             "the worst case's error over that allowance.", "",
             "| rule | backend | dtype | cases | failed | worst quantity | x ref | at |",
             "|---|---|---|---:|---:|---|---:|---|"]
    for r in checks:
        score = f"{r[6]:.2f}" if isinstance(r[6], float) and math.isfinite(r[6]) else "-"
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {score} | {r[7]} |")
    failed = sum(r[4] for r in checks)
    lines += ["", f"{failed} failing case(s)." + (f" Skipped (over budget): {', '.join(skipped)}."
                                                   if skipped else "")]
    lines += ["", "## Precision policies: chunk, bfloat16, outputs and gradients", "",
              "B=1 T=2048 H=2, timing dims; `x ref` as above (limit 2). Policies: "
              "recdsl/codegen/precision.py (auto = mixed for bfloat16); only auto's failures "
              "count as failing cases (the others are opt-in trade-offs: half rounds the "
              "outputs' products too).", "",
              "| rule | policy | quantities | failed | worst | x ref |", "|---|---|---:|---:|---|---:|"]
    for r in policies:
        score = f"{r[5]:.2f}" if math.isfinite(r[5]) else "-"
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {score} |")
    failed += sum(r[3] for r in policies if r[1] == "auto")  # the others are opt-in trade-offs
    lines += ["", f"## Timing, B={TB} T={TT} H={TH} K=V={TK} (N=P for mamba2), bfloat16", "",
              "Median of 3 after a warm-up, wall ms (CUDA synchronised). `chunk` runs the "
              "default precision policy (auto: `mixed` for bfloat16, half operands in the "
              "backward's chunk products, tf32x3 elsewhere); `chunk@P` the policy P.", "",
              "| who | kernel | fwd ms | fwd+bwd ms | note |", "|---|---|---:|---:|---|"]
    for who, what, f, b, note in times:
        ms = lambda s: f"{s * 1e3:.2f}" if s is not None else "-"  # noqa: E731
        lines.append(f"| {who} | {what} | {ms(f)} | {ms(b)} | {note} |")
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text)
    return text, failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_report.md", help="the markdown report (default gpu_report.md)")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds; remaining sections and items are skipped past it (default 420)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the imports and print the plan, run nothing (works without a GPU)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731

    checks, timing_items = plan()
    if args.dry_run:
        import triton  # noqa: F401
        import importlib.util
        log(f"imports ok: recdsl {recdsl.__version__}, torch {torch.__version__}, triton "
            f"{triton.__version__}; fla {'found' if importlib.util.find_spec('fla') else 'missing'}; "
            f"CUDA {'available' if torch.cuda.is_available() else 'not available'}")
        log(f"correctness plan: {len(checks)} cases (rule backend dtype shape)")
        for c in checks:
            log("  check " + " ".join(c))
        log(f"precision plan: chunk, bfloat16, B=1 T=2048 H=2, outputs and gradients")
        for name in POLICY_RULES:
            for policy in PRECISIONS:
                log(f"  policy {name} {policy}")
        log(f"timing plan: B={TB} T={TT} H={TH} K=V={TK} bfloat16, fwd and fwd+bwd; "
            f"kernel@policy: a precision policy other than auto")
        for who, what in timing_items:
            log(f"  time {who} {what}")
        return 0
    if not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run to check the plan here)", file=sys.stderr)
        return 1

    sections = {}
    log(f"(a) correctness: {len(checks)} cases")
    t0 = time.perf_counter()
    rows, skipped = correctness(start + 0.6 * args.budget, log)
    log("(a) precision policies")
    policies = policy_checks(start + 0.6 * args.budget, log)
    sections["correctness"] = time.perf_counter() - t0
    log(f"(a) done in {sections['correctness']:.0f} s")
    t0 = time.perf_counter()
    log(f"(b) timing: {len(timing_items)} items")
    times = timings(timing_items, start + args.budget, log)
    sections["timing"] = time.perf_counter() - t0
    log(f"(b) done in {sections['timing']:.0f} s")
    try:
        text, failed = report(args.out, rows, skipped, times, sections, time.perf_counter() - start,
                              policies)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    log(f"(c) report: {args.out}, {time.perf_counter() - start:.0f} s in all")
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
