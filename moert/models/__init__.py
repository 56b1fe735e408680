"""Model adapters, one per supported ``config.model_type`` (registry below).

Importing this package imports neither transformers nor the adapters' modules; ``get_adapter``
imports the one it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from moert.models.base import ExpertKey, ModelAdapter, MoELayerRef

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ModelAdapter",
    "MoELayerRef",
    "ExpertKey",
    "get_adapter",
    "adapter_class",
    "SUPPORTED",
    "register",
]

# model_type -> "module:Class"
_REGISTRY: dict[str, str] = {
    "deepseek_v2": "moert.models.deepseek_v2:DeepseekV2Adapter",
    "qwen3_moe": "moert.models.qwen3_moe:Qwen3MoeAdapter",
    "phimoe": "moert.models.phimoe:PhimoeAdapter",
}
SUPPORTED: tuple[str, ...] = tuple(_REGISTRY)


def register(model_type: str, target: str) -> None:
    """Register an adapter class (``"package.module:Class"``) for ``model_type``."""
    global SUPPORTED
    _REGISTRY[model_type] = target
    SUPPORTED = tuple(_REGISTRY)


def adapter_class(model_type: str | None) -> type[ModelAdapter]:
    """The adapter class for ``model_type``; ValueError listing the supported ones otherwise."""
    target = _REGISTRY.get(model_type or "")
    if target is None:
        raise ValueError(
            f"moert does not support model_type {model_type!r}; supported: {', '.join(sorted(_REGISTRY))}. "
            "Use a model of a supported type, or add an adapter for it in moert/models/"
        )
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model`` (keyed by ``model.config.model_type``)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} has no `.config`; pass an HF transformers model of one of: "
            f"{', '.join(sorted(_REGISTRY))}"
        )
    return adapter_class(getattr(config, "model_type", None))(model)
