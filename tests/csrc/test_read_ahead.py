"""Read-ahead of the tiered ExpertPool (``moert.load(..., host_budget=..., read_ahead=k)``): reads
queued by ``read_ahead`` or by the copy engine's plans run on the pool's reader threads; a copy of an
expert whose read is in flight waits on it (one read, never two); counters for used, wasted and
dropped read-aheads; a read-ahead never evicts a pinned slab and never waits for one."""

from __future__ import annotations

import ctypes
import time

import numpy as np
import pytest
import torch

from moert.engine import faults
from moert.engine.runtime import CopyEngine, ExpertPool, SlabCache

L, E, SLAB = 3, 4, 256


def expected(layer: int, expert: int) -> np.ndarray:
    return np.random.default_rng(1000 + 100 * layer + expert).integers(0, 256, SLAB, dtype=np.uint8)


def tiered(tmp_path, capacity: int, policy: str = "lru") -> ExpertPool:
    """Every expert at 16 + key * SLAB of one file (one part per source)."""
    path = tmp_path / "experts.bin"
    with open(path, "wb") as f:
        f.write(b"h" * 16)
        for layer in range(L):
            for e in range(E):
                f.write(expected(layer, e).tobytes())
    pool = ExpertPool(L, E, SLAB, pin=False, capacity=capacity, policy=policy)
    fid = pool.add_file(str(path))
    for layer in range(L):
        for e in range(E):
            pool.set_source(layer, e, [(fid, 16 + (layer * E + e) * SLAB, SLAB, 0)])
    return pool


def settle(pool: ExpertPool, done: int, timeout: float = 5.0) -> dict:
    """Waits until ``done`` read-ahead requests were read or dropped; returns the totals."""
    deadline = time.monotonic() + timeout
    while True:
        t = pool.tier_stats()[0]
        if t["ahead_reads"] + t["ahead_dropped"] >= done or time.monotonic() > deadline:
            return t
        time.sleep(0.005)


def reading(n: int = 1, timeout: float = 5.0) -> None:
    """Waits until ``n`` file reads have started (the fault plan's delay counts them as they start)."""
    deadline = time.monotonic() + timeout
    while faults.counts()["delayed_reads"] < n and time.monotonic() < deadline:
        time.sleep(0.002)


def host_bytes(address: int) -> np.ndarray:
    return np.frombuffer(ctypes.string_at(address, SLAB), np.uint8)


def test_read_ahead_reads_into_the_pool_and_counts_used_and_wasted(tmp_path):
    pool = tiered(tmp_path, capacity=3)
    assert pool.read_ahead(0, [1, 2, -1, 1]) == 2  # padding skipped, duplicates once
    t = settle(pool, 2)
    assert pool.resident(0) == {1, 2}
    assert (t["ahead_reads"], t["reads"], t["read_bytes"], t["hits"]) == (2, 2, 2 * SLAB, 0)
    assert pool.read_ahead(0, [1, 2]) == 0  # resident: nothing queued
    addr = pool.acquire_host(0, 1)  # a copy takes the slab read ahead: a hit, no second read
    assert np.array_equal(host_bytes(addr), expected(0, 1))
    pool.release_host(0, 1)
    t = pool.tier_stats()[0]
    assert (t["hits"], t["reads"], t["ahead_used"], t["ahead_wasted"]) == (1, 2, 1, 0)
    pool.load(1, 0)  # the free slab
    pool.load(1, 1)  # evicts the lru: (0, 2), read ahead and never used
    assert pool.resident(0) == {1}
    t, rows = pool.tier_stats()
    assert (t["ahead_used"], t["ahead_wasted"], t["evictions"]) == (1, 1, 1)
    assert rows["ahead_wasted"].tolist() == [1, 0, 0] and rows["ahead_reads"].tolist() == [2, 0, 0]
    pool.reset_stats()
    assert pool.tier_stats()[0]["ahead_reads"] == 0
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.read_ahead(0, [3])


def test_a_copy_waits_on_the_read_ahead_in_flight(tmp_path):
    """Each file read sleeps 0.3 s: the demand acquire_host arrives while the read-ahead reads, waits
    for it and takes its slab; the expert is read once."""
    pool = tiered(tmp_path, capacity=2)
    with faults.inject(faults.FaultPlan(read_delay_s=0.3)):
        assert pool.read_ahead(2, [3]) == 1
        reading()  # the reader is reading it
        t0 = time.perf_counter()
        addr = pool.acquire_host(2, 3, demand=True)
        waited = time.perf_counter() - t0
        assert faults.counts()["delayed_reads"] == 1
    assert np.array_equal(host_bytes(addr), expected(2, 3))
    pool.release_host(2, 3)
    t = pool.tier_stats()[0]
    assert t["reads"] == 1 and t["ahead_reads"] == 1 and t["demand_reads"] == 0
    assert (t["hits"], t["ahead_used"], t["ahead_waits"]) == (1, 1, 1)
    assert 0.05 < t["ahead_wait_s"] <= waited + 0.01
    pool.close()


def test_read_ahead_never_evicts_a_pinned_slab_nor_waits(tmp_path):
    pool = tiered(tmp_path, capacity=2)
    a, b = pool.acquire_host(0, 0), pool.acquire_host(0, 1)  # both slabs pinned
    assert pool.read_ahead(1, [0]) == 1
    t = settle(pool, 1)
    assert t["ahead_dropped"] == 1 and t["ahead_reads"] == 0 and pool.resident(1) == set()
    assert np.array_equal(host_bytes(a), expected(0, 0)) and np.array_equal(host_bytes(b), expected(0, 1))
    pool.release_host(0, 0)
    pool.release_host(0, 1)
    assert pool.read_ahead(1, [0]) == 1 and settle(pool, 2)["ahead_reads"] == 1
    assert pool.resident(1) == {0}
    pool.close()


