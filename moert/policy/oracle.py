"""``oracle``: before each access, prefetch exactly the experts that access needs.

It reads the routing (``on_routed``'s counts), so it is the ceiling for any prefetcher and runs only
in the simulator (in a model it would be a demand load): every access hits (when the prefetch finds
a slot), no prefetch is wasted, and the bytes moved are the misses the cache would have had, moved
ahead of time. The ids go in ascending order; the fast path prefetches the trace row as it is (the
same set, and a prefetch that fits loads the same experts and evicts the same victims in any order).
"""

from __future__ import annotations

import numpy as np

from moert.policy.base import Plan, Policy, Predictions, SequencePlan

__all__ = ["Oracle"]


class Oracle(Policy):
    """Prefetches the true expert set of the coming access (see the module doc)."""

    name = "oracle"
    roles = ("prefetch",)
    offline = True
    fast_path = True
    verify_passes = True

    def on_routed(self, layer: int, counts: np.ndarray, resident: np.ndarray) -> Plan:
        ids = np.flatnonzero(np.asarray(counts) > 0).astype(np.int32)
        return Plan(layers=(layer,), ids=ids[None])

    def sequence_plan(self, seq) -> SequencePlan:
        return SequencePlan(before=Predictions.from_rows(seq.experts.numpy().astype(np.int32)))  # [L, T, k]
