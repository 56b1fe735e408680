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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from moert.policy.base import EvictionPolicy, Prefetcher, TokenContext

if TYPE_CHECKING:
    from moert.trace import SequenceTrace, Trace, TraceMeta

__all__ = ["MoEInfinity", "MoEInfinityPrefetcher", "activation_matrix"]


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


class MoEInfinity(EvictionPolicy):
    """Activation-matrix matching (see the module doc).

    Args:
        capacity: the most EAMs kept in the collection (oldest dropped first).
    """

    name = "moe-infinity"
    cpp_policy = "priority"
    per_token = True

    def __init__(self, capacity: int = 512) -> None:
        if capacity < 1:
            raise ValueError(f"MoEInfinity capacity={capacity} must be >= 1")
        self.capacity = capacity
        self._size = 0  # EAMs in the collection
        self._next = 0  # ring position of the next one
        self._counts = self._keys = self._ratios = self._aggregate = torch.zeros(0)

    def prepare(self, trace: Trace) -> None:
        self.reset(trace.meta.num_layers, trace.meta.num_experts)

    def reset(self, num_layers: int, num_experts: int) -> None:
        """Empties the collection for a trace of ``num_layers`` MoE layers with ``num_experts`` experts."""
        L, E = num_layers, num_experts
        self._num_experts = E
        self._size = self._next = 0
        self._counts = torch.zeros(self.capacity, L, E)  # ring buffer of EAMs (counts)
        self._keys = torch.zeros(self.capacity, L * E)  # the same, flattened and L2-normalized
        self._ratios = torch.zeros(self.capacity, L, E)  # per-layer activation ratios
        self._aggregate = torch.zeros(L, E)  # sum of the collection

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
        L = seq.experts.shape[0]
        decay = 1.0 - torch.arange(L, dtype=torch.float32) / (L + 1)  # [L], distance from layer 0
        return (self.predicted_ratios(seq) * decay[None, :, None]).numpy()

    def end_sequence(self, seq: SequenceTrace) -> None:
        counts = activation_matrix(seq.experts, self._num_experts)  # [L, E]
        i = self._next
        self._aggregate += counts - self._counts[i]  # the slot's old EAM (zeros while filling) leaves
        self._counts[i] = counts
        self._keys[i] = torch.nn.functional.normalize(counts.reshape(-1), dim=0)
        self._ratios[i] = _row_ratios(counts)
        self._next = (i + 1) % self.capacity
        self._size = min(self._size + 1, self.capacity)


def _row_ratios(counts: torch.Tensor) -> torch.Tensor:
    """(L, E) counts -> (L, E) per-layer activation ratios (rows sum to 1, or 0 when empty)."""
    return counts / counts.sum(-1, keepdim=True).clamp_min(1.0)


class MoEInfinityPrefetcher(Prefetcher):
    """MoE-Infinity's prefetch side: before each layer, the ``width`` experts of that layer with the
    highest activation ratio in the best-matching earlier request's EAM (see :class:`MoEInfinity`;
    the same matching, the same no-leakage rule). Experts never activated in the match are not
    prefetched.

    Args:
        width: experts prefetched per layer (default: top-k of the trace).
        capacity: the most EAMs kept in the collection.
    """

    name = "moe-infinity"

    def __init__(self, width: int = 0, capacity: int = 512) -> None:
        self.width = width
        self._matcher = MoEInfinity(capacity=capacity)
        self._cached_seq: SequenceTrace | None = None
        self._cached = torch.zeros(0)

    def prepare(self, meta: TraceMeta) -> None:
        super().prepare(meta)
        self._matcher.reset(meta.num_layers, meta.num_experts)

    def _top(self, seq: SequenceTrace) -> torch.Tensor:
        """(T, L, m) predicted ids of ``seq`` (-1 = none), computed once per sequence."""
        if self._cached_seq is not seq:
            top = self._matcher.predicted_ratios(seq).topk(self.width, dim=-1)  # [T, L, m]
            self._cached = torch.where(top.values > 0, top.indices, -1)
            self._cached_seq = seq
        return self._cached

    def prefetch(self, layer: int, ctx: TokenContext) -> torch.Tensor:
        ids = self._top(ctx.seq)[ctx.t, layer]
        return ids[ids >= 0]

    def prefetch_sequence(self, seq: SequenceTrace, meta: TraceMeta) -> np.ndarray:
        return self._top(seq).permute(1, 0, 2).contiguous().numpy().astype(np.int32)  # [L, T, m]

    def end_sequence(self, seq: SequenceTrace) -> None:
        self._matcher.end_sequence(seq)
        self._cached_seq = None
