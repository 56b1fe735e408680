"""The SSD tier in the simulator: a host pool that holds only a fraction of the experts, under the device cache.

Three levels: the device slab cache (the existing replay, unchanged), the host pinned pool (a cache
of ``F * L * E`` experts, its own policy) and the SSD (every expert, in the checkpoint's files). A
device load (demand or prefetch) of an expert that is in the pool is a pool hit and costs one
host-to-device copy; one that is not is an SSD read into the pool (evicting by the pool's policy) and
then the copy.

How it is replayed: :class:`RecordingCaches` wraps the device caches and records every device load
in time order (token-major: token t, then layers 0..L-1; within one call the prefetch row's loads,
then the access's demand loads, each in the order of the call's ids). The pool sees only that load
stream (a device hit never touches the pool, as in the runtime, where the pool is read only to fill
a device slot), replayed through one simulated C++ ``SlabCache`` (one global cache of ``L * E``
keys) per host capacity. The device replay is therefore the same for every ``F``: one device run
gives every host capacity. Per-layer device caches are replayed with the stepping driver (its
token-major order; the fast path replays them layer by layer).

``F = 1`` is today's two-level setting: every expert was pinned in the pool at load time (no SSD
reads at all). ``F < 1`` starts with an empty pool, so each expert's first load is an SSD read
(counted apart as ``ssd_cold_reads``).

Cost model (windowed, the default): the SSD is a second link of the windowed timeline
(:func:`moert.sim.tier_timeline.tier_timeline`; the formula and every assumption are in its module
doc): a device copy of an expert that missed the pool waits for its SSD read (its own link,
``S / BW_ssd`` plus ``ssd_latency_us`` per read; demand reads before read-ahead), a PCIe copy overlaps
the next expert's read, and a read blocks compute only through the step's demand chain. Each row has
the stall split per tier (waiting for SSD reads, and for PCIe copies: demand, behind prefetches, late
prefetches). With ``F = 1`` it is the single-link windowed model exactly.

The earlier pooled formula is kept beside it as ``tier_pooled_tok_s`` (``S`` bytes per expert,
``D``/``P`` demand/prefetch loads per token, ``D_ssd``/``P_ssd`` those of them that missed the pool)::

    t_token = max(L * t_layer, P * S / BW, P_ssd * S / BW_ssd) + D * S / BW + D_ssd * S / BW_ssd

``BW_ssd`` is the sustained read rate of expert-sized (tens of MB) reads: consumer PCIe 4.0 NVMe drives
give about 3-7 GB/s; the default here is 5 GB/s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from moert.engine.runtime import SlabCache
from moert.sim.step import Caches
from moert.sim.tier_timeline import TierTraffic, tier_timeline
from moert.sim.timeline import Traffic

__all__ = [
    "HOST_POLICIES",
    "TierConfig",
    "RecordingCaches",
    "LoadLog",
    "pool_slots",
    "replay_pool",
    "predict_tiers",
    "tier_results",
    "tier_traffic",
    "tier_table",
    "tier_note",
]

HOST_POLICIES = ("lru", "lfu", "belady")
DEMAND, PREFETCH = 0, 1


@dataclass(frozen=True)
class TierConfig:
    """The host pool under the device cache.

    Attributes:
        host_capacities: pool sizes as fractions of all ``L * E`` experts, each in (0, 1].
        ssd_bandwidths_gbs: SSD -> pinned host memory read rates, GB/s (NVMe: ~3-7).
        host_policies: the pool's eviction, one result per policy: ``lru``, ``lfu`` or ``belady`` (next
            use in the pool's own access stream; the ceiling).
        ssd_latency_us: fixed time per SSD read, µs, added to ``S / BW_ssd`` (default 0).
    """

    host_capacities: tuple[float, ...] = (1.0,)
    ssd_bandwidths_gbs: tuple[float, ...] = (5.0,)
    host_policies: tuple[str, ...] = ("lru",)
    ssd_latency_us: float = 0.0

    def __post_init__(self) -> None:
        if not self.host_capacities or not self.ssd_bandwidths_gbs:
            raise ValueError("TierConfig needs at least one host capacity and one SSD bandwidth")
        for f in self.host_capacities:
            if not (math.isfinite(f) and 0 < f <= 1):
                raise ValueError(
                    f"host capacity {f!r} must be a fraction of all experts in (0, 1], e.g. --host-capacity 0.5"
                )
        for bw in self.ssd_bandwidths_gbs:
            if not (math.isfinite(bw) and bw > 0):
                raise ValueError(f"SSD bandwidth {bw!r} GB/s must be > 0, e.g. --ssd-bandwidth 3,7 (NVMe)")
        if not (math.isfinite(self.ssd_latency_us) and self.ssd_latency_us >= 0):
            raise ValueError(
                f"SSD latency {self.ssd_latency_us!r} µs must be a finite number >= 0, e.g. --ssd-latency-us 80"
            )
        for policy in self.host_policies or ("",):
            if policy not in HOST_POLICIES:
                raise ValueError(f"host policy {policy!r} is not one of {', '.join(HOST_POLICIES)}")


def pool_slots(fraction: float, num_layers: int, num_experts: int, top_k: int) -> int:
    """Experts the pool holds: ``round(F * L * E)``; at least one layer's top-k (else ValueError)."""
    slots = int(round(fraction * num_layers * num_experts))
    if slots < top_k:
        raise ValueError(
            f"host capacity {fraction:g} holds {slots} of {num_layers * num_experts} experts, fewer than one "
            f"layer's top-k ({top_k}); give at least --host-capacity {top_k / (num_layers * num_experts):.4f}"
        )
    return slots


