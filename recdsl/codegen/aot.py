"""Ahead-of-time builds of generated Triton kernels for a GPU architecture, without a GPU.

Each kernel is built by ``triton.compile`` for ``GPUTarget("cuda", 80 | 90, 32)``, down to a
cubin, with the ptxas that Triton bundles. The figures in the report come from that build:

- registers and spill bytes from the ptxas log (``ptxas -v``, which Triton always passes;
  ``knobs.nvidia.dump_ptxas_log`` makes Triton print it, and we capture the print). It is the
  only source that gives spill stores and loads separately. If it lacks a kernel (a future
  Triton may stop printing it), ``cuobjdump --dump-resource-usage`` on the cubin gives the
  registers and the stack frame, and a stack frame counts as spilling;
- shared memory from the build's metadata (``shared``: what a launch asks for).

From these and num_warps ``occupancy`` estimates the resident warps per SM (the report's
``warps/SM``), and a kernel entry's ``dots`` names the operand formats of its products
(``recdsl.codegen.precision``).

The build must not run under the Triton interpreter: a kernel decorated while
``TRITON_INTERPRET=1`` is an ``InterpretedFunction``, which ``triton.compile`` cannot take.
Switching the knob off before importing the generated module is not enough: Triton's own
library functions (``tl.sum``, ``tl.max``, ...) were decorated when ``triton`` was first
imported, and stay interpreted. So when this process's Triton is the interpreted one (a test
session), the build runs in a fresh ``python3 -m recdsl.codegen.aot`` with the variable
removed; otherwise here. Either way the generated module is written afresh to a temporary
folder and imported with the interpreter knob off. ``always_compile`` and a private Triton
cache folder make every build a real one (a cache hit would have no ptxas log and no time).
"""
from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from itertools import count
from pathlib import Path

from ..errors import BackendError

# --------------------------------------------------------------------- what is built


@dataclass(frozen=True)
class Arch:
    name: str  # sm_90
    capability: int  # 90
    max_shared: int  # bytes of shared memory one program may use
    sm_shared: int  # bytes of shared memory of one SM (all its resident programs)
    sm_registers: int = 65536  # 32-bit registers of one SM
    sm_warps: int = 64  # resident warps of one SM at most
    sm_programs: int = 32  # resident programs (thread blocks) of one SM at most

    @property
    def limit_text(self) -> str:
        return f"{self.max_shared // 1024} KiB"


# the opt-in maximum of dynamic shared memory per block: H100 227 KiB, A100 163 KiB; per SM
# 164 KiB and 228 KiB
ARCHS = {"sm_80": Arch("sm_80", 80, 163 * 1024, 164 * 1024),
         "sm_90": Arch("sm_90", 90, 227 * 1024, 228 * 1024)}

# registers are given to warps in units of 256 (8 a thread); the driver keeps 1 KiB of shared
# memory per resident program
_REGISTER_UNIT = 256
_RESERVED_SHARED = 1024


