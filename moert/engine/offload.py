"""Execution of offloaded MoE layers: expert stores and the "moert" experts forward.

Each routed expert of MoE layer ``l`` lives in entry ``(l, e)`` of an expert pool as one slab:
``gate_up [2I, H]`` then ``down [H, I]`` (offset aligned to 16 bytes), so one copy moves one expert.
A store hands out device views of experts for one layer at a time:

- ``RuntimeStore``: ``moert.engine.runtime`` (``ExpertPool`` + ``SlabCache`` + ``CopyEngine``), the real thing.
- ``moert.models.tiny.ReferenceStore`` (backend "reference"): a dict and synchronous copies, the
  obviously-correct reference for tests; ``moert.models.tiny.NaiveStore`` (backend "naive"): no cache,
  every selected expert copied on every use (Accelerate-style offload), the benchmark baseline.

``OffloadedLayer.forward`` computes one layer: the union of the selected experts, resident ones
first, acquired in waves (``wave_bounds``); each expert's rows go through ``gate_up -> act * up ->
down`` from the slab views; the products land in a ``(T, k, H)`` buffer at their routing positions and
are reduced over ``k`` in routing order, so the result never depends on which experts were resident or
in which wave they arrived.

A union that fits the cache is one wave: acquire, compute, release (every decode step at batch 1).
A larger union (prefill of a long prompt, a big batch, a small cache) streams through the cache. With
``OffloadState.overlap_waves`` and a store that can prefetch (the runtime store), the waves hold at
most half the slots and wave ``i+1`` is prefetched (low priority, never evicting pinned slots) right
after wave ``i`` is acquired, so its copies run while wave ``i`` computes; the next acquire finds it
resident or still loading (a prefetch hit, late or not). Without overlap (or with the ``reference`` /
``naive`` stores, which have no prefetch path) the waves hold all slots and each waits for its own
copies.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moert.engine.stats import LayerStats, Stats

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ExpertLayout",
    "Counters",
    "RuntimeStore",
    "OffloadState",
    "OffloadedLayer",
    "wave_bounds",
    "moert_experts_forward",
    "make_pool",
    "make_store",
]

_ALIGN = 16


def _round_up(n: int, m: int = _ALIGN) -> int:
    return (n + m - 1) // m * m


@dataclass(frozen=True)
class ExpertLayout:
    """Byte layout of one expert's slab.

    Attributes:
        hidden: H.
        intermediate: I (per-expert intermediate size).
        dtype: weight dtype.
    """

    hidden: int
    intermediate: int
    dtype: torch.dtype

    @property
    def gate_up_shape(self) -> tuple[int, int]:
        return (2 * self.intermediate, self.hidden)

    @property
    def down_shape(self) -> tuple[int, int]:
        return (self.hidden, self.intermediate)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def down_offset(self) -> int:
        return _round_up(2 * self.intermediate * self.hidden * self.itemsize)

    @property
    def expert_bytes(self) -> int:
        """Bytes of weights of one expert (gate_up + down, no padding)."""
        return 3 * self.intermediate * self.hidden * self.itemsize

    @property
    def slab_bytes(self) -> int:
        return _round_up(self.down_offset + self.hidden * self.intermediate * self.itemsize)

    def views(self, get_view: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up (2I, H), down (H, I))`` through ``get_view(dtype, shape, offset)``."""
        return (
            get_view(self.dtype, self.gate_up_shape, 0),
            get_view(self.dtype, self.down_shape, self.down_offset),
        )


def make_pool(backend: str, num_layers: int, num_experts: int, slab_bytes: int, device: str) -> Any:
    """The host pool for ``backend``: ``runtime.ExpertPool`` (page-locked when the cache is on CUDA) or
    ``moert.models.tiny.HostPool``."""
    if backend == "reference":
        from moert.engine.reference import HostPool

        return HostPool(num_layers, num_experts, slab_bytes)
    from moert.engine import runtime

    return runtime.ExpertPool(num_layers, num_experts, slab_bytes, pin=device.startswith("cuda"))


#: counters the runtime reads from ``SlabCache.stats()`` under the same names
_CACHE_COUNTERS = (
    "hits",
    "misses",
    "bytes_loaded",
    "evictions",
    "prefetches",
    "prefetch_hits",
    "prefetch_late",
    "prefetch_wasted",
    "prefetch_wasted_bytes",
)


