"""The C++ cache policies (through the simulator's replay paths) against independent Python references."""

from __future__ import annotations

import numpy as np
import pytest
from policy_reference import ReferenceCache, reference_belady_hits

from moert.engine import runtime
from moert.policy.belady import NEVER, next_use


def random_steps(rng, n, layers, E, k, hot=None):
    """n token-major steps (layer, experts); ``hot`` concentrates picks on a few experts."""
    steps = []
    for i in range(n):
        layer = i % layers
        if hot is None:
            ids = rng.choice(E, size=k, replace=False)
        else:
            p = np.ones(E)
            p[:hot] = 8.0
            ids = rng.choice(E, size=k, replace=False, p=p / p.sum())
        steps.append((layer, [int(x) for x in ids]))
    return steps


def adversarial_steps(kind, layers, E, k, slots):
    steps = []
    if kind == "cyclic-scan":  # slots + 1 experts in a cycle: LRU thrashes
        pool = list(range(min(E, slots + k)))
        for i in range(60):
            steps.append((i % layers, [pool[(i * k + j) % len(pool)] for j in range(k)]))
    elif kind == "same":
        steps = [(i % layers, list(range(k))) for i in range(40)]
    elif kind == "hot-then-cold":  # a hot set accessed often, then a long cold scan: LFU keeps the hot set
        for i in range(30):
            steps.append((i % layers, list(range(k))))
        for i in range(40):
            steps.append((i % layers, [(k + i * k + j) % E for j in range(k)]))
    elif kind == "padding":  # -1 padding and repeated ids inside a row
        for i in range(40):
            steps.append((i % layers, [i % E, -1, i % E, (i * 3) % E][:k] + [-1] * max(0, k - 4)))
    return steps


def run_cpp(steps, layers, E, slots, policy, k, priorities=None, prefetch=None):
    cache = runtime.SlabCache.simulated(layers, E, slots, policy=policy, min_slots=1)
    lay = np.array([s[0] for s in steps], dtype=np.int32)
    exp = np.array([s[1] for s in steps], dtype=np.int32).reshape(len(steps), -1)
    pre = None if prefetch is None else np.array(prefetch, dtype=np.int32).reshape(len(steps), -1)
    out = cache.replay(lay, exp, prefetch=pre, priorities=priorities)
    return np.asarray(out["hits_per_step"]), out


def run_reference(steps, slots, policy, priorities=None, prefetch=None):
    ref = ReferenceCache(slots, policy)
    hits = []
    for i, (layer, ids) in enumerate(steps):
        if prefetch is not None:
            ref.prefetch(layer, prefetch[i])
        hits.append(ref.access(layer, ids))
        if priorities is not None:
            ref.set_priority(
                layer, [e for e in ids if e >= 0], [p for e, p in zip(ids, priorities[i]) if e >= 0]
            )
    return np.array(hits)


def assert_same_hits(got, want, label):
    diff = np.nonzero(got != want)[0]
    assert diff.size == 0, (
        f"{label}: first mismatch at step {diff[0]}: C++ {got[diff[0]]} vs reference {want[diff[0]]}"
    )


@pytest.mark.parametrize("policy", ["lru", "lfu", "priority"])
@pytest.mark.parametrize("layers, E, k, slots", [(1, 8, 2, 2), (1, 16, 4, 7), (3, 16, 4, 9), (4, 24, 6, 31)])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_streams_match_reference(policy, layers, E, k, slots, seed):
    rng = np.random.default_rng(seed)
    steps = random_steps(rng, 400, layers, E, k, hot=None if seed == 0 else 3)
    prios = rng.standard_normal((len(steps), k)).astype(np.float32) if policy == "priority" else None
    got, _ = run_cpp(steps, layers, E, slots, policy, k, priorities=prios)
    want = run_reference(steps, slots, policy, priorities=prios)
    assert_same_hits(got, want, f"{policy} L={layers} E={E} k={k} slots={slots}")


@pytest.mark.parametrize("policy", ["lru", "lfu", "priority"])
@pytest.mark.parametrize("kind", ["cyclic-scan", "same", "hot-then-cold", "padding"])
def test_adversarial_streams_match_reference(policy, kind):
    layers, E, k, slots = 2, 16, 4, 5
    steps = adversarial_steps(kind, layers, E, k, slots)
    prios = None
    if policy == "priority":
        prios = np.array([[-(i % 7)] * k for i in range(len(steps))], dtype=np.float32)  # many ties
    got, _ = run_cpp(steps, layers, E, slots, policy, k, priorities=prios)
    want = run_reference(steps, slots, policy, priorities=prios)
    assert_same_hits(got, want, f"{policy} {kind}")


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_prefetch_matches_reference(policy):
    rng = np.random.default_rng(3)
    layers, E, k, slots = 2, 12, 3, 5
    steps = random_steps(rng, 300, layers, E, k)
    prefetch = [[int(x) for x in rng.choice(E, size=2, replace=False)] for _ in steps]
    got, out = run_cpp(steps, layers, E, slots, policy, k, prefetch=prefetch)
    want = run_reference(steps, slots, policy, prefetch=prefetch)
    assert_same_hits(got, want, f"{policy}+prefetch")
    assert out["prefetch_hits"] <= out["prefetches"]


def test_next_use_matches_naive():
    rng = np.random.default_rng(0)
    N, L, k, E = 50, 3, 2, 6
    experts = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(N)])
    got = next_use(experts)
    for t in range(N):
        for layer in range(L):
            for j in range(k):
                e = experts[t, layer, j]
                want = next((u for u in range(t + 1, N) if e in experts[u, layer]), -1)
                assert got[t, layer, j] == want, (t, layer, j)


@pytest.mark.parametrize("layers, E, k, slots", [(1, 10, 2, 3), (2, 12, 3, 5), (3, 16, 4, 13)])
def test_belady_priorities_give_textbook_belady(layers, E, k, slots):
    rng = np.random.default_rng(5)
    steps = random_steps(rng, 240, layers, E, k, hot=4)
    N = len(steps) // layers
    experts = np.array([s[1] for s in steps]).reshape(N, layers, k)
    nxt = next_use(experts)
    prio = np.where(nxt >= 0, -(nxt * layers + np.arange(layers)[None, :, None]), NEVER).astype(np.float32)
    got, _ = run_cpp(steps, layers, E, slots, "priority", k, priorities=prio.reshape(N * layers, k))
    assert int(got.sum()) == reference_belady_hits(steps, slots)
