"""``moert.load``: load a local HF model directory with its routed experts streamed into the host pool.

The model skeleton is built on the meta device. Routed experts are read one at a time from the
memory-mapped safetensors files (``safe_open``) straight into the expert pool, so they are never all
on the device (nor all in one host tensor) at once; every other weight is read onto ``device``.
Checkpoint layouts handled: per-expert keys as transformers' ``save_pretrained`` writes them
(``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``; Phi's ``block_sparse_moe.experts.{e}.w1/w3/w2``)
and fused ``mlp.experts.gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moert.api.config import OffloadConfig
from moert.api.patch import install, prepare
from moert.api.tier import host_tier
from moert.engine.devices import tensor_device
from moert.models import adapter_class

if TYPE_CHECKING:
    from torch import nn

    from moert.models import ModelAdapter

__all__ = ["load", "checkpoint_files", "tensor_bytes"]


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a model directory, checked to exist.

    Raises:
        FileNotFoundError: no directory, no config.json, no safetensors, or a shard named in the index is missing.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"model directory {str(root)!r} does not exist; pass a local HF model directory"
        )
    if not (root / "config.json").is_file():
        raise FileNotFoundError(
            f"{root} has no config.json; is it an HF model directory (save_pretrained output)?"
        )
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object; the model directory is damaged")
        names = sorted(set(weight_map.values()))
        files = [root / n for n in names]
    else:
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{root} has no *.safetensors files (moert.load reads safetensors only; convert .bin checkpoints "
                "with save_pretrained(safe_serialization=True))"
            )
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: shard(s) {', '.join(missing)} listed in {index.name} are missing")
    return files


def _dtype_of(config: Any, dtype: torch.dtype | str | None) -> torch.dtype:
    value = dtype if dtype is not None else getattr(config, "dtype", None)
    if value is None:
        return torch.float32
    if isinstance(value, str):
        resolved = getattr(torch, value, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype={value!r} is not a torch dtype name (e.g. 'bfloat16')")
        return resolved
    return value


def _open_shard(path: Path) -> Any:
    """``safe_open`` of one checkpoint file, its errors turned into one that names the file and the fix.

    Raises:
        FileNotFoundError: the file vanished since the directory was listed.
        ValueError: not a readable safetensors file (truncated, empty, a garbled header).
    """
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"checkpoint file {path} vanished while loading; is another process writing it?"
        ) from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(
            f"checkpoint file {path} is not a readable safetensors file ({type(exc).__name__}: {exc}); it is "
            "truncated or corrupt: copy or download it again (or save_pretrained the model again)"
        ) from None


def _read_json(path: Path) -> Any:
    """A JSON file of the checkpoint (config.json, the shard index), with an error naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); the model directory is damaged: copy it again, or save_pretrained the model again"
        ) from None


class _Index:
    """Which file holds which key, and which keys are routed-expert weights."""

    def __init__(self, files: list[Path], adapter: ModelAdapter) -> None:
        self.where: dict[str, Path] = {}
        self.experts: dict[tuple[int, int | None], dict[str, str]] = defaultdict(dict)
        self.others: dict[str, str] = {}  # model name -> checkpoint key
        for f in files:
            with _open_shard(f) as h:
                for key in h.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    self.where[key] = f
                    ek = adapter.parse_expert_key(key)
                    if ek is not None:
                        self.experts[(ek.layer, ek.expert)][ek.part] = key
                    else:
                        self.others[adapter.rename_key(key)] = key


class _Reader:
    """Keeps one ``safe_open`` handle per file (memory-mapped)."""

    def __init__(self) -> None:
        self._open: dict[Path, Any] = {}

    def handle(self, path: Path) -> Any:
        if path not in self._open:
            self._open[path] = _open_shard(path)
        return self._open[path]

    def close(self) -> None:
        for h in self._open.values():
            exit_ = getattr(h, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
        self._open.clear()


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)


