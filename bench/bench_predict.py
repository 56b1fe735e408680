"""Expert predictors on the real DeepSeek-V2-Lite-Chat puffin traces (CPU), split by prompt.

Stages (each one process, each a few minutes on 2 CPU cores; run in order, or ``--stage all``):
  baselines   prev-token and frequency on the held-out prompts
  xlayer      train xlayer, evaluate on the held-out prompts
  moe-beyond  train a small MoE-Beyond encoder (smaller than the paper's), evaluate
  sim         replay the held-out prompts through the simulator (lru, belady; lru + each predictor)
  report      bench/results/predict_puffin.{json,md} with versions, commit, date
  ablation    (separate) xlayer without the history / previous-token features
              -> bench/results/predict_puffin_xlayer_ablation.md
  tiny        (separate) traces captured with hidden rows from tiny random deepseek_v2 / qwen3_moe /
              phimoe models (6 layers): preattn for both archs and all four losses, lookahead by
              distance, next-gate / prev-token / frequency -> bench/results/predict_tiny.{json,md}

Split: ``split_sequences(ids, val=0.1, test=0.1, seed=0)``: 10% of prompts held out (test), 10%
for early stopping, 80% for training. Intermediate results and predictor files go to ``--work``
(default /tmp/moert-bench-predict), never into the repository.

    python bench/bench_predict.py --stage all            # or stage by stage, as recorded:
    python bench/bench_predict.py --stage baselines
    python bench/bench_predict.py --stage xlayer --epochs 5
    python bench/bench_predict.py --stage moe-beyond --epochs 2
    python bench/bench_predict.py --stage sim
    python bench/bench_predict.py --stage report
    python bench/bench_predict.py --stage tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from moert import envs
from moert.predict.baselines import FrequencyPredictor, PrevTokenPredictor
from moert.predict.data import open_sequences, split_sequences
from moert.predict.evaluate import evaluate, select_sequences
from moert.predict.io import load_predictor, save_predictor
from moert.predict.train import TrainConfig

REPO = Path(__file__).resolve().parent.parent
DEFAULT_EPOCHS = {"xlayer": 5, "moe-beyond": 2}
STAGES = ("baselines", "xlayer", "moe-beyond", "sim", "report")
M = (2, 4)


def load(args):
    path = Path(args.trace) if args.trace else envs.shared_dir() / "data/traces/deepseek-v2-lite-chat-puffin"
    meta, seqs = open_sequences(str(path))
    split = split_sequences([s.seq_id for s in seqs], 0.1, 0.1, seed=args.seed)
    parts = {name: select_sequences(seqs, getattr(split, name)) for name in ("train", "val", "test")}
    return meta, parts, split, path


def save_part(work: Path, name: str, obj: dict) -> None:
    (work / f"{name}.json").write_text(json.dumps(obj, indent=1))


def evaluated(path: Path, test: list, train_s: float, hist: list, cfg: TrainConfig) -> dict:
    """The record of a trained predictor: its saved file ``path`` loaded and evaluated on ``test``
    (overprovision ``M``), with its training time, history, dims, loss, config and parameter count."""
    pred = load_predictor(path)
    t0 = time.perf_counter()
    metrics = evaluate(pred, test, overprovision=M)
    return {
        "metrics": metrics,
        "train_s": train_s,
        "eval_s": time.perf_counter() - t0,
        "history": hist,
        "dims": pred.meta.dims,
        "loss": pred.meta.loss,
        "train_config": dataclasses.asdict(cfg),
        "parameters": sum(p.numel() for p in pred.net.parameters()),
    }


def stage_baselines(args, meta, parts, work):
    out = {}
    for name, pred in (
        ("prev-token", PrevTokenPredictor.for_trace(meta)),
        ("frequency", FrequencyPredictor.fit(meta, parts["train"] + parts["val"])),
    ):
        t0 = time.perf_counter()
        out[name] = {
            "metrics": evaluate(pred, parts["test"], overprovision=M),
            "eval_s": time.perf_counter() - t0,
        }
        if name == "frequency":
            save_predictor(work / "frequency.safetensors", pred.meta, *pred.state())
    save_part(work, "baselines", out)


def stage_learned(args, meta, parts, split, work, kind):
    cfg = TrainConfig(
        epochs=args.epochs or DEFAULT_EPOCHS[kind], batch_size=1024 if kind == "xlayer" else 32, lr=args.lr or (2e-3 if kind != "xlayer" else 1e-3),
        patience=2, seed=args.seed, threads=args.threads, progress=False,
        max_steps_per_epoch=args.max_steps,
    )  # fmt: skip
    # the split goes into the file's header, so `moert eval --predictor FILE` evaluates on the same test prompts
    info = {"trace": meta.source, "seed": args.seed, "split": split.to_json()}
    t0 = time.perf_counter()
    if kind == "xlayer":
        from moert.predict.xlayer import train_xlayer

        pred, hist = train_xlayer(
            meta, parts["train"], parts["val"], dim=args.hidden or 128, cfg=cfg, train_info=info
        )
    else:
        from moert.predict.moe_beyond import MoEBeyondConfig, train_moe_beyond

        d = args.hidden or 128
        net_cfg = MoEBeyondConfig(
            d_model=d, d_token=d, d_layer=32, num_layers=2, num_heads=4, ff=4 * d, max_len=512
        )
        pred, hist = train_moe_beyond(
            meta, parts["train"], parts["val"], net_cfg=net_cfg, cfg=cfg, train_info=info
        )
    train_s = time.perf_counter() - t0
    path = save_predictor(work / f"{kind}.safetensors", pred.meta, *pred.state())
    out = evaluated(path, parts["test"], train_s, hist, cfg)  # evaluate what was saved
    save_part(work, kind, out)


def stage_sim(args, meta, parts, work):
    from moert.policy.predictor import PredictorPolicy, SequenceListTrace
    from moert.sim import PolicySpec, SimConfig, simulate

    trace = SequenceListTrace(meta, parts["test"], path="puffin-test")
    pre = {
        "prev-token": PredictorPolicy(PrevTokenPredictor.for_trace(meta), 0, "prev-token"),
        "frequency": PredictorPolicy(load_predictor(work / "frequency.safetensors"), 0, "frequency"),
    }
    for kind in ("xlayer", "moe-beyond"):
        f = work / f"{kind}.safetensors"
        if f.is_file():
            for m in (0, 2, 4):
                pre[f"{kind}:{m}" if m else kind] = PredictorPolicy(load_predictor(f), m, kind)
    policies = [PolicySpec("lru"), PolicySpec("belady"), PolicySpec("lru", "oracle")]
    policies += [PolicySpec("lru", name) for name in pre]
    t0 = time.perf_counter()
    keep = ("policy", "capacity", "mode", "hit_rate", "prefetch_hits", "prefetch_wasted", "bytes_per_token")
    rows = []
    for mode in ("per-layer", "global"):
        cfg = SimConfig(capacities=(0.1, 0.25), policies=tuple(policies), mode=mode)
        report = simulate(trace, cfg, prefetchers=pre)
        rows += [{**{k: r.get(k) for k in keep}, "mode": mode} for r in report["results"]]
    save_part(work, "sim", {"rows": rows, "sim_s": time.perf_counter() - t0})


def stage_ablation(args, meta, parts, work):
    """xlayer with fewer features, same split, epochs and seed as the xlayer stage."""
    from moert.predict.xlayer import train_xlayer

    cfg = TrainConfig(epochs=args.epochs or DEFAULT_EPOCHS["xlayer"], batch_size=1024, lr=1e-3, patience=2, seed=args.seed, threads=args.threads,
                      progress=False)  # fmt: skip
    variants = {
        "experts l-1, l-2 + token + position + prev token + history (default)": {},
        "without history": {"use_history": False},
        "without history and prev token (pure cross-layer + token)": {
            "use_history": False,
            "use_prev_token": False,
        },
    }
    lines = [
        "# xlayer feature ablation, held-out puffin prompts (CPU)",
        "",
        f"{_env(args)['date_utc']}, commit {_env(args)['commit']}. `python bench/bench_predict.py --stage ablation "
        f"--epochs {args.epochs or DEFAULT_EPOCHS['xlayer']}`; split, seed and training as in predict_puffin.md.",
        "",
        "| features | exact | top1 | recall@6 | overprov_hit@6+4 | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, kw in variants.items():
        t0 = time.perf_counter()
        pred, _ = train_xlayer(meta, parts["train"], parts["val"], dim=args.hidden or 128, cfg=cfg, **kw)
        o = evaluate(pred, parts["test"], overprovision=(4,))["overall"]
        lines.append(
            f"| {name} | {100 * o['exact']:.2f}% | {100 * o['top1']:.2f}% | {100 * o['recall@6']:.2f}% | "
            f"{100 * o['overprov_hit@6+4']:.2f}% | {time.perf_counter() - t0:.0f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    (REPO / "bench/results/predict_puffin_xlayer_ablation.md").write_text("\n".join(lines) + "\n")


def _plot_layers(rows: dict, k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key in zip(axes, (f"recall@{k}", "top1")):
        for name, r in rows.items():
            per = r["metrics"]["per_layer"]
            ax.plot([p["layer"] for p in per], [100 * p[key] for p in per], marker="o", ms=3, label=name)
        ax.set_title(f"{key} per MoE layer (held-out prompts)")
        ax.set_xlabel("MoE layer id")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[0].set_ylim(0, 100)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _env(args) -> dict:
    import numpy
    import safetensors

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--", "moert/predict", "bench/bench_predict.py")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "cpu": _device_name(),
        "threads": args.threads,
        "device": "cpu",
    }


def _device_name() -> str:
    try:
        from moert.provenance import device_name

        return device_name("cpu")
    except ImportError:  # older checkouts
        return platform.processor() or platform.machine()


def _git(*cmd: str) -> str:
    try:
        return subprocess.run(
            ["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        return "unknown"


def stage_report(args, meta, parts, split, path, work):
    parts_json = {
        n: json.loads((work / f"{n}.json").read_text()) for n in STAGES[:-1] if (work / f"{n}.json").is_file()
    }
    rows = {}
    for name, r in parts_json.get("baselines", {}).items():
        rows[name] = r
    for kind in ("xlayer", "moe-beyond"):
        if kind in parts_json:
            rows[kind] = parts_json[kind]
    result = _report_result(args, meta, parts, split, path, rows, parts_json)
    (REPO / "bench/results/predict_puffin.json").write_text(json.dumps(result, indent=1))
    lines = _report_table(args, meta, result, rows) + _report_notes(rows)
    sim = parts_json.get("sim")
    if sim:
        lines += _report_sim(sim)
    if rows:
        _plot_layers(rows, meta.top_k, REPO / "bench/results/predict_puffin_layers.png")
        lines += ["", "Per-layer recall@6 and top-1 of every predictor: `predict_puffin_layers.png`."]
    (REPO / "bench/results/predict_puffin.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _report_result(args, meta, parts, split, path, rows, parts_json) -> dict:
    """predict_puffin.json: environment, trace and split, every predictor's row, the simulation."""
    env = _env(args)
    k = meta.top_k
    return {
        "env": env,
        "trace": {"path": str(path), "model_type": meta.model_type, "layers": list(meta.layers), "E": meta.num_experts,
                  "k": k, "sequences": sum(len(v) for v in parts.values()),
                  "split": {n: {"sequences": len(v), "tokens": sum(s.num_tokens for s in v)} for n, v in parts.items()},
                  "test_ids": list(split.test), "seed": args.seed},
        "predictors": rows,
        "sim": parts_json.get("sim"),
    }  # fmt: skip


