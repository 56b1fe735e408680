"""``bench_sim.py --what score``: the runtime's eviction policy ``score`` vs lru/lfu/belady on the puffin traces."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from moert import envs
from moert.cli.simulate import environment
from moert.provenance import modified_files

RESULTS = Path(__file__).parent / "results"


def _predictor(args: argparse.Namespace, meta, parts: dict, split) -> tuple[str, dict]:
    """The xlayer predictor file (trained like predict_puffin.md's unless given) and how it was made."""
    from moert.predict.io import load_predictor, save_predictor
    from moert.predict.train import TrainConfig
    from moert.predict.xlayer import train_xlayer

    if args.predictor:
        path = Path(args.predictor)
        recorded = load_predictor(path).meta.train.get("split")
        if not recorded or sorted(recorded.get("test", [])) != sorted(split.test):
            raise ValueError(
                f"{path} records {'another' if recorded else 'no'} train/val/test split (this bench holds out "
                f"seed {args.seed}'s); leave out --predictor to train one here"
            )
        return str(path), {"source": str(path), "trained_here": False}
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=1024,
        lr=1e-3,
        patience=2,
        seed=args.seed,
        threads=args.threads,
        progress=False,
        device="cpu",
    )  # fmt: skip  (bench/bench_predict.py's xlayer stage)
    info = {"trace": meta.source, "seed": args.seed, "split": split.to_json()}
    t0 = time.perf_counter()
    pred, hist = train_xlayer(meta, parts["train"], parts["val"], dim=128, cfg=cfg, train_info=info)
    train_s = time.perf_counter() - t0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = save_predictor(work / "xlayer.safetensors", pred.meta, *pred.state())
    print(f"trained xlayer in {train_s:.0f} s -> {path}", file=sys.stderr)
    return str(path), {"trained_here": True, "train_s": train_s, "epochs": args.epochs, "history": hist}


def model_files(path: str | None, made: dict, evictor: str | None) -> dict:
    """The provenance of the xlayer predictor (``_predictor``'s path and record, without its curve) and
    of the reuse model (policy learned: its file and sha256) a run read; None for one it did not."""
    xlayer = {"kind": "xlayer", "file": path, **{k: v for k, v in made.items() if k != "history"}}
    reuse = (
        {"file": evictor, "sha256": hashlib.sha256(Path(evictor).read_bytes()).hexdigest()}
        if evictor
        else None
    )
    return {"predictor": xlayer if path else None, "evictor": reuse}


def score(args: argparse.Namespace) -> int:
    from moert.policy.predictor import SequenceListTrace, policy_from_spec
    from moert.predict.data import open_sequences, split_sequences
    from moert.predict.evaluate import select_sequences
    from moert.sim import SimConfig, parse_policies, simulate

    args.seed = 0
    env = {**environment(), "modified_tracked_files": modified_files()}  # what runs: taken before the run
    src = envs.shared_dir() / "data" / "traces" / "deepseek-v2-lite-chat-puffin"
    meta, seqs = open_sequences(str(src))
    split = split_sequences([s.seq_id for s in seqs], 0.1, 0.1, seed=args.seed)
    parts = {name: select_sequences(seqs, getattr(split, name)) for name in ("train", "val", "test")}
    path, made = _predictor(args, meta, parts, split)
    test = parts["test"][: args.max_prompts] if args.max_prompts else parts["test"]
    args.capacity = args.capacity or "0.125,0.25,0.5"
    trace = SequenceListTrace(meta, test, path="puffin-test")
    ms = [int(x) for x in args.m.split(",")]
    caps = tuple(float(x) for x in args.capacity.split(","))
    names = ["lru", "belady"]
    for m in ms:
        names += [f"{e}+xlayer:{m}" for e in ("lru", "lfu", "score")]
    results, seconds = [], {}
    for mode in ("per-layer", "global"):
        pre = {f"xlayer:{m}": policy_from_spec(f"{path}:{m}", meta) for m in ms}
        for name, hook in pre.items():
            hook.name = name
        config = SimConfig(capacities=caps, policies=tuple(parse_policies(names, prefetchers=pre)), mode=mode)
        t0 = time.perf_counter()
        report = simulate(trace, config, prefetchers=pre, progress=True)
        seconds[mode] = time.perf_counter() - t0
        results += report["results"]
        print(f"{mode}: {seconds[mode]:.0f} s", file=sys.stderr)
    out = {
        "what": "policy score vs lru/lfu/belady, DeepSeek-V2-Lite-Chat puffin, held-out prompts",
        "trace": {
            "source": str(src),
            "model_type": meta.model_type,
            "layers": len(meta.layers),
            "experts": meta.num_experts,
            "top_k": meta.top_k,
            "split_seed": args.seed,
            "split": {
                n: {"prompts": len(v), "tokens": sum(s.num_tokens for s in v)} for n, v in parts.items()
            },
            "replayed": {"prompts": len(test), "tokens": sum(s.num_tokens for s in test)},
        },
        "predictor": {"kind": "xlayer", "file": path, **made},
        "prefetch": {"m": ms, "score_decay": 0.5, "probabilities": "sigmoid (wbce)"},
        "capacities": list(caps),
        "cost_model": report["config"]["cost_model"],
        "sim_seconds": seconds,
        "results": [{k: v for k, v in r.items() if k != "cache_stats"} for r in results],
        **env,
        "threads": args.threads,
        "command": " ".join(["python", *sys.argv]),
    }
    stem = Path(args.out) if args.out else RESULTS / "sim_score_puffin"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    stem.with_suffix(".md").write_text(_score_markdown(out, ms, caps))
    _score_plot(out, ms, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())
    return 0