def load(
    path: str | Path,
    cache_experts: int | float = 0.25,
    policy: str = "lru",
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    config: OffloadConfig | None = None,
    progress: bool = True,
    host_budget: int | float | str | None = None,
    pool_policy: str = "lru",
    read_mode: str = "pread",
    read_ahead: int = 0,
    **kwargs: Any,
) -> nn.Module:
    """Load a local model directory with its routed experts offloaded.

    Args:
        path: a local HF model directory (config.json + safetensors) of a supported model_type.
        cache_experts: slots (int) or fraction of routed experts (float in (0, 1]).
        policy: ``"lru"``, ``"lfu"`` or ``"score"`` (with ``predictor=``).
        device: ``"cuda"``, ``"cuda:N"``, ``"cpu"``, ``"sim"`` (the device model) or None (CUDA when one can run).
        dtype: weight dtype (default: the config's dtype, else fp32).
        config: an ``OffloadConfig`` instead of the three fields above (keyword overrides still apply).
        progress: show a progress bar.
        host_budget: host memory for routed experts (bytes, ``"16GiB"`` or a fraction of them); below all
            experts the pool caches that many and the copy threads read the rest from the checkpoint's
            files (``moert.api.tier``). None: every expert in the pool.
        pool_policy, read_mode, read_ahead: the host tier's eviction (lru, lfu, fifo), reads (pread, mmap)
            and layers of plans read ahead into the pool before their device copies (0: off; ``moert.api.tier``).
        **kwargs: more ``OffloadConfig`` fields (``copy_streams``, ``backend``, ``predictor``,
            ``overprovision``, ``prefetch``, ...; ``policy="score"`` needs ``predictor``).

    Returns:
        The model in eval mode; ``moert.handle_of(model)`` gives its ``PatchHandle`` (stats, undo,
        ``load_report`` with the peak device memory).

    Raises:
        FileNotFoundError: missing directory, config.json or safetensors shards.
        ValueError: unsupported model_type, bad cache size or policy, a checkpoint that lacks weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    t0 = time.perf_counter()
    files = checkpoint_files(path)
    # our error (listing the supported types) before transformers parses the config
    adapter_class(_read_json(Path(path) / "config.json").get("model_type"))
    hf_config = AutoConfig.from_pretrained(str(path))
    cfg = _offload_config(config, kwargs, cache_experts=cache_experts, policy=policy, device=device)
    wdtype = _dtype_of(hf_config, dtype)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=wdtype)
    prepared = prepare(model, cfg)
    adapter, refs, layout, dev = prepared[:4]
    index = _Index(files, adapter)
    moe_ids = [r.index for r in refs]
    _check_expert_keys(index, moe_ids, adapter.num_experts, path)

    where = str(tensor_device(dev))  # "sim" computes on the host
    baseline = _device_baseline(where) if dev.startswith("cuda") else None
    tier = host_tier(
        host_budget, pool_policy, read_mode, files, index, moe_ids, adapter, layout, cfg, read_ahead
    )
    handle, t_experts, non_expert = _fill(
        model, cfg, prepared, index, where, wdtype, t0, progress, path, tier
    )
    gen = Path(path) / "generation_config.json"
    if gen.is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    model.eval()

    all_experts = len(moe_ids) * adapter.num_experts * layout.expert_bytes
    handle.load_report = _report(
        handle, (where, baseline, non_expert), t0, t_experts, files, dev, wdtype, all_experts
    )
    if tier is not None:
        tier.attach(handle)  # load_report["host_tier"]; read-ahead on
    return model


def _report(handle: Any, peak_args: tuple, t0: float, t_experts: float, files: list, *info: Any) -> dict:
    """``handle.load_report``: times, files, the bytes of each part and the peak device memory."""
    dev, wdtype, all_experts = info
    peak, method, extra = _peak_device_bytes(*peak_args, handle.cache_bytes)
    return {
        "seconds": time.perf_counter() - t0,
        "experts_seconds": t_experts,
        "files": [f.name for f in files],
        "device": dev,
        "dtype": str(wdtype).replace("torch.", ""),
        "non_expert_bytes": peak_args[2],
        "cache_bytes": handle.cache_bytes,
        "pool_bytes": handle.pool_bytes,
        "all_experts_bytes": all_experts,
        "peak_device_bytes": int(peak),
        "peak_method": method,
        **extra,
    }


def _offload_config(config: OffloadConfig | None, kwargs: dict[str, Any], **fields: Any) -> OffloadConfig:
    """``config`` with ``kwargs`` applied, or (no ``config``) a new one of ``fields`` and ``kwargs``."""
    if config is None:
        return OffloadConfig(**fields, **kwargs)
    from dataclasses import replace

    return replace(config, **kwargs)


def _fill(
    model: nn.Module,
    cfg: OffloadConfig,
    prepared: tuple,
    index: _Index,
    where: str,
    wdtype: torch.dtype,
    t0: float,
    progress: bool,
    path: str | Path,
    tier: Any = None,
) -> tuple[Any, float, int]:
    """Installs the offloader on the meta ``model`` (the pool filled from the checkpoint), then
    loads every other tensor onto ``where``; on any error the installed handle is discarded.

    Args:
        prepared: what :func:`moert.api.patch.prepare` returned for ``model`` and ``cfg``.
        t0: ``time.perf_counter()`` when loading started.
        tier: a ``moert.api.tier.HostTier`` (``host_budget``): its pool, filled from the files in C++.

    Returns:
        ``(handle, experts_seconds, non_expert_bytes)``: the ``PatchHandle``, seconds from ``t0``
        until the experts were in the pool, bytes of the non-expert tensors.
    """
    adapter, refs, layout, dev, slots, streams = prepared
    moe_ids = [r.index for r in refs]
    E = adapter.num_experts
    reader = _Reader()
    n_other = len([k for k in index.others if not k.endswith("rotary_emb.inv_freq")])
    bar = _progress(len(moe_ids) * E + n_other, progress, f"moert.load {Path(path).name}")

    def fill(pool: Any) -> None:
        for ordinal, layer in enumerate(moe_ids):
            for e in range(E):
                gate_up, down = _read_expert(reader, index, layer, e, layout)
                pool.fill(ordinal, e, gate_up, 0)
                pool.fill(ordinal, e, down, layout.down_offset)
                bar.update(1)

    if tier is not None:
        fill = tier.filler(bar)
    handle = None
    try:
        handle = install(
            model,
            cfg,
            adapter,
            refs,
            layout,
            dev,
            slots,
            streams,
            fill,
            restore_device=where,
            predictor=False,
            pool_factory=None if tier is None else tier.make_pool,
        )
        t_experts = time.perf_counter() - t0
        offloaded = {id(r.experts) for r in refs}
        pooled = {  # the offloaded experts' state_dict entries: views of the pool, filled above
            f"{name}.{param}"
            for name, module in model.named_modules()
            if id(module) in offloaded
            for param in ("gate_up_proj", "down_proj")
        }
        non_expert = _load_rest(model, index, reader, where, wdtype, bar, pooled)
        if cfg.predictor is not None:  # the norms hold real weights only now
            handle._attach_predictor(refs)
    except BaseException:
        if handle is not None:
            handle.discard()
        raise
    finally:
        reader.close()
        bar.close()
    return handle, t_experts, non_expert


def _device_baseline(where: str) -> tuple[int, int]:
    """``(allocated, free)`` bytes of CUDA device ``where`` before loading; resets its peak statistics."""
    torch.cuda.synchronize(where)
    torch.cuda.reset_peak_memory_stats(where)
    return torch.cuda.memory_allocated(where), torch.cuda.mem_get_info(where)[0]


def _peak_device_bytes(
    where: str, baseline: tuple[int, int] | None, non_expert: int, cache_bytes: int
) -> tuple[int, str, dict[str, int]]:
    """``(peak bytes, how it was measured, extra report fields)`` of the load; ``baseline`` is
    :func:`_device_baseline`'s on CUDA, None on the host."""
    if baseline is None:
        method = "accounted: non-expert tensors + slab cache (CPU twin: the 'device' is host memory)"
        return non_expert + cache_bytes, method, {}
    base_alloc, base_free = baseline
    torch.cuda.synchronize(where)
    # the runtime allocates the slab cache itself (not through torch's allocator)
    peak = torch.cuda.max_memory_allocated(where) - base_alloc + cache_bytes
    method = "torch.cuda.max_memory_allocated (non-expert tensors) + slab cache bytes"
    extra = {"device_used_bytes_mem_get_info": int(base_free - torch.cuda.mem_get_info(where)[0])}
    return peak, method, extra


