"""``moert eval``: metrics of a trained predictor, a baseline or recorded predictions on a trace, as a
table, JSON and a plot.

Which sequences: ``--split test`` (default) evaluates on the held-out sequences — the ones recorded in
a trained predictor's header, or for baselines the same split ``moert train`` makes from
``--val-split/--test-split/--seed`` (``frequency`` counts on the other sequences). ``--split all``
evaluates on every sequence (e.g. a different trace of the same model).

``--predictions DIR`` evaluates predictions recorded by a peer instead of a moert predictor:
MoE-Beyond's ``test_datasets/predicted_csvs`` (``prompt_<n>_data_predicted.csv``, column
``Predicted Expert IDs``). The routing they are judged against is ``--trace``, by default the same
folder's ``Activated Expert IDs``; every sequence the predictions cover is evaluated. The metrics are
``moert.predict.metrics``' (the recorded ids taken in order as the ranking; over-provision columns only
for m the recording is wide enough for).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run", "eval_from_args", "BASELINES"]

BASELINES = ("prev-token", "frequency", "next-gate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trace", default=None, help="trace directory (with --predictions: default the predictions folder)"
    )
    p.add_argument("--format", default="auto", help="trace format: auto, moert, moe-beyond-csv, esft")
    p.add_argument("--num-experts", type=int, default=64, help="E for imported formats (default 64)")
    p.add_argument("--top-k", type=int, default=None, help="k for imported formats (CSV: inferred; ESFT: 6)")
    p.add_argument("--model-type", default="deepseek_v2", help="model_type recorded for imported formats")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--predictor", help="PRED.safetensors, or a baseline: " + ", ".join(BASELINES))
    what.add_argument(
        "--predictions",
        metavar="DIR",
        help="predictions recorded by a peer: a MoE-Beyond predicted folder (prompt_<n>_data_predicted.csv)",
    )
    p.add_argument(
        "--overprovision",
        default=None,
        help="m values for top-(k+m), comma separated (default 2,4; recorded predictions: those recorded)",
    )
    p.add_argument(
        "--split",
        default=None,
        choices=["test", "val", "train", "all"],
        help="sequences to evaluate (default test; --predictions: all)",
    )
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


def _open(args: argparse.Namespace, path: str) -> tuple[Any, list[Any]]:
    from moert.cli.trace import importer_options
    from moert.predict.data import open_sequences
    from moert.trace import detect_format

    fmt = detect_format(path) if args.format == "auto" else args.format
    options = importer_options(fmt, args.num_experts, args.top_k, args.model_type)
    return open_sequences(path, fmt, args.max_sequences, **options)


def _recorded_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluates ``--predictions DIR`` against ``--trace`` (default: DIR's own routing)."""
    from moert.predict.evaluate import evaluate_recorded, recorded_overprovision
    from moert.trace import InMemoryTrace
    from moert.trace.importers import recorded_predictions

    if args.split not in (None, "all"):
        raise ValueError(
            f"--split {args.split}: recorded predictions are evaluated on every sequence they cover; drop "
            "--split (or use --split all)"
        )
    trace_path = args.trace if args.trace is not None else args.predictions
    meta, seqs = _open(args, trace_path)
    trace = InMemoryTrace(meta, seqs, path=str(trace_path))
    preds = recorded_predictions(args.predictions, trace, num_experts=meta.num_experts)
    width = max(int(p.shape[-1]) for p in preds.values())
    if args.overprovision is None:
        ms = recorded_overprovision(width, meta.top_k)
    else:
        ms = _parse_m(args.overprovision, meta.num_experts, meta.top_k)
    result = evaluate_recorded(preds, seqs, meta, overprovision=ms)
    result["predictor"] = {"name": str(args.predictions), "kind": "recorded", "arch": "", "loss": ""}
    result["trace"] = str(Path(trace_path).resolve())
    result["split"] = "all"
    result["sequence_ids"] = [int(s.seq_id) for s in seqs]
    return result


def eval_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Loads the trace and predictor (or recorded predictions), evaluates; returns ``(predictor, result)``
    (``predictor`` is None for ``--predictions``)."""
    import torch

    from moert.predict.data import Split, split_sequences
    from moert.predict.evaluate import evaluate, select_sequences

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.predictions is not None:
        return None, _recorded_from_args(args)
    if args.trace is None:
        raise ValueError("--predictor needs --trace DIR (the routing to evaluate it on)")
    split_name = args.split or "test"
    meta, seqs = _open(args, args.trace)
    ids = [s.seq_id for s in seqs]
    name = args.predictor
    if name in BASELINES:
        split = (
            split_sequences(ids, args.val_split, args.test_split, args.seed) if split_name != "all" else None
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
        if split_name != "all":
            if not recorded:
                raise ValueError(f"{name} records no train/val/test split; use --split all")
            split = Split(*(tuple(recorded[k]) for k in ("train", "val", "test")))
            missing = sorted(set(getattr(split, split_name)) - set(ids))
            if missing:
                raise ValueError(
                    f"{len(missing)} of {name}'s {split_name} sequences (e.g. {missing[:5]}) are not in "
                    f"{args.trace}; was it trained on another trace? use --split all"
                )
    chosen = seqs if split is None else select_sequences(seqs, getattr(split, split_name))
    if not chosen:
        raise ValueError(f"the {split_name} split is empty; use --split all or a larger --test-split")
    ms = _parse_m(args.overprovision, meta.num_experts, meta.top_k)
    result = evaluate(pred, chosen, overprovision=ms, progress=True)
    result["predictor"] = {
        "name": name,
        "kind": pred.meta.kind,
        "arch": pred.meta.arch,
        "loss": pred.meta.loss,
    }
    result["trace"] = str(Path(args.trace).resolve())
    result["split"] = split_name
    result["sequence_ids"] = [int(s.seq_id) for s in chosen]
    return pred, result


def run(args: argparse.Namespace) -> int:
    from moert.predict.evaluate import plot_per_layer
    from moert.predict.metrics import format_table

    _, result = eval_from_args(args)
    who = result["predictor"]
    title = f"{who['name']} ({who['kind']}) on {result['sequences']} {result['split']} sequences"
    print(format_table(result, title=title, per_layer=args.per_layer))
    if result.get("sorted_ids"):
        print(
            "note: every recorded list is sorted by expert id (a set, not a ranking): top-1 counts the smallest "
            f"predicted id; exact, recall@{result['top_k']} and macro F1 do not depend on the order where a row "
            f"holds {result['top_k']} ids"
        )
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