def _score_markdown(out: dict, ms: list[int], caps: tuple[float, ...]) -> str:
    rows: dict[tuple[str, str], dict[float, dict]] = {}
    for r in out["results"]:
        rows.setdefault((r["mode"], r["policy"]), {})[r["capacity"]] = r
    lines = _score_header(out)
    for mode in ("per-layer", "global"):
        lines += _score_mode(out, rows, mode, ms, caps)
    lines += _score_notes(out)
    return "\n".join(lines)


def _score_header(out: dict) -> list[str]:
    """The title, the run's provenance, the trace and the predictor."""
    tr = out["trace"]
    return [
        "# Policy `score` in the simulator: DeepSeek-V2-Lite-Chat routing (puffin prompts)",
        "",
        f"{out['date']}, commit {out['commit']}, {out['device']}; torch {out['torch']}, numpy {out['numpy']}, "
        f"python {out['python']}. Produced by `{out['command']}` ({out['threads']} torch threads; simulation "
        + ", ".join(f"{k} {v:.0f} s" for k, v in out["sim_seconds"].items())
        + ")."
        + (f" Tracked files modified at run time (other streams' work in the shared checkout): "
           f"{', '.join(out['modified_tracked_files'])}." if out["modified_tracked_files"] else ""),
        "",
        f"Trace: {tr['model_type']}, {tr['layers']} MoE layers, E={tr['experts']}, k={tr['top_k']}; prompts split "
        f"by prompt (seed {tr['split_seed']}) as in `predict_puffin.md`; replayed: the "
        f"{tr['replayed']['prompts']} held-out prompts, {tr['replayed']['tokens']} tokens, token by token "
        "through the C++ `SlabCache.simulated` (caches carry over between prompts).",
        "Predictor: xlayer (the one of `predict_puffin.md`: dim 128, wbce, "
        + (f"{out['predictor']['epochs']} epochs, trained here in {out['predictor']['train_s']:.0f} s"
           if out["predictor"].get("trained_here") else f"file {out['predictor']['source']}")
        + "); probabilities = sigmoid(logits). The puffin traces have no pre-attention rows, so the runtime's "
        "own preattn predictor cannot be trained on them; the prediction is made by the runtime's hook "
        "(`moert.engine.prefetch.Prefetcher.on_logits`) from xlayer's logits.",
        "",
    ]  # fmt: skip


