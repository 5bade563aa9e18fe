"""The call contract of a compiled rule: how tensors are passed, what comes back, which
backends can be named, and the exact InputError for every kind of bad tensor."""
from __future__ import annotations

import pytest
import torch

import recdsl
from recdsl import BackendError, InputError
from tests.helpers import EXAMPLES, random_args

B, T, H, K, V = 2, 5, 3, 5, 3

TWO_OUTPUTS = """\
rule two_outputs

dims K, V
state S[K, V]
input q[K], k[K], v[V]
param w[K]

S = S + outer(w * k, v)

output o = q @ S
output r = dot(q, k)
"""


def load(name, **consts):
    return recdsl.load(EXAMPLES / f"{name}.rec", **consts)


@pytest.fixture(scope="module")
def gated_delta():
    return load("gated_delta")


@pytest.fixture
def gd_args(gated_delta):
    inputs, _, _ = random_args(gated_delta, batch=B, time=T, heads=H, sizes=dict(K=K, V=V),
                               shape_values={"g": lambda g: -torch.nn.functional.softplus(g),
                                             "beta": torch.sigmoid})
    return inputs


def message(excinfo) -> str:
    return str(excinfo.value)


# ---------------------------------------------------------------- passing tensors

def test_positional_named_and_mixed_calls_agree(gated_delta, gd_args):
    q, k, v, g, beta = gd_args.values()
    positional, _ = gated_delta(q, k, v, g, beta)
    named, _ = gated_delta(beta=beta, v=v, g=g, k=k, q=q)
    mixed, _ = gated_delta(q, k, beta=beta, g=g, v=v)
    assert torch.equal(positional, named) and torch.equal(positional, mixed)
    # the order matters: q and k swapped is another call
    swapped, _ = gated_delta(k, q, v, g, beta)
    assert not torch.allclose(swapped, positional)


def test_params_by_name_and_not_by_position():
    mamba2 = load("mamba2")
    inputs, params, _ = random_args(mamba2, batch=B, time=T, heads=H, sizes=dict(N=K, P=V),
                                    shape_values={"dt": torch.nn.functional.softplus})
    y, _ = mamba2(*inputs.values(), **params)
    assert y.shape == (B, T, H, V)
    y2, _ = mamba2(*inputs.values(), A_log=params["A_log"], D=params["D"] + 1)
    # D x is added to the output: D + 1 adds x once more
    assert torch.allclose(y2 - y, inputs["x"])
    with pytest.raises(InputError) as err:
        mamba2(*inputs.values(), *params.values())
    assert message(err) == ("rule 'mamba2' takes 4 token inputs (x, B, C, dt) positionally; 6 were given; "
                            "pass params by name (A_log=..., D=...)")


# ---------------------------------------------------------------- what comes back

def test_one_output_one_state_come_back_as_tensors(gated_delta, gd_args):
    out, final = gated_delta(**gd_args)
    assert isinstance(out, torch.Tensor) and out.shape == (B, T, H, V)
    assert final is None
    out2, final = gated_delta(**gd_args, output_final_state=True)
    assert torch.equal(out, out2)
    assert isinstance(final, torch.Tensor) and final.shape == (B, H, K, V)


def test_final_state_continues_the_sequence(gated_delta, gd_args):
    # Running the first 2 tokens, then the last 3 from the final state, equals running all 5.
    whole, final = gated_delta(**gd_args, output_final_state=True)
    head, mid = gated_delta(**{n: t[:, :2] for n, t in gd_args.items()}, output_final_state=True)
    tail, end = gated_delta(**{n: t[:, 2:] for n, t in gd_args.items()}, initial_state=mid,
                            output_final_state=True)
    assert torch.allclose(torch.cat([head, tail], dim=1), whole, atol=1e-12)
    assert torch.allclose(end, final, atol=1e-12)


