"""``EVICT+PREFETCH``: two policies as one, each rule written once in its own file.

The eviction part gives the cache's victim order and its priorities; the prefetch part gives the
experts to prefetch. At every hook both parts are asked (same arguments); the plan applied is the
eviction part's priorities, then the prefetch part's ids (:meth:`Plan.merge`), so ``lru+oracle`` and
``belady+oracle`` prefetch the same ids. Under ``score`` (``uses_prediction_scores``) the prefetch
part's scores and clears are kept too: that is what ``score`` evicts by. The fast path merges the two
parts' :class:`SequencePlan` the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from moert.policy.base import Plan, Policy, SequencePlan

if TYPE_CHECKING:
    import torch

    from moert.trace import SequenceTrace, Trace

__all__ = ["Combination"]


class Combination(Policy):
    """``evict`` orders eviction, ``prefetch`` prefetches (see the module doc)."""

    roles = ()

    def __init__(self, evict: Policy, prefetch: Policy) -> None:
        self.evict, self.prefetch = evict, prefetch
        self.name = f"{evict.name}+{prefetch.name}"
        self.cache_policy = evict.cache_policy
        self.offline = evict.offline or prefetch.offline
        self.fast_path = (
            evict.fast_path and prefetch.fast_path and not getattr(evict, "plans_before_access", False)
        )
        self.verify_passes = evict.verify_passes and prefetch.verify_passes
        self._scored = evict.uses_prediction_scores

    def _merge(self, evict: Plan | None, prefetch: Plan | None) -> Plan | None:
        first = None if evict is None else evict.priorities_only()
        then = prefetch if prefetch is None or self._scored else prefetch.prefetch_only()
        return Plan.merge(first, then)

    def bind(self, num_layers: int, num_experts: int, top_k: int) -> None:
        super().bind(num_layers, num_experts, top_k)
        self.evict.bind(num_layers, num_experts, top_k)
        self.prefetch.bind(num_layers, num_experts, top_k)

    def set_context(self, **context: Any) -> None:
        self.evict.set_context(**context)
        self.prefetch.set_context(**context)

    def acts_on(self, hook: str) -> bool:
        return self.evict.acts_on(hook) or self.prefetch.acts_on(hook)

    def on_prediction(self, layer: int, logits: Any = None, kernel_plan: Any = None) -> Plan | None:
        return self._merge(
            self.evict.on_prediction(layer, logits, kernel_plan),
            self.prefetch.on_prediction(layer, logits, kernel_plan),
        )

    def on_routed(self, layer: int, counts: np.ndarray, resident: np.ndarray) -> Plan | None:
        return self._merge(
            self.evict.on_routed(layer, counts, resident), self.prefetch.on_routed(layer, counts, resident)
        )

    def after_call(self, layer: int, counts: np.ndarray) -> Plan | None:
        return self._merge(self.evict.after_call(layer, counts), self.prefetch.after_call(layer, counts))

    def prepare(self, trace: Trace) -> None:
        self.evict.prepare(trace)
        self.prefetch.prepare(trace)

    def begin_sequence(self, seq: SequenceTrace, token_offset: int) -> None:
        self.evict.begin_sequence(seq, token_offset)
        self.prefetch.begin_sequence(seq, token_offset)

    def begin_token(self, t: int) -> None:
        self.evict.begin_token(t)
        self.prefetch.begin_token(t)

    def sequence_logits(self, seq: SequenceTrace) -> torch.Tensor | None:
        logits = self.prefetch.sequence_logits(seq)
        return self.evict.sequence_logits(seq) if logits is None else logits

    def sequence_plan(self, seq: SequenceTrace) -> SequencePlan:
        e, p = self.evict.sequence_plan(seq), self.prefetch.sequence_plan(seq)
        if e.before is not None:
            raise NotImplementedError(f"{self.name}: an eviction part that plans before each access")
        before = p.before
        if before is not None and not self._scored:
            before = before.ids_only()
        return SequencePlan(e.token_scores, before, e.access_scores, e.after_scores, p.after_ids)

    def end_sequence(self, seq: SequenceTrace) -> None:
        self.evict.end_sequence(seq)
        self.prefetch.end_sequence(seq)
