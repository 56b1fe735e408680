"""MoE-Infinity's activation-aware caching, driven through the C++ ``priority`` policy.

As MoE-Infinity (Xue et al., arXiv 2401.14361) describes it: every finished request leaves an
expert activation matrix (EAM, ``(L, E)`` counts of how often each expert of each layer was
selected). The collection (EAMC) keeps the most recent ``capacity`` of them. While a request runs,
its partial EAM (counts of the tokens seen so far) is matched against the collection by cosine
similarity; the best match's per-layer activation ratios predict which experts the request will
use, and those predictions, scaled by a layer-distance decay ``1 - d / (L + 1)``, are the cache
priorities (lowest evicted first; ties by least recent use).

Choices made here, where the paper leaves room:
- The match is refreshed once per token, from the counts of all earlier tokens of the request
  (per layer inside a token would cost L times more for little change).
- Before the first token (empty partial EAM) the prediction is the sum of the whole collection;
  with an empty collection (the first request) every score is 0 and the cache behaves as LRU.
- Layer distance ``d`` is measured from the token's first MoE layer (``d = l``): priorities are
  set once per token. With per-layer caches only the order inside a layer matters, so the decay
  has no effect there; it matters for one global cache.
- No leakage: only earlier, finished requests enter the collection, and a request's own counts
  are used only for tokens before the one being served.

One class, both roles: as ``EVICT`` (``moe-infinity``) it sets every layer's priorities before a
token's first layer; as ``PREFETCH`` (``lru+moe-infinity``) it prefetches, before each layer, the
``width`` experts of that layer with the highest activation ratio in the best match (experts never
activated there are not prefetched). Hook: ``on_prediction`` without logits (simulator only: it needs
request boundaries, ``offline``). Rows are computed once per sequence from the counts of its earlier
tokens (causal), for stepping and for the fast path alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moert.policy.base import Plan, Policy, Predictions, SequencePlan

if TYPE_CHECKING:
    from moert.trace import SequenceTrace

__all__ = ["MoEInfinity", "activation_matrix"]


def activation_matrix(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Counts of each expert's selections.

    Args:
        experts: (L, T, k) expert ids.
        num_experts: E.

    Returns:
        (L, E) float32 counts.
    """
    L = experts.shape[0]
    counts = torch.zeros(L, num_experts, dtype=torch.float32)
    counts.scatter_add_(1, experts.reshape(L, -1).long(), torch.ones(L, experts[0].numel()))
    return counts


