"""MoE-Beyond trained toward convergence on the shared puffin traces (CPU), with its learning curve.

Same trace, split (seed 0: train 799 / val 100 / test 100 prompts) and metrics as
``bench/bench_predict.py``; each variant trains in its own process, checkpoints every epoch to
safetensors (``WORK/NAME_last.safetensors`` and ``NAME_best.safetensors``), logs one JSON line per
epoch to ``WORK/NAME.log``, stops at a wall-clock cap (``--until HH:MM`` UTC or ``--max-minutes``),
then evaluates the best epoch on the held-out test prompts (``WORK/NAME.json``).

    nice python bench/bench_moe_beyond.py train --name small --epochs 40 --until 20:35
    nice python bench/bench_moe_beyond.py train --name small-cosine --schedule cosine --warmup 300 ...
    python bench/bench_moe_beyond.py report      # -> bench/results/moe_beyond_puffin.{json,md,png}

Variants (``--name``) differ only in the flags recorded in their JSON; the report lists every
``WORK/*.json`` and compares against xlayer's recall@6 from ``bench/results/predict_puffin.json``
(same split, 5 epochs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_predict import _env, evaluated, load  # noqa: E402

from moert.predict.io import save_predictor  # noqa: E402
from moert.predict.moe_beyond import MoEBeyondConfig, train_moe_beyond  # noqa: E402
from moert.predict.train import TrainConfig  # noqa: E402

RESULT = REPO / "bench/results/moe_beyond_puffin"
PAPER_RECALL6 = 0.756  # the paper's recall@6 on its WebGLM-QA test prompts (issue 14)


def _seconds_until(hhmm: str) -> float:
    now = datetime.datetime.now(datetime.timezone.utc)
    h, m = (int(x) for x in hhmm.split(":"))
    end = now.replace(hour=h, minute=m, second=0, microsecond=0)
    if end <= now:
        raise ValueError(f"--until {hhmm} UTC is not in the future (now {now:%H:%M} UTC)")
    return (end - now).total_seconds()


def stage_train(args) -> None:
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    meta, parts, split, path = load(args)
    cap = _seconds_until(args.until) if args.until else 60.0 * args.max_minutes
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch, lr=args.lr, weight_decay=args.weight_decay,
        patience=args.patience, seed=args.seed, threads=args.threads, progress=False,
        max_steps_per_epoch=args.max_steps, max_seconds=max(0.0, cap - args.reserve),
        warmup_steps=args.warmup, schedule=args.schedule,
    )  # fmt: skip
    d = args.d_model
    net_cfg = MoEBeyondConfig(
        d_model=d, d_token=d, d_layer=args.d_layer, num_layers=args.layers, num_heads=args.heads,
        ff=4 * d, dropout=args.dropout, max_len=512, layer_input=args.layer_input,
    )  # fmt: skip
    log = work / f"{args.name}.log"
    log.write_text("")
    best = {"score": -1.0}

    def on_epoch(epoch: int, hist: dict, pred) -> None:
        save_predictor(work / f"{args.name}_last.safetensors", pred.meta, *pred.state())
        score = hist["val_score"][-1]
        if score > best["score"]:
            best["score"] = score
            save_predictor(work / f"{args.name}_best.safetensors", pred.meta, *pred.state())
        line = {"epoch": epoch, "val_recall6": score, "train_loss": hist["train_loss"][-1],
                "seconds": hist["epoch_seconds"][-1], "lr": hist["lr"][-1], "steps": hist["steps"],
                "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")}  # fmt: skip
        with log.open("a") as f:
            f.write(json.dumps(line) + "\n")

    info = {"trace": meta.source, "seed": args.seed, "split": split.to_json()}
    t0 = time.perf_counter()
    pred, hist = train_moe_beyond(
        meta, parts["train"], parts["val"], net_cfg=net_cfg, cfg=cfg, train_info=info, on_epoch=on_epoch
    )
    train_s = time.perf_counter() - t0
    # evaluate what was saved
    out = {
        "name": args.name,
        **evaluated(work / f"{args.name}_best.safetensors", parts["test"], train_s, hist, cfg),
    }
    out.update(command=" ".join(sys.argv), env=_env(args))
    (work / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({"name": args.name, "test_recall6": out["metrics"]["overall"]["recall@6"]}), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("train", "report"))
    p.add_argument("--name", default="small")
    p.add_argument("--trace", default=None)
    p.add_argument("--work", default="/tmp/moert-bench-moe-beyond")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", default="constant", choices=("constant", "cosine"))
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-layer", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--layer-input", default="embed", choices=("embed", "heads"))
    p.add_argument("--until", default=None, help="wall-clock cap: HH:MM UTC today")
    p.add_argument("--max-minutes", type=float, default=60.0)
    p.add_argument("--reserve", type=float, default=0.0, help="seconds kept back from the cap")
    args = p.parse_args(argv)
    if args.stage == "train":
        stage_train(args)
    else:
        from moe_beyond_report import report

        report(Path(args.work), RESULT, PAPER_RECALL6)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
