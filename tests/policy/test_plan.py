"""The Plan contract: its checks, merge, and that the simulator applies a plan as the C++ copy engine does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moert.engine.runtime import CopyEngine, ExpertPool, SlabCache
from moert.policy import Plan
from moert.sim.step import Caches, apply_plan


def test_rows_must_match_layers():
    with pytest.raises(ValueError, match="one row per layer"):
        Plan(layers=(0, 1), ids=np.zeros((1, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="one row per layer"):
        Plan(layers=(0,), scores=torch.zeros(2, 8))
    plan = Plan(layers=(2,), scores=torch.zeros(1, 8))  # torch tensors are taken as they are
    layers, ids, scores, clear, clear_score = plan.predict_args()
    assert layers == [2] and ids.shape == (1, 0) and ids.dtype == np.int32 and scores is plan.scores
    assert clear == [] and clear_score == 0.0


def test_merge_puts_priorities_before_prefetch():
    prio = Plan((0, 1, 2), scores=np.arange(24, dtype=np.float32).reshape(3, 8), clear=(3,), clear_score=-5.0)
    fetch = Plan((1,), ids=torch.tensor([[4, 5, -1]], dtype=torch.int32))
    both = Plan.merge(prio, fetch)
    assert both.layers == (0, 1, 2) and both.clear == (3,) and both.clear_score == -5.0
    assert both.ids.tolist() == [[-1, -1, -1], [4, 5, -1], [-1, -1, -1]] and both.scores is prio.scores
    assert Plan.merge(None, fetch) is fetch and Plan.merge(prio, None) is prio
    with pytest.raises(ValueError, match="get no scores"):
        Plan.merge(Plan((0,), scores=np.zeros((1, 8), np.float32)), Plan((1,), ids=np.array([[2]])))
    with pytest.raises(ValueError, match="only set priorities"):
        Plan.merge(prio, Plan((1,), scores=np.zeros((1, 8), np.float32)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_apply_plan_is_copy_engine_predict(seed):
    """Random plans applied to a simulated cache and, by ``CopyEngine.predict``, to the CPU twin: the
    same resident experts and the same counters after every plan and access. One prefetch row per plan:
    the twin's copies are still in flight when a later row evicts (the simulated cache loads at once)."""
    rng = np.random.default_rng(seed)
    print(f"seed {seed}")
    L, E, slots = 3, 10, 7
    pool = ExpertPool(L, E, 16, pin=False)
    cache = SlabCache(pool, slots, policy="priority", device="cpu", min_slots=2)
    engine = CopyEngine(cache, 1)
    sim = Caches("global", L, E, slots, "priority", slab_bytes=16, min_slots=2)
    try:
        for step in range(60):
            layers = (int(rng.integers(L)),)
            ids = rng.integers(-1, E, size=(1, 3)).astype(np.int32)
            scores = rng.standard_normal((1, E)).astype(np.float32) if rng.random() < 0.7 else None
            clear = (int(rng.integers(L)),) if rng.random() < 0.5 else ()
            plan = Plan(layers, ids, scores, clear, -float(step))
            engine.predict(*plan.predict_args())
            engine.synchronize()
            apply_plan(sim, plan)
            layer, want = int(rng.integers(L)), rng.choice(E, 2, replace=False)
            engine.acquire(layer, want)
            engine.release(layer, want)
            sim.at(layer)[0].sim_access(layer, want)
            for li in range(L):
                got = sim.at(li)[0].resident(li)
                assert torch.equal(cache.resident(li), got), f"seed {seed} step {step} layer {li}"
        keys = ("hits", "misses", "evictions", "prefetches", "prefetch_hits", "prefetch_wasted", "loads")
        real, simulated = cache.stats(), sim.stats()
        assert {k: real[k] for k in keys} == {k: simulated[k] for k in keys}, (real, simulated)
    finally:
        sim.close()
        engine.close()
        cache.close()
        pool.close()
