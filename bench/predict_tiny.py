"""``bench_predict.py --stage tiny``: pre-attention predictors on tiny random models (the analogue of
the pre-attention paper's Tables 3-4; not real weights). Writes ``bench/results/predict_tiny.{json,md}``."""

from __future__ import annotations

import json
import sys
import time

from bench_predict import REPO, _env

from moert.predict.baselines import FrequencyPredictor, PrevTokenPredictor
from moert.predict.data import open_sequences, split_sequences
from moert.predict.evaluate import evaluate, select_sequences
from moert.predict.train import TrainConfig

TINY_OVERPROVISION = {"deepseek_v2": 4, "qwen3_moe": 4, "phimoe": 1}


def stage_tiny(args, work):
    """The analogue of the pre-attention paper's Tables 3-4 on tiny random models (not real weights)."""
    results = {}
    for model_type, m in TINY_OVERPROVISION.items():
        results[model_type] = tiny_row(args, work, model_type, m)
        print(f"[tiny] {model_type} done", file=sys.stderr, flush=True)
    env = _env(args)
    (REPO / "bench/results/predict_tiny.json").write_text(
        json.dumps({"env": env, "models": results}, indent=1)
    )
    md = tiny_markdown(args, env, results)
    (REPO / "bench/results/predict_tiny.md").write_text(md)
    print(md, end="")


def tiny_row(args, work, model_type: str, m: int) -> dict:
    """One tiny random model: capture, split, the baselines and the eight preattn predictors on its test prompts."""
    from moert.models.tiny import prompt_ids, tiny_model
    from moert.predict.baselines import NextGatePredictor
    from moert.predict.preattn import train_preattn
    from moert.trace.record import capture

    model = tiny_model(model_type, num_hidden_layers=6)
    prompts = [prompt_ids(1, 64, seed=1000 + i)[0] for i in range(args.tiny_prompts)]
    out = work / f"tiny-{model_type}"
    t0 = time.perf_counter()
    capture(model, prompts, out, max_new_tokens=0, with_scores=True, with_hidden=True, overwrite=True)
    meta, seqs = open_sequences(str(out))
    split = split_sequences([s.seq_id for s in seqs], 0.1, 0.2, seed=args.seed)
    train, val, test = (select_sequences(seqs, getattr(split, n)) for n in ("train", "val", "test"))
    row = {
        "meta": {"layers": list(meta.layers), "E": meta.num_experts, "k": meta.top_k, "H": meta.hidden_size,
                 "tokens": {"train": sum(s.num_tokens for s in train), "val": sum(s.num_tokens for s in val),
                            "test": sum(s.num_tokens for s in test)}},
        "capture_s": time.perf_counter() - t0, "m": m, "predictors": {},
    }  # fmt: skip
    base = {
        "prev-token": PrevTokenPredictor.for_trace(meta),
        "frequency": FrequencyPredictor.fit(meta, train + val),
        "next-gate": NextGatePredictor.from_model(model, meta),
    }
    for name, pred in base.items():
        row["predictors"][name] = evaluate(pred, test, overprovision=(m,))["overall"]
    cfg = TrainConfig(
        epochs=30, batch_size=128, patience=4, seed=args.seed, threads=args.threads, progress=False
    )
    for arch in ("linear2", "mlp_bn"):
        for loss in ("mse", "wbce", "focal", "rank"):
            t0 = time.perf_counter()
            pred, hist = train_preattn(meta, train, val, arch=arch, loss=loss, dim=256, lookahead=2, cfg=cfg)
            res = evaluate(pred, test, overprovision=(m,))
            row["predictors"][f"preattn/{arch}/{loss}"] = {
                **res["overall"], "by_distance": res["by_distance"], "train_s": time.perf_counter() - t0,
                "epochs": hist["epochs_run"],
            }  # fmt: skip
    return row


def tiny_markdown(args, env: dict, results: dict) -> str:
    """predict_tiny.md: one table per model type."""
    lines = [
        "# Pre-attention predictors on tiny random models (traces captured with hidden rows), CPU",
        "",
        f"{env['date_utc']}, commit {env['commit']}, torch {env['torch']}, {env['threads']} CPU thread(s). "
        "`python bench/bench_predict.py --stage tiny`. Tiny random models of the real classes "
        f"(`moert.models.tiny.tiny_model(..., num_hidden_layers=6)`), {args.tiny_prompts} random prompts x 64 "
        "tokens (prefill), split by prompt 70/10/20 (test); D=256, lookahead 2, up to 30 epochs with "
        "early stopping. Random weights, so these show the pipeline and relative ordering, not the "
        "paper's absolute numbers on trained models.",
        "",
    ]
    for model_type, row in results.items():
        mt, m, k = row["meta"], row["m"], row["meta"]["k"]
        lines += [
            f"## {model_type}: MoE layers {mt['layers']}, E={mt['E']}, k={k}, H={mt['H']}, "
            f"test tokens {mt['tokens']['test']}",
            "",
            f"| predictor | exact | over-provision hit k+{m} | top-1 | recall@{k} | lookahead 1 exact | lookahead 2 exact |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in row["predictors"].items():
            bd = r.get("by_distance", {})
            la = [f"{100 * bd[j]['exact']:.1f}%" if j in bd else "-" for j in ("1", "2")]
            lines.append(
                f"| {name} | {100 * r['exact']:.1f}% | {100 * r[f'overprov_hit@{k}+{m}']:.1f}% | "
                f"{100 * r['top1']:.1f}% | {100 * r[f'recall@{k}']:.1f}% | {la[0]} | {la[1]} |"
            )
        lines.append("")
    lines.append(
        "next-gate: layer l's router on layer l-1's pre-attention row (its own row for the first MoE layer). "
        "lookahead j: the head at layer l predicting layer l+j from layer l's row."
    )
    return "\n".join(lines) + "\n"
