"""Training losses for expert predictors (DESIGN §5; pre-attention paper §4.5, eqs. 5-11).

Shapes: ``N`` samples (token rows), ``E`` experts, ``k`` selected experts.

- ``mse``: ``1/N Σ_i Σ_j (s_ij - ŝ_ij)^2`` — the raw output regresses the router scores (eq. 5).
- ``wbce``: ``-1/(N E) Σ w_ij l_ij`` with labels = the true top-k and ``w = 3.0`` on the true
  top-10 (by router score), ``0.5`` elsewhere (eqs. 6-8).
- ``focal``: sigmoid focal loss (Lin et al.), ``α = 0.25``, ``γ = 2``, mean over ``N E``.
- ``rank``: wbce with ``w = 3.0`` (top-10) / ``1.5`` (ranks 11-30) / ``0.5`` plus
  ``λ Σ_{j,k ∈ top-10, s_ij > s_ik} ReLU(m - (ŝ_ij - ŝ_ik))`` with ``λ = 0.3``, ``m = 0.1`` (eqs. 9-11).
  The pair sum is averaged over samples (``reduction="mean"``) so that λ does not depend on the batch
  size; ``reduction="sum"`` is eq. 11 literally.

"Top-10 by router score" needs scores. Without scores (imported traces record only expert ids, as a
set), wbce puts 3.0 on the k selected experts; ``mse`` and ``rank`` need scores and raise otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "multi_hot",
    "rank_weights",
    "mse_loss",
    "wbce_loss",
    "focal_loss",
    "rank_loss",
    "get_loss",
    "check_loss",
]

LOSSES = ("mse", "wbce", "focal", "rank")
NEEDS_SCORES = ("mse", "rank")


def multi_hot(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N, E) fp32 0/1 labels from (N, k) int expert ids (``-1`` entries are ignored)."""
    out = torch.zeros(experts.shape[0], num_experts + 1, dtype=torch.float32, device=experts.device)
    idx = experts.long().clone()
    idx[idx < 0] = num_experts
    out.scatter_(1, idx, 1.0)
    return out[:, :num_experts]


def rank_weights(
    scores: torch.Tensor | None, labels: torch.Tensor, tiers: tuple[tuple[int, float], ...], rest: float
) -> torch.Tensor:
    """(N, E) per-expert weights from the true ranking.

    Args:
        scores: (N, E) fp32 router scores, or None (then only the selected set is known and gets
            the first tier's weight).
        labels: (N, E) 0/1 selected experts.
        tiers: ``((upto_rank, weight), ...)`` — e.g. ``((10, 3.0), (30, 1.5))``: ranks 1-10 get 3.0,
            11-30 get 1.5; ranks are capped at E.
        rest: weight of every other expert.
    """
    w = torch.full_like(labels, rest)
    if scores is None:
        return torch.where(labels > 0, torch.full_like(labels, tiers[0][1]), w)
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    lo = 0
    for upto, weight in tiers:
        w = torch.where((ranks >= lo) & (ranks < upto), torch.full_like(w, weight), w)
        lo = upto
    return w


def _need_scores(name: str, scores: torch.Tensor | None) -> torch.Tensor:
    if scores is None:
        raise ValueError(
            f"loss {name!r} needs router scores, but the trace has none (has_scores=False); "
            "use --loss wbce or focal, or capture the trace with scores"
        )
    return scores


def check_loss(name: str, has_scores: bool) -> None:
    """Raises ValueError when ``name`` is unknown, or needs router scores the trace does not have."""
    get_loss(name)
    if name in NEEDS_SCORES and not has_scores:
        _need_scores(name, None)


def mse_loss(logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """Eq. 5. logits, labels, scores: (N, E) fp32. Returns a scalar."""
    scores = _need_scores("mse", scores)
    return ((scores - logits) ** 2).sum(dim=1).mean()


def wbce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor | None,
    *,
    tiers: tuple[tuple[int, float], ...] = ((10, 3.0),),
    rest: float = 0.5,
) -> torch.Tensor:
    """Eqs. 6-8. logits, labels: (N, E); scores (N, E) or None. Returns a scalar."""
    w = rank_weights(scores, labels, tiers, rest)
    # log σ(z) and log(1-σ(z)) = log σ(-z), computed stably
    ll = labels * F.logsigmoid(logits) + (1.0 - labels) * F.logsigmoid(-logits)
    return -(w * ll).mean()


def focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor | None = None,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss ``-α_t (1-p_t)^γ log p_t``, mean over N·E. Scores are unused."""
    p = torch.sigmoid(logits)
    p_t = labels * p + (1.0 - labels) * (1.0 - p)
    alpha_t = labels * alpha + (1.0 - labels) * (1.0 - alpha)
    log_p_t = labels * F.logsigmoid(logits) + (1.0 - labels) * F.logsigmoid(-logits)
    return -(alpha_t * (1.0 - p_t) ** gamma * log_p_t).mean()


def rank_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor | None,
    *,
    lam: float = 0.3,
    margin: float = 0.1,
    top: int = 10,
    reduction: str = "mean",
) -> torch.Tensor:
    """Eqs. 9-11: wbce (3.0 / 1.5 / 0.5) + λ · pairwise hinge over the true top-10.

    Args:
        logits: (N, E) raw predicted scores ŝ.
        labels: (N, E) 0/1 true top-k.
        scores: (N, E) router scores s (required).
        reduction: ``"mean"`` averages the per-sample pair sums over N; ``"sum"`` sums them (eq. 11).
    """
    scores = _need_scores("rank", scores)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not 'mean' or 'sum'")
    base = wbce_loss(logits, labels, scores, tiers=((10, 3.0), (30, 1.5)), rest=0.5)
    n_top = min(top, scores.shape[1])
    top_idx = scores.topk(n_top, dim=1).indices  # [N, n_top]
    s = scores.gather(1, top_idx)
    z = logits.gather(1, top_idx)
    valid = s[:, :, None] > s[:, None, :]  # [N, n_top, n_top]: pair (j, k) with s_j > s_k
    hinge = F.relu(margin - (z[:, :, None] - z[:, None, :]))
    per_sample = (hinge * valid).sum(dim=(1, 2))
    pair = per_sample.mean() if reduction == "mean" else per_sample.sum()
    return base + lam * pair


def get_loss(name: str):
    """The loss function named ``name`` (one of ``LOSSES``): ``f(logits, labels, scores) -> scalar``."""
    table = {"mse": mse_loss, "wbce": wbce_loss, "focal": focal_loss, "rank": rank_loss}
    if name not in table:
        raise ValueError(f"loss {name!r} is not one of {', '.join(LOSSES)}")
    return table[name]
