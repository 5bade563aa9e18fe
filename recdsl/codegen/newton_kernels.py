"""Fixed Triton kernels of the newton backend's linear solves: ``h_t = A_t h_{t-1} + c_t`` with a
k x k matrix ``A_t`` per token and channel (a block-diagonal or dense Jacobian).

Not generated per rule: the backend (``recdsl.runtime.newton``) lays its solves out as ``A``
``[N, T, M, K, K]``, ``c`` ``[N, T, M, K]`` and ``h0`` ``[N, M, K]`` (N sequences, M
independent channels: heads times the channels of a block-diagonal Jacobian, or the heads
alone for a dense one) and gets every ``h_t`` back, ``[N, T, M, K]``. The launch is
``recdsl.runtime.newton_triton.solve``; a diagonal Jacobian goes to the elementwise scan of
``recdsl.codegen.scan_kernels`` instead. No backward kernel: the backend's backward is the
same recurrence in the transposed matrices, solved by these kernels again.

Layout of the work (as the elementwise scan's): a sequential loop over T inside each program,
the state carried from token to token; programs never talk to each other.

- ``block_solve``, narrow blocks (K up to ``BLOCK_MAX``, padded to a power of two KP): one
  program per (sequence, block of ``BLOCK_M`` channels); the state ``[BLOCK_M, KP]`` stays in
  registers and each token is one ``[BLOCK_M, KP, KP]`` load of ``A`` and a batched
  matrix-vector product. ``BLOCK_M * KP * KP`` is at most ``TILE`` (about 16 values of ``A``
  per thread at 4 warps), so registers do not grow with K.
- ``tiled_solve``, wide blocks and dense matrices (K up to 256 and beyond: an LSTM's 2D at
  D = 128): one program per (sequence, channel); a token's product is ``BLOCK_R`` rows of
  ``A`` at a time (``BLOCK_R * KP`` values, at most ``TILE``), each block of new entries stored
  as it is done. The next token needs the whole new state in every thread, so after the row
  loop a barrier (stores visible to the program's threads) and one reload of ``h_t``.

Arithmetic is in the element type of ``h`` (fp32, or fp64 for fp64 inputs): inputs are
converted on load. Offsets are int64, so ``N * T * M * K * K`` may pass 2**31. K is a
constexpr: a rule has one block width, so masks and offsets fold at compile time.

The file is self-contained (only ``triton`` imports at module level): ``aot_module`` hands
its text to ``recdsl.codegen.aot``, which imports a copy from a temporary folder.
"""
from __future__ import annotations

import triton
import triton.language as tl

# K up to this runs block_solve (the state in registers); wider runs tiled_solve
BLOCK_MAX = 16
# values of A a program holds per step (both kernels): 16 a thread at 4 warps (32 at fp64's
# two registers each), so neither spills whatever K is
TILE = 2048
# narrow the channel block of block_solve until a launch has about this many programs (2 per
# SM of an H100: each program's loop is latency-bound; not tuned on a GPU), down to blocks of
# MIN_VALUES values of A (one warp, 4 a thread)
TARGET_PROGRAMS = 264
MIN_VALUES = 128