class MoEInfinity(Policy):
    """Activation-matrix matching (see the module doc).

    Args:
        capacity: the most EAMs kept in the collection (oldest dropped first).
        evict: push the matched ratios as priorities (role ``EVICT``).
        width: experts prefetched per layer (role ``PREFETCH``); 0: none; None: the trace's top-k.
    """

    name = "moe-infinity"
    cache_policy = "priority"
    roles = ("evict", "prefetch")
    offline = True
    fast_path = True

    def __init__(self, capacity: int = 512, *, evict: bool = True, width: int | None = 0) -> None:
        if capacity < 1:
            raise ValueError(f"MoEInfinity capacity={capacity} must be >= 1")
        self.capacity, self.evict, self.width = capacity, evict, width
        self._size = 0  # EAMs in the collection
        self._next = 0  # ring position of the next one
        self._counts = self._keys = self._ratios = self._aggregate = torch.zeros(0)
        self._seq: SequenceTrace | None = None
        self._rows: tuple[np.ndarray | None, np.ndarray | None] | None = None
        self._t = 0

    @classmethod
    def from_spec(cls, arg: str | None, *, role: str, **options: Any) -> MoEInfinity:
        super().from_spec(arg, role=role)  # no argument
        return cls(evict=role == "evict", width=None if role == "prefetch" else 0)

    def bind(self, num_layers: int, num_experts: int, top_k: int) -> None:
        """Empties the collection for a trace of ``num_layers`` MoE layers with ``num_experts`` experts."""
        super().bind(num_layers, num_experts, top_k)
        L, E = num_layers, num_experts
        self._num_experts = E
        self._size = self._next = 0
        self._counts = torch.zeros(self.capacity, L, E)  # ring buffer of EAMs (counts)
        self._keys = torch.zeros(self.capacity, L * E)  # the same, flattened and L2-normalized
        self._ratios = torch.zeros(self.capacity, L, E)  # per-layer activation ratios
        self._aggregate = torch.zeros(L, E)  # sum of the collection
        self._seq, self._rows = None, None

    def predicted_ratios(self, seq: SequenceTrace) -> torch.Tensor:
        """(T, L, E) float32: per token, the per-layer activation ratios of the best-matching EAM."""
        L, T, _ = seq.experts.shape
        E = self._num_experts
        if self._size == 0:
            return torch.zeros(T, L, E)
        onehot = torch.zeros(T, L, E)
        onehot.scatter_(2, seq.experts.permute(1, 0, 2).long(), 1.0)
        partial = torch.cumsum(onehot, 0) - onehot  # [T, L, E] partial EAM: counts of tokens < t
        flat = torch.nn.functional.normalize(partial.reshape(T, L * E), dim=1)
        best = (flat @ self._keys[: self._size].T).argmax(1)  # [T] most similar earlier request
        pred = self._ratios[best]  # [T, L, E]
        pred[0] = _row_ratios(self._aggregate)  # nothing of this request seen yet
        return pred

    def token_priorities(self, seq: SequenceTrace) -> np.ndarray:
        """(T, L, E) float32: the matched ratios scaled by the layer-distance decay."""
        L = seq.experts.shape[0]
        decay = 1.0 - torch.arange(L, dtype=torch.float32) / (L + 1)  # [L], distance from layer 0
        return (self.predicted_ratios(seq) * decay[None, :, None]).numpy()

    def _sequence_rows(self, seq: SequenceTrace) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(token priorities (T, L, E) or None, prefetch ids (T, L, m) or None), once per sequence."""
        if self._rows is None or self._seq is not seq:
            prio = self.token_priorities(seq) if self.evict else None
            ids = None
            width = self.top_k if self.width is None else self.width
            if width:
                top = self.predicted_ratios(seq).topk(width, dim=-1)  # [T, L, m]
                ids = torch.where(top.values > 0, top.indices, -1).numpy().astype(np.int32)
            self._seq, self._rows = seq, (prio, ids)
        return self._rows

    def begin_sequence(self, seq: SequenceTrace, token_offset: int) -> None:
        self._seq, self._rows = seq, None

    def begin_token(self, t: int) -> None:
        self._t = t

    def on_prediction(self, layer: int, logits: Any = None, kernel_plan: Any = None) -> Plan | None:
        assert self._seq is not None, "MoEInfinity: begin_sequence must run first"
        prio, ids = self._sequence_rows(self._seq)
        scores = None
        if prio is not None and layer == 0:  # every layer's priorities, before the token's first layer
            scores = Plan(tuple(range(self.num_layers)), scores=prio[self._t])
        fetch = None if ids is None else Plan((layer,), ids=ids[self._t, layer][None])
        return Plan.merge(scores, fetch)

    def sequence_plan(self, seq: SequenceTrace) -> SequencePlan:
        prio, ids = self._sequence_rows(seq)
        before = None if ids is None else Predictions(ids[:, :, None, :])
        return SequencePlan(token_scores=prio, before=before)

    def end_sequence(self, seq: SequenceTrace) -> None:
        counts = activation_matrix(seq.experts, self._num_experts)  # [L, E]
        i = self._next
        self._aggregate += counts - self._counts[i]  # the slot's old EAM (zeros while filling) leaves
        self._counts[i] = counts
        self._keys[i] = torch.nn.functional.normalize(counts.reshape(-1), dim=0)
        self._ratios[i] = _row_ratios(counts)
        self._next = (i + 1) % self.capacity
        self._size = min(self._size + 1, self.capacity)
        self._seq, self._rows = None, None


def _row_ratios(counts: torch.Tensor) -> torch.Tensor:
    """(L, E) counts -> (L, E) per-layer activation ratios (rows sum to 1, or 0 when empty)."""
    return counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
