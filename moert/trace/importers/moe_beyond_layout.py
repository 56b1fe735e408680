"""Which MoE-Beyond CSV files a path holds: the three kinds of files its repository publishes.

The MoE-Beyond repository (GitHub ``ngavhane/moe-beyond``) names its per-prompt CSVs by kind:

| kind | file name | where it publishes them | columns |
|---|---|---|---|
| ``plain`` | ``prompt_<n>_data.csv`` | ``expert_activation_scripts/training_data_eamc/`` | ``Layer ID,Batch Number,Token,Activated Expert IDs`` |
| ``formatted`` | ``prompt_<n>_data_formatted.csv`` | ``test_datasets/formatted_csvs/`` | as ``plain`` |
| ``predicted`` | ``prompt_<n>_data_predicted.csv`` | ``test_datasets/predicted_csvs/`` | ``Layer ID,Token,Activated Expert IDs,Predicted Expert IDs`` |

A directory is read as one kind. A directory mixing kinds is an error that lists the files of each
kind: prompt numbers are not shared across kinds (in the published test set, ``formatted_csvs``'
prompt 1 has 19 tokens and ``predicted_csvs``' prompt 1 has 12: different prompts), so merging
them would mislabel sequences. A directory holding no CSVs itself but MoE-Beyond folders below it
(the repository root, ``test_datasets/``) is an error that names those folders and what each holds;
moert does not pick one, since routing-only and routing-plus-predictions folders answer different
questions (``moert simulate`` / ``moert eval --predictions``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from moert.trace.types import TraceFormatError

__all__ = ["KINDS", "CSVFolder", "find_csv_files"]

# kind -> (file-name pattern, the name as users read it, what the files hold)
KINDS: dict[str, tuple[re.Pattern[str], str, str]] = {
    "plain": (re.compile(r"prompt_(\d+)_data\.csv"), "prompt_<n>_data.csv", "routing"),
    "formatted": (
        re.compile(r"prompt_(\d+)_data_formatted\.csv"),
        "prompt_<n>_data_formatted.csv",
        "routing",
    ),
    "predicted": (
        re.compile(r"prompt_(\d+)_data_predicted\.csv"),
        "prompt_<n>_data_predicted.csv",
        "routing + recorded predictions",
    ),
}
_ANY_PROMPT = re.compile(r"prompt_(\d+)\D.*\.csv")
_SHOW = 4  # file names listed per kind in an error
_MAX_DIRS = 256  # directories visited when looking for MoE-Beyond folders below a path


@dataclass(frozen=True)
class CSVFolder:
    """The CSV files of one MoE-Beyond path.

    Attributes:
        path: the directory (or the single file) given.
        kind: ``plain``, ``formatted``, ``predicted``, or ``file`` (one CSV named otherwise).
        files: (prompt number, file) sorted by number; the number is the sequence id.
    """

    path: Path
    kind: str
    files: tuple[tuple[int, Path], ...]


def _kind_of(name: str) -> tuple[str, int] | None:
    for kind, (regex, _, _) in KINDS.items():
        if m := regex.fullmatch(name):
            return kind, int(m.group(1))
    return None


def _by_kind(directory: Path) -> dict[str, list[tuple[int, Path]]]:
    found: dict[str, list[tuple[int, Path]]] = {kind: [] for kind in KINDS}
    for f in directory.iterdir():
        hit = _kind_of(f.name)
        if hit is not None and f.is_file():
            found[hit[0]].append((hit[1], f))
    return {kind: sorted(files) for kind, files in found.items() if files}


def _listing(files: list[tuple[int, Path]]) -> str:
    names = [f.name for _, f in files[:_SHOW]]
    more = f", ... ({len(files)} in all)" if len(files) > _SHOW else ""
    return ", ".join(names) + more


def _folders_below(root: Path, depth: int = 2) -> list[tuple[Path, dict[str, int]]]:
    """(folder, {kind: count}) for folders up to ``depth`` levels below ``root`` holding MoE-Beyond CSVs."""
    out: list[tuple[Path, dict[str, int]]] = []
    frontier, visited = [root], 0
    for _ in range(depth):
        nxt = []
        for d in frontier:
            try:
                subdirs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            for sub in subdirs:
                visited += 1
                if visited > _MAX_DIRS:
                    return out
                try:
                    counts = {kind: len(files) for kind, files in _by_kind(sub).items()}
                except OSError:
                    continue
                if counts:
                    out.append((sub, counts))
                nxt.append(sub)
        frontier = nxt
    return out


def find_csv_files(path: str | os.PathLike) -> CSVFolder:
    """The MoE-Beyond CSVs of a directory (all of one kind) or a single CSV file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        TraceFormatError: no MoE-Beyond CSVs, kinds mixed in one directory, or only folders below
            ``path`` hold them; the message lists the files or folders and says what to pass.
    """
    p = Path(path)
    if p.is_file():
        hit = _kind_of(p.name)
        if hit is not None:
            return CSVFolder(p, hit[0], ((hit[1], p),))
        m = _ANY_PROMPT.fullmatch(p.name)
        return CSVFolder(p, "file", ((int(m.group(1)) if m else 0, p),))
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or directory (expected MoE-Beyond CSVs)")
    found = _by_kind(p)
    if len(found) > 1:
        parts = [
            f"{len(files)} {kind} ({KINDS[kind][1]}: {_listing(files)})" for kind, files in found.items()
        ]
        raise TraceFormatError(
            f"{p}: mixes MoE-Beyond file kinds: {'; '.join(parts)}. Prompt numbers are not shared across "
            "kinds, so one folder must hold one kind: move each kind into a folder of its own "
            "(e.g. the *_data_predicted.csv files into predicted_csvs/) and pass that folder"
        )
    if found:
        kind, files = next(iter(found.items()))
        return CSVFolder(p, kind, tuple(files))
    below = _folders_below(p)
    if below:
        described = "; ".join(
            f"{sub.relative_to(p)}/ ("
            + ", ".join(f"{n} {kind}: {KINDS[kind][2]}" for kind, n in counts.items())
            + ")"
            for sub, counts in below
        )
        raise TraceFormatError(
            f"{p}: holds no MoE-Beyond CSVs itself, but folders below it do: {described}. Pass one of them, "
            f"e.g. {below[0][0]}; each folder is its own set of prompts (in MoE-Beyond's test set, prompt <n> "
            "of formatted_csvs/ and predicted_csvs/ are different prompts)"
        )
    others = sorted(f.name for f in p.glob("*.csv"))
    seen = f"; found {', '.join(others[:_SHOW])}{' ...' if len(others) > _SHOW else ''}" if others else ""
    names = ", ".join(name for _, name, _ in KINDS.values())
    raise TraceFormatError(f"{p}: no MoE-Beyond CSV files (expected {names}){seen}")
