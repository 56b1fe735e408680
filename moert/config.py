"""``OffloadConfig``: how ``moert.patch`` / ``moert.load`` offload a model's routed experts."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["OffloadConfig", "POLICIES", "BACKENDS"]

POLICIES = ("lru", "lfu")
#: "runtime": the C++ pool / slab cache / copy engine (moert.runtime); "reference": a pure-Python
#: dict cache with synchronous copies (the obviously-correct reference, for tests); "naive": no
#: cache, every selected expert copied on every use (the Accelerate-style baseline of bench/)
BACKENDS = ("runtime", "reference", "naive")


@dataclass(frozen=True)
class OffloadConfig:
    """Offloading settings.

    Attributes:
        cache_experts: device cache size. An int is a number of slots (experts over all MoE layers);
            a float in (0, 1] is a fraction of all routed experts (rounded up).
        policy: eviction policy, ``"lru"`` or ``"lfu"``.
        device: ``"cuda"``, ``"cpu"`` (the CPU twin: slots in host memory) or None (CUDA when one can
            run, else CPU; ``MOERT_DEVICE`` overrides).
        copy_streams: copy streams (CUDA) / worker threads (CPU twin); None reads ``MOERT_COPY_STREAMS``.
        backend: ``"runtime"`` (default), ``"reference"`` (pure-Python cache, for tests) or ``"naive"``
            (no cache: copy every selected expert on every use; a benchmark baseline).
    """

    cache_experts: int | float = 0.25
    policy: str = "lru"
    device: str | None = None
    copy_streams: int | None = None
    backend: str = "runtime"

    def __post_init__(self) -> None:
        ce = self.cache_experts
        if isinstance(ce, bool) or not isinstance(ce, (int, float)):
            raise ValueError(f"cache_experts={ce!r} must be an int (slots) or a float fraction in (0, 1]")
        if isinstance(ce, float) and not (math.isfinite(ce) and 0.0 < ce <= 1.0):
            raise ValueError(
                f"cache_experts={ce!r} is not a fraction in (0, 1]; use e.g. 0.25 for a quarter of the routed "
                "experts, or an int for a number of slots"
            )
        if isinstance(ce, int) and ce <= 0:
            raise ValueError(f"cache_experts={ce} slots must be positive (at least one layer's top-k)")
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.device is not None and self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be 'cpu', 'cuda' or None (auto)")
        if self.copy_streams is not None and not 1 <= self.copy_streams <= 16:
            raise ValueError(f"copy_streams={self.copy_streams} is out of range; use 1..16")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {', '.join(BACKENDS)}")

    def num_slots(self, num_layers: int, num_experts: int, top_k: int) -> int:
        """Slots for a model with ``num_layers`` MoE layers of ``num_experts`` experts, top-``top_k``.

        Raises:
            ValueError: the cache would hold fewer than one layer's top-k, or more than all experts.
        """
        total = num_layers * num_experts
        ce = self.cache_experts
        slots = math.ceil(ce * total - 1e-9) if isinstance(ce, float) else int(ce)
        if slots < top_k:
            raise ValueError(
                f"cache_experts={ce!r} gives {slots} slots, fewer than one layer's top-k ({top_k}); "
                f"use at least {top_k} slots (or a fraction >= {top_k / total:.4f})"
            )
        if slots > total:
            raise ValueError(
                f"cache_experts={ce!r} asks for {slots} slots but the model has only {total} routed experts "
                f"({num_layers} MoE layers x {num_experts}); use at most {total} or a fraction <= 1.0"
            )
        return slots

    def resolve_device(self) -> str:
        """The device to use: explicit, else ``MOERT_DEVICE``, else CUDA when it can run."""
        if self.device is not None:
            return self.device
        from moert import envs

        env = envs.device()
        if env != "auto":
            return env
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