class LoadLog:
    """Device loads in time order: ``(layer, expert, kind, step)`` with kind 0 demand, 1 prefetch, and
    the step (``token * L + layer``) at which the windowed timeline issues it."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []

    def add(self, layer: int, experts: np.ndarray, kind: int, step: int = 0) -> None:
        if experts.size:
            part = np.empty((experts.size, 4), dtype=np.int64)
            part[:, 0], part[:, 1], part[:, 2], part[:, 3] = layer, experts, kind, step
            self._parts.append(part)

    def events(self) -> np.ndarray:
        """(N, 4) int64 rows ``(layer, expert, kind, step)``."""
        return np.concatenate(self._parts) if self._parts else np.zeros((0, 4), dtype=np.int64)


class _Recorder:
    """A simulated ``SlabCache`` that logs the experts each call loads (resident after, not before;
    within one call nothing loaded is evicted: a prefetch batch and an access hold their members)."""

    def __init__(self, cache: SlabCache, log: LoadLog, layer_of: Any, step_of: Any) -> None:
        self._cache, self._log, self._layer_of, self._step_of = cache, log, layer_of, step_of

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)

    def _logged(self, call: Any, layer: int, ids: np.ndarray, kind: int) -> int:
        before = self._cache.resident(layer).numpy()
        out = call(layer, ids)
        loaded = ids[~before[ids]]
        if kind == PREFETCH:  # an access holds all its ids after the call; a prefetch may not
            loaded = loaded[self._cache.resident(layer).numpy()[loaded]]
        _, first = np.unique(loaded, return_index=True)  # distinct, in call order
        self._log.add(self._layer_of(layer), loaded[np.sort(first)], kind, self._step_of())
        return out

    def sim_prefetch(self, layer: int, experts: Any) -> int:
        ids = np.asarray(experts, dtype=np.int64).reshape(-1)
        return self._logged(self._cache.sim_prefetch, layer, ids[ids >= 0], PREFETCH)

    def sim_access(self, layer: int, experts: Any) -> int:
        ids = np.asarray(experts, dtype=np.int64).reshape(-1)
        return self._logged(self._cache.sim_access, layer, ids[ids >= 0], DEMAND)

    def replay(self, layers, experts, *, prefetch=None, prefetch_layers=None, priorities=None, **kw) -> dict:
        """``SlabCache.replay`` of one step that only prefetches or only accesses (the stepping driver's
        tracked calls, :meth:`moert.sim.step.Caches.prefetch` / ``sim_access``), logging its loads; a tier
        run never takes the fast path (:func:`moert.sim.replay.simulate`)."""
        return self._one_step(layers, experts, prefetch, prefetch_layers, priorities, kw)

    def _one_step(self, layers, experts, prefetch, prefetch_layers, priorities, kw) -> dict:
        layer, row = int(np.asarray(layers)[0]), np.asarray(experts, dtype=np.int64)[0]
        only_prefetch = prefetch is not None and (row < 0).all()
        if len(layers) != 1 or set(kw) - {"track_prefetch"} or (prefetch is not None and not only_prefetch):
            raise NotImplementedError("a tier run replays step by step (one prefetch or one access per call)")
        pl = layer if prefetch_layers is None else int(np.asarray(prefetch_layers)[0])
        ids = np.asarray(prefetch, dtype=np.int64)[0] if only_prefetch else row
        ids = ids[ids >= 0]

        def call(_: int, __: np.ndarray) -> dict:
            return self._cache.replay(
                layers,
                experts,
                prefetch=prefetch,
                prefetch_layers=prefetch_layers,
                priorities=priorities,
                **kw,
            )

        return self._logged(call, pl if only_prefetch else layer, ids, PREFETCH if only_prefetch else DEMAND)


class RecordingCaches(Caches):
    """:class:`~moert.sim.step.Caches` whose caches log every device load (:attr:`log`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loads = LoadLog()
        step = lambda: self.step  # noqa: E731 (the drivers set it before each call)
        if self.mode == "per-layer":
            self.caches = [
                _Recorder(c, self.loads, lambda _, i=i: i, step) for i, c in enumerate(self.caches)
            ]
        else:
            self.caches = [_Recorder(c, self.loads, lambda layer: layer, step) for c in self.caches]


def replay_pool(events: np.ndarray, num_layers: int, num_experts: int, slots: int, policy: str) -> np.ndarray:
    """(N,) bool: whether each device load (``events`` rows ``(layer, expert, kind)``) hit the pool."""
    n = events.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool)
    pool = SlabCache.simulated(
        num_layers, num_experts, slots, policy="priority" if policy == "belady" else policy
    )
    try:
        priorities = None
        if policy == "belady":  # after each access: minus the index of the key's next access
            key = events[:, 0] * num_experts + events[:, 1]
            order = np.lexsort((np.arange(n), key))  # by key, then time
            same = key[order[1:]] == key[order[:-1]]
            nxt = np.full(n, 2 * n, dtype=np.int64)
            nxt[order[:-1][same]] = order[1:][same]
            priorities = (-nxt).astype(np.float32)[:, None]
        out = pool.replay(
            events[:, 0].astype(np.int32), events[:, 1:2].astype(np.int32), priorities=priorities
        )
        return out["hits_per_step"].numpy().astype(bool)
    finally:
        pool.close()


