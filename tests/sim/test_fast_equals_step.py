"""The fast path is the stepping driver, access by access, for every registered policy.

Each configuration is replayed twice from fresh policy objects: by the stepping driver
(``moert.sim.step``: the policy's hooks at every access, the definition) and by the simulator's fast
path (``moert.sim.fast``: the policy's plans for whole sequences, a few C++ calls per chunk; a policy
without one, ``fifo``, is stepped there too). The hits of every access and the final C++ counters must
be equal, on seeded random traces and on a slice of the real DeepSeek-V2-Lite traces, for per-layer and
global caches, at several capacities, for decode and (where supported) verify passes. ``simulate`` itself
is checked against the stepping totals, so its chunking and bookkeeping are covered too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_sim_score import make_case  # noqa: E402

from moert.models.tiny import single_thread  # noqa: E402
from moert.policy import REGISTRY, SequencePlan  # noqa: E402
from moert.policy.predictor import PredictorPolicy, policy_from_spec  # noqa: E402
from moert.sim import CostModel, PassTrace, PolicySpec, SimConfig, make_policy, num_slots, simulate  # noqa: E402
from moert.sim.fast import distinct_counts, replay_plan  # noqa: E402
from moert.sim.step import Caches, step_sequence  # noqa: E402
from moert.sim.timeline import StepLog, Traffic, link_timeline  # noqa: E402
from moert.trace import InMemoryTrace, SequenceTrace, TraceMeta  # noqa: E402

#: EVICT[+PREFETCH] configurations; together they use every registered name in every role it has
SPECS = [
    "lru", "lfu", "fifo", "belady", "moe-infinity", "utility", "score+prev-token:2",
    "lru+oracle", "lfu+moe-infinity", "moe-infinity+oracle", "utility+utility:2", "lru+utility:1",
    "belady+utility:2", "fifo+oracle", "fifo+utility:1", "lru+prev-token:2", "score+frequency:2",
    "learned", "learned+utility:2", "learned:next",
]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def random_trace(seed: int, L: int = 4, E: int = 16, k: int = 4, n: int = 6) -> InMemoryTrace:
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        T = int(torch.randint(3, 16, (1,), generator=g))
        w = torch.ones(L, T, E)
        w[:, :, torch.randperm(E, generator=g)[:k]] = 6.0  # a few hot experts per sequence
        experts = torch.multinomial(w.reshape(-1, E), k, generator=g).reshape(L, T, k)
        seqs.append(SequenceTrace(i, torch.arange(T), experts, torch.ones(T, dtype=torch.bool)))
    return InMemoryTrace(TraceMeta("test", tuple(range(1, L + 1)), E, k), seqs)


def real_trace(folder: Path, prompts: int, tokens: int | None = None) -> InMemoryTrace:
    """Prompts 1..``prompts`` of the real traces, each cut to its first ``tokens`` (None: whole)."""
    from moert.trace.importers.moe_beyond_csv import parse_csv

    seqs = []
    for n in range(1, prompts + 1):
        _, _, experts = parse_csv(folder / f"prompt_{n}_data.csv")
        experts = experts[:, :tokens]
        T = experts.shape[1]
        seqs.append(SequenceTrace(n, torch.arange(T), experts, torch.ones(T, dtype=torch.bool)))
    return InMemoryTrace(TraceMeta("deepseek_v2", tuple(range(1, 27)), 64, 6), seqs)


def predictors(trace) -> dict[str, PredictorPolicy]:
    """The trace-fed predictor prefetchers of SPECS (``pred``: random logits, lookahead 2, adaptive off)."""
    meta, seqs = trace.meta, list(trace.sequences())
    out = {
        "prev-token:2": policy_from_spec("prev-token:2", meta),
        "frequency:2": policy_from_spec("frequency:2", meta, seqs),
    }
    if meta.model_type == "test":
        _, table = make_case(L=meta.num_layers, E=meta.num_experts, k=meta.top_k, lengths=(1,), d=2)
        g = torch.Generator().manual_seed(1)
        table.table = {
            s.seq_id: torch.randn(meta.num_layers, s.num_tokens, 3, meta.num_experts, generator=g)
            for s in seqs
        }
        out["pred:2"] = PredictorPolicy(table, 2, "pred")
    return out


def evictor(meta):
    """Policy ``learned``'s model for the trace: seeded random weights (the plans, not their quality, are tested)."""
    from moert.predict.reuse import ReuseModel

    return ReuseModel.random(meta.num_layers, meta.num_experts, seed=7)


