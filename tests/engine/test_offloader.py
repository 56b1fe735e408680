"""The ``Offloader`` (moert.engine.offloader): per-layer stats kept natively against the Python reference
store on the same accesses, rows that sum to the totals, reset, ``apply(plan)``, and a decode step
that reads no counter (a hard bound on native calls per MoE layer call)."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import fields

import numpy as np
import pytest
import torch

import moert
from moert import _C
from moert.engine import runtime
from moert.engine.layout import ExpertLayout
from moert.engine.offloader import Offloader
from moert.engine.stats import LayerStats
from moert.models.tiny import VARIANTS, greedy, prompt_ids, random_predictor, single_thread, tiny_model
from moert.policy import Plan

#: LayerStats fields counted by both the runtime (natively) and the reference store (in Python)
SHARED = ("hits", "misses", "bytes_copied", "evictions", "waves", "calls")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def _run(model, prompt, new_tokens, **kw):
    handle = moert.patch(model, device="cpu", **kw)
    out = greedy(model, prompt, new_tokens)
    st = handle.stats()
    handle.undo()
    return out, st


@pytest.mark.parametrize("name", ["deepseek_v2-greedy", "qwen3_moe-nonorm-sparse", "phimoe"])
@pytest.mark.parametrize(("cache", "policy"), [("k", "lru"), ("2k+1", "lfu"), ("k+2", "lru")])
def test_per_layer_stats_match_the_reference_store(name, cache, policy):
    """Prefill (waves when the union exceeds the cache) and decode of a batch of 2: the runtime's native
    per-layer counters equal the reference store's Python ones, expert for expert."""
    model_type, overrides = VARIANTS[name]
    model = tiny_model(model_type, **overrides)
    k = model.config.num_experts_per_tok
    slots = {"k": k, "2k+1": 2 * k + 1, "k+2": k + 2}[cache]
    prompt = prompt_ids(2, 12, vocab=model.config.vocab_size, seed=4)
    kw = dict(cache_experts=slots, policy=policy, overlap_waves=False)  # the reference has no prefetch
    (seq, logits), st = _run(copy.deepcopy(model), prompt, 6, **kw)
    (ref_seq, ref_logits), ref = _run(copy.deepcopy(model), prompt, 6, backend="reference", **kw)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    for layer, want in ref.per_layer.items():
        got = st.per_layer[layer]
        diff = {f: (getattr(got, f), getattr(want, f)) for f in SHARED if getattr(got, f) != getattr(want, f)}
        assert not diff, f"{name} layer {layer}: (runtime, reference) {diff}"
    assert (st.hits, st.misses, st.bytes_copied, st.evictions) == (
        ref.hits,
        ref.misses,
        ref.bytes_copied,
        ref.evictions,
    )
    assert st.misses > 0 and (cache == "2k+1" or st.evictions > 0), st


def test_rows_sum_to_totals_with_prefetches_and_reset_zeroes_them():
    """With a predictor (prefetches for layer l issued while layer l-1 runs) and overlapped waves,
    every per-layer counter sums to its total; ``reset_stats`` zeroes totals and rows."""
    model = tiny_model("qwen3_moe", norm_topk_prob=False, mlp_only_layers=[0], decoder_sparse_step=1)
    handle = moert.patch(
        model,
        cache_experts=0.25,
        policy="score",
        predictor=random_predictor(model, lookahead=1),
        device="cpu",
    )
    try:
        greedy(model, prompt_ids(2, 20, vocab=model.config.vocab_size, seed=2), 8)
        st = handle.stats()
        # every count with a total: all LayerStats fields but the per-layer-only ones and the stall (a float)
        per_layer_only = ("calls", "waves", "wave_prefetches", "demand_stall_s", "recall", "coverage")
        summed = [f.name for f in fields(LayerStats) if f.name not in per_layer_only]
        bad = {
            f: getattr(st, f)
            for f in summed
            if getattr(st, f) != sum(getattr(v, f) for v in st.per_layer.values())
        }
        assert not bad, (bad, st.per_layer)
        assert st.demand_stall_s == pytest.approx(sum(v.demand_stall_s for v in st.per_layer.values()))
        assert st.prefetches > 0 and st.prefetch_wasted > 0 and st.evictions > 0, st
        for layer, v in st.per_layer.items():
            assert v.bytes_copied == (v.misses * handle.layout.slab_bytes + v.prefetch_bytes), (layer, v)
        handle.reset_stats()
        zero = handle.stats()
        assert zero.hits == zero.bytes_copied == zero.prefetches == 0 and zero.demand_stall_s == 0.0, zero
        assert all(
            v.calls == v.waves == v.hits == v.evictions == v.prefetches == 0 for v in zero.per_layer.values()
        )
        greedy(model, prompt_ids(1, 3, vocab=model.config.vocab_size, seed=3), 2)
        again = handle.stats()
        assert again.hits + again.misses > 0 and all(v.calls == 2 for v in again.per_layer.values()), again
    finally:
        handle.undo()


