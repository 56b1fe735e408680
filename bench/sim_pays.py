"""``bench_sim.py --what pays``: which policies pay in predicted tok/s over the cost grid (windowed model).

The held-out puffin prompts (split as ``bench/bench_predict.py``: by prompt, seed 0), per-layer and global
caches, every policy of ``--policies`` at every capacity, each row predicted at every (layer ms, GB/s)
of the grid by the windowed cost model (``moert.sim.CostModel``), the pooled one beside it. ``xlayer[:m]``
in a policy name is the xlayer predictor of ``sim_score.py`` (trained here unless ``--predictor`` names
one recording the split); any other prefetcher name goes to the registry (e.g. ``learned``, ``budget``
once registered). Writes ``bench/results/sim_pays_puffin.{json,md,png}`` (and ``_global.png``).
"""

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
DROP = ("cache_stats", "hit_rate_per_layer")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def pays(args: argparse.Namespace) -> int:
    from sim_score import _predictor, model_files

    from moert.policy.predictor import SequenceListTrace, policy_from_spec
    from moert.predict.data import open_sequences, split_sequences
    from moert.predict.evaluate import select_sequences
    from moert.sim import SimConfig, parse_policies, simulate

    args.seed = 0
    env = {**environment(), "modified_tracked_files": modified_files()}
    src = envs.shared_dir() / "data" / "traces" / "deepseek-v2-lite-chat-puffin"
    meta, seqs = open_sequences(str(src))
    split = split_sequences([s.seq_id for s in seqs], 0.1, 0.1, seed=args.seed)
    parts = {name: select_sequences(seqs, getattr(split, name)) for name in ("train", "val", "test")}
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    uses_xlayer = any(n.partition("+")[2].partition(":")[0] == "xlayer" for n in names)
    path, made = _predictor(args, meta, parts, split) if uses_xlayer else (None, {})
    if path:
        made["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    test = parts["test"][: args.max_prompts] if args.max_prompts else parts["test"]
    trace = SequenceListTrace(meta, test, path="puffin-test")
    caps = _floats(args.capacity or "0.1,0.25,0.5")
    layer_ms, bws = _floats(args.layer_ms), _floats(args.bandwidths)
    results, seconds = [], {}
    for mode in ("per-layer", "global"):
        pre = {}
        for n in names:
            spec = n.partition("+")[2]
            if spec.partition(":")[0] == "xlayer":
                m = spec.partition(":")[2] or "0"
                pre[spec] = policy_from_spec(f"{path}:{m}", meta)
                pre[spec].name = spec
        config = SimConfig(
            capacities=caps,
            policies=tuple(parse_policies(names, prefetchers=pre)),
            mode=mode,
            layer_ms=layer_ms,
            bandwidths=bws,
            evictor=getattr(args, "evictor", None),
        )
        t0 = time.perf_counter()
        report = simulate(trace, config, prefetchers=pre, progress=not args.no_progress)
        seconds[mode] = time.perf_counter() - t0
        results += [{k: v for k, v in r.items() if k not in DROP} for r in report["results"]]
        print(f"{mode}: {seconds[mode]:.0f} s", file=sys.stderr)
    out = {
        "what": "predicted tok/s over the cost grid (windowed cost model), DeepSeek-V2-Lite-Chat puffin, held-out prompts",
        "trace": {
            "source": str(src),
            "model_type": meta.model_type,
            "layers": len(meta.layers),
            "experts": meta.num_experts,
            "top_k": meta.top_k,
            "split_seed": args.seed,
            "replayed": {"prompts": len(test), "tokens": sum(s.num_tokens for s in test)},
        },
        **model_files(path, made, getattr(args, "evictor", None)),
        "policies": names,
        "capacities": list(caps),
        "grid": {"layer_ms": list(layer_ms), "bandwidth_gbs": list(bws)},
        "cost_model": report["config"]["cost_model"],
        "sim_seconds": seconds,
        "results": results,
        **env,
        "threads": args.threads,
        "command": " ".join(["python", *sys.argv]),
    }
    stem = Path(args.out) if args.out else RESULTS / "sim_pays_puffin"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    from sim_pays_report import markdown, plot

    stem.with_suffix(".md").write_text(markdown(out))
    plot(out, "per-layer", stem.with_suffix(".png"))
    plot(out, "global", stem.parent / f"{stem.name}_global.png")
    print(stem.with_suffix(".md").read_text())
    return 0