def _report_table(args, meta, result, rows) -> list[str]:
    """The title, provenance, trace and the metrics table (one row per predictor)."""
    env, k = result["env"], meta.top_k
    cols = [
        "exact",
        "overprov_hit@6+2",
        "overprov_hit@6+4",
        "top1",
        f"recall@{k}",
        "f1@6+2",
        "f1@6+4",
        "macro_f1",
    ]
    lines = [
        "# Expert predictors on real DeepSeek-V2-Lite-Chat routing (puffin prompts), CPU",
        "",
        f"{env['date_utc']}, commit {env['commit']}{' (+uncommitted bench changes)' if env['dirty'] else ''}, "
        f"torch {env['torch']}, Python {env['python']}, {env['threads']} CPU thread(s). "
        "Produced by `python bench/bench_predict.py --stage S` for S = baselines, xlayer (`--epochs 5`), "
        "moe-beyond (`--epochs 2`), sim, report (each stage one process; training times below).",
        "",
        f"Trace: {meta.model_type}, {len(meta.layers)} MoE layers, E={meta.num_experts}, k={k}; "
        f"{result['trace']['sequences']} prompts split by prompt (seed {args.seed}): "
        + ", ".join(
            f"{n} {v['sequences']} prompts / {v['tokens']} tokens"
            for n, v in result["trace"]["split"].items()
        )
        + ". All metrics on the held-out test prompts, pooled over (token, layer).",
        "",
        "| predictor | " + " | ".join(cols) + " | train s |",
        "|---|" + "---:|" * (len(cols) + 1),
    ]
    for name, r in rows.items():
        o = r["metrics"]["overall"]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * o[c]:.2f}%" for c in cols)
            + f" | {r.get('train_s', 0):.0f} |"
        )
    return lines + [
        "",
        "exact: predicted top-6 set equals the true set; overprov_hit@6+m: true set within the predicted "
        "top-(6+m); top1: predicted argmax is selected; recall@6 = precision@6 = F1 of the top-6 set; "
        "f1@6+m: micro F1 of the top-(6+m) set; macro_f1: per-expert F1 of the top-6 set, averaged over experts.",
        "",
    ]


