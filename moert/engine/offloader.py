"""The ``Offloader``: everything one patched model shares to run its offloaded experts.

One ``Offloader`` per patched model owns the host pool, the slab cache, the copy engine and the
device views of every slot, and hands the layer forward (``moert.engine.layer``) what it needs::

    views = off.acquire(layer, experts)            # [(gate_up (2I, H), down (H, I))], pinned, ready
    views, pending = off.acquire_deferred(layer, experts)   # pinned, copies may still run
    off.wait(layer, expert)                        # ... until this one's copy is done
    off.release(layer, experts)                    # unpin (the slot's last use is recorded)
    off.prefetch(layer, experts); off.apply(plan)  # low-priority copies, a policy's Plan
    off.resident(layer); off.present(layer)        # sets of expert ids
    off.stats(); off.reset_stats(); off.close()

Counters live where the events happen: the cache and copy engine keep hits, misses, bytes,
prefetches, stalls and acquires per layer natively, and ``stats()`` reads them all in one native
call. Python keeps, with plain integer increments, only what it alone sees (``counters``: calls per
layer, wave prefetches, host-computed experts); nothing on the hot path reads a counter.

``OffloaderBase`` is the interface the layer forward relies on; the reference and naive stores
(``moert.engine.reference``, backends ``"reference"`` / ``"naive"``) implement it too, counting in
Python.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from moert.engine.hetero import DEVICE_ONLY
from moert.engine.layout import ExpertLayout
from moert.engine.runtime import tensor_device
from moert.engine.stats import LayerCounters, Stats, assemble
from moert.policy.base import Plan, Policy

__all__ = ["OffloaderBase", "Offloader"]

Views = tuple[torch.Tensor, torch.Tensor]


class OffloaderBase:
    """What the layer forward needs from an expert store, and the state a patched model shares.

    Args:
        pool: host pool holding every routed expert.
        layout: expert layout.
        num_slots: device slots.
        layer_ids: decoder index of each MoE ordinal (cache layer ``l`` is decoder layer ``layer_ids[l]``).
        num_experts: routed experts per layer.
        device: ``"cpu"`` (the CPU twin), ``"sim"`` (the device model) or ``"cuda:N"``.
        overlap_waves: a union larger than the cache streams in waves of at most half the slots, the
            next wave prefetched while the current one computes (needs ``can_prefetch``; other stores
            stream full-cache waves without overlap). Settable later as the attribute.
        deferred_waits: acquire pins and queues without waiting; each expert waits for its own copy
            right before it computes (a store without copies in flight waits in ``acquire``).

    Raises:
        ValueError: ``overlap_waves`` or ``deferred_waits`` is not a bool.
    """

    #: whether ``prefetch`` and ``apply`` queue copies (the runtime); overlapped waves need it
    can_prefetch = False
    #: per-layer counts kept in Python (LayerStats field names)
    python_counts: tuple[str, ...] = ("calls", "wave_prefetches", "cpu_experts")

    def __init__(
        self,
        pool: Any,
        layout: ExpertLayout,
        num_slots: int,
        layer_ids: Sequence[int],
        num_experts: int,
        device: str,
        overlap_waves: bool = False,
        deferred_waits: bool = False,
    ) -> None:
        self.pool, self.layout, self.num_slots = pool, layout, num_slots
        self.layer_ids = list(layer_ids)
        self.num_experts = num_experts
        self.device = device
        #: where activations must be: the host for "cpu" and "sim", cuda:N for CUDA
        self.tensor_device = tensor_device(device)
        #: the device's copies run asynchronously to the host (CUDA); "sim" models that but is
        #: driven synchronously here, like the CPU twin, so counts stay reproducible
        self.is_cuda = device.startswith("cuda")
        self.overlap_waves = overlap_waves
        if not isinstance(deferred_waits, bool):
            raise ValueError(f"deferred_waits={deferred_waits!r} must be True or False")
        self.deferred_waits = deferred_waits
        #: Python-side per-layer counts (``counters.calls[ordinal] += 1``)
        self.counters = LayerCounters(len(self.layer_ids), self.python_counts)
        #: which experts compute where (``moert.engine.hetero``): DEVICE_ONLY, or a ``CpuExperts``
        self.placement: Any = DEVICE_ONLY
        #: the ``moert.engine.prefetch.PredictionFeed`` when a predictor runs (its ``observe`` scores each layer)
        self.prefetcher: Any = None
        self.set_policy(None)

    def set_policy(self, policy: Policy | None) -> None:
        """The model's bound policy (``moert.policy.runtime_policy``), whose ``on_routed`` and
        ``after_call`` the layer forward calls where they can act (``policy_routed``, ``policy_after``)."""
        self.policy = policy
        if policy is not None:
            policy.set_context(offloader=self)  # residency and the engine's timing (moert.policy.budget)
        self.policy_routed = policy is not None and policy.acts_on("on_routed")
        self.policy_after = policy is not None and policy.acts_on("after_call")

    @property
    def overlap_waves(self) -> bool:
        """Whether a union larger than the cache overlaps wave ``i+1``'s copies with wave ``i``'s compute."""
        return self._overlap_waves

    @overlap_waves.setter
    def overlap_waves(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"overlap_waves={value!r} must be True or False")
        self._overlap_waves = value

    # -- the hot path ---------------------------------------------------------------------------

    def acquire(self, layer: int, experts: Sequence[int]) -> list[Views]:
        """Pins the (distinct, at most ``num_slots``) experts of cache layer ``layer`` and returns each
        one's ``(gate_up (2I, H), down (H, I))`` device views, ready to read."""
        raise NotImplementedError

    def acquire_deferred(self, layer: int, experts: Sequence[int]) -> tuple[list[Views], list[bool]]:
        """Pins and queues, waiting for nothing: ``(views, pending)``; call ``wait`` for a pending
        expert before reading its views. A store whose copies are synchronous waits here."""
        return self.acquire(layer, experts), [False] * len(experts)

    def wait(self, layer: int, expert: int) -> None:
        """Until the copy of one expert of a deferred acquire is complete (nothing to wait for here)."""

    def release(self, layer: int, experts: Sequence[int]) -> None:
        """Unpins what ``acquire`` pinned (the same list)."""
        raise NotImplementedError

    def prefetch(self, layer: int, experts: Sequence[int]) -> int:
        """Queues low-priority copies of the experts not present (never evicting a pinned slot);
        returns how many were queued."""
        raise RuntimeError(f"{type(self).__name__} has no prefetch path; use backend='runtime'")

    def apply(self, plan: Plan) -> int:
        """Applies a ``Plan``: clears, priorities, then prefetches; returns the copies queued."""
        raise RuntimeError(f"{type(self).__name__} has no prefetch path; use backend='runtime'")

    def resident(self, layer: int) -> set[int]:
        """Experts of ``layer`` ready in the cache."""
        raise NotImplementedError

    def present(self, layer: int) -> set[int]:
        """Experts of ``layer`` that need no load: ready, or with a copy queued or running."""
        return self.resident(layer)

    # -- counters -------------------------------------------------------------------------------

    def stats(self) -> Stats:
        """Counters since construction (or ``reset_stats``), read once here."""
        totals, rows = self._counts()
        rows.update(self.counters.rows())
        recall = self.prefetcher.recall() if self.prefetcher is not None else None
        return assemble(self.layer_ids, totals, rows, recall)

    def _counts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(Stats totals, {LayerStats field: (L,) values})`` of the store's own counters."""
        raise NotImplementedError

    def reset_stats(self) -> None:
        self.counters.reset()
        if self.prefetcher is not None:
            self.prefetcher.reset_stats()

    def close(self, keep_pool: bool = False) -> None:
        """Frees the store; the host pool too unless ``keep_pool`` (``PatchHandle.reconfigure``)."""
        if not keep_pool:
            self.pool.close()


