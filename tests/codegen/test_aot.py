"""`recdsl compile`: the exported sources (headers, runnable token programs) and the
ahead-of-time build report (real Triton builds for sm_90 without a GPU, under the test
session's TRITON_INTERPRET=1), plus the parsers of the ptxas and cuobjdump outputs."""
import argparse
import ast as pyast
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl.codegen import aot, export
from recdsl.errors import RecdslError
from recdsl.ir.ssa import lower

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(ROOT.joinpath("examples").glob("*.rec"))


def _args(*argv):
    parser = argparse.ArgumentParser(prog="recdsl compile")
    export.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(f"exported_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------- parsers, on captured output

# ptxas 13.4 (Triton's ptxas-blackwell) on a generated sm_90 backward with num_warps 4: spills
PTXAS_SM90 = """\
ptxas-blackwell info    : 11 bytes gmem
ptxas-blackwell info    : Compiling entry function 'rule_gated_delta_recurrent_bwd' for 'sm_90a'
ptxas-blackwell info    : Function properties for rule_gated_delta_recurrent_bwd
    440 bytes stack frame, 512 bytes spill stores, 584 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers, 440 bytes cumulative stack size
ptxas-blackwell info    : Compile time = 2704.236 ms
ptxas-blackwell info    : 11 bytes gmem
ptxas-blackwell info    : Compiling entry function 'rule_gated_delta_recurrent_fwd' for 'sm_90a'
ptxas-blackwell info    : Function properties for rule_gated_delta_recurrent_fwd
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 142 registers, used 1 barriers
ptxas-blackwell info    : Compile time = 191.976 ms
"""

# ptxas 12.9 (Triton's ptxas for sm_80): the same figures, a different last line
PTXAS_SM80 = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function 'rule_kla_recurrent_fwd' for 'sm_80'
ptxas info    : Function properties for rule_kla_recurrent_fwd
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, 8 bytes cumulative stack size, 488 bytes cmem[0]
"""

# cuobjdump --dump-resource-usage on the cubin of the sm_90 backward above
CUOBJDUMP = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function rule_gated_delta_recurrent_bwd:
  REG:255 STACK:440 SHARED:1024 LOCAL:0 CONSTANT[0]:688 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_ptxas_log_sm90():
    usage = aot.parse_ptxas_log(PTXAS_SM90)
    assert set(usage) == {"rule_gated_delta_recurrent_bwd", "rule_gated_delta_recurrent_fwd"}
    bwd = usage["rule_gated_delta_recurrent_bwd"]
    assert (bwd.registers, bwd.stack, bwd.spill_stores, bwd.spill_loads) == (255, 440, 512, 584)
    fwd = usage["rule_gated_delta_recurrent_fwd"]
    assert (fwd.registers, fwd.stack, fwd.spill_stores, fwd.spill_loads) == (142, 0, 0, 0)


def test_parse_ptxas_log_sm80():
    usage = aot.parse_ptxas_log(PTXAS_SM80)["rule_kla_recurrent_fwd"]
    assert (usage.registers, usage.stack, usage.spill_stores, usage.spill_loads) == (168, 8, 4, 12)


def test_parse_ptxas_log_without_functions():
    assert aot.parse_ptxas_log("ptxas info    : 11 bytes gmem\n") == {}


def test_parse_cuobjdump_resource_usage():
    usage = aot.parse_resource_usage(CUOBJDUMP)
    assert list(usage) == ["rule_gated_delta_recurrent_bwd"]
    u = usage["rule_gated_delta_recurrent_bwd"]
    assert (u.registers, u.stack, u.static_shared, u.spill_stores) == (255, 440, 1024, None)


# ----------------------------------------------------------------- verdicts


def _build(**changes):
    fields = dict(kernel="k_bwd", kind="recurrent", num_warps=8, registers=200, spill_stores=0,
                  spill_loads=0, stack=0, shared=2048, seconds=1.0, source_of_figures="ptxas log")
    fields.update(changes)
    return aot.KernelBuild(**fields)


def test_problems_name_spills_and_shared_memory():
    sm90, sm80 = aot.ARCHS["sm_90"], aot.ARCHS["sm_80"]
    assert aot.problems([_build()], sm90) == []
    assert aot.problems([_build(spill_stores=16, spill_loads=24, stack=8, registers=255)], sm90) == [
        "k_bwd spills registers to local memory on sm_90: 16 bytes stored, 24 bytes loaded, "
        "8 bytes stack frame (registers 255, num_warps 8)"]
    # 200 KiB fits an H100 (227 KiB) but not an A100 (163 KiB)
    big = _build(shared=200 * 1024)
    assert aot.problems([big], sm90) == []
    assert aot.problems([big], sm80) == ["k_bwd needs 200.0 KiB of shared memory; sm_80 has 163 KiB"]
    # figures from cuobjdump: a stack frame is taken as spilling (it does not say how much)
    assert len(aot.problems([_build(stack=16, source_of_figures="cuobjdump")], sm90)) == 1


def test_a_spilling_kernel_makes_the_command_exit_1(monkeypatch, capsys):
    def fake_build(module, arch, dtype="float32", progress=None):
        return [_build(kernel=k.name, num_warps=k.num_warps, variant=k.variant,
                       spill_stores=8 if "bwd" in k.name else 0)
                for k in module.kernels]
    monkeypatch.setattr(aot, "build_module", fake_build)
    code = export.command(_args(ROOT / "examples/gla.rec", "--arch", "sm_90", "--report"))
    out, err = capsys.readouterr()
    assert code == 1
    assert "rule_gla_recurrent_fwd" in out and "rule_gla_recurrent_bwd" in out
    assert "8 (8+0)" in out
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors[0] == ("error: rule_gla_recurrent_bwd spills registers to local memory on "
                         "sm_90: 8 bytes stored, 0 bytes loaded, 0 bytes stack frame "
                         "(registers 200, num_warps 8)")
    # the chunk kernels are built too; a kernel built in two variants is named with its variant
    assert [e.split(" spills")[0] for e in errors[1:6]] == [
        "error: rule_gla_stage0_bwd", "error: chunk_bwd_dh",
        "error: chunk_bwd_x [pass 0 (K x V) backward: u]",
        "error: chunk_bwd_x [pass 0 (K x V) backward: kx]", "error: chunk_bwd_y"]
    # gla's transition is elementwise too: the scan kernels are built as well
    assert errors[6:] and all(e.startswith("error: linear_scan_bwd") for e in errors[6:])


# ----------------------------------------------------------------- dims and usage errors


def test_default_dims():
    assert export.default_dims(recdsl.load(ROOT / "examples/gated_delta.rec").ir) == {"K": 64, "V": 64}
    # NH is the dim a `for` loop runs over
    assert export.default_dims(recdsl.load(ROOT / "examples/deltaproduct.rec").ir) == {"K": 64, "V": 64, "NH": 2}
    raven = recdsl.load(ROOT / "examples/raven.rec").ir
    assert export.default_dims(raven, {"K": 128, "V": 128}) == {"M": 64, "K": 128, "V": 128}
    with pytest.raises(RecdslError, match=r"^rule 'raven' has no dim 'N'; its dims are: M, K, V$"):
        export.default_dims(raven, {"N": 3})


def test_usage_errors():
    with pytest.raises(RecdslError, match="^nothing to do: give -o DIR"):
        export.command(_args(ROOT / "examples/gla.rec"))
    with pytest.raises(RecdslError, match=r"^--report needs --arch sm_80 or sm_90$"):
        export.command(_args(ROOT / "examples/gla.rec", "-o", "x", "--report"))
    with pytest.raises(SystemExit):  # argparse: a usage error
        _args(ROOT / "examples/gla.rec", "--dims", "K=0")


# ----------------------------------------------------------------- the exported files


def test_export_writes_readable_files_with_headers(tmp_path, capsys):
    code = export.command(_args(ROOT / "examples/raven.rec", "-o", tmp_path / "out", "--dims", "K=32,V=16"))
    assert code == 0
    kernels, programs = tmp_path / "out/raven_recurrent.py", tmp_path / "out/raven_token_torch.py"
    chunk = [tmp_path / "out/raven_chunk_diagonal_prologue.py", tmp_path / "out/chunk_diagonal.py"]
    scan = tmp_path / "out/scan_kernels.py"  # Raven's transitions are elementwise too
    written = [kernels, *chunk, scan, programs]
    assert capsys.readouterr().out.splitlines() == [f"wrote {path}" for path in written]
    for path in written:
        text = path.read_text()
        lines = text.splitlines()
        assert lines[0].endswith(f"for rule 'raven' ({ROOT / 'examples/raven.rec'}).")
        assert lines[1] == f"# Generated by recdsl {recdsl.__version__} (Triton 3.9.0); do not edit: regenerate with"
        assert lines[3] == "# Dims: M=64, K=32, V=16. Consts: topk=8."
        assert "#   let p = softmax(Sk @ q)" in lines  # the rule itself, quoted
        pyast.parse(text)  # valid Python
    tree = pyast.parse(kernels.read_text())
    names = [f.name for f in tree.body if isinstance(f, pyast.FunctionDef)]
    assert names == ["_topk_mask", "rule_raven_recurrent_fwd", "rule_raven_recurrent_bwd"]
    assert pyast.get_docstring(tree).startswith("Fused recurrent kernels for rule raven")


def test_diagonal_rules_build_their_chunk_kernels():
    """A diagonal rule's report builds its stage prologues (inputs and params in the caller's
    dtype, read values and quantities fp32) and the pass kernels once per pass shape; a delta
    rule has none of them."""
    rule = recdsl.load(ROOT / "examples/raven.rec").ir
    prologue, passes = export.chunk_diagonal_modules(rule, {"M": 64, "K": 32, "V": 16})
    assert [k.name for k in prologue.kernels] == ["rule_raven_stage0_fwd", "rule_raven_stage0_bwd",
                                                  "rule_raven_stage1_fwd", "rule_raven_stage1_bwd"]
    assert prologue.kernels[2].arg_types == {
        **{f"p_in_{n}": aot.DATA for n in ("q", "k", "v", "route", "a")}, "p_in_read0": "*fp32",
        "p_par_A_log": aot.DATA, "p_par_dt_bias": aot.DATA, "p_q4": "*fp32", "NTOK": "i32", "H": "i32"}
    assert [(k.name, k.variant, k.constexprs.get("BX"), k.constexprs.get("BV")) for k in passes.kernels] == [
        ("chunk_fwd", "pass 0 (K x M) forward", 32, 32),
        ("chunk_bwd_dh", "pass 0 (K x M) backward: state gradient", 32, 32),
        ("chunk_bwd_x", "pass 0 (K x M) backward: u", 32, 32),
        ("chunk_bwd_x", "pass 0 (K x M) backward: kx", 32, 32),
        ("chunk_bwd_y", "pass 0 (K x M) backward: vy", 32, 32),
        ("chunk_bwd_y", "pass 0 (K x M) backward: o (Y decays)", 32, 32),
        ("chunk_decays", "pass 0 (K x M) decay sums (Y)", None, None),
        ("chunk_fwd", "pass 1 (M x V) forward", 32, 16),
        ("chunk_bwd_dh", "pass 1 (M x V) backward: state gradient", 32, 16),
        ("chunk_bwd_x", "pass 1 (M x V) backward: u", 32, 16),
        ("chunk_bwd_x", "pass 1 (M x V) backward: kx", 32, 16),
        ("chunk_bwd_y", "pass 1 (M x V) backward: vy", 32, 16),
        ("chunk_decays", "pass 1 (M x V) decay sums (X)", None, None)]
    assert export.chunk_diagonal_modules(recdsl.load(ROOT / "examples/delta.rec").ir, {"K": 16, "V": 16}) == []


def _feed(rule, sources, tensors, init, d_out=None, d_final=None):
    feed = []
    states = [s.name for s in rule.states]
    for s in sources:
        if s.kind == "input":
            x = tensors[s.name][:, 0]
            feed.append(x if s.index is None else x.select(2, s.index))
        elif s.kind == "param":
            feed.append(tensors[s.name].expand(init[0].shape[0], *tensors[s.name].shape))
        elif s.kind == "state":
            feed.append(init[states.index(s.name)])
        elif s.kind == "grad_output":
            feed.append(d_out[[o.name for o in rule.outputs].index(s.name)])
        else:
            feed.append(d_final[states.index(s.name)])
    return feed


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_exported_token_forward_equals_the_naive_loop(path, tmp_path):
    """The exported PyTorch program, run on its own, computes one token like the naive loop."""
    rule = recdsl.load(path)
    dims = export.default_dims(rule.ir, {d: n for d, n in {"K": 5, "V": 3, "N": 4, "P": 3, "M": 9}.items()
                                          if d in rule.dims})
    export.write_sources(rule.ir, dims, tmp_path)
    module = _import(tmp_path / f"{rule.name}_token_torch.py")
    g = torch.Generator().manual_seed(0)
    B, H = 2, 3
    tensors = {v.name: torch.randn(B, 1, H, *[dims[d] for d in v.dims], generator=g, dtype=torch.float64)
               for v in rule.inputs}
    tensors.update({v.name: torch.randn(H, *[dims[d] for d in v.dims], generator=g, dtype=torch.float64)
                    for v in rule.params})
    init = [0.5 * torch.randn(B, H, *[dims[d] for d in s.dims], generator=g, dtype=torch.float64)
            for s in rule.states]
    out, final = rule(**tensors, initial_state=tuple(init), output_final_state=True, backend="naive")
    expected = list(out if isinstance(out, tuple) else (out,))
    expected = [o[:, 0] for o in expected] + list(final if isinstance(final, tuple) else (final,))
    got = module.token_forward(*_feed(rule, lower(rule.ir, dims).sources(), tensors, init))
    assert len(got) == len(expected)
    for value, want in zip(got, expected):
        torch.testing.assert_close(value, want, rtol=0, atol=1e-12)


# ----------------------------------------------------------------- real builds


def test_report_gated_delta_sm90_builds_without_spills(capsys):
    """A real sm_90 build (no GPU) inside a session that runs Triton interpreted."""
    assert os.environ.get("TRITON_INTERPRET") == "1"  # conftest: the interpreter is on
    from triton import knobs
    code = export.command(_args(ROOT / "examples/gated_delta.rec", "--arch", "sm_90", "--report"))
    out, err = capsys.readouterr()
    assert code == 0, out + err
    # the interpreter is back on for the rest of the session
    assert knobs.runtime.interpret and os.environ.get("TRITON_INTERPRET") == "1"
    lines = out.splitlines()
    assert lines[0].startswith("rule gated_delta (") and "on sm_90: K=64 V=64, float32 inputs" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("rule_gated_delta_", "chunk_delta_"))}
    assert {"rule_gated_delta_recurrent_fwd", "rule_gated_delta_recurrent_bwd",
            "rule_gated_delta_prologue_fwd", "rule_gated_delta_prologue_bwd",
            "chunk_delta_fwd_h", "chunk_delta_bwd_dk"} <= set(rows)
    for name, row in rows.items():
        warps, registers, spill = int(row[1]), int(row[2]), row[3:5]
        if "recurrent" in name:
            assert warps == (4 if name.endswith("fwd") else 8)
        assert 0 < registers <= 255
        assert spill == ["0", "(0+0)"]
    assert lines[-1] == "ok: no kernel spills; shared memory within 227 KiB"


def test_build_figures_agree_with_cuobjdump():
    """The ptxas log's figures are those of the cubin Triton built (cross-checked)."""
    rule = recdsl.load(ROOT / "examples/linear_attention.rec").ir
    module = export.recurrent_module(rule, {"K": 16, "V": 16})
    module.kernels = module.kernels[:1]
    (build,) = aot.build_module(module, aot.ARCHS["sm_80"])
    assert build.source_of_figures == "ptxas log"
    assert build.registers > 0 and build.spill_bytes == 0 and build.seconds > 0
    dumped = aot.cuobjdump_usage(build.cubin, build.kernel)
    assert (dumped.registers, dumped.stack) == (build.registers, build.stack)
