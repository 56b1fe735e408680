"""Opening a routing trace in any supported format: :func:`detect_format`, :func:`open_trace`, and
:func:`capture` from a live model.

This module sits above the formats (:mod:`moert.trace.store`, :mod:`moert.trace.importers`,
:mod:`moert.trace.record`), which build on :mod:`moert.trace.types` only; each format is imported
when it is first opened.
"""

from __future__ import annotations

import os
from pathlib import Path

from moert.trace.types import MANIFEST, Trace, TraceMeta

__all__ = ["FORMATS", "capture", "detect_format", "open_trace"]

FORMATS = ("moert", "moe-beyond-csv", "esft")


def _has(directory: Path, pattern: str, depth: int) -> bool:
    """Whether ``directory`` or a folder up to ``depth`` levels below it holds a file matching ``pattern``."""
    try:
        if next(directory.glob(pattern), None) is not None:
            return True
        subdirs = sorted(directory.iterdir())[:256] if depth > 0 else []
    except OSError:  # an unreadable folder holds nothing we can read
        return False
    return any(
        _has(sub, pattern, depth - 1) for sub in subdirs if sub.is_dir() and not sub.name.startswith(".")
    )


def detect_format(path: str | os.PathLike) -> str:
    """Guesses a trace's format from its files: ``moert``, ``moe-beyond-csv`` or ``esft``.

    A folder whose CSVs (or ESFT files) sit in folders below it (MoE-Beyond's repository root or
    ``test_datasets/``; ESFT's ``rank_<r>/`` folders) is given that format, so that its importer
    explains which folder to pass or reads the ranks.
    """
    p = Path(path)
    if p.is_dir():
        if (p / MANIFEST).is_file():
            return "moert"
        if next(p.glob("*.csv"), None) is not None:
            return "moe-beyond-csv"
        if next(p.glob("expert_weights_*.txt"), None) is not None:
            return "esft"
        if _has(p, "prompt_*_data*.csv", 2):
            return "moe-beyond-csv"
        if _has(p, "rank_*/expert_weights_*.txt", 0):
            return "esft"
    elif p.is_file():
        if p.name == MANIFEST:
            return "moert"
        if p.suffix == ".csv":
            return "moe-beyond-csv"
    if not p.exists():
        raise FileNotFoundError(f"trace {p} does not exist")
    raise ValueError(
        f"cannot tell the trace format of {p}: expected a directory with {MANIFEST} (moert), "
        "prompt_<n>_data[_formatted|_predicted].csv files (moe-beyond-csv) or expert_weights_<layer>.txt "
        "files (esft); pass format=... explicitly"
    )


def open_trace(path: str | os.PathLike, format: str = "auto", **options) -> Trace:
    """Opens a routing trace for streaming reads.

    Args:
        path: a moert trace directory, a MoE-Beyond CSV directory of one kind (or one CSV), or an ESFT
            directory (flat, or with ``rank_<r>/`` folders).
        format: ``moert``, ``moe-beyond-csv``, ``esft`` or ``auto`` (by content).
        **options: importer options, e.g. ``num_experts=64``, ``top_k=6``, ``model_type=...``.
    """
    if format == "auto":
        format = detect_format(path)
    if format == "moert":
        if options:
            raise ValueError(f"format 'moert' takes no options, got {sorted(options)}")
        from moert.trace.store import MoertTrace

        p = Path(path)
        return MoertTrace(p.parent if p.name == MANIFEST else p)
    if format == "moe-beyond-csv":
        from moert.trace.importers.moe_beyond_csv import MoEBeyondCSVTrace

        return MoEBeyondCSVTrace(path, **options)
    if format == "esft":
        from moert.trace.importers.esft import ESFTTrace

        return ESFTTrace(path, **options)
    raise ValueError(f"unknown trace format {format!r}; use one of {', '.join(FORMATS)} or 'auto'")


def capture(model, prompts, out_dir, **options) -> TraceMeta:
    """Captures a trace from a live model while it generates; see :func:`moert.trace.record.capture`."""
    from moert.trace.record import capture as _capture

    return _capture(model, prompts, out_dir, **options)
