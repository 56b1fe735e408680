"""Pre-attention predictor: BatchNorm folding, learning planted structure, lookahead."""

from __future__ import annotations

import pytest
import torch
from predict_synth import make_trace
from torch import nn

from moert.predict.baselines import FrequencyPredictor, PrevTokenPredictor
from moert.predict.data import split_sequences
from moert.predict.evaluate import evaluate, select_sequences
from moert.predict.preattn import PreattnNet, PreattnPredictor, fold_batchnorm, train_preattn
from moert.predict.train import TrainConfig

FAST = TrainConfig(epochs=8, batch_size=128, patience=8, progress=False, threads=1)


@pytest.mark.parametrize("H,D", [(8, 16), (33, 7), (64, 130)])
def test_batchnorm_folding_is_exact_to_fp32_rounding(H, D):
    torch.manual_seed(H * D)
    lin, bn = nn.Linear(H, D), nn.BatchNorm1d(D)
    with torch.no_grad():  # non-trivial BN state
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3.0)
    bn.eval()
    x = torch.randn(257, H)
    ref = bn(lin(x)).double()
    w, b = fold_batchnorm(lin, bn)
    got = (x @ w.T + b).double()
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    # two fp32 roundings of O(H) sums: a few ulps of the largest value
    assert err <= 8 * torch.finfo(torch.float32).eps * scale * max(1.0, H**0.5), f"worst mismatch {err:.3e}"


def test_exported_mlp_bn_matches_training_net_in_eval_mode():
    torch.manual_seed(0)
    net = PreattnNet(num_layers=2, hidden_size=24, dim=40, num_experts=12, arch="mlp_bn", lookahead=1)
    net.train()
    for _ in range(5):  # populate BN running stats
        net(0, torch.randn(64, 24) * 3 + 1)
        net(1, torch.randn(64, 24))
    net.eval()
    tensors, act = net.export()
    from moert.predict.base import PredictorMeta

    meta = PredictorMeta("preattn", "x", (0, 1), 12, 2, hidden_size=24, arch="mlp_bn", lookahead=1)
    pred = PreattnPredictor(meta, tensors, act)
    x = torch.randn(50, 24)
    for i in range(2):
        ref = net(i, x)
        got = pred.forward_rows(i, x)
        err = (got - ref).abs().max().item()
        assert err < 1e-5 * max(1.0, ref.abs().max().item()), f"layer {i}: worst mismatch {err:.3e}"


@pytest.fixture(scope="module")
def parts(synth):
    meta, seqs = synth
    split = split_sequences([s.seq_id for s in seqs], 0.15, 0.15, seed=0)
    return meta, *(select_sequences(seqs, ids) for ids in (split.train, split.val, split.test))


@pytest.mark.parametrize("arch,loss", [("linear2", "wbce"), ("mlp_bn", "rank")])
def test_preattn_beats_frequency_and_prev_token(parts, arch, loss):
    meta, train, val, test = parts
    pred, history = train_preattn(meta, train, val, arch=arch, loss=loss, dim=64, cfg=FAST)
    learned = evaluate(pred, test)["overall"]
    freq = evaluate(FrequencyPredictor.fit(meta, train + val), test)["overall"]
    prev = evaluate(PrevTokenPredictor.for_trace(meta), test)["overall"]
    msg = f"preattn {learned['exact']:.3f}, frequency {freq['exact']:.3f}, prev-token {prev['exact']:.3f}"
    assert learned["exact"] > max(freq["exact"], prev["exact"]) + 0.3, msg
    assert history["best_epoch"] >= 1 and len(history["val_score"]) == history["epochs_run"]


def test_lookahead_reports_accuracy_by_distance(parts):
    meta, train, val, test = parts
    pred, _ = train_preattn(meta, train, val, arch="linear2", loss="wbce", dim=32, lookahead=2, cfg=FAST)
    res = evaluate(pred, test)
    assert set(res["by_distance"]) == {"0", "1", "2"}
    assert res["by_distance"]["0"] == res["overall"]
    L = meta.num_layers
    assert res["by_distance"]["2"]["tokens"] == (L - 2) * res["overall"]["tokens"] // L
    assert pred.predict_ahead(0, test[0]).shape == (test[0].num_tokens, 3, meta.num_experts)


def test_training_is_reproducible(parts):
    meta, train, val, _ = parts
    cfg = TrainConfig(epochs=2, batch_size=128, progress=False, seed=3, threads=1)
    a, _ = train_preattn(meta, train, val, dim=16, cfg=cfg)
    b, _ = train_preattn(meta, train, val, dim=16, cfg=cfg)
    for name in ("w1", "b1", "w2", "b2"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_preattn_errors_are_clear():
    meta, seqs = make_trace(num_seqs=6, seq_len=8, hidden=False, scores=False)
    with pytest.raises(ValueError, match="--with-hidden"):
        train_preattn(meta, seqs[:4], seqs[4:], dim=8, cfg=FAST)
    meta, seqs = make_trace(num_seqs=6, seq_len=8, scores=False)
    with pytest.raises(ValueError, match="'rank' needs router scores"):
        train_preattn(meta, seqs[:4], seqs[4:], loss="rank", dim=8, cfg=FAST)
    with pytest.raises(ValueError, match="--lookahead"):
        train_preattn(meta, seqs[:4], seqs[4:], lookahead=4, dim=8, cfg=FAST)
    with pytest.raises(ValueError, match="--arch"):
        train_preattn(meta, seqs[:4], seqs[4:], arch="mlp3", dim=8, cfg=FAST)
    pred, _ = train_preattn(meta, seqs[:4], seqs[4:], dim=8, cfg=TrainConfig(epochs=1, progress=False))
    seqs[5].hidden = None
    with pytest.raises(ValueError, match="needs hidden rows"):
        pred.predict(0, seqs[5])


@pytest.mark.parametrize("lookahead", [0, 2])
def test_kernel_weights_follow_the_fused_kernels_convention(lookahead):
    from moert.kernels.predictive_norm_reference import predictor_reference

    from moert.predict.base import PredictorMeta

    torch.manual_seed(lookahead)
    L, H, D, E = 3, 16, 24, 8
    net = PreattnNet(L, H, D, E, "linear2", lookahead)
    tensors, act = net.export()
    meta = PredictorMeta("preattn", "x", (0, 1, 2), E, 2, hidden_size=H, arch="linear2", lookahead=lookahead)
    pred = PreattnPredictor(meta, tensors, act)
    x = torch.randn(5, H)
    for i in range(L):
        ref = predictor_reference(x, **pred.kernel_weights(i))
        ours = pred.forward_rows(i, x)
        assert torch.allclose(ref.reshape(ours.shape), ours, atol=1e-6)
        assert ref.dim() == (2 if lookahead == 0 else 3)
