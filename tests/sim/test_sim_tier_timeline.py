"""The SSD link as a second resource of the windowed timeline (``moert.sim.tier_timeline``), by hand.

Every case: steps s = 0..3 (2 tokens x 2 MoE layers, or more where said), one expert's copy c = 1 ms, its
SSD read r = 2 ms, a layer's compute C = 1 ms of which attention a = 0.5 ms comes before the router's
pick, one committed prefetch copy (depth 1) unless said. Times in ms; a copy "needing a read" is one
whose expert missed the host pool.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moert.sim.tier_timeline import TierTraffic, tier_timeline
from moert.sim.timeline import Traffic, link_timeline


def traffic(demand, issued, uses=()) -> Traffic:
    steps = np.array([s for s, _ in uses], dtype=np.int64)
    copies = np.array([g for _, g in uses], dtype=np.int64)
    return Traffic(np.array(demand, dtype=np.int64), np.array(issued, dtype=np.int64), steps, copies)


def reads(demand_reads, prefetch_reads=()) -> TierTraffic:
    return TierTraffic(np.array(demand_reads, dtype=np.int64), np.array(prefetch_reads, dtype=bool))


def ms(t: Traffic, r: TierTraffic, *, read_ms: float = 2.0, depth: int = 1, loop: bool = False) -> dict:
    got = tier_timeline(
        t, r, compute_s=1e-3, copy_s=1e-3, read_s=read_ms * 1e-3, attention_share=0.5, depth=depth, loop=loop
    )
    return {k: v * 1e3 if k.endswith("_s") or k == "seconds" else v for k, v in got.items()}


def check(got: dict, seconds: float, **stalls: float) -> None:
    assert got["seconds"] == pytest.approx(seconds), got
    for key, want in stalls.items():
        assert got[f"stall_{key}_s"] == pytest.approx(want), (key, got)
    total = sum(got[f"stall_{k}_s"] for k in ("demand", "behind_prefetch", "late_prefetch", "ssd"))
    assert got["seconds"] == pytest.approx(4.0 + total)  # 4 steps of compute + the stalls


@pytest.mark.parametrize("loop", [False, True])
def test_pool_hit_and_ssd_miss_pipelined(loop):
    # s=0: 2 demand misses, one in the pool: its copy runs 0..1 while the other's read runs 0..2, whose copy
    # runs 2..3 (the link idles 1..2 waiting for the read): stall 3 = 2 copies + 1 SSD. s=2: one miss
    # needing a read: 2 + 1 = 3. 4 * 1 + 3 + 3 = 10 ms.
    t = traffic([2, 0, 1, 0], [0, 0, 0, 0])
    check(ms(t, reads([1, 0, 1, 0]), loop=loop), 10.0, demand=3.0, ssd=3.0)
    # all in the pool: the single link (2 + 1 copies): 7 ms
    check(ms(t, reads([0, 0, 0, 0]), loop=loop), 7.0, demand=3.0, ssd=0.0)


@pytest.mark.parametrize("loop", [False, True])
def test_demand_reads_queue_on_the_ssd(loop):
    # s=0: 3 misses, all reads: they land at 2, 4, 6 (one read at a time); copies 2..3, 4..5, 6..7:
    # stall 7 = 3 copies + 4 SSD. With r = 0.5: reads land at .5, 1, 1.5, copies .5..1.5..2.5..3.5:
    # stall 3.5 = 3 + 0.5.
    t = traffic([3, 0, 0, 0], [0, 0, 0, 0])
    check(ms(t, reads([3, 0, 0, 0]), loop=loop), 11.0, demand=3.0, ssd=4.0)
    check(ms(t, reads([3, 0, 0, 0]), read_ms=0.5, loop=loop), 7.5, demand=3.0, ssd=0.5)


def test_demand_read_waits_for_the_read_in_progress_then_goes_before_read_ahead():
    # s=0 queues 2 prefetch copies, both needing reads, never used: read 0 runs 0..2, read 1 is queued.
    # s=1's pick (1.5): a demand miss needing a read: it waits for read 0 (not preempted) to land at 2,
    # reads 2..4 (before read 1), copies 4..5: stall 3.5 = 1 demand + 2.5 SSD. Read 1 then runs 4..6; the
    # link copies 0 at 5..6 (the chain does not start it while idle), 1 at 6..7 (its read landed at 6),
    # all before the trace ends at 7.5. 4 + 3.5 = 7.5 ms.
    t = traffic([0, 1, 0, 0], [2, 0, 0, 0])
    got = ms(t, reads([0, 1, 0, 0], [True, True]))
    check(got, 7.5, demand=1.0, ssd=2.5, behind_prefetch=0.0)
    assert got["prefetch_backlog"] == 0


def test_prefetch_needs_its_read_and_overlaps_a_copy():
    # s=0 queues copies 0 (in the pool) and 1 (needs a read); s=2 uses copy 1. Copy 0 runs 0..1 while
    # read 1 runs 0..2 (overlap); copy 1 waits for its read, runs 2..3. s=2's pick (2.5): copy 1 on the link
    # (committed): wait 0.5, late. 4 + 0.5 = 4.5 ms. (Without the read: copy 1 lands at 2, no stall: 4 ms.)
    t = traffic([0, 0, 0, 0], [2, 0, 0, 0], [(2, 1)])
    check(ms(t, reads([0, 0, 0, 0], [False, True])), 4.5, late_prefetch=0.5, ssd=0.0)
    check(ms(t, reads([0, 0, 0, 0], [False, False])), 4.0)


def test_used_prefetch_whose_read_is_queued_becomes_a_demand_read():
    # s=0 queues copies 0..2, all needing reads: reads land at 2, 4, 6 (backlog carries over the steps).
    # Copy 0 runs 2..3; copy 1 waits for its read (4). s=3's pick (3.5) uses copy 2: not committed (the
    # window ends at copy 1, whose read has not landed), so it is promoted; its read is still queued: after
    # read 1 (lands 4) it is read on demand 4..6, then copied 6..7. Stall 3.5 = 1 late + 2.5 SSD. Copy 1
    # then runs 7..7.5 in the compute and 0.5 ms more after the trace: charged behind prefetches.
    # 4 + 3.5 + 0.5 = 8 ms.
    t = traffic([0, 0, 0, 0], [3, 0, 0, 0], [(3, 2)])
    got = ms(t, reads([0, 0, 0, 0], [True, True, True]))
    check(got, 8.0, late_prefetch=1.0, ssd=2.5, behind_prefetch=0.5)
    assert got["promoted_prefetches"] == 1 and got["prefetch_backlog"] == pytest.approx(0.5)


def test_used_prefetch_whose_read_is_in_progress_waits_for_it():
    # s=0 queues copies 0 and 1, both needing reads; s=1 uses copy 0. At its pick (1.5) read 0 is in
    # progress (lands 2): copy 0 is not committed, so it is promoted, and waits for that read (not read
    # again): the link idles 0.5, copies 2..3: stall 1.5 = 1 late + 0.5 SSD. Read 1 runs 2..4, copy 1
    # 4..5, before the trace ends. 4 + 1.5 = 5.5 ms.
    t = traffic([0, 0, 0, 0], [2, 0, 0, 0], [(1, 0)])
    got = ms(t, reads([0, 0, 0, 0], [True, True]))
    check(got, 5.5, late_prefetch=1.0, ssd=0.5, behind_prefetch=0.0)
    assert got["promoted_prefetches"] == 1 and got["prefetch_backlog"] == 0


def test_reads_still_queued_at_the_end_are_charged():
    # s=3 queues one copy needing a read, unused; the trace ends at 4 with its read half done (lands at 5),
    # the copy runs 5..6: 1 copy behind prefetches + 1 of SSD. 4 + 2 = 6 ms.
    t = traffic([0, 0, 0, 0], [0, 0, 0, 1])
    got = ms(t, reads([0, 0, 0, 0], [True]))
    check(got, 6.0, behind_prefetch=1.0, ssd=1.0)
    assert got["read_backlog"] == pytest.approx(0.5)  # half of the read was left at the end


def random_traffic(seed: int, steps: int = 300, read_share: float = 0.0) -> tuple[Traffic, TierTraffic]:
    rng = np.random.default_rng(seed)
    demand = rng.integers(0, 4, steps)
    issued = rng.integers(0, 4, steps) * (rng.random(steps) < 0.6)
    uses = []
    g = 0
    for s in range(steps):
        for _ in range(issued[s]):
            if rng.random() < 0.7 and s + (d := int(rng.integers(0, 4))) < steps:
                uses.append((s + d, g))
            g += 1
    uses.sort(key=lambda u: u[0])
    t = traffic(demand, issued, uses)
    r = TierTraffic(
        (demand * (rng.random(steps) < read_share) * rng.random(steps)).astype(np.int64),
        rng.random(g) < read_share,
    )
    return t, r


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("depth", [1, 2])
def test_no_reads_equals_the_single_link_bit_for_bit(seed, depth):
    """The step loop itself (not the shortcut) with no SSD read gives link_timeline's numbers exactly."""
    t, _ = random_traffic(seed)
    none = TierTraffic(np.zeros(t.steps, dtype=np.int64), np.zeros(int(t.issued.sum()), dtype=bool))
    kw = dict(compute_s=0.7e-3, copy_s=1.3e-3, attention_share=0.2, depth=depth)
    want = link_timeline(t, **kw)
    for loop in (False, True):
        got = tier_timeline(t, none, read_s=1e-3, loop=loop, **kw)
        assert got["stall_ssd_s"] == 0.0
        for key, value in want.items():
            assert got[key] == value, (key, loop)  # exactly


