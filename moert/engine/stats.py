"""``Stats``: what offloading cost, overall and per MoE layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["Stats", "LayerStats", "LayerCounters", "TierCounters", "assemble"]


@dataclass(frozen=True)
class TierCounters:
    """The host tier's counters (``moert.load(host_budget=...)``; all 0 without one), shared by
    ``LayerStats`` (this layer's experts) and ``Stats`` (the totals); each field is documented in
    ``Stats``."""

    pool_hits: int = 0
    ssd_reads: int = 0
    ssd_bytes: int = 0
    ssd_read_s: float = 0.0
    ssd_stall_s: float = 0.0
    pool_evictions: int = 0
    read_ahead_reads: int = 0
    read_ahead_used: int = 0
    read_ahead_wasted: int = 0
    read_ahead_dropped: int = 0
    read_ahead_wait_s: float = 0.0


@dataclass(frozen=True)
class LayerStats(TierCounters):
    """Counters of one MoE layer.

    The cache and copy-engine counts are kept per layer by the native runtime, where the events
    happen: each belongs to the layer of the expert it is about, whichever layer was running at the
    time. So every field but ``recall`` / ``coverage`` sums over the layers to the ``Stats`` field of
    the same name (``waves`` and ``calls`` have no total).

    Attributes:
        hits: expert acquisitions served from a resident slot.
        misses: acquisitions that demand-loaded the expert.
        bytes_copied: bytes moved host -> device into this layer's experts: its demand loads, its
            wave prefetches, and every prefetch of its experts by a predictor or policy, counted when
            the copy is issued. A prefetch for layer l queued while layer l-1 runs counts here, in
            layer l (before the runtime kept per-layer counts it counted in the layer whose acquire
            window it fell into).
        calls: forward calls of the layer.
        waves: acquire/compute/release rounds (> calls when a union exceeded the cache).
        wave_prefetches: experts of a later wave prefetched while an earlier wave computed
            (overlapped waves; counted in ``prefetches``, their first use in ``prefetch_hits``).
        prefetch_hits: first accesses of prefetched experts (counted in ``hits``).
        prefetch_late: ... of which the copy had not finished when the layer needed it.
        cpu_experts: selected experts computed on the host from the pool instead of loaded
            (heterogeneous mode; neither hits nor misses).
        demand_stall_s: seconds the layer's acquires and per-expert waits (deferred waits) waited
            for copies (demand loads and late prefetches; the runtime engine's measure, host side,
            counted only when a wait happened; reference store: wall time of acquires with misses).
        evictions: this layer's experts evicted from the cache (by whichever layer's load).
        prefetches: prefetch loads of this layer's experts queued (predictor, policy and wave
            prefetches).
        prefetch_wasted: ... evicted or cancelled before any use.
        prefetch_wasted_bytes: bytes copied for those.
        prefetch_bytes: bytes copied by prefetches of this layer's experts (part of ``bytes_copied``).
        pool_hits, ssd_reads, ssd_bytes, ssd_read_s, ssd_stall_s, pool_evictions, read_ahead_*: the
            host tier's (``moert.load(host_budget=...)``; see ``Stats``), for this layer's experts.
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
    evictions: int = 0
    prefetches: int = 0
    prefetch_wasted: int = 0
    prefetch_wasted_bytes: int = 0
    prefetch_bytes: int = 0
    recall: float | None = None
    coverage: float | None = None


@dataclass(frozen=True)
class Stats(TierCounters):
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
        pool_hits: the host tier (``moert.load(host_budget=...)``; 0 without one): device copies
            whose expert was in the pinned host pool. ``misses`` + prefetch loads = ``pool_hits`` +
            ``ssd_reads``.
        ssd_reads: experts read from their checkpoint files: for a device copy, or ahead of one
            (``read_ahead_reads``); ``misses`` + prefetch loads = ``pool_hits`` + ``ssd_reads`` -
            ``read_ahead_reads``.
        ssd_bytes: bytes read from the files.
        ssd_read_s: seconds spent reading them (summed over the copy threads).
        ssd_stall_s: ... of which for demand copies (the layer waited for them; part of
            ``demand_stall_s``).
        pool_evictions: experts dropped from the host pool for a read.
        read_ahead_reads: experts read into the pool ahead of their device copy (``moert.load(...,
            read_ahead=k)``; part of ``ssd_reads``); a later copy of one is a ``pool_hits``.
        read_ahead_used: ... whose slab a device copy took before it was evicted.
        read_ahead_wasted: ... evicted from the pool unused.
        read_ahead_dropped: read-ahead requests not read (resident by then, no unpinned slab, or
            pushed out of the bounded queue by newer ones).
        read_ahead_wait_s: seconds demand copies waited on a read-ahead still in flight (an SSD
            stall besides ``ssd_stall_s``, also part of ``demand_stall_s``).
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


#: LayerStats fields that are plain per-layer counts (not derived from the predictor)
_LAYER_COUNTS = tuple(f.name for f in fields(LayerStats) if f.name not in ("recall", "coverage"))
#: Stats fields summed from the per-layer rows
_SUMMED = ("cpu_experts",)


class LayerCounters:
    """Per-layer counts kept in Python, one list of L values per name, incremented in place
    (``counters.calls[ordinal] += 1``): what only Python sees (calls, wave prefetches, host
    experts), or everything for the reference stores.

    Args:
        num_layers: L.
        names: LayerStats field names.
    """

    def __init__(self, num_layers: int, names: Sequence[str]) -> None:
        unknown = set(names) - set(_LAYER_COUNTS)
        if unknown:
            raise ValueError(f"{sorted(unknown)} are not LayerStats counts; known: {_LAYER_COUNTS}")
        self.names = tuple(names)
        self.num_layers = num_layers
        self.reset()

    def reset(self) -> None:
        for name in self.names:
            setattr(self, name, [0] * self.num_layers)

    def rows(self) -> dict[str, list[Any]]:
        """``{name: (L,) values}``."""
        return {name: list(getattr(self, name)) for name in self.names}


def assemble(
    layer_ids: Sequence[int],
    totals: Mapping[str, Any],
    rows: Mapping[str, Sequence[Any]],
    recall: Sequence[tuple[int, int, int]] | None = None,
) -> Stats:
    """A ``Stats`` from totals and per-layer rows.

    Args:
        layer_ids: decoder index of each MoE ordinal.
        totals: ``Stats`` fields (``cpu_experts`` is summed from ``rows``).
        rows: ``{LayerStats field: (L,) values}``; missing fields are 0.
        recall: per ordinal ``(top-k hits, covered, selections)`` of the predictor, or None.
    """
    counts = list(recall) if recall is not None else [(0, 0, 0)] * len(layer_ids)
    per_layer = {}
    for o, layer in enumerate(layer_ids):
        a, c, n = counts[o]
        values = {name: _plain(v[o]) for name, v in rows.items()}
        for name in ("demand_stall_s", "ssd_read_s", "ssd_stall_s", "read_ahead_wait_s"):
            values[name] = float(values.get(name, 0.0))
        per_layer[layer] = LayerStats(**values, recall=a / n if n else None, coverage=c / n if n else None)
    n_all = sum(n for _, _, n in counts)
    summed = {name: sum(_plain(v) for v in rows.get(name, ())) for name in _SUMMED}
    return Stats(
        **totals,
        **summed,
        recall=sum(a for a, _, _ in counts) / n_all if n_all else None,
        coverage=sum(c for _, c, _ in counts) / n_all if n_all else None,
        per_layer=per_layer,
    )


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number (JSON-ready stats)."""
    return value.item() if hasattr(value, "item") else value
