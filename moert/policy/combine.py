"""``EVICT+PREFETCH``: two policies as one, each rule written once in its own file.

The eviction part gives the cache's victim order and its priorities; the prefetch part gives the
experts to prefetch. At every hook both parts are asked (same arguments); the plan applied is the
eviction part's priorities, then the prefetch part's ids (:meth:`Plan.merge`), so ``lru+oracle`` and
``belady+oracle`` prefetch the same ids. Under ``score`` (``uses_prediction_scores``) the prefetch
part's scores and clears are kept too: that is what ``score`` evicts by. The fast path merges the two
parts' :class:`SequencePlan` the same way.

A prefetch part that orders its victims as the eviction part does (``moert.policy.budget``) is handed
the eviction part (``use_evictor``) and sees its plan at every hook before it plans
(``observe_evict_plan``). A prefetch into a later layer merged with the eviction part's priorities of
this one carries the later layer's priorities as the prefetch part mirrors them (``priority_rows``:
unchanged). Stepped in the simulator, an eviction part that plans before each access from the routing
alone (``learned``) makes a sequence's rows at its start (its fast path) and they are served call by call.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from moert.policy.base import Plan, Policy, SequencePlan, as_numpy

if TYPE_CHECKING:
    import torch

    from moert.trace import SequenceTrace, Trace

__all__ = ["Combination"]

#: stepped ``learned`` rows of a sequence by (model file, sequence, offset, sequences before it)
_SEQUENCE_ROWS: dict[tuple, np.ndarray] = {}


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
        self._observe: Any = None
        self._rows: Any = None  # simulator: the eviction part's on_routed rows of the sequence
        self._t = 0

    def _evict_plan(self, plan: Plan | None) -> Plan | None:
        """The eviction part's plan of a hook, shown to a prefetch part that reads the victim order."""
        if self._observe is not None:
            self._observe(plan)
        return plan

    def _merge(self, evict: Plan | None, prefetch: Plan | None) -> Plan | None:
        first = None if evict is None else evict.priorities_only()
        then = prefetch if prefetch is None or self._scored else prefetch.prefetch_only()
        if first is not None and first.scores is not None and then is not None and then.ids is not None:
            extra = [layer for layer in then.layers if layer not in first.layers]
            rows = getattr(self.prefetch, "priority_rows", None)
            if extra and rows is not None:  # a prefetch into a later layer: carry its priorities unchanged
                scores = np.concatenate([as_numpy(first.scores, np.float32), rows(extra)])
                first = Plan((*first.layers, *extra), None, scores, first.clear, first.clear_score)
        return Plan.merge(first, then)

    def bind(self, num_layers: int, num_experts: int, top_k: int) -> None:
        super().bind(num_layers, num_experts, top_k)
        use = getattr(self.prefetch, "use_evictor", None)
        if use is not None:  # the budget orders and values victims as the eviction part does
            use(self.evict)
        self.evict.bind(num_layers, num_experts, top_k)
        self.prefetch.bind(num_layers, num_experts, top_k)
        self._observe = getattr(self.prefetch, "observe_evict_plan", None)
        self._rows: Any = None

    def set_context(self, **context: Any) -> None:
        self.evict.set_context(**context)
        self.prefetch.set_context(**context)

    def acts_on(self, hook: str) -> bool:
        return self.evict.acts_on(hook) or self.prefetch.acts_on(hook)

    def on_prediction(self, layer: int, logits: Any = None, kernel_plan: Any = None) -> Plan | None:
        first = self._evict_plan(self.evict.on_prediction(layer, logits, kernel_plan))
        return self._merge(first, self.prefetch.on_prediction(layer, logits, kernel_plan))

    def on_routed(self, layer: int, counts: np.ndarray, resident: np.ndarray) -> Plan | None:
        if self._rows is not None:  # the eviction part's rows of this sequence, made at its start
            first = Plan((layer,), scores=self._rows[self._t, layer : layer + 1])
        else:
            first = self.evict.on_routed(layer, counts, resident)
        return self._merge(self._evict_plan(first), self.prefetch.on_routed(layer, counts, resident))

    def after_call(self, layer: int, counts: np.ndarray) -> Plan | None:
        first = self._evict_plan(self.evict.after_call(layer, counts))
        return self._merge(first, self.prefetch.after_call(layer, counts))

    def prepare(self, trace: Trace) -> None:
        self.evict.prepare(trace)
        self.prefetch.prepare(trace)

    def begin_sequence(self, seq: SequenceTrace, token_offset: int) -> None:
        self.evict.begin_sequence(seq, token_offset)
        self.prefetch.begin_sequence(seq, token_offset)
        self._rows = None
        if getattr(self.evict, "plans_before_access", False) and self.evict.fast_path:
            # stepped (the simulator): ``learned``'s rows depend on the routing only, so its fast path
            # makes the sequence's rows at once (the same numbers as call by call, tested); runs that
            # replay the same sequences in the same order with the same model file share them
            self._seen = getattr(self, "_seen", ()) + (seq.seq_id,)
            path = getattr(self.evict, "path", None)
            stamp = os.stat(path).st_mtime_ns if path is not None else None
            key = (str(path), stamp, seq.seq_id, token_offset, hash(self._seen[:-1]))
            rows = _SEQUENCE_ROWS.get(key) if path is not None else None
            if rows is None:
                rows = self.evict.sequence_plan(seq).before.scores[:, :, 0]  # [T, L, E]
                if path is not None:
                    _SEQUENCE_ROWS[key] = rows
            self._rows = rows

    def begin_token(self, t: int) -> None:
        self.evict.begin_token(t)
        self.prefetch.begin_token(t)
        self._t = t

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
        self._rows = None
        self.evict.end_sequence(seq)
        self.prefetch.end_sequence(seq)
