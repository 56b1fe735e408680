"""The policy objects make exactly what the engine's hooks make today, so the engine can call them.

- ``score``: :class:`moert.policy.score.ScorePlanner` against ``moert.engine.prefetch.Prefetcher``
  (``prediction`` per step and ``predict_sequence``) on random logits;
- ``utility``: :class:`moert.policy.utility.Utility.after_call` against
  ``moert.engine.speculative.UtilityTracker.observe`` on random counts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moert.api.config import OffloadConfig
from moert.engine.prefetch import _CLEAR_WRAP
from moert.engine.prefetch import Prefetcher as EngineHook
from moert.engine.speculative import UtilityTracker
from moert.policy import planner_of, runtime_policy
from moert.policy.score import CLEAR_WRAP
from moert.policy.utility import Utility

L, T, E, K = 4, 5, 12, 2


def pair(policy: str, overprovision, lookahead: int, prefetch: str, threshold: float = 0.6):
    cfg = OffloadConfig(
        policy=policy,
        predictor="unused.safetensors",
        overprovision=overprovision,
        prefetch=prefetch,
        threshold=threshold,
    )
    engine = EngineHook(None, cfg, L, E, K, lookahead, "sigmoid", "cpu")
    planner = runtime_policy(
        policy,
        lookahead=lookahead,
        probabilities="sigmoid",
        overprovision=overprovision,
        prefetch=prefetch == "async",
        threshold=threshold,
        max_overprovision=cfg.max_overprovision,
        score_decay=cfg.score_decay,
    )
    planner.bind(L, E, K)
    engine._step = _CLEAR_WRAP - 7
    planner = planner_of(planner)
    planner.step = CLEAR_WRAP - 7  # the wrap is reached within the test
    return engine, planner


@pytest.mark.parametrize("policy", ["score", "lru"])
@pytest.mark.parametrize("overprovision", [2, "adaptive"])
@pytest.mark.parametrize("lookahead", [0, 2])
@pytest.mark.parametrize("prefetch", ["async", "off"])
def test_score_planner_is_the_engine_hook(policy, overprovision, lookahead, prefetch):
    engine, planner = pair(policy, overprovision, lookahead, prefetch)
    assert planner.spec == engine.spec and planner.cache_policy == (
        "priority" if policy == "score" else "lru"
    )
    g = torch.Generator().manual_seed(3)
    for t in range(T):
        for layer in range(L):
            logits = torch.randn(3, lookahead + 1, E, generator=g) * 2  # a batch of 3 rows
            kernel = None
            if t % 2:  # the fused kernel's plan, as the CUDA path hands it over
                kernel = engine.plan(layer, logits)[1:]
                kernel = tuple(torch.cat([x, x[:1]]) for x in kernel) if lookahead else kernel
            want = engine.prediction(layer, logits, kernel)
            got = planner.on_prediction(layer, logits, kernel)
            where = f"t={t} layer={layer}"
            assert got.layers == tuple(want.layers) and got.clear == tuple(want.clear), where
            assert got.clear_score == want.clear_score, where
            assert torch.equal(planner.last_planned, want.planned), where
            if prefetch == "async":
                assert torch.equal(got.ids, want.ids), where
            else:
                assert got.ids is None and want.ids.shape[1] == 0, where
            assert (got.scores is None) == (want.scores is None), where
            if got.scores is not None:
                assert torch.equal(got.scores, want.scores), where
    assert planner.step == engine._step


@pytest.mark.parametrize("policy", ["score", "lru"])
@pytest.mark.parametrize("lookahead", [0, 2])
@pytest.mark.parametrize("prefetch", ["async", "off"])
def test_predict_sequence_is_the_engine_hooks(policy, lookahead, prefetch):
    engine, planner = pair(policy, 2, lookahead, prefetch)
    logits = torch.randn(L, T, lookahead + 1, E, generator=torch.Generator().manual_seed(4)) * 2
    ids, scores, clear, cleared = engine.predict_sequence(logits)
    got = planner.predict_sequence(logits)
    if prefetch == "async":
        np.testing.assert_array_equal(got.ids, ids.numpy())
    else:
        assert (got.ids == -1).all() and ids.shape[-1] == 0
    if scores is None:
        assert got.scores is None and got.clear is None
    else:
        np.testing.assert_array_equal(got.scores, scores.numpy())
        want = np.where(np.array(cleared)[None, :] >= 0, clear.numpy(), np.nan)
        np.testing.assert_array_equal(got.clear, want)
    assert planner.step == engine._step


class FakeStore:
    """What ``UtilityTracker`` calls: ``cache.set_priority``, ``present``, ``prefetch`` (recorded)."""

    def __init__(self, resident: np.ndarray) -> None:
        self.cache, self.resident, self.calls = self, resident, []

    def set_priority(self, layer, experts, scores):
        self.calls.append(("priority", layer, np.asarray(experts).tolist(), np.asarray(scores)))

    def present(self, layer):
        return set(np.flatnonzero(self.resident[layer]).tolist())

    def prefetch(self, layer, want):
        self.calls.append(("prefetch", layer, list(want)))
        return len(want)


@pytest.mark.parametrize("extra", [None, 0, 2])
@pytest.mark.parametrize("decay", [0.7, 0.9])
def test_utility_after_call_is_the_engine_tracker(extra, decay):
    """The plan of ``after_call`` is what ``UtilityTracker.observe`` pushes: the layer's u as float32,
    then the top-(k+m) with u > 0 (the engine leaves out the resident ones, as the cache does)."""
    rng = np.random.default_rng(0)
    resident = rng.random((L, E)) < 0.4
    store = FakeStore(resident)
    width = 0 if extra is None else min(E, K + extra)
    tracker = UtilityTracker(store, L, E, width, decay)
    policy = Utility(extra, decay)
    policy.bind(L, E, K)
    for step in range(40):
        layer = step % L
        counts = rng.integers(0, 3, E) * (rng.random(E) < 0.3)
        store.calls.clear()
        tracker.observe(layer, counts.tolist())
        plan = policy.after_call(layer, counts)
        (kind, lay, experts, scores), *fetch = store.calls
        assert plan.layers == (layer,) and lay == layer and experts == list(range(E))
        assert plan.scores.dtype == np.float32 and np.array_equal(plan.scores[0], scores), step
        want = fetch[0][2] if fetch else []
        got = [] if plan.ids is None else [int(e) for e in plan.ids[0] if e >= 0 and not resident[layer, e]]
        assert got == want, (step, got, want)
    np.testing.assert_array_equal(policy.utility, tracker.utility)


def test_runtime_refuses_offline_policies():
    for name in ("belady", "oracle", "moe-infinity"):
        with pytest.raises(ValueError, match=f"not one of lru, lfu, score, utility, fifo.*--policy {name}`"):
            runtime_policy(name)
    with pytest.raises(ValueError, match="attach a predictor"):
        runtime_policy("score")
    assert runtime_policy("fifo").cache_policy == "priority" and runtime_policy("lfu").cache_policy == "lfu"
    assert (
        runtime_policy("lru", lookahead=0).cache_policy == "lru"
        and planner_of(runtime_policy("fifo")) is None
    )
    assert runtime_policy("utility", overprovision=2).extra == 2
    assert runtime_policy("utility", prefetch=False).extra is None
