"""MoE-Beyond routing CSVs: one file per prompt, in the layouts its repository publishes.

Which files a folder holds (``prompt_<n>_data.csv``, ``..._data_formatted.csv``,
``..._data_predicted.csv``; one kind per folder) is :mod:`moert.trace.importers.moe_beyond_layout`.
Inside a file, the header is one of::

    Layer ID,Batch Number,Token,Activated Expert IDs     (plain, formatted; Token: the token string)
    Layer ID,Token,Activated Expert IDs                  (predicted; Token: the position 0, 1, ...)

optionally followed by ``Predicted Expert IDs`` (the predicted layout always has it) and/or
``Token Embedding Vector`` (MoE-Beyond's training dumps; ignored). Rows are grouped by layer (all
tokens of the first MoE layer, then the next, ...); every layer lists the prompt's tokens in the
same order. Expert ids are a quoted JSON-style list, e.g. ``"[8, 26, 56, 57, 60, 43]"`` (a set: the
published routing lists are in the router's order, the predicted files' lists sorted by id).
``Predicted Expert IDs`` holds the recorded prediction for the same (layer, token) as
``Activated Expert IDs`` (read by :func:`moert.trace.importers.recorded_predictions`); it may hold
more or fewer ids than k, or ``[]``. Without ``Batch Number``, a Token column that reads exactly
0, 1, 2, ... is the position (the predicted layout), and tokens are then unknown; any other Token
column holds token strings. The files say nothing about ``E``; the default (64) is
DeepSeek-V2-Lite's. Files are untrusted input: every problem names the file and line.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moert.trace.importers.moe_beyond_layout import find_csv_files
from moert.trace.types import SequenceTrace, Trace, TraceFormatError, TraceMeta

__all__ = ["HEADERS", "OPTIONAL", "PREDICTED", "CSVRouting", "MoEBeyondCSVTrace", "parse_csv", "read_csv"]

HEADERS = (
    ("Layer ID", "Batch Number", "Token", "Activated Expert IDs"),
    ("Layer ID", "Token", "Activated Expert IDs"),
)
PREDICTED = "Predicted Expert IDs"
OPTIONAL = (PREDICTED, "Token Embedding Vector")


@dataclass
class CSVRouting:
    """One parsed MoE-Beyond CSV.

    Attributes:
        layers: MoE layer ids in file order (``L``).
        tokens: the T token strings, or None where the Token column holds positions.
        experts: (L, T, k) int64 routed experts.
        predicted: (L, T, m) int64 recorded predictions, -1 pads (m: the longest list in the file),
            or None when the file has no ``Predicted Expert IDs`` column.
    """

    layers: tuple[int, ...]
    tokens: list[str] | None
    experts: torch.Tensor
    predicted: torch.Tensor | None

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[1])


def _read_rows(path: Path):
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TraceFormatError(f"{path}: not UTF-8 text: {exc}") from None
    if "\x00" in text:
        raise TraceFormatError(f"{path}: holds NUL bytes; not a CSV text file")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = tuple(h.strip() for h in next(reader))
    except StopIteration:
        raise TraceFormatError(f"{path}: line 1: empty file, expected a header") from None
    except csv.Error as exc:
        raise TraceFormatError(f"{path}: line 1: {exc}") from None
    base = tuple(h for h in header if h not in OPTIONAL)
    extra = header[len(base) :]
    if base not in HEADERS or header[: len(base)] != base or len(set(extra)) != len(extra):
        wanted = " or ".join(repr(",".join(h)) for h in HEADERS)
        raise TraceFormatError(
            f"{path}: line 1: header {','.join(header)!r:.200} is not a MoE-Beyond header; expected {wanted}, "
            f"optionally followed by {' and/or '.join(repr(o) for o in OPTIONAL)}"
        )
    return header, reader


def _parse_ids(cell: str, column: str, allow_empty: bool = False) -> list[int]:
    s = cell.strip()
    if not s or s.lower() in ("nan", "none", "null"):
        raise ValueError(f"{column} is missing ({cell!r:.20}); write the ids as a list like [1, 2, 3]")
    if len(s) < 2 or s[0] != "[" or s[-1] != "]":
        raise ValueError(f"{column} {cell!r:.60} is not a list like [1, 2, 3]")
    inner = s[1:-1].strip()
    if not inner:
        if allow_empty:
            return []
        raise ValueError(f"{column}: the expert id list is empty")
    try:
        return [int(x) for x in inner.split(",")]
    except ValueError:
        raise ValueError(f"{column} {cell!r:.60} are not integers") from None


def _check_ids(ids: list[int], column: str, num_experts: int) -> None:
    for e in ids:
        if not 0 <= e < num_experts:
            raise ValueError(
                f"{column}: expert id {str(e)[:40]} is out of range [0, {num_experts}); pass --num-experts if the "
                "model has more experts"
            )
    if len(set(ids)) != len(ids):
        raise ValueError(f"{column}: expert ids {ids} repeat an id")


def read_csv(path: str | os.PathLike, num_experts: int = 64, top_k: int | None = None) -> CSVRouting:
    """Parses and validates one MoE-Beyond CSV (any published layout).

    Args:
        path: the CSV file.
        num_experts: ``E``; ids (routed and predicted) must be in [0, E).
        top_k: expected ``k``, or None to take it from the first row.

    Returns:
        The file's layers, tokens, routed experts and recorded predictions (see :class:`CSVRouting`).
    """
    path = Path(path)
    header, reader = _read_rows(path)
    rows = _Rows(header, num_experts, top_k)
    line = 1
    try:
        for row in reader:
            line = reader.line_num
            rows.add(row)
    except csv.Error as exc:
        raise TraceFormatError(f"{path}: line {reader.line_num}: {exc}") from None
    except ValueError as exc:
        raise TraceFormatError(f"{path}: line {line}: {exc}") from None
    if not rows.layers:
        raise TraceFormatError(f"{path}: line {line}: no data rows after the header")
    if rows.j != len(rows.tokens):
        raise TraceFormatError(
            f"{path}: line {line}: layer {rows.layers[-1]} has {rows.j} tokens but layer {rows.layers[0]} "
            f"has {len(rows.tokens)} (truncated file?)"
        )
    return rows.routing()


class _Rows:
    """The rows of one MoE-Beyond CSV, checked as they are added (layer by layer, the same tokens in
    each layer), then assembled into a :class:`CSVRouting`."""

    def __init__(self, header: list[str], num_experts: int, top_k: int | None) -> None:
        self.header, self.num_experts = header, num_experts
        self.col_batch = header.index("Batch Number") if "Batch Number" in header else None
        self.col_token = header.index("Token")
        self.col_ids = header.index("Activated Expert IDs")
        self.col_pred = header.index(PREDICTED) if PREDICTED in header else None
        self.layers: list[int] = []
        self.tokens: list[str] = []  # tokens of the first layer
        self.flat: list[int] = []
        self.preds: list[list[int]] = []
        self.k = top_k
        self.j = 0  # index of the row within the current layer

    def add(self, row: list[str]) -> None:
        """Checks one row and keeps its routing; ValueError saying what is wrong (blank rows are skipped)."""
        if len(row) != len(self.header):
            if not row:
                return
            raise ValueError(f"expected {len(self.header)} fields ({','.join(self.header)}), got {len(row)}")
        try:
            layer = int(row[0])
        except ValueError:
            raise ValueError(f"Layer ID {row[0]!r:.40} is not an integer") from None
        if self.col_batch is not None and row[self.col_batch].strip() != "0":
            raise ValueError(
                f"Batch Number {row[self.col_batch]!r:.40} is not 0 (one prompt per file is supported)"
            )
        if not self.layers or layer != self.layers[-1]:
            self._start_layer(layer)
        self._check_token(layer, row[self.col_token])
        ids = _parse_ids(row[self.col_ids], "Activated Expert IDs")
        if self.k is None:
            self.k = len(ids)
        if len(ids) != self.k:
            raise ValueError(f"{len(ids)} expert ids, expected top-k = {self.k}")
        _check_ids(ids, "Activated Expert IDs", self.num_experts)
        self.flat.extend(ids)
        if self.col_pred is not None:
            pred = _parse_ids(row[self.col_pred], PREDICTED, allow_empty=True)
            _check_ids(pred, PREDICTED, self.num_experts)
            self.preds.append(pred)
        self.j += 1

    def _start_layer(self, layer: int) -> None:
        layers, tokens = self.layers, self.tokens
        if layers and self.j != len(tokens):
            raise ValueError(
                f"layer {layers[-1]} has {self.j} tokens but layer {layers[0]} has {len(tokens)} "
                "(truncated or inconsistent file)"
            )
        if layer in layers:
            raise ValueError(
                f"layer {layer} appears again after layer {layers[-1]}; rows must be grouped by layer"
            )
        if layer < 0:
            raise ValueError(f"Layer ID {layer} is negative")
        layers.append(layer)
        self.j = 0

    def _check_token(self, layer: int, token: str) -> None:
        layers, tokens, j = self.layers, self.tokens, self.j
        if len(layers) == 1:
            tokens.append(token)
        elif j >= len(tokens):
            raise ValueError(f"layer {layer} has more tokens than layer {layers[0]} ({len(tokens)})")
        elif token != tokens[j]:
            raise ValueError(
                f"layer {layer} token #{j} is {token!r:.60}, layer {layers[0]} has {tokens[j]!r:.60}"
            )

    def routing(self) -> CSVRouting:
        """The rows as a CSVRouting; Token holds positions when the file has no Batch Number column
        and its tokens are 0, 1, 2, ..."""
        L, T, k = len(self.layers), len(self.tokens), self.k
        experts = torch.from_numpy(np.asarray(self.flat, dtype=np.int64).reshape(L, T, k))  # [L, T, k]
        predicted = None
        if self.col_pred is not None:
            m = max(len(p) for p in self.preds)
            padded = np.full((L * T, m), -1, dtype=np.int64)
            for i, p in enumerate(self.preds):
                padded[i, : len(p)] = p
            predicted = torch.from_numpy(padded.reshape(L, T, m))  # [L, T, m]
        if self.col_batch is None and all(t.strip() == str(i) for i, t in enumerate(self.tokens)):
            return CSVRouting(tuple(self.layers), None, experts, predicted)  # Token holds positions
        return CSVRouting(tuple(self.layers), self.tokens, experts, predicted)


def parse_csv(
    path: str | os.PathLike, num_experts: int = 64, top_k: int | None = None
) -> tuple[tuple[int, ...], list[str] | None, torch.Tensor]:
    """(layer ids in file order, the T token strings or None, experts (L, T, k) int64); see :func:`read_csv`."""
    got = read_csv(path, num_experts, top_k)
    return got.layers, got.tokens, got.experts


def list_csv_files(path: str | os.PathLike) -> list[tuple[int, Path]]:
    """(prompt number, file) of a CSV file or of every MoE-Beyond CSV of a directory (one kind), by number."""
    return list(find_csv_files(path).files)


class MoEBeyondCSVTrace(Trace):
    """A folder of MoE-Beyond CSVs (one kind, see the module doc) or one CSV read as a trace.

    One prompt per sequence; its number is the sequence id. The routing only: a predicted folder's
    recorded predictions come from :func:`moert.trace.importers.recorded_predictions`.

    Args:
        path: directory of ``prompt_<n>_data[_formatted|_predicted].csv`` files, or one CSV.
        num_experts: ``E`` (default 64, DeepSeek-V2-Lite).
        top_k: ``k``, or None to infer it from the first row.
        model_type: recorded in the meta (default ``deepseek_v2``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        num_experts: int = 64,
        top_k: int | None = None,
        model_type: str = "deepseek_v2",
    ) -> None:
        if num_experts < 1 or (top_k is not None and not 1 <= top_k <= num_experts):
            raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
        self.path = Path(path)
        folder = find_csv_files(self.path)
        self.kind = folder.kind
        self.files = list(folder.files)
        self.num_experts = num_experts
        self.model_type = model_type
        first = read_csv(self.files[0][1], num_experts, top_k)
        self.layers = first.layers
        self.top_k = int(first.experts.shape[2])
        self.has_predictions = first.predicted is not None
        self._meta: TraceMeta | None = None

    @property
    def meta(self) -> TraceMeta:
        if self._meta is None:
            self._meta = TraceMeta(
                model_type=self.model_type,
                layers=self.layers,
                num_experts=self.num_experts,
                top_k=self.top_k,
                num_tokens=sum(_count_rows(f) for _, f in self.files) // len(self.layers),
                num_sequences=len(self.files),
                source=f"moe-beyond-csv ({self.kind}):{self.path}",
            )
        return self._meta

    def sequences(self) -> Iterator[SequenceTrace]:
        for seq_id, f in self.files:
            got = read_csv(f, self.num_experts, self.top_k)
            if got.layers != self.layers:
                raise TraceFormatError(
                    f"{f}: layer ids {list(got.layers)} differ from {list(self.layers)} in {self.files[0][1]}"
                )
            T = got.num_tokens
            yield SequenceTrace(
                seq_id=seq_id,
                positions=torch.arange(T),
                experts=got.experts,
                is_prefill=torch.ones(T, dtype=torch.bool),  # one teacher-forced forward pass per prompt
                tokens=got.tokens,
            )


def _count_rows(path: Path) -> int:
    """Data rows of a CSV (quoted newlines respected), without parsing the cells."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            return max(sum(1 for row in csv.reader(fh) if row) - 1, 0)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TraceFormatError(f"{path}: {exc}") from None
