"""``PatchHandle``: what ``moert.patch`` / ``moert.load`` return: stats, the pool, undo.

The handle owns the model's ``Offloader`` (``moert.engine.offloader``) while the patch is active and
remembers the released expert parameters so that ``undo`` can copy the pool back into them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn

    from moert.api.config import OffloadConfig
    from moert.engine.offloader import OffloaderBase
    from moert.engine.stats import Stats
    from moert.models import ModelAdapter, MoELayerRef

__all__ = ["PatchHandle", "handle_of", "IMPLEMENTATION"]

IMPLEMENTATION = "moert"
_HANDLES: weakref.WeakKeyDictionary[Any, PatchHandle] = weakref.WeakKeyDictionary()


def handle_of(model: nn.Module) -> PatchHandle | None:
    """The active ``PatchHandle`` of ``model`` (from ``patch`` or ``load``), or None."""
    return _HANDLES.get(model)


def register_handle(model: nn.Module, handle: PatchHandle) -> None:
    _HANDLES[model] = handle


@dataclass
class Released:
    """One experts module's parameters, released at patch time and restored by ``undo``."""

    experts: nn.Module
    gate_up: torch.nn.Parameter
    down: torch.nn.Parameter
    gate_up_shape: torch.Size
    down_shape: torch.Size
    device: torch.device
    hooks: tuple[Any, ...] = ()


