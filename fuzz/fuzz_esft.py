"""Fuzz target: the ESFT expert-score importer (flat folders and ``rank_<r>/`` folders).

Input: byte 0 picks k (1..8), E (16 or 64) and whether the files go into two rank folders; the rest is
1-4 layer files' bytes (``expert_weights_<layer>.txt``) separated by ``harness.SEP``. Each input is read
as a trace, every sequence validated, the meta's counts checked against what was read. Errors must
name the folder.
"""

from __future__ import annotations

import sys

import atheris
from harness import expect, main, read_sequences, scratch, split

with atheris.instrument_imports(include=["moert"]):
    from moert.trace import open_trace
    from moert.trace.importers import esft as _esft  # noqa: F401  (instrument open_trace's lazy import)


def _read(folder, k: int, E: int) -> None:
    read_sequences(open_trace(folder, format="esft", top_k=k, num_experts=E))


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode = data[0]
    k, E, ranks = 1 + (mode & 7), (16, 64)[(mode >> 3) & 1], (mode >> 4) & 1
    folder = scratch()
    parts = split(data[1:], 4)
    for i, content in enumerate(parts):
        where = folder / f"rank_{i % 2}" if ranks else folder
        where.mkdir(exist_ok=True)
        layer = i // 2 + 1 if ranks else i + 1
        (where / f"expert_weights_{layer}.txt").write_bytes(content)
    expect(lambda: _read(folder, k, E), names=str(folder))


if __name__ == "__main__":
    main(TestOneInput)
    sys.exit(0)
