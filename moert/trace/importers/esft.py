"""ESFT expert-score text files (deepseek-ai/ESFT ``get_expert_scores.py`` output).

One file per MoE layer, ``expert_weights_<layer>.txt``. Line i of every file is the same sample
(sequence): the top-k expert ids of each token flattened and tab-separated, then a double tab,
then the matching gate weights, tab-separated::

    8<TAB>26<TAB>56 ... 50<TAB><TAB>0.0414<TAB>0.047 ... 0.0003

``k`` cannot be read from a line (ids are flattened), so it is an option (default 6 with E = 64,
DeepSeek-V2-Lite, which ESFT uses). Gate weights are validated (count, finite) but not stored:
they are k of the E scores, not the router's score row.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from moert.trace import SequenceTrace, Trace, TraceFormatError, TraceMeta, check_expert_ids
from moert.trace.importers import numbered_files

__all__ = ["ESFTTrace", "list_layer_files", "parse_line"]

_NAME = r"expert_weights_(\d+)\.txt"


def list_layer_files(path: str | os.PathLike) -> list[tuple[int, Path]]:
    """(layer id, file) for every ``expert_weights_<layer>.txt`` in a directory, by layer id."""
    return numbered_files(path, _NAME, "expert_weights_<layer>.txt")


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
    experts = torch.from_numpy(np.asarray(ids, dtype=np.int64).reshape(-1, top_k))  # [T, k]

    def error(msg: str) -> ValueError:
        return ValueError(msg + ("; pass --num-experts" if "range" in msg else ""))

    check_expert_ids(experts, num_experts, error)
    return experts


class ESFTTrace(Trace):
    """A directory of ESFT ``expert_weights_<layer>.txt`` files read as a trace, one line per sequence.

    Args:
        path: the directory.
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
        self.files = list_layer_files(self.path)
        self.num_experts, self.top_k, self.model_type = num_experts, top_k, model_type
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
        self._meta: TraceMeta | None = None

    @property
    def meta(self) -> TraceMeta:
        if self._meta is None:
            tokens = lines = 0
            with open(self.files[0][1], encoding="utf-8") as fh:
                for line in fh:
                    lines += 1
                    tokens += (line.split("\t\t", 1)[0].count("\t") + 1) // self.top_k
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
        with ExitStack() as stack:
            handles = [stack.enter_context(open(f, encoding="utf-8")) for _, f in self.files]
            seq_id = 0
            while True:
                lines = [fh.readline() for fh in handles]
                ended = [not line for line in lines]
                if all(ended):
                    return
                line_no = seq_id + 1
                if any(ended):
                    short = self.files[ended.index(True)][1]
                    raise TraceFormatError(
                        f"{short}: line {line_no}: file ends early; {self.files[ended.index(False)][1]} has more "
                        "samples (truncated file?)"
                    )
                per_layer = []
                for (_, f), line in zip(self.files, lines):
                    try:
                        per_layer.append(parse_line(line, self.top_k, self.num_experts))
                    except ValueError as exc:
                        raise TraceFormatError(f"{f}: line {line_no}: {exc}") from None
                T = per_layer[0].shape[0]
                for (_, f), e in zip(self.files, per_layer):
                    if e.shape[0] != T:
                        raise TraceFormatError(
                            f"{f}: line {line_no}: {e.shape[0]} tokens, but {self.files[0][1]} has {T} "
                            "for the same sample"
                        )
                yield SequenceTrace(
                    seq_id=seq_id,
                    positions=torch.arange(T),
                    experts=torch.stack(per_layer),  # [L, T, k]
                    is_prefill=torch.ones(T, dtype=torch.bool),
                )
                seq_id += 1
