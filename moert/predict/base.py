"""The predictor interface every expert predictor (learned or baseline) implements.

A predictor answers, for one MoE layer and one sequence, "which experts will the router pick for
each token?" as scores ``(T, E)`` (higher = more likely). What a predictor may read is causal:

| kind | reads for token t at layer l |
|---|---|
| ``preattn`` | the normalized pre-attention row of layer l for token t (``seq.hidden[l, t]``) |
| ``xlayer`` | experts selected at layers l-1, l-2 for token t, token t's identity and position, and (by default) token t-1's experts at layer l |
| ``moe-beyond`` | the tokens 0..t (ids or strings) |
| ``prev-token`` | token t-1's experts at layer l |
| ``frequency`` | nothing (per-layer counts from training sequences) |
| ``next-gate`` | the pre-attention row of layer l-1 (of layer l for the first MoE layer) and layer l's router |

``layer`` is always an index into ``meta.layers`` (``0 .. L-1``), not the model's layer id.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["PredictorMeta", "Predictor", "NetPredictor", "check_compatible", "KINDS"]

KINDS = ("preattn", "moe-beyond", "xlayer", "next-gate", "prev-token", "frequency", "reuse")


@dataclass(frozen=True)
class PredictorMeta:
    """What a predictor was built for; stored as the JSON header of a predictor file.

    Attributes:
        kind: one of ``KINDS``.
        model_type: HF ``config.model_type`` of the model whose routing it predicts.
        layers: MoE layer ids it covers, in order (``L = len(layers)``).
        num_experts: ``E``.
        top_k: ``k``.
        hidden_size: ``H`` of the input rows (``preattn``/``next-gate``), else None.
        arch: architecture name (``linear2``, ``mlp_bn``, ``encoder``, ``embed``, or the baseline's kind).
        dims: architecture sizes (hidden D, layers, heads, ...).
        lookahead: extra layers ahead predicted from the same input (``preattn`` only; 0 otherwise).
        loss: training loss name, or "" for baselines.
        train: training data summary (trace path, sequences, tokens, epochs, seed, split ids).
        metrics: metrics on the validation split, as measured at the end of training.
    """

    kind: str
    model_type: str
    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int | None = None
    arch: str = ""
    dims: dict[str, Any] = field(default_factory=dict)
    lookahead: int = 0
    loss: str = ""
    train: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if self.kind not in KINDS:
            raise ValueError(f"predictor kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={self.top_k}, E={self.num_experts}")
        if self.lookahead < 0:
            raise ValueError(f"lookahead={self.lookahead} must be >= 0")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layers"] = list(self.layers)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PredictorMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ValueError(f"predictor header has unknown fields {unknown}; written by a newer moert?")
        return cls(**obj)


def check_compatible(meta: PredictorMeta, trace_meta: Any, *, where: str = "predictor") -> None:
    """Raises ValueError listing every mismatch between a predictor and a trace (or model) description.

    Args:
        meta: the predictor's header.
        trace_meta: anything with ``model_type``, ``layers``, ``num_experts``, ``top_k`` and
            ``hidden_size`` attributes (``moert.trace.TraceMeta``).
        where: name of the predictor (its file) for the message.
    """
    problems = []
    if meta.model_type != trace_meta.model_type:
        problems.append(f"model_type {meta.model_type!r} vs {trace_meta.model_type!r}")
    if tuple(meta.layers) != tuple(trace_meta.layers):
        problems.append(f"layers {list(meta.layers)} vs {list(trace_meta.layers)}")
    if meta.num_experts != trace_meta.num_experts:
        problems.append(f"num_experts (E) {meta.num_experts} vs {trace_meta.num_experts}")
    if meta.top_k != trace_meta.top_k:
        problems.append(f"top_k (k) {meta.top_k} vs {trace_meta.top_k}")
    if meta.kind in ("preattn", "next-gate") and meta.hidden_size != trace_meta.hidden_size:
        problems.append(f"hidden_size (H) {meta.hidden_size} vs {trace_meta.hidden_size}")
    if problems:
        raise ValueError(
            f"{where} ({meta.kind}) does not match the trace: "
            + "; ".join(problems)
            + " (predictor vs trace). Train a predictor on a trace of this model (`moert train`)."
        )


class Predictor(ABC):
    """An expert predictor. Subclasses implement ``predict``; the rest derives from it."""

    meta: PredictorMeta

    @abstractmethod
    def predict(self, layer: int, context: Any) -> torch.Tensor:
        """Scores for every token of one sequence at one MoE layer.

        Args:
            layer: index into ``meta.layers`` (0 .. L-1).
            context: a ``moert.trace.SequenceTrace`` (the predictor reads only causal fields; see
                the module docstring).

        Returns:
            (T, E) fp32 scores (logits for learned predictors); higher means more likely selected.
        """

    def predict_all(self, context: Any) -> torch.Tensor:
        """(L, T, E) fp32 scores for every layer of one sequence."""
        return torch.stack([self.predict(i, context) for i in range(self.meta.num_layers)])

    def topk(self, layer: int, context: Any, m: int = 0) -> torch.Tensor:
        """(T, k+m) int64 predicted experts, most likely first (what a prefetcher loads)."""
        n = self.meta.top_k + m
        if not 1 <= n <= self.meta.num_experts:
            raise ValueError(f"k+m={n} must be in [1, E={self.meta.num_experts}]; lower --overprovision")
        return self.predict(layer, context).topk(n, dim=-1).indices

    def check_trace(self, trace_meta: Any, where: str = "predictor") -> None:
        """Raises ValueError when this predictor cannot be used on a trace with ``trace_meta``."""
        check_compatible(self.meta, trace_meta, where=where)


class NetPredictor(Predictor):
    """A predictor that is a torch network plus a token vocabulary (``xlayer``, ``moe-beyond``).

    Subclasses implement ``build_net(meta, vocab_size) -> nn.Module``; saving and loading are shared.
    """

    def __init__(self, meta: PredictorMeta, net: torch.nn.Module, vocab: Any):
        self.meta, self.net, self.vocab = meta, net.eval(), vocab

    @classmethod
    def build_net(cls, meta: PredictorMeta, vocab_size: int) -> torch.nn.Module:
        raise NotImplementedError

    @classmethod
    def from_state(cls, meta: PredictorMeta, tensors: dict[str, torch.Tensor], extra: dict[str, Any]):
        from moert.predict.data import TokenVocab

        vocab = TokenVocab.from_json(extra["vocab"])
        net = cls.build_net(meta, len(vocab))
        net.load_state_dict(tensors, strict=True)
        return cls(meta, net, vocab)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        return tensors, {"vocab": self.vocab.to_json()}
