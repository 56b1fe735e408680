"""Learned eviction (policy ``learned``, ``moert train --predictor reuse``) on the shared puffin traces.

Split by prompt as ``bench/bench_predict.py`` does (``split_sequences(ids, 0.1, 0.1, seed)``: train 799,
val 100, test 100 of the 999 prompts). The reuse forecast is trained on the train prompts (early
stopping on val; ``moert.predict.reuse_train`` defaults unless flags say otherwise), then every policy of
``--policies`` replays the test prompts, per-layer and global, at ``--capacities``, under the cost model
of the flags: hit rate, predicted tok/s, and for ``learned`` the share of the lru -> belady gap it closes
(in hit rate and in tok/s). Ablations (``--ablations``, capacity ``--ablation-capacity``): the
look-ahead of the main model (``--horizons``: the eviction ranks by the hit density over the
horizons up to n only), and the forecast retrained without each feature group of ``--drop``. Writes ``OUT.json`` and ``OUT.md`` (training curve,
provenance).

Usage::

    python bench/bench_evict.py [--trace DIR] [--work out/evict] [--evictor R.safetensors]
        [--policies lru,lfu,belady,learned,learned:next] [--capacities 0.1,0.25,0.5] [--modes per-layer,global]
        [--expert-mb 17.3] [--bandwidth-gbs 25] [--layer-compute-ms 0.2] [--ablations]
        [--out bench/results/sim_evict_puffin]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: threaded BLAS thrashes on a shared box

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moert import envs  # noqa: E402
from moert.predict.data import open_sequences, split_sequences  # noqa: E402
from moert.predict.evaluate import select_sequences  # noqa: E402
from moert.predict.reuse import FEATURE_GROUPS, HORIZONS, load_reuse, save_reuse  # noqa: E402
from moert.predict.reuse_train import ReuseTrainConfig, build_data, train_ensemble  # noqa: E402

#: the training settings of the main model (chosen on the validation prompts; README "Learned eviction"):
#: ENSEMBLE models (seeds --train-seed, --train-seed + 1, ...) averaged
EPOCHS, PATIENCE, STRIDE, HIDDEN, LR_FINAL, ENSEMBLE = 10, 20, 4, 64, 0.05, 2


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(","))


def load(args):
    path = Path(args.trace) if args.trace else envs.shared_dir() / "data/traces/deepseek-v2-lite-chat-puffin"
    meta, seqs = open_sequences(str(path))
    split = split_sequences([s.seq_id for s in seqs], 0.1, 0.1, seed=args.seed)
    parts = {name: select_sequences(seqs, getattr(split, name)) for name in ("train", "val", "test")}
    return meta, parts, path


def _stream(part) -> np.ndarray:
    return np.concatenate([s.experts.numpy().astype(np.int64) for s in part], axis=1)  # [L, N, k]


def train(args, meta, parts, groups, out: Path):
    seed = args.seed if args.train_seed is None else args.train_seed
    cfg = dataclasses.replace(ReuseTrainConfig(), seed=seed, epochs=args.epochs, stride=args.stride,
                              groups=tuple(groups), focus=args.focus, hidden=args.hidden,
                              lr_final=args.lr_final, patience=args.patience)  # fmt: skip
    E = meta.num_experts
    va = build_data(_stream(parts["val"]), E, stride=4)
    info = {"trace": meta.source, "seed": seed, "split_seed": args.seed, "examples": {"val": len(va)},
            "prompts": {k: len(v) for k, v in parts.items()}}  # fmt: skip
    model = train_ensemble(_stream(parts["train"]), va, meta.num_layers, E, cfg, args.ensemble, info,
                           log=lambda r: print(groups, r, flush=True))  # fmt: skip
    save_reuse(out, model, model_type=meta.model_type, layers=tuple(meta.layers), top_k=meta.top_k)
    return model


def replay(args, meta, parts, policies, capacities, mode, model):
    from moert.policy.predictor import SequenceListTrace
    from moert.sim import CostModel, PolicySpec, SimConfig, simulate

    trace = SequenceListTrace(meta, parts["test"], path="puffin-test")
    cost = CostModel(expert_bytes=int(round(args.expert_mb * 1e6)), bandwidth_gbs=args.bandwidth_gbs,
                     layer_compute_ms=args.layer_compute_ms)  # fmt: skip
    specs = tuple(PolicySpec(*(p.split("+", 1) + [None])[:2]) for p in policies)
    t0 = time.perf_counter()
    cfg = SimConfig(capacities=capacities, policies=specs, mode=mode, cost=cost, evictor=model)
    report = simulate(trace, cfg)
    keep = ("policy", "capacity", "hit_rate", "predicted_tok_s", "bytes_per_token")
    rows = [{**{k: r.get(k) for k in keep}, "mode": mode} for r in report["results"]]
    print(mode, policies, f"{time.perf_counter() - t0:.0f} s", flush=True)
    return rows, report["config"]["cost_model"]


def gap_closed(rows: list[dict], label: str = "learned") -> None:
    """Adds ``gap_hit`` / ``gap_tok_s`` (share of lru -> belady closed) to the rows of ``label``."""
    by = {(r["mode"], r["capacity"], r["policy"]): r for r in rows}
    for r in rows:
        lru, bel = by.get((r["mode"], r["capacity"], "lru")), by.get((r["mode"], r["capacity"], "belady"))
        if lru is None or bel is None or r["policy"] in ("lru", "belady"):
            continue
        for key, name in (("hit_rate", "gap_hit"), ("predicted_tok_s", "gap_tok_s")):
            span = bel[key] - lru[key]
            r[name] = None if abs(span) < 1e-12 else (r[key] - lru[key]) / span


def ablations(args, meta, parts, model, work: Path, base_rows: list[dict]) -> list[dict]:
    c = args.ablation_capacity
    out = []
    base = [r for r in base_rows if r["capacity"] == c and r["policy"] in ("lru", "belady")]
    for used in args.horizons:
        m = dataclasses.replace(model, horizons_used=used)
        for mode in args.ablation_modes:
            rows, _ = replay(args, meta, parts, ["learned"], (c,), mode, m)
            out += [{**r, "variant": f"horizons up to {HORIZONS[used - 1]} tokens"} for r in rows]
    for drop in args.drop:
        groups = [g for g in FEATURE_GROUPS if g != drop]
        m = train(args, meta, parts, groups, work / f"reuse-no-{drop}.safetensors")
        for mode in args.ablation_modes:
            rows, _ = replay(args, meta, parts, ["learned"], (c,), mode, m)
            out += [{**r, "variant": f"without {drop}"} for r in rows]
    for r in out:
        gap_closed(base + [r])
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    cm = result["cost_model"]
    lines = [
        "# Learned eviction on the DeepSeek-V2-Lite-Chat puffin traces (held-out prompts)",
        "",
        f"Test: {result['prompts']['test']} prompts ({result['test_tokens']} tokens) split by prompt (seed "
        f"{result['seed']}; train {result['prompts']['train']}, val {result['prompts']['val']}). Cost model: "
        f"{cm['expert_bytes'] / 1e6:.1f} MB experts, {cm['bandwidth_gbs']} GB/s, {cm['layer_compute_ms']} ms per "
        "MoE layer. gap = share of the lru -> belady difference closed.",
        "",
        "| mode | policy | capacity | hit rate | tok/s | gap (hit) | gap (tok/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        g = lambda k, r=r: "" if r.get(k) is None else f"{100 * r[k]:.1f}%"  # noqa: E731
        lines.append(f"| {r['mode']} | {r['policy']} | {r['capacity']} | {r['hit_rate']:.3f} | "
                     f"{r['predicted_tok_s']:.1f} | {g('gap_hit')} | {g('gap_tok_s')} |")  # fmt: skip
    if result.get("ablations"):
        lines += ["", f"## Ablations (capacity {result['ablation_capacity']})", "",
                  "| variant | mode | hit rate | tok/s | gap (hit) | gap (tok/s) |", "|---|---|---|---|---|---|"]  # fmt: skip
        for r in result["ablations"]:
            lines.append(f"| {r['variant']} | {r['mode']} | {r['hit_rate']:.3f} | {r['predicted_tok_s']:.1f} | "
                         f"{100 * r['gap_hit']:.1f}% | {100 * r['gap_tok_s']:.1f}% |")  # fmt: skip
    cfg = result["training"].get("config", {})
    lines += ["", f"Model: {result.get('model', 'trained here')}; training: {json.dumps(cfg)}; horizons used "
              f"{result['horizons_used']} (the eviction's look-ahead: `learned` ranks by the hit density over P(use within 1..{HORIZONS[result['horizons_used'] - 1]} "
              f"tokens), `learned:next` by E[log2 min(d, {2 * HORIZONS[result['horizons_used'] - 1]})])."]  # fmt: skip
    members = result["training"].get("members", [])
    if members:
        lines += ["", f"An ensemble of {len(members)} models, their probabilities averaged: "
                  + "; ".join(f"seed {m['seed']}: best validation BCE {m['best_val_loss']:.4f}" for m in members)
                  + ". The curve below is the first's."]  # fmt: skip
    curve = result["training"].get("curve", [])
    lines += [
        "",
        "## Training curve (BCE over experts and horizons)",
        "",
        "| epoch | train | val | s |",
        "|---|---|---|---|",
    ]
    for c in curve:
        tr = "" if c["train_loss"] is None else f"{c['train_loss']:.4f}"
        lines.append(f"| {c['epoch']} | {tr} | {c['val_loss']:.4f} | {c['seconds']} |")
    lines += ["", f"Regenerate: `{result['command']}`", "",
              f"commit {env.get('commit')}, {env.get('date_utc', env.get('date'))}, torch {env.get('torch')}, "
              f"numpy {env.get('numpy')}, {env.get('device', env.get('cpu', ''))}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=None, help="trace directory (default: the shared puffin traces)")
    p.add_argument("--work", default=str(REPO / "out/evict"), help="where the trained reuse models go")
    p.add_argument("--evictor", default=None, help="use this reuse model instead of training one")
    p.add_argument(
        "--policies",
        default="lru,lfu,belady,learned,learned:next",
        help="policies replayed (comma-separated; learned: hit density, learned:next: forecast next use)",
    )
    p.add_argument("--capacities", type=_floats, default=(0.1, 0.25, 0.5), help="cache shares of the experts")
    p.add_argument(
        "--modes", type=lambda s: s.split(","), default=["per-layer", "global"], help="cache modes"
    )
    p.add_argument("--expert-mb", type=float, default=17.3, help="cost model: MB per expert")
    p.add_argument("--bandwidth-gbs", type=float, default=25.0, help="cost model: host -> GPU GB/s")
    p.add_argument("--layer-compute-ms", type=float, default=0.2, help="cost model: ms per MoE layer")
    p.add_argument("--seed", type=int, default=0, help="split and training seed")
    p.add_argument(
        "--train-seed",
        type=int,
        default=None,
        help="another training seed on the same split (the ensemble's first; the others follow)",
    )
    p.add_argument(
        "--ensemble",
        type=int,
        default=ENSEMBLE,
        help=f"training: models averaged, seeds train-seed, train-seed + 1, ... (default {ENSEMBLE})",
    )
    p.add_argument("--epochs", type=int, default=EPOCHS, help=f"training: epochs (default {EPOCHS})")
    p.add_argument(
        "--patience",
        type=int,
        default=PATIENCE,
        help=f"training: early-stopping patience (default {PATIENCE})",
    )
    p.add_argument(
        "--stride", type=int, default=STRIDE, help=f"training: every N-th token (default {STRIDE})"
    )
    p.add_argument("--hidden", type=int, default=HIDDEN, help=f"training: MLP width (default {HIDDEN})")
    p.add_argument(
        "--lr-final",
        type=float,
        default=LR_FINAL,
        help=f"training: cosine learning-rate decay to this share (default {LR_FINAL}; 1: constant)",
    )
    p.add_argument(
        "--focus", type=int, default=0, help="training: weigh the loss to the N most recent experts"
    )
    p.add_argument(
        "--features",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(FEATURE_GROUPS),
        help="the feature groups of the model trained here (default all)",
    )
    p.add_argument("--ablations", action="store_true")
    p.add_argument("--ablation-capacity", type=float, default=0.25)
    p.add_argument("--ablation-modes", type=lambda s: s.split(","), default=["per-layer", "global"])
    p.add_argument(
        "--horizons",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[1, 2, 3, 4, 5, 6],
        help="ablation: the look-ahead horizons used (1..7; 7 = the main model's)",
    )
    p.add_argument(
        "--drop",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(FEATURE_GROUPS),
        help="ablation: retrain without each of these feature groups",
    )
    p.add_argument("--out", default=str(REPO / "bench/results/sim_evict_puffin"))
    p.add_argument("--markdown-from", default=None, help="only rewrite OUT.md from this JSON")
    args = p.parse_args(argv)
    from moert.cli.simulate import environment

    if args.markdown_from:
        Path(args.out).with_suffix(".md").write_text(
            markdown(json.loads(Path(args.markdown_from).read_text()))
        )
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    meta, parts, path = load(args)
    if args.evictor:
        model = load_reuse(args.evictor)[0]
    else:
        model = train(args, meta, parts, args.features, work / "reuse.safetensors")
    rows, cost = [], None
    for mode in args.modes:
        got, cost = replay(args, meta, parts, args.policies.split(","), args.capacities, mode, model)
        rows += got
    gap_closed(rows)
    result = {
        "trace": str(path), "seed": args.seed, "prompts": {k: len(v) for k, v in parts.items()},
        "test_tokens": sum(s.num_tokens for s in parts["test"]), "cost_model": cost, "rows": rows,
        "training": model.info, "horizons_used": model.horizons_used, "groups": list(model.groups),
        "model": args.evictor or str(work / "reuse.safetensors"),
        "command": "python bench/bench_evict.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(),
    }  # fmt: skip
    write(result, Path(args.out))  # the main table first: the ablations take long
    if args.ablations:
        result["ablation_capacity"] = args.ablation_capacity
        result["ablations"] = ablations(args, meta, parts, model, work, rows)
        write(result, Path(args.out))
    return 0


def write(result: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
