"""The thread policy of the CPU backends (torch-chunk, torch-scan, naive).

Their work is thousands of small ops per call (a 64 x 64 ``baddbmm`` per chunk and head, ...).
With several intra-op threads each op ends in an OpenMP barrier; on a machine whose cores other
processes share, a barrier waits for a descheduled thread and a 10 us op takes milliseconds
(one call measured 0.13 s quiet, 31.5 s busy). With one thread there is no barrier to miss.
``benchmarks/bench_contention.py`` measures the policies; the README ("Threads on the CPU")
has the table behind the default.

The default: one intra-op thread for the duration of a CPU call. ``RECDSL_CPU_THREADS``
overrides it: an int (the thread count, >= 1) or "torch" (leave torch's setting alone). The
setting is read at each call.

``torch.set_num_threads`` is process-global: while a call runs, every thread of the process
(other Python threads calling torch at the same moment, a concurrent recdsl call) sees the
policy's count, and the caller's count comes back when the outermost call ends. Concurrent
calls from several Python threads share the setting; a lock makes the save/set/restore of
overlapping calls consistent (the last to finish restores the count from before the first).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

ENV = "RECDSL_CPU_THREADS"
DEFAULT_THREADS = 1  # measured: benchmarks/bench_contention.py, README "Threads on the CPU"

_lock = threading.Lock()
_depth = 0  # calls inside the policy now, all Python threads together
_saved = None  # the count from before the outermost one


def policy_threads():
    """The intra-op thread count for a CPU call: an int, or None to leave torch's alone."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return DEFAULT_THREADS
    if value.lower() == "torch":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV} must be a positive int or 'torch'; got {value!r}")
    return n


@contextlib.contextmanager
def cpu_threads(threads="policy"):
    """Run the body with ``threads`` intra-op threads ("policy": ``policy_threads()``; None:
    as they are), restoring the caller's count afterwards, also on an exception. Re-entrant
    (a staged rule's call runs its derived rule's call inside)."""
    global _depth, _saved
    n = policy_threads() if threads == "policy" else threads
    if n is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = torch.get_num_threads()
        _depth += 1
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and torch.get_num_threads() != _saved:
                torch.set_num_threads(_saved)


def on_cpu(run):
    """``run(rule, call)`` under the policy."""
    @functools.wraps(run)
    def wrapped(rule, call):
        with cpu_threads():
            return run(rule, call)
    return wrapped
