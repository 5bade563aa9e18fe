"""Fixed Triton kernels of the elementwise-scan family: h_t = a_t * h_{t-1} + b_t per channel.

Not generated per rule: a rule of the family reaches these kernels with its state flattened
into channels (``C`` = every entry of the state), its per-token multipliers ``a`` and writes
``b`` laid out ``[N, T, C]`` (N sequences) and its initial state ``[N, C]``. The autograd
wrapper is ``recdsl.runtime.scan_triton.linear_scan``.

Layout of the work (as Mamba's selective scan): one program per (sequence, block of
``BLOCK_C`` channels), a sequential loop over the tokens inside it. Channels are independent,
so programs never talk to each other; the loop carries one state vector in registers.

- forward: ``h_t = a_t * h_{t-1} + b_t`` from ``h_{-1} = h0``; every state is stored;
- backward, tokens in reverse: ``g_t = dh_t + a_{t+1} g_{t+1}``, ``db_t = g_t``,
  ``da_t = g_t * h_{t-1}`` (the forward's stored states), ``dh0 = a_0 g_0``.

Each loop step waits on memory, so a GPU needs many programs in flight. When a launch has
few (``launch_config``: small N * C), the ``_chunked`` kernels take ``BLOCK_T`` tokens a
step instead: one ``[BLOCK_T, BLOCK_C]`` load per tensor, a ``tl.associative_scan`` over the
tile's tokens (combine ``(a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2)``), then the carried state
applied: ``h = A * state + B``. The backward's tile holds its tokens in reverse order, so
the same forward scan runs the reverse recurrence (no reliance on ``reverse=True``).

Arithmetic is in the element type of ``h`` (fp32, or fp64 for fp64 inputs): inputs are
converted on load, gradients converted to their tensor's type on store. Offsets are int64
(``(n * T + t) * C + c``), so ``N * T * C`` may pass 2**31.

The file is self-contained (only ``triton`` imports at module level): ``aot_module`` hands
its text to ``recdsl.codegen.aot``, which imports a copy from a temporary folder.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Channel blocks a launch may pick, widest first; num_warps = BLOCK_C // 128 gives every
# thread 4 consecutive channels (one 16-byte load of fp32 per token and tensor).
BLOCKS = (512, 256, 128)
# Narrow the block until a launch has about this many programs (2 per SM of an H100): each
# program's loop is latency-bound, so a GPU needs many of them in flight. Not tuned on a GPU.
TARGET_PROGRAMS = 264
# Tokens a step of the chunked kernels (a power of two); 1 turns them off.
CHUNK_TOKENS = 16
# 8 warps: a [16, 128] tile is 8 values a thread per tensor; 4 warps put the backward at
# about 250 registers (sm_80, sm_90).
CHUNK_WARPS = 8


@triton.jit
def linear_scan_fwd(a_ptr, b_ptr, h0_ptr, h_ptr, T, C, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    blocks = tl.cdiv(C, BLOCK_C)
    seq = (pid // blocks).to(tl.int64)
    cols = (pid % blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    acc = h_ptr.dtype.element_ty
    state = tl.load(h0_ptr + seq * C + cols, mask=mask, other=0.0).to(acc)
    for t in range(T):
        # from the token index, not a carried offset: when C % 16 == 0 (a launch specialises
        # on it) the compiler then sees aligned offsets and vectorises the loads
        offs = (seq * T + tl.cast(t, tl.int64)) * C + cols
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(acc)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(acc)
        state = a * state + b
        tl.store(h_ptr + offs, state, mask=mask)


@triton.jit
def linear_scan_bwd(a_ptr, h0_ptr, h_ptr, dh_ptr, da_ptr, db_ptr, dh0_ptr, T, C,
                    BLOCK_C: tl.constexpr):
    # T >= 1 (the wrapper does not launch for T == 0)
    pid = tl.program_id(0)
    blocks = tl.cdiv(C, BLOCK_C)
    seq = (pid // blocks).to(tl.int64)
    cols = (pid % blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    acc = h_ptr.dtype.element_ty
    carry = tl.zeros([BLOCK_C], dtype=acc)  # a_{t+1} * g_{t+1}
    for i in range(T - 1):  # t = T-1 down to 1: h_{t-1} is a stored state
        offs = (seq * T + T - 1 - tl.cast(i, tl.int64)) * C + cols  # token t, as in the forward
        g = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(acc) + carry
        h_prev = tl.load(h_ptr + offs - C, mask=mask, other=0.0).to(acc)
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(acc)
        tl.store(db_ptr + offs, g, mask=mask)
        tl.store(da_ptr + offs, g * h_prev, mask=mask)
        carry = a * g
    # t = 0: h_{-1} is the initial state, and a_0 g_0 is its gradient
    offs = seq * T * C + cols
    g = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(acc) + carry
    h_prev = tl.load(h0_ptr + seq * C + cols, mask=mask, other=0.0).to(acc)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(acc)
    tl.store(db_ptr + offs, g, mask=mask)
    tl.store(da_ptr + offs, g * h_prev, mask=mask)
    tl.store(dh0_ptr + seq * C + cols, a * g, mask=mask)


@triton.jit
def _then(a1, b1, a2, b2):
    # step (a1, b1) then step (a2, b2): h -> a2 * (a1 * h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def linear_scan_fwd_chunked(a_ptr, b_ptr, h0_ptr, h_ptr, T, C, BLOCK_C: tl.constexpr,
                            BLOCK_T: tl.constexpr):
    # As linear_scan_fwd, BLOCK_T tokens a step: one [BLOCK_T, BLOCK_C] load per tensor and a
    # scan over the tile's tokens, so each step waits for memory once for BLOCK_T tokens
    pid = tl.program_id(0)
    blocks = tl.cdiv(C, BLOCK_C)
    seq = (pid // blocks).to(tl.int64)
    cols = (pid % blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    rows = tl.arange(0, BLOCK_T)
    acc = h_ptr.dtype.element_ty
    state = tl.load(h0_ptr + seq * C + cols, mask=mask, other=0.0).to(acc)
    for t0 in range(0, T, BLOCK_T):
        tok = tl.cast(t0, tl.int64) + rows
        m = (tok < T)[:, None] & mask[None, :]
        offs = (seq * T + tok)[:, None] * C + cols[None, :]
        a = tl.load(a_ptr + offs, mask=m, other=0.0).to(acc)
        b = tl.load(b_ptr + offs, mask=m, other=0.0).to(acc)
        prod, part = tl.associative_scan((a, b), 0, _then)  # the tile's steps from a zero state
        h = prod * state[None, :] + part
        tl.store(h_ptr + offs, h, mask=m)
        state = tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, h, 0.0), 0)  # the tile's last row


@triton.jit
def linear_scan_bwd_chunked(a_ptr, h0_ptr, h_ptr, dh_ptr, da_ptr, db_ptr, dh0_ptr, T, C,
                            BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    # As linear_scan_bwd, BLOCK_T tokens a step. Row r of a tile is token t0 + BLOCK_T-1 - r
    # (tokens reversed), so a forward scan over rows runs g_t = a_{t+1} g_{t+1} + dh_t.
    # T >= 1 (the wrapper does not launch for T == 0)
    pid = tl.program_id(0)
    blocks = tl.cdiv(C, BLOCK_C)
    seq = (pid // blocks).to(tl.int64)
    cols = (pid % blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    rows = tl.arange(0, BLOCK_T)
    acc = h_ptr.dtype.element_ty
    h0 = tl.load(h0_ptr + seq * C + cols, mask=mask, other=0.0).to(acc)
    carry = tl.zeros([BLOCK_C], dtype=acc)  # g of the first token of the later tile (0 past T)
    tiles = tl.cdiv(T, BLOCK_T)
    for i in range(tiles):
        tok = (tiles - 1 - tl.cast(i, tl.int64)) * BLOCK_T + (BLOCK_T - 1 - rows)
        m = (tok < T)[:, None] & mask[None, :]
        offs = (seq * T + tok)[:, None] * C + cols[None, :]
        dh = tl.load(dh_ptr + offs, mask=m, other=0.0).to(acc)
        # a_{t+1}: 0 for the last token, whose g is its dh alone
        a_next = tl.load(a_ptr + offs + C, mask=(tok + 1 < T)[:, None] & mask[None, :], other=0.0).to(acc)
        prod, part = tl.associative_scan((a_next, dh), 0, _then)
        g = prod * carry[None, :] + part
        h_prev = tl.load(h_ptr + offs - C, mask=(tok >= 1)[:, None] & m, other=0.0).to(acc)
        h_prev = tl.where((tok == 0)[:, None], h0[None, :], h_prev)
        tl.store(db_ptr + offs, g, mask=m)
        tl.store(da_ptr + offs, g * h_prev, mask=m)
        carry = tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, g, 0.0), 0)  # g at token t0
    # carry is g_0 now
    a0 = tl.load(a_ptr + seq * T * C + cols, mask=mask, other=0.0).to(acc)
    tl.store(dh0_ptr + seq * C + cols, a0 * carry, mask=mask)


# Under the interpreter tl.associative_scan runs element by element (a 300-channel scan of 130
# tokens takes 45 s): the one-token kernels run there unless a test of the chunked ones asks.
INTERPRETED_CHUNKS = False


def launch_config(sequences: int, channels: int, interpreted: bool = False) -> tuple:
    """(BLOCK_C, num_warps, BLOCK_T) of a launch over ``sequences`` x ``channels``: the widest
    block, not wider than the channels need, that still gives about TARGET_PROGRAMS programs
    of the one-token kernels (BLOCK_T == 1); when even 128 channels a program give fewer, the
    chunked kernels, CHUNK_TOKENS tokens a step (few programs must each keep more loads in
    flight)."""
    for block in block_choices(channels):
        if sequences * triton.cdiv(channels, block) >= TARGET_PROGRAMS:
            return block, block // 128, 1
    if CHUNK_TOKENS > 1 and (INTERPRETED_CHUNKS or not interpreted):
        return BLOCKS[-1], CHUNK_WARPS, CHUNK_TOKENS
    return BLOCKS[-1], 1, 1


def block_choices(channels: int) -> list:
    """The blocks ``launch_config`` may pick for ``channels``, whatever the sequence count."""
    cap = max(BLOCKS[-1], triton.next_power_of_2(max(1, channels)))
    return [block for block in BLOCKS if block <= cap]


def aot_module(channels: int):
    """The scan kernels as ``recdsl.codegen.aot.build_module`` builds them: the one-token
    forward and backward for every channel block a launch may pick for ``channels`` (the
    report does not know the number of sequences), then the chunked pair. Inputs and their
    gradients are in the caller's dtype, the states and their gradient fp32."""
    from pathlib import Path

    from .aot import DATA, GeneratedModule, KernelEntry
    fwd_types = {"a_ptr": DATA, "b_ptr": DATA, "h0_ptr": DATA, "h_ptr": "*fp32", "T": "i32", "C": "i32"}
    bwd_types = {"a_ptr": DATA, "h0_ptr": DATA, "h_ptr": "*fp32", "dh_ptr": "*fp32", "da_ptr": DATA,
                 "db_ptr": DATA, "dh0_ptr": DATA, "T": "i32", "C": "i32"}
    configs = [(block, block // 128, 1) for block in block_choices(channels)]
    configs += [(BLOCKS[-1], CHUNK_WARPS, CHUNK_TOKENS)] if CHUNK_TOKENS > 1 else []
    kernels = []
    for block, warps, tokens in configs:
        chunked = "_chunked" if tokens > 1 else ""
        constexprs = {"BLOCK_C": block} | ({"BLOCK_T": tokens} if tokens > 1 else {})
        variant = f"C={channels}, BLOCK_C={block}" + (f", BLOCK_T={tokens}" if tokens > 1 else "")
        kernels += [KernelEntry(f"linear_scan_fwd{chunked}", dict(fwd_types), dict(constexprs), warps,
                                variant=f"{variant} forward"),
                    KernelEntry(f"linear_scan_bwd{chunked}", dict(bwd_types), dict(constexprs), warps,
                                variant=f"{variant} backward")]
    return GeneratedModule("scan", "scan_kernels.py", Path(__file__).read_text(), kernels)
