"""ESFT expert-score text files (deepseek-ai/ESFT ``get_expert_scores.py`` output).

One file per MoE layer, ``expert_weights_<layer>.txt`` (deepseek-ai/ESFT publishes them in
``results/expert_scores/<task>/``, layers 1..26, beside a ``summary.json`` that is ignored). Line i
of every file is the same sample (sequence): the top-k expert ids of each token flattened and
tab-separated (in the router's order), then a double tab, then the matching gate weights (4
decimals), tab-separated::

    8<TAB>26<TAB>56 ... 50<TAB><TAB>0.0414<TAB>0.047 ... 0.0003

ESFT's multi-process scorer (``scripts/expert/get_expert_scores.py``) writes one such set per
process into ``<output_dir>/rank_<r>/``; a folder of ``rank_<r>/`` folders is read rank by rank
(sequence ids run on across ranks), and every rank must hold the same layers.

``k`` cannot be read from a line (ids are flattened), so it is an option (default 6 with E = 64,
DeepSeek-V2-Lite, which ESFT uses). Gate weights are validated (count, finite) but not stored:
they are k of the E scores, not the router's score row.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from moert.trace.importers import numbered_files
from moert.trace.types import SequenceTrace, Trace, TraceFormatError, TraceMeta, check_expert_ids

__all__ = ["ESFTTrace", "list_layer_files", "list_parts", "parse_line"]

_NAME = r"expert_weights_(\d+)\.txt"
_RANK = re.compile(r"rank_(\d+)")


def list_layer_files(path: str | os.PathLike) -> list[tuple[int, Path]]:
    """(layer id, file) for every ``expert_weights_<layer>.txt`` in a directory, by layer id."""
    return numbered_files(path, _NAME, "expert_weights_<layer>.txt")


def list_parts(path: str | os.PathLike) -> list[list[tuple[int, Path]]]:
    """The layer files of a flat ESFT folder (one part), or of each ``rank_<r>/`` folder by rank.

    Raises:
        TraceFormatError: both flat files and rank folders, or ranks with different layers.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: not a directory of expert_weights_<layer>.txt files")
    ranks = sorted((int(m.group(1)), d) for d in p.iterdir() if (m := _RANK.fullmatch(d.name)) and d.is_dir())
    flat = next(p.glob("expert_weights_*.txt"), None)
    if not ranks or flat is not None:
        if ranks:
            raise TraceFormatError(
                f"{p}: holds both expert_weights_<layer>.txt files and rank_<r>/ folders; pass one of them"
            )
        return [list_layer_files(p)]
    parts = [list_layer_files(d) for _, d in ranks]
    first = [layer for layer, _ in parts[0]]
    for part in parts[1:]:
        layers = [layer for layer, _ in part]
        if layers != first:
            raise TraceFormatError(
                f"{part[0][1].parent}: layers {layers} differ from {first} in {parts[0][0][1].parent}; every "
                "rank folder must hold the same expert_weights_<layer>.txt files"
            )
    return parts


def parse_line(line: str, top_k: int, num_experts: int) -> torch.Tensor:
    """Parses one sample line into experts (T, k) int64; raises ValueError describing the problem."""
    line = line.rstrip("\r\n")
    parts = line.split("\t\t")
    if len(parts) != 2:
        raise ValueError(
            f"expected expert ids, a double tab, then gate weights; found {len(parts) - 1} double tabs"
        )
    id_text, weight_text = parts
    try:
        ids = [int(x) for x in id_text.split("\t")]
    except ValueError:
        raise ValueError(f"expert ids are not tab-separated integers: {id_text[:60]!r}") from None
    try:
        weights = [float(x) for x in weight_text.split("\t")]
    except ValueError:
        raise ValueError(f"gate weights are not tab-separated numbers: {weight_text[:60]!r}") from None
    if len(ids) % top_k:
        raise ValueError(f"{len(ids)} expert ids is not a multiple of top_k={top_k}; pass --top-k")
    if len(weights) != len(ids):
        raise ValueError(f"{len(ids)} expert ids but {len(weights)} gate weights")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError("gate weights contain NaN or inf")

    def error(msg: str) -> ValueError:
        return ValueError(msg + ("; pass --num-experts" if "range" in msg else ""))

    bad = next((i for i in ids if not 0 <= i < num_experts), None)
    if bad is not None:  # before numpy: an id past int64 must be a clear error, not an OverflowError
        raise error(f"expert id {str(bad)[:40]} is out of range [0, {num_experts})")
    experts = torch.from_numpy(np.asarray(ids, dtype=np.int64).reshape(-1, top_k))  # [T, k]
    check_expert_ids(experts, num_experts, error)
    return experts


