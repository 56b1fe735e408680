"""Any predictor as a simulator prefetch hook: ``moert simulate --prefetch PRED.safetensors[:m]``.

Before the access of MoE layer l for token t, the hook makes the prediction the runtime's hook makes
in a patched model: the predictor's logits for that (layer, token) go through
``moert.engine.prefetch.Prefetcher`` itself (``predict_sequence``: what ``on_logits`` would hand the copy
engine at every decode step), so
the prefetched ids (top-(k+m) by probability, or ``:adaptive``: above the threshold, at least k, at
most k + max_overprovision; lookahead rows for l+1..l+d), the eviction scores of policy ``score``
and the clear of the layer that just ran are the runtime's, bit for bit. Probabilities, per
predictor (see :func:`probability_mode`): ``sigmoid`` of the logits of a BCE-style loss,
``clamp`` for ``mse``; ``prev-token`` scores are 0/1 already; ``frequency`` counts become selection
rates (count / tokens, in [0, 1]).

Which fields of the sequence a predictor reads is causal by construction (see
:mod:`moert.predict.base`), so predicting a whole sequence at once gives the same logits as asking
token by token; the hook then takes them token by token, as the runtime does (batch 1 decode).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moert.policy.base import Predictions, Prefetcher, TokenContext
from moert.predict.base import Predictor

__all__ = [
    "PredictorPrefetcher",
    "SequenceListTrace",
    "parse_prefetch_spec",
    "prefetcher_from_spec",
    "probability_mode",
]

_BCE_LOSSES = ("wbce", "focal", "rank")


def probability_mode(meta: Any) -> str | None:
    """How a predictor's outputs become probabilities: ``"sigmoid"``, ``"clamp"``, or None (no meaning).

    ``mse`` regresses router scores (clamped, as the runtime does); wbce/focal/rank train logits of
    a sigmoid; ``prev-token`` outputs 0/1 and ``frequency`` (rescaled to selection rates by the
    hook) values in [0, 1], both clamped; anything else (``next-gate``: a router's raw logits) gives
    no probabilities, so it can prefetch (ranked by its outputs) but not score.
    """
    if meta.kind in ("prev-token", "frequency") or meta.loss == "mse":
        return "clamp"
    if meta.loss in _BCE_LOSSES:
        return "sigmoid"
    return None


class PredictorPrefetcher(Prefetcher):
    """Prefetches what the runtime's hook would, from any predictor (see the module doc).

    Args:
        predictor: any :class:`~moert.predict.base.Predictor` (trained file or baseline).
        overprovision: ``m`` (the hook prefetches the top-(k+m)), or ``"adaptive"``.
        name: label in simulator tables (default: the predictor's kind).
        threshold: the adaptive mode's probability threshold.
        max_overprovision: the adaptive mode's most experts beyond k.
        score_decay: weight ``score_decay ** j`` of the scores of lookahead layer l+j.
    """

    def __init__(
        self,
        predictor: Predictor,
        overprovision: int | str = 0,
        name: str | None = None,
        *,
        threshold: float = 0.3,
        max_overprovision: int = 4,
        score_decay: float = 0.5,
    ):
        from moert.api.config import OffloadConfig

        meta = predictor.meta
        E, k = meta.num_experts, meta.top_k
        adaptive = overprovision == "adaptive"
        if not adaptive and (
            isinstance(overprovision, bool)
            or not isinstance(overprovision, int)
            or not 0 <= overprovision <= E - k
        ):
            raise ValueError(f"over-provision m={overprovision!r} must be 'adaptive' or in [0, E-k={E - k}]")
        self.mode = probability_mode(meta)
        if adaptive and self.mode is None:
            raise ValueError(
                f"{meta.kind} predictor outputs are not probabilities, so the adaptive width (a probability "
                "threshold) does not apply; give an integer over-provision m"
            )
        # the runtime's own config checks (threshold, max_overprovision, score_decay)
        self.cfg = OffloadConfig(
            policy="score",
            predictor=predictor,
            overprovision=overprovision,
            prefetch="async",
            threshold=threshold,
            max_overprovision=max_overprovision,
            score_decay=score_decay,
        )
        self.predictor = predictor
        self.m = overprovision
        self.width = min(E, k + (max_overprovision if adaptive else int(overprovision)))
        self.lookahead = meta.lookahead
        self.gives_scores = self.mode is not None
        self.name = name or meta.kind
        self._hook: Any = (
            None  # moert.engine.prefetch.Prefetcher, made by prepare (its clear counter runs on)
        )
        self._cached: tuple[Any, Predictions] | None = None

    def prepare(self, meta: Any) -> None:
        from moert.engine.prefetch import Prefetcher as RuntimeHook

        self.predictor.check_trace(meta, where=f"prefetcher {self.name!r}")
        pm = self.predictor.meta
        self._hook = RuntimeHook(
            None,  # no engine: the simulator takes the hook's `prediction` and replays it itself
            self.cfg,
            pm.num_layers,
            pm.num_experts,
            pm.top_k,
            pm.lookahead,
            self.mode or "sigmoid",  # no probabilities: only the ranking (monotone in the logit) is used
            "cpu",
        )
        self._cached = None

    def logits(self, seq: Any) -> torch.Tensor:
        """(L, T, 1+d, E) fp32: what the runtime's hook gets at each (layer, token) of ``seq``."""
        pred, pm = self.predictor, self.predictor.meta
        with torch.no_grad():
            if pm.lookahead > 0:
                out = torch.stack(
                    [pred.predict_ahead(i, seq) for i in range(pm.num_layers)]
                )  # [L, T, 1+d, E]
            else:
                out = pred.predict_all(seq).unsqueeze(2)  # [L, T, 1, E]
            if pm.kind == "frequency":  # counts -> selection rates: count * k / (k * tokens)
                out = out * pm.top_k / out.sum(-1, keepdim=True).clamp_min(1.0)
        return out.float()

    def predictions(self, seq: Any, meta: Any) -> Predictions:
        """The runtime hook's prediction before every access of ``seq`` (computed once per sequence)."""
        if self._cached is not None and self._cached[0] is seq:
            return self._cached[1]
        if self._hook is None:
            self.prepare(meta)
        hook = self._hook
        logits = self.logits(seq)
        L, T, n, E = logits.shape
        with torch.no_grad():
            # the hook's own prediction of every (token, layer) step, token-major as a decode runs
            got_ids, got_scores, clear_score, cleared = hook.predict_sequence(logits)
        if any(c not in (-1, (layer - 1) % L) for layer, c in enumerate(cleared)):
            raise RuntimeError(
                f"moert.engine.prefetch.Prefetcher clears layers {cleared}; the simulator replays a clear of l-1"
            )
        ids = np.full((T, L, n, self.width), -1, dtype=np.int32)
        ids[..., : got_ids.shape[-1]] = got_ids.numpy()
        scores = np.zeros((T, L, n, E), dtype=np.float32) if got_scores is None else got_scores.numpy()
        clear = np.where(np.array(cleared)[None, :] >= 0, clear_score.numpy(), np.nan).astype(np.float32)
        out = Predictions(ids, scores, clear)
        self._cached = (seq, out)
        return out

    def prefetch(self, layer: int, ctx: TokenContext) -> torch.Tensor:
        """(<= width,) expert ids prefetched into ``layer`` before its access for token ``ctx.t``
        (slow path: predicts the whole sequence once)."""
        row = self.predictions(ctx.seq, ctx.meta).ids[ctx.t, layer, 0]
        return torch.from_numpy(row[row >= 0].astype(np.int64))

    def prefetch_sequence(self, seq: Any, meta: Any) -> np.ndarray:
        """(L, T, width) int32 ids prefetched into each access's own layer, -1 pads."""
        return self.predictions(seq, meta).own_rows()

    def end_sequence(self, seq: Any) -> None:
        self._cached = None


def parse_prefetch_spec(spec: str) -> tuple[str, int | str]:
    """``"PRED.safetensors[:m|:adaptive]"`` (or a baseline name) -> ``(path_or_name, m or "adaptive")``."""
    path, sep, m = spec.rpartition(":")
    if sep and path and (m.isdigit() or m == "adaptive"):
        return path, int(m) if m.isdigit() else m
    if sep and path.endswith(".safetensors"):
        raise ValueError(
            f"--prefetch {spec!r}: the part after ':' must be an integer m (over-provision) or 'adaptive'"
        )
    return spec, 0


def prefetcher_from_spec(
    spec: str,
    trace_meta: Any = None,
    fit_sequences: Sequence[Any] | None = None,
    **options: Any,
) -> PredictorPrefetcher:
    """Builds a prefetcher from ``PRED.safetensors[:m]``, ``prev-token[:m]`` or ``frequency[:m]``
    (``:adaptive`` instead of ``:m`` for the adaptive width).

    Args:
        spec: the ``--prefetch`` value.
        trace_meta: the trace's meta (needed by the baselines, and checked against a file's header).
        fit_sequences: sequences the ``frequency`` baseline counts (e.g. the training split).
        options: ``threshold``, ``max_overprovision``, ``score_decay`` of :class:`PredictorPrefetcher`.
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
    return PredictorPrefetcher(pred, m, name=label, **options)


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
