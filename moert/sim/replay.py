"""Trace-replay simulator: replays routing traces through the real C++ ``SlabCache`` (simulated).

Every token's MoE layers are replayed in order (token-major) through
``runtime.SlabCache.simulated``, the same bookkeeping and eviction code the engine runs, with
loads completing at once. Caches are either one per MoE layer (``per-layer``, the default:
capacity is a fraction of one layer's E, rounded, at least k) or one for all layers (``global``:
a fraction of L * E). Policies are named ``EVICT[+PREFETCH]`` (:mod:`moert.policy`): ``lru``, ``lfu``,
``fifo``, ``moe-infinity``, ``belady``, ``utility``, ``score``, optionally with a prefetcher, e.g.
``lru+oracle``; ``score`` (the runtime's predictor-score eviction) needs a prefetcher that gives
scores, e.g. ``score+PRED.safetensors:2``.

Each configuration is one :class:`~moert.policy.base.Policy` object, driven as the runtime drives it.
The stepping driver (:mod:`moert.sim.step`) calls its hooks access by access: the definition, and what
runs for a policy without a fast path (``fifo``, whose plans depend on the cache) or with
``SimConfig(replay="step")``. Otherwise the policy plans a whole sequence at once
(``Policy.sequence_plan``) and :mod:`moert.sim.fast` replays the plans, mostly one C++ call per chunk of
tokens per cache; tests check that both give the same hits at every access.

A :class:`CostModel` turns the counts into bytes per token and predicted tokens/s (DESIGN.md §1):
bytes per token ``B = ((1 - h) + w) * k * L * S`` gives the bandwidth ceiling ``BW / B``; the
prediction adds compute: windowed (default), the copy link replayed over every step from each run's
logged prefetch copies and first uses (:mod:`moert.sim.timeline`); pooled, ``t_token = max(L * t_layer,
B_prefetch / BW) + B_demand / BW`` (every row has both). With ``CostModel.cpu_expert_ms`` set
(heterogeneous mode, DESIGN.md §7) each run also counts the demand misses of every (token, layer) step
(from the replay's hits per step; not counted otherwise), and each row adds the prediction when some of
a step's misses are computed on the host CPU instead of copied (:func:`cpu_split`).

Speculative decoding (``SimConfig.verify_tokens = N = gamma + 1``, DESIGN.md §7, MoE-SpAc): each
sequence's tokens are grouped into consecutive verify passes of N tokens (:mod:`moert.sim.passes`); each
MoE layer of a pass is one call that accesses the union of the pass's experts once (hits and misses
counted per distinct expert, as the runtime counts a layer call). A union larger than a cache streams in
waves of at most the cache's slots, resident experts first (``moert.engine.layer.wave_bounds`` without
overlap). Simplifications: every drafted token is accepted (the trace is the accepted sequence), so no
rejected draft token's experts are loaded; the draft model is not simulated (neither its time nor its
memory). Rows count per generated token, so they compare across N: ``tokens`` (generated),
``loads_per_token``, ``bytes_per_token``, and ``token_hit_rate = 1 - demand misses / (tokens * k)`` (the
share of the tokens' expert selections that needed no demand load; equal to ``hit_rate`` at N = 1);
``hit_rate`` stays per distinct access of a layer call. The cost model charges one verify pass the
compute of one token (see :class:`CostModel`). Supported at N > 1: the policies with ``verify_passes``
(eviction ``lru``, ``lfu``, ``belady``, ``utility``, ``fifo``; prefetchers ``utility[:m]`` and
``oracle``); per-layer or global caches; not the heterogeneous mode.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moert.policy import REGISTRY, Combination, Policy, SequencePlan
from moert.policy.score import NO_SCORES_HELP
from moert.policy.utility import check_decay
from moert.sim.cost import CostModel, cpu_split
from moert.sim.fast import distinct_counts, replay_plan
from moert.sim.passes import PassTrace
from moert.sim.specs import PolicySpec, parse_policies
from moert.sim.step import MODES, Caches, step_sequence
from moert.sim.tiers import RecordingCaches, TierConfig, tier_results
from moert.sim.timeline import StepLog
from moert.trace import SequenceTrace, Trace, TraceMeta

__all__ = ["PolicySpec", "SimConfig", "cpu_split", "make_policy", "num_slots", "parse_policies", "simulate"]

REPLAYS = ("auto", "step")


@dataclass(frozen=True)
class SimConfig:
    """What to simulate.

    Attributes:
        capacities: cache sizes as fractions (of one layer's E per layer, or of L * E globally).
        policies: the configurations to replay.
        mode: ``per-layer`` or ``global``.
        cost: the cost model.
        chunk_tokens: sequences are replayed in chunks of about this many tokens (one C++ call each).
        verify_tokens: N = gamma + 1 tokens per speculative verify pass (1 = autoregressive decode).
        utility_decay: weight of the past in policy / prefetcher ``utility``'s moving average, in (0, 1).
        replay: ``auto`` (a policy's fast path where it has one) or ``step`` (the stepping driver for
            every policy: slower, the definition).
        evictor: policy ``learned``'s reuse model (a file or a loaded ``ReuseModel``), or None.
        layer_ms, bandwidths: the cost grid: every row also predicts at each (layer ms, GB/s) of their
            product (``row["grid"]``); empty: the cost model's own value.
        tiers: the host pool under the device cache (:mod:`moert.sim.tiers`); None: every expert in
            the pool (two levels).
    """

    capacities: tuple[float, ...] = (0.1, 0.25, 0.5)
    policies: tuple[PolicySpec, ...] = field(default_factory=lambda: tuple(parse_policies(["lru"])))
    mode: str = "per-layer"
    cost: CostModel = field(default_factory=CostModel)
    chunk_tokens: int = 8192
    verify_tokens: int = 1
    utility_decay: float = 0.7
    replay: str = "auto"
    evictor: Any = None
    layer_ms: tuple[float, ...] = ()
    bandwidths: tuple[float, ...] = ()
    tiers: TierConfig | None = None

    def grid(self) -> list[tuple[float, float]]:
        """The (layer ms, GB/s) points every row is predicted at, layer ms major."""
        ms = self.layer_ms or (self.cost.layer_compute_ms,)
        bw = self.bandwidths or (self.cost.bandwidth_gbs,)
        return [(float(a), float(b)) for a in ms for b in bw]

    def __post_init__(self) -> None:
        for name, values in (("layer_ms", self.layer_ms), ("bandwidths", self.bandwidths)):
            for v in values:
                ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
                if not ok or v < 0 or (name == "bandwidths" and v == 0):
                    raise ValueError(
                        f"{name} value {v!r} must be a finite number {'> 0 (GB/s)' if name == 'bandwidths' else '>= 0 (ms per MoE layer)'}"
                    )
        if isinstance(self.verify_tokens, bool) or not isinstance(self.verify_tokens, (int, np.integer)):
            raise ValueError(
                f"verify_tokens={self.verify_tokens!r} must be an integer >= 1: gamma + 1 tokens per verify "
                "pass (e.g. --verify-tokens 3 for gamma = 2; 1 = autoregressive)"
            )
        if self.verify_tokens < 1:
            raise ValueError(
                f"verify_tokens={self.verify_tokens} must be >= 1: gamma + 1 tokens per verify pass (e.g. "
                "--verify-tokens 3 for gamma = 2; 1 = autoregressive)"
            )
        check_decay(self.utility_decay)
        if self.tiers is not None and (self.verify_tokens > 1 or self.cost.heterogeneous):
            raise ValueError(
                "the SSD tier (--host-capacity) is simulated for autoregressive copy-only decode; "
                "drop --verify-tokens / --cpu-expert-ms, or --host-capacity"
            )
        if self.verify_tokens > 1 and self.cost.heterogeneous:
            raise ValueError(
                f"verify_tokens={self.verify_tokens} with cpu_expert_ms: the heterogeneous cost model is for "
                "batch-1 steps; a verify pass computes several rows per CPU expert, which is not modelled. "
                "Drop --cpu-expert-ms or use --verify-tokens 1"
            )
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; use one of {', '.join(MODES)}")
        if self.replay not in REPLAYS:
            raise ValueError(f"replay={self.replay!r}; use one of {', '.join(REPLAYS)}")
        for c in self.capacities:
            if not 0 < c <= 1:
                raise ValueError(f"capacity {c} must be a fraction in (0, 1]")


def num_slots(capacity: float, meta: TraceMeta, mode: str) -> int:
    """Slots of one cache: ``round(capacity * E)`` per layer (at least k), or of L * E globally."""
    experts = meta.num_experts if mode == "per-layer" else meta.num_experts * meta.num_layers
    return max(meta.top_k, int(round(capacity * experts)))


def make_policy(spec: PolicySpec, objects: dict[str, Policy] | None = None, **options) -> Policy:
    """A fresh policy object for ``spec``: registry names, or a shallow copy of ``objects[prefetch]``."""
    evict = REGISTRY.build(spec.evict, "evict", **options)
    if spec.prefetch is None:
        return evict
    obj = (objects or {}).get(spec.prefetch)
    pre = copy.copy(obj) if obj is not None else REGISTRY.build(spec.prefetch, "prefetch", **options)
    return Combination(evict, pre)


class _Run:
    """The caches of one (policy, capacity) pair and what they counted; ``policy``: this run's own
    object when it is stepped, None when it is fed the shared fast-path plans."""

    def __init__(
        self, spec: PolicySpec, capacity: float, meta: TraceMeta, config: SimConfig, cache_policy: str,
        policy: Policy | None,
    ) -> None:  # fmt: skip
        self.spec, self.capacity, self.mode, self.policy = spec, capacity, config.mode, policy
        self.meta = meta
        self.L = meta.num_layers
        self.slots = num_slots(capacity, meta, config.mode)
        n_caches = meta.num_layers if config.mode == "per-layer" else 1
        #: per-step traffic for the windowed cost model (logged whatever the cost model's window)
        self.log = StepLog(meta.num_layers, n_caches)
        self.tiers = config.tiers
        self.caches = (Caches if config.tiers is None else RecordingCaches)(
            config.mode,
            meta.num_layers,
            meta.num_experts,
            self.slots,
            cache_policy,
            slab_bytes=config.cost.expert_bytes,
            min_slots=meta.top_k,
            log=self.log,
        )
        self.grid = config.grid()
        if policy is not None:  # a stepped policy may read the run's residency and cost model
            policy.set_context(cost=config.cost, caches=self.caches)
        self.hits = np.zeros(self.L, dtype=np.int64)
        self.accesses = np.zeros(self.L, dtype=np.int64)
        self.tokens = 0
        #: tokens per verify pass; passes replayed; the tokens' valid expert selections
        self.verify_tokens = int(config.verify_tokens)
        self.passes = 0
        self.token_accesses = 0
        self.seconds = 0.0
        #: heterogeneous cost model: count the demand misses of every (token, layer) step
        self.count_steps = config.cost.heterogeneous
        #: entry n = the steps with n demand misses (grown as needed)
        self.misses_per_step = np.zeros(0, dtype=np.int64)

    def feed(
        self,
        chunk: list[SequenceTrace],
        experts: np.ndarray,
        plan: SequencePlan | None,
        offset: int,
        generated: int,
        token_accesses: int | None,
    ) -> None:
        """Replays one chunk: experts (L, T, w) int32 (-1 pads) of ``chunk``, whose first row is row
        ``offset`` of the trace; ``plan``: the fast path's plans of the chunk (None: step this run's
        policy). With verify passes, T counts passes and ``generated`` / ``token_accesses`` the tokens
        and their expert selections (default: one token per row)."""
        start = time.perf_counter()
        valid = (experts >= 0).sum(axis=(1, 2))  # [L]
        self.passes += experts.shape[1]
        self.tokens += generated
        self.token_accesses += int(valid.sum()) if token_accesses is None else token_accesses
        self.accesses += valid
        self.caches.row0 = offset
        if plan is not None:
            hits = replay_plan(self.caches, experts, plan)  # [L, T]
        else:
            assert self.policy is not None
            hits, base = [], offset
            for s in chunk:
                hits.append(step_sequence(self.policy, self.caches, s, base))
                base += s.num_tokens
            hits = np.concatenate(hits, axis=1)
        self.hits += hits.sum(axis=1)
        misses = distinct_counts(experts) - hits  # [L, T]
        self.log.demand(misses)
        if self.count_steps:
            self._count_misses(misses)
        self.seconds += time.perf_counter() - start

    def _count_misses(self, misses: np.ndarray) -> None:
        """Adds demand misses per step (any shape, >= 0) to the histogram ``misses_per_step``."""
        hist = np.bincount(misses.ravel().astype(np.int64))
        if hist.size > self.misses_per_step.size:
            self.misses_per_step = np.pad(self.misses_per_step, (0, hist.size - self.misses_per_step.size))
        self.misses_per_step[: hist.size] += hist

    def result(self, cost: CostModel) -> dict:
        stats = self.caches.stats()
        hits, accesses = int(self.hits.sum()), int(self.accesses.sum())
        n = max(self.tokens, 1)
        demand_loads = stats.get("demand_loads", stats.get("misses", 0))
        prefetch_loads = stats.get("prefetch_loads", 0)
        demand_bpt = demand_loads * cost.expert_bytes / n
        prefetch_bpt = prefetch_loads * cost.expert_bytes / n
        misses = int(stats.get("misses", 0))
        row = {
            "policy": self.spec.label,
            "evict": self.spec.evict,
            "prefetch": self.spec.prefetch,
            "capacity": self.capacity,
            "mode": self.mode,
            "slots_per_cache": self.slots,
            "caches": len(self.caches.caches),
            "tokens": self.tokens,
            "accesses": accesses,
            "hits": hits,
            "hit_rate": hits / accesses if accesses else math.nan,
            "hit_rate_per_layer": [float(h / a) if a else math.nan for h, a in zip(self.hits, self.accesses)],
            "verify_tokens": self.verify_tokens,
            "passes": self.passes,
            "token_accesses": self.token_accesses,
            "token_hit_rate": 1.0 - misses / self.token_accesses if self.token_accesses else math.nan,
            "loads_per_token": (demand_loads + prefetch_loads) / n,
            "demand_loads_per_token": demand_loads / n,
            "demand_misses": misses,
            "prefetches": int(stats.get("prefetches", 0)),
            "prefetch_hits": int(stats.get("prefetch_hits", 0)),
            "prefetch_wasted": int(stats.get("prefetch_wasted", 0)),
            "wasted_prefetch_bytes": int(stats.get("prefetch_wasted_bytes", 0)),
            "bytes_loaded": int(stats.get("bytes_loaded", 0)),
            "bytes_per_token": (demand_bpt + prefetch_bpt),
            "cache_stats": stats,
            "replay_seconds": self.seconds,
            "accesses_per_s": accesses / self.seconds if self.seconds > 0 else None,
        }
        row["demand_bytes_per_token"] = demand_bpt
        row["prefetch_bytes_per_token"] = prefetch_bpt
        row["wasted_bytes_per_token"] = row["wasted_prefetch_bytes"] / n
        pooled = cost.predict(demand_bpt, prefetch_bpt, self.L, self.verify_tokens)
        row.update(pooled)
        row["pooled_tok_s"] = pooled["predicted_tok_s"]
        if self.count_steps:
            row["demand_misses_per_step"] = self.misses_per_step.tolist()
            row.update(cost.predict_heterogeneous(self.misses_per_step, self.tokens, prefetch_bpt, self.L))
        traffic = self.log.traffic()
        row["late_prefetches"] = 0
        if cost.window == "windowed":
            row.update(cost.predict_windowed(traffic, self.tokens))
        row["grid"] = cost.predict_grid(
            self.grid, traffic, self.tokens, (demand_bpt, prefetch_bpt), self.L, self.verify_tokens
        )
        if self.tiers is not None:
            row["tiers"] = tier_results(
                self.caches.loads.events(), self.meta, self.tokens, cost, self.tiers, traffic, self.grid
            )
        return row

    def close(self) -> None:
        self.caches.close()


def _chunks(trace: Trace, chunk_tokens: int) -> Iterator[list[SequenceTrace]]:
    chunk: list[SequenceTrace] = []
    size = 0
    for seq in trace.sequences():
        chunk.append(seq)
        size += seq.num_tokens
        if size >= chunk_tokens:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _sequence_plans(policy: Policy, chunk: list[SequenceTrace], offset: int) -> SequencePlan:
    """The fast path's plans of a chunk, each sequence planned after the earlier ones ended."""
    parts = []
    for s in chunk:
        policy.begin_sequence(s, offset)
        parts.append(policy.sequence_plan(s))
        policy.end_sequence(s)
        offset += s.num_tokens
    return SequencePlan.concatenate(parts)