class ESFTTrace(Trace):
    """A directory of ESFT ``expert_weights_<layer>.txt`` files read as a trace, one line per sequence.

    Args:
        path: the directory (flat, or holding ``rank_<r>/`` folders).
        num_experts: ``E`` (default 64).
        top_k: ``k`` (default 6).
        model_type: recorded in the meta (default ``deepseek_v2``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        num_experts: int = 64,
        top_k: int = 6,
        model_type: str = "deepseek_v2",
    ) -> None:
        self.path = Path(path)
        self.parts = list_parts(self.path)
        self.files = self.parts[0]
        self.num_experts, self.top_k, self.model_type = num_experts, top_k, model_type
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
        self._meta: TraceMeta | None = None

    @property
    def meta(self) -> TraceMeta:
        if self._meta is None:
            tokens = lines = 0
            for part in self.parts:
                try:
                    with open(part[0][1], encoding="utf-8") as fh:
                        for line in fh:
                            lines += 1
                            tokens += (line.split("\t\t", 1)[0].count("\t") + 1) // self.top_k
                except UnicodeDecodeError as exc:
                    raise TraceFormatError(f"{part[0][1]}: not UTF-8 text: {exc}") from None
            self._meta = TraceMeta(
                model_type=self.model_type,
                layers=tuple(layer for layer, _ in self.files),
                num_experts=self.num_experts,
                top_k=self.top_k,
                num_tokens=tokens,
                num_sequences=lines,
                source=f"esft:{self.path}",
            )
        return self._meta

    def sequences(self) -> Iterator[SequenceTrace]:
        seq_id = 0
        for part in self.parts:
            for seq in self._part_sequences(part, seq_id):
                yield seq
                seq_id += 1

    def _part_sequences(self, files: list[tuple[int, Path]], first_id: int) -> Iterator[SequenceTrace]:
        """The samples of one folder's layer files, ids from ``first_id``; lines are 1-based per file."""
        with ExitStack() as stack:
            handles = [stack.enter_context(open(f, encoding="utf-8")) for _, f in files]
            line_no = 0
            while True:
                lines = []
                for (_, f), fh in zip(files, handles):
                    try:
                        lines.append(fh.readline())
                    except UnicodeDecodeError as exc:
                        raise TraceFormatError(f"{f}: line {line_no + 1}: not UTF-8 text: {exc}") from None
                ended = [not line for line in lines]
                if all(ended):
                    return
                line_no += 1
                if any(ended):
                    short = files[ended.index(True)][1]
                    raise TraceFormatError(
                        f"{short}: line {line_no}: file ends early; {files[ended.index(False)][1]} has more "
                        "samples (truncated file?)"
                    )
                per_layer = []
                for (_, f), line in zip(files, lines):
                    try:
                        per_layer.append(parse_line(line, self.top_k, self.num_experts))
                    except ValueError as exc:
                        raise TraceFormatError(f"{f}: line {line_no}: {exc}") from None
                T = per_layer[0].shape[0]
                for (_, f), e in zip(files, per_layer):
                    if e.shape[0] != T:
                        raise TraceFormatError(
                            f"{f}: line {line_no}: {e.shape[0]} tokens, but {files[0][1]} has {T} "
                            "for the same sample"
                        )
                yield SequenceTrace(
                    seq_id=first_id + line_no - 1,
                    positions=torch.arange(T),
                    experts=torch.stack(per_layer),  # [L, T, k]
                    is_prefill=torch.ones(T, dtype=torch.bool),
                )