@triton.jit
def block_solve(a_ptr, c_ptr, h0_ptr, h_ptr, T, M, K: tl.constexpr, KP: tl.constexpr,
                BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    blocks = tl.cdiv(M, BLOCK_M)
    seq = (pid // blocks).to(tl.int64)
    ch = (pid % blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    i = tl.arange(0, KP)  # the row of A (the new entry)
    j = tl.arange(0, KP)  # the column of A (the previous entry)
    vec_mask = (ch < M)[:, None] & (i < K)[None, :]
    mat_mask = vec_mask[:, :, None] & (j < K)[None, None, :]
    acc = h_ptr.dtype.element_ty
    rows = seq * M + ch  # [BLOCK_M] (sequence, channel) rows of h0
    state = tl.load(h0_ptr + rows[:, None] * K + j[None, :], mask=vec_mask, other=0.0).to(acc)
    for t in range(T):
        # from the token index, not a carried offset: the compiler then sees aligned offsets
        base = (seq * T + tl.cast(t, tl.int64)) * M + ch  # [BLOCK_M] rows of token t
        a = tl.load(a_ptr + (base * (K * K))[:, None, None] + (i * K)[None, :, None] + j[None, None, :],
                    mask=mat_mask, other=0.0).to(acc)
        offs = (base * K)[:, None] + i[None, :]
        c = tl.load(c_ptr + offs, mask=vec_mask, other=0.0).to(acc)
        state = tl.sum(a * state[:, None, :], 2) + c  # padded rows: 0 (A and c masked to 0)
        tl.store(h_ptr + offs, state, mask=vec_mask)


@triton.jit
def tiled_solve(a_ptr, c_ptr, h0_ptr, h_ptr, T, M, K: tl.constexpr, KP: tl.constexpr,
                BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    seq = (pid // M).to(tl.int64)
    ch = pid % M
    j = tl.arange(0, KP)
    r = tl.arange(0, BLOCK_R)
    acc = h_ptr.dtype.element_ty
    state = tl.load(h0_ptr + (seq * M + ch) * K + j, mask=j < K, other=0.0).to(acc)
    for t in range(T):
        base = (seq * T + tl.cast(t, tl.int64)) * M + ch  # the (token, channel) row
        for r0 in range(0, K, BLOCK_R):
            rows = r0 + r
            m = rows < K
            a = tl.load(a_ptr + base * (K * K) + (rows * K)[:, None] + j[None, :],
                        mask=m[:, None] & (j < K)[None, :], other=0.0).to(acc)
            c = tl.load(c_ptr + base * K + rows, mask=m, other=0.0).to(acc)
            tl.store(h_ptr + base * K + rows, tl.sum(a * state[None, :], 1) + c, mask=m)
        # every thread needs all of h_t: the stores above visible to the program, then reload
        tl.debug_barrier()
        state = tl.load(h_ptr + base * K + j, mask=j < K, other=0.0).to(acc)


def padded(k: int) -> int:
    return triton.next_power_of_2(max(1, k))


def block_choices(k: int) -> list:
    """The channel blocks (BLOCK_M) ``launch_config`` may pick for block_solve at width k,
    widest first."""
    per_channel = padded(k) ** 2
    widest = max(1, TILE // per_channel)
    return [widest >> n for n in range(widest.bit_length())
            if n == 0 or (widest >> n) * per_channel >= MIN_VALUES]


def warps(values: int) -> int:
    """num_warps for a program holding ``values`` of A a step: 16 a thread, 1 to 4 warps."""
    return max(1, min(4, values // (16 * 32)))


def launch_config(sequences: int, channels: int, k: int) -> tuple:
    """(kernel name, its block constexprs, num_warps) of a solve over ``sequences`` x
    ``channels`` blocks of width ``k``. block_solve takes the widest channel block that
    still gives about TARGET_PROGRAMS programs (else the narrowest choice); tiled_solve
    runs one program per (sequence, channel) and BLOCK_R rows a step."""
    kp = padded(k)
    if k <= BLOCK_MAX:
        choices = block_choices(k)
        block = next((b for b in choices if sequences * triton.cdiv(channels, b) >= TARGET_PROGRAMS),
                     choices[-1])
        return "block_solve", {"KP": kp, "BLOCK_M": block}, warps(block * kp * kp)
    rows = max(1, min(kp, TILE // kp))
    return "tiled_solve", {"KP": kp, "BLOCK_R": rows}, warps(rows * kp)


def aot_module(widths):
    """The solve kernels as ``recdsl.codegen.aot.build_module`` builds them, for each block
    width k in ``widths``: every channel block block_solve may pick (the report does not know
    the number of sequences), or tiled_solve's one configuration. ``A``, ``c`` and ``h0`` are
    in the caller's dtype, the states fp32."""
    from pathlib import Path

    from .aot import DATA, GeneratedModule, KernelEntry
    types = {"a_ptr": DATA, "c_ptr": DATA, "h0_ptr": DATA, "h_ptr": "*fp32", "T": "i32", "M": "i32"}
    kernels = []
    for k in widths:
        kp = padded(k)
        if k <= BLOCK_MAX:
            configs = [("block_solve", {"KP": kp, "BLOCK_M": b}, warps(b * kp * kp), f"BLOCK_M={b}")
                       for b in block_choices(k)]
        else:
            name, blocks, num_warps = launch_config(1, 1, k)
            configs = [(name, blocks, num_warps, f"BLOCK_R={blocks['BLOCK_R']}")]
        for name, blocks, num_warps, variant in configs:
            kernels.append(KernelEntry(name, dict(types), {"K": k, **blocks}, num_warps,
                                       variant=f"k={k}, {variant}"))
    return GeneratedModule("newton", "newton_kernels.py", Path(__file__).read_text(), kernels)
