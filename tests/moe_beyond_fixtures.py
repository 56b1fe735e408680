"""Tiny synthetic MoE-Beyond CSVs in the layouts its repository publishes (written by the tests; no
peer data is copied): plain/formatted ``Layer ID,Batch Number,Token,Activated Expert IDs`` and
predicted ``Layer ID,Token,Activated Expert IDs,Predicted Expert IDs``."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

E, K = 16, 4
LAYERS = (1, 2, 5)
SUFFIX = {"plain": "", "formatted": "_formatted", "predicted": "_predicted"}
BASE_HEADER = ("Layer ID", "Batch Number", "Token", "Activated Expert IDs")
PREDICTED_HEADER = ("Layer ID", "Token", "Activated Expert IDs", "Predicted Expert IDs")


def routing(T: int, seed: int = 0) -> torch.Tensor:
    """(L, T, K) distinct expert ids per row."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(len(LAYERS), T, E, generator=g).argsort(-1)[..., :K]


def predictions_for(experts: torch.Tensor, seed: int = 0, width: int = K) -> list[list[list[int]]]:
    """Per (layer, token) a prediction of ``width`` ids that keeps about half of the true set, sorted by id
    (as MoE-Beyond writes them)."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = []
    for li in range(experts.shape[0]):
        rows = []
        for t in range(experts.shape[1]):
            true = experts[li, t].tolist()
            keep = true[: int(torch.randint(0, K + 1, (1,), generator=g))]
            rest = [e for e in torch.randperm(E, generator=g).tolist() if e not in keep]
            rows.append(sorted(keep + rest[: width - len(keep)]))
        out.append(rows)
    return out


def ids_cell(ids) -> str:
    return "[" + ", ".join(str(int(x)) for x in ids) + "]"


def write_prompt(
    path: Path,
    experts: torch.Tensor,
    *,
    kind: str = "plain",
    tokens: list[str] | None = None,
    predicted: list[list[list[int]]] | None = None,
) -> None:
    """Writes one prompt's CSV in ``kind``'s layout (predicted rows list the true ids sorted, as published)."""
    L, T, _ = experts.shape
    tokens = tokens if tokens is not None else [f'Ġtok,{t}"q' for t in range(T)]  # commas, quotes
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        if kind == "predicted":
            w.writerow(PREDICTED_HEADER)
            preds = predicted if predicted is not None else predictions_for(experts)
            for li, layer in enumerate(LAYERS[:L]):
                for t in range(T):
                    w.writerow([layer, t, ids_cell(sorted(experts[li, t].tolist())), ids_cell(preds[li][t])])
        else:
            w.writerow(BASE_HEADER)
            for li, layer in enumerate(LAYERS[:L]):
                for t in range(T):
                    w.writerow([layer, 0, tokens[t], ids_cell(experts[li, t])])


def write_folder(root: Path, kind: str, lengths: dict[int, int], seed: int = 0) -> dict[int, dict]:
    """One file per prompt n (``lengths[n]`` tokens); returns {n: {"experts", "predicted", "tokens"}}."""
    root.mkdir(parents=True, exist_ok=True)
    made = {}
    for n, T in lengths.items():
        experts = routing(T, seed + n)
        preds = predictions_for(experts, seed + n) if kind == "predicted" else None
        tokens = [f"w{n}_{t}" for t in range(T)]
        write_prompt(
            root / f"prompt_{n}_data{SUFFIX[kind]}.csv", experts, kind=kind, tokens=tokens, predicted=preds
        )
        made[n] = {"experts": experts, "predicted": preds, "tokens": tokens}
    return made


def set_cell(path: Path, line: int, column: int, value: str) -> None:
    """Rewrites one cell (1-based line, 0-based column) of a CSV, quoting as csv does."""
    rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    rows[line - 1][column] = value
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
