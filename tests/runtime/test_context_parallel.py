"""Context parallelism (``rule(..., cp_group=group)``, ``recdsl.runtime.context_parallel``)
against the single-process call: 2 and 4 processes on the CPU with gloo, spawned here.

Every rank builds the same global tensors, runs the single-process call itself (the
reference), then its own slice with ``cp_group``; outputs (its slice), the global final states
and the gradients of every input, param and initial state (all-reduced: summed over ranks)
must equal the reference. The per-rank losses add up to the reference's loss (each rank weighs
the replicated final states by 1/P). Cases: B = 2 with slices that are not multiples of the
chunk size, an initial state, and packed sequences across rank boundaries (one spans a whole
rank, one has no token). Spawning is slow, so one spawned run checks many cases.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import recdsl
from recdsl.errors import BackendError, InputError
from recdsl.runtime.sample import sample_inputs
from tests.helpers import EXAMPLES, as_list, rms_ratio
from tests.runtime.test_torch_chunk_dplr import KDA, RWKV7

DIMS = {"K": 8, "V": 6, "N": 8, "P": 6, "M": 10, "NH": 2, "D": 5}
RULES = {name: (lambda name=name: recdsl.load(EXAMPLES / f"{name}.rec"))
         for name in ("gated_delta", "kla", "deltaproduct", "gla", "mamba2", "raven", "retention")}
RULES["kda"] = lambda: recdsl.compile(KDA)
RULES["rwkv7"] = lambda: recdsl.compile(RWKV7)
RULES["mlstm"] = lambda: recdsl.load(EXAMPLES / "mlstm.rec")  # staged: m, then C and n
HGRN = """
rule hgrn
dims D
state h[D]
input x[D], g[D]
h = exp(g) * h + (1 - exp(g)) * x
output o = h
"""
RULES["hgrn"] = lambda: recdsl.compile(HGRN)  # the scan family: a vector state
# slow decays and weak erases, so that the state carried across a rank boundary matters
SLOW = {"g": lambda x: x / 20, "gk": lambda x: x / 20, "A_log": lambda x: x - 3,
        "beta": lambda x: x / 5, "eta": lambda x: x / 5, "gamma": lambda x: 1 - x / 50,
        "f": lambda x: x + 4}  # mLSTM: a forget gate near 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, world, *args):
    """Run ``worker(rank, world, *args)`` in ``world`` processes joined by a gloo group."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    mp.spawn(_entry, args=(world, _free_port(), worker, args), nprocs=world, join=True)


def _entry(rank, world, port, worker, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=5))
    try:
        worker(rank, world, *args)
        dist.barrier()  # no rank tears down the group (rank 0 hosts its store) while others use it
    finally:
        dist.destroy_process_group()
    # the worker passed: leave without the interpreter's teardown, where a gloo/DDP background
    # thread once aborted the process in CI ("terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _case(rule, lengths, *, packed, dtype, seed, empty=True):
    """Global tensors by name (token inputs [B, T, H, ...], params), initial states [N, H, ...]
    and ``cu_seqlens`` (packed, B = 1: ``empty`` adds a sequence of length 0), for slices of
    ``lengths``."""
    total = sum(lengths)
    batch = 1 if packed else 2
    tensors = sample_inputs(rule, batch=batch, time=total, heads=2,
                            dims={d: DIMS[d] for d in rule.dims}, dtype=dtype, seed=seed)
    tensors = {k: SLOW.get(k, lambda x: x)(x) for k, x in tensors.items()}
    cu = None
    sequences = batch
    if packed:  # one of length 0; one running into the last rank (through whole ranks when
        # there are more than 2); with more than 2 ranks, one ending at a rank boundary
        last = sum(lengths[:-1])
        cut = ([0, 3] + [3] * empty + ([lengths[0]] if len(lengths) > 2 else [])
               + [last + 2, total - 1, total])
        cu = torch.tensor(cut)
        sequences = len(cut) - 1
    gen = torch.Generator().manual_seed(seed + 7)
    initial = tuple(torch.randn([sequences, 2] + [DIMS[d] for d in s.dims], generator=gen,
                                dtype=torch.float64).to(dtype) for s in rule.states)
    return tensors, initial, cu


