"""The precision of the chunk kernels' matrix products (``tl.dot``): one policy per call.

A product's operands may be rounded before the multiply; the sum is always fp32. How far a
rounding error travels depends on what the product computes, so the products fall into four
classes and a policy gives each its operand format:

``read``   the forward's products that make the outputs (``Q S``, ``Q Kᵀ``, ``P Δ``): the
           outputs are rounded to the inputs' dtype anyway, and TESTING.md allows a backend
           twice the naive loop's error in half types, which is about that one rounding. Half
           operands here round q, k, P and Δ as well: measured 2.1x to 2.4x under the
           interpreter (gated_delta, fp16), over the bound. So the default keeps them accurate.
``chunk``  the backward's products inside a chunk (the gradients of the chunk's tokens): an
           error there stays where it was made. fla feeds these half operands when the inputs
           are half, and so do we.
``state``  products with a state or state gradient as an operand, or that carry it from one
           chunk to the next (``W S``, ``Kᵀ Δ``, ``dO S0ᵀ``, the walk back): the states are
           fp32 (a state can outgrow fp16's range) and every later chunk inherits the error.
``solve``  products with the WY/UT inverse ``T = (I + M)^{-1}`` (``T B``, ``T U``, ``Tᵀ dΔ``):
           T's entries grow with the chunk, and a rounded operand is multiplied by them. The
           solve itself runs in fp32 registers, and ``K Kᵀ`` entering it is ieee, always.

Operand formats: "ieee" (fp32 FMA: exact fp32, no tensor cores), "tf32x3" (three tf32 passes:
fp32-accurate, on tensor cores), "tf32" (one pass: a 10-bit mantissa), "fp16" and "bf16"
(operands rounded to half, fp32 accumulation: one tensor-core pass on half the registers).

Policies (``rule(..., precision=NAME)``), formats of (read, chunk, state, solve):

``auto``    by the inputs' dtype: fp32/fp64 -> ``tf32x3``; fp16/bf16 -> ``mixed``
``ieee``    ieee everywhere (slow; the reference for the others)
``tf32x3``  tf32x3 everywhere
``tf32``    tf32, the solve's tf32x3
``mixed``   half for the chunk class, tf32x3 for the others
``half``    half for all but the solve (fla's choice), the solve's tf32x3

"Half" is the inputs' dtype when it is fp16 or bf16, else bf16 (fp32's range: a state that
outgrows fp16's 65504 stays finite). Under the Triton interpreter tf32 formats are ieee (it
ignores them and computes exactly) and bf16 is ieee too: its bf16 dots are wrong (TESTING.md),
so bf16 is for ``benchmarks/gpu_check.py`` to verify on a GPU; fp16 is what it can test.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError

CLASSES = ("read", "chunk", "state", "solve")
HALF = "half"  # a class's format before the half dtype is known

# policy -> formats of CLASSES; "auto" is chosen by dtype in ``resolve``
POLICIES = {
    "ieee": ("ieee", "ieee", "ieee", "ieee"),
    "tf32x3": ("tf32x3", "tf32x3", "tf32x3", "tf32x3"),
    "tf32": ("tf32", "tf32", "tf32", "tf32x3"),
    "mixed": ("tf32x3", HALF, "tf32x3", "tf32x3"),
    "half": (HALF, HALF, HALF, "tf32x3"),
}
NAMES = ("auto",) + tuple(POLICIES)

_HALF_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Precision:
    """The operand format of each class of products, as the kernels' constexprs take it."""
    policy: str
    read: str
    chunk: str
    state: str
    solve: str

    def describe(self, classes=CLASSES) -> str:
        """e.g. "chunk fp16, state tf32x3" for the classes a kernel has."""
        return ", ".join(f"{c} {getattr(self, c)}" for c in classes)


def check(policy) -> str:
    """``policy`` if it names one, else an error that lists the names."""
    if not isinstance(policy, str) or policy not in NAMES:
        raise InputError(f"precision={policy!r} is not a precision policy; use one of: "
                         + ", ".join(repr(n) for n in NAMES)
                         + " (see recdsl.codegen.precision)")
    return policy


def resolve(policy: str, dtype: torch.dtype, interpreted: bool) -> Precision:
    """The formats of ``policy`` for inputs of ``dtype``, on a GPU or (``interpreted``) under
    the Triton interpreter."""
    check(policy)
    half = _HALF_DTYPES.get(dtype)
    if policy == "auto":
        policy = "mixed" if half else "tf32x3"
    formats = [(half or "bf16") if f == HALF else f for f in POLICIES[policy]]
    if interpreted:
        formats = ["ieee" if f in ("tf32", "tf32x3", "bf16") else f for f in formats]
    return Precision(policy, *formats)


def for_call(call, interpreted: bool) -> Precision:
    """The precision of a bound call: its ``precision`` policy for its inputs' dtype."""
    return resolve(call.precision, call.output_dtype, interpreted)


# The kernels' product, by format (a constexpr): its text is spliced into generated kernel
# modules; ``recdsl/codegen/chunk_delta.py`` holds the same function (a test keeps them equal).
DOT_HELPER = '''
@triton.jit
def _dot(a, b, P: tl.constexpr):
    """a @ b with fp32 accumulation, operands in format P (see recdsl.codegen.precision)."""
    if P == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
    elif P == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    else:
        return tl.dot(a, b, input_precision=P)
'''
