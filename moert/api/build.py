"""Building one offload configuration: the config with overrides, the policy object, the offloader over a
filled pool. Shared by ``moert.patch`` / ``moert.load`` (``moert.api.patch``) and
``PatchHandle.reconfigure`` (``moert.api.handle``), which switches configurations over the same pool."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moert.api.config import OffloadConfig
from moert.engine.backends import make_offloader
from moert.engine.layout import ExpertLayout

if TYPE_CHECKING:
    from moert.engine.offloader import OffloaderBase
    from moert.models import ModelAdapter, MoELayerRef
    from moert.policy.base import Policy

__all__ = ["build_offloader", "build_policy", "check_backend", "copy_streams", "resolve_config"]


def resolve_config(config: OffloadConfig | None, overrides: dict[str, Any]) -> OffloadConfig:
    if config is None:
        return OffloadConfig(**overrides)
    if not isinstance(config, OffloadConfig):
        raise TypeError(f"config must be a moert.OffloadConfig, got {type(config).__name__}")
    if overrides:
        from dataclasses import replace

        return replace(config, **overrides)
    return config


def check_backend(device: str, backend: str) -> None:
    """Raises ValueError when ``backend`` cannot run on ``device`` ("sim" models the runtime only)."""
    if device == "sim" and backend != "runtime":
        raise ValueError(f"device='sim' models the runtime's device; use backend='runtime', not {backend!r}")


def copy_streams(cfg: OffloadConfig) -> int:
    """The config's copy streams, else ``MOERT_COPY_STREAMS``."""
    if cfg.copy_streams is not None:
        return cfg.copy_streams
    from moert import envs

    return envs.copy_streams()


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


def build_policy(cfg: OffloadConfig, adapter: ModelAdapter, refs: list[MoELayerRef]) -> tuple[Policy, Any]:
    """The model's one policy object (``moert.policy.runtime_policy``), bound to its L, E, k, and the
    loaded predictor (None without one), whose lookahead and loss the policy's planner follows.

    Raises:
        ValueError: a simulator-only policy (naming ``moert simulate``), or a predictor that does not
            fit the model.
    """
    from moert.policy import runtime_policy

    predictor = None
    if cfg.predictor is not None:
        from moert.engine.prefetch import load_pipeline_predictor, model_dims

        predictor = load_pipeline_predictor(cfg.predictor, model_dims(adapter, refs))
    meta = None if predictor is None else predictor.meta
    policy = runtime_policy(
        cfg.policy,
        lookahead=None if meta is None else meta.lookahead,
        probabilities="clamp" if meta is not None and meta.loss == "mse" else "sigmoid",
        overprovision=cfg.overprovision,
        prefetch=cfg.prefetch != "off",
        budget=cfg.prefetch == "budget",
        threshold=cfg.threshold,
        max_overprovision=cfg.max_overprovision,
        score_decay=cfg.score_decay,
        utility_decay=cfg.utility_decay,
        evictor=cfg.evictor,
    )
    policy.bind(len(refs), adapter.num_experts, adapter.top_k)
    return policy, predictor


def build_offloader(
    cfg: OffloadConfig,
    adapter: ModelAdapter,
    refs: list[MoELayerRef],
    layout: ExpertLayout,
    pool: Any,
    device: str,
    slots: int,
    streams: int,
    policy: Policy,
) -> OffloaderBase:
    """The offloader of ``cfg`` (slab cache, copy engine, placement, ``policy``) over a filled ``pool``;
    on failure the pool is left open (``install`` and ``PatchHandle.reconfigure`` own it)."""
    off = make_offloader(
        cfg.backend,
        pool,
        layout,
        slots,
        [r.index for r in refs],
        adapter.num_experts,
        device,
        policy=policy.cache_policy,
        min_slots=adapter.top_k,
        copy_streams=streams,
        overlap_waves=cfg.overlap_waves,
        deferred_waits=device.startswith("cuda") if cfg.deferred_waits is None else cfg.deferred_waits,
    )
    if cfg.cpu_experts:
        try:
            off.placement = _cpu_experts(cfg, pool, layout, device)
        except BaseException:
            off.close(keep_pool=True)
            raise
    off.set_policy(policy)
    return off