class Counters:
    """Cumulative store counters: hits, misses, bytes loaded into slots, evictions, and (runtime
    store only) prefetch counters, the engine's measured demand stall (``stall_s``, None when the
    store does not measure it), its copy time (``copy_busy_s``, summed over lanes) and, on CUDA,
    the device time callers' streams waited for copies (``device_stall_s``)."""

    __slots__ = (*_CACHE_COUNTERS, "prefetch_bytes", "stall_s", "copy_busy_s", "device_stall_s")

    def __init__(self) -> None:
        for k in _CACHE_COUNTERS:
            setattr(self, k, 0)
        self.prefetch_bytes = 0
        self.stall_s: float | None = None
        self.copy_busy_s = 0.0
        self.device_stall_s = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


class RuntimeStore:
    """``moert.engine.runtime``: slab cache + copy engine over an ``ExpertPool``.

    Args:
        pool: ``runtime.ExpertPool``.
        layout: expert layout.
        num_slots: device slots.
        policy: eviction policy.
        device: ``"cpu"`` (CPU twin) or ``"cuda"``.
        min_slots: one layer's top-k (the cache refuses fewer).
        copy_streams: copy streams / worker threads.
    """

    def __init__(
        self,
        pool: Any,
        layout: ExpertLayout,
        num_slots: int,
        policy: str,
        device: str,
        min_slots: int,
        copy_streams: int,
    ) -> None:
        from moert.engine import runtime

        self.pool, self.layout, self.num_slots = pool, layout, num_slots
        self.device = device
        self.cache = runtime.SlabCache(pool, num_slots, policy=policy, device=device, min_slots=min_slots)
        self.engine = runtime.CopyEngine(self.cache, num_streams=copy_streams)
        self._views = [
            layout.views(
                lambda dtype, shape, offset, s=s: self.cache.slot_view(s, dtype, tuple(shape), offset)
            )
            for s in range(num_slots)
        ]
        self._base = self._read()

    def _read(self, wait_device: bool = False) -> dict[str, Any]:
        st = self.cache.stats()
        out: dict[str, Any] = {k: int(st.get(k, 0)) for k in _CACHE_COUNTERS}
        out["prefetch_bytes"] = int(st.get("prefetch_loads", 0)) * self.pool.slab_bytes
        eng = self.engine.stats(wait_device=wait_device)
        out["stall_s"] = float(eng["demand_stall_s"])
        out["copy_busy_s"] = float(eng["busy_s"])
        out["device_stall_s"] = float(eng["device_stall_s"])
        return out

    def settle(self) -> None:
        """Waits until the device has passed every timed stream wait, so ``counters`` include
        all device stalls so far (blocks on the device; for reading final stats, not per layer)."""
        self.engine.stats(wait_device=True)

    @property
    def counters(self) -> Counters:
        c = Counters()
        now = self._read()
        for k, v in now.items():
            setattr(c, k, v - self._base[k])
        return c

    def _stream(self) -> int | None:
        if self.device.startswith("cuda"):
            return torch.cuda.current_stream(self.device).cuda_stream
        return None  # the CPU twin's and the device model's host stream

    def resident(self, layer: int) -> set[int]:
        return set(torch.nonzero(self.cache.resident(layer)).flatten().tolist())

    def acquire(self, layer: int, experts: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        slots = self.engine.acquire(layer, list(experts), stream=self._stream())
        return [self._views[s] for s in slots]

    def present(self, layer: int) -> set[int]:
        """Experts of ``layer`` that need no load: ready, or with a copy queued or running."""
        return set(torch.nonzero(self.cache.resident(layer, in_flight=True)).flatten().tolist())

    def acquire_deferred(
        self, layer: int, experts: Sequence[int]
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[bool]]:
        """Pins and queues, waiting for nothing: ``(views, pending)`` (see ``CopyEngine.acquire_deferred``)."""
        slots, pending = self.engine.acquire_deferred(layer, list(experts), stream=self._stream())
        return [self._views[s] for s in slots], pending

    def wait_ready(self, layer: int, experts: Sequence[int]) -> None:
        self.engine.wait_ready(layer, list(experts), stream=self._stream())

    def release(self, layer: int, experts: Sequence[int]) -> None:
        self.engine.release(layer, list(experts), stream=self._stream())

    def prefetch(self, layer: int, experts: Sequence[int]) -> int:
        """Queues low-priority copies of the experts not resident (never evicting a pinned slot);
        returns how many were queued (the rest were resident, loading, or found no free slot)."""
        return self.engine.prefetch(layer, list(experts))

    def close(self) -> None:
        self.engine.synchronize()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)  # no kernel may still read a slot when the cache frees it
        self._views = []
        self.engine.close()
        self.cache.close()


