"""The on-disk artifact cache for generated code.

An entry is a generated Python module (Triton kernels must live in a real file: triton.jit
reads its function's source) plus a checksum. The key covers the rule's canonical form, the
specialisation (dim sizes), recdsl's version and source code, and the torch and Triton
versions. A damaged
entry (checksum mismatch, missing file, import error) is rebuilt, never trusted.

``RECDSL_CACHE_DIR`` moves the cache (default ``~/.cache/recdsl``); ``RECDSL_PRINT_CODE=1``
prints every generated source to stderr when it is loaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import torch

_MODULES = {}  # key -> loaded module, for this process


def cache_dir() -> Path:
    root = os.environ.get("RECDSL_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "recdsl"


def _code_fingerprint() -> str:
    """A hash of recdsl's own source: generated code changes when the generators do, even
    within one version, so a cache entry from older generators is never reused."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        root = Path(__file__).resolve().parents[1]
        digest = hashlib.sha256()
        for path in sorted(root.rglob("*.py")) + sorted(root.rglob("*.lark")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
        _FINGERPRINT = digest.hexdigest()
    return _FINGERPRINT


_FINGERPRINT = None


def cache_key(*parts: str) -> str:
    import triton  # imported here: importing triton fixes its interpreter setting

    from .. import __version__
    text = "\n".join([f"recdsl {__version__}", f"torch {torch.__version__}",
                      f"triton {triton.__version__}", f"code {_code_fingerprint()}", *parts])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load_module(key: str, module_name: str, make_source):
    """The module for ``key``, from this process, the disk cache, or ``make_source()``."""
    if key in _MODULES:
        return _MODULES[key]
    folder = cache_dir() / key
    # the folder is already unique (a hash); cut the readable part below file-name limits
    path, check = folder / f"{module_name[:100]}.py", folder / "checksum"
    source = None
    if path.is_file() and check.is_file():
        text = path.read_text()
        if _checksum(text) == check.read_text().strip():
            source = text
    if source is None:
        source = make_source()
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, source)
        _atomic_write(check, _checksum(source))
    if os.environ.get("RECDSL_PRINT_CODE") == "1":
        print(f"# ---- recdsl generated: {path}\n{source}", file=sys.stderr)
    try:
        module = _import(path, f"recdsl_generated_{key}_{module_name}")
    except Exception:
        # a damaged or stale entry: rebuild once from scratch
        source = make_source()
        _atomic_write(path, source)
        _atomic_write(check, _checksum(source))
        module = _import(path, f"recdsl_generated_{key}_{module_name}")
    _MODULES[key] = module
    return module


def load_generated(key: str, module_name: str, generate):
    """``(spec, module)`` for generated kernels: ``generate()`` gives a spec with a
    ``.source``; the source goes through ``load_module``'s cache, and the spec (cheap to
    remake, unlike Triton's compile) is remade when the module came from disk and is kept
    on the module."""
    made = {}

    def make_source():
        made["spec"] = generate()
        return made["spec"].source

    module = load_module(key, module_name, make_source)
    spec = getattr(module, "_recdsl_spec", None)
    if spec is None:
        spec = made.get("spec") or generate()
        module._recdsl_spec = spec
    return spec, module


def _atomic_write(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