def _report_notes(rows) -> list[str]:
    """The learned predictors' dimensions and training histories."""
    lines: list[str] = []
    for kind in ("xlayer", "moe-beyond"):
        if kind in rows:
            r = rows[kind]
            h = r["history"]
            lines.append(
                f"- {kind}: dims {json.dumps({a: b for a, b in r['dims'].items() if a != 'vocab'})}, vocab {r['dims'].get('vocab')}, "
                f"{r['parameters']:,} parameters, loss {r['loss']}, {h['epochs_run']} epoch(s) "
                f"(best {h['best_epoch']}, max steps/epoch {r['train_config']['max_steps_per_epoch'] or 'all'}), "
                f"validation recall@6 by epoch {[round(v, 4) for v in h['val_score']]}."
            )
    if "moe-beyond" in rows:
        lines.append(
            "- moe-beyond here is much smaller than the paper's (2 encoder layers, d_model 128, 4 heads, FF 512 vs "
            "4 layers with 2048-d model embeddings), trained from token strings only, for minutes on CPU "
            "(paper: 66M activations, ~48 A100-hours); its numbers are a lower bound for the method."
        )
    return lines


def _report_sim(sim) -> list[str]:
    """The simulated hit rates per cache mode and what the policies mean."""
    lines: list[str] = []
    for mode in ("per-layer", "global"):
        what = (
            "one cache per layer, capacity x E slots each"
            if mode == "per-layer"
            else ("one cache for all layers, capacity x L x E slots")
        )
        lines += [
            "",
            f"## Simulated hit rate on the held-out prompts, {mode} ({what}), C++ SlabCache replay",
            "",
            "| policy | capacity 0.1 | capacity 0.25 | wasted prefetches (0.1) | wasted prefetches (0.25) |",
            "|---|---:|---:|---:|---:|",
        ]  # fmt: skip
        by: dict = {}
        for row in sim["rows"]:
            if row["mode"] == mode:
                by.setdefault(row["policy"], {})[row["capacity"]] = row
        for pol, caps in by.items():
            hit = [f"{100 * caps[c]['hit_rate']:.2f}%" if c in caps else "-" for c in (0.1, 0.25)]
            wasted = [str(caps[c].get("prefetch_wasted", "-")) if c in caps else "-" for c in (0.1, 0.25)]
            lines.append(f"| {pol} | " + " | ".join(hit + wasted) + " |")
    lines += [
        "",
        "`lru+X`: LRU eviction, and before each layer's access the top-(6+m) experts predicted by X are "
        "prefetched (`X:m`); `oracle` prefetches the true set (ceiling); `belady` is optimal eviction "
        "without prefetch. A hit is an access whose expert is resident (prefetched ones included); "
        "prefetches cost PCIe bytes (wasted = prefetched and evicted unused). Per-layer capacity 0.1 is "
        "6 slots = k, so a prefetch of k experts replaces the layer's whole cache and the hit rate is "
        "about the predictor's recall@6.",
    ]
    return lines


