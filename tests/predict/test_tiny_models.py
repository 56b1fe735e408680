"""On a trace captured from a tiny random DeepSeek-V2 model with hidden rows, preattn beats the baselines."""

from __future__ import annotations

import pytest

from moert.predict.baselines import FrequencyPredictor, NextGatePredictor, PrevTokenPredictor
from moert.predict.data import open_sequences, split_sequences
from moert.predict.evaluate import evaluate, select_sequences
from moert.predict.preattn import train_preattn
from moert.predict.train import TrainConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from moert.testing import prompt_ids, tiny_model
    from moert.trace_capture import capture

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
