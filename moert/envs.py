"""Every ``MOERT_*`` environment flag, read in one place (the build reads its own in CMake/setup.py).

| flag | default | meaning |
|---|---|---|
| ``MOERT_DEVICE`` | ``auto`` | ``auto`` (CUDA when one can run, else CPU), ``cpu``, ``sim`` (the device model), ``cuda`` or ``cuda:N`` |
| ``MOERT_COPY_STREAMS`` | ``2`` | copy streams (CUDA) or worker threads (CPU twin) of the copy engine |
| ``MOERT_SHARED_DIR`` | ``../shared`` | where the shared data (routing traces) lives |
| ``MOERT_SIM_BANDWIDTH_GBS`` | ``25`` | device model (``sim``): each copy stream's bandwidth, GB/s |
| ``MOERT_SIM_LATENCY_US`` | ``10`` | device model: latency of each copy, microseconds |
| ``MOERT_SIM_JITTER_US`` | ``0`` | device model: each operation starts up to this much later (uniform) |
| ``MOERT_SIM_SEED`` | ``0`` | device model: seed of that jitter |
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["device", "copy_streams", "shared_dir", "sim_timing"]

_REPO = Path(__file__).resolve().parent.parent


def device() -> str:
    value = os.environ.get("MOERT_DEVICE", "auto").lower()
    if value not in ("auto", "cpu", "sim", "cuda") and not (
        value.startswith("cuda:") and value[5:].isdigit()
    ):
        raise ValueError(f"MOERT_DEVICE={value!r} is not one of auto, cpu, sim, cuda, cuda:N")
    return value


def _float(name: str, default: float, minimum: float, strict: bool) -> float:
    raw = os.environ.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number; use e.g. {default}") from None
    if not (value > minimum if strict else value >= minimum) or value == float("inf"):
        raise ValueError(f"{name}={raw!r} must be {'>' if strict else '>='} {minimum:g} and finite")
    return value


def sim_timing() -> dict[str, float | int]:
    """The device model's timing: ``bandwidth_gbs``, ``latency_us``, ``jitter_us``, ``seed``."""
    raw_seed = os.environ.get("MOERT_SIM_SEED", "0")
    try:
        seed = int(raw_seed)
    except ValueError:
        raise ValueError(f"MOERT_SIM_SEED={raw_seed!r} is not an integer") from None
    if seed < 0:
        raise ValueError(f"MOERT_SIM_SEED={seed} must be >= 0")
    return {
        "bandwidth_gbs": _float("MOERT_SIM_BANDWIDTH_GBS", 25.0, 0.0, strict=True),
        "latency_us": _float("MOERT_SIM_LATENCY_US", 10.0, 0.0, strict=False),
        "jitter_us": _float("MOERT_SIM_JITTER_US", 0.0, 0.0, strict=False),
        "seed": seed,
    }


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