def _tiny_module():
    """``bench/predict_tiny.py`` (``--stage tiny``), with bench/ put on ``sys.path`` first:
    ``python -P bench/bench_predict.py`` leaves it off."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("predict_tiny")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", choices=(*STAGES, "all", "tiny", "ablation"))
    p.add_argument("--tiny-prompts", type=int, default=60)
    p.add_argument("--trace", default=None)
    p.add_argument("--work", default="/tmp/moert-bench-predict")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--epochs", type=int, default=None, help="default: xlayer 5, moe-beyond 2 (the recorded runs)"
    )
    p.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch (0: all)")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.stage == "tiny":
        _tiny_module().stage_tiny(args, work)
        return 0
    meta, parts, split, path = load(args)
    stages = STAGES if args.stage == "all" else (args.stage,)  # "ablation" only when asked
    for st in stages:
        t0 = time.perf_counter()
        if st == "baselines":
            stage_baselines(args, meta, parts, work)
        elif st in ("xlayer", "moe-beyond"):
            stage_learned(args, meta, parts, split, work, st)
        elif st == "sim":
            stage_sim(args, meta, parts, work)
        elif st == "ablation":
            stage_ablation(args, meta, parts, work)
        else:
            stage_report(args, meta, parts, split, path, work)
        print(f"[{st}] {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
