"""``score``: eviction ordered by a predictor's scores, then recency; and the planner that makes them.

Before MoE layer l runs, a predictor's logits become a plan (:class:`ScorePlanner`, the hook
``on_prediction``; ``moert.kernels.prefetch_plan`` makes ids and scores, on CUDA in the fused
kernel's epilogue, else by its PyTorch reference):

- prefetch ids: per predicted layer (``l``, and ``l+1..l+d`` for a lookahead predictor; rows past the
  last MoE layer are dropped), the top-(k+m) experts by probability (over a batch: the max over rows),
  or in the adaptive mode every expert above ``threshold``, at least k, at most
  ``k + max_overprovision``; -1 pads a row;
- priorities (policy ``score``, C++ ``priority``: lowest evicted first, ties by recency): each
  predicted layer's E priorities become its probabilities of the prefetched ids (0 for the rest),
  weighted ``score_decay ** j`` for layer ``l+j``; the layer that just ran (``l-1``, cyclically) first
  drops to a score below every earlier clear (-1, -2, ...): in a decode cycle over L layers the layer
  that ran last is needed again last, so it goes first (Belady's order over layers), where LRU would
  evict the layer about to run (``bench/results/decode_cpu.md``: "lru+pred m=2" vs "score+pred m=2").

Probabilities: ``sigmoid`` of the logits of a BCE-style loss (wbce, focal, rank), ``clamp(logit, 0, 1)``
for ``mse`` on router scores; the simulator's baselines: ``prev-token`` 1 for the previous token's
experts, ``frequency`` the expert's selection rate (count / tokens); ``oracle`` and ``moe-infinity`` give
none. In ``EVICT+PREFETCH``, :class:`Score` is the ``EVICT`` part that keeps the ``PREFETCH`` part's
scores and clears (``score+PRED.safetensors:2``), so ``score+P`` and ``lru+P`` prefetch the same ids
and differ only in eviction.

Fast path: :meth:`ScorePlanner.predict_sequence` plans every (token, layer) step of a sequence at once
(batch 1 per step), advancing the clear counter as the steps would. Per-layer caches see only their own
layer's rows; the cross-layer order matters for one global cache.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moert.kernels.prefetch_plan import PlanSpec, prefetch_plan_reference
from moert.policy.base import Plan, Policy, Predictions, SequencePlan

__all__ = ["NO_SCORES_HELP", "Score", "ScorePlanner", "check_plan_options"]

#: How to fix ``score`` without a prefetcher that gives scores (appended to the error).
NO_SCORES_HELP = (
    "policy 'score' evicts by a predictor's scores and needs a prefetcher that gives them: "
    "score+PRED.safetensors[:m] (a trained predictor; :adaptive for the adaptive width), "
    "score+prev-token[:m] or score+frequency[:m], or --prefetch PRED.safetensors:2 for every policy"
)
# clear scores count down -1, -2, ... and wrap here (float32 holds these integers exactly); at a wrap
# the order of the layers that ran before it is lost once, and recency orders them instead
CLEAR_WRAP = 1 << 22


def check_plan_options(
    overprovision: int | str, threshold: float, max_overprovision: int, score_decay: float
) -> None:
    """Raises ValueError naming the bad value (the checks of ``moert.OffloadConfig``)."""
    om = overprovision
    if om != "adaptive" and (isinstance(om, bool) or not isinstance(om, int) or om < 0):
        raise ValueError(f"overprovision={om!r} must be an int m >= 0 or 'adaptive'")
    if not (isinstance(threshold, (int, float)) and 0.0 < threshold < 1.0):
        raise ValueError(f"threshold={threshold!r} must be a probability in (0, 1)")
    mm = max_overprovision
    if isinstance(mm, bool) or not isinstance(mm, int) or mm < 0:
        raise ValueError(f"max_overprovision={mm!r} must be an int >= 0")
    if not (isinstance(score_decay, (int, float)) and 0.0 < score_decay <= 1.0):
        raise ValueError(f"score_decay={score_decay!r} must be in (0, 1]")


class Score(Policy):
    """``EVICT`` part: the lowest predicted score first, ties by recency (the ``PREFETCH`` part's plans)."""

    name = "score"
    cache_policy = "priority"
    uses_prediction_scores = True
    fast_path = True

    def sequence_plan(self, seq: Any) -> SequencePlan:
        return SequencePlan()


class ScorePlanner(Policy):
    """A predictor's logits -> the plan of ``on_prediction`` (see the module doc).

    Args:
        lookahead: the predictor's d (its logits are (T, 1+d, E) when d > 0).
        probabilities: ``"sigmoid"`` (BCE-style loss) or ``"clamp"`` (mse on router scores).
        overprovision: m (top-(k+m)) or ``"adaptive"``.
        threshold: the adaptive mode's probability threshold.
        max_overprovision: the adaptive mode's most experts beyond k.
        score_decay: weight ``score_decay ** j`` of lookahead layer l+j's scores.
        scores: push scores and clears (policy ``score``); else only prefetch (cache ``lru``).
        prefetch: prefetch the planned ids (False: the plan only orders eviction).

    After each ``on_prediction``, ``last_planned`` holds the plan's (n, width) ids even when nothing is
    prefetched (the runtime's online recall reads it).
    """

    name = "score-planner"
    roles = ("prefetch",)
    gives_scores = True

    def __init__(
        self,
        *,
        lookahead: int = 0,
        probabilities: str = "sigmoid",
        overprovision: int | str = 0,
        threshold: float = 0.3,
        max_overprovision: int = 4,
        score_decay: float = 0.5,
        scores: bool = True,
        prefetch: bool = True,
    ) -> None:
        check_plan_options(overprovision, threshold, max_overprovision, score_decay)
        self.lookahead, self.probabilities = int(lookahead), probabilities
        self.adaptive = overprovision == "adaptive"
        self.extra = max_overprovision if self.adaptive else int(overprovision)
        self.threshold, self.score_decay = threshold, score_decay
        self.push_scores, self.do_prefetch = scores, prefetch
        self.cache_policy = "priority" if scores else "lru"
        self.step = 0  # clear counter
        self.last_planned: torch.Tensor | None = None

    def bind(self, num_layers: int, num_experts: int, top_k: int) -> None:
        super().bind(num_layers, num_experts, top_k)
        self.width = min(num_experts, top_k + self.extra)
        #: how logits become ids and scores (made by the fused kernel's epilogue on CUDA)
        self.spec = PlanSpec(
            width=self.width,
            top_k=top_k,
            adaptive=self.adaptive,
            threshold=self.threshold,
            probabilities=self.probabilities,
            score_decay=self.score_decay,
        )
        self.step = 0

    def depth(self, layer: int) -> int:
        """Predicted layers of MoE layer ``layer``: lookahead past the last MoE layer is ignored."""
        return min(self.lookahead + 1, self.num_layers - layer)

    def plan(self, layer: int, logits: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
        """``(layers, ids (n, width) int32, scores (n, E) fp32)`` of ``logits`` ((..., 1+d, E) or (..., E))."""
        rows = logits.reshape(-1, self.lookahead + 1, self.num_experts)  # [T, 1+d, E]
        n = self.depth(layer)
        ids, scores = prefetch_plan_reference(rows[:, :n], self.spec)
        return tuple(range(layer, layer + n)), ids, scores

    def on_prediction(self, layer: int, logits: Any = None, kernel_plan: Any = None) -> Plan:
        """The plan for these logits (advances the clear counter); ``kernel_plan`` = the fused kernel's
        ``(ids (1+d, width), scores (1+d, E))`` made with ``self.spec``, or None to make it here."""
        if logits is None and kernel_plan is None:
            raise ValueError(
                f"{self.name}: on_prediction needs the predictor's logits (or the kernel's plan)"
            )
        if kernel_plan is None:
            layers, ids, scores = self.plan(layer, logits)
        else:
            n = self.depth(layer)
            layers, ids, scores = tuple(range(layer, layer + n)), kernel_plan[0][:n], kernel_plan[1][:n]
        self.step = self.step % CLEAR_WRAP + 1
        self.last_planned = ids
        clear = ((layer - 1) % self.num_layers,) if self.push_scores and self.num_layers > 1 else ()
        return Plan(
            layers=layers,
            ids=ids if self.do_prefetch else None,
            scores=scores if self.push_scores else None,
            clear=clear,
            clear_score=-float(self.step),
        )

    def predict_sequence(self, logits: torch.Tensor) -> Predictions:
        """Every step of one sequence at once: what ``on_prediction(l, logits[l, t])`` returns for
        t = 0..T-1 and, within a step, l = 0..L-1 (token-major, batch 1), advancing the clear counter
        as those T*L calls would.

        Args:
            logits: (L, T, 1+d, E) fp32.

        Returns:
            Predictions (T, L, 1+d, ·): row j of layer l is for layer l+j (rows past the last layer
            are -1 / 0); no scores or clears unless ``scores``; all ids -1 unless ``prefetch``.
        """
        L, T, depth, E = logits.shape
        if (L, depth, E) != (self.num_layers, self.lookahead + 1, self.num_experts):
            raise ValueError(
                f"predict_sequence: logits {tuple(logits.shape)} must be "
                f"(L={self.num_layers}, T, {self.lookahead + 1}, E={self.num_experts})"
            )
        with torch.no_grad():
            # [L, T, 1, 1+d, E]: every step is a batch of one row
            ids, scores = prefetch_plan_reference(logits.unsqueeze(2), self.spec)  # [L, T, 1+d, w|E]
        for layer in range(L):  # lookahead past the last MoE layer is ignored
            n = self.depth(layer)
            ids[layer, :, n:] = -1
            scores[layer, :, n:] = 0.0
        steps = self.step + 1 + torch.arange(T * L, dtype=torch.float64).view(T, L)
        steps = torch.remainder(steps - 1, CLEAR_WRAP) + 1  # the counter wraps as in on_prediction
        self.step = int(steps[-1, -1].item()) if T else self.step
        ids_np = ids.transpose(0, 1).numpy().astype(np.int32)  # [T, L, 1+d, w]
        if not self.do_prefetch:
            ids_np = np.full_like(ids_np, -1)
        if not self.push_scores:
            return Predictions(ids_np)
        clear = (-steps).numpy().astype(np.float32)  # [T, L]
        if L == 1:
            clear = np.full_like(clear, np.nan)
        return Predictions(ids_np, scores.transpose(0, 1).contiguous().numpy(), clear)
