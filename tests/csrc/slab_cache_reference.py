"""An independent, obviously-correct model of the slab cache's decisions (never edited to match).

A dict of resident entries and a linear scan for the victim. The rules it encodes, from the
design (csrc/include/moert/slab_cache.h):
  * access(layer, experts): distinct experts in first-occurrence order; every resident one is a hit
    (touched: new tick, one more use), then each miss is loaded, evicting when the cache is full.
    None of this call's experts is ever a victim.
  * victim: the resident entry (not protected) with the lowest (policy score, last tick);
    lru score 0, lfu score = uses since loaded, priority score = the value set for (layer, expert).
  * prefetch(layer, experts): each non-resident expert is loaded (new tick, 0 uses) unless no
    victim exists (then it is dropped); entries loaded by this call are protected during it.
  * a prefetched entry's first access is a prefetch hit; evicting it before any access wastes it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

__all__ = ["RefCache"]


@dataclass
class _Entry:
    tick: int
    uses: int
    prefetched: bool
    accessed: bool


class RefCache:
    def __init__(self, num_layers: int, num_experts: int, num_slots: int, policy: str, slab_bytes: int = 1):
        self.num_layers, self.num_experts, self.num_slots = num_layers, num_experts, num_slots
        self.policy, self.slab_bytes = policy, slab_bytes
        self.entries: dict[tuple[int, int], _Entry] = {}
        self.priority: dict[tuple[int, int], float] = {}
        self.tick = 0
        self.stats: Counter[str] = Counter()

    def _score(self, key: tuple[int, int]) -> float:
        if self.policy == "lfu":
            return self.entries[key].uses
        if self.policy == "priority":
            return self.priority.get(key, 0.0)
        return 0.0

    def _victim(self, protected: set[tuple[int, int]]) -> tuple[int, int] | None:
        candidates = [k for k in self.entries if k not in protected]
        if not candidates:
            return None
        return min(candidates, key=lambda k: (self._score(k), self.entries[k].tick))

    def _evict(self, key: tuple[int, int]) -> None:
        entry = self.entries.pop(key)
        self.stats["evictions"] += 1
        if entry.prefetched and not entry.accessed:
            self.stats["prefetch_wasted"] += 1
            self.stats["prefetch_wasted_bytes"] += self.slab_bytes

    def _load(self, key: tuple[int, int], prefetched: bool) -> None:
        self.tick += 1
        self.entries[key] = _Entry(
            tick=self.tick, uses=0 if prefetched else 1, prefetched=prefetched, accessed=not prefetched
        )
        self.stats["loads"] += 1
        self.stats["bytes_loaded"] += self.slab_bytes
        self.stats["prefetch_loads" if prefetched else "demand_loads"] += 1

    @staticmethod
    def _distinct(experts: list[int]) -> list[int]:
        seen: list[int] = []
        for e in experts:
            if e != -1 and e not in seen:
                seen.append(e)
        return seen

    def access(self, layer: int, experts: list[int]) -> int:
        keys = [(layer, e) for e in self._distinct(experts)]
        hits = [k for k in keys if k in self.entries]
        for k in hits:
            entry = self.entries[k]
            self.stats["hits"] += 1
            if entry.prefetched and not entry.accessed:
                self.stats["prefetch_hits"] += 1
            entry.accessed = True
            self.tick += 1
            entry.tick = self.tick
            entry.uses += 1
        protected = set(keys)
        for k in keys:
            if k in self.entries:
                continue
            self.stats["misses"] += 1
            if len(self.entries) >= self.num_slots:
                victim = self._victim(protected)
                assert victim is not None, "reference: more distinct experts than slots"
                self._evict(victim)
            self._load(k, prefetched=False)
        return len(hits)

    def prefetch(self, layer: int, experts: list[int]) -> int:
        # A batch never evicts its own members, resident ones included.
        protected = {(layer, e) for e in self._distinct(experts) if (layer, e) in self.entries}
        done = 0
        for e in self._distinct(experts):
            k = (layer, e)
            if k in self.entries:
                continue
            if len(self.entries) >= self.num_slots:
                victim = self._victim(protected)
                if victim is None:
                    self.stats["prefetch_dropped"] += 1
                    continue
                self._evict(victim)
            self.stats["prefetches"] += 1
            self._load(k, prefetched=True)
            protected.add(k)
            done += 1
        return done

    def set_priority(self, layer: int, expert: int, score: float) -> None:
        self.priority[(layer, expert)] = score

    def resident(self, layer: int) -> list[bool]:
        return [(layer, e) in self.entries for e in range(self.num_experts)]

    def stats_dict(self, keys: list[str]) -> dict[str, int]:
        return {k: self.stats[k] for k in keys}
