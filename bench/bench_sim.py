"""Simulator benchmarks: replay speed, and policy ``score`` against lru/lfu/belady on the real traces.

``speed`` (default): expert accesses per second through the C++ replay loop (``SlabCache.simulated``).
Two measurements, each repeated; median and p20/p80 reported:
- ``replay``: one ``SlabCache.replay`` call over the whole token-major stream (one global cache);
- ``simulate``: :func:`moert.sim.simulate` end to end (per-layer caches, chunked, trace streaming).
The stream is the shared DeepSeek-V2-Lite trace when present (converted once to the moert format
in a temporary directory), else a synthetic Zipf stream of the same shape. Writes
``bench/results/sim_speed.json`` with versions, commit and date.

``score``: the runtime's eviction policy ``score`` on the DeepSeek-V2-Lite-Chat puffin traces, next
to lru, lfu (the same prefetches) and belady, per-layer and global, on the held-out prompts. The
predictor is the xlayer of ``bench/results/predict_puffin.md`` (same split, seed, dims and
training: ``--epochs 5``), trained here unless ``--predictor`` names one that records that split.
Writes ``bench/results/sim_score_puffin.{json,md,png}``.

``hetero``: the heterogeneous cost model (CPU experts, DESIGN.md §7) on the puffin traces: lru, lfu and
belady per-layer at 0.1/0.25/0.5 on every prompt, predicted tok/s copy only and with CPU experts at the
calibrated ``--cpu-expert-ms`` (by default read from ``bench/results/cpu_expert_<host>.json``, made by
``bench/bench_cpu_expert.py``), with a sensitivity sweep over the CPU time (free: the misses per step
are replayed once) and an exact check of the model's one optimistic assumption: lru and lfu replayed
again step by step with the CPU-computed experts *not* entering the cache. Writes
``bench/results/sim_heterogeneous_puffin.{json,md,png}``.

``speculative``: speculative decoding's verify passes (``SimConfig.verify_tokens`` N = gamma + 1,
DESIGN.md §7, MoE-SpAc) on the puffin traces: lru, lfu, utility, utility+utility:2, lru+utility:2 and
belady at N = 1, 3, 5, per-layer caches at 0.1/0.25/0.5 on every prompt and one global cache on the
first ``--global-prompts`` prompts; hit rate per layer call, token hit rate, loads per generated token,
predicted tok/s (a verify pass costs one token's compute; draft model free, every draft accepted).
Writes ``bench/results/sim_speculative_puffin.{json,md,png}``.

Usage::

    python bench/bench_sim.py [--repeats 5] [--out bench/results/sim_speed.json]
    python bench/bench_sim.py --what score [--predictor xlayer.safetensors] [--m 0,2,4]
    python bench/bench_sim.py --what hetero [--cpu-expert-ms 0.6] [--max-prompts N]
    python bench/bench_sim.py --what speculative [--verify-tokens 1,3,5] [--max-prompts N] [--global-prompts 250]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moert import envs
from moert.cli.simulate import environment
from moert.engine import runtime
from moert.provenance import modified_files
from moert.sim import SimConfig, parse_policies, simulate
from moert.trace import InMemoryTrace, SequenceTrace, TraceMeta, TraceWriter, open_trace


def load_stream() -> tuple[InMemoryTrace | object, str]:
    src = envs.shared_dir() / "data" / "traces" / "deepseek-v2-lite-chat-puffin"
    if src.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix="moert_bench_sim_"))
        trace = open_trace(src)
        with TraceWriter(tmp / "t", trace.meta) as w:
            for s in trace.sequences():
                w.add(s)
        return open_trace(tmp / "t"), f"shared trace {src.name} (converted)"
    rng = np.random.default_rng(0)
    L, E, k, T = 26, 64, 6, 96
    p = 1.0 / np.arange(1, E + 1)
    seqs = []
    for i in range(1000):
        ex = np.stack([[rng.choice(E, k, replace=False, p=p / p.sum()) for _ in range(T)] for _ in range(L)])
        seqs.append(SequenceTrace(i, torch.arange(T), torch.from_numpy(ex), torch.ones(T, dtype=torch.bool)))
    return InMemoryTrace(TraceMeta("synthetic", tuple(range(L)), E, k), seqs), "synthetic zipf stream"


def percentiles(xs: list[float]) -> dict:
    return {
        "median": float(np.median(xs)),
        "p20": float(np.percentile(xs, 20)),
        "p80": float(np.percentile(xs, 80)),
    }


RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--what", default="speed", choices=["speed", "score", "hetero", "speculative"])
    parser.add_argument("--repeats", type=int, default=5, help="speed: repeats")
    parser.add_argument("--out", default=None, help="speed: JSON path; score: path stem (.json/.md/.png)")
    parser.add_argument("--predictor", default=None, help="score: an xlayer file recording the split")
    parser.add_argument(
        "--work", default="/tmp/moert-bench-sim-score", help="score: where the predictor goes"
    )
    parser.add_argument("--epochs", type=int, default=5, help="score: xlayer training epochs")
    parser.add_argument("--m", default="0,2,4", help="score: over-provisions m to compare")
    parser.add_argument(
        "--capacity",
        default=None,
        help="score/hetero: cache fractions (default 0.125,0.25,0.5 / 0.1,0.25,0.5)",
    )
    parser.add_argument(
        "--max-prompts",
        type=int,
        default=0,
        help="score: at most N held-out prompts; hetero: the first N prompts",
    )
    parser.add_argument(
        "--cpu-expert-ms",
        type=float,
        default=None,
        help="hetero: CPU ms per expert (default: --calibration's)",
    )
    parser.add_argument(
        "--calibration", default=None, help="hetero: a bench_cpu_expert.py JSON (default: this host's)"
    )
    parser.add_argument("--activation-us", type=float, default=20.0, help="hetero: activation round trip")
    parser.add_argument(
        "--exact-policies", default="lru,lfu", help="hetero: policies replayed with CPU experts not cached"
    )
    parser.add_argument("--verify-tokens", default="1,3,5", help="speculative: N = gamma + 1 values")
    parser.add_argument("--utility-decay", type=float, default=0.7, help="speculative: utility's decay")
    parser.add_argument(
        "--global-prompts",
        type=int,
        default=250,
        help="speculative: prompts of the global-cache run (0: none)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "hetero":
        return hetero(args)
    if args.what == "speculative":
        return speculative(args)
    return score(args) if args.what == "score" else speed(args)


def speed(args: argparse.Namespace) -> int:
    args.out = args.out or str(RESULTS / "sim_speed.json")
    trace, what = load_stream()
    meta = trace.meta
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    experts = np.concatenate([s.experts.numpy() for s in trace.sequences()], axis=1).astype(
        np.int32
    )  # [L, N, k]
    N = experts.shape[1]
    steps = np.ascontiguousarray(experts.transpose(1, 0, 2)).reshape(N * L, k)  # token-major
    layers = np.tile(np.arange(L, dtype=np.int32), N)
    accesses = steps.size

    rows = {}
    for policy in ("lru", "lfu"):
        rates = []
        for _ in range(args.repeats + 1):  # the first run warms up
            cache = runtime.SlabCache.simulated(L, E, int(0.25 * L * E), policy=policy, min_slots=k)
            t0 = time.perf_counter()
            cache.replay(layers, steps)
            rates.append(accesses / (time.perf_counter() - t0))
            cache.close()
        rows[f"replay-global-{policy}"] = {"accesses": accesses, "accesses_per_s": percentiles(rates[1:])}

    config = SimConfig(capacities=(0.25,), policies=tuple(parse_policies(["lru"])), mode="per-layer")
    rates = []
    for _ in range(max(1, args.repeats // 2) + 1):
        t0 = time.perf_counter()
        simulate(trace, config)
        rates.append(accesses / (time.perf_counter() - t0))
    rows["simulate-per-layer-lru-end-to-end"] = {
        "accesses": accesses,
        "accesses_per_s": percentiles(rates[1:]),
    }

    result = {
        "stream": what,
        "tokens": N,
        "layers": L,
        "experts": E,
        "top_k": k,
        "results": rows,
        **environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, row in rows.items():
        r = row["accesses_per_s"]
        print(
            f"{name:40s} {r['median'] / 1e6:7.2f} M accesses/s (p20 {r['p20'] / 1e6:.2f}, p80 {r['p80'] / 1e6:.2f})"
        )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


# -- score: the runtime's score policy vs lru / lfu / belady on the puffin traces ------------------


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
    tr = out["trace"]
    lines = [
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
    for mode in ("per-layer", "global"):
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
                f"{by[c]['bytes_loaded'] / by[c]['tokens'] / out['cost_model']['expert_bytes']:.1f}"
                for c in caps
            ]
            tok = [f"{by[c]['predicted_tok_s']:.1f}" for c in caps]
            label = f"**{name}**" if name.startswith("score") else name
            lines.append("| " + " | ".join([label, *hit, *loads, *tok]) + " |")
        lines.append("")
        for m in ms:
            sc, lr = rows.get((mode, f"score+xlayer:{m}")), rows.get((mode, f"lru+xlayer:{m}"))
            if sc and lr:
                dh = ", ".join(f"{100 * (sc[c]['hit_rate'] - lr[c]['hit_rate']):+.2f}" for c in caps)
                dl = ", ".join(
                    f"{100 * (sc[c]['bytes_loaded'] / lr[c]['bytes_loaded'] - 1):+.1f}%" for c in caps
                )
                lines.append(f"- m={m}, score vs lru (same prefetches), @{'/'.join(f'{c:g}' for c in caps)}: "
                             f"hit rate {dh} points; experts loaded {dl}.")  # fmt: skip
        lines.append("")
    lines += [
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
    return "\n".join(lines)


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


# -- hetero: CPU experts in the cost model (DESIGN.md §7), on the puffin traces --------------------

HETERO_POLICIES = ("lru", "lfu", "belady")
#: multiples of the calibrated CPU time in the sensitivity sweep (x2, x4: contention with the copy
#: engine's reads of host memory, or a slower host)
SENSITIVITY = (0.5, 1.0, 2.0, 4.0)


def _cpu_calibration(args: argparse.Namespace) -> tuple[float, dict]:
    """The CPU ms per expert: --cpu-expert-ms, else DeepSeek-V2-Lite's value in a bench_cpu_expert.py JSON."""
    if args.cpu_expert_ms is not None:
        if not args.cpu_expert_ms > 0:
            raise ValueError(
                f"--cpu-expert-ms {args.cpu_expert_ms} must be > 0 (ms of one expert on the CPU)"
            )
        return args.cpu_expert_ms, {"source": "--cpu-expert-ms"}
    import re
    import socket

    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()) or "host"
    path = Path(args.calibration) if args.calibration else RESULTS / f"cpu_expert_{host}.json"
    if not path.is_file():
        raise ValueError(
            f"no CPU calibration at {path}: run `python bench/bench_cpu_expert.py` first, or pass "
            "--cpu-expert-ms X / --calibration FILE"
        )
    cal = json.loads(path.read_text())
    row = next((c for c in cal.get("calibration", []) if c["model"] == "DeepSeek-V2-Lite"), None)
    if row is None:
        raise ValueError(f"{path} has no DeepSeek-V2-Lite calibration row; rerun bench/bench_cpu_expert.py")
    return float(row["cpu_expert_ms"]), {
        "source": str(
            path.relative_to(RESULTS.parent.parent) if path.is_relative_to(RESULTS.parent.parent) else path
        ),
        "threads": row["threads"],
        "device": cal["device"],
        "commit": cal["commit"],
        "date": cal["date"],
    }


