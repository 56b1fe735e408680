"""Speculative decoding in the simulator (``--verify-tokens N``) and MoE-SpAc's ``utility`` policy and
prefetcher, against the plain-Python reference cache (tests/policy/policy_reference.py): each verify pass
of N tokens accesses the union of its experts once per layer (in waves when the union exceeds the cache);
``utility`` ranks by a moving average of per-call counts, computed here from scratch and pushed for every
expert after every call."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "policy"))
from policy_reference import ReferenceCache, distinct, reference_belady_hits  # noqa: E402

from moert.cli import simulate as sim_cli  # noqa: E402
from moert.policy import build  # noqa: E402
from moert.sim import (  # noqa: E402
    CostModel,
    SimConfig,
    group_verify_passes,
    num_slots,
    parse_policies,
    simulate,
)
from moert.trace import InMemoryTrace, SequenceTrace, TraceMeta  # noqa: E402

KEYS = ("hits", "accesses", "demand_misses", "prefetches", "prefetch_hits", "prefetch_wasted", "bytes_loaded")


def random_trace(seed=0, L=3, E=16, k=4, lengths=(9, 14, 5, 11, 8, 1)) -> InMemoryTrace:
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, T in enumerate(lengths):
        w = torch.ones(L, T, E)
        w[:, :, torch.randperm(E, generator=g)[:k]] = 6.0  # a few hot experts per sequence
        experts = torch.multinomial(w.reshape(-1, E), k, replacement=False, generator=g).reshape(L, T, k)
        seqs.append(SequenceTrace(i, torch.arange(T), experts, torch.ones(T, dtype=torch.bool)))
    return InMemoryTrace(TraceMeta("test", tuple(range(1, L + 1)), E, k), seqs)


def run(trace, policy, n, capacity, mode="per-layer", decay=0.7) -> dict:
    cfg = SimConfig(
        capacities=(capacity,),
        policies=tuple(parse_policies([policy])),
        mode=mode,
        verify_tokens=n,
        utility_decay=decay,
    )
    (row,) = simulate(trace, cfg)["results"]
    return row


def reference(trace, policy, n, capacity, decay=0.7) -> dict:
    """Per-layer reference: passes of n tokens, each layer's union accessed once (waves of the cache's slots,
    resident first, when it does not fit), utility recomputed from scratch and pushed for all E (as float32,
    what the runtime pushes) after each call, then the utility prefetch = top-(k+m) by utility > 0 (for the
    layer's next call)."""
    meta = trace.meta
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    slots = num_slots(capacity, meta, "per-layer")
    evict, _, pre = policy.partition("+")
    m = int(pre.partition(":")[2] or 0) if pre else None
    cpp = {"lru": "lru", "lfu": "lfu", "utility": "priority"}[evict]
    caches = [ReferenceCache(slots, cpp) for _ in range(L)]
    u = np.zeros((L, E))
    hits = misses = prefetched = tokens = 0
    for seq in trace.sequences():
        ex = seq.experts.numpy()
        T = ex.shape[1]
        tokens += T
        for p0 in range(0, T, n):
            for layer in range(L):
                cache = caches[layer]
                # one token: its own order (today's replay); a pass: the union by id (the runtime's order)
                union = (
                    distinct(ex[layer, p0])
                    if n == 1
                    else sorted({int(e) for e in ex[layer, p0 : p0 + n].ravel()})
                )
                if len(union) > slots:
                    resident = [e for e in union if (0, e) in cache.entries]
                    union = resident + [e for e in union if (0, e) not in cache.entries]
                h = sum(cache.access(0, union[w : w + slots]) for w in range(0, len(union), slots))
                hits, misses = hits + h, misses + len(union) - h
                counts = np.bincount(ex[layer, p0 : p0 + n].ravel(), minlength=E)
                u[layer] = decay * u[layer] + (1 - decay) * counts
                if evict == "utility":
                    cache.set_priority(0, range(E), u[layer].astype(np.float32))
                if m is not None:  # utility prefetch from the calls so far, for the next call
                    top = sorted(range(E), key=lambda e, layer=layer: (-u[layer, e], e))[: k + m]
                    resident = set(cache.entries)
                    cache.prefetch(0, [e for e in top if u[layer, e] > 0])
                    prefetched += len(set(cache.entries) - resident)
    return {"hits": hits, "demand_misses": misses, "prefetch_loads": prefetched, "tokens": tokens}


def test_grouping_unions():
    trace = random_trace(lengths=(7,))
    (seq,) = trace.sequences()
    for n in (1, 2, 3, 7, 9):
        g = group_verify_passes(seq, n)
        ex = seq.experts.numpy()
        assert g.num_tokens == -(-7 // n) and g.generated == 7 and g.experts.shape[2] == n * 4
        for p in range(g.num_tokens):
            for layer in range(3):
                want = sorted(set(ex[layer, p * n : (p + 1) * n].ravel().tolist()))
                got = g.experts[layer, p].tolist()
                assert got == want + [-1] * (n * 4 - len(want)), (n, p, layer, got, want)


@pytest.mark.parametrize(
    "policy", ["lru", "lfu", "moe-infinity", "belady", "lru+oracle", "lfu+moe-infinity", "utility"]
)
@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_n1_is_autoregressive(policy, mode):
    """N = 1 is the token-by-token replay: the same counts as a config that never heard of verify passes,
    and the per-token metrics reduce to the old ones."""
    trace = random_trace()
    old = simulate(
        trace, SimConfig(capacities=(0.25, 0.5), policies=tuple(parse_policies([policy])), mode=mode)
    )
    new = simulate(
        trace,
        SimConfig(
            capacities=(0.25, 0.5), policies=tuple(parse_policies([policy])), mode=mode, verify_tokens=1
        ),
    )
    for a, b in zip(old["results"], new["results"]):
        assert {key: a[key] for key in KEYS} == {key: b[key] for key in KEYS}
        assert b["token_hit_rate"] == pytest.approx(b["hit_rate"]) and b["tokens"] == trace.meta.num_tokens
        assert b["predicted_tok_s"] == a["predicted_tok_s"]


@pytest.mark.parametrize(
    "policy", ["lru", "lfu", "utility", "utility+utility:2", "lru+utility:2", "lru+utility"]
)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("capacity", [0.25, 0.5, 1.0])  # 4, 8, 16 slots: waves at 0.25 and 0.5 for N > 1
@pytest.mark.parametrize("decay", [0.7, 0.9])
def test_against_reference(policy, n, capacity, decay):
    trace = random_trace(seed=n)
    row = run(trace, policy, n, capacity, decay=decay)
    ref = reference(trace, policy, n, capacity, decay=decay)
    got = {
        "hits": row["hits"],
        "demand_misses": row["demand_misses"],
        "prefetch_loads": row["cache_stats"].get("prefetch_loads", 0),
        "tokens": row["tokens"],
    }
    assert got == ref, f"{policy} N={n} capacity={capacity}: simulator {got} vs reference {ref}"
    assert row["accesses"] == row["hits"] + row["demand_misses"]
    assert row["token_hit_rate"] == pytest.approx(1 - row["demand_misses"] / (trace.meta.num_tokens * 3 * 4))


@pytest.mark.parametrize("n", [2, 4])
def test_belady_passes(n):
    """Belady on verify passes (every union fits): the textbook Belady over the pass steps."""
    trace = random_trace(seed=3, E=12, k=3)
    L = trace.meta.num_layers
    row = run(trace, "belady", n, 1.0)
    steps = []
    for seq in trace.sequences():
        g = group_verify_passes(seq, n)
        steps += [(0, g.experts[layer, p].tolist()) for p in range(g.num_tokens) for layer in range(L)]
    slots = num_slots(1.0, trace.meta, "per-layer")
    want = sum(
        reference_belady_hits(
            [(0, e) for (_, e), i in zip(steps, range(len(steps))) if i % L == layer], slots
        )
        for layer in range(L)
    )
    assert row["hits"] == want


def test_utility_uses_only_the_past():
    """Changing the future (the last pass) changes no prefetch and no priority planned before it."""
    trace = random_trace(lengths=(10,))
    (seq,) = trace.sequences()
    other = seq.experts.clone()
    other[:, -1] = (other[:, -1] + 1) % 16
    plans = []
    for ex in (seq.experts, other):
        s = SequenceTrace(0, seq.positions, ex, seq.is_prefill)
        p = build("utility:2", "prefetch")
        p.bind(3, 16, 4)
        plans.append(p.sequence_plan(s))
    np.testing.assert_array_equal(plans[0].after_ids[:-1], plans[1].after_ids[:-1])
    np.testing.assert_array_equal(plans[0].after_scores[:-1], plans[1].after_scores[:-1])
    assert plans[0].after_ids.shape == (10, 3, 6) and plans[0].before is None  # nothing before the first call


def test_generated_token_metrics_compare_across_n():
    trace = random_trace()
    cost = CostModel()
    for n in (1, 3):
        row = run(trace, "lru", n, 0.5)
        assert row["tokens"] == trace.meta.num_tokens and row["passes"] == sum(
            -(-s.num_tokens // n) for s in trace.sequences()
        )
        loads = row["cache_stats"]["loads"]
        assert row["loads_per_token"] == pytest.approx(loads / trace.meta.num_tokens)
        bw = cost.bandwidth_gbs * 1e9
        t = max(3 * cost.layer_compute_ms * 1e-3 / n, 0.0) + row["bytes_per_token"] / bw
        assert row["pooled_tok_s"] == pytest.approx(1 / t)
        # windowed (demand only): every pass's 3 layers compute, a short last pass as a whole one
        tokens = row["tokens"]
        t = (row["passes"] * 3 * cost.layer_compute_ms * 1e-3 + row["bytes_per_token"] * tokens / bw) / tokens
        assert row["predicted_tok_s"] == pytest.approx(1 / t)


def test_errors_name_the_fix():
    pol = tuple(parse_policies(["lru"]))
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="--verify-tokens 3"):
            SimConfig(policies=pol, verify_tokens=bad)
    for bad in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="--utility-decay 0.7"):
            SimConfig(policies=pol, utility_decay=bad)
    with pytest.raises(ValueError, match="--cpu-expert-ms"):
        SimConfig(policies=pol, verify_tokens=2, cost=CostModel(cpu_expert_ms=1.0))
    trace = random_trace()
    with pytest.raises(ValueError, match="use one of lru, lfu, belady, utility"):
        simulate(trace, SimConfig(policies=tuple(parse_policies(["moe-infinity"])), verify_tokens=2))
    with pytest.raises(ValueError, match="use utility"):
        simulate(trace, SimConfig(policies=tuple(parse_policies(["lru+moe-infinity"])), verify_tokens=2))
    with pytest.raises(ValueError, match="utility:2"):
        build("utility:x", "prefetch")
    parser = __import__("argparse").ArgumentParser()
    sim_cli.add_arguments(parser)
    for flag, value in (("--verify-tokens", "0"), ("--utility-decay", "1")):
        with pytest.raises(SystemExit):
            parser.parse_args(["t", flag, value])


def test_distinct_helper_is_the_reference():  # the reference's own dedup, used above
    assert distinct([3, -1, 3, 2]) == [3, 2]
