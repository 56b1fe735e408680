"""Each loss against a direct, loop-based formula (pre-attention paper eqs. 5-11)."""

from __future__ import annotations

import math

import pytest
import torch

from moert.predict.losses import check_loss, focal_loss, mse_loss, multi_hot, rank_loss, wbce_loss


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _case(N=5, E=40, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, E, generator=g, dtype=torch.float64)
    scores = torch.rand(N, E, generator=g, dtype=torch.float64).softmax(-1)
    experts = scores.topk(k, dim=1).indices
    return logits, scores, experts, multi_hot(experts, E).double()


def _rank_of(scores_row: list[float], j: int) -> int:
    """1-based rank of expert j by descending score (ties: lower index first)."""
    return 1 + sum(1 for i, s in enumerate(scores_row) if s > scores_row[j] or (s == scores_row[j] and i < j))


def _wbce_ref(logits, experts, scores, tiers):
    N, E = logits.shape
    total = 0.0
    for i in range(N):
        sel = set(experts[i].tolist())
        row = scores[i].tolist() if scores is not None else None
        for j in range(E):
            z = float(logits[i, j])
            ll = math.log(_sig(z)) if j in sel else math.log(1 - _sig(z))
            if row is None:
                w = tiers[0][1] if j in sel else 0.5
            else:
                r, w, lo = _rank_of(row, j), 0.5, 0
                for upto, weight in tiers:
                    if lo < r <= upto:
                        w = weight
                    lo = upto
            total += w * ll
    return -total / (N * E)


def test_mse_matches_eq5():
    logits, scores, experts, labels = _case()
    ref = (
        sum(
            (float(scores[i, j]) - float(logits[i, j])) ** 2
            for i in range(logits.shape[0])
            for j in range(logits.shape[1])
        )
        / logits.shape[0]
    )
    assert float(mse_loss(logits, labels, scores)) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("with_scores", [True, False])
def test_wbce_matches_eqs6_8(with_scores):
    logits, scores, experts, labels = _case()
    sc = scores if with_scores else None
    ref = _wbce_ref(logits, experts, sc, ((10, 3.0),))
    got = float(wbce_loss(logits, labels, sc))
    assert got == pytest.approx(ref, rel=1e-12), f"got {got}, reference {ref}"


def test_focal_matches_definition():
    logits, scores, experts, labels = _case(E=12)
    alpha, gamma = 0.25, 2.0
    N, E = logits.shape
    total = 0.0
    for i in range(N):
        for j in range(E):
            p = _sig(float(logits[i, j]))
            y = float(labels[i, j])
            p_t = p if y else 1 - p
            a_t = alpha if y else 1 - alpha
            total += -a_t * (1 - p_t) ** gamma * math.log(p_t)
    assert float(focal_loss(logits, labels)) == pytest.approx(total / (N * E), rel=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rank_matches_eqs9_11(reduction):
    logits, scores, experts, labels = _case(N=4, E=40, k=6)
    lam, margin = 0.3, 0.1
    base = _wbce_ref(logits, experts, scores, ((10, 3.0), (30, 1.5)))
    pair_total = 0.0
    N, E = logits.shape
    for i in range(N):
        row = scores[i].tolist()
        top10 = [j for j in range(E) if _rank_of(row, j) <= 10]
        for j in top10:
            for kk in top10:
                if row[j] > row[kk]:
                    pair_total += max(0.0, margin - (float(logits[i, j]) - float(logits[i, kk])))
    pair = pair_total / N if reduction == "mean" else pair_total
    ref = base + lam * pair
    got = float(rank_loss(logits, labels, scores, reduction=reduction))
    assert got == pytest.approx(ref, rel=1e-12), f"got {got}, reference {ref}"


def test_rank_with_fewer_than_30_experts():
    logits, scores, experts, labels = _case(N=3, E=8, k=2)
    assert torch.isfinite(rank_loss(logits, labels, scores))


def test_losses_needing_scores_raise_clearly():
    logits, scores, experts, labels = _case()
    for fn, name in ((mse_loss, "mse"), (rank_loss, "rank")):
        with pytest.raises(ValueError, match=f"'{name}' needs router scores"):
            fn(logits, labels, None)
    with pytest.raises(ValueError, match="needs router scores"):
        check_loss("rank", has_scores=False)
    with pytest.raises(ValueError, match="not one of"):
        check_loss("hinge", has_scores=True)
    check_loss("wbce", has_scores=False)


def test_multi_hot_ignores_padding():
    out = multi_hot(torch.tensor([[0, 2], [1, -1]]), 3)
    assert out.tolist() == [[1, 0, 1], [0, 1, 0]]