def test_linear_attention_final_state_after_one_token_is_k_outer_v():
    rule = load("linear_attention")
    q, k, v = (torch.randn(B, 1, H, d, dtype=torch.float64) for d in (K, K, V))
    out, final = rule(q, k, v, output_final_state=True)
    expected = k[:, 0, :, :, None] * v[:, 0, :, None, :]
    assert torch.allclose(final, expected)
    assert torch.allclose(out[:, 0], torch.einsum("bhk,bhkv->bhv", q[:, 0], expected))


def test_several_states_come_back_as_a_tuple_in_declaration_order():
    mlstm = load("mlstm")
    inputs, _, _ = random_args(mlstm, batch=B, time=T, heads=H, sizes=dict(K=K, V=V))
    h, final = mlstm(**inputs, output_final_state=True)
    assert isinstance(h, torch.Tensor) and h.shape == (B, T, H, V)
    assert isinstance(final, tuple) and [f.shape for f in final] == [(B, H, K, V), (B, H, K), (B, H)]
    # m is the running max of the log gates, the last of which is at least i_T
    assert (final[2] >= inputs["i"][:, -1]).all()
    _, none = mlstm(**inputs)
    assert none is None


def test_several_outputs_come_back_as_a_tuple_in_declaration_order():
    rule = recdsl.compile(TWO_OUTPUTS)
    inputs, params, _ = random_args(rule, batch=B, time=T, heads=H, sizes=dict(K=K, V=V))
    outs, final = rule(**inputs, **params, output_final_state=True)
    assert isinstance(outs, tuple) and len(outs) == 2
    o, r = outs
    assert o.shape == (B, T, H, V) and r.shape == (B, T, H)
    assert torch.allclose(r, (inputs["q"] * inputs["k"]).sum(-1))
    assert isinstance(final, torch.Tensor) and final.shape == (B, H, K, V)


def test_initial_state_as_tensor_or_tuple(gated_delta, gd_args):
    S0 = torch.randn(B, H, K, V, dtype=torch.float64)
    from_tensor, _ = gated_delta(**gd_args, initial_state=S0)
    from_tuple, _ = gated_delta(**gd_args, initial_state=(S0,))
    from_zero, _ = gated_delta(**gd_args)
    assert torch.equal(from_tensor, from_tuple)
    assert not torch.allclose(from_tensor, from_zero)


def test_initial_states_of_several_states_and_none_entries():
    mlstm = load("mlstm")
    inputs, _, states = random_args(mlstm, batch=B, time=T, heads=H, sizes=dict(K=K, V=V),
                                    initial_state=True)
    C, n, m = states.values()
    h_all, _ = mlstm(**inputs, initial_state=(C, n, m))
    h_partial, _ = mlstm(**inputs, initial_state=(C, None, None))
    h_zeros, _ = mlstm(**inputs, initial_state=(C, torch.zeros_like(n), torch.zeros_like(m)))
    assert torch.equal(h_partial, h_zeros)
    assert not torch.allclose(h_all, h_partial)


# ---------------------------------------------------------------- backends

def test_naive_and_auto_backends(gated_delta, gd_args):
    naive, naive_final = gated_delta(**gd_args, backend="naive", output_final_state=True)
    auto, auto_final = gated_delta(**gd_args, backend="auto", output_final_state=True)
    assert torch.allclose(auto, naive, atol=1e-10) and torch.allclose(auto_final, naive_final, atol=1e-10)
    assert "naive" in gated_delta.backends()


@pytest.mark.parametrize("name", ["chunk", "recurrent", "torch-chunk"])
def test_named_backend_runs_or_says_why_not(gated_delta, gd_args, name):
    naive, _ = gated_delta(**gd_args, backend="naive")
    if name in gated_delta.backends():
        out, _ = gated_delta(**gd_args, backend=name)
        assert torch.allclose(out, naive, atol=1e-6)
    else:
        with pytest.raises(BackendError) as err:
            gated_delta(**gd_args, backend=name)
        # says which backend, and what to use instead
        assert message(err).startswith(f"backend '{name}' ")
        assert message(err).endswith("use backend='naive' or 'auto'")


