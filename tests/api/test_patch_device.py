"""moert.patch / moert.load on the asynchronous device model (``device="sim"``) end to end, and
the device names that reach the cache (``cuda:N``).

On the device model the copies are asynchronous and take modelled time, while torch computes on
the calling thread: that thread is the model's stream 0, so its waits on ready events block it
until the copy has landed, and its last-use events complete at once (its reads are done when the
next call starts). Numbers must not change.
"""

from __future__ import annotations

import pytest
import torch

import moert
from moert import OffloadConfig
from moert.models.tiny import Reference, greedy, single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return Reference("deepseek_v2-greedy", tmp_path_factory.mktemp("patch_device"))


def _run(ds: Reference, **kwargs):
    model = ds.copy()
    handle = moert.patch(model, **kwargs)
    try:
        seq, logits = greedy(model, ds.prompt, ds.new_tokens)
        st = handle.stats()
        return seq, logits, st, handle.device
    finally:
        handle.undo()


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"deferred_waits": True, "copy_streams": 1}, {"deferred_waits": True, "copy_streams": 3}],
    ids=["acquire-2lanes", "deferred-1lane", "deferred-3lanes"],
)
def test_patch_on_the_device_model_is_exact(ds, kwargs, monkeypatch):
    """A quarter of the experts cached on the device model: the tokens equal the unpatched model's
    and the logits are bit-identical to every expert resident on the same device, with misses.
    Each copy takes 2 ms, so the host reaches its waits before the copies land even on a loaded
    machine (at the default 10 us a slow host may find every copy done: no stall to measure)."""
    want_seq, want_logits = ds.out
    monkeypatch.setenv("MOERT_SIM_LATENCY_US", "2000")
    seq, logits, st, device = _run(ds, device="sim", cache_experts=0.25, **kwargs)
    monkeypatch.delenv("MOERT_SIM_LATENCY_US")
    full_seq, full_logits, full, _ = _run(ds, device="sim", cache_experts=1.0)
    assert device == "sim"
    assert st.misses > 0 and st.bytes_copied > 0, st
    assert torch.equal(seq, want_seq), "tokens differ from the unpatched model"
    assert torch.equal(seq, full_seq)
    assert torch.equal(logits, full_logits), (
        f"not bit-identical to all-resident (max diff {(logits - full_logits).abs().max():.3e})"
    )
    err = ((logits - want_logits).abs().max() / want_logits.abs().max()).item()
    assert err <= 1e-5, f"relative error vs the unpatched model {err:.3e}"
    # the host waited for the copies of its misses: the engine measured it
    assert st.demand_stall_s > 0.0 and st.copy_busy_s > 0.0, st


def test_device_model_from_the_environment(ds, monkeypatch, tmp_path):
    """MOERT_DEVICE=sim selects the device model for patch and load; its timing comes from MOERT_SIM_*."""
    monkeypatch.setenv("MOERT_DEVICE", "sim")
    monkeypatch.setenv("MOERT_SIM_BANDWIDTH_GBS", "5")
    seq, _, st, device = _run(ds, cache_experts=0.25)
    assert device == "sim" and st.misses > 0 and torch.equal(seq, ds.out[0])
    model = moert.load(ds.path, cache_experts=0.25)
    handle = moert.handle_of(model)
    try:
        assert handle.device == "sim"
        assert handle.offloader.cache.sim_device().timing.bandwidth_gbs == 5.0
        seq, _ = greedy(model, ds.prompt, ds.new_tokens)
        assert torch.equal(seq, ds.out[0])
    finally:
        handle.undo()


def test_device_names():
    """cuda:N is a device like cuda; sim needs the runtime backend; anything else is named."""
    assert OffloadConfig(device="cuda:1").device == "cuda:1"
    assert OffloadConfig(device="sim").device == "sim"
    for bad in ("tpu", "cuda:", "cuda:one", "sim:0"):
        with pytest.raises(ValueError, match=f"device='{bad}' must be 'cpu', 'sim', 'cuda', 'cuda:N'"):
            OffloadConfig(device=bad)


def test_device_checks_at_patch(ds):
    model = ds.copy()
    with pytest.raises(ValueError, match="device='sim' models the runtime's device; use backend='runtime'"):
        moert.patch(model, device="sim", backend="reference")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda:1' was requested but no CUDA device can run"):
            moert.patch(model, device="cuda:1")
    elif torch.cuda.device_count() < 8:
        with pytest.raises(ValueError, match=r"device='cuda:7': there are only"):
            moert.patch(model, device="cuda:7")
    assert moert.handle_of(model) is None


@pytest.mark.gpu
def test_cuda_index_keeps_the_callers_current_device(ds):
    """The cache goes to the device named (here the experts' own, by default), and patching,
    running and undoing leave torch's current device as they found it."""
    n = torch.cuda.device_count()
    target = n - 1
    before = torch.cuda.current_device()
    model = ds.copy().to(f"cuda:{target}")
    handle = moert.patch(model, cache_experts=0.25, device="cuda")
    try:
        assert handle.device == f"cuda:{target}"
        assert handle.offloader.cache.device_index == target
        seq, _ = greedy(model, ds.prompt.to(f"cuda:{target}"), ds.new_tokens)
        assert torch.cuda.current_device() == before
        assert torch.equal(seq.cpu(), ds.out[0])
    finally:
        handle.undo()
    assert torch.cuda.current_device() == before
