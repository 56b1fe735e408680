"""SlabCache bookkeeping (simulated mode) against the plain-Python reference in slab_cache_reference.py,
totals and per-layer rows (layer_accounting.LayerRef)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from layer_accounting import LayerRef, check_layer_rows
from slab_cache_reference import RefCache

from moert.engine.runtime import SlabCache

KEYS = [
    "hits",
    "misses",
    "evictions",
    "prefetches",
    "prefetch_hits",
    "prefetch_wasted",
    "prefetch_wasted_bytes",
    "prefetch_dropped",
    "loads",
    "demand_loads",
    "prefetch_loads",
    "bytes_loaded",
]


def _compare(cache: SlabCache, ref: LayerRef, where: str) -> None:
    stats = cache.stats(per_layer=True)
    got = {k: stats[k] for k in KEYS}
    want = ref.stats_dict(KEYS)
    bad = {k: (got[k], want[k]) for k in KEYS if got[k] != want[k]}
    assert not bad, f"{where}: stats differ (got, reference): {bad}"
    check_layer_rows(stats, cache.slab_bytes)
    rows, want_rows = {k: stats["per_layer"][k].tolist() for k in KEYS}, ref.layer_rows(KEYS)
    bad = {k: (rows[k], want_rows[k]) for k in KEYS if rows[k] != want_rows[k]}
    assert not bad, f"{where}: per-layer rows differ (got, reference): {bad}"
    for layer in range(ref.num_layers):
        res = cache.resident(layer).tolist()
        assert res == ref.resident(layer), (
            f"{where}: residency of layer {layer} differs: {res} vs {ref.resident(layer)}"
        )


def _zipf_stream(
    rng: np.random.Generator, steps: int, layers: int, experts: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) layers cycling like decode, (N, k) distinct experts drawn zipf-skewed per layer."""
    weights = 1.0 / np.arange(1, experts + 1) ** 1.1
    perms = [rng.permutation(experts) for _ in range(layers)]
    lay = np.arange(steps, dtype=np.int32) % layers
    exp = np.empty((steps, k), dtype=np.int32)
    for i in range(steps):
        ranks = rng.choice(experts, size=k, replace=False, p=weights / weights.sum())
        exp[i] = perms[lay[i]][ranks]
    return lay, exp


@pytest.mark.parametrize("policy", ["lru", "lfu", "priority"])
@pytest.mark.parametrize(("layers", "experts", "slots", "k"), [(1, 4, 2, 2), (3, 7, 5, 3), (4, 64, 37, 6)])
def test_random_operations_match_reference(policy, layers, experts, slots, k):
    rng = np.random.default_rng(layers * 1000 + slots)
    slab = 48
    cache = SlabCache.simulated(layers, experts, slots, policy=policy, slab_bytes=slab, min_slots=k)
    ref = LayerRef(layers, experts, slots, policy, slab_bytes=slab)
    for step in range(1500):
        layer = int(rng.integers(layers))
        op = rng.random()
        ids = rng.integers(experts, size=int(rng.integers(1, k + 1))).tolist()  # duplicates on purpose
        if op < 0.6:
            got, want = cache.sim_access(layer, ids), ref.access(layer, ids)
            assert got == want, f"step {step}: access({layer}, {ids}) hits {got}, reference {want}"
        elif op < 0.85:
            ids = rng.integers(experts, size=int(rng.integers(1, slots + 2))).tolist()
            got, want = cache.sim_prefetch(layer, ids), ref.prefetch(layer, ids)
            assert got == want, f"step {step}: prefetch({layer}, {ids}) loaded {got}, reference {want}"
        else:
            scores = rng.integers(-3, 4, size=len(ids)).astype(np.float32)
            cache.set_priority(layer, ids, torch.from_numpy(scores))
            for e, s in zip(ids, scores.tolist()):
                ref.set_priority(layer, e, s)
        if step % 50 == 0:
            _compare(cache, ref, f"step {step}")
    _compare(cache, ref, "end")
    s = cache.stats()
    assert s["bytes_loaded"] == s["loads"] * slab
    assert s["loads"] == s["demand_loads"] + s["prefetch_loads"] and s["misses"] == s["demand_loads"]


def test_lfu_evicts_least_used_then_oldest():
    cache = SlabCache.simulated(1, 8, 3, policy="lfu")
    for ids in ([0], [0], [1], [2], [1]):  # uses: 0 -> 2, 1 -> 2, 2 -> 1
        cache.sim_access(0, ids)
    cache.sim_access(0, [3])  # evicts 2 (fewest uses)
    assert cache.resident(0)[:4].tolist() == [True, True, False, True]
    cache.sim_access(0, [4])  # 3 has 1 use: evicted
    assert cache.resident(0)[:5].tolist() == [True, True, False, False, True]


