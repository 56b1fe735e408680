"""The reference and baseline expert stores (offload backends ``"reference"`` and ``"naive"``).

``ReferenceStore`` is a slab cache as a dict with synchronous copies, the obviously-correct reference
the runtime is tested against; ``NaiveStore`` copies every selected expert on every use (the
Accelerate-style baseline of ``bench/``). ``HostPool`` is a pure-PyTorch twin of the runtime's pool.
Both stores present the ``OffloaderBase`` interface to the layer forward and count everything in
Python, per layer, with the runtime's attribution (an eviction counts in the evicted expert's layer).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from moert.engine.offloader import OffloaderBase

__all__ = ["HostPool", "ReferenceStore", "NaiveStore"]


class HostPool:
    """Pure-PyTorch twin of ``runtime.ExpertPool`` (used by the reference store): one host buffer,
    entry ``(layer, expert)`` at a fixed stride."""

    def __init__(self, num_layers: int, num_experts: int, slab_bytes: int) -> None:
        self.num_layers, self.num_experts, self.slab_bytes = num_layers, num_experts, slab_bytes
        self.stride = slab_bytes
        self.nbytes = num_layers * num_experts * slab_bytes
        self.pinned = False
        self._buf = torch.empty(self.nbytes, dtype=torch.uint8)

    def _base(self, layer: int, expert: int) -> int:
        if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):
            raise ValueError(
                f"entry ({layer}, {expert}) is outside the pool ({self.num_layers} x {self.num_experts})"
            )
        return (layer * self.num_experts + expert) * self.stride

    def fill(self, layer: int, expert: int, src: torch.Tensor, offset: int = 0) -> None:
        raw = src.detach().contiguous().reshape(-1).view(torch.uint8)
        if offset + raw.numel() > self.slab_bytes:
            raise ValueError(
                f"{raw.numel()} bytes at offset {offset} overflow the {self.slab_bytes}-byte slab"
            )
        base = self._base(layer, expert) + offset
        self._buf[base : base + raw.numel()].copy_(raw)

    def view(
        self, layer: int, expert: int, dtype: torch.dtype, shape: Sequence[int], offset: int = 0
    ) -> torch.Tensor:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        base = self._base(layer, expert) + offset
        return self._buf[base : base + n].view(dtype).view(tuple(shape))

    def layer_view(
        self, layer: int, dtype: torch.dtype, shape: Sequence[int], offset: int = 0
    ) -> torch.Tensor:
        """``(E, *shape)``: every expert's ``view`` of ``layer``, stacked (a copy, unlike the runtime's)."""
        return torch.stack([self.view(layer, e, dtype, shape, offset) for e in range(self.num_experts)])

    def close(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)


class _PythonCounted(OffloaderBase):
    """A store that counts everything in Python (``counters``); totals are the sums of the rows."""

    python_counts = (
        *OffloaderBase.python_counts,
        "hits",
        "misses",
        "bytes_copied",
        "evictions",
        "waves",
        "demand_stall_s",
    )

    def _counts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        rows = self.counters.rows()
        totals = {k: sum(rows[k]) for k in ("hits", "misses", "bytes_copied", "evictions", "demand_stall_s")}
        return totals, {}

    def _count_acquire(self, layer: int, misses: int, seconds: float) -> None:
        c = self.counters
        c.waves[layer] += 1
        c.misses[layer] += misses
        c.bytes_copied[layer] += misses * self.pool.slab_bytes
        if misses:
            c.demand_stall_s[layer] += seconds


class ReferenceStore(_PythonCounted):
    """A slab cache as a dict with synchronous copies: the independent reference.

    Args:
        *args, **kwargs: ``OffloaderBase``'s (pool: the host pool).
        policy: ``"lru"`` (evict the least recently used unpinned slot) or ``"lfu"`` (fewest uses
            while resident, then least recently used).
    """

    def __init__(self, *args: Any, policy: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cache_policy = policy
        self._slots = torch.empty(self.num_slots, self.pool.slab_bytes, dtype=torch.uint8, device=self.device)
        self._views = [self.layout.views(self._slot_getter(s)) for s in range(self.num_slots)]
        self._table: dict[tuple[int, int], int] = {}
        self._owner: list[tuple[int, int] | None] = [None] * self.num_slots
        self._last = [0] * self.num_slots
        self._uses = [0] * self.num_slots
        self._pinned: set[int] = set()
        self._clock = 0

    def _slot_getter(self, slot: int) -> Any:
        def get(dtype: torch.dtype, shape: Sequence[int], offset: int) -> torch.Tensor:
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            return self._slots[slot, offset : offset + n].view(dtype).view(tuple(shape))

        return get

    def resident(self, layer: int) -> set[int]:
        return {e for (lay, e) in self._table if lay == layer}

    def _victim(self) -> int:
        free = [s for s in range(self.num_slots) if self._owner[s] is None]
        if free:
            return free[0]
        cands = [s for s in range(self.num_slots) if s not in self._pinned]
        if not cands:
            raise RuntimeError("every slot is pinned; acquire fewer experts than num_slots at once")
        if self.cache_policy == "lfu":
            return min(cands, key=lambda s: (self._uses[s], self._last[s]))
        return min(cands, key=lambda s: self._last[s])

    def acquire(self, layer: int, experts: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if len(experts) > self.num_slots:
            raise ValueError(f"acquire of {len(experts)} experts exceeds the {self.num_slots} slots")
        t0 = time.perf_counter()
        out, misses = [], 0
        for e in experts:
            self._clock += 1
            slot = self._table.get((layer, e))
            if slot is None:
                misses += 1
                slot = self._victim()
                old = self._owner[slot]
                if old is not None:
                    del self._table[old]
                    self.counters.evictions[old[0]] += 1
                src = self.pool.view(layer, e, torch.uint8, (self.pool.slab_bytes,))
                self._slots[slot].copy_(src)
                self._table[(layer, e)] = slot
                self._owner[slot] = (layer, e)
                self._uses[slot] = 0
            else:
                self.counters.hits[layer] += 1
            self._uses[slot] += 1
            self._last[slot] = self._clock
            self._pinned.add(slot)
            out.append(self._views[slot])
        self._count_acquire(layer, misses, time.perf_counter() - t0)
        return out

    def release(self, layer: int, experts: Sequence[int]) -> None:
        for e in experts:
            slot = self._table.get((layer, e))
            if slot is not None:
                self._pinned.discard(slot)

    def close(self, keep_pool: bool = False) -> None:
        self._slots = torch.empty(0, dtype=torch.uint8)
        self._views = []
        super().close(keep_pool)


class NaiveStore(_PythonCounted):
    """No cache: every acquire copies each expert from the host pool into a fresh device buffer.

    ``num_slots`` only bounds how many experts one wave holds.
    """

    def resident(self, layer: int) -> set[int]:
        return set()

    def acquire(self, layer: int, experts: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        t0 = time.perf_counter()
        out = []
        for e in experts:
            src = self.pool.view(layer, e, torch.uint8, (self.pool.slab_bytes,))
            buf = src.to(self.device, non_blocking=False, copy=True)

            def get(
                dtype: torch.dtype, shape: Sequence[int], offset: int, buf: torch.Tensor = buf
            ) -> torch.Tensor:
                n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
                return buf[offset : offset + n].view(dtype).view(tuple(shape))

            out.append(self.layout.views(get))
        self._count_acquire(layer, len(experts), time.perf_counter() - t0)
        return out

    def release(self, layer: int, experts: Sequence[int]) -> None:
        return None
