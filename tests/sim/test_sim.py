"""The simulator end to end: per-layer and global replays against the Python reference cache,
Belady as the upper bound, the capacity = k identity, MoE-Infinity's matching, the cost model, the CLI."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "policy"))
from policy_reference import ReferenceCache  # noqa: E402

from moert.cli import simulate as sim_cli  # noqa: E402
from moert.policy import TracePrefetcher, build  # noqa: E402
from moert.policy.moe_infinity import MoEInfinity  # noqa: E402
from moert.sim import CostModel, SimConfig, num_slots, parse_policies, simulate  # noqa: E402
from moert.trace import InMemoryTrace, SequenceTrace, TraceMeta, TraceWriter  # noqa: E402


def random_trace(seed=0, L=3, E=16, k=4, lengths=(9, 14, 5, 11, 8), hot=True) -> InMemoryTrace:
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, T in enumerate(lengths):
        w = torch.ones(L, T, E)
        if hot:  # each sequence prefers a few experts, like real routing
            w[:, :, torch.randperm(E, generator=g)[:k]] = 6.0
        experts = torch.multinomial(w.reshape(-1, E), k, replacement=False, generator=g).reshape(L, T, k)
        seqs.append(SequenceTrace(i, torch.arange(T), experts, torch.ones(T, dtype=torch.bool)))
    meta = TraceMeta(model_type="test", layers=tuple(range(1, L + 1)), num_experts=E, top_k=k)
    return InMemoryTrace(meta, seqs)


def reference_hits(trace, capacity, mode, evict, prefetch=False) -> np.ndarray:
    """Per-layer hits of the reference cache on the token-major stream."""
    meta = trace.meta
    L, E = meta.num_layers, meta.num_experts
    slots = num_slots(capacity, meta, mode)
    cpp = {"lru": "lru", "lfu": "lfu", "moe-infinity": "priority"}[evict]
    caches = [ReferenceCache(slots, cpp) for _ in range(L if mode == "per-layer" else 1)]
    policy = None
    if evict == "moe-infinity":
        policy = MoEInfinity()
        policy.bind(L, E, meta.top_k)
    hits = np.zeros(L, dtype=np.int64)
    for seq in trace.sequences():
        prio = policy.token_priorities(seq) if policy else None
        for t in range(seq.num_tokens):
            for layer in range(L if prio is not None else 0):  # every layer's scores, before the token
                cache, cl = (caches[layer], 0) if mode == "per-layer" else (caches[0], layer)
                cache.set_priority(cl, range(E), prio[t, layer])
            for layer in range(L):
                cache, cl = (caches[layer], 0) if mode == "per-layer" else (caches[0], layer)
                if prefetch:
                    cache.prefetch(cl, seq.experts[layer, t].tolist())
                hits[layer] += cache.access(cl, seq.experts[layer, t].tolist())
        if policy:
            policy.end_sequence(seq)
    return hits


def by_key(report):
    return {(r["policy"], r["capacity"]): r for r in report["results"]}


@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_simulator_matches_reference(mode):
    trace = random_trace(seed=1)
    caps = (0.25, 0.5, 0.8)
    specs = parse_policies(["lru", "lfu", "moe-infinity", "lru+oracle"])
    report = simulate(trace, SimConfig(capacities=caps, policies=tuple(specs), mode=mode, chunk_tokens=20))
    rows = by_key(report)
    for spec in specs:
        for c in caps:
            want = reference_hits(trace, c, mode, spec.evict, prefetch=spec.prefetch == "oracle")
            got = np.round(np.array(rows[spec.label, c]["hit_rate_per_layer"]) * 4 * 47).astype(np.int64)
            assert rows[spec.label, c]["hits"] == int(want.sum()), (spec.label, c, got, want)
            assert np.array_equal(got, want), (spec.label, c, got, want)


@pytest.mark.parametrize("mode", ["per-layer", "global"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_belady_is_an_upper_bound(mode, seed):
    trace = random_trace(seed=seed, hot=seed != 2)
    caps = (0.25, 0.4, 0.6, 0.9)
    specs = parse_policies(["lru", "lfu", "moe-infinity", "belady"])
    rows = by_key(simulate(trace, SimConfig(capacities=caps, policies=tuple(specs), mode=mode)))
    for c in caps:
        best = rows["belady", c]["hits"]
        for s in ("lru", "lfu", "moe-infinity"):
            assert best >= rows[s, c]["hits"], (
                f"{mode} capacity {c}: belady {best} < {s} {rows[s, c]['hits']}"
            )


def test_capacity_k_equals_previous_token_overlap():
    trace = random_trace(seed=4, E=16, k=4)
    # 0.25 * 16 = 4 = k slots per layer: the cache holds exactly the previous token's experts
    report = simulate(
        trace,
        SimConfig(
            capacities=(0.25,), policies=tuple(parse_policies(["lru", "lfu", "moe-infinity", "belady"]))
        ),
    )
    overlap = 0
    prev = None
    for seq in trace.sequences():  # the caches carry over between sequences, so does the overlap
        for t in range(seq.num_tokens):
            cur = seq.experts[:, t]
            if prev is not None:
                overlap += sum(
                    len(set(cur[layer].tolist()) & set(prev[layer].tolist())) for layer in range(cur.shape[0])
                )
            prev = cur
    for r in report["results"]:
        assert r["slots_per_cache"] == 4
        assert r["hits"] == overlap, (r["policy"], r["hits"], overlap)


def _cosine(a, b):
    return float((a * b).sum()) / (math.sqrt((a**2).sum()) * math.sqrt((b**2).sum()))


def naive_moe_infinity(trace, capacity=512):
    """MoE-Infinity priorities written the slow, obvious way (loops, math.sqrt)."""
    meta = trace.meta
    L, E = meta.num_layers, meta.num_experts
    done: list[np.ndarray] = []
    out = []
    for seq in trace.sequences():
        ex = seq.experts.numpy()
        T = ex.shape[1]
        pr = np.zeros((T, L, E), dtype=np.float64)
        bank = done[-capacity:]
        for t in range(T):
            if not bank:
                continue
            partial = np.zeros((L, E))
            for u in range(t):
                for layer in range(L):
                    for e in ex[layer, u]:
                        partial[layer, e] += 1
            if t == 0:
                match = sum(bank)
            else:
                sims = [_cosine(partial, m) for m in bank]
                match = bank[int(np.argmax(sims))]
            for layer in range(L):
                total = match[layer].sum()
                pr[t, layer] = (match[layer] / total if total else 0.0) * (1 - layer / (L + 1))
        out.append(pr)
        counts = np.zeros((L, E))
        for layer in range(L):
            for e in ex[layer].reshape(-1):
                counts[layer, e] += 1
        done.append(counts)
    return out


@pytest.mark.parametrize("capacity", [2, 512])
def test_moe_infinity_matches_naive(capacity):
    trace = random_trace(seed=7, lengths=(6, 4, 7, 5, 6))
    policy = MoEInfinity(capacity=capacity)
    policy.bind(trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k)
    want = naive_moe_infinity(trace, capacity)
    for seq, w in zip(trace.sequences(), want):
        got = policy.token_priorities(seq)
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
        policy.end_sequence(seq)


def test_cost_model_matches_design_numbers():
    cost = CostModel()
    k, L = 6, 26
    for h, tok_s in ((0.9, 93), (0.5, 18.5)):
        bpt = (1 - h) * k * L * cost.expert_bytes
        got = cost.predict(bpt, 0.0, L)
        assert abs(got["ceiling_tok_s"] - tok_s) / tok_s < 0.01, got
        assert got["predicted_tok_s"] < got["ceiling_tok_s"]
    hidden = cost.predict(0.0, 1e6, L)  # a small prefetch hides behind compute
    assert hidden["predicted_tok_s"] == pytest.approx(hidden["resident_tok_s"])


def test_cli_writes_json_plot_markdown(tmp_path):
    trace = random_trace(seed=2)
    with TraceWriter(tmp_path / "t", trace.meta) as w:
        for s in trace.sequences():
            w.add(s)
    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    args = parser.parse_args(
        [
            str(tmp_path / "t"),
            "--capacity",
            "0.25,0.5",
            "--policy",
            "lru,belady,lru+oracle",
            "--global",
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "r.png"),
            "--markdown",
            str(tmp_path / "r.md"),
            "--no-progress",
        ]
    )
    assert sim_cli.run(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["results"]) == 6 and report["config"]["mode"] == "global"
    assert {"commit", "date", "torch"} <= set(report["environment"])
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert "| lru+oracle |" in (tmp_path / "r.md").read_text()


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="unknown eviction policy"):
        parse_policies(["mru"])
    with pytest.raises(ValueError, match="unknown prefetcher"):
        parse_policies(["lru+psychic"])
    with pytest.raises(ValueError, match="capacity"):
        SimConfig(capacities=(1.5,))


def test_real_traces_at_capacity_k(shared_traces):
    from moert.trace.importers.moe_beyond_csv import parse_csv

    seqs = []
    for n in (1, 2, 3):
        _, tokens, experts = parse_csv(shared_traces / f"prompt_{n}_data.csv")
        seqs.append(
            SequenceTrace(n, torch.arange(len(tokens)), experts, torch.ones(len(tokens), dtype=torch.bool))
        )
    trace = InMemoryTrace(TraceMeta("deepseek_v2", tuple(range(1, 27)), 64, 6), seqs)
    rows = by_key(
        simulate(trace, SimConfig(capacities=(0.05, 0.5), policies=tuple(parse_policies(["lru", "belady"]))))
    )
    ex = torch.cat([s.experts for s in seqs], dim=1)  # [L, T, k]
    overlap = int((ex[:, 1:, :, None] == ex[:, :-1, None, :]).any(-1).sum())
    assert rows["lru", 0.05]["hits"] == overlap == rows["belady", 0.05]["hits"]
    assert rows["belady", 0.5]["hit_rate"] >= rows["lru", 0.5]["hit_rate"] > rows["lru", 0.05]["hit_rate"]


class PreviousTokenPrefetcher(TracePrefetcher):
    """A predictor through the public hook: the previous token's experts of this layer, shifted by one id
    (the previous token's own experts are always resident, so they would exercise nothing)."""

    name = "previous"

    def prefetch(self, layer, ctx):
        earlier, _ = ctx.history()
        return (earlier[layer, -1] + 1) % ctx.meta.num_experts if ctx.t > 0 else []


@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_custom_prefetch_hook_matches_reference(mode):
    trace = random_trace(seed=9)
    specs = parse_policies(["lru+previous", "lfu+previous"], prefetchers=["previous"])
    report = simulate(
        trace,
        SimConfig(capacities=(0.3, 0.6), policies=tuple(specs), mode=mode, chunk_tokens=16),
        prefetchers={"previous": PreviousTokenPrefetcher()},
    )
    rows = by_key(report)
    meta = trace.meta
    for spec in specs:
        for c in (0.3, 0.6):
            slots = num_slots(c, meta, mode)
            caches = [
                ReferenceCache(slots, spec.evict)
                for _ in range(meta.num_layers if mode == "per-layer" else 1)
            ]
            hits = 0
            for seq in trace.sequences():
                for t in range(seq.num_tokens):
                    for layer in range(meta.num_layers):
                        cache, cl = (caches[layer], 0) if mode == "per-layer" else (caches[0], layer)
                        if t > 0:
                            cache.prefetch(cl, ((seq.experts[layer, t - 1] + 1) % meta.num_experts).tolist())
                        hits += cache.access(cl, seq.experts[layer, t].tolist())
            assert rows[spec.label, c]["hits"] == hits, (spec.label, c)
            assert rows[spec.label, c]["prefetches"] > 0


def test_moe_infinity_prefetcher_takes_the_top_predicted_experts():
    trace = random_trace(seed=8, lengths=(5, 6, 4, 7))
    meta = trace.meta
    fast, step = build("moe-infinity", "prefetch"), build("moe-infinity", "prefetch")
    for pre in (fast, step):
        pre.bind(meta.num_layers, meta.num_experts, meta.top_k)
    want = naive_moe_infinity(trace)
    m = meta.top_k
    for seq, w in zip(trace.sequences(), want):
        fast.begin_sequence(seq, 0)
        rows = fast.sequence_plan(seq).before.own_rows()  # [L, T, m]
        step.begin_sequence(seq, 0)
        for t in range(seq.num_tokens):
            step.begin_token(t)
            for layer in range(meta.num_layers):
                ids = [int(i) for i in rows[layer, t] if i >= 0]
                top = sorted(v for v in w[t, layer] if v > 0)[::-1][:m]
                np.testing.assert_allclose(sorted(w[t, layer][ids])[::-1], top, rtol=1e-5)
                plan = step.on_prediction(layer)
                assert plan.layers == (layer,) and plan.ids[0].tolist() == rows[layer, t].tolist()
        fast.end_sequence(seq)
        step.end_sequence(seq)


def test_results_do_not_depend_on_chunking():
    trace = random_trace(seed=11, lengths=(7, 3, 9, 5, 6, 4))
    specs = tuple(parse_policies(["lru+moe-infinity", "moe-infinity", "belady"]))
    reports = [
        simulate(trace, SimConfig(capacities=(0.3, 0.6), policies=specs, mode=mode, chunk_tokens=chunk))
        for mode in ("per-layer", "global")
        for chunk in (1, 10, 1000)
    ]
    for group in (reports[:3], reports[3:]):
        hits = [[r["hits"] for r in rep["results"]] for rep in group]
        assert hits[0] == hits[1] == hits[2], hits
