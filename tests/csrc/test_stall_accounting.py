"""The engine's demand-stall measure: a host wait for a copy counts, at acquire and at ``wait_ready``
(deferred waits), in the totals and in the waiting layer's row; a wait that waited for nothing does not.
On the device model, whose copies take a known modelled time."""

from __future__ import annotations

import time

import numpy as np
import pytest

from moert.engine.runtime import CopyEngine, ExpertPool, SimTiming, SlabCache

MB = 1 << 20


@pytest.fixture
def rig():
    pool = ExpertPool(2, 4, MB, pin=False)
    for layer in range(2):
        for e in range(4):
            pool.fill(layer, e, np.full(MB, layer * 4 + e, dtype=np.uint8))
    # 1 MiB at 0.05 GB/s: about 21 ms per copy, modelled
    cache = SlabCache(pool, 4, device="sim", min_slots=2, sim=SimTiming(bandwidth_gbs=0.05, latency_us=10.0))
    engine = CopyEngine(cache, 1)
    yield engine
    engine.close()
    cache.close()
    pool.close()


def test_wait_ready_counts_its_wait_in_the_layers_stall(rig):
    slots, pending = rig.acquire_deferred(1, [0, 1])
    assert pending == [True, True], "the copies cannot be complete at once: the model takes ~21 ms each"
    t0 = time.perf_counter()
    for e in (0, 1):
        rig.wait_ready(1, [e])  # the host (stream 0) waits for each copy
    waited = time.perf_counter() - t0
    rig.release(1, [0, 1])
    st = rig.stats(per_layer=True)
    assert waited >= 0.03
    assert st["demand_stall_s"] >= 0.5 * waited, (st["demand_stall_s"], waited)
    rows = st["per_layer"]["demand_stall_s"]
    assert rows[0] == 0.0 and rows[1] == pytest.approx(st["demand_stall_s"]), rows


def test_a_wait_for_a_ready_copy_is_not_a_stall(rig):
    rig.acquire(0, [2])  # waits for the copy: a stall
    rig.release(0, [2])
    before = rig.stats()["demand_stall_s"]
    assert before > 0.0
    slots, pending = rig.acquire_deferred(0, [2])  # resident and ready
    assert pending == [False]
    rig.wait_ready(0, [2])
    rig.release(0, [2])
    assert rig.stats()["demand_stall_s"] == before
