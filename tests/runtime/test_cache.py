"""The artifact cache: keyed entries on disk, damaged entries rebuilt, RECDSL_CACHE_DIR
honoured, RECDSL_PRINT_CODE printing the generated source."""
import torch

import recdsl
from recdsl.runtime import cache
from recdsl.runtime.recurrent import kernels
from tests.helpers import EXAMPLES


def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cache, "_MODULES", {})


def test_entry_written_under_cache_dir_with_checksum(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    rule = recdsl.load(EXAMPLES / "gated_delta.rec")
    spec, module = kernels(rule, {"K": 4, "V": 3})
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1
    source = (entries[0] / "gated_delta_recurrent.py").read_text()
    assert source == spec.source and "rule gated_delta" in source
    assert (entries[0] / "checksum").read_text() == cache._checksum(source)
    assert hasattr(module, spec.forward_name)


def test_key_covers_rule_text_dims_and_versions():
    a = cache.cache_key("rule a", "recurrent", "K=4")
    assert a == cache.cache_key("rule a", "recurrent", "K=4")
    assert a != cache.cache_key("rule b", "recurrent", "K=4")
    assert a != cache.cache_key("rule a", "recurrent", "K=8")


def test_damaged_entry_is_rebuilt(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    rule = recdsl.load(EXAMPLES / "gated_delta.rec")
    spec, _ = kernels(rule, {"K": 4, "V": 3})
    (entry,) = tmp_path.iterdir()
    path = entry / "gated_delta_recurrent.py"
    path.write_text("raise RuntimeError('damaged')\n")  # checksum no longer matches
    monkeypatch.setattr(cache, "_MODULES", {})
    spec2, module = kernels(rule, {"K": 4, "V": 3})
    assert path.read_text() == spec.source
    assert hasattr(module, spec2.forward_name)
    # a damaged entry whose checksum was forged to match is caught at import and rebuilt
    path.write_text("raise RuntimeError('damaged')\n")
    (entry / "checksum").write_text(cache._checksum(path.read_text()))
    monkeypatch.setattr(cache, "_MODULES", {})
    _, module = kernels(rule, {"K": 4, "V": 3})
    assert path.read_text() == spec.source


def test_rebuilt_kernels_still_compute(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    rule = recdsl.load(EXAMPLES / "linear_attention.rec")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 1, 4, generator=g) for _ in range(3))
    expected, _ = rule(q, k, v, backend="naive")
    got, _ = rule(q, k, v, backend="recurrent")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_print_switch_shows_generated_code(monkeypatch, tmp_path, capsys):
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setenv("RECDSL_PRINT_CODE", "1")
    kernels(recdsl.load(EXAMPLES / "retention.rec"), {"K": 4, "V": 3})
    err = capsys.readouterr().err
    assert "# ---- recdsl generated:" in err and "def rule_retention_recurrent_fwd(" in err


def test_key_changes_when_recdsl_code_changes(monkeypatch):
    before = cache.cache_key("rule a")
    monkeypatch.setattr(cache, "_FINGERPRINT", "other generator code")
    assert cache.cache_key("rule a") != before
