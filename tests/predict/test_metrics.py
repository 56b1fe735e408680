"""Metrics against hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from moert.predict.metrics import MetricAccumulator, compute_metrics, format_table, ranked


def _scores(rows: list[list[int]], E: int) -> torch.Tensor:
    """Scores whose ranking is exactly the given order (first = highest); unlisted experts get 0."""
    out = torch.zeros(len(rows), E)
    for i, order in enumerate(rows):
        for r, e in enumerate(order):
            out[i, e] = 100.0 - r
    return out


def test_hand_computed_k2_e6():
    # token 0: pred order 0,1,2,3 ; true {0,1} -> exact, top1, hit@+1, hit@+2
    # token 1: pred order 2,0,1,4 ; true {0,1} -> not exact (top-2 = {2,0}), top1 miss, hit@+1 yes ({2,0,1})
    # token 2: pred order 5,4,3,2 ; true {0,1} -> nothing, top-4 = {5,4,3,2} no hit
    # token 3: pred order 3,5,0,1 ; true {5,3} -> exact (set equality ignores order), top1 yes
    E, k = 6, 2
    scores = _scores([[0, 1, 2, 3], [2, 0, 1, 4], [5, 4, 3, 2], [3, 5, 0, 1]], E)
    true = torch.tensor([[0, 1], [1, 0], [0, 1], [5, 3]])
    r = compute_metrics(scores, true, E, k, overprovision=(1, 2))["overall"]
    assert r["tokens"] == 4
    assert r["exact"] == pytest.approx(2 / 4)
    assert r["top1"] == pytest.approx(2 / 4)
    # |top-2 ∩ true|: 2, 1, 0, 2 -> 5 / 8
    assert r["recall@2"] == pytest.approx(5 / 8)
    # top-3: {0,1,2} 2 ; {2,0,1} 2 ; {5,4,3} 0 ; {3,5,0} 2 -> hit 3/4, inter 6
    assert r["overprov_hit@2+1"] == pytest.approx(3 / 4)
    assert r["precision@2+1"] == pytest.approx(6 / 12)
    rec = 6 / 8
    assert r["f1@2+1"] == pytest.approx(2 * 0.5 * rec / (0.5 + rec))
    # top-4: token 2 {5,4,3,2} still 0 -> hit 3/4, inter 6 of 16 predicted
    assert r["overprov_hit@2+2"] == pytest.approx(3 / 4)
    assert r["precision@2+2"] == pytest.approx(6 / 16)
    # macro F1 over experts of the top-2 sets: pred sets {0,1},{2,0},{5,4},{3,5}; true {0,1},{0,1},{0,1},{5,3}
    # e0: tp 2 (t0,t1) fp 0 fn 1 (t2) -> 4/5 ; e1: tp1 fn2 -> 2/4 ; e2: fp1 -> 0 ; e3: tp1 -> 1
    # e4: fp1 -> 0 ; e5: tp1 (t3) fp1 (t2) -> 2/3
    expected = (4 / 5 + 2 / 4 + 0 + 1 + 0 + 2 / 3) / 6
    assert r["macro_f1"] == pytest.approx(expected)


def test_per_layer_and_overall_pooling():
    E, k = 4, 1
    acc = MetricAccumulator(2, E, k, overprovision=(1,))
    acc.update(0, _scores([[0, 1], [1, 0]], E), torch.tensor([[0], [0]]))  # 1 of 2 exact
    acc.update(1, _scores([[2, 3]], E), torch.tensor([[2]]))  # 1 of 1 exact
    res = acc.result(layer_ids=(7, 9))
    assert [row["layer"] for row in res["per_layer"]] == [7, 9]
    assert res["per_layer"][0]["exact"] == pytest.approx(0.5)
    assert res["per_layer"][1]["exact"] == pytest.approx(1.0)
    assert res["overall"]["exact"] == pytest.approx(2 / 3)  # pooled over samples, not averaged over layers
    assert res["overall"]["overprov_hit@1+1"] == pytest.approx(1.0)
    assert "exact" in format_table(res)


def test_ties_go_to_lower_expert_id():
    assert ranked(torch.zeros(1, 5), 3).tolist() == [[0, 1, 2]]
    assert ranked(torch.tensor([[0.0, 1.0, 1.0, 0.0]]), 2).tolist() == [[1, 2]]


def test_bad_inputs_raise():
    acc = MetricAccumulator(1, 4, 2, overprovision=(2,))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(0, torch.tensor([[float("nan"), 0, 0, 0]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"\(N, E=4\)"):
        acc.update(0, torch.zeros(1, 5), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="overprovision"):
        MetricAccumulator(1, 4, 2, overprovision=(3,))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ids_count_exactly_like_the_scores_they_rank(seed):
    g = torch.Generator().manual_seed(seed)
    E, k, ms, N = 11, 3, (1, 4), 17
    scores = torch.randn(2, N, E, generator=g)
    true = torch.rand(2, N, E, generator=g).argsort(-1)[..., :k]
    by_scores = MetricAccumulator(2, E, k, ms)
    by_ids = MetricAccumulator(2, E, k, ms)
    for i in range(2):
        by_scores.update(i, scores[i], true[i])
        by_ids.update_ids(i, ranked(scores[i], k + max(ms)), true[i])
    assert by_ids.result() == by_scores.result()


def test_recorded_ids_with_fewer_or_more_than_k():
    # row 0: [0] (fewer than k) ; row 1: [2, 1, 0, 5] (more) ; row 2: [] (nothing predicted)
    E, k = 6, 2
    pred = torch.tensor([[0, -1, -1, -1], [2, 1, 0, 5], [-1, -1, -1, -1]])
    true = torch.tensor([[0, 1], [1, 0], [3, 4]])
    acc = MetricAccumulator(1, E, k, overprovision=(1,))
    acc.update_ids(0, pred, true)
    r = acc.result()["overall"]
    assert r["exact"] == 0 and r["top1"] == pytest.approx(1 / 3)
    assert r["recall@2"] == pytest.approx(2 / 6)  # missing ids are never filled with guesses
    assert r["overprov_hit@2+1"] == pytest.approx(1 / 3)  # row 1: {2, 1, 0} covers {0, 1}
    assert r["precision@2+1"] == pytest.approx(3 / 4)  # 1 of 1 and 2 of 3 predicted ids; row 2 predicts none
    prec, rec = 3 / 4, 3 / 6
    assert r["f1@2+1"] == pytest.approx(2 * prec * rec / (prec + rec))
    # top-2 sets {0}, {2, 1}, {} vs {0, 1}, {0, 1}, {3, 4}: e0 2/3, e1 2/3, e2 0, e3 0, e4 0 (e5 absent)
    assert r["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 5)


def test_bad_ids_raise():
    acc = MetricAccumulator(1, 4, 2, overprovision=())
    with pytest.raises(ValueError, match=r"in \[0, E=4\) or -1"):
        acc.update_ids(0, torch.tensor([[0, 4]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"in \[0, E=4\) or -1"):
        acc.update_ids(0, torch.tensor([[0, -2]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="integers"):
        acc.update_ids(0, torch.tensor([[0.0, 1.0]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"\(N, p\)"):
        acc.update_ids(0, torch.tensor([0, 1]), torch.tensor([[0, 1]]))
