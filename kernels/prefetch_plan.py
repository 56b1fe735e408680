"""From predictor logits to a prefetch plan: which experts to copy, and their eviction scores.

A plan is what the copy engine needs from one layer's prediction (DESIGN.md §3 step 2), for each
predicted layer ``j`` (the layer's own, then ``l+1..l+d`` for a lookahead predictor):

- ``ids[j]``: the ``width = k + m`` experts most likely needed by any row of the batch, most likely
  first. A batch needs an expert if any row does, so rows are aggregated by the maximum logit
  (the probabilities below are monotone in the logit, so this is the maximum probability). In the
  adaptive mode only the first ``top_k`` and those whose probability exceeds ``threshold`` are
  kept; the rest of the row is -1.
- ``scores[j]``: E eviction priorities (policy ``score``): the probability of each kept id times
  ``score_decay ** j``, 0 for every other expert.

Probabilities are ``sigmoid(logit)`` for predictors trained with a BCE-style loss and
``clamp(logit, 0, 1)`` for ``mse`` on router scores.

``prefetch_plan_reference`` is the plain PyTorch version (run on CPU devices, and the reference
the Triton versions are tested against; never edited to match). On CUDA the plan is made by a
Triton program: either as the epilogue of the fused predictive-norm kernel
(``predictive_norm_forward(..., plan=spec)``: the last program to finish its logits makes the
plan, one launch in all) or on its own after it (``prefetch_plan``); which one is faster is for
``bench/bench_predictive_norm.py`` to show. Ties between equal logits go to the lower expert id
in the kernels; ``torch.topk`` does not promise an order for ties.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch

__all__ = ["PROBABILITIES", "PlanSpec", "prefetch_plan", "prefetch_plan_reference"]

PROBABILITIES = ("sigmoid", "clamp")


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """How logits become a plan.

    Attributes:
        width: ids per predicted layer, ``k + m`` (in the adaptive mode, ``k + max_overprovision``).
        top_k: the model's k (the adaptive mode always keeps the first k).
        adaptive: keep only ids whose probability exceeds ``threshold`` beyond the first k.
        threshold: the adaptive mode's probability threshold, in [0, 1).
        probabilities: ``"sigmoid"`` or ``"clamp"``.
        score_decay: weight ``score_decay ** j`` of predicted layer j's scores, in (0, 1].
    """

    width: int
    top_k: int
    adaptive: bool = False
    threshold: float = 0.5
    probabilities: str = "sigmoid"
    score_decay: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"PlanSpec.top_k={self.top_k!r} must be an int >= 1")
        if not isinstance(self.width, int) or self.width < self.top_k:
            raise ValueError(f"PlanSpec.width={self.width!r} must be an int >= top_k={self.top_k}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"PlanSpec.threshold={self.threshold!r} must be in [0, 1)")
        if self.probabilities not in PROBABILITIES:
            raise ValueError(f"PlanSpec.probabilities={self.probabilities!r} is not one of {PROBABILITIES}")
        if not 0.0 < self.score_decay <= 1.0:
            raise ValueError(f"PlanSpec.score_decay={self.score_decay!r} must be in (0, 1]")

    def check(self, num_experts: int) -> None:
        """Raises ValueError when the plan does not fit ``num_experts`` experts."""
        if self.width > num_experts:
            raise ValueError(
                f"PlanSpec.width={self.width} exceeds the {num_experts} experts of the logits; "
                f"use at most {num_experts} (k + m <= E)"
            )


def prefetch_plan_reference(logits: torch.Tensor, spec: PlanSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan in plain PyTorch.

    Args:
        logits: (..., T, n, E) fp32 predictor logits: T rows (one batch), n predicted layers; any
            leading dims are independent batches (the simulator plans every decode step at once).
        spec: see :class:`PlanSpec`.

    Returns:
        ``(ids (..., n, width) int32, scores (..., n, E) fp32)`` on logits' device; with T = 0 every
        id is -1 and every score 0.
    """
    if logits.dim() < 3:
        raise ValueError(f"logits must be (..., T, n, E), got {tuple(logits.shape)}")
    *lead, T, n, E = logits.shape
    spec.check(E)
    if T == 0:
        ids = torch.full((*lead, n, spec.width), -1, dtype=torch.int32, device=logits.device)
        return ids, torch.zeros(*lead, n, E, dtype=torch.float32, device=logits.device)
    agg = logits.float().amax(dim=-3)  # [..., n, E]: a batch needs an expert if any row does
    top, ids = agg.topk(spec.width, dim=-1)  # [..., n, width], most likely first
    probs = torch.sigmoid(top) if spec.probabilities == "sigmoid" else top.clamp(0.0, 1.0)
    if spec.adaptive:
        rank = torch.arange(spec.width, device=ids.device)
        keep = (rank < spec.top_k) | (probs > spec.threshold)  # [..., n, width]
        ids = torch.where(keep, ids, torch.full_like(ids, -1))
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    decay = spec.score_decay ** torch.arange(n, dtype=torch.float32, device=probs.device)
    # padding (-1) scatters into an extra column E, dropped after: expert 0 keeps its score
    cols = torch.where(ids >= 0, ids, torch.full_like(ids, E))
    scores = torch.zeros(*lead, n, E + 1, dtype=torch.float32, device=probs.device)
    scores = scores.scatter_(-1, cols, probs * decay[:, None])[..., :E].contiguous()  # [..., n, E]
    return ids.to(torch.int32), scores