def make_store(
    backend: str,
    pool: Any,
    layout: ExpertLayout,
    num_slots: int,
    policy: str,
    device: str,
    min_slots: int,
    copy_streams: int,
) -> Any:
    """The store for ``backend`` (``"runtime"``, ``"reference"`` or ``"naive"``)."""
    if backend == "reference":
        from moert.engine.reference import ReferenceStore

        return ReferenceStore(pool, layout, num_slots, policy, device)
    if backend == "naive":
        from moert.engine.reference import NaiveStore

        return NaiveStore(pool, layout, num_slots, device)
    return RuntimeStore(pool, layout, num_slots, policy, device, min_slots, copy_streams)


class OffloadState:
    """Everything one patched model shares: pool, store, layout and counters.

    Args:
        pool: host pool holding every routed expert.
        store: the store handing out device views.
        layout: expert layout.
        layer_ids: decoder index of each MoE ordinal (pool layer ``l`` is decoder layer ``layer_ids[l]``).
        num_experts: routed experts per layer.
        device: ``"cpu"`` or ``"cuda"``.
        overlap_waves: a union larger than the cache streams in waves of at most half the slots, the
            next wave prefetched while the current one computes (needs a store with ``prefetch``;
            other stores stream full-cache waves without overlap). Settable later as the attribute.
        deferred_waits: acquire pins and queues without waiting; each expert waits for its own copy
            right before it computes, so compute overlaps the copies still running (runtime store).

    Raises:
        ValueError: ``overlap_waves`` is not a bool.
    """

    def __init__(
        self,
        pool: Any,
        store: Any,
        layout: ExpertLayout,
        layer_ids: Sequence[int],
        num_experts: int,
        device: str,
        overlap_waves: bool = False,
        deferred_waits: bool = False,
    ) -> None:
        self.pool, self.store, self.layout = pool, store, layout
        self.layer_ids = list(layer_ids)
        self.num_experts = num_experts
        self.device = device
        from moert.engine.runtime import tensor_device

        #: where activations must be: the host for "cpu" and "sim", cuda:N for CUDA
        self.tensor_device = tensor_device(device)
        self.overlap_waves = overlap_waves
        if not isinstance(deferred_waits, bool):
            raise ValueError(f"deferred_waits={deferred_waits!r} must be True or False")
        #: acquire without waiting, then wait for each expert right before it computes (runtime store)
        self.deferred_waits = deferred_waits
        #: set by ``moert.engine.prefetch.attach`` when a predictor runs (its ``observe`` scores each layer)
        self.prefetcher: Any = None
        #: ``moert.engine.hetero.CpuExperts`` in heterogeneous mode (set by ``moert.patch``), else None
        self.cpu_experts: Any = None
        #: ``moert.engine.speculative.UtilityTracker`` under policy "utility" (set by ``moert.patch``), else None
        self.utility: Any = None
        self.reset_stats()

    @property
    def overlap_waves(self) -> bool:
        """Whether a union larger than the cache overlaps wave ``i+1``'s copies with wave ``i``'s compute."""
        return self._overlap_waves

    @overlap_waves.setter
    def overlap_waves(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"overlap_waves={value!r} must be True or False")
        self._overlap_waves = value

    @property
    def can_defer(self) -> bool:
        """Whether the store can acquire without waiting (the runtime store)."""
        return callable(getattr(self.store, "acquire_deferred", None))

    @property
    def can_prefetch(self) -> bool:
        """Whether the store has a prefetch path (the runtime store; not ``reference`` or ``naive``)."""
        return callable(getattr(self.store, "prefetch", None))

    def reset_stats(self) -> None:
        self._base = self.store.counters.as_dict()
        self._layer: dict[int, dict[str, Any]] = {
            i: {
                "hits": 0,
                "misses": 0,
                "bytes_copied": 0,
                "calls": 0,
                "waves": 0,
                "wave_prefetches": 0,
                "prefetch_hits": 0,
                "prefetch_late": 0,
                "cpu_experts": 0,
                "demand_stall_s": 0.0,
            }
            for i in self.layer_ids
        }
        self._stall = 0.0
        if self.prefetcher is not None:
            self.prefetcher.reset_stats()

    def stats(self) -> Stats:
        settle = getattr(self.store, "settle", None)
        if settle is not None:
            settle()
        now = self.store.counters.as_dict()
        d = {k: now[k] - self._base[k] for k in now if k != "stall_s"}
        counts = (
            self.prefetcher.recall() if self.prefetcher is not None else [(0, 0, 0)] * len(self.layer_ids)
        )
        per_layer = {
            i: LayerStats(**v, recall=a / n if n else None, coverage=c / n if n else None)
            for (i, v), (a, c, n) in zip(self._layer.items(), counts)
        }
        n_all = sum(n for _, _, n in counts)
        return Stats(
            hits=d["hits"],
            misses=d["misses"],
            bytes_copied=d["bytes_loaded"],
            demand_stall_s=self._stall,
            copy_busy_s=d["copy_busy_s"],
            device_stall_s=d["device_stall_s"],
            evictions=d["evictions"],
            prefetches=d["prefetches"],
            prefetch_hits=d["prefetch_hits"],
            prefetch_late=d["prefetch_late"],
            prefetch_wasted=d["prefetch_wasted"],
            prefetch_wasted_bytes=d["prefetch_wasted_bytes"],
            prefetch_bytes=d["prefetch_bytes"],
            recall=sum(a for a, _, _ in counts) / n_all if n_all else None,
            coverage=sum(c for _, c, _ in counts) / n_all if n_all else None,
            cpu_experts=sum(v["cpu_experts"] for v in self._layer.values()),
            per_layer=per_layer,
        )

    def count_call(self, ordinal: int) -> None:
        """One forward call of MoE layer ``ordinal``."""
        self._layer[self.layer_ids[ordinal]]["calls"] += 1

    def acquire(
        self, ordinal: int, experts: list[int], count_bytes: bool = True, deferred: bool = False
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[bool]]:
        """``store.acquire`` with per-layer hit/miss/byte/wave accounting and demand-stall timing.

        Args:
            ordinal: MoE layer.
            experts: (n,) distinct experts, n <= ``store.num_slots``.
            count_bytes: add the bytes loaded during the call to the layer's ``bytes_copied``; False
                when the caller counts a wider window (overlapped waves or deferred waits: copies
                also run after the call, see ``bytes_loaded``).
            deferred: ``store.acquire_deferred`` (needs ``can_defer``): wait for no copy; the caller
                calls ``wait_ready`` for each pending expert before using it.

        Returns:
            ``(views, pending)``: per expert its ``(gate_up, down)`` slot views, and whether its copy
            may still be running (always False without ``deferred``).
        """
        before = self.store.counters
        t0 = time.perf_counter()
        if deferred:
            views, pending = self.store.acquire_deferred(ordinal, experts)
        else:
            views, pending = self.store.acquire(ordinal, experts), [False] * len(experts)
        dt = time.perf_counter() - t0
        after = self.store.counters
        rec = self._layer[self.layer_ids[ordinal]]
        misses = after.misses - before.misses
        rec["hits"] += after.hits - before.hits
        rec["misses"] += misses
        if count_bytes:
            rec["bytes_copied"] += after.bytes_loaded - before.bytes_loaded
        rec["waves"] += 1
        rec["prefetch_hits"] += after.prefetch_hits - before.prefetch_hits
        rec["prefetch_late"] += after.prefetch_late - before.prefetch_late
        if after.stall_s is not None and before.stall_s is not None:
            # the engine's own measure: acquire waited for copies (demand loads or late prefetches)
            stall = after.stall_s - before.stall_s
        else:
            stall = dt if misses else 0.0
        self._add_stall(ordinal, stall)
        return views, pending

    def wait_ready(self, ordinal: int, expert: int) -> None:
        """``store.wait_ready`` of one expert of a deferred acquire; the host wait counts as stall."""
        t0 = time.perf_counter()
        self.store.wait_ready(ordinal, [expert])
        self._add_stall(ordinal, time.perf_counter() - t0)

    def _add_stall(self, ordinal: int, seconds: float) -> None:
        self._layer[self.layer_ids[ordinal]]["demand_stall_s"] += seconds
        self._stall += seconds

    def prefetch(self, ordinal: int, experts: list[int]) -> int:
        """``store.prefetch`` of a later wave of MoE layer ``ordinal``; counts the copies queued as the
        layer's ``wave_prefetches`` (their bytes are counted by the caller's ``bytes_loaded`` window)."""
        queued = int(self.store.prefetch(ordinal, experts))
        self._layer[self.layer_ids[ordinal]]["wave_prefetches"] += queued
        return queued

    def bytes_loaded(self) -> int:
        """The store's cumulative bytes loaded into slots (demand and prefetch copies issued so far)."""
        return int(self.store.counters.bytes_loaded)

    def count_cpu_experts(self, ordinal: int, n: int) -> None:
        """``n`` experts of MoE layer ``ordinal`` computed on the host (heterogeneous mode)."""
        self._layer[self.layer_ids[ordinal]]["cpu_experts"] += n

    def count_bytes(self, ordinal: int, nbytes: int) -> None:
        """Adds ``nbytes`` to MoE layer ``ordinal``'s ``bytes_copied``."""
        self._layer[self.layer_ids[ordinal]]["bytes_copied"] += nbytes

    def close(self) -> None:
        self.store.close()
        self.pool.close()