def _results(rule, tensors, initial, cu, backend, slice_=None, group=None, world=1):
    """Outputs, finals and grads (a dict by name) of one call: the whole sequence, or this
    rank's ``slice_`` of it with ``group``; loss = sum(out * upstream) + sum(final * up) / world."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
    init = tuple(s.clone().requires_grad_(True) for s in initial)
    token = {v.name for v in rule.inputs}
    args = {k: (v[:, slice_] if k in token and slice_ is not None else v) for k, v in leaves.items()}
    out, final = rule(**args, initial_state=init, output_final_state=True, backend=backend,
                      cu_seqlens=cu, cp_group=group)
    outs, finals = as_list(out), as_list(final)
    gen = torch.Generator().manual_seed(11)
    loss = 0
    values = {}
    for o, var in zip(outs, rule.outputs):
        full = [leaves[rule.inputs[0].name].shape[0], leaves[rule.inputs[0].name].shape[1],
                *o.shape[2:]]
        up = torch.randn(full, generator=gen, dtype=torch.float64).to(o.dtype)
        up = up[:, slice_] if slice_ is not None else up
        loss = loss + (o * up).sum()
        values[f"out {var.name}"] = o.detach()
    for f, var in zip(finals, rule.states):
        up = torch.randn(f.shape, generator=gen, dtype=torch.float64).to(f.dtype)
        loss = loss + (f * up).sum() / world
        values[f"final {var.name}"] = f.detach()
    wrt = list(leaves.values()) + list(init)
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    names = [f"d{k}" for k in leaves] + [f"d{s.name}0" for s in rule.states]
    for n, g, w in zip(names, grads, wrt):
        g = torch.zeros_like(w) if g is None else g.clone()
        if group is not None:
            dist.all_reduce(g, group=group)
        values[n] = g
    return values


def _check_rules(rank, world, names, lengths, backend, dtype, empty=True):
    group = dist.new_group(list(range(world)))
    offsets = [sum(lengths[:r]) for r in range(world + 1)]
    mine = slice(offsets[rank], offsets[rank + 1])
    for i, name in enumerate(names):
        rule = RULES[name]()
        for packed in (False, True):
            tensors, initial, cu = _case(rule, lengths, packed=packed, dtype=dtype, seed=i,
                                         empty=empty)
            golden = _results(rule, {k: v.double() for k, v in tensors.items()},
                              tuple(s.double() for s in initial), cu, backend)
            ref = _results(rule, tensors, initial, cu, backend)
            got = _results(rule, tensors, initial, cu, backend, mine, group, world)
            for key in golden:
                want = golden[key][:, mine] if key.startswith("out") else golden[key]
                have = got[key].double()
                assert torch.isfinite(have).all(), f"{name} {key}: not finite"
                own = ref[key][:, mine] if key.startswith("out") else ref[key]
                err = rms_ratio(have, want)
                allowed = max(10 * rms_ratio(own.double(), want), 1e-12 if dtype == torch.float64 else 3e-6)
                assert err <= allowed, (f"{name} packed={packed} rank {rank} {key}: rms ratio "
                                        f"{err:.2e} > {allowed:.2e}")


@pytest.mark.parametrize("names", [("mlstm", "gated_delta", "gla", "mamba2", "retention"),
                                   ("kla", "deltaproduct", "raven", "kda", "rwkv7")])
def test_two_ranks_torch_chunk(names):
    """2 ranks, slices of 45 and 38 tokens (torch-chunk's CPU chunk is 32), float32."""
    _spawn(_check_rules, 2, names, [45, 38], "torch-chunk", torch.float32)


@pytest.mark.slow
def test_four_ranks_torch_chunk():
    """4 ranks, slices 21, 40, 33, 17: a packed sequence runs through two whole ranks."""
    _spawn(_check_rules, 4, tuple(RULES), [21, 40, 33, 17], "torch-chunk", torch.float32)


def _check_errors(rule, rank, group):
    """Bad calls fail on every rank alike (no rank left waiting in a collective), saying what
    to pass."""
    x = sample_inputs(rule, batch=2 + rank, time=5, heads=2, dims={"K": 4, "V": 4})
    with pytest.raises(InputError, match="disagree on B or H"):
        rule(**x, cp_group=group)
    x = sample_inputs(rule, batch=1, time=5, heads=2, dims={"K": 4, "V": 4})
    with pytest.raises(InputError, match="cu_seqlens are global.*T = 10"):
        rule(**x, cu_seqlens=torch.tensor([0, 5]), cp_group=group)
    with pytest.raises(InputError, match=r"global initial state \[2, 2, 4, 4\]"):
        rule(**x, cu_seqlens=torch.tensor([0, 4, 10]), initial_state=torch.zeros(1, 2, 4, 4),
             cp_group=group)


def _check_grad_on_one_rank(rank, group, lengths, mine):
    """Only rank 0's initial state needs a gradient; the other ranks need none, yet join the
    backward's collective (else rank 0 would wait for ever) and rank 0 gets the whole gradient."""
    rule = RULES["gla"]()
    tensors, initial, _ = _case(rule, lengths, packed=False, dtype=torch.float32, seed=3)
    s0 = initial[0].clone().requires_grad_(True)
    single, _ = rule(**tensors, initial_state=s0)
    want = torch.autograd.grad(single.sum(), s0)[0]
    s0 = initial[0].clone().requires_grad_(rank == 0)
    out, _ = rule(**{k: v[:, mine] for k, v in tensors.items()}, initial_state=s0, cp_group=group)
    if rank == 0:
        got = torch.autograd.grad(out.sum(), s0)[0]
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
    else:
        out.sum().backward()


def _check_mixer(rank, world, lengths):
    """The mixer (short convolutions fed the previous rank's last tokens) against one process,
    then a few training steps under DistributedDataParallel (DDP on the default group, the
    context parallelism on a group of its own)."""
    group = dist.new_group(list(range(world)))
    offsets = [sum(lengths[:r]) for r in range(world + 1)]
    mine = slice(offsets[rank], offsets[rank + 1])
    rule = RULES["gated_delta"]()
    _check_errors(rule, rank, group)
    _check_grad_on_one_rank(rank, group, lengths, mine)
    torch.manual_seed(0)
    single = rule.mixer(16, 2, seed=0)
    split = rule.mixer(16, 2, seed=0, cp_group=group)
    split.load_state_dict(single.state_dict())
    assert split.conv_names, "the test needs a mixer with short convolutions"
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, offsets[-1], 16, generator=gen)
    up = torch.randn(2, offsets[-1], 16, generator=gen)
    results = []
    for model, part in ((single, slice(None)), (split, mine)):
        leaf = x.clone().requires_grad_(True)
        y = model(leaf[:, part])
        grads = torch.autograd.grad((y * up[:, part]).sum(), [leaf] + list(model.parameters()))
        grads = [g.clone() for g in grads]
        if part is mine:
            for g in grads:
                dist.all_reduce(g, group=group)
        results.append((y.detach(), grads))
    (y1, g1), (y2, g2) = results
    assert torch.allclose(y2, y1[:, mine], rtol=1e-4, atol=1e-5), (y2 - y1[:, mine]).abs().max()
    for (name, _), a, b in zip([("x", None)] + list(single.named_parameters()), g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"d{name}: {(a - b).abs().max():.2e}"

    model = torch.nn.parallel.DistributedDataParallel(rule.mixer(16, 2, cp_group=group))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.randn(2, offsets[-1], 16, generator=gen)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(model(x[:, mine]), target[:, mine])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    assert losses[-1] < 0.95 * losses[0], losses
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    assert all(torch.equal(every[0], f) for f in every[1:]), "parameters differ across ranks"


def test_mixer_and_ddp_two_ranks():
    """Rank 0 holds 2 tokens, fewer than the convolution's 3 of history: rank 1 takes them and
    zeros. Then 6 DDP steps: the loss goes down and the parameters stay equal across ranks."""
    _spawn(_check_mixer, 2, [2, 19])


@pytest.mark.slow
def test_two_ranks_chunk_triton():
    """The Triton kernels (interpreted on the CPU), slices of 24 and 19 tokens. No packed
    sequence of length 0: the chunk backend's own final state for one is not its initial state
    (reported), so the single-process reference would be wrong."""
    _spawn(_check_rules, 2, ("gated_delta", "gla"), [24, 19], "chunk", torch.float32, False)


NOT_AFFINE = """
rule minrnn
dims K
state h[K]
input x[K]
h = tanh(h) + x
output o = h
"""

SEQUENTIAL_LEAD = """
rule tanh_gate
dims K
state h[K], c[K]
input x[K]
c = tanh(c) + x
h = c * h + x
output o = h
"""


def test_refusals_without_spawning():
    """A state that is not affine and not a max-plus leading state is refused with the reason;
    a call before torch.distributed is initialised says what to do."""
    for text, reason in ((NOT_AFFINE, "state h is not affine"),
                         (SEQUENTIAL_LEAD, "leading state c is not max-plus")):
        rule = recdsl.compile(text)
        x = sample_inputs(rule, batch=1, time=4, heads=1, dims={"K": 4})
        with pytest.raises(BackendError, match=reason):
            rule(**x, cp_group=object())
    rule = RULES["gla"]()
    x = sample_inputs(rule, batch=1, time=4, heads=1, dims={"K": 4, "V": 4})
    with pytest.raises(InputError, match="not initialised.*init_process_group"):
        rule(**x, cp_group=object())


def _check_other_backends(rank, world):
    _check_rules(rank, world, ("gated_delta", "rwkv7"), [9, 7], "naive", torch.float32)
    _check_rules(rank, world, ("hgrn",), [40, 31], "torch-scan", torch.float32)


def test_two_ranks_other_backends():
    """Any backend works the same way: the naive loop (slices of 9 and 7 tokens), and the
    elementwise scan on a vector state (HGRN)."""
    _spawn(_check_other_backends, 2)