class PatchHandle:
    """The result of ``moert.patch``: stats and undo.

    Attributes:
        model: the patched model.
        adapter: its adapter.
        config: the offload config.
        device: where the slab cache lives (``"cpu"``, ``"sim"`` or ``"cuda:N"``).
        num_slots: cache slots.
        freed_bytes: bytes of expert parameters released from the model.
        layer_ids: decoder indices of the offloaded MoE layers.
        load_report: filled by ``moert.load`` (timings, peak device memory), else empty.
        prefetcher: the ``moert.engine.prefetch.PredictionFeed`` when a predictor runs, else None.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        config: OffloadConfig,
        offloader: OffloaderBase,
        released: list[Released],
        previous_impl: Any,
        device: str,
        num_slots: int,
    ) -> None:
        self.model, self.adapter, self.config = model, adapter, config
        self._offloader: OffloaderBase | None = offloader
        self._released = released
        self._previous_impl = previous_impl
        self.device, self.num_slots = device, num_slots
        self.layout = offloader.layout
        self.layer_ids = list(offloader.layer_ids)
        self.freed_bytes = sum(
            (r.gate_up_shape.numel() + r.down_shape.numel()) * offloader.layout.itemsize for r in released
        )
        self.load_report: dict[str, Any] = {}
        self._moved_from: torch.device | None = None
        self._final: Stats | None = None
        self._norms: list[tuple[Any, Any]] = []
        self.prefetcher: Any = None
        self._predictor: Any = None  # the loaded predictor, attached by _attach_predictor
        #: the MoE layers as found at patch time (``moe_layers()`` refuses released experts)
        self._refs: list[MoELayerRef] = []

    @property
    def offloader(self) -> OffloaderBase | None:
        """The model's offloader (pool, cache, copy engine), None once undone."""
        return self._offloader

    def _attach_predictor(self, refs: list[MoELayerRef]) -> None:
        from moert.engine import prefetch

        off = self._offloader
        assert off is not None and self._predictor is not None
        self.prefetcher, self._norms = prefetch.attach(
            self.model, refs, self._predictor, off.policy, off.engine, self.device
        )
        off.prefetcher = self.prefetcher

    def _detach_predictor(self) -> None:
        """Restores the original norm modules; waits for predictions in flight."""
        from moert.engine import prefetch

        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        prefetch.detach(self._norms)
        self._norms = []
        if self._offloader is not None:
            self._offloader.prefetcher = None

    @property
    def cpu_expert_ms(self) -> tuple[float, float] | None:
        """Heterogeneous mode: ``(host expert ms, copy ms)`` the misses are split by (measured at
        patch time unless the config gave them); None when the mode is off."""
        cpu_s = getattr(self._offloader.placement, "cpu_s", None) if self._offloader else None
        return None if cpu_s is None else (cpu_s * 1e3, self._offloader.placement.copy_s * 1e3)

    @property
    def active(self) -> bool:
        return self._offloader is not None

    @property
    def pool_bytes(self) -> int:
        """Bytes of the host expert pool."""
        return int(self._offloader.pool.nbytes) if self._offloader else 0

    @property
    def cache_bytes(self) -> int:
        """Bytes of the device slab cache."""
        return self.num_slots * self.layout.slab_bytes

    def stats(self) -> Stats:
        """Counters since patching (or ``reset_stats``); after ``undo`` the final values."""
        if self._offloader is None:
            assert self._final is not None
            return self._final
        return self._offloader.stats()

    def reset_stats(self) -> None:
        if self._offloader is not None:
            self._offloader.reset_stats()

    def reconfigure(self, config: OffloadConfig | None = None, **overrides: Any) -> Stats:
        """Switch to another offload configuration over the same filled host pool.

        The slab cache, copy engine, policy, placement and predictor hooks are rebuilt from
        ``config`` (default: the current one) with ``overrides`` applied (``cache_experts``,
        ``policy``, ``copy_streams``, ``prefetch``, ``predictor``, ``overlap_waves``, ...); the pool, the
        released expert parameters and the model's patched state stay, so a configuration change
        costs a device cache, not a pool fill and an undo (~29 GB of copies at DeepSeek-V2-Lite
        size). Counters start at zero. Outputs are those of a fresh ``moert.patch`` with the new
        configuration (DESIGN §8).

        Returns:
            The final ``Stats`` of the configuration it replaces.

        Raises:
            RuntimeError: the handle was undone.
            ValueError: an invalid configuration (nothing changes then), another ``device`` (undo and
                patch again), or a switch between the ``"reference"`` backend's pool and the runtime's.
        """
        from moert.api.build import build_policy, check_backend, copy_streams, resolve_config

        if self._offloader is None:
            raise RuntimeError("this handle was undone; moert.patch the model again")
        cfg = resolve_config(self.config if config is None else config, overrides)
        if cfg.device != self.config.device:
            raise ValueError(
                f"reconfigure keeps the device ({self.device}); device={cfg.device!r} needs handle.undo() "
                "and a new moert.patch"
            )
        if (cfg.backend == "reference") != (self.config.backend == "reference"):
            raise ValueError(
                f"backend={cfg.backend!r} needs another kind of host pool than backend="
                f"{self.config.backend!r}; handle.undo() and moert.patch again"
            )
        check_backend(self.device, cfg.backend)
        refs = self._refs
        slots = cfg.num_slots(len(refs), self.adapter.num_experts, self.adapter.top_k)
        policy, loaded = build_policy(cfg, self.adapter, refs)  # raises before anything is torn down
        final = self._offloader.stats()
        previous, pool = self.config, self._offloader.pool
        try:
            self._rebuild(cfg, refs, slots, copy_streams(cfg), policy, loaded)
        except BaseException:
            if self._offloader is None:  # the new offloader failed to build: back to the previous one
                try:
                    old_policy, old_loaded = build_policy(previous, self.adapter, refs)
                    old_slots = previous.num_slots(len(refs), self.adapter.num_experts, self.adapter.top_k)
                    self._rebuild(
                        previous, refs, old_slots, copy_streams(previous), old_policy, old_loaded, pool
                    )
                except BaseException:  # the model cannot run: free everything, as ``discard`` does
                    pool.close()
                    self._final = final
                    self._drop_released()
            raise
        return final

    def _rebuild(
        self,
        cfg: OffloadConfig,
        refs: list[MoELayerRef],
        slots: int,
        streams: int,
        policy: Any,
        loaded: Any,
        pool: Any = None,
    ) -> None:
        """Closes the offloader (keeping its pool), builds ``cfg``'s over the pool (``pool`` when there
        is no offloader left) and rewires the layers."""
        from moert.api.build import build_offloader
        from moert.engine.layer import OffloadedLayer

        old = self._offloader
        if old is not None:
            pool = old.pool
            self._read_ahead = getattr(getattr(old, "engine", None), "read_ahead", 0)  # outlives engines
            self._detach_predictor()
            self._offloader = None
            old.close(keep_pool=True)
        off = build_offloader(cfg, self.adapter, refs, self.layout, pool, self.device, slots, streams, policy)
        if getattr(self, "_read_ahead", 0):
            off.engine.read_ahead = self._read_ahead
        for ordinal, rel in enumerate(self._released):
            rel.experts.__dict__["_moert"] = OffloadedLayer(off, ordinal)
        self._offloader, self._predictor = off, loaded
        if cfg.predictor is not None:
            try:
                self._attach_predictor(refs)
            except BaseException:  # e.g. a predictor the CUDA kernel cannot hold: a failed build
                self._detach_predictor()
                self._offloader = None
                off.close(keep_pool=True)
                raise
        self.config, self.num_slots = cfg, slots

    def expert_weights(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host views ``(gate_up (2I, H), down (H, I))`` of one expert in the pool (decoder layer index)."""
        if self._offloader is None:
            raise RuntimeError("this handle was undone; the pool is gone")
        if layer not in self.layer_ids:
            raise ValueError(f"layer {layer} is not an offloaded MoE layer; offloaded: {self.layer_ids}")
        return self._pool_weights(self.layer_ids.index(layer), expert)

    def _pool_weights(self, ordinal: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self._offloader.pool
        return self.layout.views(
            lambda dtype, shape, offset: pool.view(ordinal, expert, dtype, tuple(shape), offset)
        )

    def discard(self) -> None:
        """Free the pool and cache without restoring the experts (the model cannot run afterwards);
        for a model that is being thrown away, e.g. after a failed load."""
        if self._offloader is not None:
            self._teardown(restore=False)

    def undo(self) -> None:
        """Copy every expert back into its original parameter object, restore the previous experts
        implementation and free the pool and cache. Raises RuntimeError when already undone."""
        if self._offloader is None:
            raise RuntimeError("moert.patch handle was already undone")
        self._teardown(restore=True)

    def _teardown(self, restore: bool) -> None:
        off = self._offloader
        self._final = off.stats()
        self._detach_predictor()
        if restore and self._moved_from is not None:
            self.model.to(self._moved_from)
        if restore:
            for ordinal, rel in enumerate(self._released):
                self._restore_experts(ordinal, rel)
        self._drop_released()
        if restore:
            set_impl(self.model, self._previous_impl)
        off.close()
        self._offloader = None

    def _drop_released(self) -> None:
        """Unhooks the experts modules and forgets the handle (the pool is the caller's to close)."""
        for rel in self._released:
            rel.experts.__dict__.pop("_moert", None)
            for hook in rel.hooks:
                hook.remove()
        self._released = []
        _HANDLES.pop(self.model, None)

    def _restore_experts(self, ordinal: int, rel: Released) -> None:
        """Copies layer ``ordinal``'s experts from the pool into fresh fused parameters."""
        gate_up = torch.empty(rel.gate_up_shape, dtype=self.layout.dtype, device=rel.device)  # [E, 2I, H]
        down = torch.empty(rel.down_shape, dtype=self.layout.dtype, device=rel.device)  # [E, H, I]
        for e in range(rel.gate_up_shape[0]):
            gu, dn = self._pool_weights(ordinal, e)
            gate_up[e].copy_(gu)
            down[e].copy_(dn)
        rel.experts._parameters["gate_up_proj"] = _restore(rel.gate_up, gate_up)
        rel.experts._parameters["down_proj"] = _restore(rel.down, down)

    def __repr__(self) -> str:
        status = "active" if self.active else "undone"
        return (
            f"PatchHandle({self.adapter.model_type}, {len(self.layer_ids)} MoE layers, {self.num_slots} slots, "
            f"policy={self.config.policy}, device={self.device}, {status})"
        )


def _restore(param: torch.nn.Parameter, value: torch.Tensor) -> torch.nn.Parameter:
    """The original Parameter object with ``value`` (a new one when it was built on another device,
    e.g. meta by ``moert.load``)."""
    if param.device == value.device:
        with torch.no_grad():
            param.data = value
        return param
    return torch.nn.Parameter(value, requires_grad=param.requires_grad)


def get_impl(model: nn.Module) -> Any:
    return model.config._experts_implementation


def set_impl(model: nn.Module, impl: Any) -> None:
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(impl)
    else:
        model.config._experts_implementation = impl