def spec_of(name: str) -> PolicySpec:
    evict, _, prefetch = name.partition("+")
    return PolicySpec(evict, prefetch or None)


def chunks(seqs: list, size: int):
    for i in range(0, len(seqs), size):
        yield seqs[i : i + size]


def fresh(spec: PolicySpec, trace, objects):
    meta = trace.meta
    policy = make_policy(spec, objects, utility_decay=0.7, evictor=evictor(meta))
    policy.bind(meta.num_layers, meta.num_experts, meta.top_k)
    policy.prepare(trace)
    return policy


def replay_both(trace, spec: PolicySpec, capacity: float, mode: str, objects: dict, label: str) -> dict:
    """Steps and fast-replays ``spec`` (a policy without a fast path only steps); asserts equal hits at
    every access and equal counters; returns the stepped counters."""
    meta = trace.meta
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    slots = num_slots(capacity, meta, mode)
    size = CostModel().expert_bytes  # as simulate counts bytes
    stepped, fast = fresh(spec, trace, objects), fresh(spec, trace, objects)
    n_caches = L if mode == "per-layer" else 1
    logs = [StepLog(L, n_caches), StepLog(L, n_caches)]  # the windowed cost model's per-step traffic
    caches = [
        Caches(mode, L, E, slots, p.cache_policy, slab_bytes=size, min_slots=k, log=log)
        for p, log in zip((stepped, fast), logs)
    ]
    offset, hits = 0, 0
    for chunk in chunks(list(trace.sequences()), 3):
        want, base = [], offset
        for s in chunk:
            want.append(step_sequence(stepped, caches[0], s, base))
            base += s.num_tokens
        want = np.concatenate(want, axis=1)  # [L, T]
        if fast.fast_path:
            parts, base = [], offset
            for s in chunk:
                fast.begin_sequence(s, base)
                parts.append(fast.sequence_plan(s))
                fast.end_sequence(s)
                base += s.num_tokens
            experts = np.concatenate([s.experts.numpy().astype(np.int32) for s in chunk], axis=1)
            caches[1].row0 = offset
            got = replay_plan(caches[1], experts, SequencePlan.concatenate(parts))
            for log in logs:
                log.demand(distinct_counts(experts) - want)
            bad = np.argwhere(got != want)
            assert bad.size == 0, (
                f"{label} {spec.label} {mode} @{capacity}: first mismatch at (layer, row) {tuple(bad[0])} "
                f"(trace row {offset} + {bad[0][1]}): fast {got[tuple(bad[0])]} hits vs stepping {want[tuple(bad[0])]}"
            )
        hits += int(want.sum())
        offset = base
    stats = caches[0].stats()
    if fast.fast_path:
        assert caches[1].stats() == stats, (
            f"{label} {spec.label} {mode} @{capacity}: {caches[1].stats()} vs {stats}"
        )
        # every step's demand misses and prefetch copies, and which step's copies each step uses first
        # (within a step the order may differ: oracle's fast path queues the trace row as it is)
        want_t, got_t = logs[0].traffic(), logs[1].traffic()
        for name in ("demand", "issued", "use_steps"):
            np.testing.assert_array_equal(
                getattr(got_t, name), getattr(want_t, name), err_msg=f"{label} {name}"
            )
        np.testing.assert_array_equal(used_from(got_t), used_from(want_t), err_msg=f"{label} copies used")
        point = dict(compute_s=1e-3, copy_s=0.7e-3, attention_share=0.2, depth=2)
        assert link_timeline(got_t, **point) == pytest.approx(link_timeline(want_t, **point), rel=1e-9)
        past_end = stats.get("prefetch_loads", 0) - want_t.issued.sum()  # queued after the last call
        assert 0 <= past_end <= E, past_end
        assert want_t.use_steps.size == stats.get("prefetch_hits", 0)
    for c in caches:
        c.close()
    return {"hits": hits, "cache_stats": stats}


