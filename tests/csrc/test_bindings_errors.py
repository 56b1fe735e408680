"""Every binding rejects bad input with a clear ValueError/RuntimeError naming the value; none crashes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moert import _C
from moert.engine.runtime import CopyEngine, ExpertPool, SlabCache


@pytest.fixture
def rt():
    pool = ExpertPool(2, 4, 64, pin=False)
    cache = SlabCache(pool, 3, min_slots=2)
    engine = CopyEngine(cache, 1)
    yield pool, cache, engine
    engine.close()
    cache.close()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 4, 64), "num_layers must be positive, got 0"),
        ((2, -1, 64), "num_experts must be positive, got -1"),
        ((2, 4, 0), "slab_bytes must be positive, got 0"),
        ((2, 4, 100), "slab_bytes=100 is not a multiple of 16; pad each expert's slab to 112"),
        ((2**40, 4, 64), "num_layers=1099511627776 is out of range"),
        ((1 << 20, 1 << 10, 1 << 30), "too large"),
    ],
)
def test_pool_constructor(args, match):
    with pytest.raises(ValueError, match=match):
        ExpertPool(*args, pin=False)


def test_pool_entry_and_fill(rt):
    pool, _, _ = rt
    with pytest.raises(ValueError, match=r"layer 2 is out of range \[0, 2\)"):
        pool.address(2, 0)
    with pytest.raises(ValueError, match=r"expert -1 is out of range \[0, 4\)"):
        pool.view(0, -1, torch.uint8, (4,))
    with pytest.raises(ValueError, match="source address is null"):
        pool._c.fill(0, 0, 0, 16, 0)
    with pytest.raises(ValueError, match="offset must be >= 0, got -16"):
        pool._c.fill(0, 0, 4096, 16, -16)
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        pool._c.fill(0, 0, 4096, -1, 0)
    with pytest.raises(
        ValueError, match=r"offset 48 \+ nbytes 32 = 80 runs past the end of the 64-byte slab"
    ):
        pool.fill(1, 3, torch.zeros(8, dtype=torch.float32), offset=48)
    with pytest.raises(ValueError, match="must be on the CPU|must be a torch.Tensor"):
        pool.fill(0, 0, [1, 2, 3])
    with pytest.raises(ValueError, match="runs past the 64-byte slab"):
        pool.view(0, 0, torch.float32, (17,))
    with pytest.raises(ValueError, match="multiple of 4"):
        pool.view(0, 0, torch.float32, (2,), offset=2)
    with pytest.raises(ValueError, match="negative dimension"):
        pool.view(0, 0, torch.float32, (-1,))
    with pytest.raises(TypeError):
        pool._c.fill(0, 0, -5, 16, 0)  # negative address: pybind refuses the conversion


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (
            {"num_slots": 2, "min_slots": 6},
            ValueError,
            "cache has 2 slots but one layer needs top-k=6; use at least 6",
        ),
        (
            {"num_slots": 9},
            ValueError,
            r"cache has 9 slots but there are only 8 experts \(2 layers x 4\); use at most 8",
        ),
        ({"num_slots": 0}, ValueError, "cache has 0 slots"),
        ({"num_slots": 2, "min_slots": 0}, ValueError, "min_slots must be >= 1"),
        (
            {"num_slots": 2, "policy": "fifo"},
            ValueError,
            "unknown policy 'fifo'; use one of: lru, lfu, priority",
        ),
        (
            {"num_slots": 2, "device": "tpu"},
            ValueError,
            "unknown device 'tpu'; use one of cpu, sim, cuda, cuda:N",
        ),
        ({"num_slots": 2, "device": "cuda:x"}, ValueError, "unknown device 'cuda:x'"),
        ({"num_slots": 2, "device": "sim:1"}, ValueError, "unknown device 'sim:1'"),
    ],
)
def test_cache_constructor(rt, kwargs, exc, match):
    pool, _, _ = rt
    with pytest.raises(exc, match=match):
        SlabCache(pool, **kwargs)


def test_cache_constructor_raw(rt):
    pool, _, _ = rt
    with pytest.raises(ValueError, match="unknown device 'tpu'; use 'cpu', 'sim', 'cuda' or 'cuda:N'"):
        _C.SlabCache(pool._c, 2, "lru", "tpu", 1)
    with pytest.raises(ValueError, match="the index after 'cuda:' must be a number"):
        _C.SlabCache(pool._c, 2, "lru", "cuda:", 1)
    with pytest.raises(ValueError, match="sim bandwidth_gbs=0 must be a positive number of GB/s"):
        _C.SlabCache(pool._c, 2, "lru", "sim", 1, sim_bandwidth_gbs=0.0)
    with pytest.raises(ValueError, match="sim latency_us=-1 must be"):
        _C.SlabCache(pool._c, 2, "lru", "sim", 1, sim_latency_us=-1.0)
    with pytest.raises(ValueError, match="needs an ExpertPool, got None"):
        _C.SlabCache(None, 2, "lru", "cpu", 1)
    with pytest.raises(ValueError, match="needs an ExpertPool"):
        SlabCache("pool", 2)
    with pytest.raises(ValueError, match="slab_bytes must be positive"):
        SlabCache.simulated(2, 4, 2, slab_bytes=0)
    with pytest.raises(ValueError, match="unknown policy 'LRU'"):
        SlabCache.simulated(2, 4, 2, policy="LRU")


def test_cache_queries(rt):
    _, cache, _ = rt
    with pytest.raises(ValueError, match=r"layer -1 is out of range \[0, 2\)"):
        cache.lookup(-1, 0)
    with pytest.raises(ValueError, match=r"expert 4 is out of range \[0, 4\)"):
        cache.lookup(0, 4)
    with pytest.raises(ValueError, match=r"layer 5 is out of range"):
        cache.resident(5)
    with pytest.raises(ValueError, match=r"slot 3 is out of range \[0, 3\)"):
        cache.slot_view(3, torch.uint8, (4,))
    with pytest.raises(ValueError, match="runs past the 64-byte slab"):
        cache.slot_view(0, torch.uint8, (65,))
    with pytest.raises(ValueError, match="is not finite"):
        cache.set_priority(0, [1], [float("nan")])
    with pytest.raises(ValueError, match="one score per expert"):
        cache.set_priority(0, [1, 2], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"expert 9 is out of range"):
        cache.set_priority(0, [9], [1.0])
    with pytest.raises(ValueError, match="must be integers"):
        cache.set_priority(0, [1.5], [1.0])
    with pytest.raises(ValueError, match="needs a cache made by SlabCache.simulated"):
        cache.sim_access(0, [1])
    with pytest.raises(ValueError, match="needs a cache made by SlabCache.simulated"):
        cache.replay(np.zeros(1, np.int32), np.zeros((1, 1), np.int32))


def test_sim_and_replay_arguments():
    sim = SlabCache.simulated(2, 4, 2)
    with pytest.raises(ValueError, match="3 distinct experts but the cache has only 2 slots"):
        sim.sim_access(0, [0, 1, 2])
    with pytest.raises(ValueError, match=r"expert 4 is out of range"):
        sim.sim_prefetch(0, [4])
    with pytest.raises(ValueError, match="a simulated cache has no slot memory"):
        sim.slot_view(0, torch.uint8, (1,))
    with pytest.raises(ValueError, match="must be integers"):
        sim.sim_access(0, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="out of range"):
        sim.sim_access(0, [2**40])
    lay, exp = np.zeros(3, np.int32), np.zeros((3, 2), np.int32)
    with pytest.raises(ValueError, match=r"replay: layers\[1\]=7 is out of range"):
        sim.replay(np.array([0, 7, 0]), exp)
    with pytest.raises(ValueError, match=r"replay: experts\[2, 1\]=-2 is out of range .*use -1 for padding"):
        sim.replay(lay, np.array([[0, 1], [0, 1], [0, -2]]))
    with pytest.raises(ValueError, match="experts must be"):
        sim.replay(lay, np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="must have 2 dimensions"):
        sim.replay(lay, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="integer array"):
        sim.replay(lay.astype(np.float32), exp)
    with pytest.raises(ValueError, match="prefetch_layers given without prefetch"):
        sim.replay(lay, exp, prefetch_layers=lay)
    with pytest.raises(ValueError, match=r"prefetch_layers\[0\]=9 is out of range"):
        sim.replay(lay, exp, prefetch=exp, prefetch_layers=np.array([9, 0, 0]))
    with pytest.raises(ValueError, match=r"replay: prefetch\[0, 0\]=5"):
        sim.replay(lay, exp, prefetch=np.array([[5], [0], [0]]))
    with pytest.raises(ValueError, match=r"priorities must be \(N, k\)"):
        sim.replay(lay, exp, priorities=np.zeros((3, 1), np.float32))
    with pytest.raises(ValueError, match="is not finite"):
        sim.replay(lay, exp, priorities=np.full((3, 2), np.inf, np.float32))
    with pytest.raises(ValueError, match="3 distinct experts but the cache has only 2 slots"):
        sim.replay(np.zeros(1, np.int32), np.array([[0, 1, 2]]))
    assert sim.stats()["loads"] == 0  # a rejected replay changes nothing
    with pytest.raises(ValueError, match="needs a real cache"):
        CopyEngine(sim)


def test_engine_arguments(rt):
    _, cache, engine = rt
    with pytest.raises(ValueError, match="already has an open CopyEngine"):
        CopyEngine(cache)
    with pytest.raises(ValueError, match="num_streams=0 is out of range; use 1..16"):
        _C.CopyEngine(cache._c, 0, 1.0)
    with pytest.raises(ValueError, match="needs a SlabCache"):
        CopyEngine(None)
    with pytest.raises(ValueError, match=r"layer 2 is out of range"):
        engine.acquire(2, [0])
    with pytest.raises(ValueError, match=r"expert 4 is out of range"):
        engine.prefetch(0, [4])
    with pytest.raises(
        ValueError, match="4 distinct experts but the cache has only 3 slots; stream them in waves"
    ):
        engine.acquire(0, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"release: \(layer 0, expert 1\) is not acquired"):
        engine.release(0, [1])
    with pytest.raises(ValueError, match="stream handle must be >= 0"):
        engine.acquire(0, [1], stream=-3)
    with pytest.raises(ValueError, match="must be integers"):
        engine.acquire(0, np.array([0.5]))
    assert engine.acquire(0, []) == []
    assert cache.stats()["loads"] == 0


def test_use_after_close_names_the_object():
    pool = ExpertPool(1, 4, 64, pin=False)
    cache = SlabCache(pool, 2)
    engine = CopyEngine(cache, 2)
    engine.acquire(0, [1])
    cache.close()  # closes the engine first
    for call in (lambda: engine.acquire(0, [1]), lambda: engine.prefetch(0, [2]), engine.synchronize):
        with pytest.raises(RuntimeError, match="CopyEngine.* the engine is closed"):
            call()
    with pytest.raises(RuntimeError, match="CopyEngine.release: the engine is closed"):
        engine.release(0, [1])
    with pytest.raises(RuntimeError, match="SlabCache.lookup: the cache is closed"):
        cache.lookup(0, 0)
    with pytest.raises(RuntimeError, match="SlabCache.slot_address: the cache is closed"):
        cache.slot_view(0, torch.uint8, (4,))
    with pytest.raises(RuntimeError, match="the cache is closed"):
        CopyEngine(cache)
    engine.close()
    cache.close()  # idempotent
    pool.close()
    with pytest.raises(RuntimeError, match="ExpertPool.fill: the pool is closed"):
        pool.fill(0, 0, torch.zeros(4))
    with pytest.raises(RuntimeError, match="ExpertPool.address: the pool is closed"):
        pool.address(0, 0)
    with pytest.raises(RuntimeError, match="the pool is closed"):
        SlabCache(pool, 2)
    sim = SlabCache.simulated(1, 4, 2)
    sim.close()
    with pytest.raises(RuntimeError, match="SlabCache.sim_access: the cache is closed"):
        sim.sim_access(0, [1])
