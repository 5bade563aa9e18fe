"""runtime.autotest: the pass rule, the harness on the naive loop and on deliberately wrong
backends, the table, and the command."""
import argparse
import copy
import math
import os
import re
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl.codegen.naive import run_naive
from recdsl.errors import RecdslError
from recdsl.runtime import autotest, backends
from recdsl.runtime.autotest import (AutotestReport, CaseResult, Quantity, Shape, default_dims,
                                     default_shapes, measure, run_autotest)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SMALL = {"K": 6, "V": 5}
SHAPES = [Shape(1, 1, 1), Shape(2, 5, 2, initial_state=True),
          Shape(1, 9, 2, cu_seqlens=(0, 1, 4, 9), initial_state=True)]


def load(name):
    return recdsl.load(EXAMPLES / f"{name}.rec")


def names(case):
    return [q.name for q in case.quantities]


def failing(case):
    return [q.name for q in case.quantities if not q.passed]


# ---------------------------------------------------------------- the pass rule


def test_error_within_ten_times_the_naive_error_passes_in_float32():
    golden = torch.ones(100, dtype=torch.float64)
    reference = golden + 1e-5  # the naive loop in float32 is 1e-5 off
    ok = measure("o", golden + 9e-5, golden, reference, torch.float32)
    assert (ok.passed, ok.score, ok.rms_ratio, ok.reference_ratio) == (True, pytest.approx(9),
                                                                       pytest.approx(9e-5), pytest.approx(1e-5))
    assert ok.max_abs == pytest.approx(9e-5)
    bad = measure("o", golden + 1.1e-4, golden, reference, torch.float32)
    assert (bad.passed, bad.score) == (False, pytest.approx(11))


def test_half_types_allow_twice_the_naive_error():
    golden = torch.full((10,), 2.0, dtype=torch.float64)
    reference = golden + 1e-2
    assert measure("o", golden + 1.9e-2, golden, reference, torch.float16).passed
    assert not measure("o", golden + 2.1e-2, golden, reference, torch.float16).passed


def test_floor_when_the_naive_loop_is_exact():
    golden = torch.full((10,), 3.0, dtype=torch.float64)
    # floor = 1e-6 * rms(golden) = 3e-6, limit 10x
    assert measure("o", golden + 2.9e-5, golden, golden, torch.float32).score == pytest.approx(29 / 3)
    assert not measure("o", golden + 3.1e-5, golden, golden, torch.float32).passed
    # a golden of exact zeros: the absolute floor, 1e-9 in float32
    zero = torch.zeros(10, dtype=torch.float64)
    assert measure("dg", zero + 5e-9, zero, zero, torch.float32).passed
    assert not measure("dg", zero + 2e-8, zero, zero, torch.float32).passed


def test_missing_gradient_non_finite_and_wrong_shape_fail():
    golden = torch.ones(4, dtype=torch.float64)
    none = measure("dk", None, golden, golden, torch.float32)
    assert (none.passed, none.note, none.rms_ratio) == (False, "no gradient", 1.0)
    # no gradient where golden has none either (the input does not reach the results)
    assert measure("dk", None, None, None, torch.float32).passed
    nan = measure("o", torch.tensor([1.0, math.nan, 1.0, 1.0]), golden, golden, torch.float32)
    assert (nan.passed, nan.note) == (False, "not finite")
    shape = measure("o", torch.ones(2, 2), golden, golden, torch.float32)
    assert (shape.passed, shape.note) == (False, "shape [2, 2], expected [4]")


# ---------------------------------------------------------------- defaults


def test_default_dims_are_not_powers_of_two():
    assert default_dims(load("gated_delta")) == {"K": 48, "V": 40}
    assert default_dims(load("raven")) == {"M": 24, "K": 48, "V": 40}
    assert default_dims(load("deltaproduct")) == {"K": 48, "V": 40, "NH": 2}


def test_default_shapes():
    full, quick = default_shapes(), default_shapes(quick=True)
    assert [(s.batch, s.time, s.heads) for s in full[:10]] == [
        (b, t, h) for t in (1, 17, 64, 65, 200) for b, h in ((1, 1), (2, 2))]
    assert sorted({s.time for s in quick}) == [1, 17, 65]
    assert len(full) == 13 and len(quick) == 9
    packed = [s for s in full if s.cu_seqlens]
    assert [(s.cu_seqlens, s.sequences, s.initial_state) for s in packed] == [
        ((0, 1, 30, 65), 3, False), ((0, 1, 30, 65), 3, True)]
    assert [s.batch for s in full if s.initial_state and not s.cu_seqlens] == [2]