def predict_tiers(
    compute_s: float,
    link_bytes: tuple[float, float],
    ssd_bytes: tuple[float, float],
    bandwidth_gbs: float,
    ssd_gbs: float,
) -> float:
    """Seconds per token (module doc): ``link_bytes``/``ssd_bytes`` = (demand, prefetch) bytes per token."""
    bw, ssd = bandwidth_gbs * 1e9, ssd_gbs * 1e9
    return max(compute_s, link_bytes[1] / bw, ssd_bytes[1] / ssd) + link_bytes[0] / bw + ssd_bytes[0] / ssd


def tier_traffic(events: np.ndarray, hit: np.ndarray, traffic: Traffic) -> TierTraffic:
    """Which of ``traffic``'s copies need an SSD read: the recorded loads (rows ``(layer, expert, kind,
    step)``, the pool's ``hit`` (N,) bool) matched to the run's steps and prefetch FIFO (both in time
    order; prefetches logged after the last step are dropped as :meth:`StepLog.traffic` drops them)."""
    S = traffic.steps
    demand, step = events[:, 2] == DEMAND, events[:, 3]
    if (
        not np.array_equal(np.bincount(step[demand], minlength=S)[:S], traffic.demand)
        or (step[demand] >= S).any()
    ):
        raise RuntimeError("the recorded demand loads do not match the replay's demand misses per step")
    pre = ~demand & (step < S)
    if int(pre.sum()) != int(traffic.issued.sum()):
        raise RuntimeError(
            f"{int(pre.sum())} recorded prefetch loads against {int(traffic.issued.sum())} queued prefetch copies"
        )
    miss = ~hit
    return TierTraffic(np.bincount(step[demand & miss], minlength=S).astype(np.int64), miss[pre])


