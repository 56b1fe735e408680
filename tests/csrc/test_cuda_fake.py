"""The CUDA backend (csrc/src/backend_cuda.cc, the driver API loaded at run time) on the fake CUDA
driver (tests/fake_cuda/fake_cuda.cc): loading and its errors, device selection, the caller's
current context, the slots' zero fill. The copy protocol itself runs on the fake driver in
test_device_model.py and test_copy_engine.py (``device="fake-cuda"``)."""

from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_device_model import Rig

from moert.engine import runtime
from moert.engine.runtime import CopyEngine, ExpertPool, SimTiming, SlabCache

ROOT = Path(__file__).resolve().parents[2]


def test_backends_report_the_fake_driver(fake_cuda):
    info = runtime.backends()["cuda"]
    assert info["can_run"] and info["device_count"] == 2, info
    assert info["device_name"] == "Fake CUDA device 0"
    assert (info["driver_version"], info["driver_library"]) == (13000, str(fake_cuda.path))
    from moert.cli import info as cli_info

    assert cli_info.collect()["backends"]["cuda"]["driver_version"] == 13000


def test_missing_driver_library_is_one_clear_error(fake_cuda, monkeypatch):
    monkeypatch.setenv("MOERT_LIBCUDA", "/nonexistent/libcuda.so.1")
    info = runtime.backends()["cuda"]
    assert not info["can_run"] and info["driver_version"] == 0
    assert "the CUDA driver library '/nonexistent/libcuda.so.1' could not be loaded" in info["reason"]
    assert "install the NVIDIA driver, or set MOERT_LIBCUDA" in info["reason"]
    pool = ExpertPool(1, 2, 64, pin=False)
    with pytest.raises(RuntimeError, match="no CUDA device: the CUDA driver library"):
        SlabCache(pool, 1, device="cuda:0")
    assert ExpertPool(1, 2, 64).pinned is False  # pin=None: nothing to pin with


def test_old_driver_names_both_versions(fake_cuda, monkeypatch):
    monkeypatch.setenv("FAKE_CUDA_DRIVER_VERSION", "10020")
    reason = runtime.backends()["cuda"]["reason"]
    assert (
        "the CUDA driver is too old" in reason and "supports CUDA 10.2 (cuDriverGetVersion 10020)" in reason
    )
    assert "needs CUDA 11.0 or later; install a newer NVIDIA driver" in reason
    with pytest.raises(RuntimeError, match="too old"):
        SlabCache(ExpertPool(1, 2, 64, pin=False), 1, device="cuda:0")
    monkeypatch.setenv("FAKE_CUDA_DRIVER_VERSION", "11000")  # the minimum: accepted
    assert runtime.backends()["cuda"]["can_run"]


def test_driver_errors_name_the_call(fake_cuda, monkeypatch):
    monkeypatch.setenv("FAKE_CUDA_INIT_ERROR", "100")
    reason = runtime.backends()["cuda"]["reason"]
    assert "cuInit: no CUDA-capable device is detected (100)" in reason, reason
    monkeypatch.delenv("FAKE_CUDA_INIT_ERROR")
    with pytest.raises(ValueError, match=r"there are only 2 CUDA devices \(cuda:0..cuda:1\)"):
        SlabCache(ExpertPool(1, 2, 64, pin=False), 1, device="cuda:2")


def test_import_never_loads_the_driver(fake_cuda):
    """Importing moert and its extension maps no driver library; the first probe does, and
    ``moert info`` prints the driver's version."""
    code = (
        "import moert, moert._C, moert.engine.runtime as r\n"
        f"lib = {str(fake_cuda.path)!r}\n"
        "maps = lambda: open('/proc/self/maps').read()\n"
        "assert lib not in maps() and 'libcuda' not in maps(), 'the driver was loaded at import'\n"
        "assert r.backends()['cuda']['can_run']\n"
        "assert lib in maps(), 'the probe did not load the driver'\n"
        "import argparse, moert.cli.info as info\n"
        "info.run(argparse.Namespace(json=False))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOERT_LIBCUDA": str(fake_cuda.path)}
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], check=True, env=env, capture_output=True, text=True
    )
    assert "Fake CUDA device 0 (driver: CUDA 13.0, " in out.stdout, out.stdout + out.stderr


