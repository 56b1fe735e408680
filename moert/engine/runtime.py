"""Python face of the native runtime (``moert._C``): expert pool, slab cache, copy engine.

The extension never links libtorch: tensors cross as addresses, byte counts and stream handles.
This module turns torch tensors, numpy arrays and Python ints into those, and wraps slab memory
back into ``torch.Tensor`` views that keep their owner alive, so a view never dangles (the
conversions live in ``moert.engine.native_args``).

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
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

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

try:
    from moert import _C
except ImportError as _err:  # the extension is built by `make build`; fail at use, not import
    _C = None
    _IMPORT_ERROR: ImportError | None = _err
else:
    _IMPORT_ERROR = None

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
#: device kinds; "cuda" also as "cuda:N"
DEVICES = ("cpu", "sim", "cuda")


def _native() -> Any:
    if _C is None:
        raise RuntimeError(
            f"moert._C is not built ({_IMPORT_ERROR}); run `make build` "
            "(or `pip install --no-build-isolation -e .`)"
        )
    return _C


def backends() -> dict[str, dict[str, Any]]:
    """Which backends were compiled and which can run here.

    Returns:
        ``{"cpu": {"compiled", "can_run", "reason"}, "cuda": {"compiled", "can_run", "reason",
        "device_count", "device_name"}}``; ``reason`` says why a backend cannot run
        (e.g. ``"no CUDA device: cudaGetDeviceCount failed with error 35 ..."``).
    """
    c = _native()
    compiled = bool(c.cuda_compiled())
    probe = c.cuda_probe()
    can_run = compiled and probe["device_count"] > 0
    return {
        "cpu": {"compiled": True, "can_run": True, "reason": ""},
        "sim": {"compiled": True, "can_run": True, "reason": ""},
        "cuda": {
            "compiled": compiled,
            "can_run": can_run,
            "reason": "" if can_run else probe["message"],
            "device_count": int(probe["device_count"]),
            "device_name": probe["message"] if can_run else "",
        },
    }


def parse_device(device: str | torch.device) -> tuple[str, int]:
    """``(kind, index)`` of a cache device: ``"cpu"`` -> ("cpu", -1), ``"sim"`` -> ("sim", 0),
    ``"cuda:N"`` -> ("cuda", N), ``"cuda"`` -> ("cuda", torch's current device; 0 when CUDA cannot
    run, so that the native layer reports why).

    Raises:
        ValueError: any other name.
    """
    text = str(device)
    kind, _, index = text.partition(":")
    if kind in ("cpu", "sim") and not index:
        return kind, -1 if kind == "cpu" else 0
    if kind == "cuda" and (not index or index.isdigit()):
        if index:
            return "cuda", int(index)
        return "cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0
    raise ValueError(f"unknown device {device!r}; use one of cpu, sim, cuda, cuda:N")


def tensor_device(device: str) -> torch.device:
    """Where the tensors computed with a cache on ``device`` live: ``cuda:N`` for CUDA, else the
    host (``"sim"`` models the device's protocol, while torch computes on the calling thread: the
    model's stream handle 0)."""
    kind, index = parse_device(device)
    return torch.device("cuda", index) if kind == "cuda" else torch.device("cpu")


@dataclass(frozen=True)
class SimTiming:
    """The device model's timing (``device="sim"``; csrc/include/moert/backend_sim.h).

    Attributes:
        bandwidth_gbs: each copy stream's bandwidth, 1e9 bytes/s.
        latency_us: latency of each copy.
        jitter_us: each operation on a stream starts up to this much later (uniform, seeded):
            randomises the interleavings of streams.
        seed: seed of the jitter (each stream draws from its own generator).
    """

    bandwidth_gbs: float = 25.0
    latency_us: float = 10.0
    jitter_us: float = 0.0
    seed: int = 0

    @classmethod
    def from_env(cls) -> SimTiming:
        """``MOERT_SIM_BANDWIDTH_GBS``, ``MOERT_SIM_LATENCY_US``, ``MOERT_SIM_JITTER_US``, ``MOERT_SIM_SEED``."""
        from moert import envs

        return cls(**envs.sim_timing())

    def copy_seconds(self, nbytes: int) -> float:
        """Modelled time of one copy of ``nbytes`` (without jitter)."""
        return self.latency_us * 1e-6 + nbytes / (self.bandwidth_gbs * 1e9)


class SimDevice:
    """The device model behind a ``device="sim"`` cache: its streams, events, clock and modelled
    kernels, to drive the CUDA protocol from tests and benchmarks (``SlabCache.sim_device()``).

    Stream handles are ints; 0 is the calling thread (records complete at once, waits block).
    Times are modelled device seconds (``now()``). Holds the cache alive.
    """

    def __init__(self, native: Any) -> None:
        self._c = native

    @property
    def timing(self) -> SimTiming:
        return SimTiming(**self._c.config)

    def now(self) -> float:
        """The device clock, seconds since the device was made."""
        return self._c.now()

    def copy_seconds(self, nbytes: int) -> float:
        """Modelled time of one copy of ``nbytes`` (without jitter)."""
        return self._c.copy_seconds(int(nbytes))

    def create_stream(self) -> int:
        """A new stream (its own FIFO and thread); e.g. the modelled compute stream."""
        return self._c.create_stream()

    def destroy_stream(self, stream: int) -> None:
        """Runs what is queued on ``stream``, then ends it."""
        self._c.destroy_stream(int(stream))

    def synchronize(self, stream: int | None = None) -> None:
        """Blocks until ``stream`` (None: every stream) has run everything queued on it."""
        self._c.synchronize(None if stream is None else int(stream))

    def event(self, timing: bool = False) -> Any:
        """A new event: ``record(stream)``, ``wait(stream)``, ``query()``, ``synchronize()``,
        ``seconds_since(start)`` (timing events only: modelled seconds between two records)."""
        return self._c.create_event(bool(timing))

    def enqueue_read(self, stream: int, address: int, nbytes: int, seconds: float = 0.0) -> int:
        """A modelled kernel on ``stream`` that reads ``nbytes`` of slot memory at ``address`` for
        ``seconds``, checksumming them when it starts and when it ends; returns a ticket for
        ``read_result``. ValueError when the range is not inside the cache's slots."""
        return self._c.enqueue_read(int(stream), int(address), int(nbytes), float(seconds))

    def read_result(self, ticket: int) -> dict[str, Any]:
        """``done``, ``start_s``, ``end_s`` (device time), ``checksum_start``, ``checksum_end``."""
        return self._c.read_result(int(ticket))

    def enqueue_sleep(self, stream: int, seconds: float) -> None:
        """A modelled kernel that only holds ``stream`` for ``seconds``."""
        self._c.enqueue_sleep(int(stream), float(seconds))

    def enqueue_copy(self, stream: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        """A modelled copy (e.g. device-to-host of predicted ids) of ``src``'s bytes into ``dst``,
        taking the modelled copy time; both contiguous host tensors of the same size that stay
        alive until the stream has run it."""
        for name, t in (("dst", dst), ("src", src)):
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"enqueue_copy: {name} must be a contiguous host tensor, got {t.device}")
        nbytes = dst.numel() * dst.element_size()
        if src.numel() * src.element_size() != nbytes:
            raise ValueError(f"enqueue_copy: dst has {nbytes} bytes, src {src.numel() * src.element_size()}")
        self._c.enqueue_copy(int(stream), dst.data_ptr(), src.data_ptr(), nbytes)

    @staticmethod
    def checksum(data: torch.Tensor) -> int:
        """The checksum ``enqueue_read`` takes, of a contiguous host tensor's bytes."""
        if data.device.type != "cpu" or not data.is_contiguous():
            raise ValueError(f"checksum: need a contiguous host tensor, got {data.device}")
        return _native().SimDevice.checksum(data.data_ptr(), data.numel() * data.element_size())


class ExpertPool:
    """Every expert of every MoE layer in one page-aligned host allocation.

    Entry (layer, expert) is ``slab_bytes`` long at a fixed ``stride`` (``slab_bytes`` rounded up
    to 256). The caller lays out one expert's bytes contiguously (gate_up, then down).

    Args:
        num_layers: MoE layers L.
        num_experts: routed experts per layer E.
        slab_bytes: bytes of one expert; > 0 and a multiple of 16.
        pin: page-lock with ``cudaHostRegister``. None: pin when a CUDA device can run.
    """

    def __init__(
        self, num_layers: int, num_experts: int, slab_bytes: int, *, pin: bool | None = None
    ) -> None:
        if pin is None:
            pin = backends()["cuda"]["can_run"]
        self._c = _native().ExpertPool(
            count(num_layers, "num_layers"),
            count(num_experts, "num_experts"),
            count(slab_bytes, "slab_bytes"),
            bool(pin),
        )

    num_layers = property(lambda self: self._c.num_layers)
    num_experts = property(lambda self: self._c.num_experts)
    slab_bytes = property(lambda self: self._c.slab_bytes)
    stride = property(lambda self: self._c.stride)
    nbytes = property(lambda self: self._c.nbytes)
    pinned = property(lambda self: self._c.pinned)
    closed = property(lambda self: self._c.closed)

    def address(self, layer: int, expert: int) -> int:
        """Host address of entry (layer, expert)."""
        return self._c.address(int(layer), int(expert))

    def fill(self, layer: int, expert: int, src: torch.Tensor | np.ndarray, offset: int = 0) -> None:
        """Copies the bytes of a contiguous CPU tensor (any dtype/shape) into the entry at ``offset``."""
        if isinstance(src, np.ndarray):
            src = torch.from_numpy(np.ascontiguousarray(src))
        if not isinstance(src, torch.Tensor):
            raise ValueError(f"fill: src must be a torch.Tensor or numpy array, got {type(src).__name__}")
        if src.device.type != "cpu":
            raise ValueError(f"fill: src must be on the CPU, got {src.device}; use .cpu() first")
        if not src.is_contiguous():
            raise ValueError("fill: src must be contiguous; use .contiguous() first")
        nbytes = src.numel() * src.element_size()
        if nbytes == 0:
            self._c.address(int(layer), int(expert))  # still validates the entry
            return
        self._c.fill(int(layer), int(expert), src.data_ptr(), nbytes, int(offset))

    def view(
        self, layer: int, expert: int, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0
    ) -> torch.Tensor:
        """A CPU tensor ``dtype[shape]`` aliasing the entry's bytes from ``offset``."""
        address = self._c.address(int(layer), int(expert))
        nbytes = view_bytes(dtype, tuple(shape), int(offset), self.slab_bytes, "ExpertPool.view")
        return host_view(address + int(offset), nbytes, self._c, dtype, tuple(shape))

    def layer_view(
        self, layer: int, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0
    ) -> torch.Tensor:
        """A CPU tensor ``dtype[E, *shape]`` aliasing every entry of ``layer`` from ``offset``: row
        ``e`` is ``view(layer, e, dtype, shape, offset)`` (experts ``stride`` bytes apart; no copy).

        Raises:
            ValueError: ``stride`` or ``offset`` is not a multiple of the dtype's size, or the shape
                does not fit an entry.
        """
        shape = tuple(int(d) for d in shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= int(layer) < self.num_layers:
            raise ValueError(f"ExpertPool.layer_view: layer={layer} is out of range 0..{self.num_layers - 1}")
        if self.stride % itemsize:
            raise ValueError(
                f"ExpertPool.layer_view: stride {self.stride} is not a multiple of {dtype}'s size"
            )
        nbytes = view_bytes(dtype, shape, int(offset), self.slab_bytes, "ExpertPool.layer_view")
        span = (self.num_experts - 1) * self.stride + nbytes  # first row's start to last row's end
        flat = host_view(
            self._c.address(int(layer), 0) + int(offset), span, self._c, dtype, (span // itemsize,)
        )
        inner = torch.empty(shape, device="meta").stride()  # row-major strides of one expert
        return flat.as_strided((self.num_experts, *shape), (self.stride // itemsize, *inner))

    def close(self) -> None:
        """Later calls raise; memory is returned once no cache or view refers to it."""
        self._c.close()

    def __repr__(self) -> str:
        return (
            f"ExpertPool(layers={self.num_layers}, experts={self.num_experts}, slab_bytes={self.slab_bytes}, "
            f"stride={self.stride}, nbytes={self.nbytes}, pinned={self.pinned})"
        )


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
        self._c = _native().SlabCache(
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
        self._c = _native().SlabCache.simulated(
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
    ) -> dict[str, Any]:
        """Replays N steps in C++ (the GIL released).

        Args:
            layers: (N,) int layer of each step.
            experts: (N, k) int experts accessed at each step; -1 pads.
            prefetch: (N, m) int or None; prefetched before step i's access, -1 pads.
            prefetch_layers: (N,) int or None: the layer step i's prefetch is for (default layers).
            priorities: (N, k) float32 or None: after step i, the priority of those experts.

        Returns:
            The stats delta (see ``stats``) plus ``hits_per_step``: (N,) int32 tensor.
        """
        lay = int32_array(layers, "layers", 1)
        exp = int32_array(experts, "experts", 2)
        pre = None if prefetch is None else int32_array(prefetch, "prefetch", 2)
        pre_l = None if prefetch_layers is None else int32_array(prefetch_layers, "prefetch_layers", 1)
        pri = None
        if priorities is not None:
            pri_t = priorities.detach().cpu().numpy() if isinstance(priorities, torch.Tensor) else priorities
            pri = np.ascontiguousarray(np.asarray(pri_t, dtype=np.float32))
        out = self._c.replay(lay, exp, pre, pre_l, pri)
        out["hits_per_step"] = torch.from_numpy(out["hits_per_step"])
        return out

    def close(self) -> None:
        """Closes the attached CopyEngine, then the cache; later calls raise RuntimeError."""
        self._c.close()

    def __repr__(self) -> str:
        return (
            f"SlabCache(slots={self.num_slots}, layers={self.num_layers}, experts={self.num_experts}, "
            f"policy={self.policy!r}, device={self.device!r})"
        )


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
        self._c = _native().CopyEngine(cache._c, count(num_streams, "num_streams"), float(slot_timeout_s))

    num_streams = property(lambda self: self._c.num_streams)
    closed = property(lambda self: self._c.closed)
    cache = property(lambda self: self._cache)

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
