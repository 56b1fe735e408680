"""Overlapped waves (``moert.engine.layer``): a layer whose union of experts exceeds the cache streams it in
waves of half the slots, prefetching wave i+1 while wave i computes. The numbers never change
(DESIGN §8), the counters stay true, decode (one wave) is untouched, and under several copy lanes and
threads every slot holds its expert's bytes from acquire to release."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

import moert
from moert.engine.layer import wave_bounds
from moert.engine.runtime import CopyEngine, ExpertPool, SlabCache
from moert.models import get_adapter
from moert.models.tiny import VARIANTS, prompt_ids, single_thread, tiny_model

# one routing variant per architecture: DeepSeek (shared experts, dense first layer), Qwen3 with a dense
# MLP layer and unnormalised top-k, Phi (LayerNorm with bias, sparsemixer, top-2)
ARCH_VARIANTS = ("deepseek_v2-greedy", "qwen3_moe-nonorm-sparse", "phimoe")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def model_of(name: str):
    model_type, overrides = VARIANTS[name]
    return tiny_model(model_type, **overrides)


def record_unions(model) -> tuple[dict[int, list[int]], list]:
    """Pre-hooks on every MoE experts module: decoder layer -> distinct experts selected per call."""
    unions: dict[int, list[int]] = {}
    hooks = []
    for ref in get_adapter(model).moe_layers():
        unions[ref.index] = []

        def hook(_mod, args, index=ref.index):
            unions[index].append(int(torch.unique(args[1]).numel()))  # args: (hidden, top_k_index, weights)

        hooks.append(ref.experts.register_forward_pre_hook(hook))
    return unions, hooks


def prefill(model, prompt, overlap: bool | None, **patch_kw):
    """Logits of one forward of ``prompt`` (patched with ``patch_kw``, or unpatched when None), stats,
    the per-layer unions and the handle's slot count."""
    unions, hooks = record_unions(model)
    handle = None
    try:
        if patch_kw:
            handle = moert.patch(model, device="cpu", overlap_waves=bool(overlap), **patch_kw)
        with torch.no_grad():
            logits = model(prompt).logits
        st = handle.stats() if handle else None
        slots = handle.num_slots if handle else None
        slab = handle.layout.slab_bytes if handle else None
    finally:
        if handle is not None:
            handle.undo()
        for h in hooks:
            h.remove()
    return logits, st, unions, slots, slab


def assert_identical(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if not torch.equal(got, want):
        worst = (got - want).abs().max().item()
        raise AssertionError(f"{what}: logits not bit-identical (max abs diff {worst:.3e})")


@pytest.mark.parametrize(
    ("union", "slots", "overlap", "want"),
    [
        (0, 4, True, []),
        (3, 4, True, [(0, 3)]),  # fits: one wave, overlap or not
        (4, 4, True, [(0, 4)]),
        (9, 4, False, [(0, 4), (4, 8), (8, 9)]),
        (9, 4, True, [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]),
        (16, 7, True, [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15), (15, 16)]),  # odd: 3 + 3 <= 7
        (64, 45, True, [(0, 22), (22, 44), (44, 64)]),
        (5, 1, True, [(i, i + 1) for i in range(5)]),  # one slot: nothing to overlap
        (5, 2, True, [(i, i + 1) for i in range(5)]),
    ],
)
def test_wave_bounds(union, slots, overlap, want):
    got = wave_bounds(union, slots, overlap)
    assert got == want, (union, slots, overlap, got)
    if got:  # contiguous cover of the union, no wave larger than the cache
        assert got[0][0] == 0 and got[-1][1] == union
        assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
        cap = slots // 2 if overlap and union > slots and slots >= 2 else slots
        assert all(0 < b - a <= cap for a, b in got)


def test_wave_bounds_rejects_no_slots():
    with pytest.raises(ValueError, match="num_slots=0"):
        wave_bounds(3, 0, True)


