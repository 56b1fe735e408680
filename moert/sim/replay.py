"""Trace-replay simulator: replays routing traces through the real C++ ``SlabCache`` (simulated).

Every token's MoE layers are replayed in order (token-major) through
``runtime.SlabCache.simulated``, the same bookkeeping and eviction code the engine runs, with
loads completing at once. Caches are either one per MoE layer (``per-layer``, the default:
capacity is a fraction of one layer's E, rounded, at least k) or one for all layers (``global``:
a fraction of L * E). Policies are named ``EVICT[+PREFETCH]``: ``lru``, ``lfu``, ``moe-infinity``,
``belady``, ``score`` (see :mod:`moert.policy`), optionally with a prefetcher, e.g. ``lru+oracle``;
``score`` (the runtime's predictor-score eviction) needs a prefetcher that gives scores, e.g.
``score+PRED.safetensors:2``.

Most configurations replay a chunk of tokens per cache in one C++ call. Two go step by step (a few
C++ calls per access, in the order the copy engine applies a prediction; see
:class:`moert.policy.Predictions`): policy ``score``, whose priorities change before every access,
and prefetchers with lookahead, which prefetch into layers other than the accessed one.

A :class:`CostModel` turns the counts into bytes per token and predicted tokens/s (DESIGN.md §1):
bytes per token ``B = ((1 - h) + w) * k * L * S`` gives the bandwidth ceiling ``BW / B``; the
prediction adds compute: prefetched bytes hide behind the layers' compute, demand bytes stall,
``t_token = max(L * t_layer, B_prefetch / BW) + B_demand / BW``. With ``CostModel.cpu_expert_ms`` set
(heterogeneous mode, DESIGN.md §7) each run also counts the demand misses of every (token, layer) step
(from the replay's hits per step; not counted otherwise), and each row adds the prediction when some of
a step's misses are computed on the host CPU instead of copied (:func:`cpu_split`).

Speculative decoding (``SimConfig.verify_tokens = N = gamma + 1``, DESIGN.md §7, MoE-SpAc): each
sequence's tokens are grouped into consecutive verify passes of N tokens (the last one shorter); each MoE
layer of a pass is one call that accesses the union of the pass's experts once (hits and misses counted
per distinct expert, as the runtime counts a layer call). A union larger than a per-layer cache streams in
waves of at most the cache's slots, resident experts first (``moert.engine.offload.wave_bounds`` without
overlap), replayed step by step. Simplifications: every drafted token is accepted (the trace is the
accepted sequence), so no rejected draft token's experts are loaded; the draft model is not simulated
(neither its time nor its memory). Rows count per generated token, so they compare across N: ``tokens``
(generated), ``loads_per_token``, ``bytes_per_token``, and ``token_hit_rate = 1 - demand misses / (tokens
* k)`` (the share of the tokens' expert selections that needed no demand load; equal to ``hit_rate`` at
N = 1); ``hit_rate`` stays per distinct access of a layer call. The cost model charges one verify pass the
compute of one token (see :class:`CostModel`). Supported at N > 1: eviction ``lru``, ``lfu``, ``belady``,
``utility``; prefetchers ``utility[:m]`` and ``oracle``; per-layer or global caches; not the
heterogeneous mode.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from moert.policy import EvictionPolicy, Predictions, Prefetcher, get_eviction_policy, get_prefetcher
from moert.sim.cost import CostModel, cpu_split
from moert.trace import SequenceTrace, Trace, TraceMeta

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "CostModel",
    "PassSequence",
    "PassTrace",
    "PolicySpec",
    "SimConfig",
    "cpu_split",
    "group_verify_passes",
    "num_slots",
    "parse_policies",
    "simulate",
]

MODES = ("per-layer", "global")
#: what a replay with verify passes (``verify_tokens`` > 1) supports
SPECULATIVE_EVICTION = ("lru", "lfu", "belady", "utility")
SPECULATIVE_PREFETCH = ("utility", "oracle")


@dataclass(frozen=True)
class PolicySpec:
    """One simulated configuration: an eviction policy and an optional prefetcher."""

    evict: str
    prefetch: str | None = None

    @property
    def label(self) -> str:
        return self.evict if self.prefetch is None else f"{self.evict}+{self.prefetch}"


def parse_policies(
    names: Iterable[str], prefetch: str | None = None, *, prefetchers: Iterable[str] = ()
) -> list[PolicySpec]:
    """Parses ``EVICT[+PREFETCH]`` names; ``prefetch`` applies to names without their own.

    Args:
        names: e.g. ``["lru", "belady", "lru+oracle"]``.
        prefetch: the prefetcher of names that have none (``None``/``"none"``: demand only).
        prefetchers: extra prefetcher names that will be passed to :func:`simulate` as objects.
    """
    extra = set(prefetchers)
    specs = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        evict, _, pre = name.partition("+")
        scored = get_eviction_policy(evict).predictor_scores  # validates the name
        pre = pre or prefetch
        if pre in ("", "none"):
            pre = None
        if pre is not None and pre not in extra:
            if scored and not get_prefetcher(pre).gives_scores:
                raise ValueError(f"{name!r}: prefetcher {pre!r} gives no scores; {_no_scores_help()}")
            get_prefetcher(pre)
        if scored and pre is None:
            raise ValueError(f"{name!r} has no prefetcher: {_no_scores_help()}")
        specs.append(PolicySpec(evict, pre))
    if not specs:
        raise ValueError("no policies given; e.g. --policy lru,lfu,moe-infinity,belady")
    return specs


def _no_scores_help() -> str:
    from moert.policy.score import NO_SCORES_HELP

    return NO_SCORES_HELP


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
    """

    capacities: tuple[float, ...] = (0.1, 0.25, 0.5)
    policies: tuple[PolicySpec, ...] = field(default_factory=lambda: tuple(parse_policies(["lru"])))
    mode: str = "per-layer"
    cost: CostModel = field(default_factory=CostModel)
    chunk_tokens: int = 8192
    verify_tokens: int = 1
    utility_decay: float = 0.7

    def __post_init__(self) -> None:
        from moert.policy.utility import check_decay

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
        if self.verify_tokens > 1 and self.cost.heterogeneous:
            raise ValueError(
                f"verify_tokens={self.verify_tokens} with cpu_expert_ms: the heterogeneous cost model is for "
                "batch-1 steps; a verify pass computes several rows per CPU expert, which is not modelled. "
                "Drop --cpu-expert-ms or use --verify-tokens 1"
            )
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; use one of {', '.join(MODES)}")
        for c in self.capacities:
            if not 0 < c <= 1:
                raise ValueError(f"capacity {c} must be a fraction in (0, 1]")


