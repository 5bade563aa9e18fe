"""The read lowering (recdsl.ir.reads + recdsl.runtime.lowered) against the naive loop in
float64: outputs, final states and the gradients of every input, param and initial state, for
rules whose outputs the chunk families refuse as written (an output gate, a read before the
update, a normaliser read from a vector state), at T = 1, 37, 65, 130, with initial states and
packed sequences. Most cases run the derived rule on torch-chunk; a few small ones on the chunk
Triton kernels under the interpreter."""
import pytest
import torch

import recdsl
from recdsl.ir import reads
from recdsl.runtime import lowered
from tests.helpers import EXAMPLES, assert_matches_naive, random_args

RULES = {
    "delta_gated_out": """rule delta_gated_out
dims K, V
state S[K, V]
input q[K], k[K], v[V], beta, og[V]
let kn = l2norm(k)
S = S - beta * outer(kn, kn @ S) + beta * outer(kn, v)
output o = sigmoid(og) * (l2norm(q) @ S)
""",
    "delta_read_first": """rule delta_read_first
dims K, V
state S[K, V]
input q[K], k[K], v[V], beta
let kn = l2norm(k)
output o = l2norm(q) @ S
S = S - beta * outer(kn, kn @ S) + beta * outer(kn, v)
""",
    # a read before the update on a gated rule, through a let, with an output gate and a
    # second output reading after the update
    "gated_delta_read_first": """rule gated_delta_read_first
dims K, V
state S[K, V]
input q[K], k[K], v[V], g, beta, og[V]
let kn = l2norm(k)
let old = K ** -0.5 * (l2norm(q) @ S)
S = exp(g) * S
S = S - beta * outer(kn, kn @ S)
S = S + beta * outer(kn, v)
output o = silu(og) * old
output p = old - (kn @ S) * 0.5
""",
    "linear_attention_norm": """rule linear_attention_norm
dims K, V
state S[K, V], z[K]
input q[K], k[K], v[V]
let phi = exp(k)
let phi_q = exp(q)
S = S + outer(phi, v)
z = z + phi
output o = (phi_q @ S) / (dot(phi_q, z) + 1e-6)
""",
    "mlstm_sigmoid": """rule mlstm_sigmoid
dims K, V
state C[K, V], n[K]
input q[K], k[K], v[V], i, f
let fg = sigmoid(f)
let ig = sigmoid(i)
C = fg * C + ig * outer(k, v)
n = fg * n + ig * k
let qs = K ** -0.5 * q
output h = (qs @ C) / max(abs(dot(n, qs)), 1.0)
""",
    "gla_gated_out": """rule gla_gated_out
dims K, V
state S[K, V]
input q[K], k[K], v[V], gk[K], og[V]
S = diag(exp(gk)) @ S + outer(k, v)
output o = sigmoid(og) * (K ** -0.5 * (q @ S))
""",
    # a per-channel decay with the read before the update
    "gla_read_first": """rule gla_read_first
dims K, V
state S[K, V]
input q[K], k[K], v[V], gk[K]
output o = tanh(q @ S)
S = diag(exp(gk)) @ S + outer(k, v)
""",
    # a scalar state (lifted to [ONE, ONE], read as one @ z) in a non-linear epilogue
    "linear_attention_scalar_norm": """rule linear_attention_scalar_norm
dims K, V
state S[K, V], z
input q[K], k[K], v[V]
let phi = exp(k)
S = S + outer(phi, v)
z = z + sum(phi)
output o = (exp(q) @ S) / (z * z + 1)
""",
    # a vector state read directly (lifted to [K, ONE], read as h @ one), also this rule is
    # in the scan family
    "diag_vector_direct": """rule diag_vector_direct
dims K
state h[K]
input g[K], x[K]
h = exp(g) * h + x
output y = h
""",
    # direct reads before the update, of a vector and a scalar state, through lets, next to
    # reads after it
    "direct_read_first": """rule direct_read_first
dims K, V
state h[K], w, S[K, V]
input g[K], x[K], a, b, q[K], v[V]
let old = h
let w0 = w
h = exp(g) * h + x
w = exp(a) * w + b
S = S + outer(x, v)
let both = old * sigmoid(x) + h
output y = both / (w0 * w0 + 1)
output o = (q @ S) * w + dot(q, h)
""",
}

# the chunk family of each derived rule
FAMILIES = {"delta_gated_out": "delta", "delta_read_first": "delta",
            "gated_delta_read_first": "delta", "linear_attention_norm": "diagonal",
            "mlstm_sigmoid": "diagonal", "gla_gated_out": "diagonal", "gla_read_first": "diagonal",
            "linear_attention_scalar_norm": "diagonal", "diag_vector_direct": "diagonal",
            "direct_read_first": "diagonal"}

SHAPE = {"beta": torch.sigmoid, "g": lambda x: torch.nn.functional.logsigmoid(x) * 0.3,
         "a": lambda x: torch.nn.functional.logsigmoid(x) * 0.3,
         "gk": lambda x: torch.nn.functional.logsigmoid(x) * 0.3,
         "k": lambda x: x * 0.5, "q": lambda x: x * 0.5}


