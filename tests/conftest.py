"""Test-session settings. The Triton interpreter must be on before any kernel is decorated
(generated kernel modules are imported lazily, after this runs); fp fusion is pinned so that
interpreted numerics are reproducible; generated code goes to a fresh cache per session."""
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")
os.environ.setdefault("RECDSL_CACHE_DIR", tempfile.mkdtemp(prefix="recdsl-test-cache-"))