# ---------------------------------------------------------------- the harness on the naive loop


def test_only_the_naive_loop_means_nothing_to_test(only_naive):
    report = run_autotest(load("gated_delta"), progress=None)
    assert report.cases == [] and report.passed
    assert report.summary() == "PASS (nothing tested): rule 'gated_delta' has only the naive loop, the reference"


@pytest.mark.parametrize("name, dims, quantities", [
    ("gated_delta", SMALL, ["o", "final S", "dq", "dk", "dv", "dg", "dbeta"]),
    # M = 5 < topk = 8: keep_topk keeps every slot
    ("raven", {**SMALL, "M": 5}, ["o", "final Sk", "final Sv", "dq", "dk", "dv", "droute", "da",
                                  "dA_log", "ddt_bias"]),
])
def test_naive_loop_as_a_candidate_passes(name, dims, quantities):
    lines = []
    report = run_autotest(load(name), backends=["naive"], dims=dims, shapes=SHAPES, progress=lines.append)
    assert report.passed, report.table()
    assert len(report.cases) == 3 and len(lines) == 3
    states = [v.name for v in load(name).states]
    init = ["d initial " + s for s in states]
    assert [names(c) for c in report.cases] == [quantities, quantities + init, quantities + init]
    for case in report.cases:
        # the same computation as the reference: bit for bit its error
        assert all(q.rms_ratio == q.reference_ratio for q in case.quantities)
        assert all(q.score <= 1 for q in case.quantities)
    assert lines[2].startswith(f"[3/3] naive B=1 T=9 H=2 {' '.join(f'{d}={n}' for d, n in report.cases[0].dims.items())}"
                               " packed 1+3+5 +init float32: ok (worst ")


def test_float16_is_forward_only():
    report = run_autotest(load("gated_delta"), backends=["naive"], dims=SMALL, shapes=SHAPES[:1],
                          dtypes=["float16"], progress=None)
    assert report.passed
    assert names(report.cases[0]) == ["o", "final S"]
    assert report.cases[0].dtype == torch.float16


def test_bad_arguments_are_recdsl_errors():
    rule = load("gated_delta")
    with pytest.raises(RecdslError, match="unknown backend 'fast'; choose from: chunk, scan, "
                                          "torch-chunk, torch-scan, newton, recurrent, naive"):
        run_autotest(rule, backends=["fast"], progress=None)
    with pytest.raises(RecdslError, match="rule 'gated_delta' has no dim 'M'"):
        run_autotest(rule, backends=["naive"], dims={"M": 4}, progress=None)
    with pytest.raises(RecdslError, match="cannot test dtype 'int8'"):
        run_autotest(rule, backends=["naive"], dtypes=["int8"], progress=None)


# ---------------------------------------------------------------- wrong backends


@pytest.fixture
def only_naive(monkeypatch):
    """The registry with only the naive loop available (no interpreted Triton: slow)."""
    monkeypatch.setattr(backends, "available", lambda rule, device=None: ["naive"])


@pytest.fixture
def register(monkeypatch, only_naive):
    """Register a runner under a new backend name, available to every rule."""
    def add(name, runner):
        monkeypatch.setattr(backends, "NAMES", backends.NAMES + (name,))
        monkeypatch.setitem(backends._RUNNERS, name, runner)
        available = backends.available
        monkeypatch.setattr(backends, "available", lambda rule, device=None: [name] + available(rule, device))
    return add


def perturbed(rule, call):
    outputs, finals = run_naive(rule.ir, call)
    return tuple(o + 1e-3 for o in outputs), finals


def drops_dk(rule, call):
    call = copy.copy(call)
    call.tensors = {**call.tensors, "k": call.tensors["k"].detach()}
    return run_naive(rule.ir, call)


def raises(rule, call):
    raise RuntimeError("kernel exploded\nat line 3")