def check_plan_args(logits: torch.Tensor, spec: PlanSpec) -> None:
    """The checks shared by the Triton plan paths: (T, n, E) contiguous fp32, spec fits E."""
    if not isinstance(spec, PlanSpec):
        raise ValueError(f"plan must be a PlanSpec, got {type(spec).__name__}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[0] == 0:
        raise ValueError(
            f"logits must be a (T, n, E) tensor with T >= 1, got {getattr(logits, 'shape', type(logits).__name__)}"
        )
    if logits.dtype != torch.float32 or not logits.is_contiguous():
        raise ValueError(
            f"logits must be contiguous float32, got {logits.dtype}, contiguous={logits.is_contiguous()}"
        )
    spec.check(logits.shape[2])


def plan_scalars(spec: PlanSpec) -> dict[str, int | float]:
    """The plan's runtime arguments of the Triton programs."""
    return {
        "width": spec.width,
        "top_k": spec.top_k,
        "threshold": float(spec.threshold),
        "score_decay": float(spec.score_decay),
    }


def plan_constexprs(spec: PlanSpec) -> dict[str, int | bool]:
    return {"PROB": PROBABILITIES.index(spec.probabilities), "ADAPTIVE": bool(spec.adaptive)}


def prefetch_plan(logits: torch.Tensor, spec: PlanSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan by one Triton program (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Args:
        logits: (T, n, E) contiguous fp32.
        spec: see :class:`PlanSpec`.

    Returns:
        ``(ids (n, width) int32, scores (n, E) fp32)``.
    """
    from .predictive_norm import _load_kernel

    check_plan_args(logits, spec)
    _load_kernel(logits.device)  # the device checks (and the interpreter flag) of the norm kernel
    kernel = importlib.import_module(f"{__package__}._prefetch_plan_kernel")
    T, n, E = logits.shape
    ids = torch.empty(n, spec.width, dtype=torch.int32, device=logits.device)
    scores = torch.empty(n, E, dtype=torch.float32, device=logits.device)
    block_e = max(16, 1 << max(E - 1, 0).bit_length())
    block_t = max(1, min(64, 8192 // block_e, 1 << max(T - 1, 0).bit_length()))
    kernel.prefetch_plan_kernel[(1,)](
        logits,
        ids,
        scores,
        T,
        n,
        E,
        **plan_scalars(spec),
        **plan_constexprs(spec),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        num_warps=4,
        enable_fp_fusion=True,
    )
    return ids, scores
