"""Interfaces of simulator policies: eviction policies that drive the C++ cache, and prefetchers.

An :class:`EvictionPolicy` never picks victims itself: the C++ ``SlabCache`` does, by its
``lru``, ``lfu`` or ``priority`` policy. Python policies only push scores for ``priority``:
either after each access (:meth:`EvictionPolicy.access_priorities`, e.g. Belady's next use, which
the C++ replay loop applies) or before each token (:meth:`EvictionPolicy.token_priorities`, e.g.
MoE-Infinity's matched activation matrix).

A :class:`Prefetcher` is asked, before the access of MoE layer ``layer`` for token ``ctx.t``,
which experts of that layer to prefetch. A learned predictor implements ``prefetch``; the
simulator calls ``prefetch_sequence`` (default: ``prefetch`` for every layer and token).

A prefetcher that predicts like the runtime's hook (``moert.engine.prefetch.Prefetcher``) also gives
:class:`Predictions`: per access, prefetch rows for the layer and the layers after it (lookahead)
and the eviction scores of policy ``score``. The simulator replays those step by step, in the
order the copy engine applies a prediction (csrc/include/moert/copy_engine.h, "Predictions").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from moert.trace import SequenceTrace, Trace, TraceMeta

__all__ = ["EvictionPolicy", "Predictions", "Prefetcher", "StaticPolicy", "TokenContext"]


class EvictionPolicy:
    """Base class. ``cpp_policy`` is the C++ policy the cache runs (``lru``, ``lfu``, ``priority``)."""

    name: str = "base"
    cpp_policy: str = "lru"
    #: True when :meth:`token_priorities` must be applied before every token (Python-driven loop).
    per_token: bool = False
    #: True when the priorities are the prefetcher's predicted scores (:class:`Predictions`), as in
    #: the runtime's policy ``score``: the policy then needs a prefetcher with ``gives_scores``.
    predictor_scores: bool = False

    def prepare(self, trace: Trace) -> None:
        """Called once before the replay (e.g. Belady scans the whole trace for next uses)."""

    def begin_sequence(self, seq: SequenceTrace, token_offset: int) -> None:
        """Called before a sequence; ``token_offset`` is its first token's index in the whole trace."""

    def access_priorities(self, seq: SequenceTrace) -> np.ndarray | None:
        """(L, T, k) float32 scores set for the accessed experts right after each access, or None."""
        return None

    def token_priorities(self, seq: SequenceTrace) -> np.ndarray | None:
        """(T, L, E) float32 scores of every expert, set before each token's accesses, or None.

        Row ``t`` may use only what was known before token ``t``: earlier tokens of this sequence
        and earlier sequences.
        """
        return None

    def end_sequence(self, seq: SequenceTrace) -> None:
        """Called after a sequence (e.g. to learn from it)."""


class StaticPolicy(EvictionPolicy):
    """A C++ policy used as is (``lru``, ``lfu``): nothing is pushed from Python."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cpp_policy = name


@dataclass(frozen=True)
class TokenContext:
    """What a prefetcher may look at before layer ``layer`` of token ``t`` of ``seq``.

    The sequence object holds the whole routing (it is a trace); an honest predictor reads only
    :meth:`history`, the token itself, and the hidden row of the current layer.
    """

    seq: SequenceTrace
    t: int
    layer: int
    meta: TraceMeta

    @property
    def token_id(self) -> int | None:
        return None if self.seq.token_ids is None else int(self.seq.token_ids[self.t])

    @property
    def token(self) -> str | None:
        return None if self.seq.tokens is None else self.seq.tokens[self.t]

    @property
    def hidden(self) -> torch.Tensor | None:
        """(H,) fp16 normalized pre-attention row of this layer and token, when the trace has it."""
        return None if self.seq.hidden is None else self.seq.hidden[self.layer, self.t]

    def history(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(earlier tokens' experts (L, t, k), this token's experts of earlier layers (layer, k))."""
        return self.seq.experts[:, : self.t], self.seq.experts[: self.layer, self.t]


