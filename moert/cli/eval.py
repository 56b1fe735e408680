"""``moert eval``: metrics of a trained predictor or a baseline on a trace, as a table, JSON and a plot.

Which sequences: ``--split test`` (default) evaluates on the held-out sequences — the ones recorded in
a trained predictor's header, or for baselines the same split ``moert train`` makes from
``--val-split/--test-split/--seed`` (``frequency`` counts on the other sequences). ``--split all``
evaluates on every sequence (e.g. a different trace of the same model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run", "eval_from_args", "BASELINES"]

BASELINES = ("prev-token", "frequency", "next-gate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="trace directory")
    p.add_argument("--format", default="auto", help="trace format: auto, moert, moe-beyond-csv, esft")
    p.add_argument(
        "--predictor", required=True, help="PRED.safetensors, or a baseline: " + ", ".join(BASELINES)
    )
    p.add_argument(
        "--overprovision", default=None, help="m values for top-(k+m), comma separated (default 2,4)"
    )
    p.add_argument("--split", default="test", choices=["test", "val", "train", "all"])
    p.add_argument("--val-split", type=float, default=0.1, help="baselines: as in `moert train`")
    p.add_argument("--test-split", type=float, default=0.1, help="baselines: as in `moert train`")
    p.add_argument("--seed", type=int, default=0, help="baselines: split seed, as in `moert train`")
    p.add_argument(
        "--max-sequences", type=int, default=None, help="use only the first N sequences of the trace"
    )
    p.add_argument("--model", default=None, help="next-gate: the HF model directory whose routers to use")
    p.add_argument("--per-layer", action="store_true", help="print the per-layer table too")
    p.add_argument("--json", default=None, help="write the metrics as JSON here")
    p.add_argument("--plot", default=None, help="write a per-layer plot (PNG) here")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def _parse_m(text: str | None, E: int, k: int) -> tuple[int, ...]:
    from moert.predict.evaluate import default_overprovision

    if text is None:
        return default_overprovision(E, k)
    try:
        ms = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--overprovision {text!r} must be comma-separated integers, e.g. 2,4") from None
    bad = [m for m in ms if not 0 <= m <= E - k]
    if bad:
        raise ValueError(f"--overprovision {bad} out of range [0, E-k={E - k}]")
    return ms


def eval_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Loads the trace and predictor, evaluates; returns ``(predictor, result)``."""
    import torch

    from moert.predict.data import Split, open_sequences, split_sequences
    from moert.predict.evaluate import evaluate, select_sequences

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    meta, seqs = open_sequences(args.trace, args.format, args.max_sequences)
    ids = [s.seq_id for s in seqs]
    name = args.predictor
    if name in BASELINES:
        split = (
            split_sequences(ids, args.val_split, args.test_split, args.seed) if args.split != "all" else None
        )
        fit_ids = (set(split.train) | set(split.val)) if split is not None else set(ids)
        from moert.predict import baselines

        if name == "prev-token":
            pred = baselines.PrevTokenPredictor.for_trace(meta)
        elif name == "frequency":
            pred = baselines.FrequencyPredictor.fit(meta, select_sequences(seqs, fit_ids))
        else:
            if args.model is None:
                raise ValueError("next-gate needs --model PATH (the model whose routers it applies)")
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
            pred = baselines.NextGatePredictor.from_model(model, meta)
    else:
        from moert.predict.io import load_predictor

        pred = load_predictor(name)
        pred.check_trace(meta, where=name)
        split = None
        recorded = pred.meta.train.get("split")
        if args.split != "all":
            if not recorded:
                raise ValueError(f"{name} records no train/val/test split; use --split all")
            split = Split(*(tuple(recorded[k]) for k in ("train", "val", "test")))
            missing = sorted(set(getattr(split, args.split)) - set(ids))
            if missing:
                raise ValueError(
                    f"{len(missing)} of {name}'s {args.split} sequences (e.g. {missing[:5]}) are not in "
                    f"{args.trace}; was it trained on another trace? use --split all"
                )
    chosen = seqs if split is None else select_sequences(seqs, getattr(split, args.split))
    if not chosen:
        raise ValueError(f"the {args.split} split is empty; use --split all or a larger --test-split")
    ms = _parse_m(args.overprovision, meta.num_experts, meta.top_k)
    result = evaluate(pred, chosen, overprovision=ms, progress=True)
    result["predictor"] = {
        "name": name,
        "kind": pred.meta.kind,
        "arch": pred.meta.arch,
        "loss": pred.meta.loss,
    }
    result["trace"] = str(Path(args.trace).resolve())
    result["split"] = args.split
    result["sequence_ids"] = [int(s.seq_id) for s in chosen]
    return pred, result


def run(args: argparse.Namespace) -> int:
    from moert.predict.evaluate import plot_per_layer
    from moert.predict.metrics import format_table

    pred, result = eval_from_args(args)
    title = f"{args.predictor} ({pred.meta.kind}) on {result['sequences']} {args.split} sequences"
    print(format_table(result, title=title, per_layer=args.per_layer))
    if "by_distance" in result:
        k = result["top_k"]
        print("accuracy by lookahead distance (layer l predicting l+j):")
        for j, row in result["by_distance"].items():
            print(f"  j={j}: exact {100 * row['exact']:.2f}%  top1 {100 * row['top1']:.2f}%  recall@{k} "
                  f"{100 * row[f'recall@{k}']:.2f}%")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        plot_per_layer(result, args.plot, title=title)
        print(f"wrote {args.plot}")
    return 0
