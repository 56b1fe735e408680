"""The stepping driver: a trace replayed access by access, calling a policy's hooks where the runtime does.

For each token (or verify pass) t, for each MoE layer l, token-major (``moert.policy.base``)::

    apply(on_prediction(l, logits[l, t] or None))
    apply(on_routed(l, counts, resident))      counts: (E,) selections; resident: (E,) before the call;
                                                prefetch rows into other layers: queued at the router
                                                (the windowed model's ``mid`` copies, after the wait)
    hits = access(l, experts[l, t])             the real C++ SlabCache, simulated
    apply(after_call(l, counts))

``apply`` (:func:`apply_plan`) is what ``CopyEngine.predict`` does: clear, scores, then the prefetch
rows in order. The access pins and demand-loads the call's experts in trace order; a union larger than
the cache streams in waves of at most its slots, resident experts first, then by id (the runtime's
order, ``moert.engine.layer.wave_bounds``, without overlap). Slow and obviously correct: this is the definition
that the fast path (:mod:`moert.sim.fast`) is tested against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from moert.engine.runtime import SlabCache
from moert.policy.base import Plan, Policy, as_numpy

if TYPE_CHECKING:
    from moert.sim.timeline import StepLog
    from moert.trace import SequenceTrace

__all__ = ["Caches", "access", "apply_plan", "selections", "step_sequence"]

MODES = ("per-layer", "global")


class Caches:
    """The simulated caches of one run: one per MoE layer (``per-layer``) or one for all (``global``).

    Args:
        mode: ``per-layer`` or ``global``.
        num_layers: L.
        num_experts: E.
        slots: slots of each cache.
        cache_policy: the C++ victim order.
        slab_bytes: bytes per expert (for the byte counters).
        min_slots: the fewest slots a cache may have (k).
        log: where the drivers log each step's prefetch copies and their first uses (the windowed
            cost model, :mod:`moert.sim.timeline`), or None; the drivers set ``step`` (the global
            step, ``row * L + layer``) and ``row0`` (the first row of the chunk being replayed).
    """

    def __init__(
        self,
        mode: str,
        num_layers: int,
        num_experts: int,
        slots: int,
        cache_policy: str,
        *,
        slab_bytes: int = 1,
        min_slots: int = 1,
        log: StepLog | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; use one of {', '.join(MODES)}")
        self.mode, self.num_layers, self.num_experts, self.slots = mode, num_layers, num_experts, slots
        n, layers = (num_layers, 1) if mode == "per-layer" else (1, num_layers)
        self.caches = [
            SlabCache.simulated(
                layers, num_experts, slots, policy=cache_policy, slab_bytes=slab_bytes, min_slots=min_slots
            )
            for _ in range(n)
        ]
        self.all_ids = np.arange(num_experts, dtype=np.int64)
        self.log, self.step, self.row0 = log, 0, 0
        #: the layer whose router just picked (``on_routed``'s plan): a prefetch into another layer
        #: is logged as queued at that point (``mid``), not at the step's start; None otherwise
        self.routing: int | None = None

    def at(self, layer: int) -> tuple[SlabCache, int]:
        """(cache, layer index inside it) of MoE layer ``layer``."""
        return (self.caches[layer], 0) if self.mode == "per-layer" else (self.caches[0], layer)

    def index(self, layer: int) -> int:
        """Which of ``caches`` holds MoE layer ``layer``."""
        return layer if self.mode == "per-layer" else 0

    def prefetch(self, layer: int, ids: np.ndarray) -> None:
        """Prefetches ``ids`` ((n,) int64, no pads) into ``layer``, logged at ``step`` when logging."""
        cache, cl = self.at(layer)
        if self.log is None:
            cache.sim_prefetch(cl, ids)
            return
        out = cache.replay(
            np.array([cl], dtype=np.int32),
            np.full((1, 1), -1, dtype=np.int32),
            prefetch=ids.astype(np.int32)[None],
            track_prefetch=True,
        )
        mid = self.routing is not None and layer != self.routing
        self.log.issued(
            self.step, self.index(layer), out["prefetch_seq_start"], out["prefetch_queued_per_step"], mid
        )

    def sim_access(self, layer: int, ids: np.ndarray) -> int:
        """One access (at most ``slots`` distinct ids); first uses of prefetches logged at ``step``."""
        cache, cl = self.at(layer)
        if self.log is None:
            return cache.sim_access(cl, ids)
        if np.unique(ids).size > self.slots:  # as sim_access refuses it
            cache.sim_access(cl, ids)
        out = cache.replay(np.array([cl], dtype=np.int32), ids.astype(np.int32)[None], track_prefetch=True)
        used = out["prefetch_used"][0]
        used = used[used >= 0]
        self.log.used(np.full(used.size, self.step), self.index(layer), used)
        return int(out["hits_per_step"][0])

    def stats(self) -> dict[str, int]:
        """The C++ counters summed over the caches."""
        out: dict[str, int] = {}
        for cache in self.caches:
            for key, value in cache.stats().items():
                if isinstance(value, (int, np.integer)):
                    out[key] = out.get(key, 0) + int(value)
        return out

    def close(self) -> None:
        for cache in self.caches:
            cache.close()


def apply_plan(caches: Caches, plan: Plan | None) -> None:
    """Applies ``plan`` as ``CopyEngine.predict`` does: clears, score rows, then prefetch rows in order."""
    if plan is None:
        return
    for layer in plan.clear:
        cache, cl = caches.at(layer)
        cache.set_priority(cl, caches.all_ids, float(plan.clear_score))
    if plan.scores is not None:
        scores = as_numpy(plan.scores, np.float32)  # [n, E]
        for j, layer in enumerate(plan.layers):
            cache, cl = caches.at(layer)
            cache.set_priority(cl, caches.all_ids, scores[j])
    if plan.ids is not None:
        ids = as_numpy(plan.ids, np.int64)  # [n, w]
        for j, layer in enumerate(plan.layers):
            row = ids[j][ids[j] >= 0]
            if row.size:
                caches.prefetch(layer, row)


def access(caches: Caches, layer: int, experts: np.ndarray) -> int:
    """One layer call: pins and demand-loads ``experts`` ((w,) ids, -1 pads; in waves when the union
    exceeds the cache, see the module doc). Returns the hits."""
    cache, cl = caches.at(layer)
    valid = experts[experts >= 0]
    if valid.size <= caches.slots:  # fits: the union is no larger
        return caches.sim_access(layer, valid)
    union = np.unique(valid)
    if union.size <= caches.slots:
        return caches.sim_access(layer, valid)
    resident = cache.resident(cl).numpy()[union]
    union = np.concatenate([union[resident], union[~resident]])
    return sum(
        caches.sim_access(layer, union[w0 : w0 + caches.slots]) for w0 in range(0, union.size, caches.slots)
    )


def selections(experts: np.ndarray, num_experts: int, multiplicity: np.ndarray | None = None) -> np.ndarray:
    """(E,) selections of one call: each valid id once, or ``multiplicity`` times (a verify pass)."""
    valid = experts >= 0
    weights = None if multiplicity is None else multiplicity[valid]
    return np.bincount(experts[valid], weights=weights, minlength=num_experts)


def step_sequence(policy: Policy, caches: Caches, seq: SequenceTrace, token_offset: int) -> np.ndarray:
    """Replays ``seq`` through ``caches`` driving ``policy``'s hooks (see the module doc).

    Args:
        policy: bound (and prepared) for the trace.
        caches: the run's caches, built with ``policy.cache_policy``.
        seq: experts (L, T, w), -1 pads; a ``moert.sim.PassSequence`` carries each entry's multiplicity.
        token_offset: the index of the sequence's first token (or pass) in the whole trace.

    Returns:
        (L, T) int64 hits of every access.
    """
    ex = seq.experts.numpy().astype(np.int64)  # [L, T, w]
    mult: Any = getattr(seq, "multiplicity", None)
    mult = None if mult is None else mult.numpy()
    L, T, _ = ex.shape
    hits = np.zeros((L, T), dtype=np.int64)
    policy.begin_sequence(seq, token_offset)
    logits = policy.sequence_logits(seq)  # [L, T, 1+d, E] or None
    for t in range(T):
        policy.begin_token(t)
        for layer in range(L):
            caches.step = (token_offset + t) * L + layer
            row = ex[layer, t]
            counts = selections(row, caches.num_experts, None if mult is None else mult[layer, t])
            apply_plan(caches, policy.on_prediction(layer, None if logits is None else logits[layer, t]))
            cache, cl = caches.at(layer)
            caches.routing = layer
            apply_plan(caches, policy.on_routed(layer, counts, cache.resident(cl).numpy()))
            caches.routing = None
            hits[layer, t] = access(caches, layer, row)
            caches.step += 1  # a plan after the call is issued for the next step
            apply_plan(caches, policy.after_call(layer, counts))
    policy.end_sequence(seq)
    return hits
