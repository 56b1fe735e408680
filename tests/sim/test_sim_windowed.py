"""The windowed cost model (``moert.sim.CostModel``, ``moert.sim.timeline``) against hand-computed traces.

Every case: 2 MoE layers, 2 tokens (steps s = t * 2 + l = 0..3), one expert's copy c = 1 ms (1 MB at
1 GB/s), a layer's compute C = 1 ms of which attention a = 0.5 ms comes before the router's pick.
Times below are in ms; the link's FIFO position ``head`` counts prefetch copies done.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moert.sim import CostModel, SimConfig, parse_policies, simulate
from moert.sim.timeline import Traffic, link_timeline
from moert.trace import InMemoryTrace, SequenceTrace, TraceMeta

COST = CostModel(expert_bytes=1_000_000, bandwidth_gbs=1.0, layer_compute_ms=1.0, attention_share=0.5)


def traffic(demand, issued, uses=()) -> Traffic:
    steps = np.array([s for s, _ in uses], dtype=np.int64)
    copies = np.array([g for _, g in uses], dtype=np.int64)
    return Traffic(np.array(demand, dtype=np.int64), np.array(issued, dtype=np.int64), steps, copies)


def ms(t: Traffic, depth: int = 1, **kw) -> dict:
    got = link_timeline(t, compute_s=1e-3, copy_s=1e-3, attention_share=0.5, depth=depth, **kw)
    return {k: v * 1e3 if k.endswith("s") and "prefetches" not in k else v for k, v in got.items()}


def pooled_ms(t: Traffic, tokens: int = 2) -> float:
    """The pooled model over the same traffic, total ms: tokens * (max(L*C, P/BW) + D/BW)."""
    p, d = t.issued.sum() / tokens, t.demand.sum() / tokens
    return tokens * (max(2.0, p) + d)


def test_demand_only():
    # 3 misses at s=0, 1 at s=2: each step C + its copies: 4 * 1 + (3 + 1) * 1 = 8 ms; pooled: the same.
    t = traffic([3, 0, 1, 0], [0, 0, 0, 0])
    got = ms(t)
    assert got["seconds"] == pytest.approx(8.0) and got["stall_demand_s"] == pytest.approx(4.0)
    assert got["stall_late_prefetch_s"] == got["stall_behind_prefetch_s"] == 0.0
    assert pooled_ms(t) == pytest.approx(8.0)


def test_prefetch_that_fully_hides():
    # s=0 queues copy 0 at its start; it runs 0..1 ms, during s=0's attention and experts; s=1 uses it
    # (arrived): 4 * 1 = 4 ms, nothing stalls. Pooled: the same.
    t = traffic([0, 0, 0, 0], [1, 0, 0, 0], [(1, 0)])
    got = ms(t)
    assert got["seconds"] == pytest.approx(4.0) and got["late_prefetches"] == 0
    assert pooled_ms(t) == pytest.approx(4.0)


def test_prefetch_that_lands_late():
    # s=0 queues copy 0 and uses it itself: at the pick (0.5 ms) half of it is done, it is on the link
    # (committed): the step waits 0.5 ms. 4 * 1 + 0.5 = 4.5 ms. Pooled hides it: 4 ms.
    t = traffic([0, 0, 0, 0], [1, 0, 0, 0], [(0, 0)])
    got = ms(t)
    assert got["seconds"] == pytest.approx(4.5) and got["stall_late_prefetch_s"] == pytest.approx(0.5)
    assert got["late_prefetches"] == 1 and got["promoted_prefetches"] == 0
    assert pooled_ms(t) == pytest.approx(4.0)


def test_wasted_prefetch_delays_a_demand_copy():
    # s=0 queues 2 copies nobody uses. By s=1's pick (1.5 ms) 1.5 are done; s=1 misses one expert: its
    # copy waits for the committed rest (0.5), then copies (1): stall 1.5 = 1 demand + 0.5 behind.
    # 4 + 1.5 = 5.5 ms. Pooled: 2 * (max(2, 1) + 0.5) = 5 ms.
    t = traffic([0, 1, 0, 0], [2, 0, 0, 0])
    got = ms(t)
    assert got["seconds"] == pytest.approx(5.5)
    assert got["stall_demand_s"] == pytest.approx(1.0) and got["stall_behind_prefetch_s"] == pytest.approx(
        0.5
    )
    assert pooled_ms(t) == pytest.approx(5.0)


def test_backlog_carries_over_to_the_next_token():
    # s=0 queues 4 copies. At token 1's first pick (s=2, 2.5 ms) 2.5 are done; its miss waits for the
    # committed rest of copy 2 (0.5) then copies (1): 4 + 1.5 = 5.5 ms. Pooled: 2 * (max(2, 2) + 0.5) = 5.
    t = traffic([0, 0, 1, 0], [4, 0, 0, 0])
    got = ms(t)
    assert got["seconds"] == pytest.approx(5.5) and got["stall_behind_prefetch_s"] == pytest.approx(0.5)
    assert pooled_ms(t) == pytest.approx(5.0)


def test_a_used_prefetch_still_queued_is_promoted():
    # s=0 queues copies 0..3; s=1 uses copy 3. At s=1's pick (1.5 ms) copy 1 is on the link (committed,
    # depth 1) and copy 3 still queued: it becomes a demand copy after copy 1's rest: 0.5 + 1 = 1.5 ms,
    # all late. 4 + 1.5 = 5.5 ms.
    t = traffic([0, 0, 0, 0], [4, 0, 0, 0], [(1, 3)])
    got = ms(t)
    assert got["seconds"] == pytest.approx(5.5) and got["stall_late_prefetch_s"] == pytest.approx(1.5)
    assert got["promoted_prefetches"] == 1
    # depth 3: copies 1..3 are committed: wait for copy 3 to land in order, 4 - 1.5 = 2.5 ms; 6.5 ms
    deeper = ms(t, depth=3)
    assert deeper["seconds"] == pytest.approx(6.5) and deeper["promoted_prefetches"] == 0


def test_heterogeneous_steps_use_the_cpu_table():
    # s=0: 3 misses; the table says 1 on the CPU for 1.2 ms and 2 copies: max(2, 1.2) = 2 ms stall.
    t = traffic([3, 0, 0, 0], [0, 0, 0, 0])
    cpu = (np.array([0, 0, 0, 1]), np.array([0.0, 1e-3, 2e-3, 2e-3]))
    assert ms(t, cpu=cpu)["seconds"] == pytest.approx(6.0)


def hand_trace() -> InMemoryTrace:
    """2 layers, E=4, k=1, 3 tokens: layer 0 uses 0, 1, 0; layer 1 uses 2, 2, 3."""
    experts = torch.tensor([[[0], [1], [0]], [[2], [2], [3]]])  # [L=2, T=3, k=1]
    seq = SequenceTrace(0, torch.arange(3), experts, torch.ones(3, dtype=torch.bool))
    return InMemoryTrace(TraceMeta("test", (1, 2), 4, 1), [seq])


@pytest.mark.parametrize("replay", ["auto", "step"])
def test_simulate_end_to_end(replay):
    # one slot per layer. lru: misses at every step but (t=1, layer 1): 5 copies, 6 * 1 + 5 = 11 ms.
    # lru+oracle: each of those 5 steps queues its expert at its start and uses it at its pick, half
    # done: 0.5 ms each, 6 + 2.5 = 8.5 ms (depth 2: always committed). Pooled: 3 * max(2, 5/3) = 6 ms.
    specs = tuple(parse_policies(["lru", "lru+oracle"]))
    cost = CostModel(expert_bytes=1_000_000, bandwidth_gbs=1.0, layer_compute_ms=1.0, attention_share=0.5)
    report = simulate(hand_trace(), SimConfig((0.25,), specs, cost=cost, replay=replay, layer_ms=(1.0, 3.0)))
    lru, oracle = report["results"]
    assert lru["token_ms"] == pytest.approx(11 / 3) and lru["pooled_tok_s"] == pytest.approx(3 / 11e-3)
    assert oracle["token_ms"] == pytest.approx(8.5 / 3) and oracle["pooled_tok_s"] == pytest.approx(1 / 2e-3)
    assert oracle["late_prefetches"] == 5 and oracle["stall_late_prefetch_ms"] == pytest.approx(2.5 / 3)
    # grid point 3 ms: attention 1.5 ms > one copy: every prefetch hides; 6 * 3 = 18 ms
    assert (
        oracle["grid"][1]["token_ms"] == pytest.approx(6.0)
        and oracle["grid"][0]["token_ms"] == oracle["token_ms"]
    )
    pooled = simulate(
        hand_trace(), SimConfig((0.25,), specs, cost=CostModel(**{**cost.__dict__, "window": "pooled"}))
    )
    assert pooled["results"][1]["token_ms"] == pytest.approx(2.0)


def test_bad_values_name_the_fix():
    with pytest.raises(ValueError, match="attention_share"):
        CostModel(attention_share=1.5)
    with pytest.raises(ValueError, match="window"):
        CostModel(window="pool")
    with pytest.raises(ValueError, match="bandwidths value 0"):
        SimConfig(bandwidths=(0.0,))


def test_cli_grid(tmp_path, capsys):
    import json

    from moert.cli import main as cli_main
    from moert.trace import TraceWriter

    trace = hand_trace()
    with TraceWriter(tmp_path / "t", trace.meta) as w:
        for s in trace.sequences():
            w.add(s)
    out = tmp_path / "r.json"
    argv = [
        "simulate",
        str(tmp_path / "t"),
        "--capacity",
        "0.25",
        "--policy",
        "lru,lru+oracle",
        "--no-progress",
    ]
    argv += ["--expert-mb", "1", "--layer-ms", "1,3", "--bandwidth", "1,2", "--attention-share", "0.5"]
    assert cli_main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    oracle = report["results"][1]
    assert [(g["layer_ms"], g["bandwidth_gbs"]) for g in oracle["grid"]] == [(1, 1), (1, 2), (3, 1), (3, 2)]
    assert oracle["grid"][0]["token_ms"] == pytest.approx(8.5 / 3)  # test_simulate_end_to_end's point
    assert oracle["token_ms"] == pytest.approx(8.5 / 3)  # the first point is the main table's
    printed = capsys.readouterr().out
    assert "| lru+oracle | 0.25 | 3 | 2 |" in printed and "stall late prefetch ms" in printed


def test_replay_reports_prefetch_copies_and_first_uses():
    from moert.engine.runtime import SlabCache

    # 4 slots, lru. Step 0 queues 2 and 3 (copies 0, 1), then loads 0 and 1 on demand. Step 1 queues 5
    # (copy 2), evicting 2 (the least recent), and uses 3 (copy 1) first; 2 is a demand load again.
    # Step 2 uses 5 (copy 2) first; 2 is a hit on a demand-loaded copy.
    args = (np.zeros(3, np.int32), np.array([[0, 1], [2, 3], [2, 5]], np.int32))
    pre = np.array([[2, 3], [5, -1], [-1, -1]], np.int32)
    plain, tracked = (SlabCache.simulated(1, 8, 4, policy="lru", min_slots=1) for _ in range(2))
    want = plain.replay(*args, prefetch=pre)
    out = tracked.replay(*args, prefetch=pre, track_prefetch=True)
    assert out["hits_per_step"].tolist() == want["hits_per_step"].tolist() == [0, 1, 2]
    assert out["prefetch_seq_start"] == 0 and out["prefetch_queued_per_step"].tolist() == [2, 1, 0]
    assert out["prefetch_used"].tolist() == [[-1, -1], [1, -1], [2, -1]]
    assert tracked.prefetch_seq() == 3 and tracked.stats()["prefetch_hits"] == 2
    assert "prefetch_used" not in want


def test_backlog_left_at_the_end_is_charged_as_a_stall_behind_prefetches():
    # 10 copies queued at s=0, nobody waits: 4 steps of 1 copy each move 4 of them; 6 are still
    # queued at the end, which the next demand copy would wait behind: 4 + 6 = 10 copy times, as if
    # the link had moved every queued byte (queueing more than the link moves never pays).
    got = ms(traffic([0, 0, 0, 0], [10, 0, 0, 0]))
    assert got["prefetch_backlog"] == pytest.approx(6.0)
    assert got["seconds"] == pytest.approx(10.0) and got["stall_behind_prefetch_s"] == pytest.approx(6.0)
