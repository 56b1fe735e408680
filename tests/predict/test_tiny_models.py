"""On a trace captured from a tiny random DeepSeek-V2 model with hidden rows, preattn beats the baselines."""

from __future__ import annotations

import pytest
import torch

from moert.predict.baselines import FrequencyPredictor, NextGatePredictor, PrevTokenPredictor
from moert.predict.data import open_sequences, split_sequences
from moert.predict.evaluate import evaluate, select_sequences
from moert.predict.preattn import train_preattn
from moert.predict.train import TrainConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from moert.models.tiny import prompt_ids, tiny_model
    from moert.trace.record import capture

    model = tiny_model("deepseek_v2")
    prompts = [prompt_ids(1, 64, seed=i)[0] for i in range(40)]  # 2,560 prefill tokens
    out = tmp_path_factory.mktemp("tiny") / "ds"
    capture(model, prompts, out, max_new_tokens=0, with_scores=True, with_hidden=True)
    meta, seqs = open_sequences(str(out))
    split = split_sequences([s.seq_id for s in seqs], 0.15, 0.15, seed=0)
    return model, meta, *(select_sequences(seqs, ids) for ids in (split.train, split.val, split.test))


def test_preattn_beats_frequency_and_prev_token_on_a_captured_trace(tiny):
    _, meta, train, val, test = tiny
    cfg = TrainConfig(epochs=10, batch_size=128, progress=False, threads=1)
    pred, _ = train_preattn(meta, train, val, arch="linear2", loss="rank", dim=64, cfg=cfg)
    learned = evaluate(pred, test)["overall"]
    freq = evaluate(FrequencyPredictor.fit(meta, train + val), test)["overall"]
    prev = evaluate(PrevTokenPredictor.for_trace(meta), test)["overall"]
    msg = f"preattn {learned['exact']:.3f}, frequency {freq['exact']:.3f}, prev-token {prev['exact']:.3f}"
    assert learned["exact"] > max(freq["exact"], prev["exact"]) + 0.1, msg
    assert learned["top1"] > max(freq["top1"], prev["top1"]) + 0.2, msg


def test_next_gate_uses_the_models_routers(tiny):
    model, meta, _, _, test = tiny
    pred = NextGatePredictor.from_model(model, meta)
    assert pred.meta.hidden_size == meta.hidden_size
    res = evaluate(pred, test)["overall"]
    # layer index 0 applies its own router to its own pre-attention row: top-1 is then nearly always right
    first = evaluate(pred, test)["per_layer"][0]
    assert first["top1"] > 0.8 and 0 < res["exact"] <= 1, res


def test_moe_beyond_with_the_models_token_embeddings(tiny, tmp_path):
    from moert.models.tiny import save_tiny
    from moert.predict.moe_beyond import MoEBeyondConfig, load_embedding_matrix, train_moe_beyond

    model, meta, train, val, _ = tiny
    emb = load_embedding_matrix(save_tiny(model, tmp_path / "model"))
    assert torch.equal(emb, model.get_input_embeddings().weight.detach().float())
    net_cfg = MoEBeyondConfig(d_model=16, d_token=16, d_layer=4, num_layers=1, num_heads=2, ff=32, max_len=64)
    cfg = TrainConfig(epochs=1, batch_size=16, progress=False, threads=1)
    pred, _ = train_moe_beyond(meta, train[:6], val[:2], net_cfg=net_cfg, token_embeddings=emb, cfg=cfg)
    assert pred.meta.dims["token_embedding"] == "model" and pred.meta.dims["d_token"] == emb.shape[1]
    ids = torch.tensor([int(key) for key in pred.vocab.keys])
    assert torch.equal(pred.net.tok.weight[1:], emb[ids]), "model embeddings changed during training"
    with pytest.raises(ValueError, match="outside the model's embedding matrix"):
        train_moe_beyond(meta, train[:2], val[:1], net_cfg=net_cfg, token_embeddings=emb[:10], cfg=cfg)