@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_equals_the_loop_without_prefetches(seed):
    t, r = random_traffic(seed, read_share=0.5)
    t = Traffic(t.demand, np.zeros_like(t.issued), np.zeros(0, np.int64), np.zeros(0, np.int64))
    r = TierTraffic(r.demand_reads, np.zeros(0, dtype=bool))
    assert r.reads > 0
    kw = dict(compute_s=0.7e-3, copy_s=1.3e-3, read_s=2.9e-3, attention_share=0.2, depth=2)
    fast, slow = tier_timeline(t, r, **kw), tier_timeline(t, r, loop=True, **kw)
    for key in ("seconds", "stall_demand_s", "stall_ssd_s"):
        assert fast[key] == pytest.approx(slow[key], rel=1e-12), key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slow_reads_cost_and_instant_reads_are_the_single_link(seed):
    """Not monotone in between: on this overloaded link (1.3 ms copies, 0.7 ms layers) a copy whose read
    has not landed is not committed, so demand copies wait behind fewer prefetches (see the module doc)."""
    t, r = random_traffic(seed, read_share=0.4)
    kw = dict(compute_s=0.7e-3, copy_s=1.3e-3, attention_share=0.2, depth=2)
    base = link_timeline(t, **kw)["seconds"]
    slow, instant = (tier_timeline(t, r, read_s=x, **kw)["seconds"] for x in (8e-3, 1e-9))
    assert slow > 1.3 * base and instant == pytest.approx(base, rel=1e-5)