def test_the_queue_keeps_the_newest_requests(tmp_path):
    """At most ``capacity`` requests wait: a newer one pushes out the oldest (a stale prediction)."""
    pool = tiered(tmp_path, capacity=2)
    with faults.inject(faults.FaultPlan(read_delay_s=0.2)):
        assert pool.read_ahead(0, [0]) == 1
        reading()  # the reader is reading (0, 0)
        assert pool.read_ahead(0, [1, 2, 3]) == 3  # (0, 1) pushed out by (0, 3)
        t = settle(pool, 4)
    assert (t["ahead_reads"], t["ahead_dropped"]) == (3, 1)
    assert pool.resident(0) == {2, 3} and t["ahead_wasted"] == 1  # (0, 0) evicted unused
    pool.close()


def test_untiered_pool_and_bad_arguments():
    pool = ExpertPool(L, E, SLAB, pin=False)
    assert not pool.tiered and pool.read_ahead(0, [1, 2]) == 0
    with pytest.raises(ValueError, match="expert 4 is out of range"):
        pool.read_ahead(0, [4])
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        pool.read_ahead(3, [0])
    with pytest.raises(ValueError, match="readers=0 is out of range"):
        pool.readers = 0
    pool.readers = 2
    assert pool.readers == 2


def test_fifo_pool_evicts_the_oldest_read(tmp_path):
    """fifo ignores uses: the first read goes first although it was used last (lru would keep it)."""
    pool = tiered(tmp_path, capacity=2, policy="fifo")
    for e in (0, 1, 0, 2):
        pool.acquire_host(0, e)
        pool.release_host(0, e)
    assert pool.resident(0) == {1, 2}
    pool.close()


def engine_over(tmp_path, capacity: int, slots: int, read_ahead: int):
    pool = tiered(tmp_path, capacity=capacity)
    cache = SlabCache(pool, slots, policy="lru", device="cpu", min_slots=2)
    engine = CopyEngine(cache, 1)
    engine.read_ahead = read_ahead
    return pool, cache, engine


@pytest.mark.parametrize("k", [0, 1, 2])
def test_predictions_read_ahead_k_rows(tmp_path, k):
    """A plan for layers 0, 1, 2 on a 2-slot cache: rows 0 and 1 get device copies, row 2 cannot
    (no slot). read_ahead=k also reads row 2's expert into the pool when 2 <= k; 0 reads nothing ahead."""
    pool, cache, engine = engine_over(tmp_path, capacity=6, slots=2, read_ahead=k)
    try:
        ids = np.array([[0, -1], [1, -1], [2, -1]], dtype=np.int32)
        engine.predict([0, 1, 2], ids, None, [], 0.0)
        engine.synchronize()
        t = settle(pool, 3 if k else 0, timeout=2.0 if k == 2 else 0.3)
        assert cache.resident_ids(0) == [0] and cache.resident_ids(1) == [1] and cache.resident_ids(2) == []
        assert pool.resident(2) == ({2} if k >= 2 else set())
        # rows 0 and 1 race: the lane may read an expert before a reader thread does; row 2 cannot
        assert t["ahead_reads"] == 0 if k == 0 else t["ahead_reads"] >= (k >= 2)
        # every device copy read its expert once, ahead or on the lane
        es = engine.stats()
        assert t["hits"] + t["reads"] - t["ahead_reads"] == es["copies"] == 2
        assert t["reads"] == 2 + (k >= 2)
        slots = engine.acquire(2, [2])
        got = cache.slot_view(slots[0], torch.uint8, (SLAB,)).numpy()
        assert np.array_equal(got, expected(2, 2))
        engine.release(2, [2])
        engine.synchronize()
        t = pool.tier_stats()[0]
        assert t["demand_reads"] == (0 if k >= 2 else 1) and t["ahead_used"] == t["ahead_reads"]
    finally:
        engine.close()
        cache.close()
        pool.close()


def test_prefetch_reads_ahead_while_the_lane_is_busy(tmp_path):
    """Slow reads (0.25 s each) and one lane: prefetching 4 experts starts their 4 reads at once on 4
    reader threads, so the 4 copies take about 1 read time, not 4 (the lane alone), and each expert is
    read once."""
    pool = tiered(tmp_path, capacity=8)
    pool.readers = 4
    cache = SlabCache(pool, 4, policy="lru", device="cpu", min_slots=2)
    engine = CopyEngine(cache, 1)
    engine.read_ahead = 1
    try:
        with faults.inject(faults.FaultPlan(read_delay_s=0.25)):
            t0 = time.perf_counter()
            assert engine.prefetch(1, [0, 1, 2, 3]) == 4
            engine.synchronize()
            took = time.perf_counter() - t0
        t = pool.tier_stats()[0]
        assert t["reads"] == 4 and t["hits"] + t["reads"] - t["ahead_reads"] == 4
        assert t["ahead_reads"] >= 3 and took < 0.75, (t, took)
        for e in range(4):
            slots = engine.acquire(1, [e])
            assert np.array_equal(cache.slot_view(slots[0], torch.uint8, (SLAB,)).numpy(), expected(1, e))
            engine.release(1, [e])
    finally:
        engine.close()
        cache.close()
        pool.close()
