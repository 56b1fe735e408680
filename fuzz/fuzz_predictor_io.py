"""Fuzz target: predictor files (``moert.predict.io``): the safetensors container, the JSON header
under ``moert_predictor`` and the tensors the header's kind expects.

Input, one of:

- the bytes of one ``.safetensors`` file (mutations reach the container and its header length);
- ``H`` + the ``moert_predictor`` header text + ``harness.SEP`` + a ``.safetensors`` file: the file's
  tensors (when it reads) are written again under that header, so that mutations of the JSON reach
  the header checks and each kind's ``from_state`` instead of breaking the container's length prefix.

Each input is read (``read_predictor_file``) and loaded (``load_predictor``: the header picks the
class, which rebuilds itself from the tensors). Errors must name the file.
"""

from __future__ import annotations

import sys

import atheris
from harness import SEP, check, expect, main, scratch

with atheris.instrument_imports(include=["moert"]):
    # load_predictor imports the class a header names lazily: import them here to instrument them
    from moert.predict import baselines, moe_beyond, preattn, xlayer  # noqa: F401
    from moert.predict.io import HEADER_KEY, load_predictor, read_predictor_file

from safetensors.torch import load as load_tensors
from safetensors.torch import save_file

_TENSORS: dict[bytes, dict] = {}  # tensors of the container part of header-mode inputs, by bytes


def _tensors(blob: bytes) -> dict:
    if blob not in _TENSORS:
        try:
            got = load_tensors(blob)
        except Exception:  # the harness's own input preparation: a blob that does not read has no tensors
            got = {}
        if len(_TENSORS) > 256:
            _TENSORS.clear()
        _TENSORS[blob] = got
    return _TENSORS[blob]


def _read(path) -> None:
    meta, tensors, extra = read_predictor_file(path)
    check(isinstance(extra, dict) and isinstance(tensors, dict), "header parts")
    pred = load_predictor(path)
    check(pred.meta == meta, "load_predictor's meta differs from the header's")


def TestOneInput(data: bytes) -> None:
    path = scratch() / "p.safetensors"
    if data[:1] == b"H":
        header, _, blob = data[1:].partition(SEP)
        text = header.decode("utf-8", "replace")
        save_file(_tensors(blob), str(path), metadata={HEADER_KEY: text})
    else:
        path.write_bytes(data)
    expect(lambda: _read(path), names=str(path))


if __name__ == "__main__":
    main(TestOneInput)
    sys.exit(0)
