"""Seeding, the ``gpu`` / ``slow`` markers (slow tests run only with ``-m slow``) and the shared-data
fixture, in one place."""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _cuda_can_run() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    # slow tests (minutes) run only when asked for by name: pytest -m slow
    # (deselected, not skipped: a skip would read as a test that ran)
    if "slow" not in (config.option.markexpr or ""):
        slow = [item for item in items if "slow" in item.keywords]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if "slow" not in item.keywords]
    if _cuda_can_run():
        return
    if config.getoption("markexpr", "").strip() == "gpu" and not config.getoption("collectonly", False):
        # `make test-gpu` / `pytest -m gpu` must not "pass" with every test skipped
        raise pytest.UsageError(
            "pytest -m gpu: no usable CUDA device here (torch.cuda.is_available() is False), so every GPU "
            "test would be skipped; run it on a machine with a GPU (bench/gpu_session.sh), or use "
            "--collect-only to check that the GPU tests collect"
        )
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; run `make test-gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shared_traces():
    """The real DeepSeek-V2-Lite-Chat routing traces in ../shared (never copied into the repo)."""
    from moert import envs

    path = envs.shared_dir() / "data" / "traces" / "deepseek-v2-lite-chat-puffin"
    if not path.is_dir():
        pytest.skip(f"shared traces not found at {path} (set MOERT_SHARED_DIR to the shared/ folder)")
    return path