def test_bad_reads_are_refused():
    t = traffic([1, 0], [1, 0])
    with pytest.raises(ValueError, match="at most the step's demand misses"):
        tier_timeline(
            t, reads([2, 0], [False]), compute_s=1, copy_s=1, read_s=1, attention_share=0.5, depth=1
        )
    with pytest.raises(ValueError, match="the traffic queued 1"):
        tier_timeline(t, reads([0, 0], []), compute_s=1, copy_s=1, read_s=1, attention_share=0.5, depth=1)


def test_copies_queued_at_a_router_are_refused_with_reads():
    """A ':budget-ahead' prefetch (queued at a router for the next layer) is not modelled on the SSD
    tier: a clear error, not a timeline that treats it as queued at the step's start; without reads it
    is the single link's."""
    t = dataclasses.replace(traffic([0, 0, 0, 0], [2, 0, 0, 0], [(2, 1)]), issued_mid=np.array([1, 0, 0, 0]))
    with pytest.raises(ValueError, match="budget-ahead"):
        ms(t, reads([0, 0, 0, 0], [False, True]))
    got = ms(t, reads([0, 0, 0, 0], [False, False]))
    assert got["seconds"] == pytest.approx(
        link_timeline(t, compute_s=1e-3, copy_s=1e-3, attention_share=0.5, depth=1)["seconds"] * 1e3
    )