def exact_uncached(seqs: list, meta, policy: str, capacity: float, cost) -> dict:
    """Per-layer caches replayed step by step with the CPU path deciding at every step, CPU experts not cached.

    At each (token, layer) step the hits are found with ``lookup``; of the ``n`` misses, ``c`` (from
    :func:`moert.sim.cpu_split`) are computed on the CPU and never enter the cache (the last ``c`` in
    routing order: the traces' order carries no meaning), the other ``n - c`` and the hits are accessed
    (``sim_access``: the copies). This is what the cost model does not simulate (it keeps the cache of
    the copy-only replay); the difference measures that assumption.

    Returns:
        ``{"hits", "accesses", "misses_per_step", "cpu_misses", "demand_loads", "tokens", "seconds"}``.
    """
    from moert.sim import cpu_split, num_slots

    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    slots = num_slots(capacity, meta, "per-layer")
    caches = [
        runtime.SlabCache.simulated(1, E, slots, policy=policy, slab_bytes=cost.expert_bytes, min_slots=k)
        for _ in range(L)
    ]
    c_of = cpu_split(np.arange(k + 1), cost.cpu_expert_ms * 1e-3, cost.copy_s, cost.activation_us * 1e-6)[0]
    c_of = c_of.tolist()
    hist = [0] * (k + 1)
    hits = on_cpu = tokens = 0
    t0 = time.perf_counter()
    try:
        for seq in seqs:
            ex = seq.experts.numpy()  # [L, T, k]
            if (np.sort(ex, -1)[..., 1:] == np.sort(ex, -1)[..., :-1]).any() or (ex < 0).any():
                raise ValueError(
                    f"sequence {seq.seq_id}: repeated or padded expert ids; this check needs sets"
                )
            rows = ex.transpose(1, 0, 2).tolist()  # [T][L][k], token-major
            tokens += len(rows)
            for token in rows:
                for layer, ids in enumerate(token):
                    cache = caches[layer]
                    hit, miss = [], []
                    for e in ids:
                        (hit if cache.lookup(0, e) >= 0 else miss).append(e)
                    n = len(miss)
                    c = c_of[n]
                    hist[n] += 1
                    on_cpu += c
                    hits += len(hit)
                    access = hit + miss[: n - c]
                    if access and cache.sim_access(0, access) != len(hit):
                        raise RuntimeError(f"{policy} @{capacity}: lookup and sim_access disagree on hits")
        demand = sum(c.stats()["demand_loads"] for c in caches)
    finally:
        for cache in caches:
            cache.close()
    misses = sum(n * h for n, h in enumerate(hist))
    if demand != misses - on_cpu:
        raise RuntimeError(f"{policy} @{capacity}: {demand} demand loads, expected {misses} - {on_cpu}")
    return {
        "hits": hits,
        "accesses": tokens * L * k,
        "misses_per_step": hist,
        "cpu_misses": on_cpu,
        "demand_loads": demand,
        "tokens": tokens,
        "seconds": time.perf_counter() - t0,
    }