@pytest.mark.parametrize("name", ["chunk", "torch-chunk"])
def test_recurrent_only_rule_has_no_chunk_backend(name):
    # an LSTM-like cell whose gates read its own output through R @ h: nothing goes first
    cell = recdsl.compile("rule cell\ndims D\nstate c[D], h[D]\ninput x[D], f[D]\nparam R[D, D]\n"
                          "let g = sigmoid(f + R @ h)\nc = g * c + (1 - g) * tanh(x)\n"
                          "h = tanh(c)\noutput y = h\n")
    inputs, params, _ = random_args(cell, batch=1, time=2, heads=1, sizes=dict(D=2))
    assert name not in cell.backends()
    with pytest.raises(BackendError) as err:
        cell(**inputs, **params, backend=name)
    assert message(err).startswith(f"backend '{name}' ") and "rule 'cell'" in message(err)


def test_unknown_backend_lists_the_choices(gated_delta, gd_args):
    with pytest.raises(BackendError) as err:
        gated_delta(**gd_args, backend="bogus")
    text = message(err)
    assert text.startswith("unknown backend 'bogus'; choose one of: auto, ")
    assert set(text.split(": ", 1)[1].split(", ")) >= {"auto", "chunk", "torch-chunk", "recurrent", "naive"}


def test_rule_has_a_family_attribute(gated_delta):
    assert hasattr(gated_delta, "family")
    assert gated_delta.family in (None, "diagonal", "delta", "recurrent")


# ---------------------------------------------------------------- bad tensors

def _bad_call(rule, args):
    with pytest.raises(InputError) as err:
        rule(**args)
    return message(err)


def test_missing_input_and_param(gated_delta, gd_args):
    del gd_args["v"]
    assert _bad_call(gated_delta, gd_args) == "missing input 'v': expected a tensor of shape [B, T, H, V]"
    mamba2 = load("mamba2")
    inputs, params, _ = random_args(mamba2, batch=B, time=T, heads=H, sizes=dict(N=K, P=V))
    del params["D"]
    assert _bad_call(mamba2, {**inputs, **params}) == "missing param 'D': expected a tensor of shape [H]"


def test_unknown_name(gated_delta, gd_args):
    assert _bad_call(gated_delta, {**gd_args, "bogus": gd_args["q"]}) == \
        "rule 'gated_delta' has no input or param 'bogus'; it takes: q, k, v, g, beta"


def test_input_given_twice(gated_delta, gd_args):
    q, k, v, g, beta = gd_args.values()
    with pytest.raises(InputError) as err:
        gated_delta(q, k, v, g, beta, v=v)
    assert message(err) == "input 'v' was given both by position and by name"


def test_too_many_positional_inputs(gated_delta, gd_args):
    with pytest.raises(InputError) as err:
        gated_delta(*gd_args.values(), gd_args["q"])
    assert message(err) == "rule 'gated_delta' takes 5 token inputs (q, k, v, g, beta) positionally; 6 were given"


def test_wrong_rank(gated_delta, gd_args):
    gd_args["beta"] = gd_args["beta"][..., None]
    assert _bad_call(gated_delta, gd_args) == \
        "input 'beta' has shape [2, 5, 3, 1] (rank 4) but expected [B, T, H] (rank 3)"


def test_dim_disagreeing_between_two_inputs_names_both(gated_delta, gd_args):
    gd_args["k"] = gd_args["k"][..., :4]
    assert _bad_call(gated_delta, gd_args) == \
        "input 'k' has shape [2, 5, 3, 4] but expected [B, T, H, K] with K = 5 (from input 'q'); here K = 4"