@dataclass(frozen=True)
class Predictions:
    """What a predicting prefetcher asks of the cache before every access of one sequence.

    Before the access of MoE layer ``l`` for token ``t``, in this order (the copy engine's order
    for one prediction): every expert of layer ``(l - 1) % L`` gets the priority ``clear[t, l]``
    (NaN: nothing is cleared); the E priorities of layer ``l + j`` become ``scores[t, l, j]``; then
    ``ids[t, l, j]`` are prefetched into layer ``l + j``, for ``j = 0 .. n-1`` with ``l + j < L``
    (rows past the last layer are ignored). Priorities are applied only under an eviction policy
    with ``predictor_scores``; the prefetches always.

    Attributes:
        ids: (T, L, n, w) int32 expert ids, most likely first, -1 pads.
        scores: (T, L, n, E) float32 eviction priorities (lowest evicted first).
        clear: (T, L) float32 priority of the layer that just ran, or NaN.
    """

    ids: np.ndarray
    scores: np.ndarray
    clear: np.ndarray

    def __post_init__(self) -> None:
        T, L, n, _ = self.ids.shape
        if self.scores.shape[:3] != (T, L, n) or self.clear.shape != (T, L):
            raise ValueError(
                f"Predictions: ids {self.ids.shape}, scores {self.scores.shape} and clear {self.clear.shape} "
                "must be (T, L, n, w), (T, L, n, E) and (T, L)"
            )

    @property
    def lookahead(self) -> int:
        """d: rows per access beyond the accessed layer's own."""
        return self.ids.shape[2] - 1

    def own_rows(self) -> np.ndarray:
        """(L, T, w) int32: the prefetch ids of each access's own layer (what ``prefetch_sequence`` gives)."""
        return np.ascontiguousarray(self.ids[:, :, 0].transpose(1, 0, 2))

    @staticmethod
    def concatenate(parts: Sequence[Predictions]) -> Predictions:
        """The predictions of consecutive sequences as one (tokens concatenated)."""
        return Predictions(
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.clear for p in parts]),
        )


class Prefetcher:
    """Base class of prefetch hooks; ``width`` is the most experts one call returns (``m``).

    ``lookahead`` (d > 0: :meth:`predictions` also prefetches layers l+1..l+d) and ``gives_scores``
    (its :meth:`predictions` carry eviction scores for policy ``score``) are False/0 here.
    """

    name: str = "base"
    width: int = 0
    lookahead: int = 0
    gives_scores: bool = False

    def prepare(self, meta: TraceMeta) -> None:
        """Called once before the replay."""
        if self.width <= 0:
            self.width = meta.top_k

    def prefetch(self, layer: int, ctx: TokenContext) -> Sequence[int] | torch.Tensor:
        """Expert ids of MoE layer index ``layer`` to prefetch before its access for token ``ctx.t``."""
        raise NotImplementedError

    def prefetch_sequence(self, seq: SequenceTrace, meta: TraceMeta) -> np.ndarray:
        """(L, T, m) int32 expert ids to prefetch before each access, -1 = none."""
        L, T = seq.experts.shape[0], seq.experts.shape[1]
        out = np.full((L, T, self.width), -1, dtype=np.int32)
        for t in range(T):
            for layer in range(L):
                ids = _as_list(self.prefetch(layer, TokenContext(seq, t, layer, meta)))
                if len(ids) > self.width:
                    raise ValueError(
                        f"prefetcher {self.name!r} returned {len(ids)} experts, more than its width {self.width}"
                    )
                out[layer, t, : len(ids)] = ids
        return out

    def predictions(self, seq: SequenceTrace, meta: TraceMeta) -> Predictions:
        """The prefetches of :meth:`prefetch_sequence` as :class:`Predictions` (no scores, no clear)."""
        rows = self.prefetch_sequence(seq, meta)  # [L, T, m]
        L, T, m = rows.shape
        return Predictions(
            np.ascontiguousarray(rows.transpose(1, 0, 2)).reshape(T, L, 1, m),
            np.zeros((T, L, 1, meta.num_experts), dtype=np.float32),
            np.full((T, L), np.nan, dtype=np.float32),
        )

    def end_sequence(self, seq: SequenceTrace) -> None:
        """Called after a sequence."""


def _as_list(ids: Iterable[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return [int(x) for x in ids.reshape(-1).tolist()]
    return [int(x) for x in ids]
