"""The command line: recdsl check / run, through main() and once as a real process."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl.cli import main
from recdsl.runtime.sample import sample_inputs

ROOT = Path(__file__).resolve().parents[1]

GATED_DELTA_SUMMARY = """\
rule gated_delta (examples/gated_delta.rec)
  dims     K, V
  states   S[K, V]
  inputs   q[K], k[K], v[V], g, beta
  params   none
  consts   none
  outputs  o[V]
  per token:
     9  let kn = l2norm(k)                      [K]
    10  S = exp(g) * S                          [K, V]
    11  S = S - beta * outer(kn, kn @ S)        [K, V]
    12  S = S + beta * outer(kn, v)             [K, V]
    14  output o = K ** -0.5 * (l2norm(q) @ S)  [V]
"""

BAD_RULE = "rule bad\ndims K\nstate S[K]\ninput k[K]\nS = S + outer(k, k)\noutput o = S\n"
BAD_RULE_ERROR = """\
{path}:5:5: error: cannot add [K] and [K, K]
    S = S + outer(k, k)
        ^^^^^^^^^^^^^^^
hint: elementwise operations need equal shapes, or a scalar on one side
"""


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# ---------------------------------------------------------------- check


def test_check_prints_a_summary(capsys):
    assert run_main(capsys, "check", "examples/gated_delta.rec") == (0, GATED_DELTA_SUMMARY, "")


def test_check_summary_of_a_loop_params_and_consts(capsys):
    code, out, err = run_main(capsys, "check", "examples/deltaproduct.rec")
    assert (code, err) == (0, "")
    assert out.splitlines()[-4:] == [
        "    10  for j in NH:",
        "    11      let kj = l2norm(k[j])                                            [K]",
        "    12      S = S - beta[j] * outer(kj, kj @ S) + beta[j] * outer(kj, v[j])  [K, V]",
        "    14  output o = K ** -0.5 * (l2norm(q) @ S)                               [V]",
    ]
    code, out, err = run_main(capsys, "check", "examples/raven.rec", "--const", "topk=4")
    assert (code, err) == (0, "")
    assert "  params   A_log, dt_bias\n  consts   topk = 4\n" in out
    assert "    13  let r = m / (sum(m) + 1e-9)                             [M]\n" in out


def test_check_reports_every_bad_file_and_fails(capsys, tmp_path):
    bad = tmp_path / "bad.rec"
    bad.write_text(BAD_RULE)
    code, out, err = run_main(capsys, "check", str(bad), "examples/gated_delta.rec", "missing.rec")
    assert code == 1
    assert out == GATED_DELTA_SUMMARY  # the good file is still checked and shown
    assert err == (BAD_RULE_ERROR.format(path=bad)
                   + "error: cannot read rule file missing.rec: No such file or directory\n")


def test_check_unknown_const(capsys):
    code, out, err = run_main(capsys, "check", "examples/gla.rec", "--const", "topk=4")
    assert (code, out) == (1, "")
    assert err == "error: examples/gla.rec: rule 'gla' has no const 'topk'; its consts are: none\n"


def test_check_as_a_process():
    done = subprocess.run([sys.executable, "-m", "recdsl.cli", "check", "examples/gated_delta.rec"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, GATED_DELTA_SUMMARY, "")


# ---------------------------------------------------------------- run


def table(out):
    """The rows of run's table by (name, what): [shape, mean, std, min, max, finite]."""
    lines = out.split("\n\n")[1].splitlines()
    assert lines[0].split() == ["name", "what", "shape", "mean", "std", "min", "max", "finite"]
    rows = {}
    for line in lines[1:]:
        name, rest = line.split(None, 1)
        what = "final state" if rest.startswith("final state") else rest.split()[0]
        shape, numbers = rest[len(what):].strip().split("]")
        rows[(name, what)] = [shape + "]"] + numbers.split()
    return rows


