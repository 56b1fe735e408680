"""The policy objects a patched model drives, on their own: the predictor planner's vectorised plan
(the simulator's fast path) equals stepping its ``on_prediction`` hook; ``utility``'s ``after_call``
against an independent recomputation of the moving average and its prefetch; the policies a model
may run. The runtime's calls of these hooks are tested in tests/engine (test_prefetch, test_speculative,
test_fifo_runtime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moert.policy import planner_of, runtime_policy
from moert.policy.score import CLEAR_WRAP
from moert.policy.utility import Utility

L, T, E, K = 4, 5, 12, 2


def planner(policy: str, overprovision, lookahead: int, prefetch: str, threshold: float = 0.6):
    p = runtime_policy(
        policy,
        lookahead=lookahead,
        overprovision=overprovision,
        prefetch=prefetch == "async",
        threshold=threshold,
    )
    p.bind(L, E, K)
    p = planner_of(p)
    p.step = CLEAR_WRAP - 7  # the wrap is reached within the test
    return p


@pytest.mark.parametrize("policy", ["score", "lru"])
@pytest.mark.parametrize("overprovision", [2, "adaptive"])
@pytest.mark.parametrize("lookahead", [0, 2])
@pytest.mark.parametrize("prefetch", ["async", "off"])
def test_predict_sequence_is_every_step_of_on_prediction(policy, overprovision, lookahead, prefetch):
    """``predict_sequence`` equals ``on_prediction`` called per (token, layer), token-major, including
    the clear counter (started just below its wrap) and lookahead rows past the last layer."""
    one, seq = (planner(policy, overprovision, lookahead, prefetch) for _ in range(2))
    logits = torch.randn(L, T, lookahead + 1, E, generator=torch.Generator().manual_seed(3)) * 2
    got = seq.predict_sequence(logits)
    for t in range(T):
        for layer in range(L):
            p = one.on_prediction(layer, logits[layer, t])
            n, where = len(p.layers), f"t={t} layer={layer}"
            planned = one.last_planned.numpy()
            if prefetch == "async":
                np.testing.assert_array_equal(got.ids[t, layer, :n], planned, err_msg=where)
                np.testing.assert_array_equal(p.ids.numpy(), planned, err_msg=where)
            else:
                assert p.ids is None and (got.ids[t, layer] == -1).all(), where
            assert (got.ids[t, layer, n:] == -1).all(), where
            if p.scores is None:
                assert got.scores is None and got.clear is None
            else:
                # vectorised sigmoid may round the last bit differently
                err = np.abs(got.scores[t, layer, :n] - p.scores.numpy()).max()
                assert err <= 1e-6 * max(1.0, float(np.abs(p.scores.numpy()).max())), (where, err)
                assert (got.scores[t, layer, n:] == 0).all()
                assert p.clear == ((layer - 1) % L,) and got.clear[t, layer] == p.clear_score, where
    assert one.step == seq.step


@pytest.mark.parametrize("extra", [None, 0, 2])
@pytest.mark.parametrize("decay", [0.7, 0.9])
def test_utility_after_call_is_the_moving_average(extra, decay):
    """Each plan of ``after_call`` replaces the layer's priorities by u as float32 and prefetches its
    top-(k+m) experts with u > 0 (most useful first, ties to the lower id): u recomputed here."""
    rng = np.random.default_rng(0)
    policy = Utility(extra, decay)
    policy.bind(L, E, K)
    u = np.zeros((L, E))
    width = 0 if extra is None else min(E, K + extra)
    for step in range(40):
        layer = step % L
        counts = rng.integers(0, 3, E) * (rng.random(E) < 0.3)
        plan = policy.after_call(layer, counts)
        u[layer] = decay * u[layer] + (1 - decay) * counts
        assert plan.layers == (layer,) and plan.scores.dtype == np.float32, step
        np.testing.assert_array_equal(plan.scores[0], u[layer].astype(np.float32))
        want = sorted((e for e in range(E) if u[layer, e] > 0), key=lambda e: (-u[layer, e], e))[:width]
        got = [] if plan.ids is None else [int(e) for e in plan.ids[0] if e >= 0]
        assert got == want, (step, got, want)
        assert (plan.ids is None) == (extra is None)
    np.testing.assert_allclose(policy.utility, u, rtol=1e-12, atol=0)


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


def test_the_runtime_skips_hooks_that_cannot_act():
    """``acts_on``: lru and lfu alone leave every hook to the base class (the hot path calls none)."""
    for name in ("lru", "lfu"):
        p = runtime_policy(name)
        assert not any(p.acts_on(h) for h in ("on_prediction", "on_routed", "after_call")), name
    assert runtime_policy("fifo").acts_on("on_routed") and not runtime_policy("fifo").acts_on("after_call")
    assert runtime_policy("utility").acts_on("after_call")
    both = runtime_policy("lru", lookahead=1)
    assert both.acts_on("on_prediction") and not both.acts_on("on_routed")
