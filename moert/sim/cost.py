"""The simulator's time model: :class:`CostModel` (traffic -> predicted tokens/s).

:func:`cpu_split` (re-exported here) lives in :mod:`moert.cost`, shared with the runtime's
heterogeneous mode.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from moert.cost import cpu_split
from moert.sim.timeline import Traffic, link_timeline

__all__ = ["WINDOWS", "CostModel", "cpu_split"]

WINDOWS = ("windowed", "pooled")


@dataclass(frozen=True)
class CostModel:
    """Turns simulated traffic into time. Defaults: DeepSeek-V2-Lite on PCIe Gen4, batch 1 decode.

    **Windowed (the default, ``window="windowed"``)**: one copy link, replayed step by step
    (:func:`moert.sim.timeline.link_timeline`; a step ``s`` is one MoE layer of one token, or of one
    verify pass). With ``C = t_layer``, ``c = S / BW`` (one expert's copy), ``a = attention_share``::

        step s starts at t0; its prefetch copies join the prefetch FIFO at t0;
        [t0, t0 + a*C)     attention: the link works through the FIFO;
        t0 + a*C           routing: the step needs its experts. Its demand misses D_s, and every used
                           prefetch copy still queued beyond the committed window (promoted), wait for
                           the committed window (the rest of the copy on the link and the next ones,
                           ``prefetch_depth`` in all), then copy one after another;
                           a used prefetch copy inside the window is waited for; one done is free;
        stall W_s          = (window_rest + D_s + promoted_s) * c with any copy to make, else the wait
                           for the latest committed used copy (0 when all arrived);
        [.., + (1-a)*C)    the experts compute; the link works through the FIFO again;
        t_token            = sum_s (C + W_s) / tokens.

    What it assumes (and where the engine, csrc/src/copy_engine.cc and copy_lanes.cc, differs):

    - one link: the copy engine's lanes share the PCIe bandwidth BW, so K lanes move what one does; a
      copy runs at BW from start to end (no per-copy latency, no host-side issue cost);
    - priorities as the engine's queue: demand copies before queued prefetches, prefetches FIFO in the
      order they were queued (by step, then own layer first, most likely first); a copy already issued is
      not preempted: the engine issues a prefetch while a lane has fewer than ``kPrefetchDepth`` = 2 in
      flight, so a demand copy waits behind up to ``prefetch_depth`` prefetch copies (the in-flight one's
      remainder and the next), modelled as a fluid FIFO (fractions of a copy);
    - a used prefetch still queued is promoted to a demand copy (the engine's acquire does that); a
      prefetch is never cancelled (the simulated cache loads at once, so it never evicts a queued copy);
    - prefetches are issued at the step's start: everything a policy asks before an access
      (``on_prediction`` and ``on_routed``), so ``oracle`` stands for a perfect predictor run before
      attention; a plan after a call (``after_call``) is issued at the next step's start; a prefetch
      into a later layer planned at a router (``on_routed``; the budget one layer ahead) is queued right
      after the step's own copies are waited for (the engine would issue it after the call's acquire),
      so it hides behind the rest of the step's compute and the next step's attention;
    - a step's compute does not depend on the copies (no PCIe contention slows the GPU), and the link
      runs across token and prompt boundaries as one timeline; prefill is not modelled;
    - ``attention_share`` (default 0.2): the share of a layer's time before the router's pick, the only
      window in which a prefetch of the layer's own experts can hide. DeepSeek-V2-Lite reads ~14 M
      attention weights against ~69 M active expert weights per layer (0.17 when memory-bound); an
      eager-mode layer is launch-bound and its share is not measured yet.

    - overload: when a policy queues more prefetch bytes than the link can move, the FIFO lags further
      behind every step: used prefetches are then promoted (charged as demand copies) and the copies
      still queued when the trace ends are charged as a stall behind prefetches
      (``prefetch_backlog``, reported: the next demand copy would wait for them), so a policy cannot
      gain by queueing more than the link moves. The engine
      lags alike (FIFO within a class) and cancels a queued prefetch whose slot is taken; here queued
      copies whose expert was evicted are still copied when the link reaches them.

    With no prefetch it is exactly ``t_token = (steps * C + D * c) / tokens``: the pooled model's
    copy-only formula, except that a verify pass shorter than N still costs a whole pass.

    With an SSD tier (``SimConfig.tiers``) the SSD is a second link of this timeline: a copy of an
    expert not in the host pool waits for its read (:mod:`moert.sim.tier_timeline`, which states its
    own assumptions); without a pool miss it is this model exactly.

    **Pooled** (``window="pooled"``, the earlier model, kept for comparison; every row also carries it
    as ``pooled_tok_s``): ``t_token = max(L * t_layer, B_prefetch / BW) + B_demand / BW``: prefetches
    hide behind a whole token's compute, whenever they were issued and however late they land.

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
      one;
    - windowed: a step's ``D`` demand misses split as above (``c`` on the CPU, chosen without the link's
      backlog), its stall ``max(window_rest + D - c + promoted, c * t_cpu + t_act)`` copy times; the
      link is idle while only the CPU works. Pooled: ``t_token = max(L * t_layer, B_prefetch / BW) +
      (sum of the step stalls) / tokens``.

    Speculative decoding (``verify_tokens = N > 1``, copy only): one verify pass of N tokens costs the
    compute of one token, ``L * t_layer`` (at batch 1 and N <= ~8 a decoder layer is memory-bound: it
    reads the same weights for N rows), and moves the pass's bytes: windowed, a step is a pass's layer
    and the time is divided by the generated tokens; pooled, per generated token ``t_token =
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
        window: ``windowed`` (default) or ``pooled`` (see above): which one ``predicted_tok_s`` is.
        attention_share: windowed: the share of a layer's compute before its experts are needed.
        prefetch_depth: windowed: prefetch copies committed ahead of a demand copy (the engine's 2).
    """

    expert_bytes: int = 3 * 2048 * 1408 * 2
    bandwidth_gbs: float = 25.0
    layer_compute_ms: float = 0.2
    cpu_expert_ms: float | None = None
    activation_us: float = 20.0
    window: str = "windowed"
    attention_share: float = 0.2
    prefetch_depth: int = 2

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
        if self.window not in WINDOWS:
            raise ValueError(f"window={self.window!r}; use one of {', '.join(WINDOWS)}")
        if not (math.isfinite(self.attention_share) and 0 <= self.attention_share <= 1):
            raise ValueError(
                f"attention_share={self.attention_share!r} must be a fraction in [0, 1] (the share of a "
                "layer's compute before its experts are needed; e.g. 0.2)"
            )
        if (
            isinstance(self.prefetch_depth, bool)
            or not isinstance(self.prefetch_depth, int)
            or self.prefetch_depth < 1
        ):
            raise ValueError(
                f"prefetch_depth={self.prefetch_depth!r} must be an integer >= 1 (the engine's 2)"
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

    def predict_windowed(self, traffic: Traffic, tokens: int) -> dict:
        """The windowed prediction (see the class doc) of one run's per-step traffic.

        Args:
            traffic: per-step demand misses, prefetch copies and their first uses (:class:`Traffic`).
            tokens: generated tokens (the steps are tokens' or verify passes' MoE layers).

        Returns:
            ``{"predicted_tok_s", "token_ms", "stall_demand_ms", "stall_behind_prefetch_ms",
            "stall_late_prefetch_ms", "late_prefetches", "promoted_prefetches"}`` (stalls per token),
            plus with ``cpu_expert_ms`` ``{"cpu_predicted_tok_s", "cpu_token_ms"}``.
        """
        tokens = max(int(tokens), 1)
        kw = dict(
            compute_s=self.layer_compute_ms * 1e-3,
            copy_s=self.copy_s,
            attention_share=self.attention_share,
            depth=self.prefetch_depth,
        )
        got = link_timeline(traffic, **kw)
        out = {
            "predicted_tok_s": tokens / got["seconds"] if got["seconds"] > 0 else None,
            "token_ms": got["seconds"] / tokens * 1e3,
            "late_prefetches": got["late_prefetches"],
            "promoted_prefetches": got["promoted_prefetches"],
            "prefetch_backlog": got["prefetch_backlog"],
        }
        for key in ("demand", "behind_prefetch", "late_prefetch"):
            out[f"stall_{key}_ms"] = got[f"stall_{key}_s"] / tokens * 1e3
        if self.heterogeneous:
            n = np.arange(int(traffic.demand.max(initial=0)) + 1)
            cpu = cpu_split(n, self.cpu_expert_ms * 1e-3, self.copy_s, self.activation_us * 1e-6)
            het = link_timeline(traffic, **kw, cpu=cpu)
            out["cpu_predicted_tok_s"] = tokens / het["seconds"] if het["seconds"] > 0 else None
            out["cpu_token_ms"] = het["seconds"] / tokens * 1e3
        return out

    def predict_grid(
        self,
        points: list[tuple[float, float]],
        traffic: Traffic,
        tokens: int,
        bytes_per_token: tuple[float, float],
        num_layers: int,
        verify_tokens: int = 1,
    ) -> list[dict]:
        """The prediction at each (layer ms, GB/s) of ``points``, the other constants this model's.

        Returns:
            One dict per point: ``layer_ms``, ``bandwidth_gbs``, ``predicted_tok_s`` (this model's window),
            ``pooled_tok_s`` and, windowed, the stalls of :meth:`predict_windowed`.
        """
        out = []
        for ms, bw in points:
            at = dataclasses.replace(self, layer_compute_ms=ms, bandwidth_gbs=bw)
            got = at.predict_windowed(traffic, tokens) if self.window == "windowed" else {}
            got["pooled_tok_s"] = at.predict(*bytes_per_token, num_layers, verify_tokens)["predicted_tok_s"]
            got.setdefault("predicted_tok_s", got["pooled_tok_s"])
            out.append({"layer_ms": ms, "bandwidth_gbs": bw, **got})
        return out
