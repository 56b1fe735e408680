"""Native fault injection (moert.engine.faults): a copy that fails, a slow copy, a copy lane whose
thread dies, a pool or slot allocation that fails, on the CPU twin and the device model.

For each: the error reaches the Python caller as a RuntimeError naming the operation and the entry
(layer, expert, slot), never a hang or a crash; nothing is left half-registered (the entry is not
resident, every slot can be pinned again, the engine/cache/pool close); the next call works, or
fails at once with a message saying what to do. A patched tiny model whose copy fails mid-generate
raises, and once the fault is cleared generates exactly the unpatched tokens; a slow copy only costs
time (identical outputs, larger stall counters).
"""

from __future__ import annotations

import re

import pytest
import torch

import moert
from moert.api.handle import _HANDLES
from moert.engine import runtime
from moert.engine.faults import FaultPlan, counts, inject
from moert.models.tiny import greedy, prompt_ids, save_tiny, single_thread, tiny_model

L, E, SLOTS = 2, 8, 4
DEVICES = ("cpu", "sim")


@pytest.fixture(autouse=True)
def _disarmed():
    yield
    moert.engine.faults.disarm()  # a failed test never leaves a plan armed for the next


def entry(layer: int, expert: int, numel: int) -> torch.Tensor:
    """The distinct bytes of entry (layer, expert): (numel,) float32."""
    return torch.arange(numel, dtype=torch.float32) + 1000.0 * (layer * E + expert + 1)


