"""moert: an MoE expert-offloading runtime.

Importing moert touches no CUDA and no network, and imports neither transformers nor torch
(tests/test_lean_import.py proves it); the public API below is imported on first use.

    handle = moert.patch(model, cache_experts=0.25, policy="lru")
    handle.stats(); handle.undo()
    model = moert.load(path, cache_experts=0.25, policy="lru")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "patch", "load", "OffloadConfig", "Stats", "LayerStats", "PatchHandle", "handle_of"]

# public name -> module that defines it
_LAZY = {
    "patch": "moert.api.patch",
    "PatchHandle": "moert.api.handle",
    "handle_of": "moert.api.handle",
    "load": "moert.api.load",
    "OffloadConfig": "moert.api.config",
    "Stats": "moert.engine.stats",
    "LayerStats": "moert.engine.stats",
}

if TYPE_CHECKING:
    from moert.api.config import OffloadConfig
    from moert.api.handle import PatchHandle, handle_of
    from moert.api.load import load
    from moert.api.patch import patch
    from moert.engine.stats import LayerStats, Stats


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
