"""Test-only native fault injection: make the n-th expert copy fail or run slower, a copy lane's
thread die, or the n-th pool / slot-arena allocation fail (csrc/include/moert/faults.h).

One plan for the whole process; counts start when it is armed. Off (the default) each native hook
costs one atomic load. Use it in tests only::

    with inject(FaultPlan(fail_copy=3)):       # the third copy from here fails
        ...                                     # RuntimeError naming layer, expert, slot
    counts()                                    # what the plan saw and did

What each fault does, and what the engine guarantees (the error reaches the caller with context;
the failed entry is not loaded and its slot is freed; the next access copies it again; a dead lane
makes every later call but ``release``/``close`` raise): ``moert/engine/runtime.py``'s ``CopyEngine``
and csrc/include/moert/copy_engine.h ("Failures").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from moert.engine.devices import native_module

__all__ = ["FaultPlan", "arm", "armed", "counts", "disarm", "inject"]


@dataclass(frozen=True)
class FaultPlan:
    """What to break, counting from when the plan is armed (0 = nothing).

    Attributes:
        fail_copy: the n-th expert copy fails (1 = the next one): at issue on the CPU twin, on its
            stream in the device model (its ready event reports it, as CUDA reports an asynchronous
            failure).
        fail_count: ... and so many copies from there (-1: every later copy).
        slow: every copy takes this many times as long (>= 1): modelled time in the device model, an
            added sleep of (slow - 1) x the memcpy on the CPU twin; outputs never change.
        kill_lane: the thread of the copy lane that takes the n-th copy request dies holding it.
        fail_alloc: the n-th allocation (an ``ExpertPool``'s host memory, a ``SlabCache``'s slots) fails.
        alloc_count: ... and so many from there (-1: every later one).
        read_delay_s: every read of an expert from its files (a tiered pool) sleeps this long
            first: a slow disk, so reads and read-aheads stay in flight long enough to be waited on.
    """

    fail_copy: int = 0
    fail_count: int = 1
    slow: float = 1.0
    kill_lane: int = 0
    fail_alloc: int = 0
    alloc_count: int = 1
    read_delay_s: float = 0.0


def arm(plan: FaultPlan) -> None:
    """Arms ``plan`` and zeroes the counts (ValueError naming a bad field)."""
    native_module().faults_arm(**asdict(plan))


def disarm() -> None:
    """Back to no faults."""
    native_module().faults_disarm()


def armed() -> bool:
    return bool(native_module().faults_armed())


def counts() -> dict[str, float]:
    """Since arming: copies, failed_copies, slowed_copies, slow_s (CPU twin's added sleep),
    lane_requests, killed_lanes, allocations, failed_allocations, delayed_reads."""
    return native_module().faults_counts()


@contextmanager
def inject(plan: FaultPlan) -> Iterator[FaultPlan]:
    """Arms ``plan`` for the ``with`` block, disarming on the way out (also on an exception)."""
    arm(plan)
    try:
        yield plan
    finally:
        disarm()
