"""MoE-SpAc's utility (DESIGN.md §7, "utility (speculative)"): eviction and prefetch in one score space.

The utility of expert ``e`` of MoE layer ``l`` is an exponential moving average of how many times
``e`` was selected in each of the layer's past calls (a call = one token at autoregressive decode, one
verify pass of gamma + 1 tokens under speculative decoding, where the count is a frequency in
``0 .. gamma + 1`` rather than a 0/1 bit)::

    u_l(e) <- decay * u_l(e) + (1 - decay) * count of e in the call       (after every call of layer l)

Eviction ``utility`` pushes u as the C++ cache's ``priority`` (lowest evicted first, ties by
recency) after each call; the prefetcher ``utility[:m]`` prefetches, after a call of layer l (while
the draft model runs, before the next verify pass), the top-(k+m) experts of layer l by u that are
not resident (the cache skips resident ones). Both use only past calls.

How the simulator applies them, without pushing all E priorities after every call (the same order,
so the same victims): between two calls every u of a layer is multiplied by the same ``decay``, which
changes no order; so the priority pushed is ``log u + c * log(1/decay)`` with ``c`` the calls since
the start of the current sequence, which changes only for the experts the call selected
(:meth:`UtilityPolicy.access_priorities`). At each sequence start every priority is rebased (``c = 0``)
by :meth:`UtilityPolicy.token_priorities`, which keeps the float32 priorities exact to ~1e-6 relative.
An expert never selected has u = 0 and the lowest priority (:data:`NEVER`). A verify pass's counts come
from ``moert.sim.PassSequence.multiplicity`` (the pass's union alone would give 0/1).

One global cache compares layers: there the pushed priority of every layer carries the same clock
(calls of the pass so far), so a layer that already ran in the current pass is compared with one yet to
run as if both had decayed the same number of passes (per-layer caches are exact either way).

The prefetcher's rows are applied right before the layer's next call (``Prefetcher`` contract): in a
per-layer cache nothing else touches the layer's cache in between, so that is the same as right
after the call; in one global cache the other layers' calls of the pass come first.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from moert.policy.base import EvictionPolicy, Prefetcher

if TYPE_CHECKING:
    from moert.trace import SequenceTrace, Trace, TraceMeta

__all__ = ["DEFAULT_DECAY", "NEVER", "UtilityPolicy", "UtilityPrefetcher", "check_decay", "utility_scan"]

#: Default weight of the past in the moving average.
DEFAULT_DECAY = 0.7
#: Priority of an expert with utility 0 (finite: the C++ cache rejects inf).
NEVER = -1.0e30


def check_decay(decay: float) -> float:
    """Returns ``decay`` as a float, or raises ValueError naming the fix."""
    if not (isinstance(decay, (int, float)) and math.isfinite(decay) and 0 < decay < 1):
        raise ValueError(
            f"utility decay={decay!r} must be a number in (0, 1): the weight of the past in the moving "
            "average of expert counts (e.g. --utility-decay 0.7)"
        )
    return float(decay)


def call_counts(experts: np.ndarray, num_experts: int, multiplicity: np.ndarray | None = None) -> np.ndarray:
    """How many times each expert is selected per call.

    Args:
        experts: (L, T, w) integer expert ids of T calls, -1 pads.
        num_experts: E.
        multiplicity: (L, T, w) how many tokens of the call selected each entry (a verify pass's union,
            ``moert.sim.PassSequence``), or None: each entry once.

    Returns:
        (T, L, E) float64 counts.
    """
    L, T, _ = experts.shape
    ex = np.asarray(experts, dtype=np.int64)
    valid = ex >= 0
    t = np.broadcast_to(np.arange(T)[None, :, None], ex.shape)[valid]
    layer = np.broadcast_to(np.arange(L)[:, None, None], ex.shape)[valid]
    flat = (t * L + layer) * num_experts + ex[valid]
    weights = None if multiplicity is None else np.asarray(multiplicity, dtype=np.float64)[valid]
    return (
        np.bincount(flat, weights=weights, minlength=T * L * num_experts)
        .astype(np.float64)
        .reshape(T, L, num_experts)
    )


def utility_scan(
    experts: np.ndarray, u0: np.ndarray, decay: float, multiplicity: np.ndarray | None = None
) -> np.ndarray:
    """Utility after each call.

    Args:
        experts: (L, T, w) expert ids of T consecutive calls per layer, -1 pads.
        u0: (L, E) float64 utility before the first of them.
        decay: weight of the past.
        multiplicity: (L, T, w) tokens of the call that selected each entry, or None (once each).

    Returns:
        (T + 1, L, E) float64: entry 0 is ``u0``, entry ``t + 1`` the utility after call ``t``.
    """
    counts = call_counts(experts, u0.shape[1], multiplicity)  # [T, L, E]
    out = np.empty((counts.shape[0] + 1, *u0.shape), dtype=np.float64)
    out[0] = u0
    for t in range(counts.shape[0]):
        out[t + 1] = decay * out[t] + (1.0 - decay) * counts[t]
    return out


class _UtilityState:
    """The running utility (L, E) shared by a sequence's calls; advanced at each sequence's end."""

    def __init__(self) -> None:
        self.decay = DEFAULT_DECAY
        self.u: np.ndarray | None = None
        self._pending: tuple[SequenceTrace, np.ndarray] | None = None

    def reset(self, num_layers: int, num_experts: int) -> None:
        self.u = np.zeros((num_layers, num_experts), dtype=np.float64)
        self._pending = None

    def scan(self, seq: SequenceTrace) -> np.ndarray:
        """(T + 1, L, E) utility before each call of ``seq`` (and after its last), cached per sequence."""
        if self.u is None:
            raise RuntimeError("utility: prepare() must run before the replay")
        if self._pending is None or self._pending[0] is not seq:
            mult = getattr(seq, "multiplicity", None)  # a verify pass's counts (moert.sim.PassSequence)
            mult = None if mult is None else mult.numpy()
            self._pending = (seq, utility_scan(seq.experts.numpy(), self.u, self.decay, mult))
        return self._pending[1]

    def advance(self, seq: SequenceTrace) -> None:
        self.u = self.scan(seq)[-1]
        self._pending = None


def _priorities(u: np.ndarray, calls: np.ndarray | int, decay: float) -> np.ndarray:
    """``log u + calls * log(1/decay)`` as float32, :data:`NEVER` where u == 0 (see the module doc)."""
    with np.errstate(divide="ignore"):
        p = np.log(u) + np.asarray(calls, dtype=np.float64) * -math.log(decay)
    return np.where(u > 0, p, NEVER).astype(np.float32)


class _UtilityDecay:
    """The ``decay`` of a policy or prefetcher that keeps a ``_UtilityState`` (validated on set)."""

    _state: _UtilityState

    @property
    def decay(self) -> float:
        return self._state.decay

    @decay.setter
    def decay(self, value: float) -> None:
        self._state.decay = check_decay(value)


class UtilityPolicy(_UtilityDecay, EvictionPolicy):
    """Evicts the lowest utility first, ties by recency (see the module doc).

    Args:
        decay: weight of the past in the moving average, in (0, 1).
    """

    name = "utility"
    cpp_policy = "priority"
    per_token = True

    def __init__(self, decay: float = DEFAULT_DECAY) -> None:
        self._state = _UtilityState()
        self.decay = decay

    def prepare(self, trace: Trace) -> None:
        self._state.reset(trace.meta.num_layers, trace.meta.num_experts)

    def token_priorities(self, seq: SequenceTrace) -> np.ndarray:
        """(T, L, E): every row the utility at the sequence's start (rebased; set once per sequence)."""
        u = self._state.scan(seq)  # [T + 1, L, E]
        row = _priorities(u[0], 0, self.decay)  # [L, E]
        return np.broadcast_to(row[None], (seq.num_tokens, *row.shape))

    def access_priorities(self, seq: SequenceTrace) -> np.ndarray:
        """(L, T, w): the utility of each selected expert right after its call (rebased to the sequence)."""
        u = self._state.scan(seq)[1:]  # [T, L, E] after each call
        ex = seq.experts.numpy().astype(np.int64)  # [L, T, w]
        L, T, _ = ex.shape
        after = u.transpose(1, 0, 2)  # [L, T, E]
        got = np.take_along_axis(after, np.maximum(ex, 0), axis=2)  # [L, T, w]
        calls = np.arange(1, T + 1)[None, :, None]
        return np.where(ex >= 0, _priorities(got, calls, self.decay), 0.0).astype(np.float32)

    def end_sequence(self, seq: SequenceTrace) -> None:
        self._state.advance(seq)