def make(device: str, slab_bytes: int = 1 << 12, lanes: int = 2, slots: int = SLOTS):
    pool = runtime.ExpertPool(L, E, slab_bytes)
    for layer in range(L):
        for e in range(E):
            pool.fill(layer, e, entry(layer, e, slab_bytes // 4))
    cache = runtime.SlabCache(pool, slots, device=device, min_slots=1)
    engine = runtime.CopyEngine(cache, lanes, slot_timeout_s=5.0)
    return pool, cache, engine


def slot_holds(cache, slot: int, layer: int, expert: int) -> bool:
    n = cache.slab_bytes // 4
    return torch.equal(cache.slot_view(slot, torch.float32, (n,)), entry(layer, expert, n))


def all_slots_free(engine, layer: int = 1) -> None:
    """Every slot can be pinned at once (a pin left behind would time out here), then released."""
    experts = list(range(SLOTS))
    engine.acquire(layer, experts)
    engine.release(layer, experts)


def close(pool, cache, engine) -> None:
    engine.close()
    cache.close()
    pool.close()


@pytest.mark.parametrize("device", DEVICES)
def test_a_failed_copy_raises_with_context_and_the_next_access_loads_it(device):
    pool, cache, engine = make(device)
    with inject(FaultPlan(fail_copy=2)):
        engine.acquire(0, [1])  # copy #1 works
        engine.release(0, [1])
        with pytest.raises(
            RuntimeError,
            match=r"acquire: the copy of \(layer 0, expert 3\) into slot \d+ failed .*injected fault: copy #2",
        ):
            engine.acquire(0, [3, 1])
    assert cache.lookup(0, 3) == -1 and not cache.resident(0, in_flight=True)[3], (
        "a failed entry stayed registered"
    )
    assert cache.lookup(0, 1) >= 0  # the hit of the failed call is untouched
    assert engine.stats()["failed_copies"] == 1
    all_slots_free(engine)  # the failed call unpinned both experts, the failed slot is free again
    (slot,) = engine.acquire(0, [3])  # the next call copies it again
    assert slot_holds(cache, slot, 0, 3)
    engine.release(0, [3])
    close(pool, cache, engine)


def test_a_device_copy_that_fails_after_acquire_returned_is_reported_once():
    """The device model: acquire returns once the copy is issued (the caller's stream waits on it);
    the copy fails later on its stream. The next call says so, once; the entry is loaded again."""
    pool, cache, engine = make("sim", slab_bytes=1 << 20)
    dev = cache.sim_device()
    stream = dev.create_stream()
    with inject(FaultPlan(fail_copy=1, slow=2000)):  # ~0.1 s: acquire returns long before
        slots = engine.acquire(0, [5], stream=stream)
        with pytest.raises(
            RuntimeError,
            match=r"the copy of \(layer 0, expert 5\) into slot \d+ failed .*injected fault: copy #1 failed on its stream.* after acquire returned",
        ):
            engine.release(0, [5], stream=stream)
            engine.synchronize()
    engine.synchronize()  # reported once: the engine is usable
    assert cache.lookup(0, 5) == -1
    all_slots_free(engine)
    (slot,) = engine.acquire(0, [5], stream=stream)
    dev.synchronize(stream)
    assert slot_holds(cache, slot, 0, 5) and slots
    engine.release(0, [5], stream=stream)
    dev.destroy_stream(stream)
    close(pool, cache, engine)


@pytest.mark.parametrize("device", DEVICES)
def test_a_deferred_wait_on_a_failed_copy_raises_and_release_still_unpins(device):
    pool, cache, engine = make(device)
    with inject(FaultPlan(fail_copy=1)):
        slots, pending = engine.acquire_deferred(0, [2, 6])
        # the first copy issued fails: expert 2's or 6's, whichever copy lane takes its request first
        with pytest.raises(RuntimeError, match=r"wait_ready: the copy of \(layer 0, expert [26]\)") as err:
            engine.wait_ready(0, [2, 6])
        engine.release(0, [2, 6])  # what the layer's `finally` does: no error, pins returned
    failed = int(re.search(r"expert (\d+)\)", str(err.value)).group(1))
    assert cache.lookup(0, failed) == -1
    all_slots_free(engine)
    close(pool, cache, engine)


@pytest.mark.parametrize("device", DEVICES)
def test_a_failed_prefetch_only_counts(device):
    pool, cache, engine = make(device)
    with inject(FaultPlan(fail_copy=1)):
        assert engine.prefetch(0, [4]) == 1
        engine.synchronize()
    assert engine.stats()["failed_copies"] == 1 and cache.lookup(0, 4) == -1
    (slot,) = engine.acquire(0, [4])
    assert slot_holds(cache, slot, 0, 4)
    engine.release(0, [4])
    all_slots_free(engine)
    close(pool, cache, engine)


@pytest.mark.parametrize("device", DEVICES)
def test_a_lane_that_dies_fails_cleanly_and_the_engine_closes(device):
    pool, cache, engine = make(device, lanes=1)
    with inject(FaultPlan(kill_lane=1)):
        engine.prefetch(0, [2])  # the lane takes the request and its thread dies holding it
        with pytest.raises(
            RuntimeError,
            match=r"synchronize: copy lane 0's worker thread stopped: injected fault.*close it and open a new one",
        ):
            engine.synchronize()
        assert counts()["killed_lanes"] == 1
    with pytest.raises(RuntimeError, match="copy lane 0's worker thread stopped"):
        engine.acquire(0, [3])  # fails at once, no hang
    assert cache.lookup(0, 2) == -1
    close(pool, cache, engine)
    pool, cache, engine = make(device, lanes=1)  # a new engine works
    all_slots_free(engine)
    close(pool, cache, engine)


def test_a_lane_that_dies_under_a_waiting_acquire_raises():
    pool, cache, engine = make("sim", lanes=2)
    dies = pytest.raises(RuntimeError, match=r"acquire: .*\(layer 0, expert 7\).*worker thread stopped")
    with inject(FaultPlan(kill_lane=1)), dies:
        engine.acquire(0, [7])  # the device model hands demand loads to the lanes
    engine.close()  # the other lane and the completion threads join
    cache.close()
    pool.close()


@pytest.mark.parametrize("device", DEVICES)
def test_a_failed_allocation_raises_with_context_and_the_next_open_works(device):
    fails = pytest.raises(
        RuntimeError,
        match=r"ExpertPool of 2 layers x 8 experts \(16 host slabs\): allocation of \d+ bytes failed \(injected fault: allocation #1\)",
    )
    with inject(FaultPlan(fail_alloc=1)), fails:
        runtime.ExpertPool(L, E, 1 << 12)
    with inject(FaultPlan(fail_alloc=2)):  # the pool works, its cache's slots fail
        pool = runtime.ExpertPool(L, E, 1 << 12)
        with pytest.raises(
            RuntimeError, match=rf"SlabCache of 4 slots on {device}: allocation of 16384 bytes failed"
        ):
            runtime.SlabCache(pool, SLOTS, device=device)
        assert counts()["failed_allocations"] == 1
    pool.close()
    pool, cache, engine = make(device)
    all_slots_free(engine)
    close(pool, cache, engine)


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4


def test_open_close_cycles_with_failed_opens_do_not_leak():
    """1,000 cycles, each a failed open (the slot arena's allocation fails after the pool's) and a
    full open / copy / close, on the device model: resident memory stays flat."""

    def cycle() -> None:
        with inject(FaultPlan(fail_alloc=2)):
            pool = runtime.ExpertPool(2, 8, 1 << 16)
            with pytest.raises(RuntimeError, match="injected fault"):
                runtime.SlabCache(pool, 4, device="sim", min_slots=2)
            pool.close()
        pool = runtime.ExpertPool(2, 8, 1 << 16)
        cache = runtime.SlabCache(pool, 4, device="sim", min_slots=2)
        engine = runtime.CopyEngine(cache, 2)
        engine.acquire(0, [1, 2])
        engine.release(0, [1, 2])
        close(pool, cache, engine)

    for _ in range(100):  # warm up allocator pools
        cycle()
    before = _rss_kib()
    for _ in range(1000):
        cycle()
    grown = _rss_kib() - before
    # each cycle maps 2 MiB of pools and 256 KiB of slots: leaking either would add >= 2 GiB
    assert grown < 16 * 1024, f"resident memory grew by {grown} KiB over 1,000 cycles with failed opens"


# -- a patched tiny model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """(model, prompt, unpatched tokens); one torch thread for the module's generates."""
    with single_thread():
        model = tiny_model("deepseek_v2")
        prompt = prompt_ids()
        sequences, _ = greedy(model, prompt, new_tokens=8)
        yield model, prompt, sequences


def patched(tiny, device: str):
    """The model patched on ``device`` and its fault-free output (sequences equal the unpatched ones;
    logits are the patched path's, which no fault may change by a bit)."""
    model, prompt, unpatched = tiny
    handle = moert.patch(model, cache_experts=0.5, device=device)
    sequences, logits = greedy(model, prompt, new_tokens=8)
    assert torch.equal(sequences, unpatched)
    handle.reset_stats()
    return handle, sequences, logits


@pytest.mark.parametrize("device", DEVICES)
def test_a_copy_that_fails_mid_generate_raises_and_the_cleared_model_is_exact(tiny, device):
    model, prompt, _ = tiny
    handle, ref_seq, ref_logits = patched(tiny, device)
    try:
        with inject(FaultPlan(fail_copy=6)):
            with pytest.raises(
                RuntimeError, match=r"acquire: the copy of \(layer \d+, expert \d+\) into slot \d+ failed"
            ):
                greedy(model, prompt, new_tokens=8)
            assert counts()["failed_copies"] == 1
        sequences, logits = greedy(model, prompt, new_tokens=8)  # the fault cleared: the same model
        assert torch.equal(sequences, ref_seq) and torch.equal(logits, ref_logits)
        assert handle.stats().misses > 0, "nothing was offloaded"
    finally:
        handle.undo()


@pytest.mark.parametrize("device", DEVICES)
def test_a_slow_copy_only_costs_time(tiny, device):
    model, prompt, _ = tiny
    handle, ref_seq, ref_logits = patched(tiny, device)
    try:
        slow = 200.0
        with inject(FaultPlan(slow=slow)):
            sequences, logits = greedy(model, prompt, new_tokens=8)
            seen = counts()
        assert torch.equal(sequences, ref_seq) and torch.equal(logits, ref_logits)
        stats = handle.stats()
        assert stats.misses > 0 and seen["slowed_copies"] == seen["copies"] > 0
        engine = handle._offloader.engine
        if device == "cpu":  # every stall includes the sleeps added to the copies it waited for
            assert seen["slow_s"] > 0 and stats.demand_stall_s >= seen["slow_s"]
        else:  # each copy lasts slow x its modelled time; the host waits for every demand copy, the
            # copies of one acquire spread over the lanes
            copy_s = engine.cache.sim_device().copy_seconds(engine.cache.slab_bytes)
            bound = seen["copies"] / engine.num_streams * slow * copy_s
            assert stats.demand_stall_s >= 0.99 * bound, (stats.demand_stall_s, bound)
    finally:
        handle.undo()


def test_a_failed_allocation_while_loading_registers_nothing(tmp_path):
    path = save_tiny(tiny_model("deepseek_v2"), tmp_path / "m")
    handles = len(_HANDLES)
    for n in (1, 2):  # the pool, then the slot arena
        fails = pytest.raises(RuntimeError, match=r"allocation of \d+ bytes failed \(injected fault")
        with inject(FaultPlan(fail_alloc=n)), fails:
            moert.load(path, cache_experts=0.5, device="cpu", progress=False)
        assert len(_HANDLES) == handles, "a failed load left a patch handle registered"
    model = moert.load(path, cache_experts=0.5, device="cpu", progress=False)  # the next call works
    moert.handle_of(model).undo()


@pytest.mark.parametrize("device", DEVICES)
def test_a_lane_that_dies_mid_generate_raises_and_undo_restores_the_model(tiny, device):
    model, prompt, unpatched = tiny
    handle = moert.patch(model, cache_experts=0.5, device=device, overlap_waves=False, deferred_waits=True)
    dies = pytest.raises(RuntimeError, match=r"copy lane \d+'s worker thread stopped")
    with inject(FaultPlan(kill_lane=3)), dies:  # deferred waits hand every copy to the lanes
        greedy(model, prompt, new_tokens=8)
    with pytest.raises(RuntimeError, match="close it and open a new one"):
        greedy(model, prompt, new_tokens=8)  # fails at once, no hang
    handle.undo()  # the engine closes, the experts come back from the pool
    sequences, _ = greedy(model, prompt, new_tokens=8)
    assert torch.equal(sequences, unpatched)
