"""How the recurrent kernels split large states across programs (recdsl/codegen/tiling.py).
The split kernels' numbers are tested against the naive loop in tests/runtime/test_recurrent.py
(test_split_*); the builds' register figures in tests/codegen/test_aot.py."""
import pytest

import recdsl
from recdsl.codegen import recurrent, tiling
from recdsl.ir.ssa import lower
from recdsl.ir.vjp import adjoint
from tests.helpers import EXAMPLES


def _spec(name, **sizes):
    rule = recdsl.load(EXAMPLES / f"{name}.rec")
    return recurrent.generate(rule.ir, sizes)


def test_small_states_are_not_split():
    spec = _spec("gated_delta", K=64, V=64)
    assert (spec.forward_tiles, spec.backward_tiles, spec.residuals) == ({}, {}, [])
    assert (spec.forward_programs, spec.backward_programs) == (1, 1)


def test_delta_rule_splits_its_columns_in_both_directions():
    spec = _spec("gated_delta", K=128, V=128)
    assert spec.forward_tiles == {"V": 32} and spec.backward_tiles == {"V": 32}
    assert spec.backward_programs == 4 and spec.residuals == []
    # q and k span K only: one partial gradient per program; v and the state come back whole
    assert spec.gradient_whole == {"q": False, "k": False, "v": True, "g": False, "beta": False,
                                   "S": True}


def test_raven_backward_splits_keys_and_values_with_the_scores_stored():
    """The forward reduces Sk over K (the scores) and cannot split K; the backward can, with
    the scores stored by the forward: every program holds a 64 x 32 slice of Sk and of Sv."""
    spec = _spec("raven", M=64, K=128, V=128)
    assert spec.forward_tiles == {"V": 16}
    assert spec.backward_tiles == {"K": 32, "V": 32} and spec.backward_programs == 16
    assert spec.residuals == [("p_res_r_18", ("M",))]
    assert spec.scratch_numel == {"Sk": 64 * 32, "Sv": 64 * 32}
    assert "r_18 = tl.load(p_res_r_18" in spec.source
    assert spec.backward_num_warps == 8


def test_raven_slots_cannot_be_split_in_the_backward():
    """The softmax over slots needs sum(p * dp) over all slots in the backward."""
    rule = recdsl.load(EXAMPLES / "raven.rec")
    sizes = {"M": 64, "K": 128, "V": 128}
    adj = adjoint(lower(rule.ir, sizes))
    split = tiling.Tiling({"M": 16}, {"M": 4})
    with pytest.raises(tiling.NotSplittable, match="is summed over M and then needed along M"):
        tiling.plan_backward(adj, split)


def test_replicated_gradients_meeting_partial_ones_count_once():
    """dlam gets a partial sum over K (from Sk) plus a gradient replicated over K (from Sv):
    the replicated part is kept by the first tile along K only."""
    spec = _spec("raven", M=64, K=128, V=128)
    assert "+ first_tile_K*g_let_lam_14_20" in spec.source
    assert "g_in_v_2_21 * first_tile_K" in spec.source  # dv: replicated over K tiles
