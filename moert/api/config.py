"""``OffloadConfig``: how ``moert.patch`` / ``moert.load`` offload a model's routed experts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moert.policy.registry import REGISTRY
from moert.policy.runtime import check_runtime_name
from moert.policy.score import check_plan_options

__all__ = ["OffloadConfig", "POLICIES", "BACKENDS", "PREFETCH_MODES"]

#: The registered policies a model runs (``moert.policy.REGISTRY.runtime_names()``; one object per
#: policy, driven by the runtime and the simulator alike): "lru", "lfu" (the cache's own orders);
#: "score": eviction ordered by the predictor's scores for the coming layers, then recency (needs
#: ``predictor``); "utility": MoE-SpAc's speculative utility (``moert.policy.utility``): an EMA of each
#: expert's use per layer call orders eviction and picks prefetches; "fifo": first loaded, first evicted;
#: "learned": a learned forecast of each expert's next use (``moert.policy.learned``; needs ``evictor``).
#: All but lru/lfu run on the cache's "priority" order (runtime backend).
POLICIES = tuple(REGISTRY.runtime_names())
#: "async": prefetch the predicted experts while attention runs (CUDA: the copy engine waits on an
#: event, the Python thread never blocks; CPU twin: queued synchronously); "off": the predictor only
#: orders eviction and is scored (online recall), nothing is prefetched; "budget": prefetch only what
#: the measured link slack hides, by expected value (``moert.policy.budget``; needs ``predictor``).
PREFETCH_MODES = ("async", "off", "budget")
#: "runtime": the C++ pool / slab cache / copy engine (moert.engine.runtime); "reference": a pure-Python
#: dict cache with synchronous copies (the obviously-correct reference, for tests); "naive": no
#: cache, every selected expert copied on every use (the Accelerate-style baseline of bench/)
BACKENDS = ("runtime", "reference", "naive")


@dataclass(frozen=True)
class OffloadConfig:
    """Offloading settings.

    Attributes:
        cache_experts: device cache size. An int is a number of slots (experts over all MoE layers);
            a float in (0, 1] is a fraction of all routed experts (rounded up).
        policy: eviction policy, one of ``POLICIES``: ``"lru"``, ``"lfu"``, ``"score"`` (predictor
            scores, then recency; needs ``predictor``), ``"utility"`` or ``"fifo"``.
        device: ``"cuda"`` (the experts' CUDA device, else torch's current one), ``"cuda:N"``,
            ``"cpu"`` (the CPU twin: slots in host memory), ``"sim"`` (the asynchronous device model:
            the CUDA protocol with modelled copy times, slots in host memory, torch computing on the
            host thread as its stream 0; runtime backend) or None (CUDA when one can run, else CPU;
            ``MOERT_DEVICE`` overrides).
        copy_streams: copy streams (CUDA) / worker threads (CPU twin); None reads ``MOERT_COPY_STREAMS``.
        backend: ``"runtime"`` (default), ``"reference"`` (pure-Python cache, for tests) or ``"naive"``
            (no cache: copy every selected expert on every use; a benchmark baseline).
        predictor: a ``preattn`` predictor (a ``moert.predict`` predictor object or the path of its
            ``.safetensors`` file) run fused with each MoE layer's ``input_layernorm``; None: no prediction.
        overprovision: experts prefetched beyond the model's top-k per layer: an int ``m`` >= 0
            (top-(k+m)), or ``"adaptive"``: every expert whose predicted probability exceeds
            ``threshold``, at least k and at most ``k + max_overprovision``.
        prefetch: ``"async"``, ``"off"`` or ``"budget"`` (see ``PREFETCH_MODES``).
        threshold: the adaptive probability threshold tau, in (0, 1).
        max_overprovision: ``m_max`` of the adaptive mode.
        score_decay: policy ``"score"``: a lookahead prediction for layer l+j is weighted by
            ``score_decay ** j`` (in (0, 1]).
        overlap_waves: when a layer's experts outnumber the slots (prefill, big batches), stream
            them in waves of half the slots and prefetch wave i+1 while wave i computes (runtime
            backend; the reference and naive stores stream plain waves). Numbers never change.
        deferred_waits: acquire a layer's experts without waiting for their copies, and wait for
            each one right before it computes (on CUDA the compute stream waits per expert), so the
            first experts compute while the later ones still copy (runtime backend). False: acquire
            waits for every copy of the wave (the CPU twin's caller then copies its own demand
            loads). None (default): on for CUDA, off for the CPU twin, where copies and compute
            share the cores (bench_decode on 2 cores: the same speed or a few percent slower).
        cpu_experts: heterogeneous mode (DESIGN §7, ``moert.engine.hetero``): per layer call, some missed
            experts run on the host CPU from the pool instead of being copied, as many as minimise
            ``max(c * cpu + activation, (n - c) * copy)``. Off by default: on CUDA a host expert is
            within fp tolerance of the device result, not bit-identical.
        cpu_expert_ms: one expert's host forward for one token; None: measured at patch time.
        copy_expert_ms: one expert's copy into the cache; None: measured at patch time.
        activation_us: moving a layer call's rows to the host and the products back.
        utility_decay: policy ``"utility"``: weight of the past in each expert's moving average of
            use, in (0, 1); its prefetch width is ``k + overprovision`` (``prefetch="off"``: none).
        evictor: policy ``"learned"``: the reuse model (the path of a file made by ``moert train
            --predictor reuse``, or a loaded ``moert.predict.reuse.ReuseModel``).
    """

    cache_experts: int | float = 0.25
    policy: str = "lru"
    device: str | None = None
    copy_streams: int | None = None
    backend: str = "runtime"
    predictor: Any = None
    overprovision: int | str = 2
    prefetch: str = "async"
    threshold: float = 0.3
    max_overprovision: int = 4
    score_decay: float = 0.5
    overlap_waves: bool = True
    deferred_waits: bool | None = None
    cpu_experts: bool = False
    cpu_expert_ms: float | None = None
    copy_expert_ms: float | None = None
    activation_us: float = 20.0
    utility_decay: float = 0.7
    evictor: Any = None

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
        check_runtime_name(self.policy)
        d = self.device
        if (
            d is not None
            and d not in ("cpu", "sim", "cuda")
            and not (isinstance(d, str) and d.startswith("cuda:") and d[5:].isdigit())
        ):
            raise ValueError(f"device={d!r} must be 'cpu', 'sim', 'cuda', 'cuda:N' or None (auto)")
        if self.copy_streams is not None and not 1 <= self.copy_streams <= 16:
            raise ValueError(f"copy_streams={self.copy_streams} is out of range; use 1..16")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {', '.join(BACKENDS)}")
        self._check_prediction()

    def _check_prediction(self) -> None:
        check_plan_options(self.overprovision, self.threshold, self.max_overprovision, self.score_decay)
        if self.prefetch not in PREFETCH_MODES:
            raise ValueError(f"prefetch={self.prefetch!r} is not one of {', '.join(PREFETCH_MODES)}")
        if not isinstance(self.overlap_waves, bool):
            raise ValueError(f"overlap_waves={self.overlap_waves!r} must be True or False")
        if self.deferred_waits is not None and not isinstance(self.deferred_waits, bool):
            raise ValueError(f"deferred_waits={self.deferred_waits!r} must be True, False or None (auto)")
        if not isinstance(self.cpu_experts, bool):
            raise ValueError(f"cpu_experts={self.cpu_experts!r} must be True or False")
        for name in ("cpu_expert_ms", "copy_expert_ms"):
            v = getattr(self, name)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf
            ):
                raise ValueError(
                    f"{name}={v!r} must be a positive number of milliseconds, or None to measure it"
                )
        a = self.activation_us
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a < math.inf:
            raise ValueError(f"activation_us={a!r} must be a number of microseconds >= 0")
        ud = self.utility_decay
        if isinstance(ud, bool) or not isinstance(ud, (int, float)) or not 0.0 < ud < 1.0:
            raise ValueError(f"utility_decay={ud!r} must be in (0, 1), e.g. 0.7")
        if self.policy == "utility":
            if self.predictor is not None:
                raise ValueError(
                    "policy='utility' orders eviction by the experts' recent use and cannot also take a "
                    "predictor's scores: use policy='score' (or 'lru') with predictor=, or drop predictor="
                )
            if self.overprovision == "adaptive":
                raise ValueError(
                    "policy='utility' prefetches its top k + m experts: give an int overprovision=m "
                    "('adaptive' is for a predictor's probabilities)"
                )
        if (self.policy == "learned") != (self.evictor is not None):
            raise ValueError(
                "policy='learned' evicts by a reuse model: pass evictor=R.safetensors (made by `moert train "
                "--predictor reuse`)" if self.policy == "learned" else
                f"evictor= is the model of policy='learned'; policy={self.policy!r} does not use it: drop "
                "evictor= or use policy='learned'"
            )  # fmt: skip
        if self.policy in ("utility", "fifo", "learned") and self.backend != "runtime":
            raise ValueError(
                f"policy={self.policy!r} needs backend='runtime' (cache priorities and the copy engine's "
                f"prefetch); backend={self.backend!r} has neither"
            )
        if self.prefetch == "budget" and (self.predictor is None or self.policy == "utility"):
            raise ValueError(
                f"prefetch='budget' fills the link's slack with a predictor's most probable experts: pass "
                f"predictor=PATH.safetensors with policy 'lru', 'lfu', 'fifo' or 'score' (got policy="
                f"{self.policy!r}, predictor={'None' if self.predictor is None else 'given'})"
            )
        if self.policy == "score" and self.predictor is None:
            raise ValueError(
                "policy='score' orders eviction by a predictor's scores: pass predictor=PATH.safetensors "
                "(train one with `moert train`), or use policy='lru'"
            )
        if self.predictor is not None and self.backend != "runtime":
            raise ValueError(
                f"predictor= needs backend='runtime' (the copy engine prefetches); backend={self.backend!r} "
                "has no prefetch path"
            )

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
