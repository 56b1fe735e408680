"""Evaluate any predictor on trace sequences: per-layer and overall metrics, accuracy by lookahead distance."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from moert.predict.base import Predictor
from moert.predict.metrics import MetricAccumulator

__all__ = [
    "evaluate",
    "evaluate_recorded",
    "plot_per_layer",
    "select_sequences",
    "default_overprovision",
    "recorded_overprovision",
]


def evaluate(
    predictor: Predictor,
    sequences: Iterable[Any],
    *,
    overprovision: tuple[int, ...] = (2, 4),
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics of ``predictor`` on ``sequences`` (each a SequenceTrace of the predictor's model).

    Returns:
        ``MetricAccumulator.result()`` plus ``"sequences"``; with lookahead ``d > 0`` also
        ``"by_distance"``: ``{j: overall metrics of layer l predicting layer l+j}`` for j = 0..d.
    """
    meta = predictor.meta
    L, E, k, d = meta.num_layers, meta.num_experts, meta.top_k, meta.lookahead
    acc = MetricAccumulator(L, E, k, overprovision)
    ahead = [MetricAccumulator(L, E, k, overprovision) for _ in range(d)]
    n_seq = 0
    it = sequences
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(sequences, desc="eval", leave=False)
    for s in it:
        if tuple(s.experts.shape[:1]) != (L,):
            raise ValueError(f"sequence {s.seq_id} has {s.experts.shape[0]} layers, the predictor {L}")
        out = predictor.predict_all(s)  # [L, T, E]
        for i in range(L):
            acc.update(i, out[i], s.experts[i])
        if d:
            for i in range(L):
                pa = predictor.predict_ahead(i, s)  # [T, 1+d, E]
                for j in range(1, min(d, L - 1 - i) + 1):
                    ahead[j - 1].update(i + j, pa[:, j], s.experts[i + j])
        n_seq += 1
    result = acc.result(meta.layers)
    result["sequences"] = n_seq
    if d:
        result["by_distance"] = {"0": result["overall"]}
        for j in range(1, d + 1):
            result["by_distance"][str(j)] = ahead[j - 1].result(meta.layers)["overall"]
    return result


def evaluate_recorded(
    predictions: dict[int, Any],
    sequences: Iterable[Any],
    meta: Any,
    *,
    overprovision: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Metrics of predictions recorded elsewhere (e.g. MoE-Beyond's ``Predicted Expert IDs``).

    Args:
        predictions: ``{seq_id: (L, T, m) int}`` expert ids per (layer, token), taken in order as the
            ranking, -1 pads (:func:`moert.trace.importers.recorded_predictions`).
        sequences: the SequenceTraces they predict (each seq_id must be in ``predictions``).
        meta: the trace's TraceMeta (layers, E, k).
        overprovision: m values for top-(k+m); each needs k+m <= the recorded width m
            (:func:`recorded_overprovision`).

    Returns:
        ``MetricAccumulator.result()`` plus ``"sequences"``, ``"width"`` (ids per row recorded) and
        ``"sorted_ids"``: True when every recorded row lists its ids in ascending order (a set, not a
        ranking: top-1 then measures the smallest predicted id).
    """
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    width = max((int(p.shape[-1]) for p in predictions.values()), default=0)
    too_wide = [m for m in overprovision if k + m > width]
    if too_wide:
        raise ValueError(
            f"the recorded predictions list at most {width} ids per row, so over-provision m={too_wide} "
            f"(top-(k+m) with k={k}) is not recorded; use m <= {max(width - k, 0)}"
        )
    acc = MetricAccumulator(L, E, k, overprovision)
    n_seq, ascending = 0, True
    for s in sequences:
        pred = predictions.get(int(s.seq_id))
        if pred is None:
            raise ValueError(f"no recorded predictions for sequence {s.seq_id}")
        if tuple(pred.shape[:2]) != tuple(s.experts.shape[:2]):
            raise ValueError(
                f"sequence {s.seq_id}: predictions {tuple(pred.shape)} do not cover experts {tuple(s.experts.shape)}"
            )
        for i in range(L):
            acc.update_ids(i, pred[i], s.experts[i])
        valid = pred[..., 1:] >= 0
        ascending = ascending and bool(((pred[..., 1:] > pred[..., :-1]) | ~valid).all())
        n_seq += 1
    result = acc.result(meta.layers)
    result["sequences"] = n_seq
    result["width"] = width
    result["sorted_ids"] = ascending
    return result


def recorded_overprovision(width: int, top_k: int) -> tuple[int, ...]:
    """The over-provision m values reported by default for recorded predictions ``width`` ids wide:
    2 and 4 where the recording holds top-(k+m)."""
    return tuple(m for m in (2, 4) if top_k + m <= width)


def default_overprovision(num_experts: int, top_k: int) -> tuple[int, ...]:
    """The over-provision m values reported by default: 2 and 4 where E - k allows."""
    return tuple(m for m in (2, 4) if m <= num_experts - top_k)


def select_sequences(sequences: Sequence[Any], ids: Iterable[int]) -> list[Any]:
    """The sequences whose ``seq_id`` is in ``ids``, in trace order."""
    wanted = set(int(i) for i in ids)
    return [s for s in sequences if int(s.seq_id) in wanted]


def plot_per_layer(result: dict[str, Any], path: str, title: str = "") -> None:
    """Per-layer exact match, top-1, recall@k and over-provision hit as a PNG (matplotlib, imported here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["per_layer"]
    layers = [r["layer"] for r in rows]
    k = result["top_k"]
    keys = ["exact", "top1", f"recall@{k}"] + [f"overprov_hit@{k}+{m}" for m in result["overprovision"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in keys:
        ax.plot(layers, [100 * r.get(key, float("nan")) for r in rows], marker="o", ms=3, label=key)
    ax.set_xlabel("MoE layer id")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
