"""Induction features of the ``reuse`` forecast: what followed the past tokens routed like this one.

Tokens repeat (a name, a code identifier, a list's markup), and a token routed like an earlier one
tends to be followed by what followed that one (an induction over the routing, as induction heads do
over tokens). For layer l at token t (its router has picked), a past token s in the window of
:data:`INDUCTION_WINDOW` tokens *matches* when it shares at least ``share * m`` of token t's experts at
layers l and l - 1 (m: how many token t has there; ``share`` in :data:`INDUCTION_MATCH`, strict and
loose). For each match level and look-ahead n in :data:`INDUCTION_AHEAD`, expert e's feature is the
share of the matching s (with s + n <= t, so the window is in the past) after which e was used at l
within tokens s + 1 .. s + n, shrunk by one pseudo-count; and one column log2(1 + matches) / 8.
Everything is known online: past tokens' routing and token t's at layers <= l.

:class:`InductionState` keeps the window as rings indexed by token (``s % W``): the routing, and per
look-ahead n the experts used within s + 1 .. s + n (filled as the tokens come), so a call costs a few
(W, E) mat-vecs, no per-token loop.
"""

from __future__ import annotations

import numpy as np

__all__ = ["INDUCTION_AHEAD", "INDUCTION_LAYERS", "INDUCTION_MATCH", "INDUCTION_WINDOW", "InductionState", "induction_config",
           "num_induction_features"]  # fmt: skip

#: the past tokens looked at (this token and the W - 1 before it)
INDUCTION_WINDOW = 256
#: a past token matches when it shares at least this share of the current token's experts (at the layers
#: compared), strict to loose (descending)
INDUCTION_MATCH = (0.9, 0.7, 0.5)
#: the layers compared: l, l - 1, ..., l - INDUCTION_LAYERS + 1 (those that exist)
INDUCTION_LAYERS = 3
#: the look-ahead after a matching past token (tokens)
INDUCTION_AHEAD = (1, 2, 4, 8)


def num_induction_features() -> int:
    """I: the columns of :meth:`InductionState.features`."""
    return len(INDUCTION_MATCH) * (1 + len(INDUCTION_AHEAD))


def induction_config() -> dict:
    """The constants above (a reuse file records them; another moert's file is refused)."""
    return {"window": INDUCTION_WINDOW, "layers": INDUCTION_LAYERS, "match": list(INDUCTION_MATCH),
            "ahead": list(INDUCTION_AHEAD)}  # fmt: skip


def _rows(layer: int | slice) -> slice:
    return slice(layer, layer + 1) if isinstance(layer, (int, np.integer)) else layer


class InductionState:
    """The window of L layers of E experts (see the module doc).

    Attributes:
        ring: (L, W, E) float64: token s's experts at slot s % W.
        ahead: (L, W, A * E) float64: at slot s % W, block a: the experts used within s + 1 .. s + n_a
            once that window is over (s + n_a <= t), zero before.
    """

    def __init__(self, num_layers: int, num_experts: int) -> None:
        W = INDUCTION_WINDOW
        self.ring = np.zeros((num_layers, W, num_experts), dtype=np.float64)
        self.ahead = np.zeros((num_layers, W, len(INDUCTION_AHEAD) * num_experts), dtype=np.float64)

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
        """(E, I) (or (L, E, I)) float64 after token t's call of ``layer`` (t: () or (L,) its index)."""
        if isinstance(layer, (int, np.integer)):
            return self._features_one(int(layer), int(t))
        W, rows, E = INDUCTION_WINDOW, _rows(layer), self.ring.shape[2]
        t = np.atleast_1d(t)
        layers = np.arange(self.ring.shape[0])[rows]  # [n]
        n_idx = np.arange(t.shape[0])
        overlap, size = 0.0, 0.0
        for j in range(INDUCTION_LAYERS):  # layer l - j's rows (none below layer 0)
            ring = self.ring[np.maximum(layers - j, 0)] * (layers >= j)[:, None, None]  # [n, W, E]
            cur = ring[n_idx, t % W]  # [n, E]
            overlap = overlap + (ring @ cur[:, :, None])[..., 0]  # [n, W]
            size = size + cur.sum(-1)  # [n]
        k = (t[:, None] - np.arange(W)) % W  # [n, W]: slot j holds token t - k
        past = (k >= 1) & (t[:, None] - k >= 0) & (size[:, None] > 0)
        share = np.asarray(INDUCTION_MATCH)[:, None, None]  # [M, 1, 1]
        match = (past & (overlap >= share * size[:, None])).transpose(1, 0, 2).astype(np.float64)  # [n, M, W]
        over = (k[:, :, None] >= np.asarray(INDUCTION_AHEAD)).astype(np.float64)  # [n, W, A]
        A = len(INDUCTION_AHEAD)
        num = (match @ self.ahead[rows]).reshape(t.shape[0], len(INDUCTION_MATCH), A, E)
        den = 1.0 + match @ over  # [n, M, A]
        out = np.empty((t.shape[0], E, len(INDUCTION_MATCH), A + 1))
        out[..., :A] = (num / den[..., None]).transpose(0, 3, 1, 2)
        out[..., A] = (np.log2(1.0 + match.sum(-1)) / 8.0)[:, None, :]
        return out.reshape(t.shape[0], E, -1)

    def _features_one(self, layer: int, t: int) -> np.ndarray:
        """:meth:`features` of one call: a few (W, E) mat-vecs, the match levels stacked."""
        W, E = INDUCTION_WINDOW, self.ring.shape[2]
        slot = t % W
        overlap, size = 0.0, 0.0
        for below in range(layer, max(layer - INDUCTION_LAYERS, -1), -1):
            ring = self.ring[below]
            overlap = overlap + ring @ ring[slot]  # [W]
            size = size + ring[slot].sum()
        k = (t - np.arange(W)) % W
        past = (k >= 1) & (k <= t) & (size > 0)
        match = (past & (overlap >= np.asarray(INDUCTION_MATCH)[:, None] * size)).astype(np.float64)  # [M, W]
        A = len(INDUCTION_AHEAD)
        cols = np.flatnonzero(match[-1])  # the loosest level holds every match (shares descend)
        num = (match[:, cols] @ self.ahead[layer, cols]).reshape(len(INDUCTION_MATCH), A, E)  # not over: 0
        den = 1.0 + match @ (k[:, None] >= np.asarray(INDUCTION_AHEAD)).astype(np.float64)  # [M, A]
        out = np.empty((E, len(INDUCTION_MATCH), A + 1))  # [E, M, A + 1]
        out[:, :, :A] = (num / den[..., None]).transpose(2, 0, 1)
        out[:, :, -1] = np.log2(1.0 + match.sum(-1)) / 8.0
        return out.reshape(E, -1)
