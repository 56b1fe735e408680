"""``lru`` and ``lfu``: the C++ cache's own victim orders, used as they are (no hook acts).

``lru`` evicts the least recently used unpinned expert; ``lfu`` the one accessed least often since it
was loaded, ties by recency (csrc/include/moert/slab_cache.h). A prefetched expert counts as used when
it is loaded (``lru``) and has no accesses until its first one (``lfu``).
"""

from __future__ import annotations

from moert.policy.base import Policy, SequencePlan

__all__ = ["Lfu", "Lru"]


class Lru(Policy):
    """Least recently used (the C++ ``lru`` order)."""

    name = "lru"
    cache_policy = "lru"
    fast_path = True
    verify_passes = True

    def sequence_plan(self, seq) -> SequencePlan:
        return SequencePlan()


class Lfu(Lru):
    """Least frequently used since loaded, ties by recency (the C++ ``lfu`` order)."""

    name = "lfu"
    cache_policy = "lfu"
