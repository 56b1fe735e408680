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
        bytes_copied: bytes moved host -> device for this layer (its demand loads, and the copies of
            its wave prefetches).
        calls: forward calls of the layer.
        waves: acquire/compute/release rounds (> calls when a union exceeded the cache).
        wave_prefetches: experts of a later wave prefetched while an earlier wave computed
            (overlapped waves; counted in ``Stats.prefetches``, their first use in ``prefetch_hits``).
        prefetch_hits: first accesses of prefetched experts (counted in ``hits``).
        prefetch_late: ... of which the copy had not finished when the layer needed it.
        cpu_experts: selected experts computed on the host from the pool instead of loaded
            (heterogeneous mode; neither hits nor misses).
        demand_stall_s: seconds the layer's acquires waited for copies (demand loads and late
            prefetches; the runtime engine's measure, host side).
        recall: online recall@k of the predictor at this layer (predicted top-k vs the router's),
            None without a predictor.
        coverage: fraction of the router's selected experts that were in the prefetched set.
    """

    hits: int = 0
    misses: int = 0
    bytes_copied: int = 0
    calls: int = 0
    waves: int = 0
    wave_prefetches: int = 0
    prefetch_hits: int = 0
    prefetch_late: int = 0
    cpu_experts: int = 0
    demand_stall_s: float = 0.0
    recall: float | None = None
    coverage: float | None = None


@dataclass(frozen=True)
class Stats:
    """Offloading counters since patching (or the last ``reset_stats``).

    Attributes:
        hits: expert acquisitions served from the cache.
        misses: acquisitions that had to load the expert (demand loads).
        bytes_copied: bytes copied into the device cache.
        demand_stall_s: seconds acquires waited for copies (runtime: the engine's measure, demand
            loads and late prefetches; reference store: wall time of acquires that had misses).
        copy_busy_s: seconds the copy engine's lanes spent copying (issue to completion, summed over
            lanes; 0 for the reference store). ``exposed_copy`` is the share of it not hidden behind
            compute.
        device_stall_s: CUDA: device seconds the compute stream waited for copies that were not
            complete at acquire (timing events around its waits; 0 on the CPU twin, whose host
            waits are the whole stall).
        evictions: experts evicted from the cache.
        prefetches: prefetch loads queued (predictor and wave prefetches).
        prefetch_hits: first accesses of prefetched experts (counted in ``hits``).
        prefetch_late: prefetch hits whose copy had not finished in time.
        prefetch_wasted: prefetched experts evicted or cancelled before any use.
        prefetch_wasted_bytes: bytes copied for those.
        prefetch_bytes: bytes copied by prefetches (part of ``bytes_copied``).
        recall: the predictor's online recall@k over all layers (None without a predictor).
        coverage: fraction of selected experts that were in the prefetched set.
        cpu_experts: selected experts computed on the host instead of loaded (heterogeneous mode;
            ``hits + misses + cpu_experts`` = the union of selected experts, summed over layer calls).
        per_layer: decoder layer index -> LayerStats.
    """

    hits: int = 0
    misses: int = 0
    bytes_copied: int = 0
    demand_stall_s: float = 0.0
    copy_busy_s: float = 0.0
    device_stall_s: float = 0.0
    evictions: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    prefetch_late: int = 0
    prefetch_wasted: int = 0
    prefetch_wasted_bytes: int = 0
    prefetch_bytes: int = 0
    recall: float | None = None
    coverage: float | None = None
    cpu_experts: int = 0
    per_layer: dict[int, LayerStats] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        """Share of the layer calls' experts served from the cache: ``hits / (hits + misses +
        cpu_experts)`` (a host-computed expert is neither loaded nor a hit)."""
        n = self.hits + self.misses + self.cpu_experts
        return self.hits / n if n else 0.0

    @property
    def exposed_copy(self) -> float | None:
        """Share of copy time not hidden behind compute: ``(demand_stall_s + device_stall_s) /
        copy_busy_s`` (None when nothing was copied by the engine)."""
        if self.copy_busy_s <= 0:
            return None
        return (self.demand_stall_s + self.device_stall_s) / self.copy_busy_s

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready): per_layer keys become strings."""
        d = asdict(self)
        d["per_layer"] = {str(k): v for k, v in d["per_layer"].items()}
        d["hit_rate"] = self.hit_rate
        d["exposed_copy"] = self.exposed_copy
        return d
