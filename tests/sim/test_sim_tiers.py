"""The SSD tier in the simulator (moert.sim.tiers): a hand-computed trace, F = 1 equals the two-level
result, the device replay is unchanged by recording, the pool against the Python reference cache."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "policy"))
from policy_reference import ReferenceCache, reference_belady_hits  # noqa: E402
from test_sim import random_trace  # noqa: E402

from moert.sim import CostModel, SimConfig, num_slots, parse_policies, simulate  # noqa: E402
from moert.sim.tiers import TierConfig, pool_slots, predict_tiers  # noqa: E402
from moert.trace import InMemoryTrace, SequenceTrace, TraceMeta  # noqa: E402

GB = 1_000_000_000
COST = CostModel(expert_bytes=GB, bandwidth_gbs=10.0, layer_compute_ms=1.0)


def tiny_trace() -> InMemoryTrace:
    """L=2, E=4, k=1, one sequence of 4 tokens: layer 0 uses 0,1,0,1; layer 1 uses 0,0,1,1."""
    experts = torch.tensor([[0, 1, 0, 1], [0, 0, 1, 1]])[:, :, None]
    seq = SequenceTrace(0, torch.arange(4), experts, torch.ones(4, dtype=torch.bool))
    return InMemoryTrace(TraceMeta(model_type="test", layers=(1, 2), num_experts=4, top_k=1), [seq])


def run(trace, policies, mode="per-layer", caps=(0.25,), tiers=None, cost=COST, **kw):
    cfg = SimConfig(
        capacities=caps, policies=tuple(parse_policies(policies)), mode=mode, cost=cost, tiers=tiers, **kw
    )
    return {(r["policy"], r["capacity"]): r for r in simulate(trace, cfg)["results"]}


def by_host(row):
    return {(t["host_capacity"], t["ssd_bandwidth_gbs"]): t for t in row["tiers"]}


def test_hand_computed_tiny_trace():
    """Device (1 slot per layer, lru) loads, token-major: A=(0,0) B=(1,0) | C=(0,1) | A D=(1,1) | C.
    Pool of 2 (F=0.25), lru: all 6 miss; belady: A B C A D C -> hits at the 2nd A and 2nd C.
    Pool of 3 (F=0.375), lru: A B C miss, A hit, D miss (evicts B), C hit. (Layer-major order,
    A C A C B D, would give the 2-slot lru pool 2 hits.)"""
    tiers = TierConfig(host_capacities=(0.25, 0.375, 1.0), ssd_bandwidths_gbs=(5.0,))
    row = run(tiny_trace(), ["lru"], tiers=tiers)[("lru", 0.25)]
    assert row["hits"] == 2 and row["demand_loads_per_token"] == 6 / 4
    t = by_host(row)
    assert [t[(f, 5.0)]["pool_slots"] for f in (0.25, 0.375, 1.0)] == [2, 3, 8]
    assert [t[(f, 5.0)]["pool_hits"] for f in (0.25, 0.375, 1.0)] == [0, 2, 6]
    assert t[(0.25, 5.0)]["ssd_reads_per_layer"] == [4, 2]
    assert t[(0.375, 5.0)]["ssd_cold_reads"] == 4 and t[(1.0, 5.0)]["ssd_reads"] == 0
    # per token: 1.5 GB over the link (0.15 s at 10 GB/s), compute 2 ms; SSD 1.5 / 1.0 / 0 GB at 5 GB/s
    for f, ssd_s in ((0.25, 0.3), (0.375, 0.2), (1.0, 0.0)):
        assert t[(f, 5.0)]["tier_token_ms"] == pytest.approx(1e3 * (0.002 + 0.15 + ssd_s))
        assert t[(f, 5.0)]["ssd_bytes_per_token"] == pytest.approx(ssd_s * 5 * GB)
    belady = TierConfig(host_capacities=(0.25,), ssd_bandwidths_gbs=(5.0,), host_policies=("belady",))
    assert run(tiny_trace(), ["lru"], tiers=belady)[("lru", 0.25)]["tiers"][0]["pool_hits"] == 2


def test_prefetched_reads_on_the_windowed_timeline():
    """lru+oracle: the same 6 loads, all prefetches issued at their own step's start and used there:
    per step the read (200 ms at 5 GB/s) has run 0.2 ms at the pick, then lands, then the copy (100 ms):
    6 * 299.8 + 8 * 1 = 1806.8 ms over 4 tokens. At 100 GB/s: 6 * 109.8 + 8 = 666.8 ms. The pooled
    formula (max(2 ms, 0.15 s link, 0.3 s SSD)) hides it all behind the token: 300 and 150 ms."""
    tiers = TierConfig(host_capacities=(0.25,), ssd_bandwidths_gbs=(5.0, 100.0))
    row = run(tiny_trace(), ["lru+oracle"], tiers=tiers)[("lru+oracle", 0.25)]
    t = by_host(row)
    assert row["hit_rate"] == 1.0 and t[(0.25, 5.0)]["ssd_prefetch_reads"] == 6
    assert t[(0.25, 5.0)]["tier_token_ms"] == pytest.approx(1806.8 / 4)
    assert t[(0.25, 100.0)]["tier_token_ms"] == pytest.approx(666.8 / 4)
    assert 1e3 / t[(0.25, 5.0)]["tier_pooled_tok_s"] == pytest.approx(300.0)
    assert 1e3 / t[(0.25, 100.0)]["tier_pooled_tok_s"] == pytest.approx(150.0)
    # per tier: 6 * 199.8 ms waiting for the SSD, 6 * 100 ms of late (promoted) copies, per token
    assert t[(0.25, 5.0)]["stall_ssd_ms"] == pytest.approx(6 * 199.8 / 4)
    assert t[(0.25, 5.0)]["stall_pcie_ms"] == pytest.approx(600.0 / 4)
    assert t[(0.25, 5.0)]["ssd_prefetch_bytes_per_token"] == pytest.approx(1.5 * GB)
    assert t[(0.25, 5.0)]["link_prefetch_bytes_per_token"] == pytest.approx(1.5 * GB)
    pooled = run(tiny_trace(), ["lru+oracle"], tiers=tiers, cost=dataclasses.replace(COST, window="pooled"))
    assert by_host(pooled[("lru+oracle", 0.25)])[(0.25, 5.0)]["tier_token_ms"] == pytest.approx(300.0)
    latency = TierConfig(host_capacities=(0.25,), ssd_bandwidths_gbs=(5.0,), ssd_latency_us=10_000.0)
    slow = run(tiny_trace(), ["lru+oracle"], tiers=latency)[("lru+oracle", 0.25)]["tiers"][0]
    assert slow["tier_token_ms"] == pytest.approx((1806.8 + 6 * 10.0) / 4)  # 10 ms more per read


@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_host_capacity_one_equals_two_levels_and_recording_changes_nothing(mode):
    trace = random_trace(seed=3)
    names = ["lru", "lfu", "belady", "moe-infinity", "lru+oracle", "lru+utility:2"]
    tiers = TierConfig(host_capacities=(0.3, 1.0), ssd_bandwidths_gbs=(3.0, 7.0))
    kw = dict(caps=(0.25, 0.5), cost=CostModel(), chunk_tokens=16, layer_ms=(0.2, 2.0))
    plain = run(trace, names, mode, **kw)
    tiered = run(trace, names, mode, tiers=tiers, **kw)
    for key, want in plain.items():
        got = tiered[key]
        for field in ("hits", "hit_rate_per_layer", "bytes_per_token", "prefetch_wasted", "predicted_tok_s"):
            assert got[field] == want[field], (key, field)
        loads = round(got["loads_per_token"] * got["tokens"])
        assert all(t["device_loads"] == loads for t in got["tiers"]), key  # every device load recorded once
        for g in want["grid"]:
            t = {
                (x["host_capacity"], x["ssd_bandwidth_gbs"]): x
                for x in got["tiers"]
                if x["layer_ms"] == g["layer_ms"]
            }
            for bw in (3.0, 7.0):  # the windowed two-tier timeline at F = 1 is the single link, bit for bit
                assert t[(1.0, bw)]["tier_tok_s"] == g["predicted_tok_s"], (key, g)
                assert t[(1.0, bw)]["tier_pooled_tok_s"] == g["pooled_tok_s"], (key, g)
                assert t[(1.0, bw)]["stall_ssd_ms"] == 0.0
                assert t[(0.3, bw)]["tier_tok_s"] < g["predicted_tok_s"], (key, g)
                x = t[(0.3, bw)]  # the stalls add up to the token's time
                compute_ms = trace.meta.num_layers * g["layer_ms"]
                assert x["tier_token_ms"] == pytest.approx(
                    compute_ms + x["stall_pcie_ms"] + x["stall_ssd_ms"]
                )
                assert x["stall_pcie_ms"] == pytest.approx(
                    x["stall_demand_ms"] + x["stall_behind_prefetch_ms"] + x["stall_late_prefetch_ms"]
                )
            assert t[(0.3, 3.0)]["stall_ssd_ms"] > t[(0.3, 7.0)]["stall_ssd_ms"] > 0, key


def test_recorded_loads_must_match_the_replayed_traffic():
    """The tier's reads are matched to the run's steps and prefetch FIFO; a mismatch is an error."""
    from moert.sim.tiers import DEMAND, PREFETCH, tier_traffic
    from moert.sim.timeline import Traffic

    t = Traffic(np.array([1, 0]), np.array([1, 1]), np.zeros(0, np.int64), np.zeros(0, np.int64))
    events = np.array([[0, 1, PREFETCH, 0], [0, 2, DEMAND, 0], [1, 3, PREFETCH, 1], [0, 4, PREFETCH, 2]])
    hit = np.array([False, False, True, False])
    got = tier_traffic(events, hit, t)  # the last prefetch (after the last step) is dropped
    assert got.demand_reads.tolist() == [1, 0] and got.prefetch_reads.tolist() == [True, False]
    with pytest.raises(RuntimeError, match="demand loads do not match"):
        tier_traffic(events[[0, 2, 3]], hit[[0, 2, 3]], t)
    with pytest.raises(RuntimeError, match="2 queued prefetch copies"):
        tier_traffic(events[[1, 2]], hit[[1, 2]], t)


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady"])
def test_pool_matches_reference_on_the_device_miss_stream(policy):
    """Demand-only lru per layer: the device misses (token-major) from the Python reference cache,
    then the pool's hits from a second reference cache (lru/lfu) or textbook Belady."""
    trace = random_trace(seed=5, lengths=(30, 20, 25))
    meta = trace.meta
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    dev = [ReferenceCache(num_slots(0.25, meta, "per-layer"), "lru") for _ in range(L)]
    stream = []
    for seq in trace.sequences():
        for t in range(seq.num_tokens):
            for layer in range(L):
                ids = seq.experts[layer, t].tolist()
                before = set(dev[layer].entries)
                dev[layer].access(0, ids)
                stream += [(layer, e) for e in ids if (0, e) not in before]
    for f in (0.1, 0.3, 0.6):
        slots = pool_slots(f, L, E, k)
        if policy == "belady":
            want = reference_belady_hits([(layer, [e]) for layer, e in stream], slots)
        else:
            pool = ReferenceCache(slots, policy)
            want = sum(pool.access(layer, [e]) for layer, e in stream)
        tiers = TierConfig(host_capacities=(f,), host_policies=(policy,))
        row = run(trace, ["lru"], caps=(0.25,), tiers=tiers, cost=CostModel())[("lru", 0.25)]
        assert row["tiers"][0]["device_loads"] == len(stream)
        assert row["tiers"][0]["pool_hits"] == want, (policy, f)


