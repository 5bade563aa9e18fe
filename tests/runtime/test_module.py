"""RuleLayer: the rule as an nn.Module with learnable params."""
import pytest
import torch

import recdsl
from recdsl.runtime.sample import sample_inputs
from tests.helpers import EXAMPLES


def test_layer_equals_rule_call_and_trains_its_params():
    rule = recdsl.load(EXAMPLES / "mamba2.rec")
    layer = rule.layer(heads=2, dims={"N": 4, "P": 3})
    assert sorted(n for n, _ in layer.named_parameters()) == ["params.A_log", "params.D"]
    assert layer.params["A_log"].shape == (2,)
    x = sample_inputs(rule, batch=1, time=5, heads=2, dims={"N": 4, "P": 3})
    tokens = {k: v for k, v in x.items() if k not in ("A_log", "D")}
    y, _ = layer(**tokens)
    expected, _ = rule(**tokens, A_log=layer.params["A_log"].detach(), D=layer.params["D"].detach(),
                       backend="naive")
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    y.square().sum().backward()
    assert layer.params["A_log"].grad.abs().sum() > 0 and layer.params["D"].grad.abs().sum() > 0


def test_passing_a_learnable_param_is_an_error():
    rule = recdsl.load(EXAMPLES / "retention.rec")
    layer = rule.layer(heads=1, dims={"K": 3, "V": 2})
    x = sample_inputs(rule, batch=1, time=2, heads=1, dims={"K": 3, "V": 2})
    with pytest.raises(recdsl.InputError, match="gamma is a learnable param of this layer"):
        layer(**x)


def test_layer_step_matches_forward():
    rule = recdsl.load(EXAMPLES / "gated_delta.rec")
    layer = rule.layer(heads=2, dims={"K": 4, "V": 3}, backend="naive")
    x = sample_inputs(rule, batch=1, time=3, heads=2, dims={"K": 4, "V": 3})
    full, final = layer(**x, output_final_state=True)
    state = None
    for t in range(3):
        o, state = layer.step(**{k: v[:, t] for k, v in x.items()}, state=state)
        torch.testing.assert_close(o, full[:, t], rtol=0, atol=1e-6)
    torch.testing.assert_close(state, final, rtol=0, atol=1e-6)
