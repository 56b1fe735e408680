"""Predictor files: round trips, header checks, corrupt files, NaN."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from predict_synth import make_trace

from moert.predict.base import PredictorMeta, check_compatible
from moert.predict.baselines import FrequencyPredictor, PrevTokenPredictor
from moert.predict.evaluate import evaluate
from moert.predict.io import HEADER_KEY, load_predictor, read_predictor_file, save_predictor
from moert.predict.moe_beyond import MoEBeyondConfig, train_moe_beyond
from moert.predict.preattn import train_preattn
from moert.predict.train import TrainConfig
from moert.predict.xlayer import train_xlayer

QUICK = TrainConfig(epochs=1, batch_size=64, progress=False, threads=1)
TINY_MB = MoEBeyondConfig(d_model=16, d_token=16, d_layer=4, num_layers=1, num_heads=2, ff=32, max_len=16)


def _train(kind: str, meta, seqs):
    if kind == "preattn-linear2":
        return train_preattn(meta, seqs[:8], seqs[8:10], dim=16, lookahead=1, cfg=QUICK)[0]
    if kind == "preattn-mlp_bn":
        return train_preattn(meta, seqs[:8], seqs[8:10], arch="mlp_bn", loss="rank", dim=16, cfg=QUICK)[0]
    if kind == "xlayer":
        return train_xlayer(meta, seqs[:8], seqs[8:10], dim=16, cfg=QUICK)[0]
    if kind == "moe-beyond":
        cfg = dataclasses.replace(QUICK, batch_size=8)
        return train_moe_beyond(meta, seqs[:8], seqs[8:10], net_cfg=TINY_MB, cfg=cfg)[0]
    if kind == "frequency":
        return FrequencyPredictor.fit(meta, seqs[:10])
    return PrevTokenPredictor.for_trace(meta)


@pytest.mark.parametrize(
    "kind", ["preattn-linear2", "preattn-mlp_bn", "xlayer", "moe-beyond", "frequency", "prev-token"]
)
def test_train_save_load_eval_round_trip_is_identical(tmp_path, kind):
    meta, seqs = make_trace(num_seqs=12, seq_len=20, strings=kind == "moe-beyond")
    pred = _train(kind, meta, seqs)
    before = evaluate(pred, seqs[10:])
    path = save_predictor(tmp_path / "p.safetensors", pred.meta, *pred.state())
    loaded = load_predictor(path)
    assert loaded.meta == pred.meta
    after = evaluate(loaded, seqs[10:])
    assert after == before
    for s in seqs[10:]:
        assert torch.equal(loaded.predict_all(s), pred.predict_all(s))


def test_header_mismatch_names_every_field(tmp_path):
    meta, seqs = make_trace(num_seqs=4, seq_len=6)
    pred = FrequencyPredictor.fit(meta, seqs)
    other = dataclasses.replace(meta, model_type="qwen3_moe", num_experts=32, top_k=4, layers=(0, 1, 2, 3))
    with pytest.raises(ValueError) as exc:
        pred.check_trace(other, where="p.safetensors")
    msg = str(exc.value)
    for part in (
        "model_type 'synthetic' vs 'qwen3_moe'",
        "num_experts (E) 16 vs 32",
        "top_k (k) 2 vs 4",
        "layers",
    ):
        assert part in msg, msg
    pmeta = PredictorMeta("preattn", "synthetic", meta.layers, 16, 2, hidden_size=32)
    with pytest.raises(ValueError, match=r"hidden_size \(H\) 32 vs 64"):
        check_compatible(pmeta, dataclasses.replace(meta, hidden_size=64))
    check_compatible(pmeta, meta)


def test_corrupt_and_foreign_files_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_predictor_file(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match="corrupt"):
        read_predictor_file(junk)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a moert predictor"):
        read_predictor_file(tmp_path / "foreign.safetensors")
    bad = {"format": "moert-predictor", "version": 99, "meta": {}}
    save_file(
        {"x": torch.zeros(2)}, str(tmp_path / "v99.safetensors"), metadata={HEADER_KEY: json.dumps(bad)}
    )
    with pytest.raises(ValueError, match="version 99"):
        read_predictor_file(tmp_path / "v99.safetensors")


def test_nan_tensors_are_refused(tmp_path):
    meta, seqs = make_trace(num_seqs=4, seq_len=6)
    pred = FrequencyPredictor.fit(meta, seqs)
    counts = pred.counts.clone()
    counts[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        save_predictor(tmp_path / "nan.safetensors", pred.meta, {"counts": counts})
    # a file written by someone else with NaN inside
    from safetensors.torch import save_file

    header = {"format": "moert-predictor", "version": 1, "meta": pred.meta.to_json(), "extra": {}}
    save_file(
        {"counts": counts}, str(tmp_path / "nan2.safetensors"), metadata={HEADER_KEY: json.dumps(header)}
    )
    with pytest.raises(ValueError, match="NaN or inf"):
        load_predictor(tmp_path / "nan2.safetensors")


def test_tensor_shape_mismatch_is_reported(tmp_path):
    meta, seqs = make_trace(num_seqs=4, seq_len=6)
    pred = FrequencyPredictor.fit(meta, seqs)
    save_predictor(tmp_path / "f.safetensors", pred.meta, {"counts": torch.zeros(3, 16)})
    with pytest.raises(ValueError, match=r"counts must be \(L, E\)") as info:
        load_predictor(tmp_path / "f.safetensors")
    assert str(tmp_path / "f.safetensors") in str(info.value)  # found by fuzz/fuzz_predictor_io.py
