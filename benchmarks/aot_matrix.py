"""Ahead-of-time build matrix of the chunk kernels: registers, spills and shared memory.

Builds every chunk kernel (the generated prologues and the fixed chunk cores) of the delta
and diagonal families' example rules for sm_80 and sm_90 at the sizes issues 5 and 6 name,
with the same builder as ``recdsl compile --arch --report`` (``recdsl.codegen.aot``: Triton's
ptxas, no GPU needed), and prints one row per kernel build, then the rows that spill or need
more shared memory than the architecture has. The recurrent kernels are left out unless
``--recurrent`` is given (they have their own issue). Exit status 1 when a row fails.

    python3 benchmarks/aot_matrix.py                      # the whole matrix (~10 minutes)
    python3 benchmarks/aot_matrix.py --rules deltaproduct --arch sm_80 --size 128
    python3 benchmarks/aot_matrix.py --jobs 2             # two builds at a time

Sizes: K = V = SIZE (Mamba-2: N = P = SIZE); DeltaProduct at NH = 2 and 3; Raven at
M = 64 and 256 slots.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DELTA = ("delta", "gated_delta", "kla", "deltaproduct")
DIAGONAL = ("linear_attention", "retention", "mamba2", "gla", "raven")


def configurations(rules, sizes):
    """(rule file stem, dims) for every point of the matrix."""
    for rule in rules:
        for n in sizes:
            if rule == "deltaproduct":
                for nh in (2, 3):
                    yield rule, {"K": n, "V": n, "NH": nh}
            elif rule == "mamba2":
                yield rule, {"N": n, "P": n}
            elif rule == "raven":
                for m in (64, 256):
                    yield rule, {"M": m, "K": n, "V": n}
            else:
                yield rule, {"K": n, "V": n}


def build(job):
    """Rows (dicts) of one rule at one size on one architecture."""
    rule_name, dims, arch_name, recurrent = job
    import recdsl
    from recdsl.codegen import aot, export
    rule = recdsl.load(ROOT / "examples" / f"{rule_name}.rec").ir
    sizes = export.default_dims(rule, dims)
    arch = aot.ARCHS[arch_name]
    builds = []
    for module in export.generated_modules(rule, sizes):
        if module.kind == "recurrent" and not recurrent:
            continue
        builds += aot.build_module(module, arch)
    repeated = aot.repeated_names(builds)
    return [dict(rule=rule_name, dims=",".join(f"{d}={n}" for d, n in sizes.items()), arch=arch_name,
                 kernel=aot.label(b, repeated), warps=b.num_warps, registers=b.registers,
                 spill=b.spill_bytes, stack=b.stack, shared=b.shared,
                 problems=b.problems(arch, aot.label(b, repeated)))
            for b in builds]


def table(rows) -> str:
    header = ["rule", "dims", "arch", "kernel", "warps", "regs", "spill B", "shared"]
    cells = [header] + [[r["rule"], r["dims"], r["arch"], r["kernel"], str(r["warps"]),
                         str(r["registers"]), str(r["spill"]), f"{r['shared'] / 1024:.1f} KiB"]
                        for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    align = ["<", "<", "<", "<", ">", ">", ">", ">"]
    return "\n".join("  ".join(f"{c:{a}{w}}" for c, a, w in zip(row, align, widths)).rstrip()
                     for row in cells)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", nargs="+", default=list(DELTA + DIAGONAL),
                        choices=DELTA + DIAGONAL, metavar="RULE")
    parser.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], choices=["sm_80", "sm_90"])
    parser.add_argument("--size", nargs="+", type=int, default=[64, 128],
                        help="K = V (N = P for Mamba-2); default 64 128")
    parser.add_argument("--recurrent", action="store_true", help="also build the recurrent kernels")
    parser.add_argument("--jobs", type=int, default=1, help="builds at a time (processes)")
    parser.add_argument("--failures-only", action="store_true", help="print only the rows that fail")
    args = parser.parse_args(argv)
    jobs = [(rule, dims, arch, args.recurrent)
            for rule, dims in configurations(args.rules, args.size) for arch in args.arch]
    rows = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for i, part in enumerate(pool.map(build, jobs)):
            rule, dims, arch, _ = jobs[i]
            bad = sum(1 for r in part if r["problems"])
            print(f"[{i + 1}/{len(jobs)}] {rule} {dims} {arch}: {len(part)} kernels, {bad} failing",
                  file=sys.stderr, flush=True)
            rows += part
    failing = [r for r in rows if r["problems"]]
    if not args.failures_only:
        print(table(rows))
        print()
    if failing:
        print(f"{len(failing)} of {len(rows)} kernel builds fail:")
        print(table(failing))
        for r in failing:
            for text in r["problems"]:
                print(f"  {r['rule']} {r['dims']}: {text}")
        return 1
    print(f"all {len(rows)} kernel builds: no spills, shared memory within the architecture's limit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
