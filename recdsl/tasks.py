"""Synthetic tasks for training tiny models: MQAR (associative recall) and S3 state tracking.

Each generator returns ``(inputs, targets)``, two ``[n, length]`` int64 tensors; a target of
``IGNORE`` (-100, PyTorch's ``ignore_index``) marks a position that is not scored.

* ``mqar``: multi-query associative recall after zoology (Arora et al. 2023): ``pairs``
  key-value pairs at the start (keys from ``1 .. vocab/2 - 1``, values from ``vocab/2 ..
  vocab - 1``, distinct within a sequence), then each key once more as a query; the target at
  a query is its value. Query slots are the even offsets after the pairs; the gap from the end
  of the pairs to a query (in slots) follows the power law ``p(g) ~ (g + 1) ** (power_a - 1)``,
  ``g = 0 .. (length - 2 * pairs) // 2 - 1``, drawn without replacement, so most queries come
  soon after the pairs and a few much later. Other positions hold random tokens (zoology's
  ``random_non_queries``; ``noise=False``: zeros); a sequence's own keys are mapped to 0
  there, so a key occurs only in its pair and its query.
* ``s3``: state tracking on the symmetric group S3 (as in DeltaProduct, Siems et al. 2025):
  the inputs are uniform random group elements (token ``i`` is ``S3_ELEMENTS[i]``), the target
  at each position the running product ``x_t o ... o x_1`` (the newest element applied last).
"""
from __future__ import annotations

import itertools

import torch

from .errors import RecdslError

IGNORE = -100
POWER_A = 0.01  # zoology's default: most of the mass on the first gaps

# the six permutations of (0, 1, 2); a permutation p maps i to p[i]
S3_ELEMENTS = tuple(itertools.permutations(range(3)))


def _compose_table() -> torch.Tensor:
    """``table[a, b]`` = index of ``a o b`` (b first, then a): ``(a o b)(i) = a[b[i]]``."""
    index = {p: i for i, p in enumerate(S3_ELEMENTS)}
    return torch.tensor([[index[tuple(a[b[i]] for i in range(3))] for b in S3_ELEMENTS]
                         for a in S3_ELEMENTS])


S3_TABLE = _compose_table()


def _positive(**values):
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RecdslError(f"{name} must be a positive whole number, not {value!r}")


def mqar_gap_probabilities(slots: int, power_a: float = POWER_A) -> torch.Tensor:
    """The power law over query gaps ``0 .. slots - 1`` (float64, sums to 1)."""
    g = torch.arange(1, slots + 1, dtype=torch.float64)
    p = g ** (power_a - 1)
    return p / p.sum()


def mqar(n: int, vocab: int = 64, length: int = 64, pairs: int = 8, power_a: float = POWER_A,
         noise: bool = True, generator: torch.Generator | None = None):
    """``n`` MQAR sequences (see the module docstring); returns ``(inputs, targets)``."""
    _positive(n=n, vocab=vocab, length=length, pairs=pairs)
    half = vocab // 2
    if pairs > half - 1:
        raise RecdslError(f"mqar: {pairs} pairs need {pairs} distinct keys but vocab {vocab} "
                          f"has only {half - 1} (keys are 1 .. vocab/2 - 1): raise vocab or "
                          f"lower pairs")
    slots = (length - 2 * pairs) // 2
    if slots < pairs:
        raise RecdslError(f"mqar: length {length} holds the {pairs} pairs ({2 * pairs} tokens) but "
                          f"only {max(slots, 0)} query slots for {pairs} queries: length must be "
                          f"at least {4 * pairs}")
    if not power_a > 0:
        raise RecdslError(f"mqar: power_a must be > 0, not {power_a}")
    keys = torch.rand(n, half - 1, generator=generator).argsort(-1)[:, :pairs] + 1
    values = torch.rand(n, vocab - half, generator=generator).argsort(-1)[:, :pairs] + half
    p = mqar_gap_probabilities(slots, power_a).expand(n, slots)
    gaps = torch.multinomial(p, pairs, replacement=False, generator=generator)

    inputs = torch.randint(0, vocab, (n, length), generator=generator)
    if not noise:
        inputs.zero_()
    own_key = (inputs[:, :, None] == keys[:, None, :]).any(-1)
    inputs[own_key] = 0
    inputs[:, 0:2 * pairs:2] = keys
    inputs[:, 1:2 * pairs:2] = values
    where = 2 * pairs + 2 * gaps
    inputs.scatter_(1, where, keys)
    targets = torch.full((n, length), IGNORE, dtype=torch.long)
    targets.scatter_(1, where, values)
    return inputs, targets


def s3(n: int, length: int = 32, generator: torch.Generator | None = None):
    """``n`` S3 sequences: random elements and their running products; ``(inputs, targets)``."""
    _positive(n=n, length=length)
    inputs = torch.randint(0, len(S3_ELEMENTS), (n, length), generator=generator)
    targets = torch.empty_like(inputs)
    product = inputs[:, 0]
    targets[:, 0] = product
    for t in range(1, length):
        product = S3_TABLE[inputs[:, t], product]
        targets[:, t] = product
    return inputs, targets
