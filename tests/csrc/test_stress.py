"""The CI slice of ``bench/stress.py`` (``make stress`` runs the million): 10^5 randomized pool /
cache / engine operations over 4 threads, every slot's bytes checked against the pool at every use,
a close racing the last tenth, counters' invariants at the end."""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_SPEC = importlib.util.spec_from_file_location(
    "moert_stress", Path(__file__).parents[2] / "bench" / "stress.py"
)
stress = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = stress  # dataclasses look their module up
_SPEC.loader.exec_module(stress)


@pytest.mark.parametrize("policy", ["lru", "lfu", "priority"])
def test_stress_slice_zero_mismatches(policy):
    seed = {"lru": 11, "lfu": 12, "priority": 13}[policy]
    rep = stress.run_stress(33_334, threads=4, seed=seed, policy=policy)
    print(f"stress seed {seed}: {rep.counts}")
    assert rep.ok, (
        f"seed {seed} (python bench/stress.py --seed {seed}): {len(rep.errors)} problems: {rep.errors[:3]}"
    )
    assert rep.counts.get("acquire", 0) > 5000 and rep.counts.get("acquire_deferred", 0) > 5000
    assert rep.checked_bytes > 0


def test_stress_slice_on_the_device_model():
    """The same operations on the asynchronous device model (modelled copy times, the CUDA protocol)."""
    rep = stress.run_stress(20_000, device="sim", threads=4, seed=21, policy="lru")
    assert rep.ok, f"seed 21 (python bench/stress.py --device sim --seed 21): {rep.errors[:3]}"
    assert rep.counts.get("acquire_deferred", 0) > 2000 and rep.checked_bytes > 0


def test_stress_slice_on_the_cuda_backend_with_the_fake_driver(fake_cuda):
    """The same operations on the CUDA backend (``cuda:0``) with the fake CUDA driver: callers on
    the legacy default stream 0, slots read on the host once that stream's work is done (as
    ``.cpu()`` of a CUDA view would)."""

    def read_slot(cache, slot: int, nbytes: int) -> torch.Tensor:
        fake_cuda.call("fakecu_synchronize_default", 0)
        raw = ctypes.string_at(cache._c.slot_address(slot), nbytes)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    rep = stress.run_stress(
        12_000, device="cuda:0", threads=4, seed=31, policy="lfu", stream=0, read_slot=read_slot
    )
    assert rep.ok, f"seed 31 (fake CUDA driver): {rep.errors[:3]}"
    assert rep.counts.get("acquire_deferred", 0) > 1000 and rep.checked_bytes > 0
    assert fake_cuda.stats()["ctx_errors"] == 0


@pytest.mark.parametrize("device", ["cpu", "sim"])
def test_stress_slice_with_both_tiers(device, tmp_path):
    """The pool holds 12 of the 64 experts; the rest are read from a file by the copy threads and, ahead
    of their copies, by the pool's reader threads (read-ahead on), while other threads copy, evict and
    check host slabs (copy_out) and device slots at every use."""
    seed = {"cpu": 31, "sim": 32}[device]
    rep = stress.run_stress(
        16_000, device=device, threads=4, seed=seed, policy="lru", host_slabs=12, workdir=tmp_path
    )
    assert rep.ok, (
        f"seed {seed} (python bench/stress.py --device {device} --host-slabs 12 --seed {seed}): {rep.errors[:3]}"
    )
    assert rep.counts.get("copy_out", 0) > 100 and rep.counts.get("acquire", 0) > 2000
    assert rep.counts["pool_reads"] > 1000 and rep.counts["pool_hits"] > 100
    assert rep.counts.get("read_ahead", 0) > 100 and rep.counts["ahead_reads"] > 100
    # waits on a read-ahead in flight depend on timing here (tests/csrc/test_read_ahead.py forces one)
    assert rep.counts["ahead_used"] > 10, rep.counts
