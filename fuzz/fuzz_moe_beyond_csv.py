"""Fuzz target: the MoE-Beyond CSV importer in every published layout, recorded predictions, their metrics.

Input: byte 0 picks the file kind (plain, formatted, predicted, or an odd name), E (16 or 64) and
whether the folder mixes kinds; the rest is 1-3 files' bytes separated by ``harness.SEP``. Each
input is parsed as one file (``read_csv``), as a folder trace (``open_trace``, every sequence), and as
recorded predictions of that trace, evaluated with moert's metrics. Errors must name the folder.
"""

from __future__ import annotations

import sys

import atheris
from harness import check, expect, main, read_sequences, scratch, split

with atheris.instrument_imports(include=["moert"]):
    from moert.predict.evaluate import evaluate_recorded, recorded_overprovision
    from moert.trace import open_trace
    from moert.trace.importers import recorded as _recorded  # noqa: F401  (instrument the lazy import)
    from moert.trace.importers import recorded_predictions
    from moert.trace.importers.moe_beyond_csv import read_csv

NAMES = (
    "prompt_{n}_data.csv",
    "prompt_{n}_data_formatted.csv",
    "prompt_{n}_data_predicted.csv",
    "trace_{n}.csv",
)


def _one_file(path, E: int) -> None:
    got = read_csv(path, E)
    L, T, k = got.experts.shape
    check(len(got.layers) == L and L > 0 and T > 0 and k > 0, f"shape {tuple(got.experts.shape)}")
    check(int(got.experts.min()) >= 0 and int(got.experts.max()) < E, "routed id out of range")
    check(got.tokens is None or len(got.tokens) == T, "token count")
    if got.predicted is not None:
        p = got.predicted
        check(
            p.shape[:2] == (L, T) and (p.numel() == 0 or (int(p.min()) >= -1 and int(p.max()) < E)),
            "predicted",
        )


def _folder(folder, E: int) -> None:
    trace = open_trace(folder, num_experts=E)
    meta = trace.meta
    seqs = read_sequences(trace)
    preds = recorded_predictions(folder, trace)
    check(sorted(preds) == sorted(s.seq_id for s in seqs), "recorded predictions do not cover the trace")
    width = max(int(p.shape[-1]) for p in preds.values())
    result = evaluate_recorded(preds, seqs, meta, overprovision=recorded_overprovision(width, meta.top_k))
    for key in ("exact", "top1", f"recall@{meta.top_k}"):
        value = result["overall"].get(key, 0.0)
        check(0.0 <= value <= 1.0, f"{key}={value}")


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode = data[0]
    kind, E, mixed = mode & 3, (16, 64)[(mode >> 2) & 1], (mode >> 3) & 1
    folder = scratch()
    for i, content in enumerate(split(data[1:], 3)):
        name = NAMES[(kind + i) % 4 if mixed else kind].format(n=i + 1)
        (folder / name).write_bytes(content)
    first = sorted(folder.iterdir())[0]
    expect(lambda: _one_file(first, E), names=str(folder))
    expect(lambda: _folder(folder, E), names=str(folder))


if __name__ == "__main__":
    main(TestOneInput)
    sys.exit(0)
