"""Datasets for predictor training, built from routing traces. Splits are by sequence, never by token.

Everything here works on ``moert.trace.SequenceTrace`` objects (or anything with the same fields:
``seq_id``, ``positions (T,)``, ``experts (L, T, k)``, ``token_ids``/``tokens``, ``scores``, ``hidden``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Split",
    "split_sequences",
    "TokenVocab",
    "position_bucket",
    "NUM_POSITION_BUCKETS",
    "LayerTokens",
    "flatten",
    "require_hidden",
    "open_sequences",
]

NUM_POSITION_BUCKETS = 16


@dataclass(frozen=True)
class Split:
    """Sequence ids of the train / validation (early stopping) / test (held out) parts."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def to_json(self) -> dict[str, list[int]]:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}


def split_sequences(seq_ids: Iterable[int], val_fraction: float, test_fraction: float, seed: int) -> Split:
    """Shuffles sequence ids with ``seed`` and cuts test, then validation, then train.

    Depends only on the set of ids, the fractions and the seed, so ``moert train`` and
    ``moert eval`` with the same arguments see the same held-out sequences.
    """
    ids = sorted(set(int(i) for i in seq_ids))
    for name, frac in (("val-split", val_fraction), ("test-split", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"--{name} {frac} must be in [0, 1)")
    n = len(ids)
    n_test = round(n * test_fraction) if test_fraction > 0 else 0
    n_val = round(n * val_fraction) if val_fraction > 0 else 0
    if test_fraction > 0:
        n_test = max(n_test, 1)
    if val_fraction > 0:
        n_val = max(n_val, 1)
    if n - n_test - n_val < 1:
        raise ValueError(
            f"{n} sequences cannot be split into train/val/test with val={val_fraction}, test={test_fraction}; "
            "use a larger trace or smaller fractions"
        )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    shuffled = [ids[i] for i in perm]
    test = tuple(sorted(shuffled[:n_test]))
    val = tuple(sorted(shuffled[n_test : n_test + n_val]))
    train = tuple(sorted(shuffled[n_test + n_val :]))
    return Split(train, val, test)


class TokenVocab:
    """Maps token ids or token strings to dense indices; index 0 is ``<unk>``.

    Built from training sequences; saved in the predictor header (JSON), so a predictor trained on
    an imported trace (token strings only) carries its own vocabulary.
    """

    def __init__(self, kind: str, keys: Sequence[str]):
        if kind not in ("ids", "strings"):
            raise ValueError(f"vocabulary kind {kind!r} is not 'ids' or 'strings'")
        self.kind = kind
        self.keys = list(keys)
        self.index = {key: i + 1 for i, key in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys) + 1

    @staticmethod
    def _keys_of(seq: Any, kind: str) -> list[str]:
        if kind == "ids":
            if seq.token_ids is None:
                raise ValueError(
                    f"sequence {seq.seq_id} has no token ids, but the vocabulary is built from ids; "
                    "use a trace with token ids, or one with token strings throughout"
                )
            return [str(int(x)) for x in seq.token_ids.tolist()]
        if seq.tokens is None:
            raise ValueError(
                f"sequence {seq.seq_id} has no token strings; the predictor's vocabulary needs them"
            )
        return list(seq.tokens)

    @classmethod
    def build(cls, sequences: Iterable[Any], min_count: int = 1) -> TokenVocab:
        """From ids when every sequence has them, else from strings; keys seen < ``min_count`` times map to unk."""
        sequences = list(sequences)
        kind = "ids" if all(s.token_ids is not None for s in sequences) else "strings"
        counts: Counter[str] = Counter()
        for s in sequences:
            counts.update(cls._keys_of(s, kind))
        keys = sorted(key for key, c in counts.items() if c >= min_count)
        return cls(kind, keys)

    def encode(self, seq: Any) -> torch.Tensor:
        """(T,) int64 dense indices of a sequence's tokens (0 for unknown)."""
        return torch.tensor(
            [self.index.get(key, 0) for key in self._keys_of(seq, self.kind)], dtype=torch.long
        )

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "keys": self.keys}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TokenVocab:
        return cls(obj["kind"], obj["keys"])