def test_perturbed_output_fails_and_names_it(register):
    register("perturbed", perturbed)
    report = run_autotest(load("gated_delta"), dims=SMALL, shapes=SHAPES[:2], progress=None)
    assert report.backends == ["perturbed"]  # the default: every available backend but naive
    assert not report.passed
    assert [failing(c) for c in report.cases] == [["o"], ["o"]]
    for case in report.cases:
        assert case.worst.name == "o" and case.worst.rms_ratio > 1e-4
    assert re.match(r"FAIL  gated_delta: 2 of 2 cases \(perturbed; float32\) in \d+ s failed: "
                    r"perturbed B=1 T=1 H=1 K=6 V=5 float32: o; ", report.summary())


def test_dropped_gradient_fails_and_names_it(register):
    register("drops-dk", drops_dk)
    report = run_autotest(load("gated_delta"), backends=["drops-dk"], dims=SMALL, shapes=SHAPES[1:2],
                          progress=None)
    case, = report.cases
    assert failing(case) == ["dk"]
    dk = case.quantities[names(case).index("dk")]
    assert (dk.note, dk.rms_ratio) == ("no gradient", 1.0)


def test_a_missing_final_state_fails(register):
    register("no-final", lambda rule, call: (run_naive(rule.ir, call)[0], (None,)))
    report = run_autotest(load("gated_delta"), dims=SMALL, shapes=SHAPES[:1], progress=None)
    case, = report.cases
    # without the final state its upstream gradient is lost too: dk, dv and dbeta are off
    # (dq is not: o alone reaches it; nor dg: zero at T = 1 from a zero state)
    assert failing(case) == ["final S", "dk", "dv", "dbeta"]
    assert case.quantities[1].note == "not returned"


def test_a_backend_that_raises_is_a_failure_row(register):
    register("raises", raises)
    lines = []
    report = run_autotest(load("gated_delta"), backends=["naive", "raises"], dims=SMALL,
                          shapes=SHAPES[:1], progress=lines.append)
    ok, bad = report.cases
    assert ok.passed and not bad.passed
    assert bad.problems == ["RuntimeError: kernel exploded\nat line 3"] and bad.quantities == []
    assert re.fullmatch(r"\[2/2\] raises B=1 T=1 H=1 K=6 V=5 float32: FAIL \(RuntimeError: kernel exploded\) "
                        r"\d+\.\ds", lines[1])
    table = report.table().splitlines()
    assert table[2].split() == ["raises", "B=1", "T=1", "H=1", "K=6", "V=5", "float32", "-", "-", "-", "-",
                                "FAIL"]
    assert table[3:5] == ["    error: RuntimeError: kernel exploded", "           at line 3"]


def test_a_backend_that_modifies_its_inputs_fails(register):
    def in_place(rule, call):
        result = run_naive(rule.ir, call)
        with torch.no_grad():
            call.tensors["v"].data.mul_(2)  # behind autograd's back
        return result
    register("in-place", in_place)
    report = run_autotest(load("gated_delta"), backends=["in-place"], dims=SMALL, shapes=SHAPES[:1],
                          progress=None)
    assert report.cases[0].problems == ["modified its inputs in place: v"]
    assert not report.passed


# ---------------------------------------------------------------- the table


def _report():
    dims = {"K": 48, "V": 40}
    good = CaseResult("recurrent", Shape(1, 17, 1), dims, torch.float32, [
        Quantity("o", 1.5e-7, 2.0e-8, 1.4e-7, 1.07, 10.0),
        Quantity("dk", 3.0e-7, 5.0e-7, 1.0e-7, 3.0, 10.0)], seconds=0.5)
    bad = CaseResult("recurrent", Shape(1, 65, 2, cu_seqlens=(0, 1, 30, 65), initial_state=True), dims,
                     torch.float32, [Quantity("o", 2.0e-3, 1.0e-2, 1.5e-7, 13333.0, 10.0),
                                     Quantity("dq", 1.0, 0.25, 1.0e-7, 5.0e6, 10.0, "no gradient")])
    return AutotestReport("gated_delta", ["recurrent"], [torch.float32], [good, bad])


