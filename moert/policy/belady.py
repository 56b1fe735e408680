"""Belady's optimal offline eviction, driven through the C++ ``priority`` policy.

After each access, every accessed expert gets the score ``-(step of its next use)``, so the
cache evicts the unpinned entry used furthest in the future (never again first). Steps count
token-major over the whole trace, ``step = t * L + l``, which orders uses correctly both for one
global cache and for per-layer caches (within one layer it is the order of ``t``).

This is the optimum for any demand-only cache of that capacity (no prefetch), hence the upper
bound every demand policy is measured against. It needs the future: :meth:`Belady.prepare` reads
the whole trace once and keeps one float32 per (token, layer, k) in memory. Scores are float32,
exact up to 2^24 steps (~640k tokens of a 26-layer model); beyond that ties can cost a little.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from moert.policy.base import EvictionPolicy

if TYPE_CHECKING:
    from moert.trace import SequenceTrace, Trace

__all__ = ["Belady", "NEVER", "next_use"]

#: Score of an expert that is never used again (finite: the C++ cache rejects inf).
NEVER = -1.0e30


def next_use(experts: np.ndarray) -> np.ndarray:
    """Next token at which each (layer, expert) is used again.

    Args:
        experts: (N, L, k) integer expert ids of N tokens (or verify passes), token-major; -1 pads
            (their entries are meaningless).

    Returns:
        (N, L, k) int64: for entry (t, l, j), the smallest t' > t whose layer-l experts include
        ``experts[t, l, j]``, or -1 when there is none.
    """
    N, L, k = experts.shape
    t = np.broadcast_to(np.arange(N)[:, None, None], experts.shape).reshape(-1)
    layer = np.broadcast_to(np.arange(L)[None, :, None], experts.shape).reshape(-1)
    # ids shifted by one so that -1 pads (grouped verify passes) never share a key with a real expert
    key = layer.astype(np.int64) * (int(experts.max(initial=0)) + 2) + experts.reshape(-1) + 1
    order = np.lexsort((t, key))  # grouped by (layer, expert), then by time
    sk, st = key[order], t[order]
    nxt_sorted = np.full(sk.shape, -1, dtype=np.int64)
    same = sk[1:] == sk[:-1]
    nxt_sorted[:-1][same] = st[1:][same]
    out = np.empty_like(nxt_sorted)
    out[order] = nxt_sorted
    return out.reshape(N, L, k)


class Belady(EvictionPolicy):
    """Optimal offline eviction (needs the whole trace; see the module doc)."""

    name = "belady"
    cpp_policy = "priority"

    def __init__(self) -> None:
        self._scores: np.ndarray | None = None  # (N, L, k) float32
        self._offset = 0

    def prepare(self, trace: Trace) -> None:
        experts = np.concatenate(
            [s.experts.permute(1, 0, 2).numpy().astype(np.int32) for s in trace.sequences()]
        )  # [N, L, k]
        L = experts.shape[1]
        nxt = next_use(experts)
        step = nxt * L + np.arange(L)[None, :, None]
        self._scores = np.where(nxt >= 0, -step.astype(np.float64), NEVER).astype(np.float32)

    def begin_sequence(self, seq: SequenceTrace, token_offset: int) -> None:
        self._offset = token_offset

    def access_priorities(self, seq: SequenceTrace) -> np.ndarray:
        if self._scores is None:
            raise RuntimeError("Belady.prepare(trace) must run before the replay")
        T = seq.num_tokens
        block = self._scores[self._offset : self._offset + T]  # [T, L, k]
        if block.shape[0] != T:
            raise RuntimeError("Belady: the trace yielded different sequences than during prepare()")
        return np.ascontiguousarray(block.transpose(1, 0, 2))  # [L, T, k]