def used_from(t: Traffic) -> np.ndarray:
    """(U, 2): each first use's step and the step that queued the copy, sorted."""
    issue_step = np.repeat(np.arange(t.steps), t.issued)[t.use_copies]
    pairs = np.stack([t.use_steps, issue_step], axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def check(trace, specs, capacities, mode, label, verify_tokens=1, simulated=True):
    """Every spec at every capacity both ways; ``simulated``: also ``simulate``'s totals (always for a
    policy without a fast path: the simulator steps it)."""
    objects = predictors(trace)
    replayed = trace if verify_tokens == 1 else PassTrace(trace, verify_tokens)
    for spec in map(spec_of, specs):
        want = [replay_both(replayed, spec, c, mode, objects, label) for c in capacities]
        if simulated or not make_policy(spec, objects).fast_path:
            cfg = SimConfig(
                capacities,
                (spec,),
                mode,
                chunk_tokens=20,
                verify_tokens=verify_tokens,
                evictor=evictor(trace.meta),
            )
            rows = simulate(trace, cfg, prefetchers=objects)["results"]
            got = [{"hits": r["hits"], "cache_stats": r["cache_stats"]} for r in rows]
            assert got == want, (label, spec.label, mode)


def test_specs_cover_the_registry():
    used = {(s.partition("+")[0], "evict") for s in SPECS} | {
        (s.partition("+")[2], "prefetch") for s in SPECS if "+" in s
    }
    for role in ("evict", "prefetch"):
        for name in REGISTRY.names(role):
            assert any(n.partition(":")[0] == name.partition("[")[0] and r == role for n, r in used), (
                name,
                role,
            )


@pytest.mark.parametrize("mode", ["per-layer", "global"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_traces(mode, seed):
    trace = random_trace(seed)
    specs = SPECS + ["score+pred:2", "lru+pred:2"]
    check(trace, specs, (0.3, 0.6) if mode == "per-layer" else (0.2, 0.4), mode, f"random seed={seed}")


@pytest.mark.parametrize("mode", ["per-layer", "global"])
@pytest.mark.parametrize("seed", [2, 3])
def test_random_traces_with_verify_passes(mode, seed):
    trace = random_trace(seed)
    specs = [s for s in SPECS if make_policy(spec_of(s), predictors(trace)).verify_passes]
    assert len(specs) >= 10, specs
    check(trace, specs, (0.3, 0.5) if mode == "per-layer" else (0.2, 0.4), mode, f"random seed={seed} N=3", 3)


@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_real_traces(shared_traces, mode):
    """20 real prompts, their first 6 tokens each (120 tokens, 3120 accesses; the caches carry over)."""
    trace = real_trace(shared_traces, 20, tokens=6)
    caps = (0.1, 0.5) if mode == "per-layer" else (0.1, 0.25)
    check(trace, SPECS, caps, mode, "real 20 prompts x 6 tokens", simulated=False)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_real_traces_whole_prompts(shared_traces, mode):
    trace = real_trace(shared_traces, 20)
    check(trace, SPECS, (0.1, 0.25, 0.5) if mode == "per-layer" else (0.1, 0.25), mode, "real 20 prompts")
    trace = real_trace(shared_traces, 10)
    specs = [s for s in SPECS if make_policy(spec_of(s), predictors(trace)).verify_passes]
    check(trace, specs, (0.1, 0.25) if mode == "per-layer" else (0.1,), mode, "real 10 prompts N=3", 3)