def tier_results(
    events: np.ndarray, meta: Any, tokens: int, cost: Any, tiers: TierConfig, traffic: Traffic,
    grid: list[tuple[float, float]] | None = None,
) -> list[dict]:  # fmt: skip
    """One dict per (host policy, host capacity, cost point, SSD bandwidth): pool hits, SSD reads, bytes
    and stall per tier, tok/s (windowed two-tier timeline; the pooled formula as ``tier_pooled_tok_s``).
    ``grid``: the (layer ms, GB/s) points (default: the cost model's own)."""
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    n, S = max(int(tokens), 1), cost.expert_bytes
    demand = events[:, 2] == DEMAND
    link = (float(demand.sum()) * S / n, float((~demand).sum()) * S / n)
    _, first = np.unique(events[:, 0] * E + events[:, 1], return_index=True)
    rows = []
    for policy, f in ((p, f) for p in tiers.host_policies for f in tiers.host_capacities):
        slots = pool_slots(f, L, E, k)
        hit = np.ones(len(events), dtype=bool) if f == 1 else replay_pool(events, L, E, slots, policy)
        miss = ~hit
        ssd = (float((miss & demand).sum()) * S / n, float((miss & ~demand).sum()) * S / n)
        reads = tier_traffic(events, hit, traffic)
        base = {
            "host_capacity": f, "host_policy": policy, "pool_slots": slots,
            "pool_bytes": slots * S, "device_loads": int(len(events)), "pool_hits": int(hit.sum()),
            "pool_hit_rate": float(hit.mean()) if len(events) else math.nan,
            "ssd_reads": int(miss.sum()), "ssd_demand_reads": int((miss & demand).sum()),
            "ssd_prefetch_reads": int((miss & ~demand).sum()),
            "ssd_cold_reads": 0 if f == 1 else int(len(first)),
            "ssd_reads_per_layer": np.bincount(events[miss, 0], minlength=L).tolist(),
            "link_bytes_per_token": sum(link), "ssd_bytes_per_token": sum(ssd),
            "link_demand_bytes_per_token": link[0], "link_prefetch_bytes_per_token": link[1],
            "ssd_demand_bytes_per_token": ssd[0], "ssd_prefetch_bytes_per_token": ssd[1],
        }  # fmt: skip
        for ms, bw_link in grid or [(cost.layer_compute_ms, cost.bandwidth_gbs)]:
            at = dataclasses.replace(cost, layer_compute_ms=ms, bandwidth_gbs=bw_link)
            for bw in tiers.ssd_bandwidths_gbs:
                got = _predict(at, traffic, reads, link, ssd, L, n, bw, tiers.ssd_latency_us)
                rows.append(
                    {**base, "layer_ms": ms, "bandwidth_gbs": bw_link, "ssd_bandwidth_gbs": bw, **got}
                )
    return rows


