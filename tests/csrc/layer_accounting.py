"""Per-layer counters: a per-layer view of the reference cache and the checks every run must pass.

``LayerRef`` runs ``RefCache`` unchanged and files each count it makes under the layer of the entry it
is about, as csrc/include/moert/slab_cache.h specifies: hits, misses, loads and prefetches under the
accessed entry's layer, an eviction (and a wasted prefetch) under the evicted entry's layer, a dropped
prefetch under the layer it was for.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Any

from slab_cache_reference import RefCache

__all__ = ["LayerRef", "check_layer_rows"]


class _Routed(Counter):
    """A Counter whose every change is also added to the owner's row of the current layer."""

    def __init__(self, owner: LayerRef) -> None:
        super().__init__()
        self.owner = owner

    def __setitem__(self, key: str, value: int) -> None:
        delta = value - self[key]
        super().__setitem__(key, value)
        self.owner.rows[self.owner.layer][key] += delta

    def clear(self) -> None:  # reset_stats: totals and rows
        super().clear()
        for row in self.owner.rows:
            row.clear()


class LayerRef(RefCache):
    def __init__(self, num_layers: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(num_layers, *args, **kwargs)
        self.rows = [Counter() for _ in range(num_layers)]
        self.layer = 0
        self.stats = _Routed(self)

    @contextmanager
    def _at(self, layer: int):
        outer, self.layer = self.layer, layer
        try:
            yield
        finally:
            self.layer = outer

    def access(self, layer: int, experts: list[int]) -> int:
        with self._at(layer):
            return super().access(layer, experts)

    def prefetch(self, layer: int, experts: list[int]) -> int:
        with self._at(layer):
            return super().prefetch(layer, experts)

    def _evict(self, key: tuple[int, int]) -> None:
        with self._at(key[0]):
            super()._evict(key)

    def _load(self, key: tuple[int, int], prefetched: bool) -> None:
        with self._at(key[0]):
            super()._load(key, prefetched)

    def layer_rows(self, keys: list[str]) -> dict[str, list[int]]:
        """``{counter: (L,) values}`` like ``SlabCache.stats(per_layer=True)["per_layer"]``."""
        return {k: [row[k] for row in self.rows] for k in keys}


def check_layer_rows(stats: dict[str, Any], slab: int | None = None, idle: bool = True) -> None:
    """Every counter's per-layer rows sum to its total; with ``idle`` (no copy queued or running),
    each row keeps the global invariants of slab_cache.h. ``stats``: ``SlabCache.stats(per_layer=True)``."""
    rows = stats["per_layer"]
    bad = {k: (int(v.sum()), stats[k]) for k, v in rows.items() if int(v.sum()) != stats[k]}
    assert not bad, f"per-layer rows do not sum to the totals (sum, total): {bad}"
    if not idle:
        return
    for layer in range(len(rows["hits"])):
        r = {k: int(v[layer]) for k, v in rows.items()}
        assert r["loads"] == r["demand_loads"] + r["prefetch_loads"], (layer, r)
        assert r["misses"] == r["demand_loads"], (layer, r)
        assert r["prefetches"] == r["prefetch_loads"] + r["prefetch_cancelled"], (layer, r)
        if slab is not None:
            assert r["bytes_loaded"] == r["loads"] * slab, (layer, r)
