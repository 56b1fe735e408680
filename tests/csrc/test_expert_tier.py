"""The tiered ExpertPool (the host tier of ``moert.load(host_budget=...)``): a cache of host slabs over
files, read in C++; eviction order, pins held by copies in flight, changed / vanished files, and the
copy engine reading through it."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from moert.engine.runtime import CopyEngine, ExpertPool, SlabCache

L, E, SLAB = 2, 4, 256


def expected(layer: int, expert: int) -> np.ndarray:
    return np.random.default_rng(100 * layer + expert).integers(0, 256, SLAB, dtype=np.uint8)


def make_file(tmp_path, name="experts.bin"):
    """Every expert at 32 + key * SLAB, its halves swapped in the file (two parts per source)."""
    path = tmp_path / name
    with open(path, "wb") as f:
        f.write(b"x" * 32)
        for layer in range(L):
            for e in range(E):
                d = expected(layer, e)
                f.write(d[SLAB // 2 :].tobytes() + d[: SLAB // 2].tobytes())
    return path


def tiered(tmp_path, capacity=2, policy="lru", read_mode="pread", path=None):
    path = path or make_file(tmp_path)
    pool = ExpertPool(L, E, SLAB, pin=False, capacity=capacity, policy=policy, read_mode=read_mode)
    fid = pool.add_file(str(path))
    h = SLAB // 2
    for layer in range(L):
        for e in range(E):
            at = 32 + (layer * E + e) * SLAB
            pool.set_source(layer, e, [(fid, at, h, h), (fid, at + h, h, 0)])
    return pool, path


@pytest.mark.parametrize("read_mode", ["pread", "mmap"])
def test_reads_the_right_bytes_and_counts(tmp_path, read_mode):
    pool, _ = tiered(tmp_path, capacity=3, read_mode=read_mode)
    assert pool.tiered and pool.capacity == 3 and pool.nbytes == 3 * pool.stride
    for layer in range(L):
        for e in range(E):
            assert np.array_equal(pool.copy_out(layer, e).numpy(), expected(layer, e)), (layer, e)
    # copy_out of a non-resident expert reads the file without filling the cache
    assert pool.tier_stats()[0]["reads"] == 0 and pool.resident(0) == set()
    assert pool.load(0, 1) == SLAB and pool.load(0, 1) == 0  # the second is resident
    view = pool.view(0, 1, torch.uint8, (SLAB,))
    assert np.array_equal(view.numpy(), expected(0, 1))
    stack = pool.layer_view(1, torch.uint8, (SLAB // 2,), SLAB // 2)
    assert stack.shape == (E, SLAB // 2)
    assert all(np.array_equal(stack[e].numpy(), expected(1, e)[SLAB // 2 :]) for e in range(E))
    totals, rows = pool.tier_stats()
    assert totals["reads"] == 1 and totals["read_bytes"] == SLAB and rows["reads"].tolist() == [1, 0]
    with pytest.raises(RuntimeError, match="no fixed address"):
        pool.address(0, 0)
    with pytest.raises(RuntimeError, match="cannot be filled"):
        pool.fill(0, 0, torch.zeros(4))


@pytest.mark.parametrize(
    ("policy", "touch", "evicted"),
    [("lru", [1, 1, 1, 0], 1), ("lfu", [0, 0, 0, 1], 1)],  # each the other policy's wrong answer
)
def test_eviction_order(tmp_path, policy, touch, evicted):
    pool, _ = tiered(tmp_path, capacity=2, policy=policy)
    for e in [*touch, 2]:  # the last needs a victim
        assert pool.acquire_host(0, e) != 0
        pool.release_host(0, e)
    assert pool.resident(0) == {0, 1, 2} - {evicted}
    assert pool.tier_stats()[0]["evictions"] == 1


def test_a_pinned_slab_is_never_evicted(tmp_path):
    """Slabs held by copies in flight (acquire_host .. release_host) stay; a read that needs a slab
    waits until one is released."""
    pool, _ = tiered(tmp_path, capacity=2)
    a, b = pool.acquire_host(0, 0), pool.acquire_host(0, 1)
    done = threading.Event()
    threading.Thread(target=lambda: (pool.load(1, 3), done.set()), daemon=True).start()
    time.sleep(0.3)
    assert not done.is_set(), "a read evicted a pinned slab"
    assert np.array_equal(np.frombuffer((ctypes_bytes(a)), np.uint8), expected(0, 0))
    pool.release_host(0, 1)
    assert done.wait(5)
    assert pool.resident(0) == {0} and pool.resident(1) == {3}
    assert np.array_equal(np.frombuffer(ctypes_bytes(a), np.uint8), expected(0, 0))
    assert b != 0
    pool.release_host(0, 0)


def ctypes_bytes(address: int) -> bytes:
    import ctypes

    return ctypes.string_at(address, SLAB)


@pytest.mark.parametrize("change", ["rewrite", "truncate", "vanish", "replace"])
def test_changed_or_vanished_files_are_clear_errors(tmp_path, change):
    pool, path = tiered(tmp_path, capacity=2)
    pool.load(0, 0)
    if change == "rewrite":  # same size, new bytes, later mtime
        data = path.read_bytes()
        st = os.stat(path)
        path.write_bytes(data[::-1])
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "truncate":
        with open(path, "r+b") as f:
            f.truncate(100)
    elif change == "vanish":
        path.unlink()
    else:  # another file under the same name (a new inode, same size and mtime)
        st = os.stat(path)
        tmp = path.with_suffix(".new")
        tmp.write_bytes(path.read_bytes())
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, path)
    word = "vanished" if change == "vanish" else "changed"
    with pytest.raises(RuntimeError, match=f"checkpoint file {path} {word} after loading"):
        pool.load(1, 2)
    with pytest.raises(RuntimeError, match=str(path)):
        pool.copy_out(1, 3)
    # the resident expert is still served from host memory
    assert np.array_equal(pool.copy_out(0, 0).numpy(), expected(0, 0))


def test_bad_sources_and_arguments(tmp_path):
    path = make_file(tmp_path)
    with pytest.raises(ValueError, match="capacity=0 host slabs is out of range; use 1..8"):
        ExpertPool(L, E, SLAB, pin=False, capacity=0)
    with pytest.raises(ValueError, match="pool policy 'mru'"):
        ExpertPool(L, E, SLAB, pin=False, capacity=2, policy="mru")
    with pytest.raises(ValueError, match="read_mode 'aio'"):
        ExpertPool(L, E, SLAB, pin=False, capacity=2, read_mode="aio")
    pool = ExpertPool(L, E, SLAB, pin=False, capacity=2)
    with pytest.raises(RuntimeError, match="cannot open checkpoint file"):
        pool.add_file(str(tmp_path / "nope.bin"))
    fid = pool.add_file(str(path))
    size = os.path.getsize(path)
    with pytest.raises(ValueError, match="lie outside"):
        pool.set_source(0, 0, [(fid, size - 10, 64, 0)])
    with pytest.raises(ValueError, match="run past the 256-byte slab"):
        pool.set_source(0, 0, [(fid, 0, 64, 250)])
    with pytest.raises(ValueError, match="file id 3 was never added"):
        pool.set_source(0, 0, [(3, 0, 64, 0)])
    with pytest.raises(RuntimeError, match="has no source"):
        pool.load(1, 1)


@pytest.mark.parametrize("device", ["cpu", "sim"])
def test_copy_engine_reads_through_the_tier(tmp_path, device):
    """Copies into device slots read missing experts from the file; every slot holds the right bytes,
    and pool hits + reads = the engine's copies."""
    pool, _ = tiered(tmp_path, capacity=3)
    cache = SlabCache(pool, 4, policy="lru", device=device, min_slots=2)
    engine = CopyEngine(cache, 2)
    rng = np.random.default_rng(0)
    try:
        for _ in range(60):
            layer = int(rng.integers(L))
            ids = rng.choice(E, size=2, replace=False).tolist()
            slots = engine.acquire(layer, ids)
            for e, s in zip(ids, slots):
                got = cache.slot_view(s, torch.uint8, (SLAB,)).numpy()
                assert np.array_equal(got, expected(layer, e)), (layer, e)
            engine.release(layer, ids)
        engine.synchronize()
        ps, es = pool.tier_stats()[0], engine.stats()
        assert ps["reads"] > 0 and ps["hits"] > 0 and ps["evictions"] > 0
        assert ps["hits"] + ps["reads"] == es["copies"]
    finally:
        engine.close()
        cache.close()
        pool.close()


def test_a_slab_stays_pinned_until_its_device_copy_lands(tmp_path):
    """The device model's copies land 20 ms after they are issued: a host slab released at issue
    (not at completion) would be evicted and overwritten by the next read before its bytes land."""
    from moert.engine.devices import SimTiming

    pool, _ = tiered(tmp_path, capacity=2)
    cache = SlabCache(pool, 4, policy="lru", device="sim", min_slots=4, sim=SimTiming(latency_us=20_000.0))
    engine = CopyEngine(cache, 1)
    try:
        for layer in range(L):
            slots = engine.acquire(layer, list(range(E)))
            for e, s in enumerate(slots):
                got = cache.slot_view(s, torch.uint8, (SLAB,)).numpy()
                assert np.array_equal(got, expected(layer, e)), (layer, e)
            engine.release(layer, list(range(E)))
        assert pool.tier_stats()[0]["waits"] > 0  # reads waited for slabs held by copies in flight
    finally:
        engine.close()
        cache.close()
        pool.close()