def test_priority_evicts_lowest_score_ties_to_lru():
    cache = SlabCache.simulated(2, 8, 3, policy="priority")
    cache.sim_access(1, [5, 6, 7])
    cache.set_priority(1, [5, 6, 7], [2.0, -1.0, 2.0])
    cache.sim_access(1, [0])
    assert cache.lookup(1, 6) == -1 and cache.resident(1)[[5, 7, 0]].all()
    cache.set_priority(1, [0], 2.0)  # all equal now: the least recently used (5) goes
    cache.sim_access(1, [1])
    assert cache.lookup(1, 5) == -1


def test_prefetch_accounting_hits_and_waste():
    cache = SlabCache.simulated(1, 8, 2, policy="lru", slab_bytes=32)
    assert cache.sim_prefetch(0, [1, 2, 3]) == 2  # a batch never evicts its own entries
    assert cache.stats()["prefetch_dropped"] == 1
    assert cache.sim_access(0, [1]) == 1
    cache.sim_access(0, [4])  # evicts 2, prefetched and never used
    s = cache.stats()
    assert (s["prefetch_hits"], s["prefetch_wasted"], s["prefetch_wasted_bytes"]) == (1, 1, 32)
    assert s["bytes_loaded"] == 32 * s["loads"] == 32 * 3


@pytest.mark.parametrize("policy", ["lru", "lfu", "priority"])
def test_prefetch_batch_never_evicts_its_resident_members(policy):
    cache = SlabCache.simulated(1, 8, 3, policy=policy)
    for e in (0, 1, 2):  # 0 is the least recently (and, for lfu, least often) used
        cache.sim_access(0, [e] * (1 if e == 0 else 2))
    # 0 is already resident and part of the batch: the loads of 3 and 4 must evict 1 and 2.
    assert cache.sim_prefetch(0, [0, 3, 4]) == 2
    assert cache.resident(0)[:5].tolist() == [True, False, False, True, True]
    assert cache.sim_access(0, [0, 3, 4]) == 3


def test_replay_matches_step_by_step_and_reference():
    rng = np.random.default_rng(7)
    layers, experts, slots, k, m = 5, 24, 17, 4, 3
    lay, exp = _zipf_stream(rng, 1200, layers, experts, k)
    exp[::7, -1] = -1  # padding
    pre = rng.integers(-1, experts, size=(len(lay), m)).astype(np.int32)
    pre_layers = ((lay + 1) % layers).astype(np.int32)
    prio = rng.integers(0, 5, size=exp.shape).astype(np.float32)
    for policy in ("lru", "lfu", "priority"):
        batch = SlabCache.simulated(layers, experts, slots, policy=policy, min_slots=k)
        out = batch.replay(
            lay, torch.from_numpy(exp), prefetch=pre, prefetch_layers=pre_layers, priorities=prio
        )
        step = SlabCache.simulated(layers, experts, slots, policy=policy, min_slots=k)
        ref = RefCache(layers, experts, slots, policy)
        hits_step, hits_ref = [], []
        for i in range(len(lay)):
            row_pre = [e for e in pre[i].tolist() if e >= 0]
            step.sim_prefetch(int(pre_layers[i]), row_pre)
            ref.prefetch(int(pre_layers[i]), row_pre)
            row = [e for e in exp[i].tolist() if e >= 0]
            hits_step.append(step.sim_access(int(lay[i]), row))
            hits_ref.append(ref.access(int(lay[i]), row))
            step.set_priority(int(lay[i]), row, [float(prio[i, j]) for j in range(k) if exp[i, j] >= 0])
            for j in range(k):
                if exp[i, j] >= 0:
                    ref.set_priority(int(lay[i]), int(exp[i, j]), float(prio[i, j]))
        got = out["hits_per_step"].tolist()
        first = next((i for i, (a, b) in enumerate(zip(got, hits_ref)) if a != b), None)
        assert got == hits_step == hits_ref, f"{policy}: first differing step {first}"
        assert {k_: out[k_] for k_ in KEYS} == {k_: step.stats()[k_] for k_ in KEYS} == ref.stats_dict(KEYS)
        assert out["hits_per_step"].dtype == torch.int32 and out["hits"] == sum(got) > 0


