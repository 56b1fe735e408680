"""Speculative decoding's verify passes (DESIGN.md §7, MoE-SpAc) as traces the simulator replays.

Each sequence's tokens are grouped into consecutive verify passes of N = gamma + 1 tokens (the last one
shorter); each MoE layer of a pass is one call that accesses the union of the pass's experts once. Every
drafted token is accepted (the trace is the accepted sequence) and the draft model is not simulated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from moert.trace import SequenceTrace, Trace, TraceMeta

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["PassSequence", "PassTrace", "group_verify_passes"]


@dataclass
class PassSequence(SequenceTrace):
    """A sequence grouped into verify passes: ``experts`` (L, P, N * k), each row one pass's union of
    experts, sorted, -1 pads; ``positions`` (P,) of each pass's first token. ``generated``: the tokens of
    the original sequence; ``token_experts``: its valid (token, layer, expert) selections;
    ``multiplicity``: (L, P, N * k) int64, how many of the pass's tokens selected each entry (0 at pads)."""

    generated: int = 0
    token_experts: int = 0
    multiplicity: torch.Tensor | None = None


def group_verify_passes(seq: SequenceTrace, verify_tokens: int) -> PassSequence:
    """Groups a sequence's tokens into consecutive verify passes of ``verify_tokens`` (the last shorter).

    Args:
        seq: experts (L, T, k), -1 pads allowed.
        verify_tokens: N >= 1.

    Returns:
        A :class:`PassSequence` with P = ceil(T / N) passes, experts (L, P, N * k): the distinct experts
        of each layer and pass, ascending, then -1.
    """
    ex = seq.experts.numpy().astype(np.int64)  # [L, T, k]
    L, T, k = ex.shape
    n = verify_tokens
    P = -(-T // n)
    padded = np.full((L, P * n, k), -1, dtype=np.int64)
    padded[:, :T] = ex
    rows = np.sort(padded.reshape(L, P, n * k), axis=-1)  # [L, P, N*k]
    dup = np.zeros(rows.shape, dtype=bool)
    dup[..., 1:] = rows[..., 1:] == rows[..., :-1]
    big = np.iinfo(np.int64).max
    rows = np.sort(np.where(dup | (rows < 0), big, rows), axis=-1)  # distinct ids ascending, then pads
    rows = np.where(rows == big, -1, rows)
    flat = padded.reshape(L, P, n * k)
    mult = (flat[..., None, :] == rows[..., :, None]).sum(-1) * (rows >= 0)  # [L, P, N*k]
    idx = np.arange(P) * n
    return PassSequence(
        seq.seq_id,
        seq.positions[idx].clone(),
        torch.from_numpy(np.ascontiguousarray(rows)),
        seq.is_prefill[idx].clone(),
        generated=T,
        token_experts=int((ex >= 0).sum()),
        multiplicity=torch.from_numpy(mult.astype(np.int64)),
    )


class PassTrace(Trace):
    """A trace whose sequences are grouped into verify passes of N tokens (:func:`group_verify_passes`),
    streamed; ``meta`` is the original trace's (k = experts per token)."""

    def __init__(self, trace: Trace, verify_tokens: int) -> None:
        self._trace, self.verify_tokens = trace, verify_tokens
        self.path: Path = trace.path

    @property
    def meta(self) -> TraceMeta:
        return self._trace.meta

    def sequences(self) -> Iterator[SequenceTrace]:
        for seq in self._trace.sequences():
            yield group_verify_passes(seq, self.verify_tokens)
