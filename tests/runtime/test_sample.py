"""runtime.sample: random inputs that keep every canonical rule stable over long sequences."""
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl.errors import RecdslError
from recdsl.runtime.sample import (LOG_GATE, NORMAL, UNIT, dim_sizes, sample_initial_state,
                                   sample_inputs, value_kinds)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.rec"))


def load(name, **consts):
    return recdsl.load(EXAMPLES / f"{name}.rec", **consts)


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def rms(t):
    return t.double().pow(2).mean().sqrt().item()


def test_ten_examples():
    assert len(NAMES) == 10


@pytest.mark.parametrize("name, expected", [
    ("gated_delta", {"q": NORMAL, "k": NORMAL, "v": NORMAL, "g": LOG_GATE, "beta": UNIT}),
    ("gla", {"q": NORMAL, "k": NORMAL, "v": NORMAL, "gk": LOG_GATE}),
    ("mamba2", {"x": NORMAL, "B": NORMAL, "C": NORMAL, "dt": UNIT, "A_log": LOG_GATE, "D": UNIT}),
    ("raven", {"q": NORMAL, "k": NORMAL, "v": NORMAL, "route": NORMAL, "a": UNIT,
               "A_log": LOG_GATE, "dt_bias": UNIT}),
    # beta[NH] is read as beta[j], a scalar per step; k[NH, K] as a vector
    ("deltaproduct", {"q": NORMAL, "k": NORMAL, "v": NORMAL, "beta": UNIT, "g": LOG_GATE}),
    # i and f reach exp only through lets: not gates of their own
    ("mlstm", {"q": NORMAL, "k": NORMAL, "v": NORMAL, "i": UNIT, "f": UNIT}),
    ("retention", {"q": NORMAL, "k": NORMAL, "v": NORMAL, "gamma": UNIT}),
    ("kla", {"q": NORMAL, "k": NORMAL, "v": NORMAL, "g": LOG_GATE, "eta": UNIT}),
])
def test_value_kinds(name, expected):
    assert value_kinds(load(name)) == expected


def test_only_a_direct_exp_argument_is_a_gate():
    rule = recdsl.compile("rule r\ndims K, N\nstate S[K]\ninput k[K], g, h, w[N]\n"
                          "S = exp(-g) * S + exp(h + 1) * k\n"
                          "for j in N:\n    S = exp(w[j]) * S\noutput o = S\n")
    assert value_kinds(rule) == {"k": NORMAL, "g": UNIT, "h": UNIT, "w": LOG_GATE}
    assert dim_sizes(rule) == {"K": 32, "N": 2}


@pytest.mark.parametrize("name", NAMES)
def test_examples_stay_stable_over_256_tokens(name):
    rule = load(name)
    inputs = sample_inputs(rule, time=256)
    for t in inputs.values():
        t.requires_grad_(True)
    outputs, final = rule(**inputs, output_final_state=True, backend="naive")
    for o in as_tuple(outputs):
        assert o.dtype == torch.float32 and o.shape[:3] == (2, 256, 2)
        assert torch.isfinite(o).all()
        assert o.abs().max() < 1e3
        # bounded: the last quarter is not much larger than the first (linear attention, with
        # no decay at all, grows like sqrt(t): about 2.6x here)
        assert rms(o[:, -64:]) < 4 * rms(o[:, :64])
    for s in as_tuple(final):
        assert torch.isfinite(s).all() and s.abs().max() < 1e3
    sum(o.sum() for o in as_tuple(outputs)).backward()
    for n, t in inputs.items():
        assert t.grad is not None and torch.isfinite(t.grad).all(), n


def test_values_follow_the_heuristic():
    x = sample_inputs(load("mamba2"), batch=3, time=50, heads=4)
    assert {n: list(t.shape) for n, t in x.items()} == {
        "x": [3, 50, 4, 32], "B": [3, 50, 4, 32], "C": [3, 50, 4, 32], "dt": [3, 50, 4],
        "A_log": [4], "D": [4]}
    assert x["A_log"].max() < 0
    for n in ("dt", "D"):
        assert x[n].min() >= 0.05 and x[n].max() <= 0.95
    assert x["dt"].max() - x["dt"].min() > 0.8  # spread over the range, not a constant
    for n in ("x", "B", "C"):
        assert x[n].min() < -2 and x[n].max() > 2 and abs(x[n].mean()) < 0.05
    g = sample_inputs(load("gla"), time=100)["gk"]
    assert g.max() < 0 and g.min() < -2
    # logsigmoid(randn) has mean about -0.81
    assert -0.9 < g.mean() < -0.7


def test_sizes_and_overrides():
    x = sample_inputs(load("deltaproduct"), dims={"K": 48, "V": 40})
    assert list(x["k"].shape) == [2, 64, 2, 2, 48]
    assert list(x["v"].shape) == [2, 64, 2, 2, 40]
    assert list(x["beta"].shape) == [2, 64, 2, 2]
    assert x["beta"].min() >= 0.05 and x["beta"].max() <= 0.95
    assert dim_sizes(load("deltaproduct"), {"NH": 3}) == {"K": 32, "V": 32, "NH": 3}
    assert dim_sizes(load("raven")) == {"M": 32, "K": 32, "V": 32}


def test_seeds_and_dtypes():
    rule = load("gated_delta")
    a, b = sample_inputs(rule, seed=3), sample_inputs(rule, seed=3)
    c = sample_inputs(rule, seed=4)
    d = sample_inputs(rule, seed=3, dtype=torch.float64)
    for n in a:
        assert torch.equal(a[n], b[n])
        assert not torch.equal(a[n], c[n])
        assert d[n].dtype == torch.float64
        assert torch.equal(d[n].float(), a[n])  # the same draws, cast


def test_accepts_a_checked_rule():
    rule = load("kla")
    a, b = sample_inputs(rule), sample_inputs(rule.ir)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_initial_state():
    s = sample_initial_state(load("gated_delta"), batch=3, heads=4, dims={"V": 8})
    assert isinstance(s, torch.Tensor) and list(s.shape) == [3, 4, 32, 8]
    rule = load("mlstm")
    states = sample_initial_state(rule, dtype=torch.float64)
    assert [list(t.shape) for t in states] == [[2, 2, 32, 32], [2, 2, 32], [2, 2]]
    assert all(t.dtype == torch.float64 for t in states)
    # drawn from its own generator, seeded with seed + 1
    expected = torch.randn([2, 2, 32, 32], generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert torch.equal(sample_initial_state(rule, seed=7, dtype=torch.float64)[0], expected)
    inputs = sample_inputs(rule, time=8, dtype=torch.float64)
    with_state, _ = rule(**inputs, initial_state=states, backend="naive")
    without, _ = rule(**inputs, backend="naive")
    assert torch.isfinite(with_state).all() and not torch.allclose(with_state, without)


def test_errors():
    rule = load("gla")
    with pytest.raises(RecdslError) as err:
        sample_inputs(rule, dims={"Q": 4})
    assert str(err.value) == "rule 'gla' has no dim 'Q'; its dims are: K, V"
    with pytest.raises(RecdslError) as err:
        sample_inputs(rule, dims={"K": 0})
    assert str(err.value) == "dim K must be a positive whole number, not 0"
    with pytest.raises(RecdslError) as err:
        sample_inputs(rule, time=0)
    assert str(err.value) == "time must be a positive whole number, not 0"
    with pytest.raises(RecdslError) as err:
        sample_initial_state(rule, heads=1.5)
    assert str(err.value) == "heads must be a positive whole number, not 1.5"