@pytest.mark.parametrize("name", ARCH_VARIANTS)
def test_prefill_overlapped_waves_exact_and_counted(name):
    """Prefill of 2 x 24 tokens through a cache of k+2 slots: each layer's union (most of the 16
    experts) streams in waves. Overlapped == plain waves == all-resident bit for bit; the counters
    add up: every union member acquired once, wave prefetches used (hits), bytes = demand + prefetch."""
    model = model_of(name)
    k = model.config.num_experts_per_tok
    prompt = prompt_ids(2, 24, vocab=model.config.vocab_size, seed=7)
    ref, _, _, _, _ = prefill(model, prompt, None)
    full, _, _, _, _ = prefill(model, prompt, False, cache_experts=1.0)
    plain, st_p, unions, slots, slab = prefill(model, prompt, False, cache_experts=k + 2)
    ovl, st_o, unions_o, _, _ = prefill(model, prompt, True, cache_experts=k + 2)
    # overlapped waves with deferred waits (the CUDA default): each expert waits for its own copy
    dfr, st_d, _, _, _ = prefill(model, prompt, True, cache_experts=k + 2, deferred_waits=True)
    assert unions == unions_o  # the same routing
    assert_identical(f"{name} overlapped waves with deferred waits vs all-resident", dfr, full)
    key = lambda st: (st.hits, st.misses, st.prefetches, st.prefetch_hits, st.bytes_copied)  # noqa: E731
    assert key(st_d) == key(st_o), (st_d, st_o)  # decisions are made at pin time, in program order
    assert st_d.bytes_copied == sum(v.bytes_copied for v in st_d.per_layer.values()), st_d
    err = ((full - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, f"{name}: all-resident vs unpatched relative error {err:.3e}"
    assert_identical(f"{name} plain waves vs all-resident", plain, full)
    assert_identical(f"{name} overlapped waves vs all-resident", ovl, full)

    assert slots == k + 2 and all(u > slots for us in unions.values() for u in us), (slots, unions)
    half = slots // 2
    for layer, us in unions.items():
        assert st_p.per_layer[layer].waves == sum(math.ceil(u / slots) for u in us), (layer, us, st_p)
        assert st_o.per_layer[layer].waves == sum(math.ceil(u / half) for u in us), (layer, us, st_o)
        assert st_p.per_layer[layer].wave_prefetches == 0
    for st in (st_p, st_o):
        assert st.hits + st.misses == sum(map(sum, unions.values())), st
        assert st.bytes_copied == st.misses * slab + st.prefetch_bytes, st
        assert st.bytes_copied == sum(v.bytes_copied for v in st.per_layer.values()), st
        assert st.hits == sum(v.hits for v in st.per_layer.values())
        assert st.prefetch_hits == sum(v.prefetch_hits for v in st.per_layer.values())
    assert st_p.prefetches == 0 and st_p.prefetch_hits == 0
    # overlapped: demand misses remain (the first wave), the rest arrives as prefetches, all of them used
    assert st_o.misses > 0 and st_o.prefetches > 0 and st_o.prefetch_hits > 0, st_o
    assert st_o.prefetches == sum(v.wave_prefetches for v in st_o.per_layer.values()), st_o
    assert st_o.prefetch_hits == st_o.prefetches and st_o.prefetch_wasted == 0, st_o
    assert st_o.prefetch_bytes == st_o.prefetches * slab, st_o
    assert st_o.misses < st_p.misses, (st_o, st_p)
    json_ready = st_o.as_dict()["per_layer"]
    assert all("wave_prefetches" in v for v in json_ready.values())


@pytest.mark.parametrize("backend", ["reference", "naive"])
def test_stores_without_prefetch_stream_plain_waves(backend):
    """The reference and naive stores have no prefetch path: with overlap on they stream full-cache
    waves as before, with the same numbers."""
    model = model_of("deepseek_v2-greedy")
    k = model.config.num_experts_per_tok
    prompt = prompt_ids(2, 24, vocab=model.config.vocab_size, seed=7)
    full, _, _, _, _ = prefill(model, prompt, False, cache_experts=1.0)
    got, st, unions, slots, _ = prefill(model, prompt, True, cache_experts=k + 2, backend=backend)
    assert_identical(f"{backend} with overlap on", got, full)
    assert st.prefetches == 0 and st.prefetch_hits == 0 and st.misses > 0, st
    for layer, us in unions.items():
        assert st.per_layer[layer].waves == sum(math.ceil(u / slots) for u in us), (layer, us, st)
        assert st.per_layer[layer].wave_prefetches == 0


def test_decode_is_unchanged_by_overlap():
    """Batch-1 decode from a one-token prompt: every union (k experts) fits the k+2 slots, so with
    overlap on the layer runs exactly as without: same logits, hits, misses, waves, no prefetches."""
    model = model_of("deepseek_v2-greedy")
    k = model.config.num_experts_per_tok
    prompt = prompt_ids(1, 1, vocab=model.config.vocab_size, seed=3)
    runs = {}
    for overlap in (False, True):
        handle = moert.patch(model, cache_experts=k + 2, device="cpu", overlap_waves=overlap)
        seq, logits = moert.models.tiny.greedy(model, prompt, 8)
        runs[overlap] = (seq, logits, handle.stats())
        handle.undo()
    (s0, l0, st0), (s1, l1, st1) = runs[False], runs[True]
    assert torch.equal(s0, s1)
    assert_identical("decode with overlap on", l1, l0)
    key = lambda st: (st.hits, st.misses, st.evictions, st.prefetches, st.bytes_copied)  # noqa: E731
    assert key(st1) == key(st0), (st0, st1)
    assert st1.prefetches == 0
    for layer, v in st0.per_layer.items():
        w = st1.per_layer[layer]
        assert (w.waves, w.calls, w.wave_prefetches) == (v.waves, v.calls, 0) and v.waves == v.calls, (v, w)


def test_overlap_waves_must_be_a_bool():
    model = model_of("phimoe")
    with pytest.raises(ValueError, match="overlap_waves='yes' must be True or False"):
        moert.patch(model, cache_experts=4, device="cpu", overlap_waves="yes")
    with pytest.raises(ValueError, match="deferred_waits='yes' must be True, False or None"):
        moert.patch(model, cache_experts=4, device="cpu", deferred_waits="yes")
    handle = moert.patch(model, cache_experts=4, device="cpu")
    try:
        assert handle.offloader.overlap_waves is True  # the default
        assert handle.offloader.deferred_waits is False  # auto: on for CUDA, off for the CPU twin
        with pytest.raises(ValueError, match="overlap_waves='yes' must be True or False"):
            handle.offloader.overlap_waves = "yes"
    finally:
        handle.undo()


@pytest.mark.parametrize("deferred", [False, True], ids=["waiting-acquire", "deferred-waits"])
def test_race_model_prefills_slot_bytes_intact(deferred):
    """Four copy lanes, a 2k+1 slot cache, overlap on, prefills of 24 random prompts: every slot view
    handed to the compute holds exactly its expert's pool bytes when it may be read (at acquire, or
    with deferred waits after its own wait) and still at release (a wave prefetch never overwrites a
    pinned slot while its wave computes)."""
    model = model_of("qwen3_moe-nonorm-sparse")
    k = model.config.num_experts_per_tok
    handle = moert.patch(
        model, cache_experts=2 * k + 1, device="cpu", copy_streams=4, deferred_waits=deferred
    )
    off = handle.offloader
    off.overlap_waves = True
    layout, pool = off.layout, off.pool
    held: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    bad: list[str] = []
    checks = [0]

    def verify(layer: int, e: int, views, when: str) -> None:
        gate_up, down = views
        want_gu = pool.view(layer, e, layout.dtype, layout.gate_up_shape, 0)
        want_dn = pool.view(layer, e, layout.dtype, layout.down_shape, layout.down_offset)
        checks[0] += 1
        if not (torch.equal(gate_up, want_gu) and torch.equal(down, want_dn)):
            bad.append(f"{when}: (layer {layer}, expert {e}) slot bytes differ from the pool")

    acquire, acquire_deferred, wait, release = off.acquire, off.acquire_deferred, off.wait, off.release

    def hold(ordinal, experts, views, pending):
        for e, v, p in zip(experts, views, pending):
            if not p:
                verify(ordinal, e, v, "acquire")
            held[(ordinal, e)] = v

    def checked_acquire(ordinal, experts):
        views = acquire(ordinal, experts)
        hold(ordinal, experts, views, [False] * len(experts))
        return views

    def checked_acquire_deferred(ordinal, experts):
        views, pending = acquire_deferred(ordinal, experts)
        hold(ordinal, experts, views, pending)
        return views, pending

    def checked_wait(ordinal, expert):
        wait(ordinal, expert)
        verify(ordinal, expert, held[(ordinal, expert)], "wait")

    def checked_release(layer, experts):
        for e in experts:
            verify(layer, e, held.pop((layer, e)), "release")
        release(layer, experts)

    off.acquire, off.acquire_deferred, off.wait, off.release = (
        checked_acquire,
        checked_acquire_deferred,
        checked_wait,
        checked_release,
    )
    try:
        with torch.no_grad():
            for seed in range(24):
                model(prompt_ids(3, 16, vocab=model.config.vocab_size, seed=100 + seed))
        st = handle.stats()
    finally:
        del off.acquire, off.acquire_deferred, off.wait, off.release
        handle.undo()
    assert not bad, f"{len(bad)} of {checks[0]} checks failed, first: {bad[:3]}"
    assert not held and checks[0] > 0
    assert (
        st.prefetch_hits > 0 and st.bytes_copied == st.misses * handle.layout.slab_bytes + st.prefetch_bytes
    )


def test_race_threads_wave_protocol_on_shared_engine():
    """Three threads stream waves (acquire i, prefetch i+1, compute, release i) through one engine with
    four lanes and a 9-slot cache, over the same layers, so prefetches are cancelled, promoted and
    evicted under each other: every acquired slot holds its expert's bytes at acquire and at release,
    and the engine's byte accounting adds up."""
    layers, experts, slab, slots = 2, 24, 8192, 9
    pool = ExpertPool(layers, experts, slab)
    expected = {}
    for layer in range(layers):
        for e in range(experts):
            data = torch.from_numpy(
                np.random.default_rng(layer * 100 + e).integers(0, 256, slab, dtype=np.uint8)
            )
            pool.fill(layer, e, data)
            expected[(layer, e)] = data
    cache = SlabCache(pool, slots, policy="lru", device="cpu", min_slots=2)
    engine = CopyEngine(cache, 4)
    errors: list[str] = []
    lock = threading.Lock()

    def check(layer: int, ids: list[int], got: list[int], when: str) -> None:
        for e, s in zip(ids, got):
            if not torch.equal(cache.slot_view(s, torch.uint8, (slab,)), expected[(layer, e)]):
                with lock:
                    errors.append(f"{when}: (layer {layer}, expert {e}) in slot {s}")

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(60):
                layer = int(rng.integers(layers))
                union = rng.permutation(experts)[: int(rng.integers(slots + 1, experts))].tolist()
                # waves of 3: the three threads' pinned waves always fit the 9 slots, their prefetches may not
                bounds = wave_bounds(len(union), 6, True)
                for i, (a, b) in enumerate(bounds):
                    ids = union[a:b]
                    got = engine.acquire(layer, ids)
                    try:
                        check(layer, ids, got, "acquire")
                        if i + 1 < len(bounds):
                            engine.prefetch(layer, union[bounds[i + 1][0] : bounds[i + 1][1]])
                        torch.ones(64, 64) @ torch.ones(64, 64)  # the "compute" the copies overlap
                        check(layer, ids, got, "release")
                    finally:
                        engine.release(layer, ids)
        except Exception as exc:  # surfaced below with the thread's seed
            with lock:
                errors.append(f"thread {seed}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert not errors, f"{len(errors)} problems, first: {errors[:3]}"
        engine.synchronize()
        s, es = cache.stats(), engine.stats()
        assert s["prefetch_hits"] > 0 and s["prefetches"] > 0, s
        assert s["bytes_loaded"] == s["loads"] * slab and es["bytes"] == s["bytes_loaded"], (s, es)
        assert s["loads"] == s["demand_loads"] + s["prefetch_loads"], s
        assert s["prefetches"] == s["prefetch_loads"] + s["prefetch_cancelled"], s
        assert s["misses"] == s["demand_loads"], s
    finally:
        engine.close()
        cache.close()
        pool.close()