def _fresh(spec: PolicySpec, objects: dict[str, Policy], trace: Trace, options: dict) -> Policy:
    """A policy for ``spec``, bound to the trace and prepared, its ``score`` needs checked."""
    meta = trace.meta
    policy = make_policy(spec, objects, **options)
    if (
        isinstance(policy, Combination)
        and policy.evict.uses_prediction_scores
        and not policy.prefetch.gives_scores
    ):
        raise ValueError(f"{spec.label!r}: prefetcher {spec.prefetch!r} gives no scores; {NO_SCORES_HELP}")
    if policy.uses_prediction_scores:
        raise ValueError(f"{spec.label!r} has no prefetcher: {NO_SCORES_HELP}")
    policy.bind(meta.num_layers, meta.num_experts, meta.top_k)
    policy.prepare(trace)
    return policy


def _runs(spec: PolicySpec, config: SimConfig, trace: Trace, objects: dict, options: dict):
    """``(shared policy or None, runs)``: the fast path feeds every capacity one policy's plans; a stepped
    policy gets one object per run (its plans may depend on that run's cache)."""
    policy = _fresh(spec, objects, trace, options)
    fast = policy.fast_path and config.replay == "auto"
    fast = fast and config.tiers is None  # tiers: loads recorded call by call, token-major
    runs = [
        _Run(
            spec,
            c,
            trace.meta,
            config,
            policy.cache_policy,
            None if fast else _fresh(spec, objects, trace, options),
        )
        for c in config.capacities
    ]
    return (policy if fast else None), runs