def num_slots(capacity: float, meta: TraceMeta, mode: str) -> int:
    """Slots of one cache: ``round(capacity * E)`` per layer (at least k), or of L * E globally."""
    experts = meta.num_experts if mode == "per-layer" else meta.num_experts * meta.num_layers
    return max(meta.top_k, int(round(capacity * experts)))


@dataclass
class PassSequence(SequenceTrace):
    """A sequence grouped into verify passes: ``experts`` (L, P, N * k), each row one pass's union of
    experts, sorted, -1 pads; ``positions`` (P,) of each pass's first token. ``generated``: the tokens of
    the original sequence; ``token_experts``: its valid (token, layer, expert) selections;
    ``multiplicity``: (L, P, N * k) int64, how many of the pass's tokens selected each entry (0 at pads)."""

    generated: int = 0
    token_experts: int = 0
    multiplicity: torch.Tensor | None = None


def group_verify_passes(seq: SequenceTrace, verify_tokens: int) -> PassSequence:
    """Groups a sequence's tokens into consecutive verify passes of ``verify_tokens`` (the last shorter).

    Args:
        seq: experts (L, T, k), -1 pads allowed.
        verify_tokens: N >= 1.

    Returns:
        A :class:`PassSequence` with P = ceil(T / N) passes, experts (L, P, N * k): the distinct experts
        of each layer and pass, ascending, then -1.
    """
    ex = seq.experts.numpy().astype(np.int64)  # [L, T, k]
    L, T, k = ex.shape
    n = verify_tokens
    P = -(-T // n)
    padded = np.full((L, P * n, k), -1, dtype=np.int64)
    padded[:, :T] = ex
    rows = np.sort(padded.reshape(L, P, n * k), axis=-1)  # [L, P, N*k]
    dup = np.zeros(rows.shape, dtype=bool)
    dup[..., 1:] = rows[..., 1:] == rows[..., :-1]
    big = np.iinfo(np.int64).max
    rows = np.sort(np.where(dup | (rows < 0), big, rows), axis=-1)  # distinct ids ascending, then pads
    rows = np.where(rows == big, -1, rows)
    flat = padded.reshape(L, P, n * k)
    mult = (flat[..., None, :] == rows[..., :, None]).sum(-1) * (rows >= 0)  # [L, P, N*k]
    idx = np.arange(P) * n
    return PassSequence(
        seq.seq_id,
        seq.positions[idx].clone(),
        torch.from_numpy(np.ascontiguousarray(rows)),
        seq.is_prefill[idx].clone(),
        generated=T,
        token_experts=int((ex >= 0).sum()),
        multiplicity=torch.from_numpy(mult.astype(np.int64)),
    )


class PassTrace(Trace):
    """A trace whose sequences are grouped into verify passes of N tokens (:func:`group_verify_passes`),
    streamed; ``meta`` is the original trace's (k = experts per token)."""

    def __init__(self, trace: Trace, verify_tokens: int) -> None:
        self._trace, self.verify_tokens = trace, verify_tokens
        self.path: Path = trace.path

    @property
    def meta(self) -> TraceMeta:
        return self._trace.meta

    def sequences(self) -> Iterator[SequenceTrace]:
        for seq in self._trace.sequences():
            yield group_verify_passes(seq, self.verify_tokens)


class _Run:
    """The caches of one (policy, capacity) pair and what they counted."""

    def __init__(
        self,
        spec: PolicySpec,
        capacity: float,
        meta: TraceMeta,
        mode: str,
        cost: CostModel,
        stepwise: bool = False,
        verify_tokens: int = 1,
    ) -> None:
        from moert.engine import runtime

        self.spec, self.capacity, self.mode = spec, capacity, mode
        self.L, self.E, self.k = meta.num_layers, meta.num_experts, meta.top_k
        self.slots = num_slots(capacity, meta, mode)
        policy = get_eviction_policy(spec.evict)
        cpp = policy.cpp_policy
        #: apply the prefetcher's scores and clears (policy ``score``)
        self.predictor_scores = policy.predictor_scores
        #: replay access by access from the prefetcher's Predictions (``score``, or lookahead)
        self.stepwise = stepwise or policy.predictor_scores
        n_caches, layers_per_cache = (self.L, 1) if mode == "per-layer" else (1, self.L)
        self.caches = [
            runtime.SlabCache.simulated(
                layers_per_cache,
                self.E,
                self.slots,
                policy=cpp,
                slab_bytes=cost.expert_bytes,
                min_slots=self.k,
            )
            for _ in range(n_caches)
        ]
        self.hits = np.zeros(self.L, dtype=np.int64)
        self.accesses = np.zeros(self.L, dtype=np.int64)
        self.tokens = 0
        #: tokens per verify pass; passes replayed; the tokens' valid expert selections
        self.verify_tokens = verify_tokens
        self.passes = 0
        self.token_accesses = 0
        self.seconds = 0.0
        #: heterogeneous cost model: count the demand misses of every (token, layer) step
        self.count_steps = cost.heterogeneous
        #: entry n = the steps with n demand misses (grown as needed)
        self.misses_per_step = np.zeros(0, dtype=np.int64)

    def feed(
        self,
        experts: np.ndarray,
        access_prio: np.ndarray | None,
        token_prio: np.ndarray | None,
        prefetch: np.ndarray | None,
        predictions: Predictions | None = None,
        generated: int | None = None,
        token_accesses: int | None = None,
    ) -> None:
        """Replays one chunk. experts (L, T, k) int32; access_prio (L, T, k) f32; token_prio (T, L, E) f32;
        prefetch (L, T, m) int32 (-1 = none); predictions: the prefetcher's, needed when ``stepwise``.
        With verify passes, T counts passes (rows: their unions) and ``generated`` / ``token_accesses``
        the tokens and their expert selections (default: one token per row)."""
        start = time.perf_counter()
        T = experts.shape[1]
        valid = (experts >= 0).sum(axis=(1, 2))  # [L]
        self.passes += T
        self.tokens += T if generated is None else generated
        self.token_accesses += int(valid.sum()) if token_accesses is None else token_accesses
        self.accesses += valid
        distinct = _distinct_counts(experts) if self.count_steps else None  # [L, T]
        if self.verify_tokens > 1 and self.mode == "per-layer":
            self._replay_layers(experts, access_prio, token_prio, prefetch)
        elif self.stepwise:
            if predictions is None:
                raise RuntimeError(
                    f"{self.spec.label}: a step-by-step replay needs the prefetcher's predictions"
                )
            self._steps(experts, access_prio, token_prio, predictions, distinct)
        elif token_prio is None:
            self._replay(experts, access_prio, prefetch, distinct)
        else:
            # Scores change only when the policy's prediction does: set them, then replay every
            # token up to the next change in one C++ call (setting equal scores again is a no-op).
            changed = np.ones(T, dtype=bool)
            changed[1:] = (token_prio[1:] != token_prio[:-1]).any(axis=(1, 2))
            bounds = [*np.flatnonzero(changed).tolist(), T]
            all_ids = np.arange(self.E, dtype=np.int64)
            for a, b in zip(bounds[:-1], bounds[1:]):
                for layer in range(self.L):
                    cache, cl = (
                        (self.caches[layer], 0) if self.mode == "per-layer" else (self.caches[0], layer)
                    )
                    cache.set_priority(cl, all_ids, token_prio[a, layer])
                self._replay(
                    experts[:, a:b],
                    None if access_prio is None else access_prio[:, a:b],
                    None if prefetch is None else prefetch[:, a:b],
                    None if distinct is None else distinct[:, a:b],
                )
        self.seconds += time.perf_counter() - start

    def _replay_layers(
        self,
        experts: np.ndarray,
        access_prio: np.ndarray | None,
        token_prio: np.ndarray | None,
        prefetch: np.ndarray | None,
    ) -> None:
        """Per-layer caches, layer by layer: runs of steps in one C++ replay each, broken where the
        policy's per-token priorities change (set first) and at steps whose union exceeds the cache
        (:meth:`_waves`). experts (L, T, w) distinct ids per row; the rest as in :meth:`feed`."""
        T = experts.shape[1]
        all_ids = np.arange(self.E, dtype=np.int64)
        for layer, cache in enumerate(self.caches):
            ex = experts[layer]  # [T, w]
            pre = None if prefetch is None else prefetch[layer]
            prio = None if access_prio is None else access_prio[layer]
            wave = (ex >= 0).sum(axis=1) > self.slots  # [T]
            changed = np.zeros(T, dtype=bool)
            if token_prio is not None:
                tp = token_prio[:, layer]  # [T, E]
                changed[0] = True
                changed[1:] = (tp[1:] != tp[:-1]).any(axis=1)
            cut = changed | wave
            cut[1:] |= wave[:-1]
            cut[0] = True
            bounds = [*np.flatnonzero(cut).tolist(), T]
            for a, b in zip(bounds[:-1], bounds[1:]):
                if changed[a]:
                    cache.set_priority(0, all_ids, np.ascontiguousarray(tp[a]))
                if wave[a]:
                    self.hits[layer] += self._waves(
                        cache, ex[a], None if pre is None else pre[a], None if prio is None else prio[a]
                    )
                    continue
                out = cache.replay(
                    np.zeros(b - a, dtype=np.int32),
                    np.ascontiguousarray(ex[a:b]),
                    prefetch=None if pre is None else np.ascontiguousarray(pre[a:b]),
                    priorities=None if prio is None else np.ascontiguousarray(prio[a:b]),
                )
                self.hits[layer] += int(out["hits_per_step"].numpy().sum())

    def _waves(self, cache, ex: np.ndarray, pre: np.ndarray | None, prio: np.ndarray | None) -> int:
        """One layer call whose union (w,) exceeds the cache's slots: the prefetch row, then the union
        in waves of at most ``slots``, resident experts first (then by id), as the runtime streams it
        (``moert.engine.offload``, no overlap); then the call's priorities. Returns the hits."""
        if pre is not None and (pre >= 0).any():
            cache.sim_prefetch(0, pre[pre >= 0].astype(np.int64))
        valid = ex >= 0
        union = np.sort(ex[valid]).astype(np.int64)
        resident = cache.resident(0)[union]
        union = np.concatenate([union[resident], union[~resident]])
        hits = 0
        for w0 in range(0, union.size, self.slots):
            hits += cache.sim_access(0, union[w0 : w0 + self.slots])
        if prio is not None:
            cache.set_priority(0, ex[valid].astype(np.int64), np.ascontiguousarray(prio[valid]))
        return hits

    def _cache(self, layer: int):
        """(cache, layer index inside it) of MoE layer ``layer``."""
        return (self.caches[layer], 0) if self.mode == "per-layer" else (self.caches[0], layer)

    def _steps(
        self,
        experts: np.ndarray,
        access_prio: np.ndarray | None,
        token_prio: np.ndarray | None,
        pred: Predictions,
        distinct: np.ndarray | None = None,
    ) -> None:
        """Access by access, token-major: before each access the prediction is applied as the copy
        engine applies one (clear, scores, then each row's prefetch, own layer first), then the access.
        ``distinct`` (L, T): distinct experts of each step, given when misses per step are counted."""
        L, T = experts.shape[0], experts.shape[1]
        if pred.ids.shape[:2] != (T, L):
            raise RuntimeError(f"predictions for {pred.ids.shape[:2]} (T, L) steps, experts for {(T, L)}")
        all_ids = np.arange(self.E, dtype=np.int64)
        n = pred.ids.shape[2]
        scored = self.predictor_scores
        step_hits = np.zeros((L, T), dtype=np.int64)  # [L, T]
        for t in range(T):
            if token_prio is not None:
                for layer in range(L):
                    cache, cl = self._cache(layer)
                    cache.set_priority(cl, all_ids, token_prio[t, layer])
            for layer in range(L):
                rows = min(n, L - layer)  # lookahead past the last layer is ignored
                if scored:
                    clear = pred.clear[t, layer]
                    if not np.isnan(clear):
                        cache, cl = self._cache((layer - 1) % L)
                        cache.set_priority(cl, all_ids, float(clear))
                    for j in range(rows):
                        cache, cl = self._cache(layer + j)
                        cache.set_priority(cl, all_ids, pred.scores[t, layer, j])
                for j in range(rows):
                    ids = pred.ids[t, layer, j]
                    ids = ids[ids >= 0]
                    if ids.size:
                        cache, cl = self._cache(layer + j)
                        cache.sim_prefetch(cl, ids)
                cache, cl = self._cache(layer)
                ex = experts[layer, t]
                valid = ex >= 0
                h = cache.sim_access(cl, ex[valid])
                self.hits[layer] += h
                step_hits[layer, t] = h
                if access_prio is not None:
                    cache.set_priority(cl, ex[valid], access_prio[layer, t][valid])
        if distinct is not None:
            self._count_misses(distinct - step_hits)

    def _count_misses(self, misses: np.ndarray) -> None:
        """Adds demand misses per step (any shape, >= 0) to the histogram ``misses_per_step``."""
        hist = np.bincount(misses.ravel().astype(np.int64))
        if hist.size > self.misses_per_step.size:
            self.misses_per_step = np.pad(self.misses_per_step, (0, hist.size - self.misses_per_step.size))
        self.misses_per_step[: hist.size] += hist

    def _replay(
        self,
        experts: np.ndarray,
        access_prio: np.ndarray | None,
        prefetch: np.ndarray | None,
        distinct: np.ndarray | None = None,
    ) -> None:
        """One C++ replay per cache over (L, T, .) slices, token-major; ``distinct`` (L, T): distinct
        experts of each step, given when misses per step are counted."""
        T = experts.shape[1]
        if self.mode == "per-layer":
            zeros = np.zeros(T, dtype=np.int32)
            for layer, cache in enumerate(self.caches):
                out = cache.replay(
                    zeros,
                    experts[layer],
                    prefetch=None if prefetch is None else prefetch[layer],
                    priorities=None if access_prio is None else access_prio[layer],
                )
                hits = out["hits_per_step"].numpy()  # [T]
                self.hits[layer] += int(hits.sum())
                if distinct is not None:
                    self._count_misses(distinct[layer] - hits)
        else:
            layers = np.tile(np.arange(self.L, dtype=np.int32), T)  # [T*L] token-major
            out = self.caches[0].replay(
                layers,
                _token_major(experts),
                prefetch=None if prefetch is None else _token_major(prefetch),
                priorities=None if access_prio is None else _token_major(access_prio),
            )
            hits = out["hits_per_step"].numpy().reshape(T, self.L)  # [T, L]
            self.hits += hits.sum(0)
            if distinct is not None:
                self._count_misses(distinct.T - hits)

    def result(self, cost: CostModel) -> dict:
        stats: dict[str, int] = {}
        for cache in self.caches:
            for key, value in cache.stats().items():
                if isinstance(value, (int, np.integer)):
                    stats[key] = stats.get(key, 0) + int(value)
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
            "caches": len(self.caches),
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
            "demand_misses": int(stats.get("misses", 0)),
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
        row.update(cost.predict(demand_bpt, prefetch_bpt, self.L, self.verify_tokens))
        if self.count_steps:
            row["demand_misses_per_step"] = self.misses_per_step.tolist()
            row.update(cost.predict_heterogeneous(self.misses_per_step, self.tokens, prefetch_bpt, self.L))
        return row

    def close(self) -> None:
        for cache in self.caches:
            cache.close()


def _distinct_counts(experts: np.ndarray) -> np.ndarray:
    """(L, T, k) expert ids (-1 pads) -> (L, T) int64 distinct valid ids per step (the cache's accesses)."""
    s = np.sort(experts, axis=-1)
    new = s >= 0  # [L, T, k]
    new[..., 1:] &= s[..., 1:] != s[..., :-1]
    return new.sum(axis=-1, dtype=np.int64)


def _token_major(a: np.ndarray) -> np.ndarray:
    """(L, T, w) -> (T * L, w), token-major, contiguous."""
    L, T, w = a.shape
    return np.ascontiguousarray(a.transpose(1, 0, 2)).reshape(T * L, w)


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


def _prefetch_rows(
    prefetcher: Prefetcher, chunk: list[SequenceTrace], meta: TraceMeta, with_predictions: bool
) -> tuple[np.ndarray, Predictions | None]:
    """(L, T, m) prefetch ids of a chunk, and its Predictions when asked for; each sequence's come
    after the earlier ones have ended."""
    rows, preds = [], []
    for s in chunk:
        rows.append(prefetcher.prefetch_sequence(s, meta))
        if with_predictions:
            preds.append(prefetcher.predictions(s, meta))
        prefetcher.end_sequence(s)
    return np.concatenate(rows, axis=1), Predictions.concatenate(preds) if preds else None


def simulate(
    trace: Trace,
    config: SimConfig,
    *,
    progress: bool = False,
    prefetchers: dict[str, Prefetcher] | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> dict:
    """Replays ``trace`` under every (policy, capacity) of ``config``.

    Args:
        trace: any :class:`~moert.trace.Trace` (streamed; ``belady`` reads it once more up front).
        config: capacities, policies, mode, cost model.
        progress: show a progress bar on stderr.
        prefetchers: prefetcher objects by name, overriding the registry (e.g. a trained predictor).
        on_chunk: called with the number of tokens after each replayed chunk.

    Returns:
        ``{"trace": meta fields, "config": ..., "results": [one row per (policy, capacity)]}``; a
        row holds hit rate overall and per layer, demand misses, prefetch hits, wasted prefetch
        bytes, bytes per token, predicted tokens/s, the C++ cache stats and the replay speed.
    """
    meta = trace.meta
    n_verify = int(config.verify_tokens)
    if n_verify > 1:
        _check_speculative(config, prefetchers or {})
        trace = PassTrace(trace, n_verify)
    policies: dict[str, EvictionPolicy] = {}
    pre_objs: dict[str, Prefetcher] = {}
    for spec in config.policies:
        if spec.label in policies:
            raise ValueError(f"policy {spec.label!r} is listed twice")
        policies[spec.label] = get_eviction_policy(spec.evict)
        _set_decay(policies[spec.label], config.utility_decay)
        policies[spec.label].prepare(trace)
        if spec.prefetch is not None and spec.prefetch not in pre_objs:
            pre_objs[spec.prefetch] = (prefetchers or {}).get(spec.prefetch) or get_prefetcher(spec.prefetch)
            _set_decay(pre_objs[spec.prefetch], config.utility_decay)
            pre_objs[spec.prefetch].prepare(meta)
        if policies[spec.label].predictor_scores:
            if spec.prefetch is None:
                raise ValueError(f"{spec.label!r} has no prefetcher: {_no_scores_help()}")
            if not pre_objs[spec.prefetch].gives_scores:
                raise ValueError(
                    f"{spec.label!r}: prefetcher {spec.prefetch!r} gives no scores; {_no_scores_help()}"
                )
    # Predictions (step-by-step replay) where a policy scores by them or a prefetcher looks ahead
    stepwise = {
        name: p.lookahead > 0
        or any(s.prefetch == name and policies[s.label].predictor_scores for s in config.policies)
        for name, p in pre_objs.items()
    }
    runs = {
        spec.label: [
            _Run(
                spec,
                c,
                meta,
                config.mode,
                config.cost,
                stepwise=spec.prefetch is not None and pre_objs[spec.prefetch].lookahead > 0,
                verify_tokens=n_verify,
            )
            for c in config.capacities
        ]
        for spec in config.policies
    }
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
            predicted = {name: _prefetch_rows(p, chunk, meta, stepwise[name]) for name, p in pre_objs.items()}
            for spec in config.policies:
                policy = policies[spec.label]
                access, per_token, base = [], [], offset
                for s in chunk:
                    policy.begin_sequence(s, base)
                    access.append(policy.access_priorities(s))
                    per_token.append(policy.token_priorities(s) if policy.per_token else None)
                    policy.end_sequence(s)
                    base += s.num_tokens
                access_prio = None if access[0] is None else np.concatenate(access, axis=1)
                token_prio = None if per_token[0] is None else np.concatenate(per_token, axis=0)
                pre, plan = (None, None) if spec.prefetch is None else predicted[spec.prefetch]
                for run in runs[spec.label]:
                    run.feed(experts, access_prio, token_prio, pre, plan, generated, selections)
            n = generated
            offset += experts.shape[1]  # rows (tokens, or passes), as the policies count them
            if bar is not None:
                bar.update(n)
            if on_chunk is not None:
                on_chunk(n)
        results = [run.result(config.cost) for spec_runs in runs.values() for run in spec_runs]
    finally:
        if bar is not None:
            bar.close()
        for spec_runs in runs.values():
            for run in spec_runs:
                run.close()
    return {
        "trace": {**dataclasses.asdict(meta), "layers": list(meta.layers)},
        "config": {
            "capacities": list(config.capacities),
            "policies": [s.label for s in config.policies],
            "mode": config.mode,
            "cost_model": dataclasses.asdict(config.cost),
            "verify_tokens": n_verify,
            "utility_decay": config.utility_decay,
        },
        "results": results,
    }


def _set_decay(obj: EvictionPolicy | Prefetcher, decay: float) -> None:
    """Gives ``utility`` policies and prefetchers the configured moving-average decay."""
    from moert.policy.utility import UtilityPolicy, UtilityPrefetcher

    if isinstance(obj, (UtilityPolicy, UtilityPrefetcher)):
        obj.decay = decay


def _check_speculative(config: SimConfig, prefetchers: dict[str, Prefetcher]) -> None:
    """Raises ValueError for a configuration that verify passes (``verify_tokens`` > 1) do not support."""
    n = config.verify_tokens
    for spec in config.policies:
        if spec.evict not in SPECULATIVE_EVICTION:
            raise ValueError(
                f"--verify-tokens {n}: eviction policy {spec.evict!r} ({spec.label!r}) is not simulated with "
                f"verify passes; use one of {', '.join(SPECULATIVE_EVICTION)}, or --verify-tokens 1"
            )
        pre = spec.prefetch
        if pre is not None and (pre in prefetchers or pre.partition(":")[0] not in SPECULATIVE_PREFETCH):
            raise ValueError(
                f"--verify-tokens {n}: prefetcher {pre!r} ({spec.label!r}) is not simulated with verify passes "
                "(a predictor predicts per token); use utility[:m] or oracle, or --verify-tokens 1"
            )


def result_table(report: dict) -> str:
    """A Markdown table of a :func:`simulate` report: one row per policy, hit rate per capacity, tok/s."""
    caps = report["config"]["capacities"]
    rows: dict[str, dict[float, dict]] = {}
    for r in report["results"]:
        rows.setdefault(r["policy"], {})[r["capacity"]] = r
    slots = {r["capacity"]: r["slots_per_cache"] for r in report["results"]}
    head = (
        ["policy"]
        + [f"hit rate @{c:g} ({slots.get(c)} slots)" for c in caps]
        + [f"tok/s @{c:g}" for c in caps]
    )
    speculative = report["config"].get("verify_tokens", 1) > 1
    if speculative:
        head += [f"token hit rate @{c:g}" for c in caps] + [f"loads/token @{c:g}" for c in caps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for policy, by_cap in rows.items():
        hit = [f"{by_cap[c]['hit_rate']:.3f}" if c in by_cap else "" for c in caps]
        tok = [f"{by_cap[c]['predicted_tok_s']:.1f}" if c in by_cap else "" for c in caps]
        if speculative:
            tok += [f"{by_cap[c]['token_hit_rate']:.3f}" if c in by_cap else "" for c in caps]
            tok += [f"{by_cap[c]['loads_per_token']:.2f}" if c in by_cap else "" for c in caps]
        lines.append("| " + " | ".join([policy, *hit, *tok]) + " |")
    if any("cpu_predicted_tok_s" in r for r in report["results"]):
        lines += ["", heterogeneous_table(report).rstrip("\n")]
    return "\n".join(lines) + "\n"


def heterogeneous_table(report: dict) -> str:
    """Markdown: per policy and capacity, tok/s copy only and with CPU experts, the share of demand misses
    computed on the CPU and the demand MB per token kept off PCIe."""
    caps = report["config"]["capacities"]
    rows: dict[str, dict[float, dict]] = {}
    for r in report["results"]:
        if "cpu_predicted_tok_s" in r:
            rows.setdefault(r["policy"], {})[r["capacity"]] = r
    head = ["policy"]
    for what in ("tok/s copy", "tok/s +CPU", "misses on CPU", "MB/token saved"):
        head += [f"{what} @{c:g}" for c in caps]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def cell(r: dict | None, key: str, fmt: str) -> str:
        return "" if r is None or r.get(key) is None else format(r[key], fmt)

    for policy, by_cap in rows.items():
        cells = [policy]
        cells += [cell(by_cap.get(c), "predicted_tok_s", ".1f") for c in caps]
        cells += [cell(by_cap.get(c), "cpu_predicted_tok_s", ".1f") for c in caps]
        cells += [cell(by_cap.get(c), "cpu_miss_share", ".1%") for c in caps]
        cells += [
            "" if c not in by_cap else f"{by_cap[c]['cpu_bytes_saved_per_token'] / 1e6:.0f}" for c in caps
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
