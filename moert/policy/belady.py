"""Belady's optimal offline eviction, driven through the C++ ``priority`` policy.

After each access, every accessed expert gets the score ``-(step of its next use)``, so the
cache evicts the unpinned entry used furthest in the future (never again first). Steps count
token-major over the whole trace, ``step = t * L + l``, which orders uses correctly both for one
global cache and for per-layer caches (within one layer it is the order of ``t``).

This is the optimum for any demand-only cache of that capacity (no prefetch), hence the upper
bound every demand policy is measured against. It needs the future: :meth:`Belady.prepare` reads
the whole trace once and keeps one float32 per (token, layer, k) in memory. Scores are float32,
exact up to 2^24 steps (~640k tokens of a 26-layer model); beyond that ties can cost a little.

Hook: ``after_call`` (simulator only: ``offline``). A plan replaces a layer's E priorities, so the
policy keeps the row it last pushed per layer and changes only the accessed experts' entries: the
other experts keep what the cache already holds for them. Fast path: the same scores as
``access_scores`` (the C++ replay sets the accessed experts' priorities after each step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from moert.policy.base import Plan, Policy, SequencePlan

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


class Belady(Policy):
    """Optimal offline eviction (needs the whole trace; see the module doc)."""

    name = "belady"
    cache_policy = "priority"
    offline = True
    fast_path = True
    verify_passes = True

    def __init__(self) -> None:
        self._scores: np.ndarray | None = None  # (N, L, k) float32
        self._experts: np.ndarray | None = None  # (N, L, k) int32
        self._offset = self._t = 0

    def bind(self, num_layers: int, num_experts: int, top_k: int) -> None:
        super().bind(num_layers, num_experts, top_k)
        self._pushed = np.zeros((num_layers, num_experts), dtype=np.float32)  # [L, E] as in the cache

    def prepare(self, trace: Trace) -> None:
        experts = np.concatenate(
            [s.experts.permute(1, 0, 2).numpy().astype(np.int32) for s in trace.sequences()]
        )  # [N, L, k]
        L = experts.shape[1]
        nxt = next_use(experts)
        step = nxt * L + np.arange(L)[None, :, None]
        self._experts = experts
        self._scores = np.where(nxt >= 0, -step.astype(np.float64), NEVER).astype(np.float32)

    def begin_sequence(self, seq: SequenceTrace, token_offset: int) -> None:
        self._offset = token_offset

    def begin_token(self, t: int) -> None:
        self._t = t

    def _block(self, seq: SequenceTrace) -> np.ndarray:
        if self._scores is None:
            raise RuntimeError("Belady.prepare(trace) must run before the replay")
        T = seq.num_tokens
        block = self._scores[self._offset : self._offset + T]  # [T, L, k]
        if block.shape[0] != T:
            raise RuntimeError("Belady: the trace yielded different sequences than during prepare()")
        return block

    def after_call(self, layer: int, counts: np.ndarray) -> Plan:
        assert self._scores is not None and self._experts is not None, "Belady.prepare(trace) must run first"
        i = self._offset + self._t
        ex = self._experts[i, layer]  # [k] the step's experts, as prepare() saw them
        valid = ex >= 0
        if not np.array_equal(np.flatnonzero(np.asarray(counts) > 0), np.unique(ex[valid])):
            raise RuntimeError(f"Belady: step {i} of layer {layer} is not the one prepare() saw")
        self._pushed[layer, ex[valid]] = self._scores[i, layer][valid]
        return Plan(layers=(layer,), scores=self._pushed[layer : layer + 1].copy())

    def sequence_plan(self, seq: SequenceTrace) -> SequencePlan:
        block = self._block(seq)  # [T, L, k]
        return SequencePlan(access_scores=np.ascontiguousarray(block.transpose(1, 0, 2)))  # [L, T, k]
