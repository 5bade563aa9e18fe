"""The training tasks (recdsl.tasks) and the train example (examples/train.py)."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recdsl import tasks
from recdsl.examples import train

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- MQAR

@pytest.mark.parametrize("noise", [True, False])
def test_mqar_every_query_answers_with_the_value_paired_with_its_key(noise):
    vocab, length, pairs = 64, 64, 8
    x, y = tasks.mqar(200, vocab, length, pairs, noise=noise,
                      generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (200, length) and x.dtype == y.dtype == torch.long
    assert ((x >= 0) & (x < vocab)).all()
    for seq, target in zip(x.tolist(), y.tolist()):
        keys, values = seq[0:2 * pairs:2], seq[1:2 * pairs:2]
        assert len(set(keys)) == pairs and all(1 <= k < vocab // 2 for k in keys)
        assert len(set(values)) == pairs and all(vocab // 2 <= v < vocab for v in values)
        scored = [t for t in range(length) if target[t] != -100]
        assert len(scored) == pairs
        for t in scored:
            assert t >= 2 * pairs and (t - 2 * pairs) % 2 == 0
            first = seq.index(seq[t])  # the key's first appearance is in its pair
            assert first < 2 * pairs and first % 2 == 0
            assert target[t] == seq[first + 1]
        # a key appears in its pair and its query only
        for k in keys:
            assert seq.count(k) == 2
        assert sorted(seq[t] for t in scored) == sorted(keys)
        filler = [seq[t] for t in range(2 * pairs, length) if t not in scored]
        if noise:  # random tokens: values and other keys among them
            assert len(set(filler)) > 10 and max(filler) >= vocab // 2
        else:
            assert set(filler) == {0}


def test_mqar_gaps_follow_the_power_law():
    length, pairs, a = 64, 8, 0.01
    slots = (length - 2 * pairs) // 2
    p = tasks.mqar_gap_probabilities(slots, a)
    expected = torch.tensor([(g + 1) ** (a - 1) for g in range(slots)], dtype=torch.float64)
    torch.testing.assert_close(p, expected / expected.sum())
    _, y = tasks.mqar(4000, 64, length, pairs, power_a=a, generator=torch.Generator().manual_seed(1))
    gaps = ((y != -100).nonzero()[:, 1] - 2 * pairs) // 2
    counts = torch.bincount(gaps, minlength=slots)
    assert len(counts) == slots  # never beyond the last slot
    assert (counts > 0).all()    # the whole support is reached
    # drawn without replacement, 8 of 24: early gaps clearly more frequent than late ones
    assert counts[:4].sum() > 1.5 * counts[-4:].sum()
    # a steeper law (smaller a... larger exponent) concentrates further
    _, y2 = tasks.mqar(4000, 64, length, pairs, power_a=1.0, generator=torch.Generator().manual_seed(1))
    uniform = ((y2 != -100).nonzero()[:, 1] - 2 * pairs) // 2
    assert gaps.float().mean() < uniform.float().mean() - 1


def test_mqar_rejects_impossible_sizes():
    with pytest.raises(tasks.RecdslError, match="distinct keys"):
        tasks.mqar(1, vocab=16, length=64, pairs=8)
    with pytest.raises(tasks.RecdslError, match="length must be at least 32"):
        tasks.mqar(1, vocab=64, length=30, pairs=8)
    with pytest.raises(tasks.RecdslError, match="n must be a positive"):
        tasks.mqar(0)


# ----------------------------------------------------------------------------- S3

def compose(a, b):
    """b first, then a: i -> a[b[i]]."""
    return tuple(a[b[i]] for i in range(3))


def test_s3_targets_are_running_products():
    elements = sorted({(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)})
    assert list(tasks.S3_ELEMENTS) == elements
    x, y = tasks.s3(50, 20, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (50, 20)
    for seq, target in zip(x.tolist(), y.tolist()):
        product = (0, 1, 2)
        for token, want in zip(seq, target):
            product = compose(elements[token], product)
            assert elements[want] == product
    # non-commutative: order matters, so the table is not symmetric
    assert not torch.equal(tasks.S3_TABLE, tasks.S3_TABLE.T)
    assert (x == torch.arange(6)[:, None, None]).any(-1).any(-1).all()  # every element occurs


# ----------------------------------------------------------------------------- the CLI

def test_train_runs_a_few_steps_and_writes_its_log(tmp_path, capsys):
    results = train.main(["--task", "mqar", "--rules", "gated_delta,gla", "--steps", "4",
                          "--eval-every", "2", "--eval-size", "16", "--batch", "4",
                          "--hidden", "16", "--length", "32", "--pairs", "4", "--vocab", "32",
                          "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "| gated_delta | defaults |" in out and "| gla | defaults |" in out
    rows = list(csv.DictReader(open(tmp_path / "mqar.csv")))
    assert [(r["rule"], int(r["step"])) for r in rows] == [
        ("gated_delta", 0), ("gated_delta", 2), ("gated_delta", 4), ("gla", 0), ("gla", 2), ("gla", 4)]
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    assert [r["steps"] for r in results] == [4, 4]
    assert (tmp_path / "mqar.md").read_text().startswith("mqar: vocab 32, T 32, 4 pairs")
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "mqar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert "matplotlib is not installed" in out and not (tmp_path / "mqar.png").exists()


def test_train_runs_as_a_script_with_rule_options(tmp_path):
    done = subprocess.run(
        [sys.executable, "examples/train.py", "--task", "s3", "--rules", "deltaproduct",
         "--option", "deltaproduct:allow_neg_eigval=true,dims.NH=3,conv=false", "--steps", "2",
         "--eval-every", "1", "--eval-size", "8", "--batch", "2", "--length", "8", "--hidden", "8",
         "--out", str(tmp_path), "--no-progress", "--target", "1.0"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "allow_neg_eigval=True, dims.NH=3, conv=False" in done.stdout
    assert len(list(csv.DictReader(open(tmp_path / "s3.csv")))) == 3


def test_jobs_give_the_same_results_as_one_at_a_time(tmp_path):
    common = ["--task", "s3", "--rules", "gla,gated_delta", "--steps", "3", "--eval-every", "1",
              "--eval-size", "8", "--batch", "2", "--length", "8", "--hidden", "8", "--no-progress"]
    one = train.main(common + ["--out", str(tmp_path / "one")])
    two = train.main(common + ["--out", str(tmp_path / "two"), "--jobs", "2"])

    def curve(results):
        return [(r["rule"], [(h["step"], h["loss"], h["accuracy"]) for h in r["history"]])
                for r in results]

    assert curve(one) == curve(two)
    rows = list(csv.DictReader(open(tmp_path / "two" / "s3.csv")))
    assert [r["rule"] for r in rows] == ["gla"] * 4 + ["gated_delta"] * 4


def test_parse_options():
    opts = train.parse_options(["a:allow_neg_eigval=true,dims.NH=2,gates.beta=sigmoid",
                                "b:backend=torch-chunk"], ["a", "b"])
    assert opts == {"a": {"allow_neg_eigval": True, "dims": {"NH": 2}, "gates": {"beta": "sigmoid"}},
                    "b": {"backend": "torch-chunk"}}


@pytest.mark.parametrize("argv, message", [
    (["--task", "mqar", "--rules", "nope"], "no shipped example rule named 'nope'"),
    (["--task", "mqar", "--rules", "gla", "--option", "kla:conv=false"], "'kla' is not in --rules"),
    (["--task", "mqar", "--rules", "gla", "--option", "gla:colour=red"], "unknown key 'colour'"),
    (["--task", "mqar", "--rules", "gla", "--option", "gla"], "expected RULE:KEY=VALUE"),
    (["--task", "mqar", "--rules", "gla", "--pairs", "40"], "distinct keys"),
    (["--task", "mqar", "--rules", "gla", "--steps", "0"], "--steps must be at least 1"),
    (["--task", "mqar", "--rules", "gla,gla"], "distinct rules"),
    (["--task", "s3", "--rules", "gla", "--target", "2"], "--target is an accuracy"),
    (["--task", "s3", "--rules", "gla,kla", "--option", "kla:dims.Q=4"], "no dim 'Q'"),
    (["--task", "copy", "--rules", "gla"], "invalid choice: 'copy'"),
])
def test_argument_errors_are_clear(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- acceptance

@pytest.mark.slow
def test_gated_delta_reaches_the_mqar_acceptance(tmp_path):
    """Issue 14's acceptance: a gated_delta CausalLM with default options reaches 0.9 MQAR
    accuracy (vocab 64, T 64, 8 pairs, hidden 64, 2 layers, 2 heads, AdamW 3e-3, batch 32)
    within 1500 steps. Measured: 0.95 at step 300, where it stops (38 s on the shared 2-core
    machine at load 4, 8 minutes at load 14)."""
    [result] = train.main(["--task", "mqar", "--rules", "gated_delta", "--target", "0.9",
                           "--out", str(tmp_path), "--no-progress"])
    assert result["history"][0]["accuracy"] < 0.05  # nothing known before training
    assert result["reached"] is not None and result["reached"] <= 1500, result["history"][-1]
    assert result["final"] >= 0.9