def test_slots_are_zero_before_the_first_copy(fake_cuda):
    """The zero fill (on a stream of its own) is complete when the cache exists: a memset taking
    ~50 ms on the fake device is not still running (the fake's fresh memory is 0xA5)."""
    fake_cuda.set_timing(SimTiming(bandwidth_gbs=0.02, latency_us=20.0))
    pool = ExpertPool(1, 4, 256 * 1024, pin=False)
    before = fake_cuda.stats()["memsets"]
    cache = SlabCache(pool, 4, device="cuda:0")
    try:
        raw = ctypes.string_at(cache._c.slot_address(0), 4 * 256 * 1024)
        assert raw.count(0) == len(raw), f"{len(raw) - raw.count(0)} slot bytes not zero"
        assert fake_cuda.stats()["memsets"] == before + 1
    finally:
        cache.close()
        pool.close()


def test_cuda_1_keeps_the_callers_context(fake_cuda):
    """A cache on cuda:1: its slots are device 1's, its copies checksum right on device 1's streams,
    and every call leaves the calling thread's current context as it was (device 0's primary
    context, as torch leaves it; or none)."""
    ctx0 = fake_cuda.primary_context(0)
    fake_cuda.set_current_context(ctx0)
    try:
        r = Rig(2, 6, 64 * 1024, 3, lanes=2, timing=SimTiming(bandwidth_gbs=0.5), fake=fake_cuda, index=1)
        assert fake_cuda.current_context() == ctx0
        assert r.cache.device_index == 1
        assert fake_cuda.lib.fakecu_pointer_device(r.cache._c.slot_address(0)) == 1
        rng = np.random.default_rng(5)
        for _ in range(20):
            layer, ids = int(rng.integers(2)), sorted({int(x) for x in rng.integers(6, size=2)})
            slots, pending = r.engine.acquire_deferred(layer, ids, stream=r.compute)
            for e, s, p in zip(ids, slots, pending):
                if p:
                    r.engine.wait_ready(layer, [e], stream=r.compute)
                r.read(layer, e, s, seconds=1e-4)
            r.engine.release(layer, ids, stream=r.compute)
            assert fake_cuda.current_context() == ctx0
        r.engine.stats(wait_device=True)
        r.check()
        seen: list[int | None] = []

        def other_thread() -> None:  # a thread with no current context keeps none
            r.engine.acquire(0, [1], stream=r.compute)
            r.engine.release(0, [1], stream=r.compute)
            seen.append(fake_cuda.current_context())

        t = threading.Thread(target=other_thread)
        t.start()
        t.join(30)
        assert seen == [None]
        r.close()
        assert fake_cuda.current_context() == ctx0
    finally:
        fake_cuda.set_current_context(None)
    st = fake_cuda.stats()
    assert st["ctx_errors"] == 0, st


def test_close_releases_driver_resources(fake_cuda):
    """Dropping the engine, cache and pinned pool frees the slots, the lanes and the pinning."""
    gc.collect()  # what earlier tests left goes now, not while this one counts
    before = fake_cuda.stats()
    pool = ExpertPool(1, 4, 4096)  # pin=None: pinned, CUDA can run
    assert pool.pinned
    cache = SlabCache(pool, 2, device="cuda:0")
    engine = CopyEngine(cache, 3)
    mid = fake_cuda.stats()
    assert (mid["allocs"], mid["registered"], mid["streams"]) == (
        before["allocs"] + 1,
        before["registered"] + 1,
        before["streams"] + 3,
    ), (before, mid)
    engine.close()
    cache.close()
    pool.close()
    del engine, cache, pool  # the memory goes with the native objects
    gc.collect()
    after = fake_cuda.stats()
    assert (after["allocs"], after["registered"], after["streams"]) == (
        before["allocs"],
        before["registered"],
        before["streams"],
    ), (before, after)


def test_copies_run_on_the_fake_device(fake_cuda):
    """The fake driver really does the copies (so the protocol tests test the CUDA backend)."""
    before = fake_cuda.stats()["copies"]
    pool = ExpertPool(1, 4, 4096, pin=False)
    pool.fill(0, 2, torch.arange(4096, dtype=torch.int32).to(torch.uint8))
    cache = SlabCache(pool, 2, device="cuda:0")
    engine = CopyEngine(cache, 1)
    engine.acquire(0, [2], stream=0)
    engine.release(0, [2], stream=0)
    engine.synchronize()
    assert fake_cuda.stats()["copies"] == before + 1
    engine.close()
    cache.close()
    pool.close()
