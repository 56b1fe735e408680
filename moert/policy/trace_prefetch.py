"""``TracePrefetcher``: the base of simulator prefetchers that predict from the trace's history.

Subclass it and implement :meth:`TracePrefetcher.prefetch`: before the access of MoE layer ``layer``
for token ``ctx.t`` it returns the experts of that layer to prefetch, reading only what
:class:`~moert.policy.base.TokenContext` calls honest (the history, the token, the layer's hidden row).
Then pass an instance to ``moert.sim.simulate(..., policies={"NAME": obj})`` and name it in
``EVICT+NAME``. Hook: ``on_prediction`` without logits (the simulator's stepping driver calls it before
every access); fast path: :meth:`TracePrefetcher.prefetch_sequence` (default: ``prefetch`` for every
step; override it with a vectorised version, and the simulator's tests check that it agrees).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moert.policy.base import Plan, Policy, Predictions, SequencePlan, TokenContext, as_id_list

if TYPE_CHECKING:
    from moert.trace import SequenceTrace, Trace, TraceMeta

__all__ = ["TracePrefetcher"]


class TracePrefetcher(Policy):
    """Prefetches ``prefetch(layer, ctx)`` before every access; ``width``: the most ids per call (0: k)."""

    name = "trace-prefetcher"
    roles = ("prefetch",)
    offline = True
    fast_path = True
    width = 0

    def prepare(self, trace: Trace) -> None:
        self.meta: TraceMeta = trace.meta
        if self.width <= 0:
            self.width = trace.meta.top_k

    def prefetch(self, layer: int, ctx: TokenContext) -> Sequence[int] | torch.Tensor:
        """Expert ids of MoE layer index ``layer`` to prefetch before its access for token ``ctx.t``."""
        raise NotImplementedError

    def begin_sequence(self, seq: SequenceTrace, token_offset: int) -> None:
        self._seq = seq

    def begin_token(self, t: int) -> None:
        self._t = t

    def _row(self, seq: SequenceTrace, t: int, layer: int) -> np.ndarray:
        """(width,) int32: ``prefetch``'s ids for (t, layer), -1 pads."""
        ids = as_id_list(self.prefetch(layer, TokenContext(seq, t, layer, self.meta)))
        if len(ids) > self.width:
            raise ValueError(
                f"prefetcher {self.name!r} returned {len(ids)} experts, more than its width {self.width}"
            )
        row = np.full(self.width, -1, dtype=np.int32)
        row[: len(ids)] = ids
        return row

    def on_prediction(self, layer: int, logits: Any = None, kernel_plan: Any = None) -> Plan:
        return Plan((layer,), ids=self._row(self._seq, self._t, layer)[None])

    def prefetch_sequence(self, seq: SequenceTrace) -> np.ndarray:
        """(L, T, width) int32 expert ids to prefetch before each access, -1 = none."""
        L, T = seq.experts.shape[0], seq.experts.shape[1]
        out = np.full((L, T, self.width), -1, dtype=np.int32)
        for t in range(T):
            for layer in range(L):
                out[layer, t] = self._row(seq, t, layer)
        return out

    def sequence_plan(self, seq: SequenceTrace) -> SequencePlan:
        return SequencePlan(before=Predictions.from_rows(self.prefetch_sequence(seq)))