@pytest.mark.parametrize("axis,letter,size", [(0, "B", 1), (1, "T", 2), (2, "H", 2)])
def test_batch_time_heads_disagreement(gated_delta, gd_args, axis, letter, size):
    gd_args["v"] = gd_args["v"].narrow(axis, 0, size)
    shape = [B, T, H, V]
    shape[axis] = size
    full = {"B": B, "T": T, "H": H}[letter]
    assert _bad_call(gated_delta, gd_args) == (
        f"input 'v' has shape [{', '.join(map(str, shape))}] but expected [B, T, H, V] with "
        f"{letter} = {full} (from input 'q'); here {letter} = {size}")


def test_mixed_devices(gated_delta, gd_args):
    gd_args["v"] = gd_args["v"].to("meta")
    assert _bad_call(gated_delta, gd_args) == \
        "input 'v' is on meta but input 'q' is on cpu; put every tensor on one device"


def test_initial_state_on_another_device(gated_delta, gd_args):
    with pytest.raises(InputError) as err:
        gated_delta(**gd_args, initial_state=torch.zeros(B, H, K, V, device="meta"))
    assert message(err) == "initial state 'S' is on meta but input 'q' is on cpu; put every tensor on one device"


def test_integer_dtype(gated_delta, gd_args):
    gd_args["g"] = gd_args["g"].long()
    assert _bad_call(gated_delta, gd_args) == ("input 'g' has dtype torch.int64; expected a floating "
                                               "dtype (float16, bfloat16, float32 or float64)")


def test_non_tensor(gated_delta, gd_args):
    gd_args["g"] = 0.5
    assert _bad_call(gated_delta, gd_args) == "input 'g' must be a torch.Tensor of shape [B, T, H], not float"


def test_empty_sequence(gated_delta, gd_args):
    out, final = gated_delta(**{n: t[:, :0] for n, t in gd_args.items()}, output_final_state=True)
    assert out.shape == (B, 0, H, V) and torch.equal(final, torch.zeros(B, H, K, V))


def test_initial_state_of_wrong_shape(gated_delta, gd_args):
    with pytest.raises(InputError) as err:
        gated_delta(**gd_args, initial_state=torch.zeros(B, H, V, K))
    assert message(err) == "initial state 'S' has shape [2, 3, 3, 5] but expected [B, H, K, V] = [2, 3, 5, 3]"


def test_initial_state_with_wrong_number_of_states(gated_delta, gd_args):
    S0 = torch.zeros(B, H, K, V)
    with pytest.raises(InputError) as err:
        gated_delta(**gd_args, initial_state=(S0, S0))
    assert message(err) == "initial_state must be a tensor (state 'S') or None; got a tuple of 2 items"
    mlstm = load("mlstm")
    with pytest.raises(InputError) as err:
        mlstm(gd_args["q"], gd_args["k"], gd_args["v"], gd_args["g"], gd_args["beta"], initial_state=S0)
    assert message(err) == ("initial_state must be a tuple of 3 tensors, one per state (C, n, m) or None; "
                            "got a tensor")
    with pytest.raises(InputError) as err:
        mlstm(gd_args["q"], gd_args["k"], gd_args["v"], gd_args["g"], gd_args["beta"], initial_state=[S0])
    assert message(err) == ("initial_state must be a tuple of 3 tensors, one per state (C, n, m) or None; "
                            "got a list of 1 item")
    with pytest.raises(InputError) as err:
        gated_delta(**gd_args, initial_state=0.0)
    assert message(err) == "initial_state must be a tensor (state 'S') or None; got float"


def _packed(args):
    return {n: t[:1] for n, t in args.items()}


