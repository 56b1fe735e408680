"""Any predictor as a simulator policy: ``moert simulate --policy lru+PRED.safetensors[:m]``.

:class:`PredictorPolicy` is the runtime's planner (:class:`moert.policy.score.ScorePlanner`, the same
object a patched model calls from its ``PrefetchNorm``) fed with the predictor's logits of the trace:
before the access of MoE layer l for token t it gets the logits the runtime's hook would get at that
step (``sequence_logits``), so the prefetched ids (top-(k+m) by probability, or ``:adaptive``: above the
threshold, at least k, at most k + max_overprovision; lookahead rows for l+1..l+d), the eviction scores
of policy ``score`` and the clear of the layer that just ran are the runtime's. Probabilities, per
predictor (see :func:`probability_mode`): ``sigmoid`` of the logits of a BCE-style loss, ``clamp`` for
``mse``; ``prev-token`` scores are 0/1 already; ``frequency`` counts become selection rates (count /
tokens, in [0, 1]).

Which fields of the sequence a predictor reads is causal by construction (see
:mod:`moert.predict.base`), so predicting a whole sequence at once gives the same logits as asking
token by token; the plans then go token by token, as the runtime does (batch 1 decode). Fast path:
:meth:`ScorePlanner.predict_sequence` over the sequence's logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from moert.policy.base import SequencePlan
from moert.policy.score import ScorePlanner
from moert.predict import baselines
from moert.predict.base import Predictor
from moert.predict.io import load_predictor

#: prefetchers a ``PRED:NAME`` spec builds for a named width instead of ``m`` (``budget``): NAME ->
#: ``f(predictor, fit_sequences, label)``; their modules fill it (``moert.policy`` imports them all)
WIDTH_BUILDERS: dict[str, Any] = {}

__all__ = [
    "PredictorPolicy",
    "SequenceListTrace",
    "parse_prefetch_spec",
    "policy_from_spec",
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


class PredictorPolicy(ScorePlanner):
    """Prefetches (and scores) what the runtime's planner would, from any predictor (see the module doc).

    Args:
        predictor: any :class:`~moert.predict.base.Predictor` (trained file or baseline).
        overprovision: ``m`` (prefetch the top-(k+m)), or ``"adaptive"``.
        name: label in simulator tables (default: the predictor's kind).
        threshold: the adaptive mode's probability threshold.
        max_overprovision: the adaptive mode's most experts beyond k.
        score_decay: weight ``score_decay ** j`` of the scores of lookahead layer l+j.
    """

    offline = True  # in a model the fused kernel predicts; here the trace feeds the predictor
    fast_path = True

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
        super().__init__(
            lookahead=meta.lookahead,
            probabilities=self.mode or "sigmoid",  # no probabilities: only the ranking (monotone) is used
            overprovision=overprovision,
            threshold=threshold,
            max_overprovision=max_overprovision,
            score_decay=score_decay,
        )
        self.predictor = predictor
        self.m = overprovision
        self.gives_scores = self.mode is not None
        self.name = name or meta.kind

    def prepare(self, trace: Any) -> None:
        self.predictor.check_trace(trace.meta, where=f"prefetcher {self.name!r}")

    def sequence_logits(self, seq: Any) -> torch.Tensor:
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

    def sequence_plan(self, seq: Any) -> SequencePlan:
        return SequencePlan(before=self.predict_sequence(self.sequence_logits(seq)))


def parse_prefetch_spec(spec: str) -> tuple[str, int | str]:
    """``"PRED.safetensors[:m|:adaptive|:budget|:budget-ahead]"`` (or a baseline name) -> ``(path_or_name,
    m, "adaptive" or a name of ``WIDTH_BUILDERS``)``."""
    path, sep, m = spec.rpartition(":")
    if sep and path and (m.isdigit() or m == "adaptive" or m in WIDTH_BUILDERS):
        return path, int(m) if m.isdigit() else m
    if sep and path.endswith(".safetensors"):
        raise ValueError(
            f"--prefetch {spec!r}: the part after ':' must be an integer m (over-provision), 'adaptive', "
            + " or ".join(repr(k) for k in WIDTH_BUILDERS)
        )
    return spec, 0


def policy_from_spec(
    spec: str,
    trace_meta: Any = None,
    fit_sequences: Sequence[Any] | None = None,
    **options: Any,
) -> PredictorPolicy:
    """Builds a prefetcher from ``PRED.safetensors[:m]``, ``prev-token[:m]`` or ``frequency[:m]``
    (``:adaptive`` instead of ``:m`` for the adaptive width; ``:budget`` for the budgeted prefetcher of
    :mod:`moert.policy.budget`, calibrated on ``fit_sequences``), or ``predictions:DIR`` (a peer's recorded
    predictions, :class:`moert.policy.recorded.RecordedPredictions`).

    Args:
        spec: the ``--prefetch`` value.
        trace_meta: the trace's meta (needed by the baselines, and checked against a file's header).
        fit_sequences: sequences the ``frequency`` baseline counts (e.g. the training split).
        options: ``threshold``, ``max_overprovision``, ``score_decay`` of :class:`PredictorPolicy`.
    """
    if spec.startswith("predictions:"):  # a peer's recorded predictions (moert.policy.recorded)
        from moert.policy.recorded import RecordedPredictions

        return RecordedPredictions(spec[len("predictions:") :])
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
    if m in WIDTH_BUILDERS:  # e.g. ``:budget`` (moert.policy.budget registers it)
        return WIDTH_BUILDERS[m](pred, fit_sequences, label)
    return PredictorPolicy(pred, m, name=label, **options)


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
