"""``Stats``: what offloading cost, overall and per MoE layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Stats", "LayerStats"]


@dataclass(frozen=True)
class LayerStats:
    """Counters of one MoE layer.

    Attributes:
        hits: expert acquisitions served from a resident slot.
        misses: acquisitions that demand-loaded the expert.
        bytes_copied: bytes moved host -> device for this layer.
        calls: forward calls of the layer.
        waves: acquire/compute/release rounds (> calls when a union exceeded the cache).
    """

    hits: int = 0
    misses: int = 0
    bytes_copied: int = 0
    calls: int = 0
    waves: int = 0


@dataclass(frozen=True)
class Stats:
    """Offloading counters since patching (or the last ``reset_stats``).

    Attributes:
        hits: expert acquisitions served from the cache.
        misses: acquisitions that had to load the expert (demand loads).
        bytes_copied: bytes copied into the device cache.
        demand_stall_s: wall seconds spent waiting in acquire calls that had misses.
        evictions: experts evicted from the cache.
        per_layer: decoder layer index -> LayerStats.
    """

    hits: int = 0
    misses: int = 0
    bytes_copied: int = 0
    demand_stall_s: float = 0.0
    evictions: int = 0
    per_layer: dict[int, LayerStats] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready): per_layer keys become strings."""
        d = asdict(self)
        d["per_layer"] = {str(k): v for k, v in d["per_layer"].items()}
        d["hit_rate"] = self.hit_rate
        return d
