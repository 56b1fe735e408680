"""Prediction metrics, per layer and overall (DESIGN §5).

For a token at one layer with true selected set ``S`` (``|S| = k``) and predicted scores ``(E,)``:

- exact match: the predicted top-k set equals ``S``;
- over-provision hit (m): ``S ⊆`` predicted top-(k+m);
- top-1: the predicted argmax is in ``S``;
- recall@k: ``|top-k ∩ S| / k`` (equal to precision and F1 of the top-k set, since both sets have k);
- precision / recall / F1 at k+m: of the over-provisioned set top-(k+m), micro-averaged over tokens
  (precision divides by the ids predicted: k+m per token from scores, fewer where recorded
  predictions list fewer);
- macro F1: per expert F1 of "expert in top-k" vs "expert in S" over tokens, averaged over the
  experts (MoE-Beyond's macro F1, with top-k instead of a 0.5 threshold).

Ties in scores are broken towards the lower expert id (stable sort), so baselines with flat scores
are deterministic. Recorded predictions (ids, not scores: ``MetricAccumulator.update_ids``) go
through the same counting, their ids taken in order as the ranking. "overall" pools every
(token, layer) sample.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ranked", "overlap", "MetricAccumulator", "compute_metrics", "format_table"]


def ranked(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) int64 indices of the n largest scores, ties to the lower index. scores: (..., E)."""
    return scores.argsort(dim=-1, descending=True, stable=True)[..., :n]


def overlap(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """(N,) int64 ``|pred_i ∩ true_i|``. pred: (N, p), true: (N, k); ``-1`` in true never matches."""
    return (pred[:, :, None] == true[:, None, :]).any(dim=2).sum(dim=1)


class MetricAccumulator:
    """Accumulates counts over batches of (scores, true experts) for each layer.

    Args:
        num_layers: ``L`` (rows of the per-layer table).
        num_experts: ``E``.
        top_k: ``k``.
        overprovision: the ``m`` values to report over-provision hit and precision/F1 at k+m for.
    """

    def __init__(
        self, num_layers: int, num_experts: int, top_k: int, overprovision: tuple[int, ...] = (2, 4)
    ):
        for m in overprovision:
            if not 0 <= m <= num_experts - top_k:
                raise ValueError(f"overprovision m={m} must be in [0, E-k={num_experts - top_k}]")
        self.L, self.E, self.k = num_layers, num_experts, top_k
        self.ms = tuple(sorted(set(overprovision)))
        z = lambda: torch.zeros(num_layers, dtype=torch.float64)  # noqa: E731
        self.n, self.exact, self.top1, self.inter_k = z(), z(), z(), z()
        self.hit = {m: z() for m in self.ms}
        self.inter = {m: z() for m in self.ms}
        self.size = {m: z() for m in self.ms}  # predicted ids counted in top-(k+m) (k+m each from scores)
        self.tp = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.fp = torch.zeros_like(self.tp)
        self.fn = torch.zeros_like(self.tp)

    def update(self, layer: int, scores: torch.Tensor, true: torch.Tensor) -> None:
        """Adds N samples of one layer. scores: (N, E) float; true: (N, k) int expert ids."""
        if scores.dim() != 2 or scores.shape[1] != self.E:
            raise ValueError(f"scores must be (N, E={self.E}), got {tuple(scores.shape)}")
        if true.shape != (scores.shape[0], self.k):
            raise ValueError(
                f"true experts must be (N, k) = ({scores.shape[0]}, {self.k}), got {tuple(true.shape)}"
            )
        if scores.shape[0] == 0:
            return
        scores = scores.detach().float().cpu()
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(f"predicted scores for layer index {layer} contain NaN or inf")
        n_max = self.k + (self.ms[-1] if self.ms else 0)
        self._add(layer, ranked(scores, n_max), true.long().cpu())  # [N, k+m_max]

    def update_ids(self, layer: int, pred: torch.Tensor, true: torch.Tensor) -> None:
        """Adds N samples of one layer from predicted ids instead of scores (recorded predictions).

        Args:
            layer: index of the layer's row.
            pred: (N, p) int expert ids, taken as a ranking (first = most likely), -1 pads; p may be
                smaller or larger than k. Top-k is the first k ids, top-(k+m) the first k+m: a row
                with fewer ids predicts fewer experts (never padded with guesses).
            true: (N, k) int expert ids.
        """
        if pred.dim() != 2 or true.shape != (pred.shape[0], self.k):
            raise ValueError(
                f"predicted ids must be (N, p) and true experts (N, k={self.k}), got {tuple(pred.shape)} and "
                f"{tuple(true.shape)}"
            )
        if pred.is_floating_point() or pred.dtype == torch.bool:
            raise ValueError(f"predicted ids must be integers, got {pred.dtype}")
        if pred.shape[0] == 0:
            return
        pred = pred.long().cpu()
        if pred.numel() and (int(pred.min()) < -1 or int(pred.max()) >= self.E):
            raise ValueError(
                f"predicted ids for layer index {layer} must be in [0, E={self.E}) or -1 (padding)"
            )
        self._add(layer, pred, true.long().cpu())

    def _add(self, layer: int, pred: torch.Tensor, true: torch.Tensor) -> None:
        """Counts N samples: pred (N, p) int64 ids most likely first (-1 pads), true (N, k) int64."""
        N, k = pred.shape[0], self.k
        ov_k = overlap(pred[:, :k], true)
        self.n[layer] += N
        self.exact[layer] += (ov_k == k).sum()
        self.top1[layer] += overlap(pred[:, :1], true).sum()
        self.inter_k[layer] += ov_k.sum()
        for m in self.ms:
            chosen = pred[:, : k + m]
            ov = overlap(chosen, true)
            self.hit[m][layer] += (ov == k).sum()
            self.inter[m][layer] += ov.sum()
            self.size[m][layer] += (chosen >= 0).sum()
        top = pred[:, :k]
        p_hot = (
            torch.zeros(N, self.E, dtype=torch.int64).scatter_add_(1, top.clamp(min=0), (top >= 0).long()) > 0
        )
        t_hot = torch.zeros(N, self.E, dtype=torch.bool).scatter_(1, true, True)
        self.tp[layer] += (p_hot & t_hot).sum(0)
        self.fp[layer] += (p_hot & ~t_hot).sum(0)
        self.fn[layer] += (~p_hot & t_hot).sum(0)

    def _row(self, sl: slice | int) -> dict[str, float]:
        n = float(self.n[sl].sum())
        if n == 0:
            return {"tokens": 0}
        k = self.k
        row: dict[str, float] = {
            "tokens": int(n),
            "exact": float(self.exact[sl].sum()) / n,
            "top1": float(self.top1[sl].sum()) / n,
            f"recall@{k}": float(self.inter_k[sl].sum()) / (n * k),
        }
        for m in self.ms:
            inter, size = float(self.inter[m][sl].sum()), float(self.size[m][sl].sum())
            prec, rec = (inter / size if size else 0.0), inter / (n * k)
            row[f"overprov_hit@{k}+{m}"] = float(self.hit[m][sl].sum()) / n
            row[f"precision@{k}+{m}"] = prec
            row[f"f1@{k}+{m}"] = 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)
        tp, fp, fn = (t[sl].reshape(-1, self.E).sum(0) for t in (self.tp, self.fp, self.fn))
        denom = 2 * tp + fp + fn
        f1_e = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
        row["macro_f1"] = float(f1_e[denom > 0].mean()) if bool((denom > 0).any()) else 0.0
        return row

    def result(self, layer_ids: tuple[int, ...] | None = None) -> dict[str, Any]:
        """``{"overall": {...}, "per_layer": [{"layer": id, ...}, ...], "top_k": k, "overprovision": [m...]}``."""
        ids = tuple(layer_ids) if layer_ids is not None else tuple(range(self.L))
        per_layer = [{"layer": int(ids[i]), **self._row(i)} for i in range(self.L)]
        return {
            "overall": self._row(slice(None)),
            "per_layer": per_layer,
            "top_k": self.k,
            "num_experts": self.E,
            "overprovision": list(self.ms),
        }