def _predict(cost, traffic, reads, link, ssd, L, tokens, ssd_gbs, latency_us) -> dict:
    """One cost point's tier prediction: windowed (``cost.window``) and pooled, stalls per token."""
    pooled = predict_tiers(L * cost.layer_compute_ms * 1e-3, link, ssd, cost.bandwidth_gbs, ssd_gbs)
    out = {"tier_pooled_tok_s": 1.0 / pooled}
    if cost.window != "windowed":
        return {**out, "tier_token_ms": pooled * 1e3, "tier_tok_s": 1.0 / pooled}
    got = tier_timeline(
        traffic, reads, compute_s=cost.layer_compute_ms * 1e-3, copy_s=cost.copy_s,
        read_s=cost.expert_bytes / (ssd_gbs * 1e9) + latency_us * 1e-6,
        attention_share=cost.attention_share, depth=cost.prefetch_depth,
    )  # fmt: skip
    per = 1e3 / tokens
    stalls = {f"stall_{key}_ms": got[f"stall_{key}_s"] * per for key in _PCIE_STALLS}
    out.update(
        tier_token_ms=got["seconds"] * per, tier_tok_s=tokens / got["seconds"], **stalls,
        stall_pcie_ms=sum(stalls.values()), stall_ssd_ms=got["stall_ssd_s"] * per,
        prefetch_backlog=got["prefetch_backlog"], read_backlog=got["read_backlog"],
    )  # fmt: skip
    return out


_PCIE_STALLS = ("demand", "behind_prefetch", "late_prefetch")


def tier_table(report: dict) -> str:
    """Markdown: one line per (policy, device capacity, host policy and capacity, layer ms, SSD bandwidth):
    hit rates, SSD reads and MB per token per tier, the stall per token per tier (waiting for SSD reads;
    for PCIe copies), tok/s (windowed two-tier timeline) and the pooled formula's tok/s."""
    lines = [
        "| policy | device cap | pool policy | host cap | layer ms | SSD GB/s | device hit | pool hit | "
        "SSD reads/tok | PCIe MB/tok | SSD MB/tok | stall PCIe ms | stall SSD ms | tok/s | pooled tok/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        for t in r.get("tiers", []):
            stalls = [t.get("stall_pcie_ms"), t.get("stall_ssd_ms")]
            cells = [
                r["policy"], f"{r['capacity']:g}", t["host_policy"], f"{t['host_capacity']:g}",
                f"{t['layer_ms']:g}", f"{t['ssd_bandwidth_gbs']:g}", f"{r['hit_rate']:.3f}",
                f"{t['pool_hit_rate']:.3f}", f"{t['ssd_reads'] / max(r['tokens'], 1):.2f}",
                f"{t['link_bytes_per_token'] / 1e6:.1f}", f"{t['ssd_bytes_per_token'] / 1e6:.1f}",
                *("" if v is None else f"{v:.2f}" for v in stalls),
                f"{t['tier_tok_s']:.2f}", f"{t['tier_pooled_tok_s']:.2f}",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tier_note(report: dict) -> list[str]:
    """Markdown lines for ``moert simulate``'s report: the tier table, or nothing without tiers."""
    tiers = report["config"].get("tiers")
    if not tiers:
        return []
    latency = tiers.get("ssd_latency_us", 0.0)
    return [
        f"SSD tier (`moert.sim.tiers`): host pool of a fraction of all experts, policy {', '.join(tiers['host_policies'])}"
        f"{f', {latency:g} µs per SSD read' if latency else ''}; tok/s with the SSD as a second link of the "
        "windowed timeline (`moert.sim.tier_timeline`; `--window pooled`: the pooled formula), stalls per token "
        "waiting for PCIe copies and for SSD reads:",
        "",
        tier_table(report),
    ]