class Offloader(OffloaderBase):
    """The runtime: ``runtime.SlabCache`` + ``runtime.CopyEngine`` over a ``runtime.ExpertPool``.

    Args:
        *args, **kwargs: ``OffloaderBase``'s (pool: a ``runtime.ExpertPool``).
        policy: cache eviction policy (``"lru"``, ``"lfu"``, ``"priority"``).
        min_slots: one layer's top-k (the cache refuses fewer).
        copy_streams: copy streams / worker threads.
    """

    can_prefetch = True

    def __init__(self, *args: Any, policy: str, min_slots: int, copy_streams: int, **kwargs: Any) -> None:
        from moert.engine import runtime

        super().__init__(*args, **kwargs)
        self.cache = runtime.SlabCache(
            self.pool, self.num_slots, policy=policy, device=self.device, min_slots=min_slots
        )
        self.engine = runtime.CopyEngine(self.cache, num_streams=copy_streams)
        self._slab_bytes = self.cache.slab_bytes
        self._views = [  # per slot: (gate_up (2I, H), down (H, I)) aliasing slot memory
            self.layout.views(
                lambda dtype, shape, offset, s=s: self.cache.slot_view(s, dtype, tuple(shape), offset)
            )
            for s in range(self.num_slots)
        ]

    def _stream(self) -> int:
        """The caller's stream: torch's current CUDA stream, or 0 (the CPU twin)."""
        # the CPU twin's and the device model's host stream: 0
        return torch.cuda.current_stream(self.tensor_device).cuda_stream if self.is_cuda else 0

    def acquire(self, layer: int, experts: Sequence[int]) -> list[Views]:
        slots = self.engine.acquire(layer, experts, stream=self._stream())
        return [self._views[s] for s in slots]

    def acquire_deferred(self, layer: int, experts: Sequence[int]) -> tuple[list[Views], list[bool]]:
        slots, pending = self.engine.acquire_deferred(layer, experts, stream=self._stream())
        return [self._views[s] for s in slots], pending

    def wait(self, layer: int, expert: int) -> None:
        self.engine.wait_ready(layer, (expert,), stream=self._stream())

    def release(self, layer: int, experts: Sequence[int]) -> None:
        self.engine.release(layer, experts, stream=self._stream())

    def prefetch(self, layer: int, experts: Sequence[int]) -> int:
        return int(self.engine.prefetch(layer, experts))

    def apply(self, plan: Plan) -> int:
        """Applies ``plan`` now (``CopyEngine.predict``). On the CPU twin the copies it queued are
        waited for, as ``PredictionFeed`` does: copies and compute share the cores there, and every
        later eviction decision (made among ready slots) and count stays reproducible."""
        queued = int(self.engine.predict(*plan.predict_args()))
        if queued and not self.is_cuda:
            self.engine.synchronize()
        return queued

    def resident(self, layer: int) -> set[int]:
        return set(self.cache.resident_ids(layer))

    def present(self, layer: int) -> set[int]:
        return set(self.cache.resident_ids(layer, in_flight=True))

    def _counts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        # waits until the device has passed every timed stream wait: all device stalls so far count
        eng = self.engine.stats(wait_device=True, per_layer=True)
        cache, slab = eng["cache"], self._slab_bytes
        totals = {
            **{k: cache[k] for k in _SAME_NAME},
            "bytes_copied": cache["bytes_loaded"],
            "prefetch_bytes": cache["prefetch_loads"] * slab,
            "demand_stall_s": eng["demand_stall_s"],
            "copy_busy_s": eng["busy_s"],
            "device_stall_s": eng["device_stall_s"],
        }
        rows = {
            **{k: cache["per_layer"][k] for k in _SAME_NAME},
            "bytes_copied": cache["per_layer"]["bytes_loaded"],
            "prefetch_bytes": cache["per_layer"]["prefetch_loads"] * slab,
            "waves": eng["per_layer"]["acquires"],
            "demand_stall_s": eng["per_layer"]["demand_stall_s"],
        }
        if getattr(self.pool, "tiered", False):  # the host tier (moert.load's host_budget)
            pool_totals, pool_rows = self.pool.tier_stats()
            for ours, native in _TIER_NAMES:
                totals[ours], rows[ours] = pool_totals[native], pool_rows[native]
        return totals, rows

    def reset_stats(self) -> None:
        super().reset_stats()
        self.engine.reset_stats()
        self.cache.reset_stats()
        if getattr(self.pool, "tiered", False):
            self.pool.reset_stats()

    def close(self, keep_pool: bool = False) -> None:
        # queued copies finish; a dead lane (every call said so) or a copy failure still to report
        # does not keep the engine open
        with contextlib.suppress(RuntimeError):
            self.engine.synchronize()
        if self.is_cuda:
            torch.cuda.synchronize(
                self.tensor_device
            )  # no kernel may still read a slot when the cache frees it
        self._views = []
        self.engine.close()
        self.cache.close()
        super().close(keep_pool)


#: cache counters reported under the same name in Stats and LayerStats
_SAME_NAME = (
    "hits",
    "misses",
    "evictions",
    "prefetches",
    "prefetch_hits",
    "prefetch_late",
    "prefetch_wasted",
    "prefetch_wasted_bytes",
)

#: host-tier counters (Stats / LayerStats name, the native pool's name)
_TIER_NAMES = (
    ("pool_hits", "hits"),
    ("ssd_reads", "reads"),
    ("ssd_bytes", "read_bytes"),
    ("ssd_read_s", "read_s"),
    ("ssd_stall_s", "demand_read_s"),
    ("pool_evictions", "evictions"),
    ("read_ahead_reads", "ahead_reads"),
    ("read_ahead_used", "ahead_used"),
    ("read_ahead_wasted", "ahead_wasted"),
    ("read_ahead_dropped", "ahead_dropped"),
    ("read_ahead_wait_s", "ahead_wait_s"),
)
