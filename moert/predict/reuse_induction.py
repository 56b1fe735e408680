"""Induction features of the ``reuse`` forecast: what followed the past tokens routed like this one.

Tokens repeat (a name, a code identifier, a list's markup), and a token routed like an earlier one
tends to be followed by what followed that one (an induction over the routing, as induction heads do
over tokens). For layer l at token t (its router has picked), a past token s in the window of
:data:`INDUCTION_WINDOW` tokens *matches* when the pair (s - 1, s) shares at least ``share * m`` of the
experts of the pair (t - 1, t) at layers l, l - 1, ..., l - :data:`INDUCTION_LAYERS` + 1 (the previous
tokens compared with each other and these two with each other, as an induction head matches the
previous token too; m: how many experts the pair (t - 1, t) has there; ``share`` in
:data:`INDUCTION_MATCH`, strict to loose; :data:`INDUCTION_BIGRAM` False compares token t alone).
For each match level and look-ahead n in :data:`INDUCTION_AHEAD`, expert e's feature is the share of
the matching s (with s + n <= t, so the window is in the past) after which e was used at l within
tokens s + 1 .. s + n, shrunk by one pseudo-count; and one column log2(1 + matches) / 8. Everything is
known online: past tokens' routing and token t's at layers <= l. The constants were chosen on the
validation prompts of the shared Puffin traces (README, "Learned eviction toward Belady"): each of the
window, the look-ahead, the layers and the previous token helped a little alone, all four together most.

:class:`InductionState` keeps the window as rings indexed by token (``s % W``): the routing, and per
look-ahead n the experts used within s + 1 .. s + n (filled as the tokens come), so a call costs a
(W, E) mat-vec or two and a product over the matching slots, no per-token loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["INDUCTION_AHEAD", "INDUCTION_BIGRAM", "INDUCTION_LAYERS", "INDUCTION_MATCH", "INDUCTION_WINDOW", "InductionState", "induction_config",
           "num_induction_features"]  # fmt: skip

#: the past tokens looked at (this token and the W - 1 before it; with the previous token, W - 2)
INDUCTION_WINDOW = 1024
#: a past token matches when it shares at least this share of the current token's experts (at the layers
#: compared), strict to loose (descending)
INDUCTION_MATCH = (0.9, 0.7, 0.5)
#: the layers compared: l, l - 1, ..., l - INDUCTION_LAYERS + 1 (those that exist)
INDUCTION_LAYERS = 6
#: the look-ahead after a matching past token (tokens)
INDUCTION_AHEAD = (1, 2, 4, 8, 16, 32)
#: match the previous token too (s - 1 against t - 1), not only s against t
INDUCTION_BIGRAM = True


def num_induction_features() -> int:
    """I: the columns of :meth:`InductionState.features`."""
    return len(INDUCTION_MATCH) * (1 + len(INDUCTION_AHEAD))


def induction_config() -> dict:
    """The constants above (a reuse file records them; another moert's file is refused)."""
    return {"window": INDUCTION_WINDOW, "layers": INDUCTION_LAYERS, "match": list(INDUCTION_MATCH),
            "ahead": list(INDUCTION_AHEAD), "bigram": INDUCTION_BIGRAM}  # fmt: skip


def _rows(layer: int | slice) -> slice:
    return slice(layer, layer + 1) if isinstance(layer, (int, np.integer)) else layer


class InductionState:
    """The window of L layers of E experts (see the module doc).

    Attributes:
        ring: (L, W, E) float64: token s's experts at slot s % W.
        ahead: (L, W, A * E) float64: at slot s % W, block a: the experts used within s + 1 .. s + n_a
            once that window is over (s + n_a <= t), zero before.

    The features of all layers of a token (:meth:`features` of a slice) cost a (W, E) mat-vec per layer
    and token compared (two with the bigram); those of one call, one layer's (the others remembered).
    """

    def __init__(self, num_layers: int, num_experts: int) -> None:
        W = INDUCTION_WINDOW
        self.ring = np.zeros((num_layers, W, num_experts), dtype=np.float64)
        self.ahead = np.zeros((num_layers, W, len(INDUCTION_AHEAD) * num_experts), dtype=np.float64)
        # per layer: the token of its remembered overlaps (-1: none), the overlaps, the sizes (_features_one)
        self._memo_t = np.full(num_layers, -1, dtype=np.int64)
        self._memo = np.zeros((num_layers, W), dtype=np.float64)
        self._memo_size = np.zeros(num_layers, dtype=np.float64)

    def update(self, layer: int | slice, t: np.ndarray, used: np.ndarray) -> None:
        """Token t's call of ``layer`` (or of every layer) used ``used`` ((E,) or (L, E) bool).

        ``t``: the token index (() or (L,) int64, the layer's clock before the call)."""
        W, E = INDUCTION_WINDOW, self.ring.shape[2]
        if isinstance(layer, (int, np.integer)):
            self._update_one(int(layer), int(t), used)
            return
        ring, ahead = self.ring[_rows(layer)], self.ahead[_rows(layer)]  # views [n, W, ...]
        t = np.atleast_1d(t)
        n_idx = np.arange(t.shape[0])
        ring[n_idx, t % W] = np.asarray(used, dtype=np.float64).reshape(t.shape[0], E)
        ahead[n_idx, t % W] = 0.0  # the slot's new token: no window after it is over yet
        for a, n in enumerate(INDUCTION_AHEAD):
            done = n_idx[(t >= n) & (n < W)]  # s = t - n's window s + 1 .. t is over now
            if done.size:
                window = ring[done[:, None], (t[done, None] - np.arange(n)) % W].max(axis=1)  # [d, E]
                ahead[done, (t[done] - n) % W, a * E : (a + 1) * E] = window

    def _update_one(self, layer: int, t: int, used: np.ndarray) -> None:
        """:meth:`update` of one call: the windows that end now, as running maxima over the last rows."""
        W, E = INDUCTION_WINDOW, self.ring.shape[2]
        ring, ahead = self.ring[layer], self.ahead[layer]
        ring[t % W] = used
        ahead[t % W] = 0.0
        window, j = np.zeros(E), 0
        for a, n in enumerate(INDUCTION_AHEAD):
            if t < n or n >= W:
                break
            while j < n:  # the window t - n + 1 .. t
                np.maximum(window, ring[(t - j) % W], out=window)
                j += 1
            ahead[(t - n) % W, a * E : (a + 1) * E] = window

    def features(self, layer: int | slice, t: np.ndarray) -> np.ndarray:
        """(E, I) (or (L, E, I)) float64 after token t's call of ``layer`` (t: () or (L,) its index; the
        layers of a slice at the same token, as :meth:`update` of a whole token leaves them)."""
        if isinstance(layer, (int, np.integer)):
            return self._features_one(int(layer), int(t))
        t = np.atleast_1d(t)
        if t.size and np.any(t != t[0]):
            raise ValueError(f"features of several layers need them at one token, got tokens {np.unique(t)}")
        layers = np.arange(self.ring.shape[0])[_rows(layer)]
        if not layers.size:
            return np.zeros((0, self.ring.shape[2], num_induction_features()))
        t0 = int(t[0])
        overlap, size = self._overlaps(0, layers[-1] + 1, t0)  # every layer up to the last row
        zero = np.zeros((1, overlap.shape[1]))
        run = np.concatenate([zero, np.cumsum(overlap, axis=0)])  # [l + 1]: layers 0..l (integers: exact)
        run_size = np.concatenate([[0.0], np.cumsum(size)])
        lo = np.maximum(layers + 1 - INDUCTION_LAYERS, 0)  # layers lo..l are compared
        return self._from_matches(run[layers + 1] - run[lo], run_size[layers + 1] - run_size[lo], t0, layers)

    def _features_one(self, layer: int, t: int) -> np.ndarray:
        """:meth:`features` of one call. The layers below ran earlier in this token: their overlaps are
        remembered from their own calls (keyed by the token: a layer's next :meth:`update` is the next
        token's), so a call computes one layer's."""
        lo = max(layer + 1 - INDUCTION_LAYERS, 0)
        for j in range(lo, layer + 1):
            if self._memo_t[j] != t:
                overlap, size = self._overlaps(j, j + 1, t)
                self._memo[j], self._memo_size[j], self._memo_t[j] = overlap[0], size[0], t
        overlap, size = self._memo[lo : layer + 1].sum(0), self._memo_size[lo : layer + 1].sum()
        return self._from_matches(overlap[None], size[None], t, [layer])[0]

    def _overlaps(self, lo: int, hi: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Per layer lo..hi - 1: the experts shared by token t and the token at each slot s, plus
        (:data:`INDUCTION_BIGRAM`) those shared by tokens t - 1 and s - 1 ((k, W)); and how many experts
        tokens t (and t - 1) have there ((k,))."""
        W = INDUCTION_WINDOW
        ring = self.ring[lo:hi]  # [k, W, E] a view
        cur = ring[:, t % W]  # [k, E]
        overlap = (ring @ cur[:, :, None])[..., 0]  # [k, W]
        size = cur.sum(-1)
        if INDUCTION_BIGRAM and t >= 1:  # slot s: token t - 1 against token s - 1 (the slot before)
            prev = ring[:, (t - 1) % W]
            overlap += np.roll((ring @ prev[:, :, None])[..., 0], 1, axis=1)
            size = size + prev.sum(-1)
        return overlap, size

    def _from_matches(self, overlap: np.ndarray, size: np.ndarray, t: int, layers: Any) -> np.ndarray:
        """(n, E, I) features of the n rows ``layers`` at token t from their overlaps (n, W) and sizes (n,)."""
        W, E, A = INDUCTION_WINDOW, self.ring.shape[2], len(INDUCTION_AHEAD)
        k = (t - np.arange(W)) % W  # slot j holds token t - k
        past = (k >= 1) & (k <= t) & (k < W - INDUCTION_BIGRAM)  # [W]
        share = np.asarray(INDUCTION_MATCH)[:, None]  # [M, 1]
        over = (k[:, None] >= np.asarray(INDUCTION_AHEAD)).astype(np.float64)  # [W, A]: s + n <= t
        out = np.empty((len(overlap), E, len(INDUCTION_MATCH), A + 1))  # [n, E, M, A + 1]
        for i, layer in enumerate(layers):
            match = (past & (size[i] > 0) & (overlap[i] >= share * size[i])).astype(np.float64)  # [M, W]
            cols = np.flatnonzero(match[-1])  # the loosest level holds every match (shares descend)
            num = (match[:, cols] @ self.ahead[layer, cols]).reshape(
                len(INDUCTION_MATCH), A, E
            )  # not over: 0
            den = 1.0 + match[:, cols] @ over[cols]  # [M, A]
            out[i, :, :, :A] = (num / den[..., None]).transpose(2, 0, 1)
            out[i, :, :, -1] = np.log2(1.0 + match.sum(-1)) / 8.0
        return out.reshape(len(overlap), E, -1)