def _score_mode(out: dict, rows: dict, mode: str, ms: list[int], caps: tuple[float, ...]) -> list[str]:
    """One cache mode's table (hit rate, loads/token, tok/s per capacity) and score-vs-lru lines."""
    lines: list[str] = []
    what = "one cache per layer, capacity x E slots each" if mode == "per-layer" else (
        "one cache for all layers, capacity x L x E slots")  # fmt: skip
    slots = {c: r["slots_per_cache"] for (md, _), by in rows.items() if md == mode for c, r in by.items()}
    lines += [
        f"## {mode} ({what})",
        "",
        "| policy | " + " | ".join(f"hit rate @{c:g} ({slots[c]} slots)" for c in caps)
        + " | " + " | ".join(f"loads/token @{c:g}" for c in caps)
        + " | " + " | ".join(f"tok/s @{c:g}" for c in caps) + " |",
        "|---|" + "---:|" * (3 * len(caps)),
    ]  # fmt: skip
    order = ["lru", "belady"] + [f"{e}+xlayer:{m}" for m in ms for e in ("lru", "lfu", "score")]
    for name in order:
        by = rows.get((mode, name))
        if not by:
            continue
        hit = [f"{by[c]['hit_rate']:.2%}" for c in caps]
        loads = [
            f"{by[c]['bytes_loaded'] / by[c]['tokens'] / out['cost_model']['expert_bytes']:.1f}" for c in caps
        ]
        tok = [f"{by[c]['predicted_tok_s']:.1f}" for c in caps]
        label = f"**{name}**" if name.startswith("score") else name
        lines.append("| " + " | ".join([label, *hit, *loads, *tok]) + " |")
    lines.append("")
    for m in ms:
        sc, lr = rows.get((mode, f"score+xlayer:{m}")), rows.get((mode, f"lru+xlayer:{m}"))
        if sc and lr:
            dh = ", ".join(f"{100 * (sc[c]['hit_rate'] - lr[c]['hit_rate']):+.2f}" for c in caps)
            dl = ", ".join(f"{100 * (sc[c]['bytes_loaded'] / lr[c]['bytes_loaded'] - 1):+.1f}%" for c in caps)
            lines.append(f"- m={m}, score vs lru (same prefetches), @{'/'.join(f'{c:g}' for c in caps)}: "
                         f"hit rate {dh} points; experts loaded {dl}.")  # fmt: skip
    lines.append("")
    return lines


def _score_notes(out: dict) -> list[str]:
    """What the policies and columns mean; the cost model's constants."""
    return [
        "`lru`: demand only. `belady`: optimal eviction with demand loads only (the bound for every "
        "demand-only policy, not for prefetching ones). `E+xlayer:m`: before each layer's access the "
        "runtime's hook prefetches xlayer's top-(6+m); lru/lfu/score then differ only in eviction (the same "
        "prefetch requests; what is loaded differs only when a prefetch finds the id already resident). "
        "`score`: the prefetched ids' probabilities, 0 for the other experts of that layer, the layer that "
        "just ran below every earlier one (-1, -2, ...), lowest evicted first, ties by recency. "
        "loads/token: experts copied per token (demand + prefetch; all 26 layers); tok/s: the cost "
        "model's predicted decode speed (expert {:.1f} MB, {:g} GB/s, {:g} ms compute per layer; prefetch hides "
        "behind compute, demand loads stall).".format(
            out["cost_model"]["expert_bytes"] / 1e6,
            out["cost_model"]["bandwidth_gbs"],
            out["cost_model"]["layer_compute_ms"],
        ),
        "",
        "Plot: `sim_score_puffin.png` (hit rate and experts loaded per token vs capacity, both cache modes).",
        "",
    ]


def _score_plot(out: dict, ms: list[int], path: Path) -> None:
    """Hit rate (top) and experts loaded per token (bottom) vs capacity, per-layer and global."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="col")
    m = 2 if 2 in ms else ms[0]
    names = ["lru", "belady", f"lru+xlayer:{m}", f"lfu+xlayer:{m}", f"score+xlayer:{m}"]
    expert = out["cost_model"]["expert_bytes"]
    for col, mode in enumerate(("per-layer", "global")):
        for name in names:
            rs = sorted(
                (r for r in out["results"] if r["mode"] == mode and r["policy"] == name),
                key=lambda r: r["capacity"],
            )
            if not rs:
                continue
            caps = [r["capacity"] for r in rs]
            width = 2.5 if name.startswith("score") else 1.5
            axes[0, col].plot(caps, [r["hit_rate"] for r in rs], marker="o", label=name, linewidth=width)
            loads = [r["bytes_loaded"] / r["tokens"] / expert for r in rs]
            axes[1, col].plot(caps, loads, marker="o", label=name, linewidth=width)
        axes[0, col].set_title(f"{mode} cache")
        axes[0, col].set_ylim(0, 1)
        axes[1, col].set_ylim(bottom=0)
        axes[1, col].set_xlabel(
            "capacity (fraction of " + ("one layer's" if mode == "per-layer" else "all") + " experts)"
        )
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("hit rate")
    axes[1, 0].set_ylabel("experts loaded per token")
    axes[0, 1].legend(loc="lower right")
    fig.suptitle(
        f"DeepSeek-V2-Lite-Chat puffin, {out['trace']['replayed']['prompts']} held-out prompts, xlayer m={m}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
