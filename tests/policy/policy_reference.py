"""Independent, obviously-correct Python caches for checking the C++ cache and the simulator.

Never edited to match the implementation. The semantics follow the cache's specification
(csrc/include/moert/slab_cache.h): within one access the hits are touched first (in list order),
then each miss is loaded (a free slot first, else the unpinned entry with the smallest key is
evicted) and touched; the experts of the current access are pinned. Keys: lru = last-touch tick;
lfu = (accesses since loaded, tick); priority = (score, tick); fifo = (demand-load number, tick): each
demand load gets the next number, an access's misses in ascending expert id (the runtime's load order),
and an entry a prefetch brought in keeps the number of its last demand load (0 if none). A prefetch
loads the experts not resident, never evicting an entry it loaded in the same call, and does not count
as an access.
"""

from __future__ import annotations


def distinct(ids):
    seen, out = set(), []
    for e in ids:
        e = int(e)
        if e >= 0 and e not in seen:
            seen.add(e)
            out.append(e)
    return out


class ReferenceCache:
    def __init__(self, capacity: int, policy: str) -> None:
        self.capacity, self.policy = capacity, policy
        self.entries: dict[tuple[int, int], dict] = {}  # key -> {"tick", "freq"}
        self.score: dict[tuple[int, int], float] = {}
        self.tick = 0
        self.demand_loads: dict[tuple[int, int], int] = {}  # fifo: number of each key's last demand load
        self.loads = 0

    def _key(self, key):
        entry = self.entries[key]
        if self.policy == "lru":
            return (entry["tick"],)
        if self.policy == "lfu":
            return (entry["freq"], entry["tick"])
        if self.policy == "fifo":
            return (self.demand_loads.get(key, 0), entry["tick"])
        return (self.score.get(key, 0.0), entry["tick"])

    def _make_room(self, protected) -> bool:
        if len(self.entries) < self.capacity:
            return True
        candidates = [key for key in self.entries if key not in protected]
        if not candidates:
            return False
        victim = min(candidates, key=self._key)
        del self.entries[victim]
        return True

    def _touch(self, key, count: bool) -> None:
        self.tick += 1
        self.entries[key]["tick"] = self.tick
        if count:
            self.entries[key]["freq"] += 1

    def prefetch(self, layer: int, experts) -> None:
        # A batch never evicts its own members, resident ones included.
        loaded = {(layer, e) for e in distinct(experts) if (layer, e) in self.entries}
        for e in distinct(experts):
            key = (layer, e)
            if key in self.entries or not self._make_room(loaded):
                continue
            self.entries[key] = {"tick": 0, "freq": 0}
            self._touch(key, count=False)
            loaded.add(key)

    def access(self, layer: int, experts) -> int:
        ids = distinct(experts)
        pinned = {(layer, e) for e in ids}
        hits = [e for e in ids if (layer, e) in self.entries]
        for e in hits:
            self._touch((layer, e), count=True)
        for e in sorted(e for e in ids if (layer, e) not in self.entries):
            self.loads += 1
            self.demand_loads[(layer, e)] = self.loads
        for e in ids:
            key = (layer, e)
            if key in self.entries:
                continue
            assert self._make_room(pinned), "reference: no room for a demand load"
            self.entries[key] = {"tick": 0, "freq": 0}
            self._touch(key, count=True)
        return len(hits)

    def set_priority(self, layer: int, experts, scores) -> None:
        for e, s in zip(experts, scores):
            self.score[(layer, int(e))] = float(s)


def reference_belady_hits(steps, capacity: int) -> int:
    """Textbook Belady on a list of (layer, experts) steps: evict the entry used furthest ahead."""
    cache: set[tuple[int, int]] = set()
    hits = 0
    for i, (layer, experts) in enumerate(steps):
        ids = distinct(experts)
        want = {(layer, e) for e in ids}
        hits += len(want & cache)
        for key in want - cache:
            if len(cache) >= capacity:
                victim = max(cache - want, key=lambda k, i=i: _next_use(steps, i, k))
                cache.remove(victim)
            cache.add(key)
    return hits


def _next_use(steps, i, key) -> int:
    """First step after i that uses key = (layer, expert); len(steps) + 1 when none."""
    for j in range(i + 1, len(steps)):
        if steps[j][0] == key[0] and key[1] in distinct(steps[j][1]):
            return j
    return len(steps) + 1
