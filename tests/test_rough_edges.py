"""Rough edges a new user met ("From a rule to a model that trains", part 5): empty batches,
empty dims and meta tensors, rule.step's arguments, final states under autocast, and the
shipped example rules (recdsl.examples and bare names on the command line)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import recdsl
import recdsl.examples
from recdsl import InputError, RecdslError
from recdsl.cli import main

ROOT = Path(__file__).resolve().parent.parent
VECTOR = "rule g\ndims D\nstate h[D]\ninput z[D], x[D]\nh = z * h + x\noutput y = h\n"
H, K, V, D = 2, 4, 3, 5
NAMES = ["delta", "deltaproduct", "gated_delta", "gla", "kla", "linear_attention", "mamba2",
         "mlstm", "raven", "retention"]


@pytest.fixture(scope="module")
def gated_delta():
    return recdsl.examples.load("gated_delta")


@pytest.fixture(scope="module")
def vector():
    return recdsl.compile(VECTOR)


def gd_args(B, T, k=K, v=V, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    return dict(q=make(B, T, H, k), k=make(B, T, H, k), v=make(B, T, H, v),
                g=-torch.rand(B, T, H, generator=gen).to(device),
                beta=torch.rand(B, T, H, generator=gen).to(device))


def vec_args(B, T, d=D, device="cpu"):
    gen = torch.Generator().manual_seed(1)
    return dict(z=torch.rand(B, T, H, d, generator=gen).to(device),
                x=torch.randn(B, T, H, d, generator=gen).to(device))


CASES = [("gated_delta", b) for b in ("auto", "naive", "torch-chunk")] + \
        [("vector", b) for b in ("auto", "naive", "torch-scan")]


def rule_and_args(request, which):
    return (request.getfixturevalue(which), gd_args if which == "gated_delta" else vec_args,
            [V] if which == "gated_delta" else [D], [K, V] if which == "gated_delta" else [D])


# ---------------------------------------------------------------- 1. empty and meta inputs

@pytest.mark.parametrize("which,backend", CASES)
def test_empty_batch_returns_empty_outputs_and_zero_states(request, which, backend):
    rule, args, out_dims, state_dims = rule_and_args(request, which)
    o, final = rule(**args(0, 7), backend=backend, output_final_state=True)
    assert o.shape == (0, 7, H, *out_dims) and o.dtype == torch.float32
    assert final.shape == (0, H, *state_dims) and final.dtype == torch.float32


@pytest.mark.parametrize("which,backend", CASES)
def test_no_heads_returns_the_initial_state(request, which, backend):
    rule, args, out_dims, state_dims = rule_and_args(request, which)
    S0 = torch.randn(2, 0, *state_dims)
    o, final = rule(**{n: t[:, :, :0] for n, t in args(2, 7).items()}, initial_state=S0, backend=backend, output_final_state=True)
    assert o.shape == (2, 7, 0, *out_dims) and torch.equal(final, S0)


def test_empty_batch_backward_gives_zero_gradients(gated_delta):
    args = gd_args(0, 5)
    for t in args.values():
        t.requires_grad_(True)
    S0 = torch.zeros(0, H, K, V, requires_grad=True)
    o, final = gated_delta(**args, initial_state=S0, output_final_state=True)
    (o.sum() + final.sum()).backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in [*args.values(), S0])


@pytest.mark.parametrize("which,backend", CASES)
def test_empty_sequences_return_empty_outputs_and_the_initial_state(request, which, backend):
    rule, args, out_dims, state_dims = rule_and_args(request, which)
    S0 = torch.randn(2, H, *state_dims)
    o, final = rule(**args(2, 0), initial_state=S0, backend=backend, output_final_state=True)
    assert o.shape == (2, 0, H, *out_dims) and torch.equal(final, S0)


@pytest.mark.parametrize("backend", ["auto", "naive", "torch-chunk"])
@pytest.mark.parametrize("dim,source", [("K", "input 'q' of shape [2, 6, 2, 0]"),
                                        ("V", "input 'v' of shape [2, 6, 2, 0]")])
def test_a_dim_of_size_zero_names_the_dim_and_tensor(gated_delta, backend, dim, source):
    args = gd_args(2, 6, k=0 if dim == "K" else K, v=0 if dim == "V" else V)
    with pytest.raises(InputError) as err:
        gated_delta(**args, backend=backend)
    assert str(err.value) == (f"dim {dim} has size 0 (from {source}); every dim needs at least 1 "
                              f"entry: pass tensors whose {dim} axis is not empty")


@pytest.mark.parametrize("backend", ["auto", "naive", "torch-scan"])
def test_a_dim_of_size_zero_vector_state(vector, backend):
    with pytest.raises(InputError) as err:
        vector(**vec_args(2, 6, d=0), backend=backend)
    assert str(err.value) == ("dim D has size 0 (from input 'z' of shape [2, 6, 2, 0]); every dim "
                              "needs at least 1 entry: pass tensors whose D axis is not empty")


@pytest.mark.parametrize("which,backend", CASES)
def test_meta_tensors_are_an_input_error(request, which, backend):
    rule, args, _, _ = rule_and_args(request, which)
    first = "q" if which == "gated_delta" else "z"
    with pytest.raises(InputError) as err:
        rule(**args(2, 6, device="meta"), backend=backend)
    assert str(err.value) == (f"input '{first}' is a meta tensor; meta tensors (shapes without "
                              "data) are not supported: pass real tensors, on the CPU or a GPU")


# ---------------------------------------------------------------- 2. rule.step

def step_args(B=2):
    full = gd_args(B, 1)
    return {n: t[:, 0] for n, t in full.items()}


def test_step_accepts_initial_state_as_state(gated_delta):
    S0 = torch.randn(2, H, K, V)
    o1, s1 = gated_delta.step(**step_args(), state=S0)
    o2, s2 = gated_delta.step(**step_args(), initial_state=S0)
    assert torch.equal(o1, o2) and torch.equal(s1, s2) and o1.shape == (2, H, V)
    full, final = gated_delta(**gd_args(2, 1), initial_state=S0, output_final_state=True)
    assert torch.allclose(full[:, 0], o1) and torch.allclose(final, s1)


def test_step_with_state_and_initial_state(gated_delta):
    S0 = torch.zeros(2, H, K, V)
    with pytest.raises(InputError) as err:
        gated_delta.step(**step_args(), state=S0, initial_state=S0)
    assert str(err.value) == ("step got both state= and initial_state=; they are the same "
                              "argument: pass one of them")


def test_step_input_with_a_time_axis(gated_delta):
    args = step_args()
    q = args.pop("q")[:, None]
    with pytest.raises(InputError) as err:
        gated_delta.step(q, **args)
    assert str(err.value) == ("input 'q' of a step has shape [2, 1, 2, 4] but expected [B, H, K]: "
                              "a step's token inputs have no time axis; pass q[:, 0] for one token")
    args = step_args()
    args["g"] = args["g"][:, None]
    with pytest.raises(InputError) as err:
        gated_delta.step(**args)
    assert str(err.value) == ("input 'g' of a step has shape [2, 1, 2] but expected [B, H]: "
                              "a step's token inputs have no time axis; pass g[:, 0] for one token")


def test_step_input_of_another_rank(gated_delta):
    args = step_args()
    args["v"] = args["v"][..., None, None]
    with pytest.raises(InputError) as err:
        gated_delta.step(**args)
    assert str(err.value) == "input 'v' of a step has shape [2, 2, 3, 1, 1] but expected [B, H, V]"


# ---------------------------------------------------------------- 3. autocast

@pytest.mark.parametrize("backend", ["torch-chunk", "naive"])
def test_final_state_is_float32_under_autocast(gated_delta, backend):
    args = gd_args(2, 40)
    ref_o, ref_S = gated_delta(**args, backend=backend, output_final_state=True)
    with torch.autocast("cpu", torch.bfloat16):
        o, S = gated_delta(**args, backend=backend, output_final_state=True)
        o64, S64 = gated_delta(**{n: t.double() for n, t in args.items()}, backend=backend,
                               output_final_state=True)
        _, S16 = gated_delta(**{n: t.bfloat16() for n, t in args.items()}, backend=backend,
                             output_final_state=True)
    assert S.dtype == torch.float32 and o.dtype == torch.float32
    assert S64.dtype == torch.float64 and o64.dtype == torch.float64
    assert S16.dtype == torch.float32
    torch.testing.assert_close(S, ref_S)
    torch.testing.assert_close(o, ref_o)


# ---------------------------------------------------------------- 4. shipped examples

def test_examples_names_and_load():
    assert recdsl.examples.names() == NAMES
    rule = recdsl.examples.load("gated_delta")
    assert rule.name == "gated_delta"
    assert Path(rule.ir.filename) == Path(recdsl.examples.__file__).parent / "gated_delta.rec"
    assert recdsl.examples.load("raven", topk=2).consts["topk"] == 2


def test_examples_unknown_name():
    with pytest.raises(RecdslError) as err:
        recdsl.examples.load("gated_deltaa")
    assert str(err.value) == ("no shipped example rule named 'gated_deltaa'; the shipped examples "
                              "are: " + ", ".join(NAMES))


def test_top_level_examples_path_is_the_package_directory():
    assert (ROOT / "examples").resolve() == (ROOT / "recdsl" / "examples").resolve()
    tracked = subprocess.run(["git", "ls-files", "recdsl/examples"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    if tracked:  # a git checkout: the .rec files are tracked once, in the package
        assert sorted(Path(p).stem for p in tracked if p.endswith(".rec")) == NAMES


def test_cli_finds_a_shipped_example_from_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["check", "gated_delta"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"rule gated_delta ({recdsl.examples.DIRECTORY / 'gated_delta.rec'})\n")
    assert main(["show", "mlstm"]) == 0
    assert capsys.readouterr().out.startswith("rule mlstm (")
    assert main(["run", "gla", "--time", "3", "--dims", "K=2,V=2"]) == 0
    capsys.readouterr()


def test_cli_unknown_name_lists_the_shipped_examples(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["test", "gated_deltaa"]) == 1
    assert capsys.readouterr().err == ("error: no shipped example rule named 'gated_deltaa'; the "
                                       "shipped examples are: " + ", ".join(NAMES) + "\n")
    # a missing path stays a missing file
    assert main(["check", "missing.rec", "delta"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: cannot read rule file missing.rec")
    assert captured.out.startswith("rule delta (")


def test_cli_test_runs_a_shipped_example(tmp_path):
    done = subprocess.run([sys.executable, "-m", "recdsl.cli", "test", "linear_attention", "--quick",
                           "--backend", "torch-chunk", "--dims", "K=4,V=3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
