"""Policy ``fifo`` in the simulator against the plain-Python reference FIFO cache
(tests/policy/policy_reference.py), and what makes it FIFO rather than LRU."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "policy"))
sys.path.insert(0, str(Path(__file__).parent))
from policy_reference import ReferenceCache  # noqa: E402
from test_sim import random_trace  # noqa: E402

from moert.policy import Fifo  # noqa: E402
from moert.sim import SimConfig, num_slots, parse_policies, simulate  # noqa: E402
from moert.trace import InMemoryTrace, SequenceTrace, TraceMeta  # noqa: E402


def reference(trace, capacity: float, mode: str) -> tuple[np.ndarray, int]:
    """(per-layer hits, demand misses) of the reference FIFO cache on the token-major stream."""
    meta = trace.meta
    L = meta.num_layers
    slots = num_slots(capacity, meta, mode)
    caches = [ReferenceCache(slots, "fifo") for _ in range(L if mode == "per-layer" else 1)]
    hits = np.zeros(L, dtype=np.int64)
    misses = 0
    for seq in trace.sequences():
        for t in range(seq.num_tokens):
            for layer in range(L):
                cache, cl = (caches[layer], 0) if mode == "per-layer" else (caches[0], layer)
                ids = seq.experts[layer, t].tolist()
                h = cache.access(cl, ids)
                hits[layer] += h
                misses += len(set(ids)) - h
    return hits, misses


@pytest.mark.parametrize("mode", ["per-layer", "global"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fifo_matches_reference(mode, seed):
    trace = random_trace(seed=seed, hot=seed != 2)
    caps = (0.25, 0.5, 0.8)
    cfg = SimConfig(capacities=caps, policies=tuple(parse_policies(["fifo"])), mode=mode, chunk_tokens=20)
    for row in simulate(trace, cfg)["results"]:
        want, misses = reference(trace, row["capacity"], mode)
        got = np.round(np.array(row["hit_rate_per_layer"]) * row["accesses"] / len(want)).astype(np.int64)
        assert row["hits"] == int(want.sum()) and np.array_equal(got, want), (
            f"seed {seed} {mode} @{row['capacity']}: per-layer hits {got.tolist()} vs reference {want.tolist()}"
        )
        assert row["demand_misses"] == misses


def test_fifo_on_real_traces(shared_traces):
    from moert.trace.importers.moe_beyond_csv import parse_csv

    seqs = []
    for n in (1, 2, 3, 4):
        _, tokens, experts = parse_csv(shared_traces / f"prompt_{n}_data.csv")
        seqs.append(
            SequenceTrace(n, torch.arange(len(tokens)), experts, torch.ones(len(tokens), dtype=torch.bool))
        )
    trace = InMemoryTrace(TraceMeta("deepseek_v2", tuple(range(1, 27)), 64, 6), seqs)
    for mode, capacity in (("per-layer", 0.25), ("global", 0.1)):
        cfg = SimConfig(capacities=(capacity,), policies=tuple(parse_policies(["fifo", "lru"])), mode=mode)
        fifo, lru = simulate(trace, cfg)["results"]
        want, _ = reference(trace, capacity, mode)
        assert fifo["hits"] == int(want.sum()), (mode, fifo["hits"], int(want.sum()))
        assert fifo["hits"] != lru["hits"]


def test_hits_do_not_refresh():
    """Three slots, experts 0 1 2 loaded in that order, then 0 is hit: LRU evicts 1 for 3, FIFO evicts 0."""
    steps = [0, 1, 2, 0, 3, 0]
    experts = torch.tensor(steps).reshape(1, len(steps), 1)  # [L, T, k]
    seq = SequenceTrace(0, torch.arange(len(steps)), experts, torch.ones(len(steps), dtype=torch.bool))
    trace = InMemoryTrace(TraceMeta("test", (1,), 4, 1), [seq])
    rows = simulate(trace, SimConfig(capacities=(0.75,), policies=tuple(parse_policies(["fifo", "lru"]))))
    fifo, lru = rows["results"]
    assert fifo["slots_per_cache"] == 3 and (fifo["hits"], lru["hits"]) == (1, 2)


def test_fifo_plan():
    """On a miss the expert gets the next tick (a call's misses in ascending id); a hit changes nothing."""
    fifo = Fifo()
    fifo.bind(2, 6, 2)
    resident = np.zeros(6, dtype=bool)
    plan = fifo.on_routed(1, np.array([0, 0, 1, 0, 0, 1]), resident)
    assert plan.layers == (1,) and plan.scores.tolist() == [[0, 0, 1, 0, 0, 2]] and plan.ids is None
    resident[[2, 5]] = True
    assert fifo.on_routed(1, np.array([0, 0, 1, 0, 0, 1]), resident) is None
    plan = fifo.on_routed(0, np.array([1, 0, 1, 0, 0, 0]), np.array([0, 0, 1, 0, 0, 0], dtype=bool))
    assert plan.layers == (0,) and plan.scores.tolist() == [[3, 0, 0, 0, 0, 0]]