def compute_metrics(
    scores: torch.Tensor,
    true: torch.Tensor,
    num_experts: int,
    top_k: int,
    overprovision: tuple[int, ...] = (2, 4),
) -> dict[str, Any]:
    """One-shot metrics. scores: (L, N, E) or (N, E); true: (L, N, k) or (N, k)."""
    if scores.dim() == 2:
        scores, true = scores[None], true[None]
    acc = MetricAccumulator(scores.shape[0], num_experts, top_k, overprovision)
    for i in range(scores.shape[0]):
        acc.update(i, scores[i], true[i])
    return acc.result()


def format_table(result: dict[str, Any], title: str = "", per_layer: bool = True) -> str:
    """A fixed-width text table (percentages) of a ``MetricAccumulator.result()``."""
    overall = result["overall"]
    cols = [c for c in overall if c != "tokens"]
    head = f"{'layer':>7} {'tokens':>8} " + " ".join(f"{c:>17}" for c in cols)
    lines = [title] if title else []
    lines.append(head)

    def fmt(name: str, row: dict[str, float]) -> str:
        return f"{name:>7} {row.get('tokens', 0):>8} " + " ".join(
            f"{100 * row[c]:>16.2f}%" if c in row else f"{'-':>17}" for c in cols
        )

    if per_layer:
        for row in result["per_layer"]:
            lines.append(fmt(str(row["layer"]), row))
    lines.append(fmt("all", overall))
    return "\n".join(lines)
