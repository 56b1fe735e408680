"""The simulator's time model: :class:`CostModel` (traffic -> predicted tokens/s).

:func:`cpu_split` (re-exported here) lives in :mod:`moert.cost`, shared with the runtime's
heterogeneous mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moert.cost import cpu_split

__all__ = ["CostModel", "cpu_split"]


@dataclass(frozen=True)
class CostModel:
    """Turns simulated traffic into time. Defaults: DeepSeek-V2-Lite on PCIe Gen4, batch 1 decode.

    Copy only (the default): ``t_token = max(L * t_layer, B_prefetch / BW) + B_demand / BW``.

    Heterogeneous (``cpu_expert_ms`` set; DESIGN.md §7, the MoE-SpAc / Fiddler mode): at each (token,
    MoE layer) step with ``n`` demand misses, ``c`` of them are computed on the host CPU from the pool
    (the activation row goes to the host, the experts run there, the result comes back) while the other
    ``n - c`` are copied; the step stalls for ``min over c of max(c * t_cpu + t_act, (n - c) * t_copy)``
    (``t_act`` only when ``c > 0``; ``t_copy = S / BW``), and ``t_token = max(L * t_layer, B_prefetch /
    BW) + (sum of those stalls) / tokens``. ``c = 0`` is always allowed, so it is never slower than
    copy only. See :func:`cpu_split`.

    What the heterogeneous model assumes and leaves out:

    - the cache evolves as in the copy-only replay: an expert computed on the CPU is treated, for later
      accesses, as if it had been loaded (its copy is neither made nor charged). This is optimistic for
      the heterogeneous rows; a runtime that never caches CPU-computed experts has fewer later hits;
    - batch 1: one token's row per step; the CPU computes the ``c`` experts one after another
      (``c * t_cpu``); computing several tokens' rows of one expert in a batch (prefill, batch > 1,
      speculative verify) is not modelled;
    - no contention: the CPU's reads of the pool and the copy engine's DMA reads of the same host memory
      are assumed not to slow each other, and the GPU's own compute of the resident experts is assumed
      not to shrink when some experts move to the CPU;
    - one activation round trip per step (``t_act``: the row to the host and the weighted sum of the
      ``c`` outputs back), whatever ``c`` is;
    - prefetches are unchanged (they hide behind compute as in copy only); a CPU expert never replaces
      one.

    Speculative decoding (``verify_tokens = N > 1``, copy only): one verify pass of N tokens costs the
    compute of one token, ``L * t_layer`` (at batch 1 and N <= ~8 a decoder layer is memory-bound: it
    reads the same weights for N rows), and moves the pass's bytes, so per generated token ``t_token =
    max(L * t_layer / N, B_prefetch / BW) + B_demand / BW`` with B per generated token. The draft
    model's time is not counted and every drafted token is accepted: an upper bound on SD's speed.

    Attributes:
        expert_bytes: bytes of one routed expert (DeepSeek-V2-Lite bf16 gate+up+down: 3 * 2048 * 1408 * 2
            = 17.3 MB).
        bandwidth_gbs: host-to-device bandwidth from pinned memory, GB/s (PCIe Gen4 x16: ~25).
        layer_compute_ms: GPU time of one MoE decoder layer at batch 1 with every expert resident.
            Assumption, to be calibrated from bench/: decode is memory-bound, ~2.4 B active
            parameters (bf16) over 27 layers at ~1 TB/s is ~0.18 ms; we use 0.2 ms.
        cpu_expert_ms: host CPU time of one expert for one token, reading its weights from the pool
            (measure it with ``bench/bench_cpu_expert.py``); None (default) = heterogeneous off.
        activation_us: round trip of one activation row between device and host, µs (default 20).
    """

    expert_bytes: int = 3 * 2048 * 1408 * 2
    bandwidth_gbs: float = 25.0
    layer_compute_ms: float = 0.2
    cpu_expert_ms: float | None = None
    activation_us: float = 20.0

    def __post_init__(self) -> None:
        if self.expert_bytes <= 0 or self.bandwidth_gbs <= 0 or self.layer_compute_ms < 0:
            raise ValueError(f"CostModel values must be positive, got {self}")
        if self.cpu_expert_ms is not None and not (
            math.isfinite(self.cpu_expert_ms) and self.cpu_expert_ms > 0
        ):
            raise ValueError(
                f"cpu_expert_ms={self.cpu_expert_ms!r} must be a positive number of milliseconds (one "
                "expert, one token, on the host CPU; measure it with bench/bench_cpu_expert.py), or None "
                "to turn the CPU path off"
            )
        if not (math.isfinite(self.activation_us) and self.activation_us >= 0):
            raise ValueError(
                f"activation_us={self.activation_us!r} must be a finite number of microseconds >= 0 (the "
                "activation row's round trip to the host; e.g. 20)"
            )

    @property
    def heterogeneous(self) -> bool:
        """Whether misses may be computed on the CPU (``cpu_expert_ms`` is set)."""
        return self.cpu_expert_ms is not None

    @property
    def copy_s(self) -> float:
        """Seconds to copy one expert host-to-device: ``expert_bytes / BW``."""
        return self.expert_bytes / (self.bandwidth_gbs * 1e9)

    def predict(
        self,
        demand_bytes_per_token: float,
        prefetch_bytes_per_token: float,
        num_layers: int,
        verify_tokens: int = 1,
    ) -> dict:
        """Seconds per token and tokens/s for the given traffic per (generated) token (copy only).

        ``verify_tokens`` N: tokens per verify pass (1 = autoregressive), whose compute is that of one token.

        Returns:
            ``{"ceiling_tok_s", "predicted_tok_s", "resident_tok_s", "token_ms"}``: the bandwidth
            ceiling ``BW / B`` (None when nothing moves), the prediction with compute, and the
            all-resident speed.
        """
        bw = self.bandwidth_gbs * 1e9
        compute = num_layers * self.layer_compute_ms * 1e-3 / verify_tokens
        total = demand_bytes_per_token + prefetch_bytes_per_token
        t = max(compute, prefetch_bytes_per_token / bw) + demand_bytes_per_token / bw
        return {
            "ceiling_tok_s": bw / total if total > 0 else None,
            "predicted_tok_s": 1.0 / t if t > 0 else None,
            "resident_tok_s": 1.0 / compute if compute > 0 else None,
            "token_ms": t * 1e3,
        }

    def predict_heterogeneous(
        self, misses_per_step: np.ndarray, tokens: int, prefetch_bytes_per_token: float, num_layers: int
    ) -> dict:
        """The heterogeneous prediction from how many steps had each number of demand misses.

        Args:
            misses_per_step: (n_max + 1,) int histogram: entry ``n`` = the (token, layer) steps with
                ``n`` demand misses.
            tokens: tokens replayed.
            prefetch_bytes_per_token: bytes prefetched per token (unchanged by the CPU path).
            num_layers: MoE layers L.

        Returns:
            ``{"cpu_predicted_tok_s", "cpu_token_ms", "cpu_misses", "cpu_miss_share",
            "cpu_experts_per_token", "cpu_bytes_saved", "cpu_bytes_saved_per_token"}``: tok/s with the
            CPU path, the misses computed on the CPU (count and share of all demand misses), and the
            demand bytes they keep off PCIe.
        """
        if not self.heterogeneous:
            raise ValueError("predict_heterogeneous needs cpu_expert_ms; set CostModel(cpu_expert_ms=...)")
        hist = np.asarray(misses_per_step, dtype=np.int64)
        n = np.arange(hist.size)
        c, step_s = cpu_split(n, self.cpu_expert_ms * 1e-3, self.copy_s, self.activation_us * 1e-6)
        tokens = max(int(tokens), 1)
        compute = num_layers * self.layer_compute_ms * 1e-3
        stall = float((hist * step_s).sum()) / tokens
        t = max(compute, prefetch_bytes_per_token / (self.bandwidth_gbs * 1e9)) + stall
        on_cpu, misses = int((hist * c).sum()), int((hist * n).sum())
        return {
            "cpu_predicted_tok_s": 1.0 / t if t > 0 else None,
            "cpu_token_ms": t * 1e3,
            "cpu_misses": on_cpu,
            "cpu_miss_share": on_cpu / misses if misses else 0.0,
            "cpu_experts_per_token": on_cpu / tokens,
            "cpu_bytes_saved": on_cpu * self.expert_bytes,
            "cpu_bytes_saved_per_token": on_cpu * self.expert_bytes / tokens,
        }
