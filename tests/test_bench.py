"""recdsl bench (recdsl/bench.py, the CLI) and benchmarks/gpu_check.py's plan (no GPU needed)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import recdsl
from recdsl.cli import main

ROOT = Path(__file__).resolve().parents[1]

# a nonlinear recurrence: no chunkwise form and no elementwise scan, only the loops
NONLINEAR = """rule tanh_rnn
dims D
state h[D]
input x[D]
param W[D, D]
h = tanh(W @ h + x)
output y = h
"""


def _rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| T ")]


def test_bench_quick_gated_delta(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plot = tmp_path / "gd.png"
    code = main(["bench", str(ROOT / "examples" / "gated_delta.rec"), "--quick", "--T", "64,128",
                 "--dims", "K=16,V=16", "--no-memory", "--plot", str(plot)])
    out = capsys.readouterr()
    assert code == 0
    rule = recdsl.load(ROOT / "examples" / "gated_delta.rec")
    from recdsl.bench import parallel_backends
    rows = _rows(out.out)
    for backend in parallel_backends(rule, "cpu") + ["naive"]:
        for T in (64, 128):
            assert any(r.startswith(f"| {T} | {backend} |") for r in rows), (backend, T, out.out)
    assert "[" in out.err  # progress on stderr
    for r in rows:  # ops per call (fwd, fwd+bwd) for every CPU method; the backward adds ops
        fwd, both = (int(n.replace(",", "").lstrip("~")) for n in r.split(" | ")[-1].rstrip(" |").split(", "))
        assert 0 < fwd < both, r
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.exists() and plot.stat().st_size > 0
    else:
        assert "no plot" in out.out


def test_bench_no_parallel_path_times_naive_with_memory(capsys, tmp_path):
    path = tmp_path / "tanh_rnn.rec"
    path.write_text(NONLINEAR)
    code = main(["bench", str(path), "--quick", "--T", "16,32", "--dims", "D=8",
                 "--plot", str(tmp_path / "p.png"), "--loop-t", "16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "has no parallel path" in out
    rows = _rows(out)
    assert [r.split(" | ")[1] for r in rows] == ["naive", "naive"]
    assert "~" in rows[1]  # T=32 extrapolated from T=16
    mem = rows[0].split(" | ")[6]  # the fresh-process RSS figure of the measured row
    assert mem != "-" and float(mem) >= 0


def test_count_ops_counts_aten_operators_below_autograd():
    import torch
    from recdsl.bench import count_ops

    a = torch.randn(4, 3)
    assert count_ops(lambda: (a * 2).sum()) == 2
    w = torch.randn(3, requires_grad=True)
    # forward: mul, sum; backward: the ones seed, sum's expand and mul's gradient (a mul)
    assert count_ops(lambda: (a * w).sum().backward()) > count_ops(lambda: (a * w).sum())


def test_timed_and_run_once():
    import torch
    from recdsl.bench import run_once, timed

    x = {"a": torch.randn(4, 3)}
    got = timed({"f": run_once(lambda d: (d["a"] * 2).sum(), x, True),
                 "g": run_once(lambda d: d["a"] + 1, x, False)}, 2, 10.0)
    assert set(got) == {"f", "g"} and all(w >= 0 and c >= 0 for w, c in got.values())


def test_gpu_check_dry_run_covers_every_rule_and_backend():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    planned = {tuple(line.split()[1:3]) for line in proc.stdout.splitlines()
               if line.strip().startswith("check ")}
    dtypes = {line.split()[3] for line in proc.stdout.splitlines() if line.strip().startswith("check ")}
    assert dtypes == {"float32", "bfloat16"}
    parallel = {"chunk", "scan", "torch-chunk", "torch-scan", "recurrent"}
    for path in sorted((ROOT / "examples").glob("*.rec")):
        rule = recdsl.load(path)
        for backend in rule.backends("cuda"):
            if backend in parallel:
                assert (path.stem, backend) in planned, (path.stem, backend)
    assert "time fla chunk_gated_delta_rule" in proc.stdout
    # the chunk kernels under every precision policy besides auto (the plain item)
    from recdsl.codegen.precision import NAMES
    for name in ("gated_delta", "gla"):
        assert f"time {name} chunk\n" in proc.stdout
        for policy in set(NAMES) - {"auto", "mixed"}:
            assert f"time {name} chunk@{policy}\n" in proc.stdout, policy
        for policy in NAMES:  # and checks each one's outputs and gradients in bfloat16
            assert f"policy {name} {policy}\n" in proc.stdout, policy