def test_table_one_line_per_case_details_for_failures():
    assert _report().table() == """\
backend    shape                                        dtype    worst  rms ratio  max abs    x ref  verdict
recurrent  B=1 T=17 H=1 K=48 V=40                       float32  dk       3.0e-07  5.0e-07     3.00  ok
recurrent  B=1 T=65 H=2 K=48 V=40 packed 1+29+35 +init  float32  dq       1.0e+00  2.5e-01  5.0e+06  FAIL
    quantity  rms ratio  max abs  naive ratio    x ref  verdict
    o           2.0e-03  1.0e-02      1.5e-07  1.3e+04  FAIL
    dq          1.0e+00  2.5e-01      1.0e-07  5.0e+06  FAIL  (no gradient)

rms ratio = rms(x - golden) / rms(golden); golden = the naive loop in float64 on the same inputs
x ref = rms(x - golden) / max(rms(naive loop in the same dtype - golden), floor * rms(golden)); passes up to the limit
float32: limit 10, floor 1e-06"""


def test_table_verbose_and_summaries():
    report = _report()
    verbose = report.table(verbose=True).splitlines()
    assert verbose[2:5] == ["    quantity  rms ratio  max abs  naive ratio  x ref  verdict",
                            "    o           1.5e-07  2.0e-08      1.4e-07   1.07  ok",
                            "    dk          3.0e-07  5.0e-07      1.0e-07   3.00  ok"]
    report.seconds = 12.3
    assert report.summary() == ("FAIL  gated_delta: 1 of 2 cases (recurrent; float32) in 12 s failed: recurrent "
                                "B=1 T=65 H=2 K=48 V=40 packed 1+29+35 +init float32: o, dq")
    report.cases.pop()
    assert report.passed
    assert report.summary() == ("PASS  gated_delta: 1 case (recurrent; float32) in 12 s; worst: dk at 3.00x ref "
                                "(recurrent B=1 T=17 H=1 K=48 V=40 float32)")


# ---------------------------------------------------------------- the command


def _command(argv):
    parser = argparse.ArgumentParser(prog="recdsl test")
    autotest.add_arguments(parser)
    return autotest.command(parser.parse_args(argv))


def test_command_passes_and_prints_progress_table_and_summary(monkeypatch, capsys, only_naive):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("TRITON_INTERPRET")  # restored (to absent) after the test
    code = _command([str(EXAMPLES / "gated_delta.rec"), "--backend", "naive", "--dims", "K=4,V=3",
                     "--quick", "--dtype", "float16"])
    out, err = capsys.readouterr()
    assert code == 0
    if not torch.cuda.is_available():
        assert os.environ["TRITON_INTERPRET"] == "1"
        assert err.splitlines()[0] == "no GPU: Triton backends run under TRITON_INTERPRET=1 (slow)"
    progress = [line for line in err.splitlines() if line.startswith("[")]
    assert len(progress) == 9 and progress[0].startswith("[1/9] naive B=1 T=1 H=1 K=4 V=3 float16: ok")
    lines = out.splitlines()
    assert lines[0].split() == ["backend", "shape", "dtype", "worst", "rms", "ratio", "max", "abs", "x",
                                "ref", "verdict"]
    assert len(lines) == 1 + 9 + 1 + 3 + 2
    assert re.match(r"PASS  gated_delta: 9 cases \(naive; float16\) in \d+ s; worst: ", lines[-1])


def test_command_fails_on_a_wrong_backend(register, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    register("perturbed", perturbed)
    code = _command([str(EXAMPLES / "gated_delta.rec"), "--dims", "K=4", "--dims", "V=3", "--quick",
                     "--dtype", "float16"])
    out, _ = capsys.readouterr()
    assert code == 1
    assert re.match(r"FAIL  gated_delta: 9 of 9 cases \(perturbed; float16\) in \d+ s failed: "
                    r"perturbed B=1 T=1 H=1 K=4 V=3 float16: o; ", out.splitlines()[-1])
    assert "    o " in out and "FAIL" in out


def test_command_options_are_checked():
    parser = argparse.ArgumentParser(prog="recdsl test")
    autotest.add_arguments(parser)
    assert parser.parse_args(["f.rec", "--dims", "K=4,V=3", "--const", "topk=4", "--const", "eps=0.5"]).const \
        == [{"topk": 4}, {"eps": 0.5}]
    with pytest.raises(SystemExit):
        parser.parse_args(["f.rec", "--dims", "K=0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["f.rec", "--dtype", "int8"])
