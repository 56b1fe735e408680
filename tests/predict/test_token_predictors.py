"""xlayer and MoE-Beyond: learn planted structure, stay causal; data splits and vocabularies."""

from __future__ import annotations

import math

import pytest
import torch
from predict_synth import make_trace

from moert.predict.baselines import FrequencyPredictor, PrevTokenPredictor
from moert.predict.data import TokenVocab, position_bucket, split_sequences
from moert.predict.evaluate import evaluate, select_sequences
from moert.predict.moe_beyond import MoEBeyondConfig, MoEBeyondNet, train_moe_beyond
from moert.predict.train import TrainConfig
from moert.predict.xlayer import expert_history, train_xlayer


def _parts(synth):
    meta, seqs = synth
    split = split_sequences([s.seq_id for s in seqs], 0.15, 0.15, seed=0)
    return meta, *(select_sequences(seqs, ids) for ids in (split.train, split.val, split.test))


def test_xlayer_beats_frequency_and_prev_token(synth):
    meta, train, val, test = _parts(synth)
    pred, _ = train_xlayer(
        meta, train, val, dim=32, cfg=TrainConfig(epochs=6, batch_size=256, progress=False, threads=1)
    )
    learned = evaluate(pred, test)["overall"]
    freq = evaluate(FrequencyPredictor.fit(meta, train + val), test)["overall"]
    prev = evaluate(PrevTokenPredictor.for_trace(meta), test)["overall"]
    msg = f"xlayer {learned['exact']:.3f}, frequency {freq['exact']:.3f}, prev-token {prev['exact']:.3f}"
    assert learned["exact"] > max(freq["exact"], prev["exact"]) + 0.3, msg
    # predict() and the batched predict_all() agree
    s = test[0]
    assert torch.allclose(pred.predict(2, s), pred.predict_all(s)[2], atol=1e-5)


def test_expert_history_matches_a_direct_recurrence():
    experts = torch.tensor([[[0, 1], [1, 2], [0, 3]]])  # (L=1, T=3, k=2)
    got = expert_history(experts, num_experts=4, decay=0.5)
    u1 = [0.5 * x for x in (1, 1, 0, 0)]  # after token 0
    u2 = [0.5 * a + 0.5 * b for a, b in zip(u1, (0, 1, 1, 0))]  # after token 1
    assert got[0].tolist() == [[0, 0, 0, 0], u1, u2]


def test_moe_beyond_beats_frequency(synth):
    meta, train, val, test = _parts(synth)
    net_cfg = MoEBeyondConfig(d_model=32, d_token=32, d_layer=8, num_layers=1, num_heads=2, ff=64, max_len=64)
    cfg = TrainConfig(epochs=8, batch_size=16, lr=3e-3, progress=False, threads=1)
    pred, _ = train_moe_beyond(meta, train, val, net_cfg=net_cfg, cfg=cfg)
    learned = evaluate(pred, test)["overall"]
    freq = evaluate(FrequencyPredictor.fit(meta, train + val), test)["overall"]
    assert learned["recall@2"] > freq["recall@2"] + 0.15, f"moe-beyond {learned}, frequency {freq}"


def test_moe_beyond_is_causal_and_windows_long_sequences():
    torch.manual_seed(0)
    cfg = MoEBeyondConfig(
        d_model=16, d_token=16, d_layer=4, num_layers=2, num_heads=2, ff=32, max_len=8, dropout=0.0
    )
    net = MoEBeyondNet(vocab_size=30, num_moe_layers=3, num_experts=6, cfg=cfg).eval()
    tok = torch.randint(1, 30, (1, 8))
    changed = tok.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 30
    with torch.no_grad():
        a, b = net(tok, torch.tensor([1])), net(changed, torch.tensor([1]))
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-6), (
        "outputs before t=5 changed when later tokens changed"
    )
    assert not torch.allclose(a[0, 5:], b[0, 5:])