def test_run_prints_statistics_of_the_naive_loop(capsys):
    code, out, err = run_main(capsys, "run", "examples/gated_delta.rec", "--dims", "K=8,V=4",
                              "--batch", "1", "--time", "8", "--heads", "3", "--seed", "5")
    assert (code, err) == (0, "")
    assert out.startswith(
        "rule gated_delta (examples/gated_delta.rec): naive loop, float32, seed 5\n"
        "  B=1 T=8 H=3  K=8 V=4\n"
        "  inputs: randn: q, k, v; logsigmoid(randn): g; uniform(0.05, 0.95): beta\n\n")
    rows = table(out)
    assert {key: row[0] for key, row in rows.items()} == {
        ("o", "output"): "[1, 8, 3, 4]", ("S", "final state"): "[1, 3, 8, 4]",
        ("q", "gradient"): "[1, 8, 3, 8]", ("k", "gradient"): "[1, 8, 3, 8]",
        ("v", "gradient"): "[1, 8, 3, 4]", ("g", "gradient"): "[1, 8, 3]",
        ("beta", "gradient"): "[1, 8, 3]"}
    assert all(row[-1] == "yes" for row in rows.values())
    # the numbers are those of the same call made by hand
    rule = recdsl.load(ROOT / "examples/gated_delta.rec")
    inputs = sample_inputs(rule, batch=1, time=8, heads=3, dims={"K": 8, "V": 4}, seed=5)
    inputs["v"].requires_grad_(True)
    o, s = rule(**inputs, output_final_state=True, backend="naive")
    o.sum().backward()
    for key, t in [(("o", "output"), o), (("S", "final state"), s), (("v", "gradient"), inputs["v"].grad)]:
        t = t.detach().double()
        expected = [t.mean(), t.std(correction=0), t.min(), t.max()]
        assert [float(x) for x in rows[key][1:5]] == pytest.approx([x.item() for x in expected], rel=1e-3, abs=1e-6)
    assert out.rstrip().splitlines()[-1].startswith("elapsed: forward ")


def test_run_float64_and_consts(capsys):
    code, out, err = run_main(capsys, "run", "examples/raven.rec", "--const", "topk=2", "--dims", "M=4",
                              "--dims", "K=3,V=2", "--time", "5", "--dtype", "float64")
    assert (code, err) == (0, "")
    assert "naive loop, float64" in out and "  B=2 T=5 H=2  M=4 K=3 V=2\n" in out
    rows = table(out)
    assert rows[("Sk", "final state")][0] == "[2, 2, 4, 3]"
    assert rows[("A_log", "gradient")][0] == "[2]"


def test_run_fails_on_values_that_are_not_finite(capsys, tmp_path):
    rule = tmp_path / "boom.rec"
    rule.write_text("rule boom\ndims K\nstate S[K]\ninput k[K]\nS = S + exp(1000 * k)\noutput o = S\n")
    code, out, err = run_main(capsys, "run", str(rule), "--time", "3")
    assert code == 1
    assert table(out)[("o", "output")][-1] == "NO"
    assert err == "error: not finite: o (output), S (final state), k (gradient)\n"


