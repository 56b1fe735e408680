"""Predictions recorded by a peer next to its routing: MoE-Beyond's ``Predicted Expert IDs`` column.

MoE-Beyond publishes its paper's predictions in ``test_datasets/predicted_csvs/
prompt_<n>_data_predicted.csv``: every row holds, for one (layer, token), the true experts
(``Activated Expert IDs``) and the predicted ones (``Predicted Expert IDs``), so a predicted folder
is both a trace (``open_trace(dir)``) and a set of predictions for it
(:func:`recorded_predictions`). See :mod:`moert.trace.importers.moe_beyond_csv` for the layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from moert.trace.importers.moe_beyond_csv import PREDICTED, CSVRouting, read_csv
from moert.trace.importers.moe_beyond_layout import find_csv_files
from moert.trace.types import TraceFormatError

__all__ = ["recorded_predictions"]

_SHOW = 8


def _read_predictions(f: Path, num_experts: int) -> CSVRouting:
    got = read_csv(f, num_experts)
    if got.predicted is None:
        raise TraceFormatError(
            f"{f}: line 1: no '{PREDICTED}' column, so no recorded predictions; recorded predictions come from "
            f"MoE-Beyond's predicted_csvs (prompt_<n>_data_predicted.csv: Layer ID,Token,Activated Expert IDs,"
            f"{PREDICTED})"
        )
    return got


def _check_alignment(f: Path, n: int, got: CSVRouting, seq: Any, meta: Any, where: str) -> None:
    """Raises unless the file's routing is the trace sequence's (same layers, tokens and experts)."""
    if got.layers != tuple(meta.layers):
        raise TraceFormatError(
            f"{f}: layer ids {list(got.layers)} differ from the trace's {list(meta.layers)} ({where})"
        )
    if got.num_tokens != seq.num_tokens:
        raise TraceFormatError(
            f"{f}: prompt {n} has predictions for {got.num_tokens} tokens, but sequence {n} of {where} has "
            f"{seq.num_tokens}: the predictions were recorded on another prompt. Evaluate them against their "
            "own folder (its Activated Expert IDs are the routing they predict), e.g. "
            f"`moert eval --predictions {f.parent}`"
        )
    if seq.tokens is not None and got.tokens is not None and list(seq.tokens) != got.tokens:
        t = next(i for i, (a, b) in enumerate(zip(seq.tokens, got.tokens)) if a != b)
        raise TraceFormatError(
            f"{f}: token #{t} is {got.tokens[t]!r:.40}, sequence {n} of {where} has {seq.tokens[t]!r:.40}: "
            "the predictions were recorded on another prompt"
        )
    if got.experts.shape[2] != seq.experts.shape[2]:
        raise TraceFormatError(
            f"{f}: routes top-{got.experts.shape[2]}, the trace top-{seq.experts.shape[2]} ({where})"
        )
    mine = got.experts.sort(dim=-1).values  # [L, T, k]
    theirs = seq.experts.long().sort(dim=-1).values
    differ = (mine != theirs).any(-1)  # [L, T]
    if bool(differ.any()):
        li, t = (int(x) for x in differ.nonzero()[0])
        raise TraceFormatError(
            f"{f}: layer {got.layers[li]} token #{t} routes to {mine[li, t].tolist()}, sequence {n} of {where} "
            f"to {theirs[li, t].tolist()}: the predictions were recorded on another run or prompt. Evaluate "
            f"them against their own folder, e.g. `moert eval --predictions {f.parent}`"
        )


def recorded_predictions(
    path: str | os.PathLike, trace: Any = None, *, num_experts: int | None = None
) -> dict[int, torch.Tensor]:
    """The predictions recorded in a MoE-Beyond predicted folder (or one CSV), per sequence.

    Args:
        path: a folder of ``prompt_<n>_data_predicted.csv`` files (any MoE-Beyond CSVs with a
            ``Predicted Expert IDs`` column), or one such file.
        trace: a :class:`~moert.trace.Trace` the predictions must match (e.g. ``open_trace(path)``),
            or None. With a trace, the result holds exactly the trace's sequence ids, and every file
            must have the trace's layer ids, token count, tokens (where both know them) and routed
            experts; a mismatch (missing prompts, another prompt under the same number) is an error.
        num_experts: ``E`` the ids are checked against; default the trace's, else 64.

    Returns:
        ``{seq_id: (L, T, m) int64}``: the ids predicted for each (layer, token), in the file's order
        (MoE-Beyond's lists are sorted by id, not ranked), -1 pads; layer and token order as the
        trace's sequences (``seq.experts``). ``m`` is the longest list in the folder, the same for
        every sequence.

    Raises:
        TraceFormatError: a malformed file, no ``Predicted Expert IDs`` column, or a folder that does
            not match ``trace``; the message names the file (and line) and the fix.
        FileNotFoundError: ``path`` does not exist.
    """
    folder = find_csv_files(path)
    files = dict(folder.files)
    E = num_experts if num_experts is not None else (trace.meta.num_experts if trace is not None else 64)
    out: dict[int, torch.Tensor] = {}
    if trace is None:
        for n, f in folder.files:
            out[n] = _read_predictions(f, E).predicted
    else:
        meta = trace.meta
        where = str(getattr(trace, "path", "the trace"))
        missing = []
        for seq in trace.sequences():
            n = int(seq.seq_id)
            if n not in files:
                missing.append(n)
                continue
            got = _read_predictions(files[n], E)
            _check_alignment(files[n], n, got, seq, meta, where)
            out[n] = got.predicted
        if missing:
            shown = ", ".join(str(n) for n in missing[:_SHOW]) + (" ..." if len(missing) > _SHOW else "")
            raise TraceFormatError(
                f"{folder.path}: no recorded predictions for {len(missing)} of the sequences of {where} "
                f"(prompt {shown}); the folder holds prompts {min(files)}..{max(files)} ({len(files)} files). "
                "Pass the trace these predictions were recorded on (for MoE-Beyond's predicted_csvs: the same "
                "folder), or a trace limited to the prompts it covers"
            )
        if not out:
            raise TraceFormatError(f"{where}: holds no sequences to match {folder.path} against")
    width = max(p.shape[-1] for p in out.values())
    for n, p in out.items():
        if p.shape[-1] < width:
            pad = torch.full((*p.shape[:2], width - p.shape[-1]), -1, dtype=p.dtype)
            out[n] = torch.cat([p, pad], dim=-1)  # [L, T, m]
    return out
