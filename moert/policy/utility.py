"""MoE-SpAc's utility (DESIGN.md §7): eviction and prefetch in one score space.

The utility of expert ``e`` of MoE layer ``l`` is an exponential moving average of how many times
``e`` was selected in each of the layer's past calls (a call = one token at autoregressive decode, one
verify pass of gamma + 1 tokens under speculative decoding, where the count is a frequency in
``0 .. gamma + 1`` rather than a 0/1 bit)::

    u_l(e) <- decay * u_l(e) + (1 - decay) * count of e in the call       (after every call of layer l)

Hook ``after_call`` (runtime and simulator): after each call of layer l, the plan replaces the layer's E
priorities by ``u_l`` as float32 (C++ ``priority``: lowest evicted first, ties by recency) and, with a
prefetch width ``k + m`` (``utility:m``, or the runtime's ``overprovision=m``), prefetches the layer's
top-(k+m) experts by u with u > 0, most useful first, ties to the lower id (the cache skips resident
and in-flight ones), for the layer's next call: the copy runs while the other layers (and the draft
model) run. Both use only past calls.

Fast path (:meth:`Utility.sequence_plan`): :func:`utility_scan` computes the same u after every call of
a sequence at once (the same float64 operations, so the same bits), and the simulator applies the rows
access by access. As ``EVICT`` only its priorities count, as ``PREFETCH`` only its ids
(``utility+utility:2`` = both).

The simulator before this contract pushed ``float32(log u + c * log(1/decay))`` for the accessed experts
only (c: calls since the sequence start), which orders experts as u does up to rounding, but in one
global cache compared a layer that already ran in the current pass with one yet to run as if the latter
had decayed once more (u against decay * u'), and applied the prefetch right before the layer's next
call instead of after its call; it now replays what the runtime pushes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from moert.policy.base import Plan, Policy, SequencePlan

if TYPE_CHECKING:
    from moert.trace import SequenceTrace

__all__ = ["DEFAULT_DECAY", "Utility", "call_counts", "check_decay", "utility_scan"]

#: Default weight of the past in the moving average.
DEFAULT_DECAY = 0.7


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


def top_ids(u: np.ndarray, width: int) -> np.ndarray:
    """(..., E) utility -> (..., width) int32: the most useful experts with u > 0, ties to the lower id, -1 pads."""
    order = np.argsort(-u, axis=-1, kind="stable")[..., :width]
    top = np.take_along_axis(u, order, axis=-1)
    return np.where(top > 0, order, -1).astype(np.int32)


class Utility(Policy):
    """MoE-SpAc's utility: priorities and prefetches from one moving average (see the module doc).

    Args:
        extra: m: after each call prefetch the layer's top-(k + m) experts by utility; None: prefetch nothing.
        decay: weight of the past in the moving average, in (0, 1).
    """

    name = "utility"
    cache_policy = "priority"
    roles = ("evict", "prefetch")
    fast_path = True
    verify_passes = True
    arg_help = "[:m]"

    def __init__(self, extra: int | None = None, decay: float = DEFAULT_DECAY) -> None:
        if extra is not None and (isinstance(extra, bool) or not isinstance(extra, int) or extra < 0):
            raise ValueError(f"utility prefetcher: m={extra!r} must be an integer >= 0 (e.g. utility:2)")
        self.extra = extra
        self.decay = check_decay(decay)
        self.width = 0
        self.utility = np.zeros((0, 0), dtype=np.float64)
        self._pending: np.ndarray | None = None

    @classmethod
    def from_spec(
        cls, arg: str | None, *, role: str, utility_decay: float = DEFAULT_DECAY, **options
    ) -> Utility:
        if role == "evict":
            super().from_spec(arg, role=role)  # no argument
            return cls(None, utility_decay)
        if arg is not None and not arg.isdigit():
            raise ValueError(f"prefetcher 'utility:{arg}': m must be an integer >= 0, e.g. utility:2")
        return cls(int(arg) if arg else 0, utility_decay)

    def bind(self, num_layers: int, num_experts: int, top_k: int) -> None:
        super().bind(num_layers, num_experts, top_k)
        self.width = 0 if self.extra is None else min(num_experts, top_k + self.extra)
        self.utility = np.zeros((num_layers, num_experts), dtype=np.float64)  # [L, E]
        self._pending = None

    def after_call(self, layer: int, counts: np.ndarray) -> Plan:
        """Updates the layer's utility with the call's counts (E,); its priorities, then its prefetch."""
        u = self.utility[layer]
        u *= self.decay
        u += (1.0 - self.decay) * np.asarray(counts, dtype=np.float64)
        ids = top_ids(u, self.width)[None] if self.width else None
        return Plan((layer,), ids, u.astype(np.float32)[None])

    def sequence_plan(self, seq: SequenceTrace) -> SequencePlan:
        mult = getattr(seq, "multiplicity", None)  # a verify pass's counts (moert.sim.PassSequence)
        scan = utility_scan(
            seq.experts.numpy(), self.utility, self.decay, None if mult is None else mult.numpy()
        )
        after = scan[1:]  # [T, L, E] after each call
        self._pending = scan[-1]
        return SequencePlan(
            after_scores=after.astype(np.float32),
            after_ids=top_ids(after, self.width) if self.width else None,
        )

    def end_sequence(self, seq: SequenceTrace) -> None:
        if self._pending is not None:  # the fast path: advance as the steps would have
            self.utility, self._pending = self._pending, None