def hetero(args: argparse.Namespace) -> int:
    from moert.cli.simulate import plot
    from moert.policy.predictor import SequenceListTrace
    from moert.predict.data import open_sequences
    from moert.sim import CostModel

    env = {**environment(), "modified_tracked_files": modified_files()}  # what runs: taken before the run
    cpu_ms, calibration = _cpu_calibration(args)
    cost = CostModel(cpu_expert_ms=cpu_ms, activation_us=args.activation_us)
    caps = tuple(float(x) for x in (args.capacity or "0.1,0.25,0.5").split(","))
    src = envs.shared_dir() / "data" / "traces" / "deepseek-v2-lite-chat-puffin"
    t0 = time.perf_counter()
    meta, seqs = open_sequences(str(src), max_sequences=args.max_prompts or None)
    load_s = time.perf_counter() - t0
    trace = SequenceListTrace(meta, seqs, path=str(src))
    config = SimConfig(capacities=caps, policies=tuple(parse_policies(HETERO_POLICIES)), cost=cost)
    t0 = time.perf_counter()
    report = simulate(trace, config, progress=True)
    sim_s = time.perf_counter() - t0
    print(f"simulate: {sim_s:.0f} s", file=sys.stderr)

    L = meta.num_layers
    sensitivity = []
    for r in report["results"]:
        prefetch_bpt = r["cache_stats"].get("prefetch_loads", 0) * cost.expert_bytes / r["tokens"]
        for f in SENSITIVITY:
            other = dataclasses.replace(cost, cpu_expert_ms=cpu_ms * f)
            pred = other.predict_heterogeneous(r["demand_misses_per_step"], r["tokens"], prefetch_bpt, L)
            sensitivity.append(
                {"policy": r["policy"], "capacity": r["capacity"], "cpu_expert_ms": cpu_ms * f, **pred}
            )

    exact = []
    for policy in [p for p in args.exact_policies.split(",") if p]:
        for c in caps:
            got = exact_uncached(seqs, meta, policy, c, cost)
            pred = cost.predict_heterogeneous(got["misses_per_step"], got["tokens"], 0.0, L)
            exact.append(
                {"policy": policy, "capacity": c, **got, "hit_rate": got["hits"] / got["accesses"], **pred}
            )
            print(f"exact {policy} @{c}: {got['seconds']:.0f} s", file=sys.stderr)

    out = {
        "what": "heterogeneous cost model (CPU experts), DeepSeek-V2-Lite-Chat puffin, per-layer caches",
        "trace": {
            "source": str(src),
            "model_type": meta.model_type,
            "layers": L,
            "experts": meta.num_experts,
            "top_k": meta.top_k,
            "prompts": len(seqs),
            "tokens": sum(s.num_tokens for s in seqs),
            "subsampled": bool(args.max_prompts),
        },
        "capacities": list(caps),
        "cost_model": report["config"]["cost_model"],
        "cpu_calibration": calibration,
        "seconds": {"load": load_s, "simulate": sim_s, "exact": sum(e["seconds"] for e in exact)},
        "results": [{k: v for k, v in r.items() if k != "cache_stats"} for r in report["results"]],
        "sensitivity": sensitivity,
        "exact_uncached": exact,
        **env,
        "threads": args.threads,
        "command": " ".join(["python", *sys.argv]),
    }
    stem = Path(args.out) if args.out else RESULTS / "sim_heterogeneous_puffin"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    stem.with_suffix(".md").write_text(_hetero_markdown(out))
    plot({**report, "results": report["results"]}, str(stem.with_suffix(".png")))
    print(stem.with_suffix(".md").read_text())
    return 0


