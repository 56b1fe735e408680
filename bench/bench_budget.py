"""Budgeted prefetch (``moert.policy.budget``) against demand-only and greedy prefetch on the puffin traces.

The held-out prompts of ``bench/bench_predict.py``'s split (seed 0) of the shared DeepSeek-V2-Lite-Chat
puffin traces, replayed through the C++ cache per-layer and global at capacities 0.1/0.25/0.5, at
layer compute times 0.2, 1 and 4.5 ms and 25 GB/s (17.3 MB experts): ``lru`` (demand only), ``belady``
(optimal demand-only eviction), ``lru+xlayer`` (today's greedy prefetch of xlayer's top-6 before every
layer) and ``lru+xlayer:budget`` (the budget, calibrated on the validation prompts). The xlayer
predictor is trained as in ``predict_puffin.md`` (dims 128, wbce, 5 epochs) unless ``--predictor`` names
one that records that split. Hits of lru / belady / lru+xlayer do not depend on the layer time: they are
replayed once per mode and priced at every point by the same cost model; the budget's decisions do, so it
is replayed at every point. Writes ``bench/results/sim_budget_puffin.{json,md}``.

    python bench/bench_budget.py [--predictor xlayer.safetensors] [--max-prompts N]   # make bench-budget
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
LAYER_MS = (0.2, 1.0, 4.5)
CAPS = (0.1, 0.25, 0.5)
KEEP = ("policy", "capacity", "mode", "hit_rate", "demand_misses", "prefetches", "prefetch_hits",
        "prefetch_wasted", "bytes_per_token", "predicted_tok_s", "token_ms", "slots_per_cache", "tokens")  # fmt: skip


def _simulate(trace, names, pre, mode, cost, layer_ms=()) -> list[dict]:
    from moert.sim import SimConfig, parse_policies, simulate

    cfg = SimConfig(
        capacities=CAPS,
        policies=tuple(parse_policies(names, prefetchers=pre)),
        mode=mode,
        cost=cost,
        layer_ms=layer_ms,
    )
    return simulate(trace, cfg, prefetchers=pre)["results"]


def run(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    import sim_score

    from moert import envs
    from moert.cli.simulate import environment
    from moert.policy.budget import BudgetPredictor
    from moert.policy.predictor import SequenceListTrace, policy_from_spec
    from moert.predict.data import open_sequences, split_sequences
    from moert.predict.evaluate import select_sequences
    from moert.predict.io import load_predictor
    from moert.provenance import modified_files
    from moert.sim import CostModel

    env = {**environment(), "modified_tracked_files": modified_files()}
    src = envs.shared_dir() / "data" / "traces" / "deepseek-v2-lite-chat-puffin"
    meta, seqs = open_sequences(str(src))
    split = split_sequences([s.seq_id for s in seqs], 0.1, 0.1, seed=0)
    parts = {n: select_sequences(seqs, getattr(split, n)) for n in ("train", "val", "test")}
    args.seed, args.epochs = 0, 5
    path, made = sim_score._predictor(args, meta, parts, split)
    test = parts["test"][: args.max_prompts] if args.max_prompts else parts["test"]
    trace = SequenceListTrace(meta, test, path="puffin-test")
    t0 = time.perf_counter()
    predictor = load_predictor(path)
    calibration = BudgetPredictor.calibrate(predictor, parts["val"])
    budget = BudgetPredictor(predictor, calibration, name="xlayer:budget")
    rows, seconds = [], {"calibration": time.perf_counter() - t0}
    for mode in ("per-layer", "global"):
        t0 = time.perf_counter()
        pre = {"xlayer": policy_from_spec(f"{path}:0", meta), "xlayer:budget": budget}
        pre["xlayer"].name = "xlayer"
        base = _simulate(trace, ["lru", "belady", "lru+xlayer"], pre, mode, CostModel(), LAYER_MS)
        for ms in LAYER_MS:
            cost = CostModel(layer_compute_ms=ms)
            for r in base:  # the same traffic, priced at this layer time by the same (windowed) model
                point = next(g for g in r["grid"] if g["layer_ms"] == ms)
                rows.append({**{k: r[k] for k in KEEP}, "layer_ms": ms, "predicted_tok_s": point["predicted_tok_s"],
                             "pooled_tok_s": point["pooled_tok_s"]})  # fmt: skip
            for r in _simulate(trace, ["lru+xlayer:budget"], pre, mode, cost):
                rows.append({**{k: r[k] for k in KEEP}, "layer_ms": ms})
            print(f"{mode} {ms} ms: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        seconds[mode] = time.perf_counter() - t0
    return {
        "what": "budgeted prefetch vs demand-only and greedy prefetch, DeepSeek-V2-Lite-Chat puffin, held-out prompts",
        "trace": {"source": str(src), "layers": len(meta.layers), "experts": meta.num_experts, "top_k": meta.top_k,
                  "replayed": {"prompts": len(test), "tokens": sum(s.num_tokens for s in test)},
                  "calibrated_on": {"prompts": len(parts["val"]), "split": "val"}},
        "predictor": {"kind": "xlayer", "file": path, **made},
        "calibration": {"edges": calibration.edges.tolist(), "rates": calibration.rates.tolist()},
        "cost_model": {"expert_bytes": CostModel().expert_bytes, "bandwidth_gbs": 25.0, "layer_ms": list(LAYER_MS),
                       "formula": "windowed (moert.sim.CostModel: one copy link replayed step by step)"},
        "sim_seconds": seconds,
        "rows": rows,
        **env,
        "command": " ".join(["python", *sys.argv]),
    }  # fmt: skip


ORDER = ("lru", "belady", "lru+xlayer", "lru+xlayer:budget")


def markdown(out: dict) -> str:
    tr = out["trace"]
    lines = [
        "# Budgeted prefetch on DeepSeek-V2-Lite-Chat routing (puffin prompts), simulated",
        "",
        f"{out['date']}, commit {out['commit']}, {out['device']}; torch {out['torch']}, numpy {out['numpy']}, "
        f"python {out['python']}. Produced by `{out['command']}` (`make bench-budget`).",
        "",
        f"Replayed: the {tr['replayed']['prompts']} held-out prompts ({tr['replayed']['tokens']} tokens) of the "
        "split of `predict_puffin.md`; xlayer as there; the budget's probabilities calibrated on the "
        f"{tr['calibrated_on']['prompts']} validation prompts. Cost model: 17.3 MB experts, 25 GB/s, "
        "the windowed model of `moert.sim.CostModel` (a prefetch hides only behind the compute after it is "
        "issued; one copy link, demand before queued prefetches). The budget's "
        "window is `t_layer / t_copy` copies (0.29, 1.45, 6.5 at 0.2 / 1 / 4.5 ms).",
        "",
    ]
    rows = {(r["mode"], r["layer_ms"], r["policy"], r["capacity"]): r for r in out["rows"]}
    for mode in ("per-layer", "global"):
        lines += [f"## {mode}", "", "| layer ms | policy | " + " | ".join(f"tok/s @{c:g}" for c in CAPS)
                  + " | " + " | ".join(f"hit @{c:g}" for c in CAPS) + " | " + " | ".join(f"prefetches/tok @{c:g}" for c in CAPS)
                  + " |", "|---|---|" + "---:|" * (3 * len(CAPS))]  # fmt: skip
        for ms in LAYER_MS:
            for pol in ORDER:
                got = [rows.get((mode, ms, pol, c)) for c in CAPS]
                if not all(got):
                    continue
                tok = [f"{r['predicted_tok_s']:.1f}" for r in got]
                if pol.endswith("budget"):
                    lru = [rows[(mode, ms, "lru", c)]["predicted_tok_s"] for c in CAPS]
                    tok = [f"**{t}**" + (" (< lru)" if r["predicted_tok_s"] < lo - 1e-9 else "")
                           for t, r, lo in zip(tok, got, lru)]  # fmt: skip
                hit = [f"{r['hit_rate']:.3f}" for r in got]
                pf = [f"{r['prefetches'] / r['tokens']:.2f}" for r in got]
                lines.append(f"| {ms:g} | {pol} | " + " | ".join(tok + hit + pf) + " |")
        lines.append("")
    lines += [_verdict(rows), "", "`lru`: demand only; `belady`: optimal demand-only eviction (reads the future); "
              "`lru+xlayer`: xlayer's top-6 prefetched before every layer (greedy); `lru+xlayer:budget`: "
              "`moert.policy.budget` (prefetch only while expected demand + prefetch copies fit the window, "
              "by calibrated probability, never evicting a higher-value expert).", ""]  # fmt: skip
    return "\n".join(lines)


def _verdict(rows: dict) -> str:
    below, above, same = [], 0, 0
    for (mode, ms, pol, c), r in rows.items():
        if pol != "lru+xlayer:budget":
            continue
        lru = rows[(mode, ms, "lru", c)]["predicted_tok_s"]
        if r["predicted_tok_s"] < lru - 1e-9:
            below.append(f"{mode} {ms:g} ms @{c:g}: {r['predicted_tok_s']:.2f} < {lru:.2f}")
        elif r["predicted_tok_s"] > lru + 1e-9:
            above += 1
        else:
            same += 1
    text = (
        f"Budget vs lru (demand only), {above + same + len(below)} points: above at {above}, equal at {same}"
    )
    return text + (f", below at {len(below)}: " + "; ".join(below) if below else ", below at none.")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--predictor", default=None, help="an xlayer file recording the split (else trained here)")
    p.add_argument("--work", default="/tmp/moert-bench-budget", help="where a trained predictor goes")
    p.add_argument("--max-prompts", type=int, default=0, help="at most N held-out prompts (0: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=str(RESULTS / "sim_budget_puffin"), help="path stem (.json/.md)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = run(args)
    stem = Path(args.out)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(out))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