def occupancy(build: "KernelBuild", arch: Arch) -> tuple:
    """(resident warps per SM, what limits them: "registers", "shared", "warps" or "programs")
    for ``build``'s registers a thread, shared memory and num_warps: an estimate, as CUDA's
    occupancy calculator makes it (no other kernel running beside it)."""
    per_warp = -(-build.registers * 32 // _REGISTER_UNIT) * _REGISTER_UNIT
    limits = {"registers": (arch.sm_registers // max(per_warp, 1)) // build.num_warps,
              "shared": arch.sm_shared // (build.shared + _RESERVED_SHARED),
              "warps": arch.sm_warps // build.num_warps,
              "programs": arch.sm_programs}
    limiter = min(limits, key=limits.get)
    return limits[limiter] * build.num_warps, limiter

DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

DATA = "*data"  # an argument type: a pointer to the caller's tensor dtype (inputs, outputs)


@dataclass
class KernelEntry:
    """One kernel of a generated module and how to build it: its argument types (``DATA``
    for pointers whose dtype is the caller's, e.g. ``*fp32``, ``*i64``, ``i32``), the
    constexpr values of the variant to build, and the launch's ``num_warps``."""
    name: str
    arg_types: dict  # argument name -> type, in the kernel's order (constexprs excluded)
    constexprs: dict
    num_warps: int
    variant: str = ""  # a few words on which variant the constexprs select
    dots: str = ""  # the formats of its products (recdsl.codegen.precision), for the report


@dataclass
class GeneratedModule:
    """A generated source file and the kernels in it."""
    kind: str  # e.g. "recurrent"
    filename: str
    source: str
    kernels: list = field(default_factory=list)


@dataclass
class Usage:
    """A kernel's resources as a tool reports them; None where the tool does not say."""
    registers: int | None = None
    stack: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    static_shared: int | None = None


@dataclass
class KernelBuild:
    kernel: str
    kind: str
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int  # bytes a launch asks for
    seconds: float
    source_of_figures: str  # "ptxas log" or "cuobjdump"
    variant: str = ""
    cubin: bytes = field(default=b"", repr=False)
    dots: str = ""  # the formats of its products (KernelEntry.dots)

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads

    def problems(self, arch: Arch, name: str = "") -> list:
        """What is wrong with this build on ``arch``; ``name`` the kernel's label in a report."""
        name = name or self.kernel
        out = []
        if self.spill_bytes or (self.source_of_figures == "cuobjdump" and self.stack):
            out.append(f"{name} spills registers to local memory on {arch.name}: "
                       f"{self.spill_stores} bytes stored, {self.spill_loads} bytes loaded, "
                       f"{self.stack} bytes stack frame (registers {self.registers}, "
                       f"num_warps {self.num_warps})")
        if self.shared > arch.max_shared:
            out.append(f"{name} needs {_bytes(self.shared)} of shared memory; "
                       f"{arch.name} has {arch.limit_text}")
        return out


# --------------------------------------------------------------------- tool output parsers

_FUNCTION = re.compile(r"(?:Compiling entry function '([^']+)'|Function properties for (\S+))")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(text: str) -> dict:
    """Kernel name -> Usage from ``ptxas -v`` output (any ptxas flavour: ``ptxas info`` or
    ``ptxas-blackwell info`` prefixes)."""
    usage, current = {}, None
    for line in text.splitlines():
        m = _FUNCTION.search(line)
        if m:
            current = m.group(1) or m.group(2)
            usage.setdefault(current, Usage())
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            u = usage[current]
            u.stack, u.spill_stores, u.spill_loads = (int(x) for x in m.groups())
        m = _USED.search(line)
        if m:
            usage[current].registers = int(m.group(1))
    return usage


_CUOBJDUMP_FUNCTION = re.compile(r"^\s*Function (\S+?):\s*$")
_FIELD = re.compile(r"\b([A-Z]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> dict:
    """Kernel name -> Usage from ``cuobjdump --dump-resource-usage`` (registers, stack frame
    and static shared memory; it does not say how much of the stack is spills)."""
    usage, current = {}, None
    for line in text.splitlines():
        m = _CUOBJDUMP_FUNCTION.match(line)
        if m:
            current = m.group(1)
            continue
        if current is not None:
            fields = dict(_FIELD.findall(line))
            if "REG" in fields:
                usage[current] = Usage(registers=int(fields["REG"]), stack=int(fields.get("STACK", 0)),
                                       static_shared=int(fields.get("SHARED", 0)))
                current = None
    return usage


# --------------------------------------------------------------------- building


@contextlib.contextmanager
def _compiler_settings(folder: Path):
    """Real (not interpreted, not cached) builds that print their ptxas log; every knob and
    environment variable touched is restored on exit."""
    from triton import knobs
    with contextlib.ExitStack() as stack:
        for group in (knobs.runtime, knobs.compilation, knobs.nvidia, knobs.cache):
            stack.enter_context(group.scope())
        knobs.runtime.interpret = False
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        knobs.cache.dir = str(folder / "triton-cache")
        yield


_IMPORTS = count()


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(f"recdsl_aot_{next(_IMPORTS)}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fp_fusion() -> bool:
    """What a launch would use: TRITON_DEFAULT_FP_FUSION if set, else Triton's default; given
    explicitly so that Triton 3.9 does not warn about the unset variable."""
    from triton import knobs
    return not knobs.language.force_disable_fp_fusion and knobs.language.default_fp_fusion


def build_module(module: GeneratedModule, arch: Arch, dtype: str = "float32", progress=None) -> list:
    """Build every kernel of ``module`` for ``arch``; a list of KernelBuild in module order.
    ``progress(text)`` is told before each kernel starts (builds take seconds each)."""
    if dtype not in DTYPES:
        raise BackendError(f"no dtype {dtype!r} for kernel builds; one of: {', '.join(DTYPES)}")
    if _interpreted_triton():
        return _build_in_subprocess(module, arch, dtype, progress)
    return _build_here(module, arch, dtype, progress)


def _interpreted_triton() -> bool:
    """Was Triton imported under TRITON_INTERPRET=1 (its library functions interpreted)?"""
    from triton.language import standard
    from triton.runtime.jit import JITFunction
    return not isinstance(standard.sum, JITFunction)


def _build_here(module: GeneratedModule, arch: Arch, dtype: str, progress) -> list:
    with tempfile.TemporaryDirectory(prefix="recdsl-aot-") as tmp:
        folder = Path(tmp)
        path = folder / module.filename
        path.write_text(module.source)
        with _compiler_settings(folder):
            loaded = _import(path)
            builds = []
            for entry in module.kernels:
                if progress:
                    progress(f"building {entry.name} for {arch.name} (num_warps {entry.num_warps})")
                builds.append(_build_kernel(getattr(loaded, entry.name), entry, module.kind, arch,
                                            DTYPES[dtype]))
    return builds


def _build_in_subprocess(module: GeneratedModule, arch: Arch, dtype: str, progress) -> list:
    """The same build in a fresh interpreter without TRITON_INTERPRET; the request and the
    results travel as JSON files, progress lines on the child's stderr."""
    with tempfile.TemporaryDirectory(prefix="recdsl-aot-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"module": asdict(module), "arch": arch.name, "dtype": dtype}))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = str(Path(__file__).resolve().parents[2])  # so the child imports this recdsl
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
        proc = subprocess.Popen([sys.executable, "-m", "recdsl.codegen.aot", str(request), str(result)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        tail = []
        for line in proc.stderr:  # relay progress as it comes; keep the rest for an error
            if line.startswith(_PROGRESS):
                if progress:
                    progress(line[len(_PROGRESS):].rstrip("\n"))
            else:
                tail = (tail + [line.rstrip("\n")])[-40:]
        proc.wait()
        if not result.is_file():
            raise BackendError(f"the kernel build process failed (exit {proc.returncode}):\n" + "\n".join(tail))
        answer = json.loads(result.read_text())
    if "error" in answer:
        raise BackendError(answer["error"])
    builds = []
    for fields in answer["builds"]:
        fields["cubin"] = base64.b64decode(fields["cubin"])
        builds.append(KernelBuild(**fields))
    return builds


_PROGRESS = "recdsl-aot-progress: "


def _worker(request_path: str, result_path: str) -> int:
    """The child's side of ``_build_in_subprocess``."""
    request = json.loads(Path(request_path).read_text())
    fields = request["module"]
    module = GeneratedModule(**{**fields, "kernels": [KernelEntry(**k) for k in fields["kernels"]]})
    try:
        builds = _build_here(module, ARCHS[request["arch"]], request["dtype"],
                             lambda text: print(_PROGRESS + text, file=sys.stderr, flush=True))
    except BackendError as err:
        Path(result_path).write_text(json.dumps({"error": str(err)}))
        return 1
    out = []
    for b in builds:
        fields = asdict(b)
        fields["cubin"] = base64.b64encode(b.cubin).decode()
        out.append(fields)
    Path(result_path).write_text(json.dumps({"builds": out}))
    return 0


def _build_kernel(fn, entry: KernelEntry, kind: str, arch: Arch, data: str) -> KernelBuild:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: ("*" + data if t == DATA else t) for name, t in entry.arg_types.items()}
    signature.update({name: "constexpr" for name in entry.constexprs})
    # torch allocations are 16-byte aligned: a launch specialises pointers the same way
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, t in signature.items() if t.startswith("*")}
    source = ASTSource(fn=fn, signature=signature, constexprs=dict(entry.constexprs), attrs=attrs)
    options = {"num_warps": entry.num_warps, "enable_fp_fusion": _fp_fusion()}
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch.capability, 32), options=options)
    except Exception as err:  # a generated kernel that does not build is our defect: say which
        detail = f"{type(err).__name__}: {err}".strip().splitlines()
        raise BackendError(f"building {entry.name} for {arch.name} failed: "
                           + "\n".join(detail[:40])) from err
    seconds = time.perf_counter() - start
    usage = parse_ptxas_log(log.getvalue()).get(entry.name)
    origin = "ptxas log"
    if usage is None or usage.registers is None or usage.spill_stores is None:
        usage, origin = cuobjdump_usage(compiled.asm["cubin"], entry.name), "cuobjdump"
    return KernelBuild(
        kernel=entry.name, kind=kind, num_warps=entry.num_warps, registers=usage.registers,
        spill_stores=usage.spill_stores or 0, spill_loads=usage.spill_loads or 0,
        stack=usage.stack or 0, shared=int(compiled.metadata.shared), seconds=seconds,
        source_of_figures=origin, variant=entry.variant, cubin=compiled.asm["cubin"],
        dots=entry.dots)


def cuobjdump_usage(cubin: bytes, name: str) -> Usage:
    """The resources of kernel ``name`` in ``cubin``, by the cuobjdump Triton bundles."""
    from triton import knobs
    tool = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory(prefix="recdsl-aot-") as tmp:
        path = Path(tmp) / f"{name}.cubin"
        path.write_bytes(cubin)
        try:
            text = subprocess.run([tool, "--dump-resource-usage", str(path)], check=True,
                                  capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as err:
            raise BackendError(f"{tool} failed on the cubin of {name}: {err}") from err
    usage = parse_resource_usage(text).get(name)
    if usage is None:
        raise BackendError(f"neither the ptxas log nor cuobjdump reports the resources of {name}")
    return usage


def ptxas_version(arch: Arch) -> str:
    """The version line of the ptxas Triton uses for ``arch``."""
    from triton.backends.nvidia.compiler import get_ptxas
    tool = get_ptxas(arch.capability)
    try:
        text = subprocess.run([tool.path, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return "ptxas (version unknown)"
    m = re.search(r"release (\S+?),", text)
    return f"{Path(tool.path).name} {m.group(1) if m else '(version unknown)'}"


# --------------------------------------------------------------------- the report


def _bytes(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB"


def repeated_names(builds: list) -> set:
    """Kernel names built more than once (variants of one kernel: the table tells them apart
    by their variant)."""
    names = [b.kernel for b in builds]
    return {n for n in names if names.count(n) > 1}


def label(build: KernelBuild, repeated: set) -> str:
    return f"{build.kernel} [{build.variant}]" if build.kernel in repeated and build.variant else build.kernel


def format_table(builds: list, arch: Arch | None = None) -> str:
    """The report's table; with ``arch``, each kernel's estimated resident warps per SM (and
    what limits them) and the formats of its products (``recdsl.codegen.precision``)."""
    header = ["kernel", "warps", "registers", "spill bytes (st+ld)", "shared", "build"]
    if arch is not None:
        header += ["warps/SM", "dots"]
    rows = [header]
    repeated = repeated_names(builds)
    for b in builds:
        spill = f"{b.spill_bytes} ({b.spill_stores}+{b.spill_loads})"
        if b.source_of_figures == "cuobjdump":
            spill = f"stack {b.stack}*"
        row = [label(b, repeated), str(b.num_warps), str(b.registers), spill, _bytes(b.shared),
               f"{b.seconds:.1f} s"]
        if arch is not None:
            warps, limiter = occupancy(b, arch)
            row += [f"{warps} ({limiter})", b.dots or "-"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    align = ["<", ">", ">", ">", ">", ">", ">", "<"]
    lines = ["  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, align, widths)).rstrip() for r in rows]
    if any(b.source_of_figures == "cuobjdump" for b in builds):
        lines.append("* no ptxas log: figures from cuobjdump, which gives the stack frame, not spills")
    if arch is not None:
        lines.append(f"warps/SM: resident warps per SM estimated from registers, shared memory "
                     f"and num_warps ({arch.name}: {arch.sm_registers} registers, {arch.sm_warps} "
                     f"warps, {arch.sm_shared // 1024} KiB shared a SM); dots: operand formats of "
                     f"its products by class (read, chunk, state, solve; recdsl.codegen.precision), '-' for "
                     f"a kernel without tl.dot")
    return "\n".join(lines)


def problems(builds: list, arch: Arch) -> list:
    repeated = repeated_names(builds)
    return [p for b in builds for p in b.problems(arch, label(b, repeated))]


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:3]))