def _hetero_reading(out: dict, rows: dict, copy_ms: float) -> list[str]:
    """Reading notes computed from the rows: the speed-up range, and how optimistic the cache assumption is."""
    cpu_ms = out["cost_model"]["cpu_expert_ms"]
    gains = [r["cpu_predicted_tok_s"] / r["predicted_tok_s"] for r in rows.values()]
    shares = [r["cpu_miss_share"] for r in rows.values()]
    slowest = max(s["cpu_expert_ms"] for s in out["sensitivity"])
    slow_gains = [
        s["cpu_predicted_tok_s"] / rows[s["policy"], s["capacity"]]["predicted_tok_s"]
        for s in out["sensitivity"]
        if s["cpu_expert_ms"] == slowest
    ]
    lines = [
        f"- At the calibrated {cpu_ms:.2f} ms per expert (one copy: {copy_ms:.2f} ms) the CPU path raises the "
        f"predicted decode speed {min(gains):.2f}-{max(gains):.2f}x and takes {min(shares):.0%}-{max(shares):.0%} "
        "of the demand misses. With the CPU about as fast as a copy, at most about half of a step's misses go "
        "to the CPU (none at a step with a single miss when one CPU expert plus the round trip is slower than "
        "one copy). The gain is largest where steps have many misses (small caches, weak policies).",
        f"- This VM's two threads read an expert from DRAM at about the assumed PCIe bandwidth. A copy engine "
        "reading the same host memory at the same time (not modelled) would slow the CPU: at "
        f"{slowest:.2f} ms per expert the gain falls to {min(slow_gains):.2f}-{max(slow_gains):.2f}x "
        "(sensitivity table).",
    ]
    ex = out["exact_uncached"]
    if ex:
        d_hit = [100 * (rows[e["policy"], e["capacity"]]["hit_rate"] - e["hit_rate"]) for e in ex]
        d_tok = [
            100 * (1 - e["cpu_predicted_tok_s"] / rows[e["policy"], e["capacity"]]["cpu_predicted_tok_s"])
            for e in ex
        ]
        lines.append(
            f"- Not caching the CPU-computed experts costs {min(d_hit):.1f}-{max(d_hit):.1f} hit-rate points "
            f"and {min(d_tok):.1f}-{max(d_tok):.1f}% of the predicted tok/s +CPU ({', '.join(sorted({e['policy'] for e in ex}))}): "
            "the cost model's heterogeneous figures are that optimistic for a runtime that never caches them "
            "(one that also copies them in the background would keep the hits but pay the bytes)."
        )  # fmt: skip
    return lines


