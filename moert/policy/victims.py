"""What a prefetch would evict, as the eviction part orders and values it (for ``moert.policy.budget``).

The C++ cache evicts the ready, unpinned entry with the lowest key ``(primary, recency tick)``: primary
0 under ``lru``, the priority an eviction policy last pushed under ``priority`` (``learned``, ``fifo``,
``score``), the use count under ``lfu``. :class:`EvictorView` mirrors that key from what the budget
sees: the recency of every use (``on_routed``) and of its own prefetches, and the priorities of every
plan the eviction part returns (:meth:`observe`, called by :class:`~moert.policy.combine.Combination`
before the prefetch part plans at each hook), so the victims it names are the cache's (exact for
``lru`` and for priority policies up to ties among one call's experts; ``lfu``'s counts are not
mirrored: its victims are taken in LRU order, an approximation).

Values, in the budget's unit (the probability of use at the call being prefetched for, ``p``):

- ``lru`` (and ``lfu``): the latest calibrated probability the predictor gave the victim at its layer;
- ``learned`` (:mod:`moert.policy.learned`, the default rank: priority ``log2`` of the forecast hit
  density, the hits the slot earns per call held): a victim is worth its hit density. A candidate of
  probability ``p`` held for the one call it is prefetched for earns ``p`` hits per call held, so
  ``p > density`` is LHD's rule (keep what earns more per slot) with both in one unit;
- ``learned:next`` (priority ``-(t mod W + 2 ** g + l / L)``, the forecast
  position of the next use in tokens): a victim forecast ``r`` tokens after the call being prefetched
  for is worth ``1 / (1 + r)`` (``r <= 0``: 1, never evicted). A candidate of probability ``p`` whose
  uses are taken as independent per call is next used ``(1 - p) / p`` calls later on average, so
  ``p > 1 / (1 + r)`` is exactly "the candidate is expected sooner than the victim": Belady's rule
  with both forecasts in one unit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moert.policy.base import Plan, as_numpy

__all__ = ["EvictorView"]


class EvictorView:
    """The mirror of one run's cache keys (see the module doc).

    Args:
        num_layers: L.
        num_experts: E.
        kind: ``"lru"`` (values: probabilities; also the fallback), ``"density"`` (``learned``: values
            from the hit density in its priorities) or ``"next"`` (``learned:next``: from the forecast
            next use).
        wrap: ``learned``'s clock wrap W (tokens).
    """

    def __init__(self, num_layers: int, num_experts: int, kind: str = "lru", wrap: int = 4096) -> None:
        self.L, self.E, self.kind, self.wrap = num_layers, num_experts, kind, wrap
        self.primary = np.zeros((num_layers, num_experts), dtype=np.float32)  # [L, E] C++ primary key
        self.tick = np.zeros((num_layers, num_experts), dtype=np.int64)  # [L, E] last use / load
        self.clock = 0
        self.calls = np.zeros(num_layers, dtype=np.int64)  # [L] calls of each layer so far
        self.ordered = False  # some primary key is not 0 (then earlier prefetches may be victims)

    @staticmethod
    def kind_of(evict: Any) -> str:
        """The view for an eviction policy object."""
        return evict.rank if getattr(evict, "name", None) == "learned" else "lru"

    def observe(self, plan: Plan | None) -> None:
        """The eviction part's plan of a hook: its clears and priority rows (applied before the prefetch)."""
        if plan is None:
            return
        for layer in plan.clear:
            self.primary[layer] = plan.clear_score
            self.ordered = True
        if plan.scores is not None:
            rows = as_numpy(plan.scores, np.float32)
            for j, layer in enumerate(plan.layers):
                self.primary[layer] = rows[j]
            self.ordered = True

    def touch(self, layer: int, ids: Any) -> None:
        """Uses or loads of ``ids`` at ``layer``, in this order ((n,) ids, or an (E,) bool mask: by id)."""
        ids = np.asarray(ids)
        if ids.dtype == bool:
            ids = np.flatnonzero(ids)
        self.tick[layer, ids] = self.clock + 1 + np.arange(ids.size)
        self.clock += ids.size

    def order(self, flat: np.ndarray, need: int) -> np.ndarray:
        """Positions in ``flat`` (entries ``layer * E + expert``) of the first ``need`` victims.

        The order of a full stable sort by ``(primary, tick)``, but only the entries whose first key is
        at most the ``need``-th smallest are sorted (a partition first: the budget asks for a few)."""
        if need <= 0:
            return np.zeros(0, dtype=np.int64)
        tick = self.tick.ravel()[flat]
        first = self.primary.ravel()[flat] if self.ordered else tick
        if need < flat.size:  # every one of the first ``need`` has a first key <= the need-th smallest
            cand = np.flatnonzero(first <= np.partition(first, need - 1)[need - 1])
        else:
            cand = np.arange(flat.size)
        if self.ordered:
            sub = np.lexsort((tick[cand], first[cand]))
        else:
            sub = np.argsort(tick[cand], kind="stable")
        return cand[sub[:need]]

    def values(self, flat: np.ndarray, probs: np.ndarray, layer: int) -> np.ndarray:
        """(n,) values of the entries ``flat`` for a prefetch into ``layer`` before its next call.

        ``probs``: (L, E) latest calibrated probabilities (the ``lru`` view's values)."""
        if self.kind == "density":
            return np.exp2(self.primary.ravel()[flat].astype(np.float64))
        if self.kind != "next":
            return probs.ravel()[flat]
        now = float(self.calls[layer] % self.wrap) + layer / self.L
        rem = -self.primary.ravel()[flat].astype(np.float64) - now  # tokens to the forecast next use
        rem = np.where(rem < -self.wrap / 2, rem + self.wrap, rem)  # the clock wrapped since
        return 1.0 / (1.0 + np.maximum(rem, 0.0))
