"""``fifo``: evict the expert that was loaded earliest (first in, first out).

It runs on the C++ ``priority`` order. When the router picks an expert that is not resident, that
expert is about to be loaded, so it gets the next tick of a load clock as its priority: the lowest
priority, the earliest load, goes first. A hit changes nothing (unlike LRU). A call's misses tick in
ascending expert id, the order the runtime loads them. An expert an earlier prefetch brought in does
not tick (it is resident when the router picks it): it keeps the tick of its last load on a miss (0 if
none), so it is among the first to go. Priorities are float32: exact for 2^24 loads."""

from __future__ import annotations

import numpy as np

from moert.policy.base import Plan, Policy

__all__ = ["Fifo"]


class Fifo(Policy):
    """First in, first out (see the module doc)."""

    name = "fifo"
    cache_policy = "priority"
    verify_passes = True

    def bind(self, num_layers: int, num_experts: int, top_k: int) -> None:
        super().bind(num_layers, num_experts, top_k)
        self.loaded = np.zeros((num_layers, num_experts), dtype=np.float32)  # [L, E] load tick
        self.clock = 0

    def on_routed(self, layer: int, counts: np.ndarray, resident: np.ndarray) -> Plan | None:
        misses = np.flatnonzero((np.asarray(counts) > 0) & ~np.asarray(resident, dtype=bool))
        if misses.size == 0:
            return None
        self.loaded[layer, misses] = self.clock + 1 + np.arange(misses.size)
        self.clock += misses.size
        return Plan(layers=(layer,), scores=self.loaded[layer : layer + 1].copy())