def test_predict_tiers_formula():  # the pooled formula, kept as tier_pooled_tok_s
    assert predict_tiers(0.01, (2e9, 3e9), (1e9, 4e9), 10.0, 2.0) == pytest.approx(2.0 + 0.2 + 0.5)
    assert predict_tiers(0.01, (0.0, 0.0), (0.0, 0.0), 10.0, 2.0) == 0.01


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"host_capacities": (0.0,)}, "host capacity 0.0"),
        ({"host_capacities": (1.5,)}, "host capacity 1.5"),
        ({"ssd_bandwidths_gbs": (-3.0,)}, "SSD bandwidth -3.0"),
        ({"host_policies": ("lru", "fifo")}, "host policy 'fifo'"),
        ({"host_policies": ()}, "host policy ''"),
        ({"ssd_latency_us": -1.0}, "SSD latency -1.0"),
    ],
)
def test_bad_tier_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TierConfig(**kwargs)


def test_pool_smaller_than_top_k_is_refused():
    with pytest.raises(ValueError, match="fewer than one layer's top-k"):
        pool_slots(0.001, 26, 64, 6)
    with pytest.raises(ValueError, match="verify-tokens"):
        SimConfig(tiers=TierConfig(), verify_tokens=3)


def test_cli_host_capacity(tmp_path):
    from moert.trace import TraceWriter

    trace = random_trace(seed=2)
    with TraceWriter(tmp_path / "t", trace.meta) as w:
        for s in trace.sequences():
            w.add(s)
    base = [sys.executable, "-P", "-m", "moert", "simulate", str(tmp_path / "t"), "--no-progress"]
    out = subprocess.run(
        [*base, "--host-capacity", "0.3,1", "--ssd-bandwidth", "3,7", "--capacity", "0.25", "--ssd-latency-us",
         "50", "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (
        "| lru | 0.25 | lru | 0.3 | 0.2 | 3 |" in out.stdout
        and "| lru | 0.25 | lru | 1 | 0.2 | 7 |" in out.stdout
    )
    assert "stall SSD ms" in out.stdout and "50 µs per SSD read" in out.stdout
    rows = json.loads((tmp_path / "r.json").read_text())["results"][0]["tiers"]
    small = next(t for t in rows if t["host_capacity"] == 0.3)
    assert small["stall_ssd_ms"] > 0 and small["ssd_demand_bytes_per_token"] > 0 and "stall_pcie_ms" in small
    for flags, msg in (
        (["--host-capacity", "2"], "host capacity 2.0"),
        (["--host-capacity", "0.5", "--ssd-latency-us", "-5"], "SSD latency -5.0"),
        (["--ssd-latency-us", "5"], "need --host-capacity"),
    ):
        bad = subprocess.run([*base, *flags], capture_output=True, text=True, env=_env())
        assert bad.returncode != 0 and msg in bad.stderr and "Traceback" not in bad.stderr, flags


def _env():
    import os

    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "HF_HUB_OFFLINE": "1"}


def test_loads_recorded_in_call_order_and_distinct():
    from moert.sim.tiers import LoadLog

    log = LoadLog()
    log.add(3, np.array([5, 2]), 1)
    log.add(0, np.array([], dtype=np.int64), 0)
    log.add(1, np.array([7]), 0, step=9)
    assert log.events().tolist() == [[3, 5, 1, 0], [3, 2, 1, 0], [1, 7, 0, 9]]
