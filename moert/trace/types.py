"""Routing traces: what a trace is (:class:`TraceMeta`, :class:`SequenceTrace`, :class:`Trace`).

A trace records, per MoE layer and token, which experts the router selected, plus optionally the
router scores and the normalized pre-attention row. The moert format (safetensors shards + a JSON
manifest, streamed one shard at a time) lives in :mod:`moert.trace.store` (:class:`TraceWriter`,
re-exported by :mod:`moert.trace`); capture from a live model in :mod:`moert.trace.record`; importers for peers'
formats in :mod:`moert.trace.importers`; :func:`~moert.trace.open.open_trace` for every format in
:mod:`moert.trace.open`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "InMemoryTrace",
    "MANIFEST",
    "SequenceTrace",
    "Trace",
    "TraceFormatError",
    "TraceMeta",
    "check_expert_ids",
]

MANIFEST = "manifest.json"


class TraceFormatError(ValueError):
    """A trace file is malformed; the message names the file, the field (or line) and the problem."""


@dataclass(frozen=True)
class TraceMeta:
    """What a trace holds.

    Attributes:
        model_type: HF ``config.model_type`` of the model that produced it (e.g. ``deepseek_v2``).
        layers: ids of the MoE layers in the model, in order; ``L = len(layers)``.
        num_experts: routed experts per layer ``E``.
        top_k: experts selected per token ``k``.
        hidden_size: ``H`` of the stored pre-attention rows, or None when none are stored.
        num_tokens: tokens over all sequences.
        num_sequences: sequences (requests, prompts).
        has_scores: router scores ``(L, T, E)`` fp32 are stored.
        has_hidden: normalized pre-attention rows ``(L, T, H)`` fp16 are stored.
        source: free text: where the trace came from.
    """

    model_type: str
    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int | None = None
    num_tokens: int = 0
    num_sequences: int = 0
    has_scores: bool = False
    has_hidden: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if not self.layers:
            raise ValueError("TraceMeta.layers is empty; pass the ids of the model's MoE layers")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"TraceMeta.layers={self.layers} has repeated ids")
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"TraceMeta needs 1 <= top_k <= num_experts, got top_k={self.top_k}, "
                f"num_experts={self.num_experts}"
            )
        if self.has_hidden and not self.hidden_size:
            raise ValueError("TraceMeta.has_hidden=True needs hidden_size")

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass
class SequenceTrace:
    """The routing of one sequence (request). ``L`` MoE layers, ``T`` tokens.

    Attributes:
        seq_id: the sequence's id (prompt number for imported traces).
        positions: (T,) int64 token positions.
        experts: (L, T, k) int64 selected experts, layer-major.
        is_prefill: (T,) bool, True for prompt tokens, False for generated ones.
        token_ids: (T,) int64 token ids, or None when only strings are known.
        tokens: T token strings, or None.
        scores: (L, T, E) fp32 router scores, or None.
        hidden: (L, T, H) fp16 normalized pre-attention rows, or None.
    """

    seq_id: int
    positions: torch.Tensor
    experts: torch.Tensor
    is_prefill: torch.Tensor
    token_ids: torch.Tensor | None = None
    tokens: list[str] | None = None
    scores: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def validate(self, meta: TraceMeta, where: str = "sequence") -> None:
        """Checks shapes, dtypes and expert ids against ``meta``; raises TraceFormatError naming ``where``."""
        L, k, E = meta.num_layers, meta.top_k, meta.num_experts
        T = self.num_tokens

        def bad(field: str, msg: str) -> TraceFormatError:
            return TraceFormatError(f"{where} (seq_id {self.seq_id}): field '{field}': {msg}")

        if self.positions.dim() != 1:
            raise bad("positions", f"expected shape (T,), got {tuple(self.positions.shape)}")
        if tuple(self.experts.shape) != (L, T, k):
            raise bad("experts", f"expected shape (L, T, k) = {(L, T, k)}, got {tuple(self.experts.shape)}")
        if self.experts.dtype not in (torch.int16, torch.int32, torch.int64):
            raise bad("experts", f"expected an integer dtype, got {self.experts.dtype}")
        if tuple(self.is_prefill.shape) != (T,) or self.is_prefill.dtype != torch.bool:
            raise bad(
                "is_prefill",
                f"expected (T,)=({T},) bool, got {tuple(self.is_prefill.shape)} {self.is_prefill.dtype}",
            )
        check_expert_ids(self.experts, E, lambda msg: bad("experts", msg))
        if self.token_ids is not None and tuple(self.token_ids.shape) != (T,):
            raise bad("token_ids", f"expected shape ({T},), got {tuple(self.token_ids.shape)}")
        if self.tokens is not None and len(self.tokens) != T:
            raise bad("tokens", f"expected {T} token strings, got {len(self.tokens)}")
        if self.scores is not None:
            if tuple(self.scores.shape) != (L, T, E):
                raise bad("scores", f"expected shape (L, T, E) = {(L, T, E)}, got {tuple(self.scores.shape)}")
            if not bool(torch.isfinite(self.scores).all()):
                raise bad("scores", "contains NaN or inf")
        elif meta.has_scores:
            raise bad("scores", "missing, but the trace declares has_scores=True")
        if self.hidden is not None:
            H = meta.hidden_size
            if tuple(self.hidden.shape) != (L, T, H):
                raise bad("hidden", f"expected shape (L, T, H) = {(L, T, H)}, got {tuple(self.hidden.shape)}")
        elif meta.has_hidden:
            raise bad("hidden", "missing, but the trace declares has_hidden=True")


def check_expert_ids(experts: torch.Tensor, num_experts: int, error) -> None:
    """Raises ``error(msg)`` unless every row of ``experts`` (..., k) holds distinct ids in [0, E)."""
    if experts.numel() == 0:
        return
    lo, hi = int(experts.min()), int(experts.max())
    if lo < 0 or hi >= num_experts:
        bad_value = lo if lo < 0 else hi
        raise error(f"expert id {bad_value} is out of range [0, {num_experts})")
    rows = experts.reshape(-1, experts.shape[-1])
    srt = rows.sort(dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
    if bool(dup.any()):
        i = int(dup.nonzero()[0, 0])
        raise error(f"row {i} repeats an expert id: {rows[i].tolist()}")


class Trace:
    """A routing trace: ``meta`` plus a stream of sequences. Subclasses implement ``_iter``."""

    path: Path

    @property
    def meta(self) -> TraceMeta:
        raise NotImplementedError

    def sequences(self) -> Iterator[SequenceTrace]:
        """Yields one SequenceTrace at a time, in order (streaming: one shard/file in memory)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[SequenceTrace]:
        return self.sequences()

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"{type(self).__name__}({str(self.path)!r}, model_type={m.model_type!r}, L={m.num_layers}, "
            f"E={m.num_experts}, k={m.top_k}, sequences={m.num_sequences}, tokens={m.num_tokens})"
        )


class InMemoryTrace(Trace):
    """A trace held in memory: ``meta`` (counts filled in) and a list of sequences (tests, predictors)."""

    def __init__(self, meta: TraceMeta, sequences: list[SequenceTrace], path: str = "<memory>") -> None:
        for i, seq in enumerate(sequences):
            seq.validate(meta, where=f"InMemoryTrace sequence {i}")
        self.path = Path(path)
        self._seqs = list(sequences)
        self._meta = dataclasses.replace(
            meta, num_tokens=sum(s.num_tokens for s in sequences), num_sequences=len(sequences)
        )

    @property
    def meta(self) -> TraceMeta:
        return self._meta

    def sequences(self) -> Iterator[SequenceTrace]:
        return iter(self._seqs)