def test_replay_per_layer_rows_match_step_by_step_and_reset():
    """Replay files its counts per layer exactly as stepping does; reset_stats zeroes the rows."""
    rng = np.random.default_rng(5)
    layers, experts, slots, k, m = 4, 20, 13, 3, 2
    lay, exp = _zipf_stream(rng, 600, layers, experts, k)
    pre = rng.integers(-1, experts, size=(len(lay), m)).astype(np.int32)
    pre_layers = ((lay + 1) % layers).astype(np.int32)
    batch = SlabCache.simulated(layers, experts, slots, policy="lru", slab_bytes=8, min_slots=k)
    batch.replay(lay, exp, prefetch=pre, prefetch_layers=pre_layers)
    step = SlabCache.simulated(layers, experts, slots, policy="lru", slab_bytes=8, min_slots=k)
    ref = LayerRef(layers, experts, slots, "lru", slab_bytes=8)
    for i in range(len(lay)):
        row_pre = [e for e in pre[i].tolist() if e >= 0]
        step.sim_prefetch(int(pre_layers[i]), row_pre)
        ref.prefetch(int(pre_layers[i]), row_pre)
        step.sim_access(int(lay[i]), exp[i].tolist())
        ref.access(int(lay[i]), exp[i].tolist())
    got, want = batch.stats(per_layer=True), step.stats(per_layer=True)
    assert {k_: v.tolist() for k_, v in got["per_layer"].items()} == {
        k_: v.tolist() for k_, v in want["per_layer"].items()
    }
    _compare(batch, ref, "replay")
    assert got["evictions"] > 0 and got["prefetch_wasted"] > 0 and got["prefetch_hits"] > 0, got
    batch.reset_stats()
    zero = batch.stats(per_layer=True)
    assert all(zero[k_] == 0 for k_ in KEYS) and all(not v.any() for v in zero["per_layer"].values())


def test_evictions_count_in_the_evicted_entrys_layer():
    cache = SlabCache.simulated(2, 4, 2, policy="lru", slab_bytes=4)
    cache.sim_access(0, [0, 1])
    cache.sim_prefetch(1, [2])  # evicts (0, 0): layer 0's eviction, layer 1's prefetch
    cache.sim_access(1, [3])  # evicts (0, 1)
    cache.sim_access(1, [0])  # evicts the prefetched (1, 2) unused: layer 1's eviction and waste
    rows = cache.stats(per_layer=True)["per_layer"]
    assert rows["evictions"].tolist() == [2, 1] and rows["prefetch_wasted"].tolist() == [0, 1]
    assert rows["prefetches"].tolist() == [0, 1] and rows["bytes_loaded"].tolist() == [8, 12]


def test_replay_without_prefetch_and_stats_delta():
    lay, exp = _zipf_stream(np.random.default_rng(3), 300, 2, 16, 2)
    cache = SlabCache.simulated(2, 16, 4, policy="lru")
    cache.sim_access(0, [0, 1])
    before = cache.stats()
    out = cache.replay(lay, exp)
    after = cache.stats()
    assert all(out[k] == after[k] - before[k] for k in KEYS)
    assert out["hits"] + out["misses"] == 600


class _CacheMachine(RuleBasedStateMachine):
    """Random sequences of access / prefetch / priority updates, checked against the reference."""

    policy = "lru"
    L, E, S = 2, 6, 3

    def __init__(self) -> None:
        super().__init__()
        self.cache = SlabCache.simulated(self.L, self.E, self.S, policy=self.policy, slab_bytes=16)
        self.ref = LayerRef(self.L, self.E, self.S, self.policy, slab_bytes=16)

    @rule(layer=st.integers(0, 1), ids=st.lists(st.integers(0, 5), min_size=1, max_size=3))
    def access(self, layer, ids):
        assert self.cache.sim_access(layer, ids) == self.ref.access(layer, ids)

    @rule(layer=st.integers(0, 1), ids=st.lists(st.integers(0, 5), min_size=1, max_size=5))
    def prefetch(self, layer, ids):
        assert self.cache.sim_prefetch(layer, ids) == self.ref.prefetch(layer, ids)

    @rule(layer=st.integers(0, 1), expert=st.integers(0, 5), score=st.integers(-2, 2))
    def set_priority(self, layer, expert, score):
        self.cache.set_priority(layer, [expert], [float(score)])
        self.ref.set_priority(layer, expert, float(score))

    @rule()
    def reset_stats(self):
        self.cache.reset_stats()
        self.ref.stats.clear()

    @invariant()
    def same_state(self):
        _compare(self.cache, self.ref, "state machine")


_SETTINGS = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)


class _Lru(_CacheMachine):
    policy = "lru"


class _Lfu(_CacheMachine):
    policy = "lfu"


class _Priority(_CacheMachine):
    policy = "priority"


TestLruMachine = _SETTINGS(_Lru).TestCase
TestLfuMachine = _SETTINGS(_Lfu).TestCase
TestPriorityMachine = _SETTINGS(_Priority).TestCase
