"""Python face of the native runtime (``moert._C``): expert pool, slab cache, copy engine.

The extension never links libtorch: tensors cross as addresses, byte counts and stream handles.
This module turns torch tensors, numpy arrays and Python ints into those, and wraps slab memory
back into ``torch.Tensor`` views that keep their owner alive, so a view never dangles (the
conversions live in ``moert.engine.native_args``). The slab cache and the copy engine are here; the
expert pool is in ``moert.engine.pool`` and the devices (``backends``, ``parse_device``,
``tensor_device``, the ``"sim"`` device model) in ``moert.engine.devices``, re-exported here.

Devices: ``"cpu"`` (the CPU twin), ``"sim"`` (the asynchronous device model: the CUDA protocol on
the host with modelled copy times; slots are host memory, stream handle 0 is the calling thread,
``SlabCache.sim_device()`` gives its streams, events and modelled kernels), ``"cuda"`` (torch's
current device) or ``"cuda:N"``.

Importing it touches no CUDA: the CUDA runtime is first asked for devices by ``backends()`` or
when a pool/cache needs it.

Example::

    pool = ExpertPool(num_layers=2, num_experts=8, slab_bytes=4096)
    pool.fill(0, 3, torch.randn(1024))                      # (1024,) fp32 = 4096 bytes
    cache = SlabCache(pool, num_slots=4, policy="lru", min_slots=2)
    engine = CopyEngine(cache, num_streams=2)
    slots = engine.acquire(0, [3, 5])                       # [slot of 3, slot of 5], pinned
    w = cache.slot_view(slots[0], torch.float32, (1024,))   # aliases slot memory
    engine.release(0, [3, 5])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from moert.engine.devices import (
    DEVICES,
    SimDevice,
    SimTiming,
    backends,
    native_module,
    parse_device,
    tensor_device,
)
from moert.engine.native_args import (
    CudaArray,
    Experts,
    count,
    expert_ids,
    host_view,
    int32_array,
    int64_list,
    view_bytes,
)
from moert.engine.pool import ExpertPool

__all__ = [
    "POLICIES",
    "DEVICES",
    "backends",
    "parse_device",
    "tensor_device",
    "SimTiming",
    "SimDevice",
    "ExpertPool",
    "SlabCache",
    "CopyEngine",
]

POLICIES = ("lru", "lfu", "priority")


class SlabCache:
    """S fixed-size slots on a device, the table (layer, expert) -> slot and the eviction policy.

    Args:
        pool: the ExpertPool whose entries the slots hold.
        num_slots: S; at least ``min_slots`` and at most layers * experts.
        policy: ``"lru"``, ``"lfu"`` or ``"priority"`` (scores from ``set_priority``; lowest
            evicted first; ties go to the least recently used).
        device: ``"cpu"`` (the CPU twin: slots in host memory), ``"sim"`` (the device model: slots
            in host memory, copies asynchronous and timed), ``"cuda"`` (torch's current device) or
            ``"cuda:N"``.
        min_slots: one layer's top-k; fewer slots raise ValueError.
        sim: the device model's timing (``device="sim"``); None: ``SimTiming.from_env()``.
    """

    def __init__(
        self,
        pool: ExpertPool,
        num_slots: int,
        *,
        policy: str = "lru",
        device: str = "cpu",
        min_slots: int = 1,
        sim: SimTiming | None = None,
    ) -> None:
        if not isinstance(pool, ExpertPool):
            raise ValueError(f"SlabCache needs an ExpertPool, got {type(pool).__name__}")
        kind, index = parse_device(device)
        native = f"cuda:{index}" if kind == "cuda" else kind
        timing = asdict(sim if sim is not None else SimTiming.from_env()) if kind == "sim" else {}
        self._pool = pool
        self._c = native_module().SlabCache(
            pool._c,
            count(num_slots, "num_slots"),
            str(policy),
            native,
            count(min_slots, "min_slots"),
            **{f"sim_{k}": v for k, v in timing.items()},
        )

    @classmethod
    def simulated(
        cls,
        num_layers: int,
        num_experts: int,
        num_slots: int,
        *,
        policy: str = "lru",
        slab_bytes: int = 1,
        min_slots: int = 1,
    ) -> SlabCache:
        """The same bookkeeping and eviction code with no memory: loads complete instantly."""
        self = cls.__new__(cls)
        self._pool = None
        self._c = native_module().SlabCache.simulated(
            count(num_layers, "num_layers"),
            count(num_experts, "num_experts"),
            count(num_slots, "num_slots"),
            str(policy),
            count(slab_bytes, "slab_bytes"),
            count(min_slots, "min_slots"),
        )
        return self

    num_slots = property(lambda self: self._c.num_slots)
    num_layers = property(lambda self: self._c.num_layers)
    num_experts = property(lambda self: self._c.num_experts)
    slab_bytes = property(lambda self: self._c.slab_bytes)
    policy = property(lambda self: self._c.policy)
    #: "cpu", "sim" or "cuda" (the simulated cache, which has no memory, also says "sim")
    device = property(lambda self: self._c.device.partition(":")[0])
    device_index = property(lambda self: self._c.device_index)  # -1 for the CPU twin

    @property
    def torch_device(self) -> torch.device:
        """Where slot views live: ``cuda:N`` for a CUDA cache, else the host."""
        if self.device == "cuda":
            return torch.device("cuda", self.device_index)
        return torch.device("cpu")

    def sim_device(self) -> SimDevice:
        """The device model of a ``device="sim"`` cache (ValueError for any other cache)."""
        return SimDevice(self._c.sim_device())

    is_simulated = property(lambda self: self._c.is_simulated)
    closed = property(lambda self: self._c.closed)
    pool = property(lambda self: self._pool)

    def lookup(self, layer: int, expert: int) -> int:
        """Slot of a ready entry, or -1 when it is not resident (or still loading)."""
        return self._c.lookup(int(layer), int(expert))

    def resident(self, layer: int, in_flight: bool = False) -> torch.Tensor:
        """(E,) bool: which experts of ``layer`` are ready in the cache (``in_flight``: or have a
        copy queued or running into their slot, so they need no further load)."""
        return torch.from_numpy(self._c.resident(int(layer), bool(in_flight)))

    def resident_ids(self, layer: int, in_flight: bool = False) -> list[int]:
        """The experts ``resident`` flags, ascending, as Python ints (no torch on the way: the
        layer forward asks once per call)."""
        return np.flatnonzero(self._c.resident(int(layer), bool(in_flight))).tolist()

    def set_priority(
        self, layer: int, experts: Experts, scores: float | Sequence[float] | torch.Tensor
    ) -> None:
        """Policy ``priority``: sets the eviction score of (layer, e) for each expert (lowest goes first)."""
        ids = expert_ids(experts)
        if isinstance(scores, torch.Tensor):
            vals = scores.detach().to("cpu", torch.float32).reshape(-1).numpy()
        else:
            vals = np.asarray(scores, dtype=np.float32).reshape(-1)
        if vals.size == 1 and ids.size != 1:
            vals = np.full(ids.size, vals[0], dtype=np.float32)
        self._c.set_priority(int(layer), ids, np.ascontiguousarray(vals))

    def slot_view(
        self, slot: int, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0
    ) -> torch.Tensor:
        """A tensor ``dtype[shape]`` on the cache's device aliasing slot memory from ``offset``."""
        address = self._c.slot_address(int(slot))
        nbytes = view_bytes(dtype, tuple(shape), int(offset), self.slab_bytes, "SlabCache.slot_view")
        if self.device == "cuda":
            raw = torch.as_tensor(CudaArray(address + int(offset), nbytes, self._c), device=self.torch_device)
            return raw.view(dtype).view(tuple(shape))
        return host_view(address + int(offset), nbytes, self._c, dtype, tuple(shape))

    def stats(self, per_layer: bool = False) -> dict[str, Any]:
        """hits, misses, evictions, prefetches, prefetch_hits, prefetch_late, prefetch_wasted,
        prefetch_wasted_bytes, prefetch_cancelled, prefetch_dropped, loads, demand_loads,
        prefetch_loads, bytes_loaded (== loads * slab_bytes).

        With ``per_layer``, also ``"per_layer"``: ``{counter: (L,) int64 ndarray}`` read under the
        same lock, each counter's rows summing to its total. A count belongs to the layer of the
        entry it is about (an eviction to the evicted entry's layer, a dropped prefetch to the layer
        it was for; csrc/include/moert/slab_cache.h)."""
        return self._c.stats(bool(per_layer))

    def reset_stats(self) -> None:
        """Zeroes the totals and the per-layer rows."""
        self._c.reset_stats()

    def sim_prefetch(self, layer: int, experts: Experts) -> int:
        """Simulated cache: loads the experts not resident, never evicting a pinned slot; returns how many."""
        return self._c.sim_prefetch(int(layer), expert_ids(experts))

    def sim_access(self, layer: int, experts: Experts) -> int:
        """Simulated cache: pins all, demand-loads the misses, unpins; returns the hits."""
        return self._c.sim_access(int(layer), expert_ids(experts))

    def replay(
        self,
        layers: Any,
        experts: Any,
        *,
        prefetch: Any = None,
        prefetch_layers: Any = None,
        priorities: Any = None,
        after_scores: Any = None,
        after_prefetch: Any = None,
        waves: bool = False,
        track_prefetch: bool = False,
    ) -> dict[str, Any]:
        """Replays N steps in C++ (the GIL released).

        Args:
            layers: (N,) int layer of each step.
            experts: (N, k) int experts accessed at each step; -1 pads.
            prefetch: (N, m) int or None; prefetched before step i's access, -1 pads.
            prefetch_layers: (N,) int or None: the layer step i's prefetch is for (default layers).
            priorities: (N, k) float32 or None: after step i, the priority of those experts.
            after_scores: (N, E) float32 or None: then all E priorities of step i's layer.
            after_prefetch: (N, a) int or None: then prefetched into step i's layer, -1 pads (a
                policy's plan after the call, e.g. ``utility``).
            waves: a step with more distinct experts than slots streams them in waves of at most
                the slots, resident first, each part ascending (``moert.sim.step.access``); False:
                ValueError.
            track_prefetch: also return, for the simulator's link timeline (``moert.sim.timeline``),
                ``prefetch_seq_start`` (int: the first copy's sequence number, see ``prefetch_seq``),
                ``prefetch_queued_per_step`` ((N,) int32 numpy: copies step i's prefetch queued, numbered
                on from it), ``prefetch_after_queued_per_step`` ((N,) int32: then the copies of its
                prefetch after the call) and ``prefetch_used`` ((N, k) int64 numpy: the sequence numbers of the
                prefetched entries step i's access uses for the first time, then -1).

        Returns:
            The stats delta (see ``stats``) plus ``hits_per_step``: (N,) int32 tensor.
        """
        lay = int32_array(layers, "layers", 1)
        exp = int32_array(experts, "experts", 2)
        pre = None if prefetch is None else int32_array(prefetch, "prefetch", 2)
        pre_l = None if prefetch_layers is None else int32_array(prefetch_layers, "prefetch_layers", 1)
        pri, after = (_float32(a) for a in (priorities, after_scores))
        after_ids = None if after_prefetch is None else int32_array(after_prefetch, "after_prefetch", 2)
        out = self._c.replay(lay, exp, pre, pre_l, pri, after, after_ids, bool(waves), bool(track_prefetch))
        out["hits_per_step"] = torch.from_numpy(out["hits_per_step"])
        return out

    def prefetch_seq(self) -> int:
        """Prefetch copies placed so far (never reset): the sequence number of the next one."""
        return int(self._c.prefetch_seq())

    def close(self) -> None:
        """Closes the attached CopyEngine, then the cache; later calls raise RuntimeError."""
        self._c.close()

    def __repr__(self) -> str:
        return (
            f"SlabCache(slots={self.num_slots}, layers={self.num_layers}, experts={self.num_experts}, "
            f"policy={self.policy!r}, device={self.device!r})"
        )


def _float32(a: Any) -> np.ndarray | None:
    """A tensor or array-like as a contiguous float32 array (None stays None)."""
    if a is None:
        return None
    host = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a
    return np.ascontiguousarray(np.asarray(host, dtype=np.float32))


class CopyEngine:
    """Moves experts from the pool into cache slots on ``num_streams`` lanes.

    Demand loads (``acquire``) go before prefetches; a copy into a slot waits for the slot's last
    use. Duplicate experts in one call are collapsed (pinned once); ``release`` takes the same list.

    Args:
        cache: a real (not simulated) SlabCache; one open engine per cache.
        num_streams: lanes (CUDA or device-model streams, each with an issuing and a completion
            thread; worker threads on the CPU twin), 1..16.
        slot_timeout_s: how long ``acquire`` waits while every slot stays pinned before it raises.
    """

    def __init__(self, cache: SlabCache, num_streams: int = 2, *, slot_timeout_s: float = 60.0) -> None:
        if not isinstance(cache, SlabCache):
            raise ValueError(f"CopyEngine needs a SlabCache, got {type(cache).__name__}")
        self._cache = cache
        self._c = native_module().CopyEngine(
            cache._c, count(num_streams, "num_streams"), float(slot_timeout_s)
        )

    num_streams = property(lambda self: self._c.num_streams)
    closed = property(lambda self: self._c.closed)
    cache = property(lambda self: self._cache)

    @property
    def read_ahead(self) -> int:
        """A tiered pool's read-ahead (0: off; ``csrc/include/moert/copy_engine.h``, "Read-ahead"):
        experts queued for a copy, and those of a prediction's first ``k + 1`` rows not on the
        device, are read into the pool at once by its reader threads."""
        return self._c.read_ahead

    @read_ahead.setter
    def read_ahead(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"read_ahead={k!r} must be an int in 0..64")
        self._c.read_ahead = k

    def _stream(self, stream: int | None) -> int:
        if stream is not None:
            value = int(stream)
            if value < 0:
                raise ValueError(f"stream handle must be >= 0, got {value}")
            return value
        if self._cache.device == "cuda":
            return torch.cuda.current_stream(self._cache.torch_device).cuda_stream
        return 0  # the CPU twin's and the device model's host stream

    def prefetch(self, layer: int, experts: Experts) -> int:
        """Queues low-priority copies for the experts not resident; returns how many were queued."""
        return self._c.prefetch(int(layer), expert_ids(experts))

    def acquire(self, layer: int, experts: Experts, stream: int | None = None) -> list[int]:
        """Pins every expert and returns its slot (one per input position).

        CPU twin, and the device model's stream 0 (the host): returns when all are ready. CUDA and
        the device model's streams: ``stream`` (default: torch's current stream; the device model:
        0) waits on each slot's ready event; the host blocks only until the copies are issued.
        """
        return self._c.acquire(int(layer), expert_ids(experts), self._stream(stream))

    def acquire_deferred(
        self, layer: int, experts: Experts, stream: int | None = None
    ) -> tuple[list[int], list[bool]]:
        """Pins every expert and queues its copy, waiting for none: ``(slots, pending)``, one entry per
        input position, ``pending[i]`` True where the copy was not complete at return. Call
        ``wait_ready`` for a pending expert before reading its slot (experts one at a time, so the
        compute of the first overlaps the copies of the rest); ``release`` as after ``acquire``."""
        slots, pending = self._c.acquire_deferred(int(layer), expert_ids(experts), self._stream(stream))
        return list(slots), list(pending)

    def wait_ready(self, layer: int, experts: Experts, stream: int | None = None) -> None:
        """For experts pinned by ``acquire_deferred``: the CPU twin (and a host stream) blocks until
        their copies are complete; CUDA and the device model's streams block the host until they are
        issued and make ``stream`` wait on them."""
        self._c.wait_ready(int(layer), expert_ids(experts), self._stream(stream))

    def release(self, layer: int, experts: Experts, stream: int | None = None) -> None:
        """Records each slot's last use on ``stream`` and unpins it."""
        self._c.release(int(layer), expert_ids(experts), self._stream(stream))

    def predict(
        self,
        layers: Sequence[int],
        ids: Any,
        scores: Any = None,
        clear: Sequence[int] = (),
        clear_score: float = 0.0,
    ) -> int:
        """Applies one prediction now (see ``predict_async``); returns how many copies were queued.

        Args:
            layers: (n,) cache layers predicted.
            ids: (n, width) int32-convertible expert ids per layer, most likely first, -1 = padding.
            scores: (n, E) float32 priorities replacing each predicted layer's (policy "priority"), or None.
            clear: layers whose E priorities are all set to ``clear_score`` first (the layer that just ran).
            clear_score: finite; ever lower values evict the most recently cleared layer first.
        """
        ids_np = np.ascontiguousarray(torch.as_tensor(ids).cpu().numpy(), dtype=np.int32)
        sc = (
            None
            if scores is None
            else np.ascontiguousarray(torch.as_tensor(scores).cpu().numpy(), np.float32)
        )
        return self._c.predict(int64_list(layers), ids_np, sc, int64_list(clear), float(clear_score))

    def predict_async(
        self,
        layers: Sequence[int],
        ids: torch.Tensor,
        scores: torch.Tensor | None = None,
        clear: Sequence[int] = (),
        clear_score: float = 0.0,
        stream: int | None = None,
    ) -> int:
        """Queues a prediction whose ids (and scores) are still being copied to host memory.

        Records an event on ``stream`` (default: torch's current stream, after the caller's
        ``non_blocking`` device-to-host copy into ``ids``/``scores``); the engine's prediction
        thread waits on it, then clears, sets priorities and prefetches as ``predict`` does. The
        calling thread never blocks. ``ids``/``scores`` must stay alive and unchanged until
        ``predictions_done() >= ticket``.

        Args:
            layers: (n,) cache layers.
            ids: (n, width) int32 host tensor (pinned for a truly asynchronous copy), contiguous.
            scores: (n, E) float32 host tensor or None.
            clear: layers whose priorities are all set to ``clear_score`` first.
            clear_score: as ``predict``.
            stream: CUDA stream handle; the CPU twin's stream 0 means "already written".

        Returns:
            The request's ticket (1, 2, ...).
        """
        n = len(layers)
        if ids.device.type != "cpu" or ids.dtype != torch.int32 or not ids.is_contiguous() or ids.dim() != 2:
            raise ValueError(
                f"ids must be a contiguous 2-D int32 host tensor, got {ids.dtype} {tuple(ids.shape)} on {ids.device}"
            )
        if ids.shape[0] != n:
            raise ValueError(f"ids has {ids.shape[0]} rows for {n} layers")
        sp = 0
        if scores is not None:
            E = self._cache.num_experts
            if (
                scores.device.type != "cpu"
                or scores.dtype != torch.float32
                or not scores.is_contiguous()
                or tuple(scores.shape) != (n, E)
            ):
                raise ValueError(
                    f"scores must be a contiguous ({n}, {E}) float32 host tensor, got {scores.dtype} "
                    f"{tuple(scores.shape)} on {scores.device}"
                )
            sp = scores.data_ptr()
        return self._c.predict_async(
            int64_list(layers),
            ids.data_ptr(),
            int(ids.shape[1]),
            sp,
            int64_list(clear),
            float(clear_score),
            self._stream(stream),
        )

    def predictions_done(self) -> int:
        """The ticket of the last prediction applied (requests apply in order)."""
        return self._c.predictions_done()

    def wait_predictions(self, ticket: int) -> None:
        """Blocks until the prediction ``ticket`` has been applied."""
        self._c.wait_predictions(int(ticket))

    def synchronize(self) -> None:
        """Blocks until no copy is queued or in flight."""
        self._c.synchronize()

    def stats(self, wait_device: bool = False, per_layer: bool = False) -> dict[str, Any]:
        """bytes, copies, demand_copies, prefetch_copies, acquires, releases, stale_requests,
        queued, busy_s, demand_stall_s, device_stall_s, device_stall_waits, predictions,
        prediction_wait_s, lanes.

        ``demand_stall_s`` is host time ``acquire`` and ``wait_ready`` waited for copies (on the CPU
        twin, the whole stall); ``device_stall_s`` is, on CUDA and the device model (modelled time), device time the callers' streams
        waited for copies not complete at ``acquire`` (timing events), counted once the stream has
        passed the wait, over ``device_stall_waits`` acquires. ``wait_device=True`` first waits until
        the newest such wait is passed (it blocks on the device: not for a hot path).

        With ``per_layer`` (one native call, one lock: a consistent snapshot), also ``"per_layer"``:
        ``{"acquires": (L,) int64, "demand_stall_s": (L,) float64}`` by the layer passed to
        ``acquire`` / ``wait_ready``, and ``"cache"``: the cache's ``stats(per_layer=True)``."""
        return self._c.stats(bool(wait_device), bool(per_layer))

    def reset_stats(self) -> None:
        """Zeroes the engine's counters, totals and per layer (not the cache's: ``SlabCache.reset_stats``)."""
        self._c.reset_stats()

    def close(self) -> None:
        """Cancels queued copies, finishes those in flight, joins the lanes; later calls raise."""
        self._c.close()

    def __enter__(self) -> CopyEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
