"""Importers for peers' routing-trace formats; each yields moert :class:`~moert.trace.SequenceTrace` objects.

Files are untrusted input: every problem raises :class:`~moert.trace.TraceFormatError` naming the
file and line. ``moert trace convert`` turns them into the moert format (the fast path for replay).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from moert.trace import TraceFormatError

__all__ = ["numbered_files"]


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