@pytest.fixture
def offloader():
    layout = ExpertLayout(hidden=16, intermediate=8, dtype=torch.float32)
    pool = runtime.ExpertPool(2, 8, layout.slab_bytes)
    for layer in range(2):
        for e in range(8):
            pool.fill(layer, e, torch.full((layout.slab_bytes // 4,), float(layer * 10 + e)))
    off = Offloader(pool, layout, 6, [3, 5], 8, "cpu", policy="priority", min_slots=2, copy_streams=2)
    yield off
    off.close()


def test_apply_prefetches_clears_and_scores(offloader):
    off = offloader
    assert off.apply(Plan(layers=(0, 1), ids=np.array([[1, 2, -1], [4, -1, -1]], dtype=np.int32))) == 3
    assert off.present(0) == {1, 2} and off.present(1) == {4} and off.resident(0) == {1, 2}
    # layer 0 cleared below everything, then layer 1's prefetches fill the cache and evict it first
    assert (
        off.apply(Plan(layers=(1,), ids=np.array([[5, 6, 7]], dtype=np.int32), clear=(0,), clear_score=-1.0))
        == 3
    )
    assert off.apply(Plan(layers=(1,), ids=np.array([[0, 1]], dtype=np.int32))) == 2
    assert off.present(0) == set() and off.present(1) == {0, 1, 4, 5, 6, 7}
    # scores only (no ids): expert 4 of layer 1 goes first
    scores = np.zeros((1, 8), dtype=np.float32)
    scores[0, 4] = -5.0
    assert off.apply(Plan(layers=(1,), ids=None, scores=scores)) == 0
    assert off.apply(Plan(layers=(0,), ids=np.array([[3]], dtype=np.int32))) == 1
    assert off.present(1) == {0, 1, 5, 6, 7} and off.present(0) == {3}
    (gate_up, down), *_ = off.acquire(0, [3])
    assert torch.all(gate_up == 3.0) and torch.all(down == 3.0)
    off.release(0, [3])
    st = off.stats()
    first, second = st.per_layer[3], st.per_layer[5]
    assert (first.prefetches, first.evictions, first.prefetch_wasted, first.prefetch_hits) == (3, 2, 2, 1)
    assert (second.prefetches, second.evictions, second.prefetch_wasted) == (6, 1, 1)
    assert st.prefetch_bytes == 9 * off.layout.slab_bytes == st.bytes_copied and st.misses == 0


def test_reference_store_has_no_prefetch_path():
    model = tiny_model("deepseek_v2", topk_method="greedy")
    handle = moert.patch(model, cache_experts=0.5, device="cpu", backend="reference")
    try:
        with pytest.raises(RuntimeError, match="ReferenceStore has no prefetch path; use backend='runtime'"):
            handle.offloader.apply(Plan(layers=(0,), ids=np.array([[1]], dtype=np.int32)))
        assert handle.offloader.acquire_deferred(0, [1, 2])[1] == [False, False]
        handle.offloader.release(0, [1, 2])
    finally:
        handle.undo()


def _count_native_calls(monkeypatch) -> Counter:
    """Counts every method call and property read on the native classes (``moert._C``)."""
    calls: Counter = Counter()
    for cls in (_C.ExpertPool, _C.SlabCache, _C.CopyEngine):
        for name, attr in list(vars(cls).items()):
            key = f"{cls.__name__}.{name}"
            if isinstance(attr, property):

                def read(obj, _get=attr.fget, _key=key):
                    calls[_key] += 1
                    return _get(obj)

                monkeypatch.setattr(cls, name, property(read))
            elif type(attr).__name__ == "instancemethod" and not name.startswith("__"):

                def call(*args, _f=attr, _key=key, **kwargs):
                    calls[_key] += 1
                    return _f(*args, **kwargs)

                monkeypatch.setattr(cls, name, call)
    return calls


#: native calls one decode-step MoE layer call may make: resident (order), acquire, release
MAX_NATIVE_CALLS_PER_LAYER_CALL = 3


@pytest.mark.parametrize("cache", [1.0, 0.25])
def test_decode_step_reads_no_counters(monkeypatch, cache):
    """A decode step with every expert cached (and with misses) makes at most 3 native calls per MoE
    layer call, none of them a counter read: counters are read when someone asks (``stats``)."""
    model = tiny_model("deepseek_v2", topk_method="greedy")
    handle = moert.patch(model, cache_experts=cache, policy="lru", device="cpu")
    try:
        ids = prompt_ids(1, 4, vocab=model.config.vocab_size)
        with torch.no_grad():
            past = model(ids, use_cache=True).past_key_values
            for _ in range(2):  # warm: every expert the steps use is resident with cache=1.0
                past = model(ids[:, -1:], past_key_values=past, use_cache=True).past_key_values
            calls = _count_native_calls(monkeypatch)
            model(ids[:, -1:], past_key_values=past, use_cache=True)
        monkeypatch.undo()
        layer_calls = len(handle.layer_ids)
        assert not [k for k in calls if "stats" in k], f"a decode step read counters: {dict(calls)}"
        assert sum(calls.values()) <= MAX_NATIVE_CALLS_PER_LAYER_CALL * layer_calls, dict(calls)
        st = handle.stats()
        assert all(v.calls == 4 for v in st.per_layer.values()), st.per_layer
    finally:
        handle.undo()
