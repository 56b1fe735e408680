"""``PatchHandle.reconfigure``: another cache configuration over the same filled host pool.

Every configuration reached by ``reconfigure`` must run exactly like a fresh ``moert.patch`` with it
(the independent reference here: same tokens, logits and counters on the CPU twin, where counts are
reproducible), produce the unpatched model's tokens with misses > 0 (DESIGN §8), start its counters
at zero, and never refill the pool.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import moert
from moert.models.tiny import Reference, greedy, random_predictor, single_thread

#: configurations switched through in order (each a set of patch keyword arguments)
CONFIGS = [
    dict(cache_experts=5, policy="lru"),
    dict(cache_experts=0.5, policy="lfu"),
    dict(cache_experts=4, policy="lru", copy_streams=1, overlap_waves=False),
    dict(cache_experts=6, policy="utility", overprovision=1),
    dict(cache_experts=6, policy="lru", deferred_waits=True, copy_streams=3),
    dict(cache_experts=5, policy="lru", backend="naive"),
    dict(cache_experts=1.0, policy="lru"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return Reference("deepseek_v2-greedy", tmp_path_factory.mktemp("reconfigure"))


def _counts(st) -> tuple[int, int, int, int]:
    return st.hits, st.misses, st.evictions, st.prefetches


def _fresh(ds: Reference, config: moert.OffloadConfig):
    """Tokens, logits and counters of a fresh patch with ``config`` (the reference)."""
    model = ds.copy()
    handle = moert.patch(model, config)
    try:
        seq, logits = greedy(model, ds.prompt, ds.new_tokens)
        return seq, logits, _counts(handle.stats())
    finally:
        handle.undo()


def test_each_reconfigured_config_runs_like_a_fresh_patch(ds):
    model = ds.copy()
    handle = moert.patch(model, device="cpu", **CONFIGS[0])
    pool = handle.offloader.pool
    address = pool.address(0, 0)
    before = (pool.view(1, 3, torch.uint8, (pool.slab_bytes,)).clone(), handle.freed_bytes)
    try:
        previous = None
        for i, kwargs in enumerate(CONFIGS):
            if i:
                was = handle.config
                final = handle.reconfigure(**kwargs)
                assert handle.config == replace(was, **kwargs), "overrides apply to the current config"
                assert _counts(final) == previous, "reconfigure must return the replaced config's counters"
                assert handle.stats().misses == 0 and handle.stats().hits == 0, "counters not reset"
            assert handle.offloader.pool is pool and pool.address(0, 0) == address, "the pool was replaced"
            seq, logits = greedy(model, ds.prompt, ds.new_tokens)
            st = handle.stats()
            want_seq, want_logits, want_counts = _fresh(ds, handle.config)
            assert torch.equal(seq, ds.out[0]), f"{kwargs}: tokens differ from the unpatched model"
            assert torch.equal(seq, want_seq) and torch.equal(logits, want_logits), kwargs
            assert _counts(st) == want_counts, f"{kwargs}: counters differ from a fresh patch"
            assert st.misses > 0, f"{kwargs}: nothing was offloaded"
            a = handle.adapter
            slots = handle.config.num_slots(len(handle.layer_ids), a.num_experts, a.top_k)
            assert handle.num_slots == slots
            if handle.config.policy in ("lru", "lfu") and handle.config.backend == "runtime":
                assert handle.offloader.cache.policy == handle.config.policy
            previous = _counts(st)
        assert torch.equal(pool.view(1, 3, torch.uint8, (pool.slab_bytes,)), before[0])
        assert handle.freed_bytes == before[1]
    finally:
        handle.undo()
    after = dict(model.named_parameters())
    for name, p in ds.model.named_parameters():
        assert torch.equal(after[name], p), f"{name} differs after undo"


def test_reconfigure_on_the_device_model_adds_a_predictor(ds):
    """device="sim": the prediction pipeline attached by reconfigure prefetches, and detaches again."""
    model = ds.copy()
    pred = random_predictor(ds.model)
    handle = moert.patch(model, device="sim", cache_experts=0.5)
    norms = [layer.input_layernorm for layer in model.model.layers]
    try:
        handle.reconfigure(predictor=pred, policy="score")
        assert handle.prefetcher is not None
        seq, _ = greedy(model, ds.prompt, ds.new_tokens)
        st = handle.stats()
        assert torch.equal(seq, ds.out[0]) and st.misses > 0 and st.prefetches > 0, st
        handle.reconfigure(predictor=None, policy="lru", cache_experts=4, overlap_waves=False)
        assert handle.prefetcher is None
        assert [layer.input_layernorm for layer in model.model.layers] == norms, "norms not restored"
        seq, _ = greedy(model, ds.prompt, ds.new_tokens)
        st = handle.stats()
        assert torch.equal(seq, ds.out[0]) and st.misses > 0 and st.prefetches == 0, st
    finally:
        handle.undo()


def test_bad_reconfigure_changes_nothing(ds):
    model = ds.copy()
    handle = moert.patch(model, device="cpu", cache_experts=5)
    try:
        offloader = handle.offloader
        for kwargs, match in [
            (dict(cache_experts=2), "fewer than one layer's top-k"),
            (dict(device="sim"), "reconfigure keeps the device"),
            (dict(backend="reference"), "another kind of host pool"),
            (dict(policy="score"), "policy='score' orders eviction"),
        ]:
            with pytest.raises(ValueError, match=match):
                handle.reconfigure(**kwargs)
            assert handle.offloader is offloader and handle.config.cache_experts == 5
        seq, _ = greedy(model, ds.prompt, ds.new_tokens)
        assert torch.equal(seq, ds.out[0]) and handle.stats().misses > 0
    finally:
        handle.undo()
    with pytest.raises(RuntimeError, match="undone"):
        handle.reconfigure(cache_experts=6)


def test_a_failed_rebuild_returns_to_the_previous_config(ds, monkeypatch):
    import moert.api.build as patch_module

    real = patch_module.build_offloader
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(args[0].cache_experts)
        if len(calls) == 1:
            raise MemoryError("no room for the new cache")
        return real(*args, **kwargs)

    model = ds.copy()
    handle = moert.patch(model, device="cpu", cache_experts=5)
    pool = handle.offloader.pool
    monkeypatch.setattr(patch_module, "build_offloader", failing_once)
    with pytest.raises(MemoryError):
        handle.reconfigure(cache_experts=8)
    assert calls == [8, 5] and handle.config.cache_experts == 5 and handle.num_slots == 5
    assert handle.offloader.pool is pool
    seq, _ = greedy(model, ds.prompt, ds.new_tokens)
    assert torch.equal(seq, ds.out[0]) and handle.stats().misses > 0
    # both builds fail: the handle lets go of everything, like discard()
    calls.clear()
    monkeypatch.setattr(patch_module, "build_offloader", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):
        handle.reconfigure(cache_experts=8)
    assert not handle.active and moert.handle_of(model) is None and pool.closed


def test_a_predictor_that_fails_to_attach_returns_to_the_previous_config(ds, monkeypatch):
    from moert.engine import prefetch

    model = ds.copy()
    handle = moert.patch(model, device="cpu", cache_experts=5)
    norms = [layer.input_layernorm for layer in model.model.layers]

    def refuse(*args, **kwargs):
        raise ValueError("the fused kernel cannot hold this predictor")

    monkeypatch.setattr(prefetch, "attach", refuse)
    try:
        with pytest.raises(ValueError, match="cannot hold"):
            handle.reconfigure(predictor=random_predictor(ds.model), policy="score", cache_experts=8)
        assert handle.config.predictor is None and handle.config.cache_experts == 5
        assert handle.offloader.num_slots == handle.num_slots == 5, "the failed config is still running"
        assert handle.prefetcher is None and [layer.input_layernorm for layer in model.model.layers] == norms
        seq, _ = greedy(model, ds.prompt, ds.new_tokens)
        assert torch.equal(seq, ds.out[0]) and handle.stats().misses > 0
    finally:
        handle.undo()


@pytest.mark.parametrize(
    "host_budget,read_ahead", [(None, 0), (0.5, 0), (0.5, 2)], ids=["load", "load-tiered", "read-ahead"]
)
def test_reconfigure_after_load_keeps_its_pool(ds, host_budget, read_ahead):
    """moert.load's pool (and its tiered pool over the checkpoint files, with its read-ahead depth)
    serves the next configuration."""
    model = moert.load(ds.path, device="cpu", cache_experts=5, host_budget=host_budget, read_ahead=read_ahead)
    handle = moert.handle_of(model)
    pool = handle.offloader.pool
    try:
        handle.reconfigure(cache_experts=8, policy="lfu")
        assert handle.offloader.pool is pool and handle.num_slots == 8
        assert handle.offloader.engine.read_ahead == read_ahead
        seq, _ = greedy(model, ds.prompt, ds.new_tokens)
        st = handle.stats()
        assert torch.equal(seq, ds.out[0]) and st.misses > 0, st
        assert (st.ssd_reads > 0) == (host_budget is not None), st
    finally:
        handle.undo()
