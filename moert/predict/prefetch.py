"""Any predictor as a simulator prefetch hook: ``moert simulate --prefetch PRED.safetensors[:m]``.

Before the access of MoE layer l for token t, the hook returns the predictor's top-(k+m) experts of
that layer (``m`` = over-provision, default 0). Which fields of the sequence a predictor reads is
causal by construction (see :mod:`moert.predict.base`), so replaying a whole sequence at once gives
the same ids as asking token by token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moert.policy.base import Prefetcher, TokenContext
from moert.predict.base import Predictor
from moert.predict.metrics import ranked

__all__ = ["PredictorPrefetcher", "parse_prefetch_spec", "prefetcher_from_spec", "SequenceListTrace"]


class PredictorPrefetcher(Prefetcher):
    """Prefetches a predictor's top-(k+m) experts before each layer's access.

    Args:
        predictor: any :class:`~moert.predict.base.Predictor` (trained file or baseline).
        overprovision: ``m``; the hook returns ``k + m`` ids per (layer, token).
        name: label in simulator tables (default: the predictor's kind).
    """

    def __init__(self, predictor: Predictor, overprovision: int = 0, name: str | None = None):
        meta = predictor.meta
        if not 0 <= overprovision <= meta.num_experts - meta.top_k:
            raise ValueError(
                f"over-provision m={overprovision} must be in [0, E-k={meta.num_experts - meta.top_k}]"
            )
        self.predictor = predictor
        self.m = overprovision
        self.width = meta.top_k + overprovision
        self.name = name or meta.kind

    def prepare(self, meta: Any) -> None:
        self.predictor.check_trace(meta, where=f"prefetcher {self.name!r}")

    def prefetch(self, layer: int, ctx: TokenContext) -> torch.Tensor:
        """(k+m,) expert ids for token ``ctx.t`` (slow path: runs the predictor on the whole sequence)."""
        return ranked(self.predictor.predict(layer, ctx.seq)[ctx.t], self.width)

    def prefetch_sequence(self, seq: Any, meta: Any) -> np.ndarray:
        """(L, T, k+m) int32 predicted experts for every layer and token of ``seq``."""
        with torch.no_grad():
            scores = self.predictor.predict_all(seq)  # [L, T, E]
        return ranked(scores, self.width).numpy().astype(np.int32)


def parse_prefetch_spec(spec: str) -> tuple[str, int]:
    """``"PRED.safetensors[:m]"`` (or a baseline name) -> ``(path_or_name, m)``."""
    path, sep, m = spec.rpartition(":")
    if sep and m.isdigit() and path:
        return path, int(m)
    if sep and path.endswith(".safetensors"):
        raise ValueError(f"--prefetch {spec!r}: the part after ':' must be an integer m (over-provision)")
    return spec, 0


def prefetcher_from_spec(
    spec: str, trace_meta: Any = None, fit_sequences: Sequence[Any] | None = None
) -> PredictorPrefetcher:
    """Builds a prefetcher from ``PRED.safetensors[:m]``, ``prev-token[:m]`` or ``frequency[:m]``.

    Args:
        spec: the ``--prefetch`` value.
        trace_meta: the trace's meta (needed by the baselines, and checked against a file's header).
        fit_sequences: sequences the ``frequency`` baseline counts (e.g. the training split).
    """
    from moert.predict import baselines
    from moert.predict.io import load_predictor

    target, m = parse_prefetch_spec(spec)
    if target == "prev-token":
        if trace_meta is None:
            raise ValueError("prev-token prefetching needs the trace's meta")
        pred: Predictor = baselines.PrevTokenPredictor.for_trace(trace_meta)
    elif target == "frequency":
        if trace_meta is None or fit_sequences is None:
            raise ValueError("frequency prefetching needs the trace's meta and sequences to count")
        pred = baselines.FrequencyPredictor.fit(trace_meta, fit_sequences)
    else:
        pred = load_predictor(target)
        if trace_meta is not None:
            pred.check_trace(trace_meta, where=target)
    label = f"{Path(target).stem if target.endswith('.safetensors') else target}" + (f":{m}" if m else "")
    return PredictorPrefetcher(pred, m, name=label)


class SequenceListTrace:
    """A trace over sequences already in memory (e.g. the held-out split), for :func:`moert.sim.simulate`.

    Has what the simulator reads: ``path``, ``meta`` (counts recomputed) and ``sequences()``.
    """

    def __init__(self, meta: Any, sequences: Sequence[Any], path: str = "<memory>"):
        self._seqs = list(sequences)
        self.path = Path(path)
        self._meta = dataclasses.replace(
            meta, num_tokens=sum(int(s.positions.shape[0]) for s in self._seqs), num_sequences=len(self._seqs)
        )

    @property
    def meta(self) -> Any:
        return self._meta

    def sequences(self) -> Iterator[Any]:
        return iter(self._seqs)

    def __iter__(self) -> Iterator[Any]:
        return self.sequences()