@pytest.mark.parametrize("argv, message", [
    (["--dims", "K=abc"], "argument --dims: expected NAME=SIZE[,NAME=SIZE...], got 'K=abc'"),
    (["--dims", "K=0"], "argument --dims: expected NAME=SIZE[,NAME=SIZE...], got 'K=0'"),
    (["--dims", "K"], "argument --dims: expected NAME=SIZE[,NAME=SIZE...], got 'K'"),
    (["--const", "topk"], "argument --const: expected NAME=NUMBER[,NAME=NUMBER...], got 'topk'"),
    (["--time", "0"], "argument --time: expected a positive whole number, got '0'"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8' (choose from"),
])
def test_run_usage_errors(capsys, argv, message):
    code, out, err = run_main(capsys, "run", "examples/gla.rec", *argv)
    assert (code, out) == (2, "")
    assert err.startswith("usage: recdsl run ")
    assert f"recdsl run: error: {message}" in err


def test_run_rule_errors_are_clean(capsys, tmp_path):
    code, out, err = run_main(capsys, "run", "examples/gla.rec", "--dims", "Q=3")
    assert (code, out, err) == (1, "", "error: rule 'gla' has no dim 'Q'; its dims are: K, V\n")
    bad = tmp_path / "bad.rec"
    bad.write_text(BAD_RULE)
    assert run_main(capsys, "run", str(bad)) == (1, "", BAD_RULE_ERROR.format(path=bad))


def test_top_level(capsys):
    code, out, err = run_main(capsys)
    assert (code, out) == (2, "")
    assert err.endswith("recdsl: error: the following arguments are required: COMMAND\n")
    assert run_main(capsys, "--version") == (0, f"recdsl {recdsl.__version__}\n", "")
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    assert re.findall(r"^    (\w+) +\S", out, re.M) == ["check", "show", "run", "test", "compile",
                                                            "bench"]


# ---------------------------------------------------------------- test (the autotester's own tests cover it)


def test_test_subcommand_is_wired(capsys):
    code, out, err = run_main(capsys, "test", "examples/linear_attention.rec", "--quick",
                              "--dims", "K=4,V=4", "--backend", "naive")
    assert code == 0
    assert "\nPASS  linear_attention: 9 cases (naive; float32) in " in out
    assert run_main(capsys, "test", "missing.rec")[:2] == (1, "")


# ---------------------------------------------------------------- show


def test_show_prints_the_recurrence_of_gated_delta(capsys):
    assert main(["show", str(ROOT / "examples" / "gated_delta.rec")]) == 0
    out = capsys.readouterr().out
    assert "family: delta" in out
    assert "S_t = exp(g_t) (I - beta_t kn_t kn_tᵀ) S_{t-1} + beta_t kn_t v_tᵀ" in out


def test_show_gives_mlstm_reason_with_position(capsys):
    assert main(["show", str(ROOT / "examples" / "mlstm.rec")]) == 0
    out = capsys.readouterr().out
    assert "family: staged" in out
    assert "mlstm.rec:12:10: the update of m is not affine in the states: state m inside max()" in out


PER_CHANNEL_DECAY_DELTA = """rule gk_delta
dims K, V
state S[K, V]
input q[K], k[K], v[V], gk[K], beta
S = diag(exp(gk)) @ S
S = S - beta * outer(k, k @ S) + beta * outer(k, v)
output o = q @ S
"""


def test_show_lists_the_backends_and_why_the_chunk_paths_refuse_a_rule(tmp_path, capsys):
    """A per-channel decay before the erase: the delta family's chunk paths refuse it, the
    DPLR family's run it (chunk and torch-chunk), and `recdsl show` says so."""
    path = tmp_path / "gk_delta.rec"
    path.write_text(PER_CHANNEL_DECAY_DELTA)
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.split("backends:\n", 1)[1].rstrip("\n").splitlines()
    scan_no = (f"no: rule 'gk_delta' has no elementwise scan form: beta * outer(k, k @ S) is a "
               f"rank-one factor of S: its transition is not elementwise, so no elementwise scan "
               f"({path}:6:9)")
    # chunk and torch-chunk run it through the DPLR family's modules (the delta ones refuse it)
    assert lines == [
        "  chunk        yes",
        f"  scan         {scan_no}",
        "  torch-chunk  yes",
        f"  torch-scan   {scan_no}",
        "  newton       no: rule 'gk_delta' has a parallel form (the delta family): newton is for "
        "rules without one",
        "  recurrent    yes",
        "  naive        yes",
        "  on the CPU, best first: torch-chunk, chunk, recurrent, naive",  # interpreted (conftest)
        "  on a GPU, best first: chunk, recurrent, torch-chunk, naive",
    ]
    assert main(["show", str(ROOT / "examples" / "gla.rec")]) == 0
    assert capsys.readouterr().out.split("backends:\n", 1)[1].split()[:10] == [
        "chunk", "yes", "scan", "yes", "torch-chunk", "yes", "torch-scan", "yes", "newton", "no:"]


def test_show_grad_prints_runnable_derivative_code(capsys):
    assert main(["show", str(ROOT / "examples" / "kla.rec"), "--grad", "--dims", "K=4,V=3"]) == 0
    out = capsys.readouterr().out
    code = out[out.index("# rule kla"):]
    assert "def rule_kla_step_backward(" in code
    from recdsl.codegen.loader import load_function
    fn = load_function(code, "rule_kla_step_backward")  # the printed text is the real code
    args = [torch.randn(1, 1, *shape) for shape in ([4], [4], [3], [], [], [4, 3], [3], [4, 3])]
    grads = fn(*args)
    assert len(grads) == 5 + 1 + 2 and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- test, as the README runs it


def test_building_the_parser_does_not_import_triton():
    """Triton's interpreter setting is fixed when triton is first imported; `recdsl test`
    switches it on for CPU runs, so nothing before the command may import triton."""
    code = "import sys, recdsl.cli as c; c.build_parser(); print('triton' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_recdsl_test_in_a_fresh_process_without_interpreter_setting(tmp_path):
    """The README's main job, in a process where TRITON_INTERPRET is unset (the suite sets it)."""
    import os
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["RECDSL_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-m", "recdsl.cli", "test", "examples/linear_attention.rec",
                           "--quick", "--dims", "K=4,V=3", "--backend", "recurrent"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no GPU: Triton backends run under TRITON_INTERPRET=1" in done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("PASS  linear_attention: 9 cases (recurrent; float32)")