def _hetero_markdown(out: dict) -> str:
    caps, cost, tr = out["capacities"], out["cost_model"], out["trace"]
    rows = {(r["policy"], r["capacity"]): r for r in out["results"]}
    cal = out["cpu_calibration"]
    copy_ms = cost["expert_bytes"] / (cost["bandwidth_gbs"] * 1e9) * 1e3
    lines = [
        "# Heterogeneous mode in the simulator: CPU experts on DeepSeek-V2-Lite-Chat routing (puffin prompts)",
        "",
        f"{out['date']}, commit {out['commit']}, {out['device']}; torch {out['torch']}, numpy {out['numpy']}, "
        f"python {out['python']}. Produced by `{out['command']}` (simulation {out['seconds']['simulate']:.0f} s, "
        f"exact check {out['seconds']['exact']:.0f} s, trace load {out['seconds']['load']:.0f} s)."
        + (f" Tracked files modified at run time (other streams' work in the shared checkout): "
           f"{', '.join(out['modified_tracked_files'])}." if out["modified_tracked_files"] else ""),
        "",
        f"Trace: {tr['model_type']}, {tr['layers']} MoE layers, E={tr['experts']}, k={tr['top_k']}; "
        + (f"the first {tr['prompts']} prompts (subsampled)" if tr["subsampled"] else f"every prompt ({tr['prompts']})")
        + f", {tr['tokens']} tokens, token by token through the C++ `SlabCache.simulated`, one cache per "
        "MoE layer (capacity x 64 slots; caches carry over between prompts). Demand only (no prefetcher).",
        "",
        f"Cost model: expert {cost['expert_bytes'] / 1e6:.1f} MB (bf16), {cost['bandwidth_gbs']:g} GB/s "
        f"(one copy {copy_ms:.2f} ms), {cost['layer_compute_ms']:g} ms GPU compute per MoE layer; "
        f"**CPU expert {cost['cpu_expert_ms']:g} ms** (measured: "
        + (f"`{cal['source']}`, DeepSeek-V2-Lite bf16, one row, cold weights, {cal['threads']} threads, "
           f"{cal['device']}, {cal['date']}" if "device" in cal else cal["source"])
        + f"), activation round trip {cost['activation_us']:g} µs (assumed). At each (token, layer) step with n "
        "demand misses, c go to the CPU and n - c are copied, c minimising max(c * t_cpu + t_act, (n - c) * "
        "t_copy); t_token = max(L * t_layer, prefetch / BW) + the steps' stalls (`moert.sim.CostModel`).",
        "",
        "| policy | " + " | ".join(f"hit rate @{c:g}" for c in caps)
        + " | " + " | ".join(f"tok/s copy @{c:g}" for c in caps)
        + " | " + " | ".join(f"tok/s +CPU @{c:g}" for c in caps)
        + " | " + " | ".join(f"misses on CPU @{c:g}" for c in caps)
        + " | " + " | ".join(f"MB/token saved @{c:g}" for c in caps) + " |",
        "|---|" + "---:|" * (5 * len(caps)),
    ]  # fmt: skip
    for p in HETERO_POLICIES:
        rs = [rows[p, c] for c in caps]
        lines.append(
            "| " + " | ".join(
                [p]
                + [f"{r['hit_rate']:.1%}" for r in rs]
                + [f"{r['predicted_tok_s']:.1f}" for r in rs]
                + [f"**{r['cpu_predicted_tok_s']:.1f}** ({r['cpu_predicted_tok_s'] / r['predicted_tok_s']:.2f}x)" for r in rs]
                + [f"{r['cpu_miss_share']:.1%}" for r in rs]
                + [f"{r['cpu_bytes_saved_per_token'] / 1e6:.0f}" for r in rs]
            ) + " |"
        )  # fmt: skip
    lines += ["", "## Sensitivity to the CPU time (same replay, tok/s +CPU and misses on the CPU)", ""]
    factors = sorted({s["cpu_expert_ms"] for s in out["sensitivity"]})
    sens = {(s["policy"], s["capacity"], s["cpu_expert_ms"]): s for s in out["sensitivity"]}
    lines += [
        "| policy @capacity | copy only | " + " | ".join(f"CPU {f:.2f} ms" for f in factors) + " |",
        "|---|---:|" + "---:|" * len(factors),
    ]
    for p in HETERO_POLICIES:
        for c in caps:
            cells = [
                f"{sens[p, c, f]['cpu_predicted_tok_s']:.1f} ({sens[p, c, f]['cpu_miss_share']:.0%})"
                for f in factors
            ]
            lines.append(f"| {p} @{c:g} | {rows[p, c]['predicted_tok_s']:.1f} | " + " | ".join(cells) + " |")
    if out["exact_uncached"]:
        lines += [
            "",
            "## Check of the cache assumption: CPU experts not cached (exact, step by step)",
            "",
            "The cost model keeps the cache of the copy-only replay: a CPU-computed expert counts as loaded for "
            "later tokens although it was never copied. Below, the same policies replayed again with the CPU "
            "path deciding at every step and the CPU-computed experts *not* entering the cache (the hits and "
            "the copied misses are accessed; `lookup` + `sim_access` on the same C++ caches, calibrated CPU "
            "time).",
            "",
            "| policy @capacity | hit rate (cost model / exact) | tok/s +CPU (cost model / exact) | misses on CPU (cost model / exact) |",
            "|---|---:|---:|---:|",
        ]  # fmt: skip
        for e in out["exact_uncached"]:
            r = rows[e["policy"], e["capacity"]]
            lines.append(
                f"| {e['policy']} @{e['capacity']:g} | {r['hit_rate']:.1%} / {e['hit_rate']:.1%} | "
                f"{r['cpu_predicted_tok_s']:.1f} / {e['cpu_predicted_tok_s']:.1f} | "
                f"{r['cpu_miss_share']:.1%} / {e['cpu_miss_share']:.1%} |"
            )
    lines += [
        "",
        "Notes:",
        *_hetero_reading(out, rows, copy_ms),
        "- tok/s copy = the copy-only prediction (as in `sim_deepseek_v2_lite_puffin.md`); tok/s +CPU = with "
        "CPU experts; misses on CPU = share of demand misses computed on the CPU; MB/token saved = demand "
        "bytes per token kept off PCIe.",
        "- The CPU time comes from a 2-core shared VM (`bench/results/cpu_expert_*.md`); calibrate on your "
        "host with `python bench/bench_cpu_expert.py` and pass `moert simulate --cpu-expert-ms X`.",
        "- Left out (see `moert.sim.CostModel`): contention between the CPU's reads of the host pool and the "
        "copy engine's DMA reads of the same memory (the x2 / x4 columns of the sensitivity table stand in "
        "for it), the GPU compute saved when an expert runs on the CPU, and batching several tokens' rows "
        "of one expert on the CPU.",
        "",
        "Plot: `sim_heterogeneous_puffin.png` (hit rate; tok/s copy only and with CPU experts).",
        "",
    ]
    return "\n".join(lines)


