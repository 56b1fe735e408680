"""``moert.patch``: offload a loaded HF MoE model's routed experts, per instance and undoably.

On patch, every routed expert moves into the host pool (``gate_up`` and ``down`` of one expert in one
slab), the experts modules' fused 3D parameters are released (their memory is freed), and the model
switches to the "moert" experts implementation registered in transformers' ``ExpertsInterface``.
The model's own routers still compute routing; only the expert products come from the slab cache.
``PatchHandle.undo()`` copies the weights back into the original parameter objects and restores the
previous experts implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from moert.api.build import build_offloader, build_policy, check_backend, copy_streams, resolve_config
from moert.api.config import OffloadConfig
from moert.api.handle import (
    IMPLEMENTATION,
    PatchHandle,
    Released,
    get_impl,
    handle_of,
    register_handle,
    set_impl,
)
from moert.engine.backends import make_pool
from moert.engine.layer import OffloadedLayer, moert_experts_forward
from moert.engine.layout import ExpertLayout
from moert.models import MoELayerRef, get_adapter

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

    from moert.models import ModelAdapter

__all__ = ["patch", "PatchHandle", "handle_of", "MIN_TRANSFORMERS", "register_experts_implementation"]

MIN_TRANSFORMERS = (5, 17)


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
    check_backend(device, cfg.backend)
    slots = cfg.num_slots(len(refs), adapter.num_experts, adapter.top_k)
    register_experts_implementation()
    return adapter, refs, layout, device, slots, copy_streams(cfg)


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
    pool_factory: Callable[..., Any] | None = None,
) -> PatchHandle:
    """Build the model's policy (``build_policy``), pool and offloader, fill the pool with ``fill(pool)``, release the experts' parameters and
    switch the model to the "moert" implementation. ``undo`` rebuilds the parameters on
    ``restore_device`` (default: where they were). ``predictor=False`` leaves ``cfg.predictor`` for the
    caller to attach (``handle._attach_predictor``) once the norms hold real weights (``moert.load``).
    ``pool_factory`` replaces ``make_pool`` (same arguments; ``moert.load``'s tiered pool)."""
    policy, loaded = build_policy(cfg, adapter, refs)
    pool = (pool_factory or make_pool)(cfg.backend, len(refs), adapter.num_experts, layout.slab_bytes, device)
    try:
        fill(pool)
        off = build_offloader(cfg, adapter, refs, layout, pool, device, slots, streams, policy)
    except BaseException:
        pool.close()
        raise
    released = []
    for ordinal, ref in enumerate(refs):
        ex = ref.experts
        gu, dn = ex._parameters.pop("gate_up_proj"), ex._parameters.pop("down_proj")
        hooks = _hook_experts_state(ex, pool, layout, ordinal)
        released.append(
            Released(ex, gu, dn, gu.shape, dn.shape, torch.device(restore_device or gu.device), hooks)
        )
        with torch.no_grad():
            # Free the storage; the Parameter objects are kept so undo() can restore them in place.
            gu.data = torch.empty(0, dtype=gu.dtype, device=gu.device)
            dn.data = torch.empty(0, dtype=dn.dtype, device=dn.device)
        ex.__dict__["_moert"] = OffloadedLayer(off, ordinal)
    previous = get_impl(model)
    set_impl(model, IMPLEMENTATION)
    handle = PatchHandle(model, adapter, cfg, off, released, previous, device, slots)
    handle._predictor, handle._refs = loaded, refs
    register_handle(model, handle)
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
    cfg = resolve_config(config, kwargs)
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