def position_bucket(positions: torch.Tensor) -> torch.Tensor:
    """(T,) int64 buckets: positions 0..7 exactly, then one bucket per doubling (8-15, 16-31, ...), capped at 15."""
    p = positions.long().clamp(min=0)
    log_b = 8 + torch.floor(torch.log2(p.clamp(min=8).float() / 8)).long()  # 8..15 -> 8, 16..31 -> 9, ...
    return torch.where(p < 8, p, log_b).clamp(max=NUM_POSITION_BUCKETS - 1)


@dataclass
class LayerTokens:
    """Token rows of many sequences, concatenated (``N`` tokens, ``L`` layers).

    Attributes:
        experts: (L, N, k) int64 true experts.
        prev_experts: (L, N, k) int64 the previous token's experts at the same layer (``-1`` for a
            sequence's first token).
        positions: (N,) int64.
        seq_index: (N,) int64 index of the sequence each token belongs to.
        tokens: (N,) int64 vocabulary indices, or None.
        scores: (L, N, E) fp32 or None.
        hidden: (L, N, H) fp16 or None.
    """

    experts: torch.Tensor
    prev_experts: torch.Tensor
    positions: torch.Tensor
    seq_index: torch.Tensor
    tokens: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


def prev_token_experts(experts: torch.Tensor) -> torch.Tensor:
    """(L, T, k) the experts of token t-1 at each layer; ``-1`` for t = 0. experts: (L, T, k)."""
    out = torch.full_like(experts, -1)
    out[:, 1:] = experts[:, :-1]
    return out


def flatten(
    sequences: Sequence[Any], *, vocab: TokenVocab | None = None, scores: bool = False, hidden: bool = False
) -> LayerTokens:
    """Concatenates sequences along the token axis (optionally with scores / hidden rows)."""
    if not sequences:
        raise ValueError("no sequences to build a dataset from (empty split?)")
    experts = torch.cat([s.experts.long() for s in sequences], dim=1)
    prev = torch.cat([prev_token_experts(s.experts.long()) for s in sequences], dim=1)
    positions = torch.cat([s.positions.long() for s in sequences])
    seq_index = torch.cat(
        [torch.full((s.experts.shape[1],), i, dtype=torch.long) for i, s in enumerate(sequences)]
    )
    out = LayerTokens(experts, prev, positions, seq_index)
    if vocab is not None:
        out.tokens = torch.cat([vocab.encode(s) for s in sequences])
    if scores:
        missing = [s.seq_id for s in sequences if s.scores is None]
        if missing:
            raise ValueError(f"sequences {missing[:5]} have no router scores; the chosen loss needs them")
        out.scores = torch.cat([s.scores.float() for s in sequences], dim=1)
    if hidden:
        require_hidden(sequences)
        out.hidden = torch.cat([s.hidden for s in sequences], dim=1)
    return out


def require_hidden(sequences: Iterable[Any]) -> None:
    """Raises ValueError unless every sequence carries pre-attention rows."""
    for s in sequences:
        if s.hidden is None:
            raise ValueError(
                f"sequence {s.seq_id} has no hidden rows; the preattn predictor needs the normalized "
                "pre-attention rows: capture the trace with `moert trace --with-hidden`"
            )


def open_sequences(
    path: str, fmt: str = "auto", max_sequences: int | None = None, **options: Any
) -> tuple[Any, list[Any]]:
    """Opens a trace with ``moert.trace.open_trace`` and reads its sequences into memory.

    ``options`` go to the importer of an imported format (``num_experts``, ``top_k``, ``model_type``).

    Returns:
        ``(meta, sequences)``; with ``max_sequences``, the first that many (in trace order).
    """
    from moert.trace import open_trace

    trace = open_trace(path, format=fmt, **options)
    seqs = []
    for s in trace.sequences():
        seqs.append(s)
        if max_sequences is not None and len(seqs) >= max_sequences:
            break
    if not seqs:
        raise ValueError(f"trace {path} holds no sequences")
    return trace.meta, seqs


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """[(start, stop)] windows of at most ``size`` covering range(n)."""
    return [(i, min(i + size, n)) for i in range(0, n, size)] if n else []
