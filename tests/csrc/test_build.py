"""The build follows the toolchain: nvcc present => CUDA backend compiled; no driver => clean refusal."""

from __future__ import annotations

import shutil

import pytest

from moert import _C
from moert.engine import runtime


def test_cuda_backend_compiled_whenever_nvcc_exists():
    if shutil.which("nvcc"):
        assert _C.cuda_compiled() is True, "nvcc is on PATH but the CUDA backend was not compiled"
    info = runtime.backends()
    assert info["cpu"] == {"compiled": True, "can_run": True, "reason": ""}
    assert info["cuda"]["compiled"] is _C.cuda_compiled()


def test_no_cuda_device_is_reported_cleanly():
    import torch

    info = runtime.backends()["cuda"]
    if torch.cuda.is_available():
        assert info["can_run"], info
        return
    assert info["can_run"] is False
    assert "no CUDA device" in info["reason"], info
    if _C.cuda_probe()["error_code"] == 35:  # named: no driver, or one older than the runtime (both versions)
        assert "no CUDA driver is installed" in info["reason"] or "driver is too old" in info["reason"], info
    pool = runtime.ExpertPool(1, 2, 64, pin=False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        runtime.SlabCache(pool, 1, device="cuda")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        runtime.ExpertPool(1, 2, 64, pin=True)
    assert runtime.ExpertPool(1, 2, 64).pinned is False  # pin=None: pin only when CUDA can run
