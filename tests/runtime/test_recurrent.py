"""backend="recurrent" (generated Triton, run by the interpreter) against the naive loop in
float64: outputs, final states and the gradients of every input, param and initial state.

Pass rule (TESTING.md): the backend's error against the float64 result is at most 10x the
naive loop's own float32 error, with a floor for values near zero."""
import pytest
import torch

import recdsl
from recdsl.codegen import tiling
from recdsl.runtime.recurrent import kernels
from recdsl.runtime.sample import sample_inputs
from tests.helpers import EXAMPLES, as_list, assert_matches_naive

RULES = ["delta", "gated_delta", "kla", "deltaproduct", "linear_attention", "retention", "mamba2",
         "gla", "raven", "mlstm"]
SIZES = {"K": 6, "V": 5, "N": 6, "P": 5, "M": 7, "NH": 3}
FLOOR = 3e-6


def _compare(rule, tensors, initial=None, cu_seqlens=None, grads=True, dtype=torch.float32):
    assert_matches_naive(rule, tensors, initial, backend="recurrent", cu_seqlens=cu_seqlens,
                         grads=grads, dtype=dtype, floor=FLOOR)


def _inputs(rule, T, B=2, H=2, seed=0, initial=False, sequences=None):
    sizes = {d: SIZES[d] for d in rule.dims}
    tensors = sample_inputs(rule, batch=B, time=T, heads=H, dims=sizes, dtype=torch.float64, seed=seed)
    states = None
    if initial:
        g = torch.Generator().manual_seed(seed + 100)
        states = [0.5 * torch.randn([sequences or B, H] + [sizes[d] for d in s.dims], generator=g,
                                    dtype=torch.float64) for s in rule.states]
    return tensors, states


def _load(name):
    return recdsl.load(EXAMPLES / f"{name}.rec", **({"topk": 3} if name == "raven" else {}))


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("T", [1, 17])
def test_matches_naive_with_initial_state(name, T):
    rule = _load(name)
    tensors, states = _inputs(rule, T, initial=True)
    _compare(rule, tensors, states)


@pytest.mark.slow
@pytest.mark.parametrize("name", RULES)
def test_matches_naive_at_65_tokens(name):
    rule = _load(name)
    tensors, states = _inputs(rule, 65, B=1, H=2, initial=True)
    _compare(rule, tensors, states)


@pytest.mark.parametrize("name", ["gated_delta", "deltaproduct", "raven", "mlstm"])
def test_packed_sequences(name):
    rule = _load(name)
    cu = torch.tensor([0, 5, 6, 19])
    tensors, states = _inputs(rule, 19, B=1, initial=True, sequences=3)
    _compare(rule, tensors, states, cu_seqlens=cu)


@pytest.mark.parametrize("name", RULES)
def test_half_precision_forward(name):
    rule = _load(name)
    tensors, _ = _inputs(rule, 17)
    _compare(rule, tensors, grads=False, dtype=torch.float16)


@pytest.mark.parametrize("name", ["gated_delta", "raven", "mlstm"])
def test_step_repeated_equals_full_call(name):
    rule = _load(name)
    T = 6
    tensors, states = _inputs(rule, T, initial=True)
    tensors = {k: v.float() for k, v in tensors.items()}
    state = tuple(s.float() for s in states)
    full, final = rule(**tensors, initial_state=state, output_final_state=True, backend="recurrent")
    token_names = {v.name for v in rule.inputs}
    outs = []
    for t in range(T):
        step_in = {k: (v[:, t] if k in token_names else v) for k, v in tensors.items()}
        o, state = rule.step(**step_in, state=state, backend="recurrent")
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, dim=1), full, rtol=0, atol=1e-6)
    for a, b in zip(as_list(state), as_list(final)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.fixture
def small_tiles(monkeypatch):
    """Split even the tests' small states across programs (tiles of 2 to 4 lanes), as large
    states are on a GPU (tiling.py: residuals, partial sums, shares of replicated gradients)."""
    monkeypatch.setattr(tiling, "SPLIT_ABOVE", 8)
    monkeypatch.setattr(tiling, "SMALLEST_TILE", 2)


@pytest.mark.parametrize("name", RULES)
def test_split_states_match_naive(name, small_tiles):
    rule = _load(name)
    spec, _ = kernels(rule, {d: SIZES[d] for d in rule.dims})
    assert spec.forward_programs > 1 and spec.backward_programs > 1
    tensors, states = _inputs(rule, 17, B=1, initial=True)
    _compare(rule, tensors, states)


@pytest.mark.parametrize("name", ["raven", "mlstm"])
def test_split_states_with_residuals_and_packed_sequences(name, small_tiles):
    rule = _load(name)
    spec, _ = kernels(rule, {d: SIZES[d] for d in rule.dims})
    assert len(spec.backward_tiles) == 2 and spec.residuals  # a dim the forward reduces over is split
    cu = torch.tensor([0, 5, 6, 19])
    tensors, states = _inputs(rule, 19, B=1, initial=True, sequences=3)
    _compare(rule, tensors, states, cu_seqlens=cu)


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rule = _load("gated_delta")
    tensors, _ = _inputs(rule, 3)
    with pytest.raises(recdsl.BackendError, match="TRITON_INTERPRET=1"):
        rule(**tensors, backend="recurrent")


def test_checkpoints_bound_memory():
    """The backward stores about sqrt(T) states per program, never T."""
    from recdsl.runtime.recurrent import checkpoint_interval
    assert checkpoint_interval(1) == 1
    assert checkpoint_interval(17) == 8
    assert checkpoint_interval(4096) == 64
    assert checkpoint_interval(10 ** 6) == 256