SPEC_POLICIES = ("lru", "lfu", "utility", "utility+utility:2", "lru+utility:2", "belady")
SPEC_KEYS = (
    "policy",
    "capacity",
    "mode",
    "verify_tokens",
    "slots_per_cache",
    "tokens",
    "passes",
    "accesses",
    "hits",
    "hit_rate",
    "token_hit_rate",
    "demand_misses",
    "prefetches",
    "prefetch_hits",
    "prefetch_wasted",
    "loads_per_token",
    "demand_loads_per_token",
    "bytes_per_token",
    "predicted_tok_s",
    "ceiling_tok_s",
    "resident_tok_s",
    "replay_seconds",
)


def speculative(args: argparse.Namespace) -> int:
    from moert.policy.predictor import SequenceListTrace
    from moert.predict.data import open_sequences

    env = {**environment(), "modified_tracked_files": modified_files()}  # what runs: taken before the run
    caps = tuple(float(x) for x in (args.capacity or "0.1,0.25,0.5").split(","))
    ns = [int(x) for x in args.verify_tokens.split(",")]
    src = envs.shared_dir() / "data" / "traces" / "deepseek-v2-lite-chat-puffin"
    t0 = time.perf_counter()
    meta, seqs = open_sequences(str(src), max_sequences=args.max_prompts or None)
    load_s = time.perf_counter() - t0
    runs = [("per-layer", seqs)]
    if args.global_prompts:
        runs.append(("global", seqs[: args.global_prompts]))
    rows, seconds = [], {}
    for mode, part in runs:
        trace = SequenceListTrace(meta, part, path=str(src))
        for n in ns:
            config = SimConfig(
                capacities=caps,
                policies=tuple(parse_policies(SPEC_POLICIES)),
                mode=mode,
                verify_tokens=n,
                utility_decay=args.utility_decay,
            )
            t0 = time.perf_counter()
            report = simulate(trace, config)
            seconds[f"{mode} N={n}"] = time.perf_counter() - t0
            print(f"{mode} N={n}: {seconds[f'{mode} N={n}']:.0f} s", file=sys.stderr)
            rows += [{k: r[k] for k in SPEC_KEYS} for r in report["results"]]
    out = {
        "what": "speculative verify passes (N = gamma + 1), DeepSeek-V2-Lite-Chat puffin",
        "trace": {
            "source": str(src),
            "model_type": meta.model_type,
            "layers": meta.num_layers,
            "experts": meta.num_experts,
            "top_k": meta.top_k,
            "prompts": len(seqs),
            "tokens": sum(s.num_tokens for s in seqs),
            "global_prompts": len(runs[1][1]) if len(runs) > 1 else 0,
            "global_tokens": sum(s.num_tokens for s in runs[1][1]) if len(runs) > 1 else 0,
            "subsampled": bool(args.max_prompts),
        },
        "capacities": list(caps),
        "verify_tokens": ns,
        "utility_decay": args.utility_decay,
        "cost_model": report["config"]["cost_model"],
        "assumptions": [
            "every drafted token is accepted: the trace is the accepted sequence; no rejected draft's experts",
            "the draft model is not simulated (its time, memory and PCIe use are zero)",
            "one verify pass of N <= 5 tokens costs one token's layer compute (memory-bound decode at batch 1)",
            "a union larger than a per-layer cache streams in waves of the cache's slots, resident first",
        ],
        "seconds": {"load": load_s, **seconds},
        "results": rows,
        **env,
        "threads": args.threads,
        "command": " ".join(["python", *sys.argv]),
    }
    stem = Path(args.out) if args.out else RESULTS / "sim_speculative_puffin"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    stem.with_suffix(".md").write_text(_speculative_markdown(out))
    _speculative_plot(out, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())
    return 0


