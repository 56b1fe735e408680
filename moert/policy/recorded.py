"""``predictions:DIR``: a peer's recorded predictions replayed as a prefetcher (simulator only).

MoE-Beyond publishes its predictions beside the routing they were made for
(``test_datasets/predicted_csvs/prompt_<n>_data_predicted.csv``, column ``Predicted Expert IDs``).
``moert simulate DIR --policy lru+predictions:DIR`` prefetches, before each (token, layer) access, the
ids recorded for it (``moert.trace.importers.recorded_predictions``, checked against the replayed
trace), so the paper's predictor can be judged by moert's cache and cost model like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from moert.policy.trace_prefetch import TracePrefetcher
from moert.trace.importers import recorded_predictions

if TYPE_CHECKING:
    from moert.policy.base import TokenContext
    from moert.trace import SequenceTrace, Trace

__all__ = ["PREFIX", "RecordedPredictions"]

#: the ``--prefetch`` / ``EVICT+...`` spelling
PREFIX = "predictions:"


class RecordedPredictions(TracePrefetcher):
    """Prefetches the ids recorded for each (token, layer) in a predictions folder.

    Args:
        path: a folder of MoE-Beyond predicted CSVs (or one file); its sequences must be the trace's.
    """

    name = "predictions"

    def __init__(self, path: str) -> None:
        if not path:
            raise ValueError(
                "predictions: needs a folder after the colon, e.g. --prefetch predictions:test_datasets/predicted_csvs"
            )
        self.path = path
        self.name = PREFIX + path
        self._preds: dict[int, Any] = {}

    def prepare(self, trace: Trace) -> None:
        self._preds = recorded_predictions(self.path, trace, num_experts=trace.meta.num_experts)
        widths = {int(p.shape[2]) for p in self._preds.values()}
        self.width = max(widths) if widths else trace.meta.top_k
        super().prepare(trace)

    def prefetch(self, layer: int, ctx: TokenContext) -> np.ndarray:
        row = self._preds[ctx.seq.seq_id][layer, ctx.t].numpy()
        return row[row >= 0]

    def prefetch_sequence(self, seq: SequenceTrace) -> np.ndarray:
        """(L, T, width) int32: the recorded rows, -1 pads."""
        return np.ascontiguousarray(self._preds[seq.seq_id].numpy().astype(np.int32))