def _check_expert_keys(index: _Index, moe_ids: list[int], num_experts: int, path: Any) -> None:
    for layer in moe_ids:
        fused = index.experts.get((layer, None), {})
        if {"gate_up", "down"} <= fused.keys():
            continue
        for e in range(num_experts):
            parts = index.experts.get((layer, e), {}).keys()
            if not ({"gate", "up", "down"} <= parts or {"gate_up", "down"} <= parts):
                raise ValueError(
                    f"{path}: the checkpoint lacks weights of expert {e} of layer {layer} (found parts "
                    f"{sorted(parts)}); expected gate_proj/up_proj/down_proj (or w1/w3/w2) per expert, or fused "
                    "experts.gate_up_proj/down_proj"
                )


def _read_expert(
    reader: _Reader, index: _Index, layer: int, e: int, layout: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert from the memory-mapped files: ``(gate_up (2I, H), down (H, I))`` in the layout dtype, CPU."""
    parts = index.experts.get((layer, e))
    if parts and "down" in parts:

        def get(part: str) -> torch.Tensor:
            key = parts[part]
            return reader.handle(index.where[key]).get_tensor(key)

        gate_up = get("gate_up") if "gate_up" in parts else torch.cat([get("gate"), get("up")], dim=0)
        down = get("down")
    else:
        fused = index.experts[(layer, None)]
        gate_up = reader.handle(index.where[fused["gate_up"]]).get_slice(fused["gate_up"])[e]
        down = reader.handle(index.where[fused["down"]]).get_slice(fused["down"])[e]
    gate_up, down = gate_up.reshape(layout.gate_up_shape), down.reshape(layout.down_shape)
    return gate_up.to(layout.dtype).contiguous(), down.to(layout.dtype).contiguous()


def _load_rest(
    model: nn.Module,
    index: _Index,
    reader: _Reader,
    device: str,
    dtype: torch.dtype,
    bar: Any,
    pooled: set[str],
) -> int:
    """Materialise every non-expert parameter and buffer on ``device`` (``pooled``: state_dict keys
    that live in the expert pool); returns their bytes."""
    model.to_empty(device=device)
    expected = {k: v for k, v in _own_tensors(model).items() if k not in pooled}
    missing = [k for k in expected if k not in index.others]
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and missing == ["lm_head.weight"]:
        missing = []
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}; is it a complete "
            f"{model.config.model_type} checkpoint?"
        )
    unexpected = [k for k in index.others if k not in expected and not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise ValueError(
            f"the checkpoint has {len(unexpected)} weight(s) this {model.config.model_type} model does not know, "
            f"e.g. {unexpected[:3]}; was it saved by another architecture or transformers version?"
        )
    with torch.no_grad():
        for name, target in expected.items():
            if name not in index.others:
                continue
            key = index.others[name]
            src = reader.handle(index.where[key]).get_tensor(key)
            if tuple(src.shape) != tuple(target.shape):
                raise ValueError(
                    f"checkpoint {key} has shape {tuple(src.shape)}, the model expects {tuple(target.shape)}"
                )
            target.copy_(src.to(target.dtype) if target.is_floating_point() else src)
            bar.update(1)
    if tied and "lm_head.weight" not in index.others:
        model.tie_weights()
    _rebuild_nonpersistent(model, device)
    return tensor_bytes(model)


def _own_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict's keys and tensors without its hooks: a patched model's state_dict hook
    materialises the pooled experts, which a tiered pool (``host_budget``) would read from the files."""
    out: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's own parameters and buffers (tied weights once). A patched model's
    offloaded experts are not among them: they live in the pool (its state_dict shows them as
    pool views)."""
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _nonpersistent(model: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
    out = []
    for mod in model.modules():
        for name in mod._non_persistent_buffers_set:
            buf = mod._buffers.get(name)
            if buf is not None:
                out.append((mod, buf))
    return out


def _rebuild_nonpersistent(model: nn.Module, device: str) -> None:
    """Non-persistent buffers are not in checkpoints; recompute them (rotary inv_freq) on ``device``."""
    for mod in model.modules():
        names = [n for n in mod._non_persistent_buffers_set if mod._buffers.get(n) is not None]
        if not names:
            continue
        if not type(mod).__name__.endswith("RotaryEmbedding"):
            raise ValueError(
                f"{type(mod).__name__} has non-persistent buffers {names} that moert.load cannot recompute; "
                "load this model with transformers and use moert.patch instead"
            )
        fresh = type(mod)(mod.config)
        for n in names:
            mod._buffers[n] = fresh._buffers[n].to(device)