@pytest.mark.parametrize("cu,expected", [
    ([0, 2, 5], "cu_seqlens must be a 1-d int32 or int64 tensor of sequence boundaries, "
                "e.g. torch.tensor([0, 5, 12]); got list"),
    (torch.tensor([0.0, 2.0, 5.0]), "cu_seqlens must be a 1-d int32 or int64 tensor of sequence boundaries, "
                                    "e.g. torch.tensor([0, 5, 12]); got a tensor of dtype float32 and shape [3]"),
    (torch.tensor([[0, 5]]), "cu_seqlens must be a 1-d int32 or int64 tensor of sequence boundaries, "
                             "e.g. torch.tensor([0, 5, 12]); got a tensor of dtype int64 and shape [1, 2]"),
    (torch.tensor([0, 2, 4]), "cu_seqlens must rise from 0 to T = 5; got [0, 2, 4]"),
    (torch.tensor([1, 2, 5]), "cu_seqlens must rise from 0 to T = 5; got [1, 2, 5]"),
    (torch.tensor([0, 3, 2, 5]), "cu_seqlens must rise from 0 to T = 5; got [0, 3, 2, 5]"),
    (torch.tensor([5]), "cu_seqlens must rise from 0 to T = 5; got [5]"),
    (torch.tensor([0, 5], device="meta"), "cu_seqlens must be a 1-d int32 or int64 tensor of sequence "
                                          "boundaries, e.g. torch.tensor([0, 5, 12]); got a tensor of "
                                          "dtype int64 and shape [2] on meta"),
], ids=["list", "float", "2d", "short", "start", "falling", "one", "meta"])
def test_bad_cu_seqlens(gated_delta, gd_args, cu, expected):
    with pytest.raises(InputError) as err:
        gated_delta(**_packed(gd_args), cu_seqlens=cu)
    assert message(err) == expected


def test_batch_above_one_with_cu_seqlens(gated_delta, gd_args):
    with pytest.raises(InputError) as err:
        gated_delta(**gd_args, cu_seqlens=torch.tensor([0, 2, 5]))
    assert message(err) == "with cu_seqlens the batch size must be 1 (sequences packed along T); got B = 2"


def test_initial_state_rows_follow_the_packed_sequences(gated_delta, gd_args):
    cu = torch.tensor([0, 1, 3, 5], dtype=torch.int32)
    out, final = gated_delta(**_packed(gd_args), cu_seqlens=cu, output_final_state=True)
    assert out.shape == (1, T, H, V) and final.shape == (3, H, K, V)
    with pytest.raises(InputError) as err:
        gated_delta(**_packed(gd_args), cu_seqlens=cu, initial_state=torch.zeros(1, H, K, V))
    assert message(err) == "initial state 'S' has shape [1, 3, 5, 3] but expected [N, H, K, V] = [3, 3, 5, 3]"


def test_param_of_wrong_shape():
    mamba2 = load("mamba2")
    inputs, params, _ = random_args(mamba2, batch=B, time=T, heads=H, sizes=dict(N=K, P=V))
    cases = [
        (torch.zeros(H + 1), "param 'A_log' has shape [4] but expected [H] with H = 3 (from input 'x'); here H = 4"),
        (torch.zeros(H, 2), "param 'A_log' has shape [3, 2] (rank 2) but expected [H] (rank 1)"),
        (torch.zeros(()), "param 'A_log' has shape []; expected [H] (one value per head)"),
    ]
    for A_log, expected in cases:
        assert _bad_call(mamba2, {**inputs, **params, "A_log": A_log}) == expected
    rule = recdsl.compile(TWO_OUTPUTS)
    inputs, params, _ = random_args(rule, batch=B, time=T, heads=H, sizes=dict(K=K, V=V))
    assert _bad_call(rule, {**inputs, "w": torch.zeros(H, K + 1)}) == \
        "param 'w' has shape [3, 6] but expected [H, K] with K = 5 (from input 'q'); here K = 6"


def test_an_empty_packed_sequence_keeps_its_initial_state(gated_delta, gd_args):
    S0 = torch.randn(3, H, K, V, dtype=torch.float64)
    out, final = gated_delta(**_packed(gd_args), cu_seqlens=torch.tensor([0, 2, 2, 5]), initial_state=S0,
                             output_final_state=True)
    assert out.shape == (1, T, H, V)
    assert torch.equal(final[1], S0[1])
    assert not torch.allclose(final[0], S0[0]) and not torch.allclose(final[2], S0[2])
