"""Real ahead-of-time builds (no GPU) of the elementwise-scan kernels
(recdsl.codegen.scan_kernels.aot_module) for sm_80 and sm_90, inside a test session that runs
Triton interpreted (recdsl.codegen.aot builds in a fresh process then)."""
import os

import pytest

from recdsl.codegen import aot, scan_kernels


def test_aot_module_lists_forward_and_backward_per_block():
    module = scan_kernels.aot_module(300)
    assert module.kind == "scan" and module.filename == "scan_kernels.py"
    assert "def linear_scan_fwd(" in module.source and "def linear_scan_bwd(" in module.source
    assert [(k.name, k.constexprs["BLOCK_C"], k.num_warps) for k in module.kernels] == [
        ("linear_scan_fwd", 512, 4), ("linear_scan_bwd", 512, 4),
        ("linear_scan_fwd", 256, 2), ("linear_scan_bwd", 256, 2),
        ("linear_scan_fwd", 128, 1), ("linear_scan_bwd", 128, 1),
        ("linear_scan_fwd_chunked", 128, 8), ("linear_scan_bwd_chunked", 128, 8)]
    assert module.kernels[-1].constexprs == {"BLOCK_C": 128, "BLOCK_T": scan_kernels.CHUNK_TOKENS}
    assert module.kernels[1].arg_types == {
        "a_ptr": aot.DATA, "h0_ptr": aot.DATA, "h_ptr": "*fp32", "dh_ptr": "*fp32", "da_ptr": aot.DATA,
        "db_ptr": aot.DATA, "dh0_ptr": aot.DATA, "T": "i32", "C": "i32"}
    # few channels: one block, no wider than it needs
    assert [k.constexprs["BLOCK_C"] for k in scan_kernels.aot_module(40).kernels] == [128] * 4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_scan_kernels_build_without_spills(arch, dtype):
    assert os.environ.get("TRITON_INTERPRET") == "1"  # conftest: the build runs in a child
    builds = aot.build_module(scan_kernels.aot_module(300), aot.ARCHS[arch], dtype)
    assert [(b.kernel, b.num_warps) for b in builds] == [
        ("linear_scan_fwd", 4), ("linear_scan_bwd", 4), ("linear_scan_fwd", 2),
        ("linear_scan_bwd", 2), ("linear_scan_fwd", 1), ("linear_scan_bwd", 1),
        ("linear_scan_fwd_chunked", 8), ("linear_scan_bwd_chunked", 8)]
    for b in builds:
        assert b.source_of_figures == "ptxas log"
        assert (b.spill_stores, b.spill_loads, b.stack) == (0, 0, 0), b
        if b.kernel.endswith("_chunked"):  # tiles, and a scan across warps in shared memory
            assert 0 < b.registers <= 200 and b.shared <= 32 * 1024, b
        else:  # a one-vector loop: far below the 255 cap, no shared memory
            assert 0 < b.registers <= 64 and b.shared == 0, b
    assert aot.problems(builds, aot.ARCHS[arch]) == []
