"""The CPU thread policy (recdsl/runtime/threads.py): the context sets and restores the
intra-op thread count, also on an exception; RECDSL_CPU_THREADS overrides it; a CPU call
through ``rule(...)`` runs under it."""
from __future__ import annotations

import pytest
import torch

import recdsl
from recdsl.runtime import backends, threads
from recdsl.runtime.sample import sample_inputs

from tests.helpers import EXAMPLES


@pytest.fixture
def two_threads(monkeypatch):
    """The caller's count is 2 (restored afterwards); the policy is the default."""
    monkeypatch.delenv(threads.ENV, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_context_sets_and_restores(two_threads):
    with threads.cpu_threads():
        assert torch.get_num_threads() == threads.DEFAULT_THREADS
    assert torch.get_num_threads() == 2


def test_context_restores_on_exception(two_threads):
    with pytest.raises(RuntimeError, match="boom"):
        with threads.cpu_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_context_is_reentrant(two_threads):
    with threads.cpu_threads(1):
        with threads.cpu_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1  # the inner exit leaves the outer's count
    assert torch.get_num_threads() == 2


def test_env_int(two_threads, monkeypatch):
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.policy_threads() == 3
    with threads.cpu_threads():
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == 2


def test_env_torch_leaves_the_setting_alone(two_threads, monkeypatch):
    monkeypatch.setenv(threads.ENV, "torch")
    assert threads.policy_threads() is None
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    with threads.cpu_threads():
        assert torch.get_num_threads() == 2
    assert calls == []


@pytest.mark.parametrize("bad", ["0", "-2", "many"])
def test_env_invalid(monkeypatch, bad):
    monkeypatch.setenv(threads.ENV, bad)
    with pytest.raises(ValueError, match=threads.ENV):
        threads.policy_threads()


def _recording_runner(monkeypatch):
    seen = []
    real = backends._RUNNERS["naive"]

    def run(rule, call):
        seen.append(torch.get_num_threads())
        return real(rule, call)
    monkeypatch.setitem(backends._RUNNERS, "naive", run)
    return seen


def test_rule_call_runs_under_the_policy(two_threads, monkeypatch):
    rule = recdsl.load(EXAMPLES / "gated_delta.rec")
    inputs = sample_inputs(rule, batch=1, time=4, heads=1, dims={"K": 4, "V": 4})
    seen = _recording_runner(monkeypatch)
    rule(**inputs, backend="naive")
    assert seen == [threads.DEFAULT_THREADS]
    assert torch.get_num_threads() == 2
    monkeypatch.setenv(threads.ENV, "torch")
    rule(**inputs, backend="naive")
    assert seen[-1] == 2


def test_rule_call_restores_on_error(two_threads, monkeypatch):
    rule = recdsl.load(EXAMPLES / "gated_delta.rec")
    inputs = sample_inputs(rule, batch=1, time=4, heads=1, dims={"K": 4, "V": 4})

    def failing(rule, call):
        assert torch.get_num_threads() == threads.DEFAULT_THREADS
        raise RuntimeError("runner failed")
    monkeypatch.setitem(backends._RUNNERS, "naive", failing)
    with pytest.raises(RuntimeError, match="runner failed"):
        rule(**inputs, backend="naive")
    assert torch.get_num_threads() == 2


def test_torch_chunk_call_sets_one_thread(two_threads, monkeypatch):
    rule = recdsl.load(EXAMPLES / "gated_delta.rec")
    inputs = sample_inputs(rule, batch=1, time=8, heads=1, dims={"K": 4, "V": 4})
    calls = []
    real = torch.set_num_threads

    def record(n):
        calls.append(n)
        real(n)
    monkeypatch.setattr(torch, "set_num_threads", record)
    out, _ = rule(**inputs, backend="torch-chunk")
    assert calls == [threads.DEFAULT_THREADS, 2]
    assert torch.get_num_threads() == 2
    assert torch.isfinite(out).all()
