"""Predictor files: safetensors tensors plus a JSON header. Never pickle.

The header lives in the safetensors metadata under ``"moert_predictor"``::

    {"format": "moert-predictor", "version": 1,
     "meta": PredictorMeta.to_json(),      # model_type, layers, E, k, H, kind, arch, dims, ...
     "extra": {...}}                       # kind-specific JSON state (e.g. the token vocabulary)

Loading validates the header and every tensor (finite values, expected names) and raises
ValueError naming the file and the problem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from moert.predict.base import Predictor, PredictorMeta

__all__ = [
    "save_predictor",
    "read_predictor_file",
    "load_predictor",
    "HEADER_KEY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

HEADER_KEY = "moert_predictor"
FORMAT_NAME = "moert-predictor"
FORMAT_VERSION = 1


def save_predictor(
    path: str | os.PathLike,
    meta: PredictorMeta,
    tensors: dict[str, torch.Tensor],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes ``tensors`` and the JSON header to ``path`` (a ``.safetensors`` file)."""
    from safetensors.torch import save_file

    path = Path(path)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"tensor {name!r} of the {meta.kind} predictor holds NaN or inf; refusing to save {path}"
            )
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "meta": meta.to_json(), "extra": extra or {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    try:  # a failed write (a full disk) leaves neither a partial file nor the tmp behind
        save_file(cpu, str(tmp), metadata={HEADER_KEY: json.dumps(header)})
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(
            exc.errno,
            f"writing the predictor {path} failed ({exc.strerror or exc}); free disk space or choose another --out",
        ) from exc
    return path


def read_predictor_file(
    path: str | os.PathLike,
) -> tuple[PredictorMeta, dict[str, torch.Tensor], dict[str, Any]]:
    """Reads and validates a predictor file: ``(meta, tensors, extra)``.

    Raises:
        ValueError: missing file, not safetensors, no or malformed moert header, NaN/inf tensors.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"predictor file {path} not found; train one with `moert train ... --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); it is truncated or corrupt: "
            "copy it again, or train it again with `moert train`"
        ) from None
    raw = metadata.get(HEADER_KEY)
    if raw is None:
        raise ValueError(f"{path}: no '{HEADER_KEY}' header; not a moert predictor file")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: header '{HEADER_KEY}' is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: header field 'format' is not {FORMAT_NAME!r}")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: header version {header.get('version')!r}; this moert reads version {FORMAT_VERSION}"
        )
    try:
        meta = PredictorMeta.from_json(header["meta"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: header field 'meta' is invalid: {exc}") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"{path}: tensor {name!r} holds NaN or inf; the file is corrupt or training diverged"
            )
    extra = header.get("extra", {})
    if not isinstance(extra, dict):
        raise ValueError(f"{path}: header field 'extra' must be a JSON object")
    return meta, tensors, extra


def load_predictor(path: str | os.PathLike) -> Predictor:
    """Loads any saved predictor (the header's ``kind`` picks the class)."""
    meta, tensors, extra = read_predictor_file(path)
    if meta.kind == "preattn":
        from moert.predict.preattn import PreattnPredictor as cls
    elif meta.kind == "xlayer":
        from moert.predict.xlayer import XLayerPredictor as cls
    elif meta.kind == "moe-beyond":
        from moert.predict.moe_beyond import MoEBeyondPredictor as cls
    elif meta.kind == "frequency":
        from moert.predict.baselines import FrequencyPredictor as cls
    elif meta.kind == "prev-token":
        from moert.predict.baselines import PrevTokenPredictor as cls
    elif meta.kind == "reuse":
        raise ValueError(
            f"{path} is a reuse (eviction) model, not a routing predictor: give it as the evictor "
            f"(--policy learned --evictor {path}, or evictor=...); a prefetcher needs a file made by "
            "`moert train --predictor xlayer|preattn|moe-beyond`"
        )
    else:
        raise ValueError(f"{path}: predictor kind {meta.kind!r} cannot be loaded from a file")
    try:
        return cls.from_state(meta, tensors, extra)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        # the classes check their tensors against the header; the file is what is wrong, so name it
        raise ValueError(
            f"{path}: tensors do not match the header ({type(exc).__name__}: {exc}); corrupt file?"
        ) from None
