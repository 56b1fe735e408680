"""The oracle prefetcher: before each access it prefetches exactly the experts that access needs.

It reads the future from the trace, so it is the ceiling for any prefetcher: every access hits
(when the prefetch finds a slot), no prefetch is wasted, and the bytes moved are the misses the
cache would have had, moved ahead of time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from moert.policy.base import Prefetcher, TokenContext

if TYPE_CHECKING:
    import torch

    from moert.trace import SequenceTrace, TraceMeta

__all__ = ["OraclePrefetcher"]


class OraclePrefetcher(Prefetcher):
    """Prefetches the true expert set of the coming access (see the module doc)."""

    name = "oracle"

    def prefetch(self, layer: int, ctx: TokenContext) -> torch.Tensor:
        return ctx.seq.experts[layer, ctx.t]

    def prefetch_sequence(self, seq: SequenceTrace, meta: TraceMeta) -> np.ndarray:
        return seq.experts.numpy().astype(np.int32)  # [L, T, k]