class _Lowered:
    """A rule whose call runs the read lowering on ``backend`` (naive calls pass through), for
    tests.helpers.assert_matches_naive."""

    def __init__(self, rule, backend):
        self.rule, self.backend = rule, backend
        self.name, self.outputs, self.states = rule.name, rule.outputs, rule.states

    def __call__(self, initial_state=None, output_final_state=False, backend="auto",
                 cu_seqlens=None, **named):
        if backend == "naive":
            return self.rule(initial_state=initial_state, output_final_state=output_final_state,
                             backend="naive", cu_seqlens=cu_seqlens, **named)
        call = self.rule.bind(initial_state=initial_state, cu_seqlens=cu_seqlens, **named)
        outs, finals = lowered.run(self.rule, call, self.backend)
        out = outs[0] if len(outs) == 1 else tuple(outs)
        final = (finals[0] if len(finals) == 1 else tuple(finals)) if output_final_state else None
        return out, final


def _rule(name):
    return recdsl.compile(RULES[name])


def _check(name, time, *, packed=None, initial=True, backend="torch-chunk", sizes=None):
    rule = _rule(name)
    sizes = sizes or {"K": 8, "V": 6}
    batch = 1 if packed else 2
    sequences = len(packed) - 1 if packed else batch
    inputs, params, states = random_args(rule, batch=batch, time=time, heads=2, sizes=sizes,
                                         initial_state=initial, sequences=sequences,
                                         shape_values=SHAPE)
    init = tuple(states.values()) if initial else None
    cu = torch.tensor(packed) if packed else None
    assert_matches_naive(_Lowered(rule, backend), {**inputs, **params}, init, backend="lowered",
                         cu_seqlens=cu, dtype=torch.float64)


# ------------------------------------------------------------ the analysis


@pytest.mark.parametrize("name", sorted(RULES))
def test_the_chunk_families_refuse_the_rule_and_accept_the_derived_one(name):
    rule = _rule(name)
    assert rule.family_info.chunk is None
    low = reads.lowering(rule.ir)
    assert low is not None, reads.why_not(rule.ir)
    assert low.family == FAMILIES[name]
    if name != "diag_vector_direct":  # an elementwise scan: the hook keeps it as it is
        assert reads.for_family(rule.ir, rule.family_info) is not None
    assert lowered.problem(rule, "torch-chunk") is None


def test_derived_rule_of_a_read_before_the_update():
    low = reads.lower(_rule("delta_read_first").ir)
    assert "input q[K], k[K], v[V], beta, next_S[K]" in low.text
    assert low.text.rstrip().endswith("output read_S = next_S @ S")
    (read,) = low.reads
    assert read.before and read.side == "left" and read.shifted == "next_S"
    assert reads.unparse(low.epilogue["o"]) == "read_S"


def test_vector_state_lifted_to_a_one_column_matrix():
    low = reads.lower(_rule("mlstm_sigmoid").ir)
    assert "dims K, V, ONE" in low.text and "state C[K, V], n[K, ONE]" in low.text
    assert "outer(ig * k, one)" in low.text
    assert low.vector_states == ("n",) and low.ones_input == "one"
    assert reads.unparse(low.epilogue["h"]) == "read_C / max(abs(read_n), 1.0)"


def test_scalar_state_lifted_to_a_one_by_one_matrix():
    low = reads.lower(_rule("linear_attention_scalar_norm").ir)
    assert "dims K, V, ONE" in low.text and "state S[K, V], z[ONE, ONE]" in low.text
    assert "z = (z + (sum(phi)) * outer(one, one))" in low.text
    assert "output read_z = one @ z" in low.text
    assert low.scalar_states == ("z",) and low.vector_states == () and low.ones_input == "one"
    assert [r.side for r in low.reads] == ["left", "scalar"]
    assert reads.unparse(low.epilogue["o"]) == "read_S / (read_z * read_z + 1)"


def test_vector_state_read_directly():
    low = reads.lower(_rule("diag_vector_direct").ir)
    assert "state h[K, ONE]" in low.text
    assert "h = (diag(exp(g)) @ (h) + outer(x, one))" in low.text
    assert low.text.rstrip().endswith("output read_h = h @ one")
    (read,) = low.reads
    assert read.side == "vector" and read.vector is None and not read.before
    assert reads.unparse(low.epilogue["y"]) == "read_h"


def test_an_elementwise_scan_lists_the_chunk_path_after_the_scan():
    rule = _rule("diag_vector_direct")
    assert rule.family == "scan" and rule.family_info.lowered is not None
    backends = rule.backends()
    assert backends.index("torch-scan") < backends.index("torch-chunk")  # measured faster


