"""Baselines with the predictor interface: ``prev-token``, ``frequency``, ``next-gate``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from moert.predict.base import Predictor, PredictorMeta

__all__ = ["PrevTokenPredictor", "FrequencyPredictor", "NextGatePredictor", "meta_from_trace"]


def meta_from_trace(kind: str, trace_meta: Any, **fields: Any) -> PredictorMeta:
    """A PredictorMeta for ``kind`` covering exactly the layers/E/k of a trace."""
    return PredictorMeta(
        kind=kind,
        model_type=trace_meta.model_type,
        layers=tuple(trace_meta.layers),
        num_experts=trace_meta.num_experts,
        top_k=trace_meta.top_k,
        **fields,
    )


class PrevTokenPredictor(Predictor):
    """ "Same experts as the last token": scores 1 for token t-1's experts at the same layer.

    The first token of a sequence has no previous token: all scores 0 (ties go to low expert ids).
    """

    def __init__(self, meta: PredictorMeta):
        self.meta = meta

    @classmethod
    def for_trace(cls, trace_meta: Any) -> PrevTokenPredictor:
        return cls(meta_from_trace("prev-token", trace_meta, arch="prev-token"))

    @classmethod
    def from_state(cls, meta: PredictorMeta, tensors: dict[str, torch.Tensor], extra: dict[str, Any]):
        return cls(meta)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def predict(self, layer: int, context: Any) -> torch.Tensor:
        experts = context.experts[layer].long()  # [T, k]
        T = experts.shape[0]
        out = torch.zeros(T, self.meta.num_experts)
        if T > 1:
            out[1:].scatter_(1, experts[:-1], 1.0)
        return out


class FrequencyPredictor(Predictor):
    """Per-layer selection counts from training sequences; the same ranking for every token."""

    def __init__(self, meta: PredictorMeta, counts: torch.Tensor):
        if tuple(counts.shape) != (meta.num_layers, meta.num_experts):
            raise ValueError(
                f"counts must be (L, E) = {(meta.num_layers, meta.num_experts)}, got {tuple(counts.shape)}"
            )
        self.meta = meta
        self.counts = counts.float()

    @classmethod
    def fit(cls, trace_meta: Any, sequences: Iterable[Any]) -> FrequencyPredictor:
        """Counts (L, E) over ``sequences`` (the training split)."""
        L, E = len(trace_meta.layers), trace_meta.num_experts
        counts = torch.zeros(L, E, dtype=torch.float64)
        n_seq = n_tok = 0
        for s in sequences:
            ex = s.experts.long()  # [L, T, k]
            counts.scatter_add_(1, ex.reshape(L, -1), torch.ones(L, ex[0].numel(), dtype=torch.float64))
            n_seq += 1
            n_tok += ex.shape[1]
        meta = meta_from_trace(
            "frequency", trace_meta, arch="frequency", train={"sequences": n_seq, "tokens": n_tok}
        )
        return cls(meta, counts.float())

    @classmethod
    def from_state(cls, meta: PredictorMeta, tensors: dict[str, torch.Tensor], extra: dict[str, Any]):
        return cls(meta, tensors["counts"])

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"counts": self.counts}, {}

    def predict(self, layer: int, context: Any) -> torch.Tensor:
        T = int(context.positions.shape[0])
        return self.counts[layer].expand(T, -1).clone()


class NextGatePredictor(Predictor):
    """The next layer's router applied to the current hidden state (mixtral-offloading, AdapMoE).

    To predict layer index l it applies layer l's router to the pre-attention row of layer l-1
    (``seq.hidden[l-1]``); the first MoE layer has no earlier MoE row, so it uses its own row.

    Args:
        meta: the predictor's description (kind ``next-gate``, ``hidden_size`` set).
        routers: L callables ``(T, H) fp32 -> (T, E) fp32`` router probabilities, one per MoE layer.
    """

    def __init__(self, meta: PredictorMeta, routers: Sequence[Callable[[torch.Tensor], torch.Tensor]]):
        if len(routers) != meta.num_layers:
            raise ValueError(
                f"next-gate needs one router per MoE layer ({meta.num_layers}), got {len(routers)}"
            )
        self.meta = meta
        self.routers = list(routers)

    @classmethod
    def from_model(cls, model: Any, trace_meta: Any) -> NextGatePredictor:
        """Routers from a loaded HF model via its moert adapter (``moert.models.get_adapter``)."""
        from moert.models import get_adapter

        adapter = get_adapter(model)
        refs = {ref.index: ref for ref in adapter.moe_layers()}
        missing = [lid for lid in trace_meta.layers if lid not in refs]
        if missing:
            raise ValueError(f"the model has no MoE layers {missing} that the trace records; wrong model?")
        routers = [(lambda h, r=refs[lid]: adapter.router_scores(r, h)) for lid in trace_meta.layers]
        meta = meta_from_trace("next-gate", trace_meta, arch="next-gate", hidden_size=adapter.hidden_size)
        if adapter.num_experts != trace_meta.num_experts or adapter.top_k != trace_meta.top_k:
            raise ValueError(
                f"model has E={adapter.num_experts}, k={adapter.top_k}; the trace has "
                f"E={trace_meta.num_experts}, k={trace_meta.top_k}"
            )
        return cls(meta, routers)

    def predict(self, layer: int, context: Any) -> torch.Tensor:
        if context.hidden is None:
            raise ValueError(
                f"next-gate needs hidden rows; sequence {context.seq_id} has none "
                "(capture with `moert trace --with-hidden`)"
            )
        src = max(layer - 1, 0)
        with torch.no_grad():
            return self.routers[layer](context.hidden[src].float()).float()
