"""Every ``MOERT_*`` environment flag, read in one place (the build reads its own in CMake/setup.py).

| flag | default | meaning |
|---|---|---|
| ``MOERT_DEVICE`` | ``auto`` | ``auto`` (CUDA when one can run, else CPU), ``cpu`` or ``cuda`` |
| ``MOERT_COPY_STREAMS`` | ``2`` | copy streams (CUDA) or worker threads (CPU twin) of the copy engine |
| ``MOERT_SHARED_DIR`` | ``../shared`` | where the shared data (routing traces) lives |
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["device", "copy_streams", "shared_dir"]

_REPO = Path(__file__).resolve().parent.parent


def device() -> str:
    value = os.environ.get("MOERT_DEVICE", "auto").lower()
    if value not in ("auto", "cpu", "cuda"):
        raise ValueError(f"MOERT_DEVICE={value!r} is not one of auto, cpu, cuda")
    return value


def copy_streams() -> int:
    raw = os.environ.get("MOERT_COPY_STREAMS", "2")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"MOERT_COPY_STREAMS={raw!r} is not an integer; use e.g. 2") from None
    if not 1 <= value <= 16:
        raise ValueError(f"MOERT_COPY_STREAMS={value} is out of range; use 1..16")
    return value


def shared_dir() -> Path:
    return Path(os.environ.get("MOERT_SHARED_DIR", _REPO.parent / "shared"))
