"""backend="scan": the elementwise scan family with the scan itself in Triton
(``scan_triton.linear_scan``, one program per sequence and block of channels); the prologue
and the epilogue are torch-scan's (``torch_scan``), so both backends run the same algebra."""
from __future__ import annotations

from typing import Optional

from . import scan_triton, torch_scan
from .recurrent import check_device


def problem(rule) -> Optional[str]:
    return torch_scan.problem(rule)


def _triton_scan(a, b, h0):
    """``scan_core.linear_scan``'s contract (``a`` broadcasting against ``b [B, T, *rest]``) on
    the kernels' flat layout ``[N, T, C]``."""
    B, T = b.shape[:2]
    a = a.expand(b.shape).reshape(B, T, -1)
    h = scan_triton.linear_scan(a, b.reshape(B, T, -1), h0.reshape(B, -1))
    return h.reshape(b.shape).to(b.dtype)


def run(rule, call):
    check_device(call.device, "scan")
    return torch_scan.run(rule, call, scan=_triton_scan)
