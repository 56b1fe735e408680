"""MoE-Beyond routing CSVs: one file per prompt, ``prompt_<n>_data.csv``.

Header (one of)::

    Layer ID,Batch Number,Token,Activated Expert IDs[,Predicted Expert IDs]
    Layer ID,Token,Activated Expert IDs[,Predicted Expert IDs]

Rows are grouped by layer (all tokens of the first MoE layer, then the next, ...); every layer
lists the prompt's tokens in the same order. Expert ids are a JSON-style list, e.g.
``"[8, 18, 32, 46, 56, 54]"`` (a set: order carries no meaning). ``Predicted Expert IDs`` is
ignored. The files say nothing about ``E``; the default (64) is DeepSeek-V2-Lite's.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from moert.trace import SequenceTrace, Trace, TraceFormatError, TraceMeta
from moert.trace.importers import numbered_files

__all__ = ["HEADERS", "MoEBeyondCSVTrace", "list_csv_files", "parse_csv"]

HEADERS = (
    ("Layer ID", "Batch Number", "Token", "Activated Expert IDs"),
    ("Layer ID", "Token", "Activated Expert IDs"),
)
_OPTIONAL = "Predicted Expert IDs"
_NAME = re.compile(r"prompt_(\d+)_data\.csv")


def list_csv_files(path: str | os.PathLike) -> list[tuple[int, Path]]:
    """(prompt number, file) for a CSV file or every ``prompt_<n>_data.csv`` of a directory, by number."""
    p = Path(path)
    if p.is_file():
        m = _NAME.fullmatch(p.name)
        return [(int(m.group(1)) if m else 0, p)]
    return numbered_files(p, _NAME.pattern, "prompt_<n>_data.csv")


def _read_rows(path: Path):
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TraceFormatError(f"{path}: not UTF-8 text: {exc}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = tuple(h.strip() for h in next(reader))
    except StopIteration:
        raise TraceFormatError(f"{path}: line 1: empty file, expected a header") from None
    except csv.Error as exc:
        raise TraceFormatError(f"{path}: line 1: {exc}") from None
    base = header[:-1] if header and header[-1] == _OPTIONAL else header
    if base not in HEADERS:
        wanted = " or ".join(repr(",".join(h)) for h in HEADERS)
        raise TraceFormatError(
            f"{path}: line 1: header {','.join(header)!r} is not a MoE-Beyond header; expected {wanted} "
            f"(optionally followed by ',{_OPTIONAL}')"
        )
    return header, reader


def _parse_ids(cell: str) -> list[int]:
    s = cell.strip()
    if len(s) < 2 or s[0] != "[" or s[-1] != "]":
        raise ValueError(f"expert ids {cell!r:.60} are not a list like [1, 2, 3]")
    inner = s[1:-1].strip()
    if not inner:
        raise ValueError("expert id list is empty")
    try:
        return [int(x) for x in inner.split(",")]
    except ValueError:
        raise ValueError(f"expert ids {cell!r:.60} are not integers") from None


def parse_csv(
    path: str | os.PathLike, num_experts: int = 64, top_k: int | None = None
) -> tuple[tuple[int, ...], list[str], torch.Tensor]:
    """Parses and validates one MoE-Beyond CSV.

    Args:
        path: the CSV file.
        num_experts: ``E``; ids must be in [0, E).
        top_k: expected ``k``, or None to take it from the first row.

    Returns:
        (layer ids in file order, the T token strings, experts (L, T, k) int64).
    """
    path = Path(path)
    header, reader = _read_rows(path)
    ncols = len(header)
    col_batch = header.index("Batch Number") if "Batch Number" in header else None
    col_token = header.index("Token")
    col_ids = header.index("Activated Expert IDs")

    layers: list[int] = []
    tokens: list[str] = []  # tokens of the first layer
    flat: list[int] = []
    k = top_k
    j = 0  # index of the row within the current layer
    line = 1
    try:
        for row in reader:
            line = reader.line_num
            if len(row) != ncols:
                if not row:
                    continue
                raise ValueError(f"expected {ncols} fields, got {len(row)}")
            try:
                layer = int(row[0])
            except ValueError:
                raise ValueError(f"Layer ID {row[0]!r:.40} is not an integer") from None
            if col_batch is not None and row[col_batch].strip() != "0":
                raise ValueError(
                    f"Batch Number {row[col_batch]!r:.40} is not 0 (one prompt per file is supported)"
                )
            if not layers or layer != layers[-1]:
                if layers and j != len(tokens):
                    raise ValueError(
                        f"layer {layers[-1]} has {j} tokens but layer {layers[0]} has {len(tokens)} "
                        "(truncated or inconsistent file)"
                    )
                if layer in layers:
                    raise ValueError(
                        f"layer {layer} appears again after layer {layers[-1]}; rows must be grouped by layer"
                    )
                if layer < 0:
                    raise ValueError(f"Layer ID {layer} is negative")
                layers.append(layer)
                j = 0
            token = row[col_token]
            if len(layers) == 1:
                tokens.append(token)
            elif j >= len(tokens):
                raise ValueError(f"layer {layer} has more tokens than layer {layers[0]} ({len(tokens)})")
            elif token != tokens[j]:
                raise ValueError(
                    f"layer {layer} token #{j} is {token!r}, layer {layers[0]} has {tokens[j]!r}"
                )
            ids = _parse_ids(row[col_ids])
            if k is None:
                k = len(ids)
            if len(ids) != k:
                raise ValueError(f"{len(ids)} expert ids, expected top-k = {k}")
            if len(set(ids)) != k:
                raise ValueError(f"expert ids {ids} repeat an id")
            for e in ids:
                if not 0 <= e < num_experts:
                    raise ValueError(
                        f"expert id {e} is out of range [0, {num_experts}); pass --num-experts if the model has more"
                    )
            flat.extend(ids)
            j += 1
    except csv.Error as exc:
        raise TraceFormatError(f"{path}: line {reader.line_num}: {exc}") from None
    except ValueError as exc:
        raise TraceFormatError(f"{path}: line {line}: {exc}") from None
    if not layers:
        raise TraceFormatError(f"{path}: line {line}: no data rows after the header")
    if j != len(tokens):
        raise TraceFormatError(
            f"{path}: line {line}: layer {layers[-1]} has {j} tokens but layer {layers[0]} has {len(tokens)} "
            "(truncated file?)"
        )
    experts = torch.from_numpy(np.asarray(flat, dtype=np.int64).reshape(len(layers), len(tokens), k))
    return tuple(layers), tokens, experts


class MoEBeyondCSVTrace(Trace):
    """A directory of MoE-Beyond CSVs (or one CSV) read as a trace, one prompt per sequence.

    Args:
        path: directory of ``prompt_<n>_data.csv`` files, or one such file.
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
        self.path = Path(path)
        self.files = list_csv_files(self.path)
        self.num_experts = num_experts
        self.model_type = model_type
        first_layers, _, first_experts = parse_csv(self.files[0][1], num_experts, top_k)
        self.layers = first_layers
        self.top_k = int(first_experts.shape[2])
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
                source=f"moe-beyond-csv:{self.path}",
            )
        return self._meta

    def sequences(self) -> Iterator[SequenceTrace]:
        for seq_id, f in self.files:
            layers, tokens, experts = parse_csv(f, self.num_experts, self.top_k)
            if layers != self.layers:
                raise TraceFormatError(
                    f"{f}: layer ids {list(layers)} differ from {list(self.layers)} in {self.files[0][1]}"
                )
            T = len(tokens)
            yield SequenceTrace(
                seq_id=seq_id,
                positions=torch.arange(T),
                experts=experts,
                is_prefill=torch.ones(T, dtype=torch.bool),  # one teacher-forced forward pass per prompt
                tokens=tokens,
            )


def _count_rows(path: Path) -> int:
    """Data rows of a CSV (quoted newlines respected), without parsing the cells."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return max(sum(1 for row in csv.reader(fh) if row) - 1, 0)
