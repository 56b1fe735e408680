"""Policy ``score`` in the simulator (``score+PRED``) against an independent plain-Python reference.

The reference makes each prediction from the predictor's logits the obvious way (sigmoid, sort,
the first k+m, the adaptive threshold, ``decay ** j``; the layer that just ran cleared to -1, -2, ...)
and replays it through the dict-based ``ReferenceCache`` (policy priority: lowest score first, ties
by recency) in the copy engine's order: clear, scores, prefetch rows, then the access.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "policy"))
from policy_reference import ReferenceCache  # noqa: E402

from moert.policy.predictor import PredictorPolicy, policy_from_spec  # noqa: E402
from moert.predict.base import Predictor, PredictorMeta  # noqa: E402
from moert.sim import SimConfig, num_slots, parse_policies, simulate  # noqa: E402
from moert.trace import InMemoryTrace, SequenceTrace, TraceMeta  # noqa: E402

THRESHOLD, MAX_OVER, DECAY = 0.3, 3, 0.5


class TablePredictor(Predictor):
    """A predictor whose logits are a fixed table per sequence: (L, T, 1+d, E)."""

    def __init__(self, meta: PredictorMeta, table: dict[int, torch.Tensor]):
        self.meta, self.table = meta, table

    def predict(self, layer, context):
        return self.table[context.seq_id][layer][:, 0]

    def predict_ahead(self, layer, context):
        return self.table[context.seq_id][layer]


def make_case(seed=0, L=4, E=12, k=3, lengths=(7, 5, 9, 6), d=0, perfect=False):
    """A random trace and a predictor over it: random logits, or ``perfect`` (true experts of l+j high)."""
    g = torch.Generator().manual_seed(seed)
    seqs, table = [], {}
    for i, T in enumerate(lengths):
        w = torch.ones(L, T, E)
        w[:, :, torch.randperm(E, generator=g)[:k]] = 5.0  # a few hot experts per sequence
        experts = torch.multinomial(w.reshape(-1, E), k, generator=g).reshape(L, T, k)
        seqs.append(SequenceTrace(i, torch.arange(T), experts, torch.ones(T, dtype=torch.bool)))
        logits = torch.randn(L, T, 1 + d, E, generator=g) * 1.5
        if perfect:  # every other expert in [-4, -2), no ties
            logits = torch.rand(L, T, 1 + d, E, generator=g) * 2.0 - 4.0
            for j in range(1 + d):
                for layer in range(L - j):
                    logits[layer, :, j].scatter_(1, experts[layer + j], 4.0 + torch.rand(T, k, generator=g))
        table[i] = logits
    meta = TraceMeta(model_type="test", layers=tuple(range(1, L + 1)), num_experts=E, top_k=k)
    pmeta = PredictorMeta(
        kind="preattn",
        model_type="test",
        layers=meta.layers,
        num_experts=E,
        top_k=k,
        lookahead=d,
        loss="wbce",
    )
    return InMemoryTrace(meta, seqs), TablePredictor(pmeta, table)


def reference_plan(row_logits, k, m, j_max):
    """[(ids, {expert: score})] for predicted layers j = 0..j_max-1 of one (layer, token), by hand."""
    out = []
    E = len(row_logits[0])
    width = k + (MAX_OVER if m == "adaptive" else m)
    for j in range(j_max):
        probs = [1.0 / (1.0 + math.exp(-float(x))) for x in row_logits[j]]
        order = sorted(range(E), key=lambda e: -probs[e])[:width]
        if m == "adaptive":
            order = [e for r, e in enumerate(order) if r < k or probs[e] > THRESHOLD]
        out.append((order, {e: probs[e] * DECAY**j for e in order}))
    return out


def reference_hits(trace, pred, m, capacity, mode, evict):
    """Per-layer hits of ``evict`` (``score`` or ``lru``) with the reference predictions."""
    meta = trace.meta
    L, E, k, d = meta.num_layers, meta.num_experts, meta.top_k, pred.meta.lookahead
    slots = num_slots(capacity, meta, mode)
    caches = [ReferenceCache(slots, "priority" if evict == "score" else evict) for _ in range(L)]
    if mode == "global":
        caches = [caches[0]] * L

    def at(layer):
        return caches[layer], (0 if mode == "per-layer" else layer)

    hits = np.zeros(L, dtype=np.int64)
    step = 0
    for seq in trace.sequences():
        logits = pred.table[seq.seq_id]
        for t in range(seq.num_tokens):
            for layer in range(L):
                step += 1
                plan = reference_plan(logits[layer, t].tolist(), k, m, min(1 + d, L - layer))
                if evict == "score":
                    if L > 1:
                        cache, cl = at((layer - 1) % L)
                        cache.set_priority(cl, range(E), [-float(step)] * E)
                    for j, (_, score) in enumerate(plan):
                        cache, cl = at(layer + j)
                        cache.set_priority(cl, range(E), [score.get(e, 0.0) for e in range(E)])
                for j, (ids, _) in enumerate(plan):
                    cache, cl = at(layer + j)
                    cache.prefetch(cl, ids)
                cache, cl = at(layer)
                hits[layer] += cache.access(cl, seq.experts[layer, t].tolist())
    return hits


def run(trace, pred, m, capacities, mode, policies, chunk_tokens=8192):
    spec = f"pred:{m}"
    hook = PredictorPolicy(
        pred, m, "pred", threshold=THRESHOLD, max_overprovision=MAX_OVER, score_decay=DECAY
    )
    specs = parse_policies([f"{p}+{spec}" for p in policies], prefetchers=[spec])
    cfg = SimConfig(capacities=capacities, policies=tuple(specs), mode=mode, chunk_tokens=chunk_tokens)
    report = simulate(trace, cfg, prefetchers={spec: hook})
    return {(r["evict"], r["capacity"]): r for r in report["results"]}


@pytest.mark.parametrize("d", [0, 2])
@pytest.mark.parametrize("m", [0, 2, "adaptive"])
@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_score_matches_reference(mode, m, d):
    trace, pred = make_case(seed=3 + d, d=d)
    caps = (0.2, 0.6) if mode == "per-layer" else (0.15, 0.4)  # per-layer 0.2: 3 slots < k + m
    rows = run(trace, pred, m, caps, mode, ["score", "lru"])
    L = trace.meta.num_layers
    for evict in ("score", "lru"):  # lru: the same prefetches (lookahead rows too), LRU eviction
        for c in caps:
            want = reference_hits(trace, pred, m, c, mode, evict)
            row = rows[evict, c]
            got = np.round(np.array(row["hit_rate_per_layer"]) * row["accesses"] / L).astype(np.int64)
            assert row["hits"] == int(want.sum()) and np.array_equal(got, want), (
                f"{evict} @{c} {mode} m={m} d={d}: per-layer hits {got.tolist()} vs reference {want.tolist()}"
            )
            assert row["prefetches"] > 0


@pytest.mark.parametrize("m", [2, "adaptive"])
def test_predictions_are_the_reference_plan(m):
    trace, pred = make_case(seed=5, d=2, lengths=(6, 4))
    hook = PredictorPolicy(pred, m, threshold=THRESHOLD, max_overprovision=MAX_OVER, score_decay=DECAY)
    L, E, k = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k
    hook.bind(L, E, k)
    step, worst = 0, 0.0
    for seq in trace.sequences():
        got = hook.sequence_plan(seq).before
        logits = pred.table[seq.seq_id]
        for t in range(seq.num_tokens):
            for layer in range(L):
                step += 1
                assert got.clear[t, layer] == -step, (t, layer, got.clear[t, layer])
                n = min(3, L - layer)
                for j, (ids, score) in enumerate(reference_plan(logits[layer, t].tolist(), k, m, n)):
                    row = got.ids[t, layer, j]
                    assert row[: len(ids)].tolist() == ids and (row[len(ids) :] == -1).all(), (
                        t,
                        layer,
                        j,
                        row,
                        ids,
                    )
                    want = np.array([score.get(e, 0.0) for e in range(E)])
                    worst = max(worst, float(np.abs(got.scores[t, layer, j] - want).max()))
                assert (got.ids[t, layer, n:] == -1).all() and (got.scores[t, layer, n:] == 0).all()
        hook.end_sequence(seq)
    assert worst < 1e-6, f"worst score mismatch {worst}"


@pytest.mark.parametrize("d", [0, 1, 2])
@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_score_at_least_lru_with_a_perfect_predictor(mode, d):
    trace, pred = make_case(seed=11, L=5, E=16, k=2, lengths=(12, 9, 15), d=d, perfect=True)
    caps = (0.1, 0.3, 0.6) if mode == "global" else (0.15, 0.3, 0.6)
    rows = run(trace, pred, 2, caps, mode, ["score", "lru"])
    gains = []
    for c in caps:
        score, lru = rows["score", c]["hit_rate"], rows["lru", c]["hit_rate"]
        assert score >= lru, f"{mode} d={d} @{c}: score {score:.4f} < lru {lru:.4f}"
        gains.append(score - lru)
    if mode == "global" and d > 0:
        # lookahead prefetches evict the layer about to run under LRU; score evicts the one that just ran
        assert max(gains) > 0.05, f"score should beat lru here: gains {gains}"


def test_results_do_not_depend_on_chunking():
    trace, pred = make_case(seed=7, d=1)
    reports = [run(trace, pred, 2, (0.2, 0.5), "global", ["score"], chunk_tokens=c) for c in (1, 8, 1000)]
    hits = [[r["hits"] for r in rep.values()] for rep in reports]
    assert hits[0] == hits[1] == hits[2], hits


def test_baselines_give_scores():
    trace, _ = make_case(seed=2)
    meta, seqs = trace.meta, list(trace.sequences())
    k = meta.top_k
    prev = policy_from_spec("prev-token:1", meta)
    prev.bind(meta.num_layers, meta.num_experts, k)
    p = prev.sequence_plan(seqs[0]).before
    for t in range(1, seqs[0].num_tokens):
        for layer in range(meta.num_layers):
            prior = set(seqs[0].experts[layer, t - 1].tolist())
            assert set(p.ids[t, layer, 0, :k].tolist()) == prior
            assert sorted(np.flatnonzero(p.scores[t, layer, 0]).tolist()) == sorted(prior)
            assert set(p.scores[t, layer, 0][sorted(prior)].tolist()) == {1.0}
    freq = policy_from_spec("frequency:2", meta, seqs[1:])
    freq.bind(meta.num_layers, meta.num_experts, k)
    counts = torch.zeros(meta.num_layers, meta.num_experts)
    for s in seqs[1:]:
        for layer in range(meta.num_layers):
            counts[layer] += torch.bincount(s.experts[layer].reshape(-1), minlength=meta.num_experts)
    tokens = sum(s.num_tokens for s in seqs[1:])
    f = freq.sequence_plan(seqs[0]).before
    for layer in range(meta.num_layers):
        ids = f.ids[0, layer, 0]
        np.testing.assert_allclose(
            f.scores[0, layer, 0][ids], (counts[layer][ids] / tokens).numpy(), rtol=1e-6
        )


def test_score_without_scores_is_rejected():
    with pytest.raises(ValueError, match=r"'score' has no prefetcher: .*score\+PRED.safetensors"):
        parse_policies(["score"])
    with pytest.raises(ValueError, match="prefetcher 'oracle' gives no scores.*score\\+prev-token"):
        parse_policies(["score+oracle"])
    with pytest.raises(ValueError, match="'moe-infinity' gives no scores"):
        parse_policies(["lru", "score"], prefetch="moe-infinity")
    trace, _ = make_case(seed=1)
    from moert.policy import TracePrefetcher

    class Plain(TracePrefetcher):
        name = "plain"

        def prefetch(self, layer, ctx):
            return []

    specs = parse_policies(["score+plain"], prefetchers=["plain"])
    with pytest.raises(ValueError, match="prefetcher 'plain' gives no scores"):
        simulate(trace, SimConfig(capacities=(0.5,), policies=tuple(specs)), prefetchers={"plain": Plain()})


def test_cli_score_policy(tmp_path, capsys):
    import argparse
    import json

    from moert.cli import simulate as sim_cli
    from moert.trace import TraceWriter

    trace, _ = make_case(seed=4, lengths=(9, 12, 7, 10))
    with TraceWriter(tmp_path / "t", trace.meta) as w:
        for s in trace.sequences():
            w.add(s)

    def simulate_cli(*argv):
        parser = argparse.ArgumentParser()
        sim_cli.add_arguments(parser)
        return sim_cli.run(parser.parse_args([str(tmp_path / "t"), "--no-progress", *argv]))

    out = tmp_path / "r.json"
    policies = "score+prev-token:2,lru+prev-token:2,score+frequency:adaptive"
    assert simulate_cli("--policy", policies, "--global", "--capacity", "0.2,0.5", "--json", str(out)) == 0
    report = json.loads(out.read_text())
    assert {r["policy"] for r in report["results"]} == set(policies.split(","))
    assert all(r["prefetches"] > 0 for r in report["results"])
    capsys.readouterr()
    assert simulate_cli("--policy", "lru,score") == 2
    err = capsys.readouterr().err
    assert "moert simulate: error: 'score' has no prefetcher" in err and "score+PRED.safetensors" in err
