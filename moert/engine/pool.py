"""The expert pool: every expert of every MoE layer in one page-aligned host allocation
(:class:`ExpertPool`, over the native ``moert._C.ExpertPool``), or, tiered (``capacity`` below all
experts), a host cache of ``capacity`` slabs over the checkpoint's files (``moert.api.tier``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moert.engine.devices import backends, native_module
from moert.engine.native_args import (
    count,
    host_view,
    view_bytes,
)

__all__ = ["ExpertPool"]


class ExpertPool:
    """Every expert of every MoE layer in one page-aligned host allocation.

    Entry (layer, expert) is ``slab_bytes`` long at a fixed ``stride`` (``slab_bytes`` rounded up
    to 256). The caller lays out one expert's bytes contiguously (gate_up, then down).

    Args:
        num_layers: MoE layers L.
        num_experts: routed experts per layer E.
        slab_bytes: bytes of one expert; > 0 and a multiple of 16.
        pin: page-lock with ``cuMemHostRegister``. None: pin when a CUDA device can run.
        capacity: host slabs; None or ``num_layers * num_experts``: every expert has its entry. Fewer:
            the pool is tiered, a cache over files given with ``add_file`` / ``set_source``; its
            entries move, so ``view`` and ``layer_view`` return copies and ``fill`` / ``address`` raise.
        policy: the tiered pool's eviction, ``"lru"``, ``"lfu"`` or ``"fifo"``.
        read_mode: how the tiered pool reads files: ``"pread"`` or ``"mmap"``.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        slab_bytes: int,
        *,
        pin: bool | None = None,
        capacity: int | None = None,
        policy: str = "lru",
        read_mode: str = "pread",
    ) -> None:
        if pin is None:
            pin = backends()["cuda"]["can_run"]
        self._c = native_module().ExpertPool(
            count(num_layers, "num_layers"),
            count(num_experts, "num_experts"),
            count(slab_bytes, "slab_bytes"),
            bool(pin),
            -1 if capacity is None else count(capacity, "capacity"),
            str(policy),
            str(read_mode),
        )

    num_layers = property(lambda self: self._c.num_layers)
    num_experts = property(lambda self: self._c.num_experts)
    slab_bytes = property(lambda self: self._c.slab_bytes)
    stride = property(lambda self: self._c.stride)
    nbytes = property(lambda self: self._c.nbytes)
    pinned = property(lambda self: self._c.pinned)
    closed = property(lambda self: self._c.closed)
    tiered = property(lambda self: self._c.tiered)
    capacity = property(lambda self: self._c.capacity)
    policy = property(lambda self: self._c.policy)
    read_mode = property(lambda self: self._c.read_mode)

    def add_file(self, path: str) -> int:
        """Opens a checkpoint file for expert reads (its size, mtime and inode as now); returns its id."""
        return self._c.add_file(str(path))

    def set_source(self, layer: int, expert: int, parts: np.ndarray) -> None:
        """Where entry (layer, expert) is: int64 (n, 4) rows ``(file id, file offset, length, slab offset)``."""
        self._c.set_source(int(layer), int(expert), np.ascontiguousarray(parts, dtype=np.int64))

    def load(self, layer: int, expert: int) -> int:
        """Reads the entry from its files (tiered: into a host slab, unless resident); bytes read."""
        return self._c.load(int(layer), int(expert))

    def acquire_host(self, layer: int, expert: int, demand: bool = True) -> int:
        """Address of the entry's host slab, read first when not resident and pinned (never evicted)
        until ``release_host``: what the copy engine does around each copy."""
        return self._c.acquire_host(int(layer), int(expert), bool(demand))

    def release_host(self, layer: int, expert: int) -> None:
        self._c.release_host(int(layer), int(expert))

    def read_ahead(self, layer: int, experts: Sequence[int]) -> int:
        """Tiered: queues background reads (the pool's reader threads, in C++) of the experts that
        are neither resident, being read nor queued, and returns how many were queued (0 untiered).
        A later ``acquire_host`` / ``load`` of one waits on its read in flight."""
        return self._c.read_ahead(int(layer), np.asarray(list(experts), dtype=np.int64))

    @property
    def readers(self) -> int:
        """Reader threads for ``read_ahead`` (1..16; settable before the first ``read_ahead``)."""
        return self._c.readers

    @readers.setter
    def readers(self, n: int) -> None:
        self._c.readers = count(n, "readers")

    def copy_out(self, layer: int, expert: int) -> torch.Tensor:
        """A fresh uint8 ``(slab_bytes,)`` copy of the entry (tiered: read from its file when not resident)."""
        out = torch.empty(self.slab_bytes, dtype=torch.uint8)
        self._c.copy_out(int(layer), int(expert), out.data_ptr())
        return out

    def resident(self, layer: int) -> set[int]:
        """Experts of ``layer`` held in host memory now (all of them untiered)."""
        return {int(e) for e in np.flatnonzero(self._c.resident(int(layer)))}

    def tier_stats(self) -> tuple[dict, dict]:
        """``(totals, per_layer)`` of the host tier: hits, reads (SSD reads), read_bytes, read_s,
        demand_reads, demand_read_s, evictions, waits, and read-ahead's ahead_reads (part of reads),
        ahead_used, ahead_wasted, ahead_dropped, ahead_waits, ahead_wait_s; per_layer maps each to
        an (L,) array."""
        return self._c.stats()

    def reset_stats(self) -> None:
        self._c.reset_stats()

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
        """A CPU tensor ``dtype[shape]`` aliasing the entry's bytes from ``offset`` (tiered: a copy)."""
        if self.tiered:
            nbytes = view_bytes(dtype, tuple(shape), int(offset), self.slab_bytes, "ExpertPool.view")
            raw = self.copy_out(layer, expert)[int(offset) : int(offset) + nbytes]
            return raw.view(dtype).reshape(tuple(shape))
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
        if self.tiered:  # entries move: a copy of the layer (one layer's experts in memory)
            return torch.stack([self.view(layer, e, dtype, shape, offset) for e in range(self.num_experts)])
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
            f"stride={self.stride}, nbytes={self.nbytes}, pinned={self.pinned}"
            + (f", tiered: {self.capacity} slabs, {self.policy}, {self.read_mode})" if self.tiered else ")")
        )
