"""``moert.patch``: offload a loaded HF MoE model's routed experts, per instance and undoably.

On patch, every routed expert moves into the host pool (``gate_up`` and ``down`` of one expert in one
slab), the experts modules' fused 3D parameters are released (their memory is freed), and the model
switches to the "moert" experts implementation registered in transformers' ``ExpertsInterface``.
The model's own routers still compute routing; only the expert products come from the slab cache.
``PatchHandle.undo()`` copies the weights back into the original parameter objects and restores the
previous experts implementation.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moert.api.config import OffloadConfig
from moert.engine.offload import (
    ExpertLayout,
    OffloadedLayer,
    OffloadState,
    make_pool,
    make_store,
    moert_experts_forward,
)
from moert.models import MoELayerRef, get_adapter

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

    from moert.engine.stats import Stats
    from moert.models import ModelAdapter

__all__ = ["patch", "PatchHandle", "handle_of", "MIN_TRANSFORMERS", "register_experts_implementation"]

MIN_TRANSFORMERS = (5, 17)
IMPLEMENTATION = "moert"
_HANDLES: weakref.WeakKeyDictionary[Any, PatchHandle] = weakref.WeakKeyDictionary()


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def register_experts_implementation() -> None:
    """Register "moert" in transformers' ``ExpertsInterface`` (idempotent).

    Raises:
        ImportError: transformers is missing or older than 5.17.
    """
    try:
        import transformers
    except ImportError as e:
        raise ImportError("moert.patch needs transformers >= 5.17: pip install 'transformers>=5.17'") from e
    if _version_tuple(transformers.__version__) < MIN_TRANSFORMERS:
        raise ImportError(
            f"transformers {transformers.__version__} is too old: moert needs >= "
            f"{'.'.join(map(str, MIN_TRANSFORMERS))} (fused experts dispatched through ExpertsInterface)"
        )
    from transformers.integrations.moe import ExpertsInterface

    if ExpertsInterface._global_mapping.get(IMPLEMENTATION) is not moert_experts_forward:
        ExpertsInterface.register(IMPLEMENTATION, moert_experts_forward)


def handle_of(model: nn.Module) -> PatchHandle | None:
    """The active ``PatchHandle`` of ``model`` (from ``patch`` or ``load``), or None."""
    return _HANDLES.get(model)


def _check_placement(model: nn.Module, refs: list[MoELayerRef]) -> torch.device:
    device_map = getattr(model, "hf_device_map", None)
    if device_map and len({str(v) for v in device_map.values()}) > 1:
        raise ValueError(
            f"the model is dispatched over a device map ({sorted({str(v) for v in device_map.values()})}); "
            "moert does its own offloading: load the model onto one device (no device_map) or use moert.load(path)"
        )
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(
            f"{len(meta)} parameters are on the meta device (e.g. {meta[0]}); moert needs materialised weights: "
            "load the model without device_map/low-memory tricks, or use moert.load(path)"
        )
    devices = {p.device for r in refs for p in (r.experts.gate_up_proj, r.experts.down_proj)}
    dtypes = {p.dtype for r in refs for p in (r.experts.gate_up_proj, r.experts.down_proj)}
    if len(devices) != 1 or len(dtypes) != 1:
        raise ValueError(
            f"routed experts span devices {sorted(map(str, devices))} / dtypes {sorted(map(str, dtypes))}; "
            "put the model on one device with one dtype before patching"
        )
    return devices.pop()


@dataclass
class _Released:
    experts: nn.Module
    gate_up: torch.nn.Parameter
    down: torch.nn.Parameter
    gate_up_shape: torch.Size
    down_shape: torch.Size
    device: torch.device
    hooks: tuple[Any, ...] = ()


def _hook_experts_state(experts: nn.Module, pool: Any, layout: ExpertLayout, ordinal: int) -> tuple[Any, ...]:
    """Keeps a patched experts module's ``state_dict`` whole: its ``gate_up_proj`` / ``down_proj``
    entries become views of the host pool (no copy with the runtime's pool), so ``save_pretrained``
    of a patched model writes the experts. Loading into them is refused with the fix named (the
    device cache would otherwise keep the old bytes)."""

    def add_experts(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        state_dict[prefix + "gate_up_proj"] = pool.layer_view(ordinal, layout.dtype, layout.gate_up_shape, 0)
        state_dict[prefix + "down_proj"] = pool.layer_view(
            ordinal, layout.dtype, layout.down_shape, layout.down_offset
        )

    def refuse_experts(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        names = [prefix + n for n in ("gate_up_proj", "down_proj") if prefix + n in state_dict]
        if names:
            raise ValueError(
                f"load_state_dict into a model patched by moert: {names[0]} lives in moert's expert pool "
                "and the device cache; load weights before moert.patch, or handle.undo(), load, and patch again"
            )

    return (
        experts.register_state_dict_post_hook(add_experts),
        experts.register_load_state_dict_pre_hook(refuse_experts),
    )


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
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        config: OffloadConfig,
        state: OffloadState,
        released: list[_Released],
        previous_impl: Any,
        device: str,
        num_slots: int,
    ) -> None:
        self.model, self.adapter, self.config = model, adapter, config
        self._state: OffloadState | None = state
        self._released = released
        self._previous_impl = previous_impl
        self.device, self.num_slots = device, num_slots
        self.layout = state.layout
        self.layer_ids = list(state.layer_ids)
        self.freed_bytes = sum(
            (r.gate_up_shape.numel() + r.down_shape.numel()) * state.layout.itemsize for r in released
        )
        self.load_report: dict[str, Any] = {}
        self._moved_from: torch.device | None = None
        self._final: Stats | None = None
        self._norms: list[tuple[Any, Any]] = []
        #: the ``moert.engine.prefetch.Prefetcher`` when a predictor runs, else None
        self.prefetcher: Any = None

    def _attach_predictor(self, refs: list[MoELayerRef]) -> None:
        from moert.engine import prefetch

        assert self._state is not None
        engine = self._state.store.engine
        self.prefetcher, self._norms = prefetch.attach(
            self.model, self.adapter, refs, self.config, engine, self.device
        )
        self._state.prefetcher = self.prefetcher

    def _detach_predictor(self) -> None:
        """Restores the original norm modules; waits for predictions in flight."""
        from moert.engine import prefetch

        if self.prefetcher is not None:
            self.prefetcher.close()
        prefetch.detach(self._norms)
        self._norms = []
        if self._state is not None:
            self._state.prefetcher = None

    @property
    def cpu_expert_ms(self) -> tuple[float, float] | None:
        """Heterogeneous mode: ``(host expert ms, copy ms)`` the misses are split by (measured at
        patch time unless the config gave them); None when the mode is off."""
        hetero = self._state.cpu_experts if self._state is not None else None
        return None if hetero is None else (hetero.cpu_s * 1e3, hetero.copy_s * 1e3)

    @property
    def active(self) -> bool:
        return self._state is not None

    @property
    def pool_bytes(self) -> int:
        """Bytes of the host expert pool."""
        return int(self._state.pool.nbytes) if self._state else 0

    @property
    def cache_bytes(self) -> int:
        """Bytes of the device slab cache."""
        return self.num_slots * self.layout.slab_bytes

    def stats(self) -> Stats:
        """Counters since patching (or ``reset_stats``); after ``undo`` the final values."""
        if self._state is None:
            assert self._final is not None
            return self._final
        return self._state.stats()

    def reset_stats(self) -> None:
        if self._state is not None:
            self._state.reset_stats()

    def expert_weights(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host views ``(gate_up (2I, H), down (H, I))`` of one expert in the pool (decoder layer index)."""
        if self._state is None:
            raise RuntimeError("this handle was undone; the pool is gone")
        if layer not in self.layer_ids:
            raise ValueError(f"layer {layer} is not an offloaded MoE layer; offloaded: {self.layer_ids}")
        ordinal = self.layer_ids.index(layer)
        pool = self._state.pool
        return self.layout.views(
            lambda dtype, shape, offset: pool.view(ordinal, expert, dtype, tuple(shape), offset)
        )

    def discard(self) -> None:
        """Free the pool and cache without restoring the experts (the model cannot run afterwards);
        for a model that is being thrown away, e.g. after a failed load."""
        if self._state is None:
            return
        self._final = self._state.stats()
        self._detach_predictor()
        for rel in self._released:
            rel.experts.__dict__.pop("_moert", None)
            for hook in rel.hooks:
                hook.remove()
        self._state.close()
        self._state = None
        self._released = []
        _HANDLES.pop(self.model, None)

    def undo(self) -> None:
        """Copy every expert back into its original parameter object, restore the previous experts
        implementation and free the pool and cache. Raises RuntimeError when already undone."""
        if self._state is None:
            raise RuntimeError("moert.patch handle was already undone")
        state = self._state
        self._final = state.stats()
        self._detach_predictor()
        if self._moved_from is not None:
            self.model.to(self._moved_from)
        for ordinal, rel in enumerate(self._released):
            gate_up = torch.empty(rel.gate_up_shape, dtype=self.layout.dtype, device=rel.device)
            down = torch.empty(rel.down_shape, dtype=self.layout.dtype, device=rel.device)
            for e in range(rel.gate_up_shape[0]):
                gu, dn = self.layout.views(
                    lambda dtype, shape, offset, o=ordinal, e=e: state.pool.view(
                        o, e, dtype, tuple(shape), offset
                    )
                )
                gate_up[e].copy_(gu)
                down[e].copy_(dn)
            rel.experts.__dict__.pop("_moert", None)
            for hook in rel.hooks:
                hook.remove()
            rel.experts._parameters["gate_up_proj"] = _restore(rel.gate_up, gate_up)
            rel.experts._parameters["down_proj"] = _restore(rel.down, down)
        _set_impl(self.model, self._previous_impl)
        state.close()
        self._state = None
        self._released = []
        _HANDLES.pop(self.model, None)

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


def _get_impl(model: nn.Module) -> Any:
    return model.config._experts_implementation


def _set_impl(model: nn.Module, impl: Any) -> None:
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(impl)
    else:
        model.config._experts_implementation = impl


def _resolve_config(config: OffloadConfig | None, overrides: dict[str, Any]) -> OffloadConfig:
    if config is None:
        return OffloadConfig(**overrides)
    if not isinstance(config, OffloadConfig):
        raise TypeError(f"config must be a moert.OffloadConfig, got {type(config).__name__}")
    if overrides:
        from dataclasses import replace

        return replace(config, **overrides)
    return config


def _check_not_patched(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if handle_of(model) is not None or getattr(config, "_experts_implementation", None) == IMPLEMENTATION:
        raise RuntimeError("this model is already patched by moert; call handle.undo() before patching again")


def prepare(
    model: nn.Module, cfg: OffloadConfig
) -> tuple[ModelAdapter, list[MoELayerRef], ExpertLayout, str, int, int]:
    """Checks shared by ``patch`` and ``load``: adapter, layers, layout, device, slots, copy streams."""
    _check_not_patched(model)
    adapter = get_adapter(model)
    refs = adapter.moe_layers()
    gate_up = refs[0].experts.gate_up_proj
    layout = ExpertLayout(
        hidden=int(gate_up.shape[2]), intermediate=int(gate_up.shape[1]) // 2, dtype=gate_up.dtype
    )
    device = cfg.resolve_device()
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} was requested but no CUDA device can run; use device='cpu' (the CPU "
                "twin) or 'sim' (the device model)"
            )
        if device == "cuda":  # the experts' CUDA device, else torch's current one
            where = refs[0].experts.gate_up_proj.device
            device = str(where) if where.type == "cuda" else f"cuda:{torch.cuda.current_device()}"
        elif int(device[5:]) >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: there are only {torch.cuda.device_count()} CUDA devices")
    if device == "sim" and cfg.backend != "runtime":
        raise ValueError(
            f"device='sim' models the runtime's device; use backend='runtime', not {cfg.backend!r}"
        )
    slots = cfg.num_slots(len(refs), adapter.num_experts, adapter.top_k)
    if cfg.copy_streams is not None:
        streams = cfg.copy_streams
    else:
        from moert import envs

        streams = envs.copy_streams()
    register_experts_implementation()
    return adapter, refs, layout, device, slots, streams


def _cpu_experts(cfg: OffloadConfig, pool: Any, layout: ExpertLayout, device: str) -> Any:
    """The heterogeneous mode's chooser, with the times measured here unless the config gives them."""
    from moert.engine.hetero import CpuExperts, calibrate

    cpu_s = None if cfg.cpu_expert_ms is None else cfg.cpu_expert_ms * 1e-3
    copy_s = None if cfg.copy_expert_ms is None else cfg.copy_expert_ms * 1e-3
    if cpu_s is None or copy_s is None:
        measured_cpu, measured_copy = calibrate(pool, layout, device)
        cpu_s = measured_cpu if cpu_s is None else cpu_s
        copy_s = measured_copy if copy_s is None else copy_s
    return CpuExperts(pool, layout, cpu_s, copy_s, cfg.activation_us * 1e-6)


def install(
    model: nn.Module,
    cfg: OffloadConfig,
    adapter: ModelAdapter,
    refs: list[MoELayerRef],
    layout: ExpertLayout,
    device: str,
    slots: int,
    streams: int,
    fill: Callable[[Any], None],
    restore_device: str | None = None,
    predictor: bool = True,
) -> PatchHandle:
    """Build pool and store, fill the pool with ``fill(pool)``, release the experts' parameters and
    switch the model to the "moert" implementation. ``undo`` rebuilds the parameters on
    ``restore_device`` (default: where they were). ``predictor=False`` leaves ``cfg.predictor`` for the
    caller to attach (``handle._attach_predictor``) once the norms hold real weights (``moert.load``)."""
    pool = make_pool(cfg.backend, len(refs), adapter.num_experts, layout.slab_bytes, device)
    try:
        fill(pool)
        store = make_store(cfg.backend, pool, layout, slots, cfg.cache_policy, device, adapter.top_k, streams)
    except BaseException:
        pool.close()
        raise
    state = OffloadState(
        pool,
        store,
        layout,
        [r.index for r in refs],
        adapter.num_experts,
        device,
        overlap_waves=cfg.overlap_waves,
        deferred_waits=device.startswith("cuda") if cfg.deferred_waits is None else cfg.deferred_waits,
    )
    if cfg.cpu_experts:
        try:
            state.cpu_experts = _cpu_experts(cfg, pool, layout, device)
        except BaseException:
            state.close()
            raise
    if cfg.policy == "utility":
        from moert.engine.speculative import UtilityTracker

        width = (
            min(adapter.num_experts, adapter.top_k + int(cfg.overprovision)) if cfg.prefetch == "async" else 0
        )
        state.utility = UtilityTracker(store, len(refs), adapter.num_experts, width, cfg.utility_decay)
    released = []
    for ordinal, ref in enumerate(refs):
        ex = ref.experts
        gu, dn = ex._parameters.pop("gate_up_proj"), ex._parameters.pop("down_proj")
        hooks = _hook_experts_state(ex, pool, layout, ordinal)
        released.append(
            _Released(ex, gu, dn, gu.shape, dn.shape, torch.device(restore_device or gu.device), hooks)
        )
        with torch.no_grad():
            # Free the storage; the Parameter objects are kept so undo() can restore them in place.
            gu.data = torch.empty(0, dtype=gu.dtype, device=gu.device)
            dn.data = torch.empty(0, dtype=dn.dtype, device=dn.device)
        ex.__dict__["_moert"] = OffloadedLayer(state, ordinal)
    previous = _get_impl(model)
    _set_impl(model, IMPLEMENTATION)
    handle = PatchHandle(model, adapter, cfg, state, released, previous, device, slots)
    _HANDLES[model] = handle
    if predictor and cfg.predictor is not None:
        try:
            handle._attach_predictor(refs)
        except BaseException:
            handle.undo()
            raise
    return handle


def patch(model: nn.Module, config: OffloadConfig | None = None, **kwargs: Any) -> PatchHandle:
    """Offload the routed experts of ``model`` (an HF transformers MoE model of a supported type).

    Args:
        model: a loaded model on one device (CPU or CUDA), e.g. ``AutoModelForCausalLM.from_pretrained``.
        config: a ``moert.OffloadConfig``; keyword arguments (``cache_experts``, ``policy``, ``device``,
            ``copy_streams``, ``backend``, ``predictor``, ``overprovision``, ``prefetch``, ...) build one
            or override its fields. With ``predictor`` (a ``preattn`` predictor or its file), each MoE
            layer's ``input_layernorm`` becomes a ``moert.engine.prefetch.PrefetchNorm`` that predicts the
            layer's experts and prefetches them while attention runs (``undo`` restores the norms). ``device`` (default: CUDA
            when one can run, else CPU) is where the slab cache and the compute live: a model on
            another device has its non-expert weights moved there (``undo`` moves them back).

    Returns:
        A ``PatchHandle`` (``.stats()``, ``.undo()``).

    Raises:
        ValueError: unsupported model_type, module structure mismatch, cache smaller than one
            layer's top-k, bad fraction, device-mapped or meta model, CUDA requested but unable to run,
            a predictor for another model (model_type, layers, E, k or H differ) or of another kind.
        RuntimeError: the model is already patched.
    """
    cfg = _resolve_config(config, kwargs)
    _check_not_patched(model)
    where = _check_placement(model, get_adapter(model).moe_layers())
    adapter, refs, layout, device, slots, streams = prepare(model, cfg)

    def fill(pool: Any) -> None:
        with torch.no_grad():
            for ordinal, ref in enumerate(refs):
                gate_up, down = ref.experts.gate_up_proj, ref.experts.down_proj
                for e in range(adapter.num_experts):
                    pool.fill(ordinal, e, gate_up[e].detach().contiguous().cpu(), 0)
                    pool.fill(ordinal, e, down[e].detach().contiguous().cpu(), layout.down_offset)

    handle = install(
        model, cfg, adapter, refs, layout, device, slots, streams, fill, restore_device=str(where)
    )
    from moert.engine.runtime import tensor_device

    target = tensor_device(device)
    if where != target:
        # e.g. a model loaded on the CPU, offloaded onto a GPU: the rest of the model follows the cache
        model.to(target)
        handle._moved_from = where
    return handle
