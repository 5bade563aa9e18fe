"""The delta family on erases written beside a scalar decay, ``S <- (a I - b k kᵀ) S + ...``.

KLA as its author writes it, ``S = exp(g) * S + beta * outer(k, v - k @ S)`` (the erase reads
the undecayed state), and gated DeltaNet written as one sum, ``alpha * S - beta * outer(k, k @
S) + ...``, against the naive loop in float64: outputs, final states and the gradients of every
input and of the initial state, with decays of exactly 0 (alpha = 0, or g = -1e4) and exactly
1 at some tokens. These run chunkwise without dividing by the decay (chunk_delta_core's
``g_read``), so a decay of 0 gives no NaN. backend="chunk" (the Triton kernels, under the
interpreter at small shapes) runs them too: the prologue emits the first erase's log read
scale per token and the core's READ variant uses it in the erase rows of A and W.

Limitation checked as such: the gradient of a decay given as a plain input (``alpha``) at a
token where it is exactly 0 is not finite (the chunk algebra works in log space); every other
entry of that gradient, and every other gradient, matches.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl.runtime import torch_chunk_delta
from tests.helpers import random_args, rms_ratio, rule_results

KLA_AUTHOR = """
rule kla_author
dims K, V
state S[K, V]
input q[K], k[K], v[V], g, eta
const eps = 1e-6
let beta = eta / (dot(k, k) + eps)
S = exp(g) * S + beta * outer(k, v - k @ S)
output o = K ** -0.5 * (l2norm(q) @ S)
"""

GATED_SUM = """
rule gated_sum
dims K, V
state S[K, V]
input q[K], k[K], v[V], alpha, beta
let kn = l2norm(k)
S = alpha * S - beta * outer(kn, kn @ S) + beta * outer(kn, v)
output o = K ** -0.5 * (l2norm(q) @ S)
"""

TWO_ERASES = """
rule two_erases
dims K, V
state S[K, V]
input q[K], k[K], k2[K], v[V], v2[V], g, h, beta, beta2
let kn = l2norm(k)
let kn2 = l2norm(k2)
S = exp(g) * S - beta * outer(kn, kn @ S) + beta * outer(kn, v)
S = exp(h) * S
S = S - beta2 * outer(kn2, kn2 @ S) + beta2 * outer(kn2, v2)
output o = l2norm(q) @ S
"""

SIZES = {"K": 48, "V": 40}
TIMES = (1, 37, 65, 130)
FLOOR = 3e-6  # TESTING.md's floor for values the naive loop gets almost exactly
ABS_FLOOR = 1e-6  # absolute, for a gradient that is exactly 0 (inputs and gradients are O(1))


def _marks(T, seed):
    """Per token: 0 (decay 0), 1 (decay 1) or 2 (free), about a fifth each of 0 and 1."""
    gen = torch.Generator().manual_seed(100 + seed)
    u = torch.rand(T, generator=gen)
    marks = torch.full((T,), 2)
    marks[u < 0.2] = 0
    marks[(u >= 0.2) & (u < 0.4)] = 1
    if T > 3:
        marks[2], marks[3] = 0, 1  # at least one of each
    return marks


def _inputs(rule, T, B=2, H=2, seed=0, sequences=None, sizes=None):
    marks = _marks(T, seed)

    def decay_log(x):  # g: -1e4 (exp(g) == 0), 0 (exp(g) == 1) or in (-1.5, 0)
        g = -1.5 * torch.sigmoid(x)
        g[:, marks == 0] = -1e4
        g[:, marks == 1] = 0.0
        return g

    def decay(x):  # alpha in [0, 1], exactly 0 and 1 at some tokens
        a = torch.sigmoid(x + 1.0)
        a[:, marks == 0] = 0.0
        a[:, marks == 1] = 1.0
        return a

    shape = {"g": decay_log, "alpha": decay, "eta": torch.sigmoid, "beta": torch.sigmoid,
             "k": lambda x: x / 3, "h": lambda x: -torch.sigmoid(x), "beta2": torch.sigmoid}
    tensors, params, initial = random_args(rule, batch=B, time=T, heads=H,
                                           sizes=sizes or SIZES,
                                           seed=seed, initial_state=True,
                                           sequences=sequences, shape_values=shape)
    tensors.update(params)
    return tensors, tuple(initial.values())


def _zero_tokens(rule, tensors):
    """The alpha-gradient entries at tokens where the decay input is exactly 0 (see the module),
    or None."""
    if "alpha" not in tensors:
        return None
    return tensors["alpha"] == 0


def _check(rule, tensors, initial, cu_seqlens=None, backend="torch-chunk", dtype=torch.float32,
           **options):
    golden = rule_results(rule, tensors, initial, "naive", torch.float64, cu_seqlens)
    reference = rule_results(rule, tensors, initial, "naive", dtype, cu_seqlens)
    got = rule_results(rule, tensors, initial, backend, dtype, cu_seqlens, **options)
    forward = rule_results(rule, tensors, initial, backend, dtype, cu_seqlens, grads=False,
                           **options)
    zero = _zero_tokens(rule, tensors)
    errors = {}
    assert got.keys() == golden.keys()
    for name in golden:
        g, x, ref = golden[name], got[name], reference[name]
        if name == "dalpha" and zero is not None and zero.any():
            assert torch.isfinite(g[zero]).all()  # the naive loop has the true value there
            g, x, ref = g[~zero], x[~zero], ref[~zero]
            if not g.numel():
                continue
        assert torch.isfinite(x).all(), f"{rule.name} {name}: not finite"
        if not g.any():  # every decay 0: dg is exactly 0, and chunk's (sums of its terms' own
            # gradients, some O(1), less the same) is rounding noise: an absolute floor
            assert x.abs().max() <= ABS_FLOOR, f"{rule.name} {name}: {x.abs().max():.2e}"
            continue
        err = rms_ratio(x, g)
        allowed = max(10 * rms_ratio(ref, g), FLOOR)
        assert err <= allowed, f"{rule.name} {name}: rms ratio {err:.2e} > {allowed:.2e}"
        errors[name] = err
    for name in forward:  # the forward-only path (no graph) takes its own arrangement
        assert torch.isfinite(forward[name]).all(), f"{rule.name} {name} (forward only)"
        err = rms_ratio(forward[name], golden[name])
        allowed = max(10 * rms_ratio(reference[name], golden[name]), FLOOR)
        assert err <= allowed, f"{rule.name} {name} (forward only): {err:.2e} > {allowed:.2e}"
    return errors


@pytest.fixture(params=["kla_author", "gated_sum"])
def rule(request):
    return recdsl.compile({"kla_author": KLA_AUTHOR, "gated_sum": GATED_SUM}[request.param])


def test_the_rules_are_in_the_delta_family(rule):
    assert rule.family == "delta"
    assert torch_chunk_delta.problem(rule) is None


@pytest.mark.parametrize("T", TIMES)
def test_torch_chunk_matches_naive(rule, T):
    tensors, initial = _inputs(rule, T)
    _check(rule, tensors, initial)


@pytest.mark.parametrize("chunk", [16, 64])
def test_torch_chunk_sizes(rule, chunk, monkeypatch):
    monkeypatch.setattr(torch_chunk_delta, "CHUNK_SIZE", chunk)
    tensors, initial = _inputs(rule, 130, seed=3)
    _check(rule, tensors, initial)


def test_torch_chunk_float64(rule):
    tensors, initial = _inputs(rule, 65, seed=4)
    errors = _check(rule, tensors, initial, dtype=torch.float64)
    assert max(errors.values()) < 1e-9, errors


def test_torch_chunk_packed_sequences(rule):
    lengths = [37, 1, 65, 27]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    tensors, initial = _inputs(rule, sum(lengths), B=1, seed=2, sequences=len(lengths))
    _check(rule, tensors, initial, cu_seqlens=cu)


def test_decay_zero_everywhere_gives_no_nan_and_matches_naive(rule):
    """Every token's decay exactly 0: the state is rebuilt at each token from its erase of the
    incoming state (KLA) or from nothing (gated DeltaNet); no 0 * inf, no division."""
    tensors, initial = _inputs(rule, 65, seed=6)
    if "alpha" in tensors:
        tensors["alpha"] = torch.zeros_like(tensors["alpha"])
    else:
        tensors["g"] = torch.full_like(tensors["g"], -1e4)
    for dtype in (torch.float32, torch.float64):
        got = rule_results(rule, tensors, initial, "torch-chunk", dtype, grads=False)
        want = rule_results(rule, tensors, initial, "naive", torch.float64, grads=False)
        for name in want:
            assert torch.isfinite(got[name]).all(), name
            assert rms_ratio(got[name], want[name]) < (1e-5 if dtype == torch.float32 else 1e-12)
    _check(rule, tensors, initial)


def test_the_erase_reads_the_undecayed_state():
    """The two readings of (a I - b k kᵀ) S differ; torch-chunk takes the author's (r = 1), not
    the decay-then-erase one, at a decay far from 1."""
    rule = recdsl.compile(KLA_AUTHOR)
    tensors, initial = _inputs(rule, 37, seed=7)
    tensors["g"] = torch.full_like(tensors["g"], -0.7)
    got = rule_results(rule, tensors, initial, "torch-chunk", torch.float64, grads=False)
    want = rule_results(rule, tensors, initial, "naive", torch.float64, grads=False)
    assert rms_ratio(got["out o"], want["out o"]) < 1e-10
    _check(rule, tensors, initial)  # no decay near 0: the forward-only path factors its decays
    decayed_first = recdsl.compile(KLA_AUTHOR.replace(
        "S = exp(g) * S + beta * outer(k, v - k @ S)",
        "S = exp(g) * S\nS = S + beta * outer(k, v - k @ S)"))
    other = rule_results(decayed_first, tensors, initial, "naive", torch.float64, grads=False)
    assert rms_ratio(other["out o"], want["out o"]) > 1e-3


# backend="chunk": the Triton kernels under the interpreter (tests/conftest.py), small shapes
CHUNK_SIZES = ({"K": 16, "V": 8}, {"K": 24, "V": 16}, {"K": 32, "V": 24})


def test_chunk_takes_them(rule):
    from recdsl.runtime import chunk_delta
    assert chunk_delta.problem(rule) is None


@pytest.mark.parametrize("T, sizes", [(1, CHUNK_SIZES[0]), (37, CHUNK_SIZES[1]),
                                      (65, CHUNK_SIZES[2])])
def test_chunk_matches_naive(rule, T, sizes):
    """Outputs, final state and every gradient (initial state included), decays of exactly 0
    and 1 at some tokens (g = -1e4 for KLA), against the naive loop; the forward-only call
    too."""
    tensors, initial = _inputs(rule, T, B=1, seed=11, sizes=sizes)
    _check(rule, tensors, initial, backend="chunk")


def test_chunk_packed_sequences(rule):
    lengths = [37, 1, 20]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    tensors, initial = _inputs(rule, sum(lengths), B=1, seed=12, sequences=len(lengths),
                               sizes=CHUNK_SIZES[1])
    _check(rule, tensors, initial, cu_seqlens=cu, backend="chunk")


def test_chunk_decay_zero_everywhere(rule):
    tensors, initial = _inputs(rule, 20, B=1, seed=13, sizes=CHUNK_SIZES[0])
    if "alpha" in tensors:
        tensors["alpha"] = torch.zeros_like(tensors["alpha"])
    else:
        tensors["g"] = torch.full_like(tensors["g"], -1e4)
    _check(rule, tensors, initial, backend="chunk")


def test_chunk_two_erases_the_first_beside_a_decay():
    """Two steps per token (the core's rows in pairs): the first erase reads the state scaled
    by the token's other decay exp(h) (met after it), the second the state after all of them."""
    rule = recdsl.compile(TWO_ERASES)
    from recdsl.runtime import chunk_delta
    assert rule.family == "delta" and chunk_delta.problem(rule) is None
    tensors, initial = _inputs(rule, 37, B=1, seed=14, sizes=CHUNK_SIZES[1])
    _check(rule, tensors, initial, backend="chunk")
    _check(rule, tensors, initial)  # torch-chunk agrees


def test_chunk_refuses_a_later_erase_beside_a_decay():
    """A later erase beside a decay would read a state the core has already decayed by it
    (undoing that is a division): the delta core refuses it with a one-line reason; chunk runs
    it through the DPLR family's core, torch-chunk through the delta family's PyTorch path."""
    from recdsl.runtime import chunk_delta
    rule = recdsl.compile(TWO_ERASES.replace("S = exp(h) * S\n", "").replace(
        "S = exp(g) * S - beta *", "S = S - beta *").replace(
        "S = S - beta2 *", "S = exp(g) * S - beta2 *").replace(", h,", ","))
    reason = chunk_delta.problem(rule)
    assert reason is not None and "\n" not in reason and "first erase" in reason
    from recdsl.runtime import backends
    assert backends._family_of(rule, backends._BY_NAME["chunk"]) == "dplr"
    tensors, initial = _inputs(rule, 20, B=1, sizes=CHUNK_SIZES[0])
    _check(rule, tensors, initial, backend="chunk")


def test_non_scalar_decay_beside_an_erase_stays_recurrent():
    rule = recdsl.compile(KLA_AUTHOR.replace("input q[K], k[K], v[V], g, eta",
                                             "input q[K], k[K], v[V], g[K], eta")
                          .replace("exp(g) * S", "diag(exp(g)) @ S"))
    assert rule.family != "delta"


def test_show_says_delta(tmp_path):
    path = tmp_path / "kla_author.rec"
    path.write_text(KLA_AUTHOR)
    cli = Path(sys.executable).with_name("recdsl")  # the console script beside this python
    out = subprocess.run([str(cli), "show", str(path)], check=True, capture_output=True,
                         text=True).stdout
    assert "family: delta" in out
    assert "torch-chunk  yes" in out
