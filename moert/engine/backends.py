"""The expert store for an offload backend (``OffloadConfig.backend``): ``"runtime"`` builds the native
pool and an ``Offloader``; ``"reference"`` and ``"naive"`` the test reference and the benchmark baseline
(``moert.engine.reference``). It sits above both so that neither imports the other's module."""

from __future__ import annotations

from typing import Any

from moert.engine import runtime
from moert.engine.offloader import Offloader, OffloaderBase
from moert.engine.reference import HostPool, NaiveStore, ReferenceStore

__all__ = ["make_pool", "make_offloader"]


def make_pool(backend: str, num_layers: int, num_experts: int, slab_bytes: int, device: str) -> Any:
    """The host pool for ``backend``: ``runtime.ExpertPool`` (page-locked when the cache is on CUDA) or
    ``moert.engine.reference.HostPool``."""
    if backend == "reference":
        return HostPool(num_layers, num_experts, slab_bytes)
    return runtime.ExpertPool(num_layers, num_experts, slab_bytes, pin=device.startswith("cuda"))


def make_offloader(
    backend: str, *args: Any, policy: str, min_slots: int, copy_streams: int, **kwargs: Any
) -> OffloaderBase:
    """The offloader for ``backend``: ``"runtime"`` (``Offloader``), ``"reference"`` or ``"naive"``
    (``moert.engine.reference``); ``*args, **kwargs`` are ``OffloaderBase``'s."""
    if backend == "reference":
        return ReferenceStore(*args, policy=policy, **kwargs)
    if backend == "naive":
        return NaiveStore(*args, **kwargs)
    return Offloader(*args, policy=policy, min_slots=min_slots, copy_streams=copy_streams, **kwargs)