def _speculative_table(out: dict, mode: str) -> list[str]:
    caps, ns = out["capacities"], out["verify_tokens"]
    by = {(r["policy"], r["capacity"], r["verify_tokens"]): r for r in out["results"] if r["mode"] == mode}
    policies = list(dict.fromkeys(r["policy"] for r in out["results"] if r["mode"] == mode))
    lines = []
    for what, key, fmt in (
        ("token hit rate (1 - demand misses / (tokens * k))", "token_hit_rate", ".3f"),
        ("hit rate per layer call (distinct experts of the pass)", "hit_rate", ".3f"),
        ("expert loads per generated token (demand + prefetch)", "loads_per_token", ".2f"),
        ("predicted tok/s", "predicted_tok_s", ".1f"),
    ):
        head = ["policy"] + [f"N={n} @{c:g}" for c in caps for n in ns]
        lines += [f"**{what}**", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for p in policies:
            cells = [format(by[(p, c, n)][key], fmt) if (p, c, n) in by else "" for c in caps for n in ns]
            lines.append("| " + " | ".join([p, *cells]) + " |")
        lines.append("")
    return lines


def _speculative_markdown(out: dict) -> str:
    tr, cost = out["trace"], out["cost_model"]
    slots = {r["capacity"]: r["slots_per_cache"] for r in out["results"] if r["mode"] == "per-layer"}
    lines = [
        "# Speculative decoding as a lookahead sensor: verify passes in the simulator (MoE-SpAc)",
        "",
        f"Trace: {tr['model_type']} puffin, {tr['prompts']} prompts, {tr['tokens']} tokens, L={tr['layers']}, "
        f"E={tr['experts']}, k={tr['top_k']}{' (subsampled)' if tr['subsampled'] else ''}. N = gamma + 1 tokens "
        f"per verify pass; N = 1 is autoregressive decode. utility decay {out['utility_decay']:g}.",
        f"Cost model: expert {cost['expert_bytes'] / 1e6:.1f} MB, {cost['bandwidth_gbs']:g} GB/s, "
        f"{cost['layer_compute_ms']:g} ms per MoE layer; per generated token t = max(L * t_layer / N, "
        "prefetch bytes / BW) + demand bytes / BW.",
        "",
        "Assumptions: " + "; ".join(out["assumptions"]) + ". tok/s is therefore an upper bound on SD's speed "
        "(acceptance 100%, free draft); the hit rates and loads per token do not depend on the cost model.",
        "",
        "## Per-layer caches ("
        + ", ".join(f"{c:g} = {s} slots" for c, s in slots.items())
        + "), every prompt",
        "",
        *_speculative_table(out, "per-layer"),
    ]
    if tr["global_prompts"]:
        lines += [
            f"## One global cache (fraction of L * E), first {tr['global_prompts']} prompts "
            f"({tr['global_tokens']} tokens)",
            "",
            *_speculative_table(out, "global"),
        ]
    lines += [
        "## Reading",
        "",
        *_speculative_reading(out),
        "",
        f"Run: `{out['command']}`; {out['threads']} threads; seconds {json.dumps({k: round(v) for k, v in out['seconds'].items()})}.",
        "",
        f"device: {out['device']}; torch {out['torch']}, numpy {out['numpy']}, python {out['python']}; "
        f"commit {out['commit']}; {out['date']}"
        + (
            f"; modified: {', '.join(out['modified_tracked_files'])}" if out["modified_tracked_files"] else ""
        ),
        "",
    ]
    return "\n".join(lines)


def _speculative_reading(out: dict) -> list[str]:
    by = {
        (r["policy"], r["capacity"], r["verify_tokens"]): r
        for r in out["results"]
        if r["mode"] == "per-layer"
    }
    ns, caps = out["verify_tokens"], out["capacities"]
    lines = []
    for c in caps:
        parts = []
        for n in ns:
            lru, uti = by.get(("lru", c, n)), by.get(("utility", c, n))
            best = max(
                (r for (p, cc, nn), r in by.items() if cc == c and nn == n and p != "belady"),
                key=lambda r: r["token_hit_rate"],
            )
            parts.append(
                f"N={n}: lru {lru['token_hit_rate']:.3f}, utility {uti['token_hit_rate']:.3f}, best non-oracle "
                f"{best['policy']} {best['token_hit_rate']:.3f} ({best['loads_per_token']:.1f} loads/token)"
            )
        lines.append(f"- per-layer @{c:g} (token hit rate): " + "; ".join(parts) + ".")
    return lines


def _speculative_plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps, ns = out["capacities"], out["verify_tokens"]
    rows = [r for r in out["results"] if r["mode"] == "per-layer"]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(1, len(caps), figsize=(4.5 * len(caps), 4), squeeze=False)
    for ax, c in zip(axes[0], caps):
        for p in policies:
            ys = [
                next(
                    r["token_hit_rate"]
                    for r in rows
                    if r["policy"] == p and r["capacity"] == c and r["verify_tokens"] == n
                )
                for n in ns
            ]
            ax.plot(ns, ys, marker="o", label=p)
        ax.set_title(f"per-layer cache {c:g} of E")
        ax.set_xlabel("N = gamma + 1 tokens per verify pass")
        ax.set_ylabel("token hit rate")
        ax.set_xticks(ns)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