def test_split_is_by_sequence_and_deterministic():
    ids = list(range(100, 150))
    a = split_sequences(ids, 0.1, 0.2, seed=1)
    b = split_sequences(reversed(ids), 0.1, 0.2, seed=1)
    assert a == b
    assert len(a.test) == 10 and len(a.val) == 5 and len(a.train) == 35
    assert not (set(a.train) & set(a.val) or set(a.train) & set(a.test) or set(a.val) & set(a.test))
    assert set(a.train) | set(a.val) | set(a.test) == set(ids)
    assert split_sequences(ids, 0.1, 0.2, seed=2) != a


def test_vocab_from_strings_and_ids():
    meta, seqs = make_trace(num_seqs=3, seq_len=5, strings=True)
    v = TokenVocab.build(seqs[:2])
    assert v.kind == "strings"
    enc = v.encode(seqs[0])
    assert enc.shape == (5,) and int(enc.min()) >= 1
    meta, seqs = make_trace(num_seqs=3, seq_len=5)
    v = TokenVocab.build(seqs, min_count=100)
    assert v.kind == "ids" and len(v) == 1 and int(v.encode(seqs[0]).max()) == 0  # all unknown


def test_position_buckets():
    p = torch.tensor([0, 1, 7, 8, 15, 16, 31, 32, 100000])
    assert position_bucket(p).tolist() == [0, 1, 7, 8, 8, 9, 9, 10, 15]


def test_moe_beyond_heads_layout_learns_saves_and_matches_per_layer_forward(synth, tmp_path):
    """layer_input='heads' (one pass, L x E logits) learns the planted structure, its per-layer
    forward is the slice of forward_all, and it round-trips through a predictor file."""
    from moert.predict.io import load_predictor, save_predictor

    meta, train, val, test = _parts(synth)
    net_cfg = MoEBeyondConfig(
        d_model=32, d_token=32, num_layers=1, num_heads=2, ff=64, max_len=64, layer_input="heads"
    )
    cfg = TrainConfig(epochs=8, batch_size=4, lr=3e-3, progress=False, threads=1)
    pred, _ = train_moe_beyond(meta, train, val, net_cfg=net_cfg, cfg=cfg)
    learned = evaluate(pred, test)["overall"]
    freq = evaluate(FrequencyPredictor.fit(meta, train + val), test)["overall"]
    assert learned["recall@2"] > freq["recall@2"] + 0.15, f"moe-beyond heads {learned}, frequency {freq}"
    tok = pred.vocab.encode(test[0])[None]
    with torch.no_grad():
        every = pred.net.forward_all(tok)  # [1, L, T, E]
        for layer in range(every.shape[1]):
            assert torch.allclose(pred.net(tok, torch.tensor([layer]))[0], every[0, layer], atol=1e-6)
    path = save_predictor(tmp_path / "mb.safetensors", pred.meta, *pred.state())
    again = load_predictor(path)
    assert torch.allclose(again.predict_all(test[0]), pred.predict_all(test[0]), atol=1e-6)
    assert torch.allclose(pred.predict(1, test[0]), pred.predict_all(test[0])[1], atol=1e-6)


def test_fit_stops_at_the_wall_clock_cap_and_reports_each_epoch(synth):
    meta, train, val, _ = _parts(synth)
    net_cfg = MoEBeyondConfig(d_model=16, d_token=16, d_layer=4, num_layers=1, num_heads=2, ff=32, max_len=64)
    seen = []
    cfg = TrainConfig(epochs=50, batch_size=4, patience=50, progress=False, threads=1, max_seconds=1e-9)
    _, hist = train_moe_beyond(
        meta, train, val, net_cfg=net_cfg, cfg=cfg, on_epoch=lambda e, h, p: seen.append((e, h["steps"]))
    )
    assert hist["stopped"] == "time" and hist["epochs_run"] == 1 and seen == [(1, 1)]
    assert len(hist["val_score"]) == len(hist["epoch_seconds"]) == len(hist["lr"]) == 1


def test_warmup_cosine_schedule():
    from moert.predict.train import _schedule

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    cfg = TrainConfig(epochs=2, lr=1.0, warmup_steps=2, schedule="cosine")
    sched = _schedule(opt, cfg, list(range(5)))  # 10 planned steps
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    # warm-up 0.5, 1.0; then 0.5 (1 + cos(pi * s / 8)) for s = 0..8
    want = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(9)]
    assert lrs == pytest.approx(want)
