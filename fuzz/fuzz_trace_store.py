"""Fuzz target: the moert trace format's reader (``moert.trace.store``): the JSON manifest and the
safetensors shards it lists, validated field by field.

Input: the manifest's bytes, then up to two shards' bytes, separated by ``harness.SEP``, written as
``manifest.json``, ``shard_00000.safetensors`` and ``shard_00001.safetensors``. Each input is opened and
every sequence read and validated. Errors must name the trace folder.
"""

from __future__ import annotations

import sys

import atheris
from harness import expect, main, read_sequences, scratch, split

with atheris.instrument_imports(include=["moert"]):
    from moert.trace import open_trace
    from moert.trace import store as _store  # noqa: F401  (instrument open_trace's lazy import)


def _read(folder) -> None:
    read_sequences(open_trace(folder, format="moert"))  # the reader checks the manifest's counts too


def TestOneInput(data: bytes) -> None:
    folder = scratch()
    parts = split(data, 3)
    (folder / "manifest.json").write_bytes(parts[0])
    for i, shard in enumerate(parts[1:]):
        (folder / f"shard_{i:05d}.safetensors").write_bytes(shard)
    expect(lambda: _read(folder), names=str(folder))


if __name__ == "__main__":
    main(TestOneInput)
    sys.exit(0)
