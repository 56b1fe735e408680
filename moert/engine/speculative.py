"""MoE-SpAc's speculative utility in the runtime: ``moert.patch(model, policy="utility")``.

With speculative decoding (HF assisted generation: ``model.generate(..., assistant_model=draft)``,
which a patched model runs unchanged) each MoE layer of the target sees a verify pass of gamma+1
tokens at once, and the number of those tokens that picked each expert is a frequency-valued
signal of what the next pass will need. Per layer, the utility of expert e is an exponential moving
average of those counts over the layer's calls::

    u[l, e] <- decay * u[l, e] + (1 - decay) * count[l, e]

After each call of layer l its E utilities become the cache's eviction priorities (policy
``priority``: lowest evicted first, ties by recency), and, with ``prefetch="async"``, its top-(k+m)
experts by utility (u > 0) that need a load are prefetched for its next call: that copy runs while
the rest of the pass and the draft model's steps run. Prefetch and eviction use the one utility
(MoE-SpAc's single utility space). Plain autoregressive decoding is the gamma = 0 case (counts 0/1).
``moert simulate --verify-tokens N --policy utility+utility:m`` replays the same rule on traces
(``moert.policy.utility``). Only the runtime backend (the copy engine) supports it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["UtilityTracker"]


class UtilityTracker:
    """Per-layer utility, pushed as eviction priorities and used for prefetching.

    Args:
        store: the runtime store (``cache.set_priority``, ``prefetch``, ``present``).
        num_layers: L offloaded MoE layers.
        num_experts: E.
        width: experts prefetched per layer after each call (k + m); 0 prefetches nothing.
        decay: weight of the past in the moving average, in (0, 1).
    """

    def __init__(self, store: Any, num_layers: int, num_experts: int, width: int, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"utility decay={decay!r} must be in (0, 1)")
        self.store, self.width, self.decay = store, width, decay
        self.utility = np.zeros((num_layers, num_experts), dtype=np.float64)  # [L, E]
        self._all = np.arange(num_experts, dtype=np.int64)

    def observe(self, ordinal: int, counts: list[int]) -> int:
        """After a call of MoE layer ``ordinal`` whose tokens picked expert e ``counts[e]`` times:
        updates its utilities, pushes them as priorities, prefetches its top experts for the next
        call. Returns how many copies were queued."""
        u = self.utility[ordinal]
        u *= self.decay
        u += (1.0 - self.decay) * np.asarray(counts, dtype=np.float64)
        self.store.cache.set_priority(ordinal, self._all, u.astype(np.float32))
        if not self.width:
            return 0
        top = np.argsort(-u, kind="stable")[: self.width]
        top = top[u[top] > 0]
        present = self.store.present(ordinal)
        want = [int(e) for e in top if int(e) not in present]
        return int(self.store.prefetch(ordinal, want)) if want else 0
