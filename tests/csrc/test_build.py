"""The CUDA backend is compiled by default (the driver API is loaded at run time: no toolkit needed);
no driver => clean refusal."""

from __future__ import annotations

import pytest

from moert import _C
from moert.engine import runtime


def test_cuda_backend_compiled_by_default():
    assert _C.cuda_compiled() is True, "the default build (MOERT_CUDA=AUTO) did not compile the CUDA backend"
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
    if _C.cuda_probe()["error_code"] == -1:  # no usable driver library: named, with the fix
        assert "could not be loaded" in info["reason"] or "driver is too old" in info["reason"], info
    pool = runtime.ExpertPool(1, 2, 64, pin=False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        runtime.SlabCache(pool, 1, device="cuda")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        runtime.ExpertPool(1, 2, 64, pin=True)
    assert runtime.ExpertPool(1, 2, 64).pinned is False  # pin=None: pin only when CUDA can run
