"""The budget's inputs (``moert.policy.budget``): calibrated probabilities and the window in expert copies.

:class:`Calibration` maps a predictor's raw probabilities to observed selection rates; the window is
the link time a layer's compute hides, in copies: fixed (:class:`FixedWindow`, tests), the cost
model's (:class:`CostWindow`, simulator) or measured online (:class:`MeasuredWindow`, runtime).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Calibration", "CostWindow", "FixedWindow", "MeasuredWindow"]


@dataclass(frozen=True)
class Calibration:
    """Raw probability -> observed selection rate, per bin (monotone non-decreasing).

    Attributes:
        edges: (B + 1,) bin edges over [0, 1].
        rates: (B,) selection rate of the raw probabilities in each bin.
    """

    edges: np.ndarray
    rates: np.ndarray

    def __call__(self, p: np.ndarray) -> np.ndarray:
        i = np.clip(np.searchsorted(self.edges, p, side="right") - 1, 0, self.rates.size - 1)
        return self.rates[i]

    @staticmethod
    def fit(raw: np.ndarray, selected: np.ndarray, bins: int = 20) -> Calibration:
        """From (N, E) raw probabilities and (N, E) bool selections; a running maximum keeps the
        mapping monotone (an empty bin takes the rate below it, 0 below every observation)."""
        raw, sel = np.asarray(raw, dtype=np.float64).ravel(), np.asarray(selected, dtype=bool).ravel()
        edges = np.linspace(0.0, 1.0, bins + 1)
        i = np.clip(np.searchsorted(edges, raw, side="right") - 1, 0, bins - 1)
        count = np.bincount(i, minlength=bins)
        hits = np.bincount(i, weights=sel.astype(np.float64), minlength=bins)
        rates = np.where(count > 0, hits / np.maximum(count, 1), np.nan)
        return Calibration(edges, np.nan_to_num(np.fmax.accumulate(rates), nan=0.0))


class FixedWindow:
    """A window of ``copies`` expert copies at every layer call (tests inject it)."""

    def __init__(self, copies: float) -> None:
        self.copies = float(copies)

    def __call__(self, layer: int) -> float:
        return self.copies


class CostWindow(FixedWindow):
    """The simulator's window: the compute an own-layer prefetch hides behind over the cost model's copy
    time of one expert: the layer's attention share of ``layer_compute_ms`` under the windowed model (what
    the runtime's :class:`MeasuredWindow` measures: prediction to router), the whole layer under pooled;
    ``whole_layer``: a prefetch for layer l+1 queued at layer l's router (the rest of layer l and l+1's
    attention: one layer's compute)."""

    def __init__(self, cost: Any, whole_layer: bool = False) -> None:
        windowed = getattr(cost, "window", "pooled") == "windowed"
        share = cost.attention_share if windowed and not whole_layer else 1.0
        super().__init__(share * cost.layer_compute_ms * 1e-3 / cost.copy_s)


class MeasuredWindow:
    """The runtime's window, measured online: per layer, an EMA of the time from its prediction to its
    router (what an own-layer prefetch can hide behind), over an EMA of the copy engine's busy time per
    copy (``CopyEngine.stats()``: ``busy_s`` / ``copies``, read once per token at layer 0). Until both
    are measured the window is 0 (nothing is prefetched).

    Args:
        engine: the model's ``runtime.CopyEngine``.
        num_layers: L.
        decay: weight of the past in both EMAs.
        clock: seconds now (``time.perf_counter``; tests inject one).
    """

    def __init__(
        self, engine: Any, num_layers: int, decay: float = 0.5, clock: Any = time.perf_counter
    ) -> None:
        self.engine, self.decay, self.clock = engine, decay, clock
        self.window_s = np.zeros(num_layers)
        self.started = np.zeros(num_layers)
        self.copy_s = 0.0
        self._last = (0.0, 0)

    def start(self, layer: int) -> None:
        self.started[layer] = self.clock()
        if layer == 0 and self.engine is not None:
            st = self.engine.stats()
            busy, copies = float(st["busy_s"]), int(st["copies"])
            if copies > self._last[1]:
                per = (busy - self._last[0]) / (copies - self._last[1])
                self.copy_s = per if self.copy_s == 0 else self.decay * self.copy_s + (1 - self.decay) * per
            self._last = (busy, copies)

    def routed(self, layer: int) -> None:
        if self.started[layer]:
            dt = self.clock() - self.started[layer]
            w = self.window_s[layer]
            self.window_s[layer] = dt if w == 0 else self.decay * w + (1 - self.decay) * dt

    def __call__(self, layer: int) -> float:
        return float(self.window_s[layer] / self.copy_s) if self.copy_s > 0 else 0.0