def simulate(
    trace: Trace,
    config: SimConfig,
    *,
    progress: bool = False,
    prefetchers: dict[str, Policy] | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> dict:
    """Replays ``trace`` under every (policy, capacity) of ``config``.

    Args:
        trace: any :class:`~moert.trace.Trace` (streamed; ``belady`` reads it once more up front).
        config: capacities, policies, mode, cost model.
        progress: show a progress bar on stderr.
        prefetchers: prefetch policy objects by name, overriding the registry (e.g. a trained predictor's
            :class:`~moert.policy.predictor.PredictorPolicy`); each configuration (and each stepped run)
            gets a shallow copy, so an object keeps its state in what ``bind`` / ``prepare`` make.
        on_chunk: called with the number of tokens after each replayed chunk.

    Returns:
        ``{"trace": meta fields, "config": ..., "results": [one row per (policy, capacity)]}``; a
        row holds hit rate overall and per layer, demand misses, prefetch hits, wasted prefetch
        bytes, bytes per token, predicted tokens/s, the C++ cache stats and the replay speed.
    """
    meta = trace.meta
    n_verify = int(config.verify_tokens)
    objects = prefetchers or {}
    if n_verify > 1:
        _check_speculative(config, objects)
        trace = PassTrace(trace, n_verify)
    options = {"utility_decay": config.utility_decay, "evictor": config.evictor}
    labels = [s.label for s in config.policies]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ValueError(f"policy {twice[0]!r} is listed twice")
    setups = [_runs(spec, config, trace, objects, options) for spec in config.policies]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=meta.num_tokens, unit="tok", desc="simulate", dynamic_ncols=True)
    offset = 0
    try:
        for chunk in _chunks(trace, config.chunk_tokens):
            experts = np.concatenate([s.experts.numpy().astype(np.int32) for s in chunk], axis=1)  # [L, T, k]
            # with verify passes: T passes, rows their unions; count the generated tokens
            generated = sum(getattr(s, "generated", s.num_tokens) for s in chunk)
            selections = sum(getattr(s, "token_experts", 0) for s in chunk) if n_verify > 1 else None
            for policy, runs in setups:
                plan = None if policy is None else _sequence_plans(policy, chunk, offset)
                for run in runs:
                    run.feed(chunk, experts, plan, offset, generated, selections)
            offset += experts.shape[1]  # rows (tokens, or passes), as the policies count them
            if bar is not None:
                bar.update(generated)
            if on_chunk is not None:
                on_chunk(generated)
        results = [run.result(config.cost) for _, runs in setups for run in runs]
    finally:
        if bar is not None:
            bar.close()
        for _, runs in setups:
            for run in runs:
                run.close()
    return {
        "trace": {**dataclasses.asdict(meta), "layers": list(meta.layers)},
        "config": {
            "capacities": list(config.capacities),
            "policies": labels,
            "mode": config.mode,
            "cost_model": dataclasses.asdict(config.cost),
            "verify_tokens": n_verify,
            "utility_decay": config.utility_decay,
            "grid": [{"layer_ms": a, "bandwidth_gbs": b} for a, b in config.grid()],
            "tiers": None if config.tiers is None else dataclasses.asdict(config.tiers),
        },
        "results": results,
    }


def _check_speculative(config: SimConfig, objects: dict[str, Policy]) -> None:
    """Raises ValueError for a configuration that verify passes (``verify_tokens`` > 1) do not support."""
    n = config.verify_tokens
    for spec in config.policies:
        if not REGISTRY.build(spec.evict, "evict").verify_passes:
            raise ValueError(
                f"--verify-tokens {n}: eviction policy {spec.evict!r} ({spec.label!r}) is not simulated with "
                f"verify passes; use one of {', '.join(REGISTRY.names('evict', verify_passes=True))}, or "
                "--verify-tokens 1"
            )
        pre = spec.prefetch
        if pre is not None and (pre in objects or not REGISTRY.build(pre, "prefetch").verify_passes):
            raise ValueError(
                f"--verify-tokens {n}: prefetcher {pre!r} ({spec.label!r}) is not simulated with verify passes "
                f"(a predictor predicts per token); use {' or '.join(REGISTRY.names('prefetch', verify_passes=True))}"
                ", or --verify-tokens 1"
            )
