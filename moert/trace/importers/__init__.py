"""Importers for peers' routing-trace formats; each yields moert :class:`~moert.trace.SequenceTrace` objects.

| module | what |
|---|---|
| ``moe_beyond_layout`` | which MoE-Beyond CSVs a path holds (plain, formatted, predicted; one kind per folder) |
| ``moe_beyond_csv`` | one MoE-Beyond CSV parsed (:func:`read_csv`), a folder as a trace (``MoEBeyondCSVTrace``) |
| ``recorded`` | :func:`recorded_predictions`: MoE-Beyond's ``Predicted Expert IDs``, aligned with a trace |
| ``esft`` | ESFT ``expert_weights_<layer>.txt`` expert-score files as a trace |

Files are untrusted input: every problem raises :class:`~moert.trace.TraceFormatError` naming the
file and line. ``moert trace convert`` turns them into the moert format (the fast path for replay).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from moert.trace.types import TraceFormatError

__all__ = ["numbered_files", "recorded_predictions"]


def numbered_files(path: str | os.PathLike, pattern: str, what: str) -> list[tuple[int, Path]]:
    """(number, file) for every file of directory ``path`` whose name fully matches ``pattern``.

    Args:
        path: the directory.
        pattern: a regex with one group of digits, e.g. ``r"prompt_(\\d+)_data\\.csv"``.
        what: the expected names, for the error, e.g. ``"prompt_<n>_data.csv"``.

    Returns:
        The matches sorted by number.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: not a directory of {what} files")
    regex = re.compile(pattern)
    files = sorted((int(m.group(1)), f) for f in p.iterdir() if (m := regex.fullmatch(f.name)))
    if not files:
        raise TraceFormatError(f"{p}: no {what} files")
    return files


def recorded_predictions(path: str | os.PathLike, trace=None, *, num_experts: int | None = None):
    """``{seq_id: (L, T, m) int64}`` predictions recorded in a MoE-Beyond predicted folder, -1 pads;
    see :func:`moert.trace.importers.recorded.recorded_predictions`."""
    from moert.trace.importers.recorded import recorded_predictions as _recorded

    return _recorded(path, trace, num_experts=num_experts)