class OffloadedLayer:
    """The offloaded experts of one MoE layer (attached to the experts module as ``_moert``).

    Args:
        state: the model's shared offload state.
        ordinal: this layer's index in the pool.
    """

    def __init__(self, state: OffloadState, ordinal: int) -> None:
        self.state = state
        self.ordinal = ordinal

    def forward(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted sum of the selected experts, as the model computes it.

        Args:
            module: the experts module (for ``act_fn`` / ``_apply_gate``).
            hidden_states: (T, H) rows entering the experts.
            top_k_index: (T, k) int selected experts, routing order.
            top_k_weights: (T, k) routing weights (fp32 or the model dtype).

        Returns:
            (T, H) in ``hidden_states.dtype``.
        """
        state = self.state
        if hidden_states.device != state.tensor_device:
            raise RuntimeError(
                f"layer {state.layer_ids[self.ordinal]}: activations are on {hidden_states.device} but the expert "
                f"cache is on {state.device}; the model was moved after moert.patch: undo(), move, patch again"
            )
        num_tokens, hidden = hidden_states.shape
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)  # [T*k]
        if flat.numel() == 0:
            return torch.zeros_like(hidden_states)
        order = torch.argsort(flat, stable=True)  # [T*k] positions grouped by expert
        counts = torch.bincount(flat, minlength=state.num_experts).tolist()  # one host sync per layer
        if len(counts) > state.num_experts:
            raise ValueError(
                f"routing selected expert {len(counts) - 1} but layer {state.layer_ids[self.ordinal]} has "
                f"{state.num_experts} experts"
            )
        starts = [0] * len(counts)
        acc = 0
        for e, c in enumerate(counts):
            starts[e] = acc
            acc += c
        union = [e for e, c in enumerate(counts) if c]
        # Resident experts first: later waves may evict them otherwise. Numerics do not depend on it.
        resident = state.store.resident(self.ordinal)
        union.sort(key=lambda e: (e not in resident, e))
        host: list[int] = []
        if state.cpu_experts is not None and len(union) <= state.store.num_slots:
            # heterogeneous mode (one wave): some misses run on the host from the pool (moert.engine.hetero)
            present = getattr(state.store, "present", state.store.resident)(self.ordinal)
            host = state.cpu_experts.choose(union, present)
            if host:
                union = [e for e in union if e not in set(host)]

        weights = top_k_weights.reshape(-1)  # [T*k]
        out_dtype = torch.promote_types(hidden_states.dtype, weights.dtype)
        buf = torch.zeros(num_tokens * k, hidden, dtype=out_dtype, device=hidden_states.device)  # [T*k, H]
        gate_fn = module._apply_gate if hasattr(module, "_apply_gate") else lambda h: _gate(module, h)
        if host:
            # their rows go to the host now (the router's host sync above made them final), before
            # the device experts are queued, so the host never waits for those
            host_pos = torch.cat(
                [order[starts[e] : starts[e] + counts[e]] for e in host]
            )  # [m] flat positions
            host_rows = state.cpu_experts.rows_to_host(hidden_states, host_pos // k)  # [m, H] on the host
        state.count_call(self.ordinal)
        if state.prefetcher is not None:
            state.prefetcher.observe(self.ordinal, top_k_index)
        self._device_experts(union, order, starts, counts, k, hidden_states, weights, gate_fn, buf)
        if host:
            y = state.cpu_experts.compute(
                self.ordinal, host, host_rows, [counts[e] for e in host], gate_fn, hidden_states.device
            )  # [m, H], the same ops as on a slot
            buf[host_pos] = y * weights[host_pos].unsqueeze(-1)
            state.count_cpu_experts(self.ordinal, len(host))
        if state.utility is not None:
            state.utility.observe(self.ordinal, counts)  # priorities and prefetches for the next call
        # Reduce over k in routing order, as transformers does: [T, k, H] -> [T, H]
        return buf.view(num_tokens, k, hidden).sum(dim=1).to(hidden_states.dtype)

    def _device_experts(
        self,
        union: list[int],
        order: torch.Tensor,
        starts: list[int],
        counts: list[int],
        k: int,
        hidden_states: torch.Tensor,
        weights: torch.Tensor,
        gate_fn: Any,
        buf: torch.Tensor,
    ) -> None:
        """Streams ``union`` through the cache in waves and writes each expert's weighted products
        into ``buf`` at its flat (token, k) positions ``order[starts[e] : starts[e] + counts[e]]``."""
        state = self.state
        overlap = state.overlap_waves and state.can_prefetch
        bounds = wave_bounds(len(union), state.store.num_slots, overlap)
        overlap = overlap and len(bounds) > 1
        deferred = state.deferred_waits and state.can_defer
        # With overlapped waves prefetch copies run between acquires, and with deferred waits demand
        # copies are issued after acquire returns: the layer's bytes are then counted from before its
        # first acquire to after its last expert computed (every copy it waited for was issued by then).
        window = overlap or deferred
        bytes_before = state.bytes_loaded() if window else 0
        for i, (w0, w1) in enumerate(bounds):
            chunk = union[w0:w1]
            views, pending = state.acquire(self.ordinal, chunk, count_bytes=not window, deferred=deferred)
            try:
                if overlap and i + 1 < len(bounds):
                    # after this wave is pinned (a prefetch never evicts it), before it computes
                    state.prefetch(self.ordinal, union[bounds[i + 1][0] : bounds[i + 1][1]])
                for e, (gate_up, down), wait in zip(chunk, views, pending):
                    if wait:  # deferred: this expert's copy may still run; the ones before it computed
                        state.wait_ready(self.ordinal, e)
                    pos = order[starts[e] : starts[e] + counts[e]]  # flat (token, k) positions of expert e
                    x = hidden_states[pos // k].to(gate_up.dtype)  # [n, H]
                    h = torch.nn.functional.linear(x, gate_up)  # [n, 2I]
                    h = gate_fn(h)  # [n, I]
                    y = torch.nn.functional.linear(h, down)  # [n, H]
                    buf[pos] = y * weights[pos].unsqueeze(-1)
            finally:
                state.store.release(self.ordinal, chunk)
        if window:
            state.count_bytes(self.ordinal, state.bytes_loaded() - bytes_before)


def wave_bounds(union: int, num_slots: int, overlap: bool) -> list[tuple[int, int]]:
    """How a layer's union of ``union`` experts streams through a cache of ``num_slots`` slots.

    Args:
        union: distinct experts the layer needs (resident ones first).
        num_slots: cache slots.
        overlap: whether wave ``i+1`` is prefetched while wave ``i`` computes.

    Returns:
        ``[(start, end), ...]`` half-open ranges into the union, in order. A union that fits the cache is
        one wave. Otherwise, without overlap, waves of ``num_slots``; with overlap, waves of
        ``num_slots // 2`` (the pinned current wave plus the prefetched next one fit the cache), the
        last one shorter. Full front waves put the resident experts (at most ``num_slots``; all but
        one when it is odd) in the first two waves, which the first prefetch cannot evict (wave 0 is
        pinned, wave 1 is the prefetch's own); a short last wave shortens the one compute that nothing
        overlaps. With one slot there is nothing to overlap.
    """
    if union <= 0:
        return []
    if num_slots < 1:
        raise ValueError(f"num_slots={num_slots} must be >= 1")
    wave = num_slots
    if overlap and union > num_slots and num_slots >= 2:
        wave = num_slots // 2
    return [(w0, min(w0 + wave, union)) for w0 in range(0, union, wave)]


def _gate(module: nn.Module, gate_up_out: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up_out.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def moert_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The "moert" entry of transformers' ``ExpertsInterface``.

    Args:
        self: the experts module (patched by ``moert.patch``).
        hidden_states: (T, H).
        top_k_index: (T, k).
        top_k_weights: (T, k).
    """
    layer = self.__dict__.get("_moert")
    if layer is None:
        raise RuntimeError(
            f"{type(self).__name__} runs with experts_implementation='moert' but was not patched by moert. "
            "Models that share one config object cannot be patched separately: give each its own config "
            "(copy.deepcopy(config)) or call model.set_experts_implementation('grouped_mm')"
        )
    return layer.forward(self, hidden_states, top_k_index, top_k_weights)
