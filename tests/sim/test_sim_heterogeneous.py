"""Heterogeneous mode of the simulator's cost model (CPU experts, DESIGN.md §6-§7).

The per-step split is checked against a brute-force minimisation over c; the misses per step against
the dict-based ``ReferenceCache``; the aggregate tok/s against a tiny trace computed by hand; with the
CPU path off every number of a report is unchanged; the CLI flags reject bad values with a clear error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "policy"))
sys.path.insert(0, str(Path(__file__).parent))
from policy_reference import ReferenceCache  # noqa: E402
from test_sim import PreviousTokenPrefetcher, random_trace  # noqa: E402

from moert.cli import simulate as sim_cli  # noqa: E402
from moert.sim import CostModel, SimConfig, cpu_split, num_slots, parse_policies, simulate  # noqa: E402
from moert.trace import InMemoryTrace, SequenceTrace, TraceMeta, TraceWriter  # noqa: E402


def brute_force_split(n: int, cpu: float, copy: float, act: float) -> tuple[int, float]:
    """Every c in 0..n, the obvious way; the first (fewest CPU experts) of the best."""
    best_c, best_t = 0, n * copy
    for c in range(1, n + 1):
        t = max(c * cpu + act, (n - c) * copy)
        if t < best_t:
            best_c, best_t = c, t
    return best_c, best_t


def test_cpu_split_matches_brute_force():
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(3000):  # random times over three decades, n up to 16 misses
        cpu, copy = 10 ** rng.uniform(-4.5, -1.5), 10 ** rng.uniform(-4.5, -2.5)
        act = 0.0 if rng.random() < 0.2 else 10 ** rng.uniform(-6, -3)
        cases.append((cpu, copy, act))
    for cpu in (0.5, 1.0, 2.0, 3.0):  # dyadic times: exact ties between neighbouring c
        for act in (0.0, 0.5, 1.0):
            cases.append((cpu, 1.0, act))
    n = np.arange(17)
    worst = None
    for cpu, copy, act in cases:
        got_c, got_t = cpu_split(n, cpu, copy, act)
        for i in range(n.size):
            want_c, want_t = brute_force_split(int(n[i]), cpu, copy, act)
            if (got_c[i], got_t[i]) != (want_c, want_t):
                worst = (int(n[i]), cpu, copy, act, (int(got_c[i]), float(got_t[i])), (want_c, want_t))
                break
        assert worst is None, f"n, cpu, copy, act, got (c, t), want (c, t): {worst}"
    c, t = cpu_split(4, 1.0, 1.0, 0.0)  # a scalar n gives (1,) arrays
    assert c.shape == t.shape == (1,) and (int(c[0]), float(t[0])) == (2, 2.0)


def test_cpu_split_rejects_bad_times():
    with pytest.raises(ValueError, match="cpu_s=0"):
        cpu_split(3, 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="n >= 0"):
        cpu_split(np.array([2, -1]), 1.0, 1.0, 0.0)


def hand_trace() -> InMemoryTrace:
    """One layer, E=8, k=2; with 2 slots the cache holds the previous token's experts, so the demand
    misses per token are 2, 2, 2, 1 (the last token shares expert 0 with the one before)."""
    experts = torch.tensor([[[0, 1], [2, 3], [0, 1], [0, 2]]])  # [L=1, T=4, k=2]
    seq = SequenceTrace(0, torch.arange(4), experts, torch.ones(4, dtype=torch.bool))
    return InMemoryTrace(TraceMeta("test", (1,), 8, 2), [seq])


@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_aggregate_matches_hand_computed_case(mode):
    # copy 1 ms per expert (1 MB at 1 GB/s), CPU 1.5 ms per expert, 0.1 ms activation, 0.5 ms compute.
    # n=2: c=0 -> 2.0, c=1 -> max(1.6, 1.0) = 1.6, c=2 -> 3.1: one on the CPU, 1.6 ms.
    # n=1: c=0 -> 1.0, c=1 -> 1.6: copy, 1.0 ms.
    # with CPU: 0.5 + (3 * 1.6 + 1.0) / 4 = 1.95 ms per token; copy only: 0.5 + 7 * 1.0 / 4 = 2.25 ms.
    cost = CostModel(
        expert_bytes=1_000_000, bandwidth_gbs=1.0, layer_compute_ms=0.5, cpu_expert_ms=1.5, activation_us=100
    )
    report = simulate(
        hand_trace(),
        SimConfig(capacities=(0.25,), policies=tuple(parse_policies(["lru"])), mode=mode, cost=cost),
    )
    (row,) = report["results"]
    assert row["slots_per_cache"] == 2 and row["demand_misses"] == 7
    assert row["demand_misses_per_step"] == [0, 1, 3]
    assert row["cpu_token_ms"] == pytest.approx(1.95, rel=1e-12)
    assert row["cpu_predicted_tok_s"] == pytest.approx(1e3 / 1.95, rel=1e-12)
    assert row["token_ms"] == pytest.approx(2.25, rel=1e-12)
    assert row["predicted_tok_s"] == pytest.approx(1e3 / 2.25, rel=1e-12)
    assert row["cpu_misses"] == 3 and row["cpu_miss_share"] == pytest.approx(3 / 7)
    assert row["cpu_experts_per_token"] == pytest.approx(0.75)
    assert row["cpu_bytes_saved"] == 3_000_000 and row["cpu_bytes_saved_per_token"] == pytest.approx(750_000)


def reference_misses_per_step(trace, capacity, mode, evict, prefetch=None) -> np.ndarray:
    """Histogram of demand misses per (token, layer) step through the dict-based reference cache."""
    meta = trace.meta
    L = meta.num_layers
    slots = num_slots(capacity, meta, mode)
    caches = [ReferenceCache(slots, evict) for _ in range(L if mode == "per-layer" else 1)]
    hist = np.zeros(meta.top_k + 1, dtype=np.int64)
    for seq in trace.sequences():
        for t in range(seq.num_tokens):
            for layer in range(L):
                cache, cl = (caches[layer], 0) if mode == "per-layer" else (caches[0], layer)
                if prefetch is not None and t > 0:
                    cache.prefetch(cl, prefetch(seq, t, layer))
                ids = seq.experts[layer, t].tolist()
                hist[len(set(ids)) - cache.access(cl, ids)] += 1
    return hist


def shifted(seq, t, layer):
    """PreviousTokenPrefetcher's ids: the previous token's experts of this layer, shifted by one."""
    return ((seq.experts[layer, t - 1] + 1) % 16).tolist()


@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_misses_per_step_match_reference(mode):
    trace = random_trace(seed=5)
    cost = CostModel(cpu_expert_ms=1.0)
    specs = parse_policies(["lru", "lfu", "lru+previous"], prefetchers=["previous"])
    report = simulate(
        trace,
        SimConfig(capacities=(0.3, 0.6), policies=tuple(specs), mode=mode, cost=cost, chunk_tokens=13),
        prefetchers={"previous": PreviousTokenPrefetcher()},
    )
    for row in report["results"]:
        spec = next(s for s in specs if s.label == row["policy"])
        want = reference_misses_per_step(
            trace, row["capacity"], mode, spec.evict, shifted if spec.prefetch else None
        )
        got = np.zeros_like(want)
        got[: len(row["demand_misses_per_step"])] = row["demand_misses_per_step"]
        assert np.array_equal(got, want), (row["policy"], row["capacity"], got, want)
        assert int((np.arange(want.size) * want).sum()) == row["cache_stats"]["demand_loads"]


@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_stepwise_replay_counts_the_same_misses(mode):
    """The stepping driver and the fast path (chunked C++ replays, or access by access for utility)
    count the same demand misses at every step."""
    trace = random_trace(seed=6)
    cost = CostModel(cpu_expert_ms=0.8)
    specs = tuple(parse_policies(["lru+previous", "utility+utility:2", "belady"], prefetchers=["previous"]))
    rows = {}
    for replay in ("auto", "step"):
        cfg = SimConfig(capacities=(0.3, 0.6), policies=specs, mode=mode, cost=cost, replay=replay)
        rows[replay] = simulate(trace, cfg, prefetchers={"previous": PreviousTokenPrefetcher()})["results"]
    for fast, step in zip(rows["auto"], rows["step"]):
        assert fast["demand_misses_per_step"] == step["demand_misses_per_step"], (fast["policy"], fast, step)
        assert fast["cpu_predicted_tok_s"] == step["cpu_predicted_tok_s"]


CPU_KEYS = {
    "demand_misses_per_step",
    "cpu_predicted_tok_s",
    "cpu_token_ms",
    "cpu_misses",
    "cpu_miss_share",
    "cpu_experts_per_token",
    "cpu_bytes_saved",
    "cpu_bytes_saved_per_token",
}
TIMING = {"replay_seconds", "accesses_per_s"}


@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_heterogeneous_off_changes_nothing(mode):
    from moert.sim import result_table

    trace = random_trace(seed=3)
    specs = tuple(parse_policies(["lru", "lfu", "moe-infinity", "belady", "lru+oracle"]))
    off = simulate(trace, SimConfig(capacities=(0.3, 0.6), policies=specs, mode=mode))
    on = simulate(
        trace, SimConfig(capacities=(0.3, 0.6), policies=specs, mode=mode, cost=CostModel(cpu_expert_ms=2.0))
    )
    never = simulate(  # a CPU too slow to ever win: every miss is copied
        trace, SimConfig(capacities=(0.3, 0.6), policies=specs, mode=mode, cost=CostModel(cpu_expert_ms=1e6))
    )
    for a, b, c in zip(off["results"], on["results"], never["results"]):
        assert not CPU_KEYS & set(a), sorted(CPU_KEYS & set(a))
        assert set(b) == set(a) | CPU_KEYS
        grid = [{k: v for k, v in g.items() if k not in CPU_KEYS} for g in b["grid"]]
        assert grid == a["grid"]
        diff = {
            k: (a[k], b[k]) for k in set(a) - TIMING - {"grid"} if a[k] != b[k] and a[k] == a[k]
        }  # NaN != NaN
        assert not diff, f"{a['policy']} @{a['capacity']}: {diff}"
        assert c["cpu_misses"] == 0 and c["cpu_bytes_saved"] == 0
        assert c["cpu_predicted_tok_s"] == pytest.approx(a["predicted_tok_s"], rel=1e-12)
        assert b["cpu_predicted_tok_s"] >= a["predicted_tok_s"] * (1 - 1e-12)
    assert off["config"]["cost_model"]["cpu_expert_ms"] is None
    table = result_table(off)
    assert "tok/s +CPU" not in table and "tok/s +CPU" in result_table(on)
    assert table == result_table(
        {**on, "results": [{k: v for k, v in r.items() if k not in CPU_KEYS} for r in on["results"]]}
    )


def test_cost_model_rejects_bad_cpu_values():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"cpu_expert_ms={bad!r}.*bench_cpu_expert"):
            CostModel(cpu_expert_ms=bad)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="activation_us"):
            CostModel(cpu_expert_ms=1.0, activation_us=bad)
    with pytest.raises(ValueError, match="needs cpu_expert_ms"):
        CostModel().predict_heterogeneous(np.array([1, 2]), 3, 0.0, 1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moert simulate")
    sim_cli.add_arguments(parser)
    return parser


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cpu-expert-ms", "0"], "'0' is not a CPU time"),
        (["--cpu-expert-ms", "-2"], "'-2' is not a CPU time"),
        (["--cpu-expert-ms", "fast"], "'fast' is not a CPU time"),
        (["--cpu-expert-ms", "nan"], "bench_cpu_expert.py"),
        (["--cpu-expert-ms", "2", "--activation-us", "-5"], "'-5' is not a round-trip time"),
        (["--cpu-expert-ms", "2", "--activation-us", "inf"], ">= 0"),
    ],
)
def test_cli_rejects_bad_flag_values(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["trace-dir", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_cli_activation_without_cpu_is_an_error(tmp_path, capsys):
    args = _parser().parse_args([str(tmp_path / "absent"), "--activation-us", "30", "--no-progress"])
    assert sim_cli.run(args) == 2
    err = capsys.readouterr().err
    assert "--activation-us 30" in err and "--cpu-expert-ms" in err, err


def test_cli_reports_heterogeneous_rows(tmp_path):
    trace = random_trace(seed=2)
    with TraceWriter(tmp_path / "t", trace.meta) as w:
        for s in trace.sequences():
            w.add(s)
    out = {ext: tmp_path / f"r.{ext}" for ext in ("json", "md", "png")}
    args = _parser().parse_args(
        [str(tmp_path / "t"), "--capacity", "0.25,0.5", "--policy", "lru,belady", "--cpu-expert-ms", "0.4",
         "--activation-us", "10", "--json", str(out["json"]), "--markdown", str(out["md"]),
         "--plot", str(out["png"]), "--no-progress"]
    )  # fmt: skip
    assert sim_cli.run(args) == 0
    report = json.loads(out["json"].read_text())
    assert report["config"]["cost_model"]["cpu_expert_ms"] == 0.4
    assert report["config"]["cost_model"]["activation_us"] == 10
    for row in report["results"]:
        assert set(row) >= CPU_KEYS
        assert 0 <= row["cpu_miss_share"] <= 1
    md = out["md"].read_text()
    assert "0.4 ms per expert" in md and "10 µs activation" in md and "| tok/s +CPU @0.25" in md
    assert out["png"].stat().st_size > 1000
