"""``moert train`` / ``moert eval`` end to end on a synthetic moert trace, and the prefetch hook."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from predict_synth import make_trace, write_trace

from moert.cli import eval as eval_cli
from moert.cli import train as train_cli
from moert.policy.predictor import SequenceListTrace, parse_prefetch_spec, policy_from_spec
from moert.predict.io import load_predictor


def _args(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def _train(trace, out, *extra: str) -> int:
    argv = ["--trace", str(trace), "--out", str(out), "--epochs", "3", "--hidden", "32", "--no-progress"]
    return train_cli.run(_args(train_cli, argv + ["--threads", "1", *extra]))


def test_train_then_eval_reports_the_same_numbers(tmp_path, synth_dir, capsys):
    out = tmp_path / "pre.safetensors"
    assert (
        _train(
            synth_dir, out, "--predictor", "preattn", "--arch", "mlp_bn", "--loss", "rank", "--lookahead", "1"
        )
        == 0
    )
    pred = load_predictor(out)
    assert pred.meta.kind == "preattn" and pred.meta.lookahead == 1 and pred.meta.loss == "rank"
    split = pred.meta.train["split"]
    assert not set(split["test"]) & set(split["train"])
    js = tmp_path / "val.json"
    argv = [
        "--trace",
        str(synth_dir),
        "--predictor",
        str(out),
        "--split",
        "val",
        "--json",
        str(js),
        "--per-layer",
    ]
    assert eval_cli.run(_args(eval_cli, argv)) == 0
    res = json.loads(js.read_text())
    # what training stored for its validation split is what eval measures again from the file
    stored = {k: v for k, v in pred.meta.metrics.items() if k != "split"}
    assert stored == res["overall"]
    assert set(res["by_distance"]) == {"0", "1"}
    assert sorted(res["sequence_ids"]) == sorted(split["val"])
    text = capsys.readouterr().out
    assert "lookahead distance" in text and "recall@2" in text


def test_baselines_use_the_same_held_out_split(tmp_path, synth_dir):
    out = tmp_path / "x.safetensors"
    assert _train(synth_dir, out, "--predictor", "xlayer") == 0
    test_ids = load_predictor(out).meta.train["split"]["test"]
    for name in ("prev-token", "frequency", str(out)):
        js = tmp_path / "r.json"
        assert (
            eval_cli.run(_args(eval_cli, ["--trace", str(synth_dir), "--predictor", name, "--json", str(js)]))
            == 0
        )
        assert sorted(json.loads(js.read_text())["sequence_ids"]) == sorted(test_ids), name


def test_eval_refuses_a_predictor_for_another_model(tmp_path, synth_dir):
    out = tmp_path / "x.safetensors"
    assert _train(synth_dir, out, "--predictor", "xlayer", "--epochs", "1") == 0
    meta, seqs = make_trace(num_seqs=4, seq_len=6, E=8, k=2)
    other = write_trace(tmp_path / "other", meta, seqs)
    with pytest.raises(ValueError, match=r"num_experts \(E\) 16 vs 8"):
        eval_cli.run(_args(eval_cli, ["--trace", str(other), "--predictor", str(out), "--split", "all"]))


def test_cli_errors_are_clear(tmp_path, synth_dir):
    meta, seqs = make_trace(num_seqs=6, seq_len=6, hidden=False, scores=False)
    plain = write_trace(tmp_path / "plain", meta, seqs)
    with pytest.raises(ValueError, match="--with-hidden"):
        _train(plain, tmp_path / "p.safetensors", "--predictor", "preattn")
    with pytest.raises(ValueError, match="'mse' needs router scores"):
        _train(plain, tmp_path / "p.safetensors", "--predictor", "xlayer", "--loss", "mse")
    with pytest.raises(ValueError, match="--lookahead applies to preattn only"):
        _train(plain, tmp_path / "p.safetensors", "--predictor", "xlayer", "--lookahead", "2")
    with pytest.raises(ValueError, match="--overprovision"):
        eval_cli.run(
            _args(eval_cli, ["--trace", str(synth_dir), "--predictor", "prev-token", "--overprovision", "15"])
        )
    with pytest.raises(ValueError, match="not found"):
        eval_cli.run(
            _args(eval_cli, ["--trace", str(synth_dir), "--predictor", str(tmp_path / "nope.safetensors")])
        )


def test_prefetch_hook_matches_token_by_token_and_runs_in_the_simulator(tmp_path, synth):
    meta, seqs = synth
    assert parse_prefetch_spec("a/b.safetensors:3") == ("a/b.safetensors", 3)
    assert parse_prefetch_spec("prev-token") == ("prev-token", 0)
    with pytest.raises(ValueError, match="integer m"):
        parse_prefetch_spec("a/b.safetensors:x")
    hook = policy_from_spec("frequency:2", meta, seqs[:20])
    hook.bind(meta.num_layers, meta.num_experts, meta.top_k)
    s = seqs[30]
    whole = hook.sequence_plan(s).before.own_rows()  # the fast path: every step at once
    assert whole.shape == (meta.num_layers, s.num_tokens, meta.top_k + 2) and whole.dtype == np.int32
    logits = hook.sequence_logits(s)  # step by step, as the runtime asks
    one = np.array([[hook.on_prediction(li, logits[li, t]).ids[0].tolist() for t in range(s.num_tokens)]
                    for li in range(meta.num_layers)])  # fmt: skip
    assert (one == whole).all()

    from moert.sim import PolicySpec, SimConfig, simulate

    trace = SequenceListTrace(meta, seqs[30:])
    specs = (PolicySpec("lru"), PolicySpec("lru", "oracle"), PolicySpec("lru", "frequency:2"))
    report = simulate(trace, SimConfig(capacities=(0.25,), policies=specs), prefetchers={"frequency:2": hook})
    hit = {r["policy"]: r["hit_rate"] for r in report["results"]}
    assert hit["lru+oracle"] > 0.95 and 0 < hit["lru"] < 1 and 0 < hit["lru+frequency:2"] < 1


def test_simulate_prefetches_with_a_trained_predictor_on_its_held_out_sequences(tmp_path, synth_dir, capsys):
    from moert.cli import simulate as sim_cli

    out = tmp_path / "pre.safetensors"
    assert _train(synth_dir, out, "--predictor", "preattn", "--loss", "wbce", "--epochs", "20") == 0
    held_out = load_predictor(out).meta.train["split"]["test"]
    reports = {}
    for split in ("auto", "all"):
        js = tmp_path / f"sim_{split}.json"
        argv = [str(synth_dir), "--capacity", "0.25", "--policy", f"lru,lru+{out}:1", "--split", split]
        argv += ["--json", str(js), "--no-progress"]
        assert sim_cli.run(_args(sim_cli, argv)) == 0
        reports[split] = json.loads(js.read_text())
    capsys.readouterr()
    assert reports["auto"]["trace"]["num_sequences"] == len(held_out)
    assert reports["all"]["trace"]["num_sequences"] > len(held_out)
    by_policy = {r["policy"]: r for r in reports["auto"]["results"]}
    lru, pred = by_policy["lru"], by_policy[f"lru+{out}:1"]
    # the planted structure makes the learned predictor's prefetches useful on prompts it never saw
    assert pred["prefetch_hits"] > 0 and pred["hit_rate"] > lru["hit_rate"] + 0.2, (lru, pred)


def test_simulate_rejects_an_unknown_prefetcher(synth_dir):
    from moert.cli import simulate as sim_cli

    argv = [str(synth_dir), "--policy", "lru+nope", "--no-progress"]
    with pytest.raises(ValueError) as err:
        sim_cli._run(_args(sim_cli, argv))
    assert "nope" in str(err.value)