class UtilityPrefetcher(_UtilityDecay, Prefetcher):
    """Before each call of a layer, the top-(k + m) experts of that layer by utility (only those with
    utility > 0; the most useful first); the cache skips the resident ones.

    Args:
        extra: m, how many beyond k.
        decay: weight of the past in the moving average, in (0, 1).
    """

    name = "utility"

    def __init__(self, extra: int = 0, decay: float = DEFAULT_DECAY) -> None:
        if not (isinstance(extra, int) and extra >= 0):
            raise ValueError(f"utility prefetcher: m={extra!r} must be an integer >= 0 (e.g. utility:2)")
        self.extra = extra
        self._state = _UtilityState()
        self.decay = decay

    def prepare(self, meta: TraceMeta) -> None:
        self.width = min(meta.top_k + self.extra, meta.num_experts)
        self._state.reset(meta.num_layers, meta.num_experts)

    def prefetch_sequence(self, seq: SequenceTrace, meta: TraceMeta) -> np.ndarray:
        """(L, T, k + m) int32: row t from the utility after calls 0 .. t-1 (and earlier sequences)."""
        before = self._state.scan(seq)[:-1]  # [T, L, E] before each call
        order = np.argsort(-before, axis=2, kind="stable")[..., : self.width]  # [T, L, w] ties: lower id
        top = np.take_along_axis(before, order, axis=2)
        ids = np.where(top > 0, order, -1).astype(np.int32)
        return np.ascontiguousarray(ids.transpose(1, 0, 2))  # [L, T, w]

    def end_sequence(self, seq: SequenceTrace) -> None:
        self._state.advance(seq)