def test_direct_reads_before_the_update():
    low = reads.lower(_rule("direct_read_first").ir)
    assert "state h[K, ONE], w[ONE, ONE], S[K, V]" in low.text
    by = {(r.state, r.side, r.before): r for r in low.reads}
    assert set(by) == {("h", "vector", True), ("h", "vector", False), ("w", "scalar", True),
                       ("w", "scalar", False), ("S", "left", False), ("h", "dot", False)}
    first = by["h", "vector", True]
    assert f"{first.shifted}[ONE]" in low.text and f"= h @ {first.shifted}" in low.text
    first = by["w", "scalar", True]
    assert f"= {first.shifted} @ w" in low.text


def test_reads_are_shared_and_new_names_do_not_clash():
    text = """rule clash
dims K, V
state S[K, V]
input q[K], k[K], v[V], read_S[V], next_S
output a = (q @ S) * read_S
output b = next_S * (q @ S) + (k @ S)
S = S + outer(k, v)
"""
    low = reads.lower(recdsl.compile(text).ir)
    names = [r.name for r in low.reads]
    assert len(names) == 2 and "read_S" not in names  # q @ S once, k @ S once
    assert all(r.shifted not in ("next_S", None) for r in low.reads)


def test_a_rule_with_a_chunk_form_needs_no_lowering():
    rule = recdsl.load(EXAMPLES / "gla.rec")
    assert reads.for_family(rule.ir, rule.family_info) is None


@pytest.mark.parametrize("text, why", [
    # the max-stabiliser's scalar state, lifted, but its gates read it: the staging's case
    ((EXAMPLES / "mlstm.rec").read_text(), "let m1 uses the scalar state m in an update"),
    # the derived rule keeps the update, which no chunk form takes
    ("""rule not_affine
dims K, V
state S[K, V]
input q[K], k[K], v[V]
S = tanh(S) + outer(k, v)
output o = sigmoid(q @ S)
""", "no chunkwise form"),
    # a read between two updates of the state
    ("""rule between
dims K, V
state S[K, V]
input q[K], k[K], v[V], g
S = exp(g) * S
output o = q @ S
S = S + outer(k, v)
""", "between two of its updates"),
    ("""rule square
dims K, V
state S[K, V]
input q[K], k[K], v[V]
S = S + outer(k, v)
output o = S @ (q @ S)
""", "depends on a state"),
    ("""rule nonlinear_scalar
dims K, V
state S[K, V], z
input q[K], k[K], v[V]
S = S + outer(k, v)
z = z * z + sum(k)
output o = (q @ S) / z
""", "in the update of the scalar state z is not linear"),
    ("""rule scalar_gates_matrix
dims K, V
state S[K, V], z
input q[K], k[K], v[V]
S = S + z * outer(k, v)
z = z + sum(k)
output o = (q @ S) / z
""", "the update of S uses the scalar state z"),
    ("""rule nonlinear_vector
dims K, V
state S[K, V], z[K]
input q[K], k[K], v[V]
S = S + outer(k, v)
z = tanh(z) + k
output o = (q @ S) / dot(q, z)
""", "not linear"),
])
def test_refusals_say_why(text, why):
    rule = recdsl.compile(text)
    assert reads.lowering(rule.ir) is None
    assert why in reads.why_not(rule.ir)
    assert "no read lowering" in lowered.problem(rule, "torch-chunk")


# ------------------------------------------------------------ against the naive loop


@pytest.mark.parametrize("time", [1, 37, 65, 130])
@pytest.mark.parametrize("name", sorted(RULES))
def test_torch_chunk_matches_naive(name, time):
    _check(name, time)


@pytest.mark.parametrize("name", sorted(RULES))
def test_torch_chunk_without_initial_state(name):
    _check(name, 65, initial=False)


@pytest.mark.parametrize("name", sorted(RULES))
def test_torch_chunk_packed_sequences(name):
    _check(name, 130, packed=[0, 1, 38, 40, 105, 130])


def test_two_reads_of_a_delta_state_run_chunk_through_the_dplr_core():
    """The delta chunk kernel takes one output; the derived rule's two reads (before and after
    the update) go to the DPLR family's Triton core, which takes several."""
    from recdsl.runtime import backends, rule as rule_module
    rule = _rule("gated_delta_read_first")
    derived = rule_module.of_derived(rule.family_info.lowered.derived)
    assert backends._family_of(derived, backends._BY_NAME["chunk"]) == "dplr"
    assert lowered.problem(rule, "chunk") is None
    _check("gated_delta_read_first", 21, packed=[0, 5, 6, 21], sizes={"K": 16, "V": 16},
           backend="chunk")


@pytest.mark.parametrize("name", ["delta_read_first", "delta_gated_out", "mlstm_sigmoid",
                                  "gla_read_first", "direct_read_first"])
def test_chunk_kernels_under_the_interpreter(name):
    rule = _rule(name)
    assert lowered.problem(rule, "chunk") is None
    _check(name, 21, packed=[0, 5, 6, 21], sizes={"K": 16, "V": 16}, backend="chunk")
