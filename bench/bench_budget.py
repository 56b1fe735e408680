"""The recommended policy (learned eviction + budgeted prefetch) against every demand-only policy, over the grid.

The held-out prompts of ``bench/bench_predict.py``'s split (seed 0) of the shared DeepSeek-V2-Lite-Chat
puffin traces, replayed through the C++ cache per-layer and global at capacities 0.1/0.25/0.5 and
priced by the windowed cost model (``moert.sim.CostModel``) at every (layer ms, GB/s) of the grid:

- demand only: ``lru``, ``lfu``, ``learned`` (``--evictor``, a ``moert train --predictor reuse`` file),
  and ``belady`` (optimal demand-only eviction, reads the future); ``lru+xlayer`` (greedy: xlayer's
  top-6 before every layer). Their hits do not depend on the cost point: replayed once per mode, priced
  at every point;
- **recommended** = ``learned+xlayer:budget-ahead`` (``moert simulate --policy learned --evictor R
  --prefetch X.safetensors:budget-ahead``): learned eviction; the budget (``moert.policy.budget``,
  calibrated on the validation prompts) prefetches the own layer behind its attention and, at layer l's
  router, layer l+1 behind the rest of layer l and l+1's attention, victims ordered and valued by the
  evictor. Its decisions depend on the point (the windows), so it is replayed at every point where a
  window holds a copy; where both windows are under one copy it issues nothing and is ``learned``'s run
  exactly (``tests/policy/test_budget_evictor.py``), so that run is reused and marked.

The check line: at every point, recommended against the best of lru/lfu/learned, every point below
named; exit 1 if any is below by more than 0.1% (float noise). Writes
``bench/results/sim_budget_puffin.{json,md}``.

    python bench/bench_budget.py [--predictor xlayer.safetensors] [--evictor out/evict/reuse.safetensors]
        [--jobs 2] [--max-prompts N]                                           # make bench-budget
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CAPS = (0.1, 0.25, 0.5)
DEMAND = ("lru", "lfu", "learned")
REC = "learned+xlayer:budget-ahead"
ORDER = ("lru", "lfu", "learned", "belady", "lru+xlayer", REC)
KEEP = ("policy", "capacity", "mode", "hit_rate", "demand_misses", "prefetches", "prefetch_hits",
        "prefetch_wasted", "bytes_per_token", "slots_per_cache", "tokens")  # fmt: skip
TOLERANCE = 1e-3

_STATE: dict = {}


def _setup(args: argparse.Namespace) -> dict:
    """The split, the test trace, the predictor file and its calibration (once per process)."""
    if _STATE.get("key") == (args.predictor, args.max_prompts):
        return _STATE
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    import sim_score

    from moert import envs
    from moert.policy.budget import BudgetPredictor
    from moert.policy.predictor import SequenceListTrace
    from moert.predict.data import open_sequences, split_sequences
    from moert.predict.evaluate import select_sequences
    from moert.predict.io import load_predictor

    torch.set_num_threads(1)
    src = envs.shared_dir() / "data" / "traces" / "deepseek-v2-lite-chat-puffin"
    meta, seqs = open_sequences(str(src))
    split = split_sequences([s.seq_id for s in seqs], 0.1, 0.1, seed=0)
    parts = {n: select_sequences(seqs, getattr(split, n)) for n in ("train", "val", "test")}
    args.seed, args.epochs = 0, 5
    path, made = sim_score._predictor(args, meta, parts, split)
    test = parts["test"][: args.max_prompts] if args.max_prompts else parts["test"]
    predictor = load_predictor(path)
    cal = BudgetPredictor.calibrate(predictor, parts["val"])
    _STATE.update(key=(args.predictor, args.max_prompts), src=src, meta=meta, parts=parts, path=path,
                  made=made, predictor=predictor, calibration=cal,
                  trace=SequenceListTrace(meta, test, path="puffin-test"))  # fmt: skip
    return _STATE


def _prefetchers(st: dict) -> dict:
    from moert.policy.budget import BudgetPredictor
    from moert.policy.predictor import policy_from_spec

    greedy = policy_from_spec(f"{st['path']}:0", st["meta"])
    greedy.name = "xlayer"
    rec = BudgetPredictor(st["predictor"], st["calibration"], name="xlayer:budget-ahead", ahead=True)
    return {"xlayer": greedy, "xlayer:budget-ahead": rec}


def _simulate(args, names, mode, points, cost) -> list[dict]:
    from moert.sim import SimConfig, parse_policies, simulate

    st = _setup(args)
    pre = _prefetchers(st)
    cfg = SimConfig(capacities=CAPS, policies=tuple(parse_policies(names, prefetchers=pre)), mode=mode, cost=cost,
                    layer_ms=tuple(sorted({p[0] for p in points})), bandwidths=tuple(sorted({p[1] for p in points})),
                    evictor=args.evictor)  # fmt: skip
    out = []
    for r in simulate(st["trace"], cfg, prefetchers=pre)["results"]:
        for g in r["grid"]:
            if (g["layer_ms"], g["bandwidth_gbs"]) in points:
                out.append({**{k: r[k] for k in KEEP}, "layer_ms": g["layer_ms"], "bandwidth_gbs": g["bandwidth_gbs"],
                            "predicted_tok_s": g["predicted_tok_s"], "pooled_tok_s": g["pooled_tok_s"]})  # fmt: skip
    return out


def _job(args: argparse.Namespace, what: str, mode: str, points: list) -> tuple[list[dict], float]:
    """One replay (a process of the pool): the demand-only/greedy rows, or the recommended at one point."""
    from moert.sim import CostModel

    t0 = time.perf_counter()
    if what == "base":
        rows = _simulate(args, [*DEMAND, "belady", "lru+xlayer"], mode, points, CostModel())
    else:
        (ms, bw), = points  # fmt: skip
        rows = _simulate(args, [REC], mode, points, CostModel(layer_compute_ms=ms, bandwidth_gbs=bw))
    return rows, time.perf_counter() - t0


def windows(ms: float, bw: float) -> tuple[float, float]:
    """The budget's own-layer and one-layer-ahead windows at a point, in expert copies."""
    from moert.sim import CostModel

    cost = CostModel(layer_compute_ms=ms, bandwidth_gbs=bw)
    return cost.attention_share * ms * 1e-3 / cost.copy_s, ms * 1e-3 / cost.copy_s


def freeze_evictor(args: argparse.Namespace) -> None:
    """Every job reads its own copy of the evictor: a copy in ``--work`` named by its sha256, taken now, so
    that a reuse model retrained at the same path during the run (``make bench-evict``) cannot reach
    the jobs that start later (it did once: the run mixed two models)."""
    src = Path(args.evictor)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    frozen = Path(args.work) / f"evictor-{digest[:16]}.safetensors"
    frozen.parent.mkdir(parents=True, exist_ok=True)
    if not frozen.is_file():
        shutil.copyfile(src, frozen)
    args.evictor_source, args.evictor = str(src), str(frozen)


def run(args: argparse.Namespace) -> dict:
    from moert.cli.simulate import environment
    from moert.provenance import modified_files

    env = {**environment(), "modified_tracked_files": modified_files()}
    freeze_evictor(args)
    st = _setup(args)  # trains the predictor once, before the pool starts (and puts bench/ on the path)
    import sim_score

    grid = [(ms, bw) for ms in args.layer_ms for bw in args.bandwidth]
    busy = [p for p in grid if max(windows(*p)) >= 1.0]
    jobs = [("base", m, grid) for m in ("per-layer", "global")] + [
        ("rec", m, [p]) for p in sorted(busy, key=lambda p: -p[0] / p[1]) for m in ("per-layer", "global")
    ]
    rows, seconds = [], {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [(j, pool.submit(_job, args, *j)) for j in jobs]
        for (what, mode, points), fut in futures:
            got, s = fut.result()
            rows += got
            seconds[f"{what} {mode} {points[0] if what == 'rec' else 'grid'}"] = round(s, 1)
            print(
                f"{what} {mode} {points if what == 'rec' else 'grid'}: {s:.0f} s", file=sys.stderr, flush=True
            )
    for r in [r for r in rows if r["policy"] == "learned"]:
        if (r["layer_ms"], r["bandwidth_gbs"]) not in busy:  # windows < 1 copy: nothing issued
            rows.append({**r, "policy": REC, "from_learned": True})
    from moert.sim import CostModel

    cal = st["calibration"]
    tr = st["trace"]
    return {
        "what": "recommended policy (learned + budgeted prefetch) vs demand-only, DeepSeek-V2-Lite-Chat puffin, held-out prompts",
        "trace": {"source": str(st["src"]), "layers": len(st["meta"].layers), "experts": st["meta"].num_experts,
                  "top_k": st["meta"].top_k, "replayed": {"prompts": tr.meta.num_sequences, "tokens": tr.meta.num_tokens},
                  "calibrated_on": {"prompts": len(st["parts"]["val"]), "split": "val"}},
        **sim_score.model_files(st["path"], st["made"], args.evictor),
        "evictor_source": args.evictor_source,
        "calibration": {"edges": cal.edges.tolist(), "rates": cal.rates.tolist()},
        "cost_model": {"expert_bytes": CostModel().expert_bytes, "attention_share": CostModel().attention_share,
                       "layer_ms": list(args.layer_ms), "bandwidth_gbs": list(args.bandwidth),
                       "formula": "windowed (moert.sim.CostModel: one copy link replayed step by step)"},
        "replayed_points": [list(p) for p in busy],
        "sim_seconds": seconds,
        "rows": rows,
        "check": check(rows),
        **env,
        "command": " ".join(["python", *sys.argv]),
    }  # fmt: skip


def check(rows: list[dict]) -> dict:
    """Recommended vs the best demand-only policy at every (mode, layer ms, GB/s, capacity): above, equal
    (to 1e-9), below within :data:`TOLERANCE` (named with its loss: it passes) and below (fails)."""
    by = {(r["mode"], r["layer_ms"], r["bandwidth_gbs"], r["capacity"], r["policy"]): r for r in rows}
    below, near, above, equal, gains = [], [], 0, 0, []
    for (mode, ms, bw, cap, pol), r in sorted(by.items()):
        if pol != REC:
            continue
        best_pol = max(DEMAND, key=lambda p: by[(mode, ms, bw, cap, p)]["predicted_tok_s"])
        best = by[(mode, ms, bw, cap, best_pol)]["predicted_tok_s"]
        got = r["predicted_tok_s"]
        gains.append(got / best - 1)
        where = f"{mode} {ms:g} ms {bw:g} GB/s @{cap:g}"
        if got < best * (1 - TOLERANCE):
            below.append(f"{where}: {got:.3f} < {best_pol} {best:.3f}")
        elif got < best * (1 - 1e-9):
            near.append(f"{where}: {(got / best - 1) * 100:+.4f}% vs {best_pol}")
        elif got > best * (1 + 1e-9):
            above += 1
        else:
            equal += 1
    n = above + equal + len(near) + len(below)
    line = (
        f"CHECK recommended ({REC}) vs best of {'/'.join(DEMAND)} at {n} points: above at {above}, "
        f"equal at {equal}, below within the {TOLERANCE * 100:g}% tolerance at {len(near)}"
        + (" (" + "; ".join(near) + ")" if near else "")
        + f", below at {len(below)}" + (": " + "; ".join(below) if below else "")
        + f"; gain max {max(gains, default=0) * 100:+.1f}%, min {min(gains, default=0) * 100:+.4f}%"
    )  # fmt: skip
    return {"line": line, "below": below, "near": near, "points": n, "ok": not below}


def markdown(out: dict) -> str:
    tr = out["trace"]
    lines = [
        "# The recommended policy (learned eviction + budgeted prefetch) on DeepSeek-V2-Lite-Chat routing, simulated",
        "",
        f"{out['date']}, commit {out['commit']}, {out['device']}; torch {out['torch']}, numpy {out['numpy']}, "
        f"python {out['python']}. Produced by `{out['command']}` (`make bench-budget`).",
        "",
        f"Replayed: the {tr['replayed']['prompts']} held-out prompts ({tr['replayed']['tokens']} tokens) of the "
        "split of `predict_puffin.md`; xlayer as there; the budget's probabilities calibrated on the "
        f"{tr['calibrated_on']['prompts']} validation prompts; evictor `{out.get('evictor_source', out['evictor']['file'])}` (read from a copy taken at the start, sha256 "
        f"{out['evictor']['sha256'][:12]}). Cost model: 17.3 MB experts, the windowed model of "
        "`moert.sim.CostModel` (attention share 0.2). Windows (copies): own layer `0.2 t_layer / t_copy`, one "
        "layer ahead `t_layer / t_copy`; points where both are under one copy issue nothing: their "
        "recommended row is `learned`'s run (marked `=`).",
        "",
        "**" + out["check"]["line"] + "**",
        "",
    ]  # fmt: skip
    rows = {
        (r["mode"], r["layer_ms"], r["bandwidth_gbs"], r["policy"], r["capacity"]): r for r in out["rows"]
    }
    points = sorted({(r["layer_ms"], r["bandwidth_gbs"]) for r in out["rows"]}, key=lambda p: (p[1], p[0]))
    lines += _summary(rows, points)
    for mode in ("per-layer", "global"):
        lines += [f"## {mode}", "", "| layer ms | GB/s | policy | " + " | ".join(f"tok/s @{c:g}" for c in CAPS)
                  + " | " + " | ".join(f"hit @{c:g}" for c in CAPS) + " | " + " | ".join(f"prefetches/tok @{c:g}" for c in CAPS)
                  + " |", "|---:|---:|---|" + "---:|" * (3 * len(CAPS))]  # fmt: skip
        for ms, bw in points:
            for pol in ORDER:
                got = [rows.get((mode, ms, bw, pol, c)) for c in CAPS]
                if not all(got):
                    continue
                tok = [f"{r['predicted_tok_s']:.2f}" for r in got]
                if pol == REC:
                    best = [max(rows[(mode, ms, bw, d, c)]["predicted_tok_s"] for d in DEMAND) for c in CAPS]
                    tok = [f"**{t}**" + (" =" if r.get("from_learned") else "")
                           + (" (below)" if r["predicted_tok_s"] < b * (1 - TOLERANCE) else "")
                           for t, r, b in zip(tok, got, best)]  # fmt: skip
                hit = [f"{r['hit_rate']:.3f}" for r in got]
                pf = [f"{r['prefetches'] / r['tokens']:.2f}" for r in got]
                lines.append(f"| {ms:g} | {bw:g} | {pol} | " + " | ".join(tok + hit + pf) + " |")
        lines.append("")
    lines += ["`lru`/`lfu`/`learned`: demand only; `belady`: optimal demand-only eviction (reads the future); "
              "`lru+xlayer`: xlayer's top-6 prefetched before every layer (greedy); "
              f"`{REC}`: the recommended policy (see `bench/bench_budget.py`'s doc).", ""]  # fmt: skip
    return "\n".join(lines)


def _summary(rows: dict, points: list) -> list[str]:
    """The README's table: per point, tok/s of the best demand-only policy, the recommended (its gain
    over that, ``=`` where it is ``learned``'s run) and belady, per-layer then global."""
    modes = ("per-layer", "global")
    head = " | ".join(f"{m} @{c:g}" if i == 0 else f"@{c:g}" for m in modes for i, c in enumerate(CAPS))
    lines = ["## Summary (tok/s)", "", f"| layer ms | GB/s | policy | {head} |",
             "|---:|---:|---|" + "---:|" * (len(modes) * len(CAPS))]  # fmt: skip
    for ms, bw in points:
        cells: dict[str, list[str]] = {
            "best demand-only": [],
            "recommended": [],
            "belady (reads the future)": [],
        }
        for mode in modes:
            for c in CAPS:
                demand = [rows.get((mode, ms, bw, d, c)) for d in DEMAND]
                rec, bel = rows.get((mode, ms, bw, REC, c)), rows.get((mode, ms, bw, "belady", c))
                if not all(demand) or rec is None or bel is None:
                    return []  # a partial run (--layer-ms / --bandwidth subsets keep their mode tables)
                best = max(r["predicted_tok_s"] for r in demand)
                got = rec["predicted_tok_s"]
                mark = "=" if rec.get("from_learned") else f"({(got / best - 1) * 100:+.1f}%)"
                cells["best demand-only"].append(f"{best:.2f}")
                cells["recommended"].append(f"**{got:.2f}** {mark}")
                cells["belady (reads the future)"].append(f"{bel['predicted_tok_s']:.2f}")
        lines += [f"| {ms:g} | {bw:g} | {name} | " + " | ".join(v) + " |" for name, v in cells.items()]
    return lines + [""]


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give numbers separated by commas, e.g. 0.2,1,4.5"
        ) from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be a positive number")
    return values


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--predictor", default=None, help="an xlayer file recording the split (else trained here)")
    p.add_argument("--evictor", default=str(REPO / "out" / "evict" / "reuse.safetensors"),
                   help="policy learned's reuse model (moert train --predictor reuse)")  # fmt: skip
    p.add_argument("--work", default="/tmp/moert-bench-budget", help="where a trained predictor goes")
    p.add_argument("--max-prompts", type=int, default=0, help="at most N held-out prompts (0: all)")
    p.add_argument("--layer-ms", type=_floats, default=(0.2, 0.5, 1.0, 2.0, 4.5), help="ms per MoE layer")
    p.add_argument("--bandwidth", type=_floats, default=(25.0, 55.0), help="GB/s")
    p.add_argument("--jobs", type=int, default=2, help="replays in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (training)")
    p.add_argument("--out", default=str(RESULTS / "sim_budget_puffin"), help="path stem (.json/.md)")
    p.add_argument("--markdown-from", default=None, metavar="JSON",
                   help="only rewrite the .md of --out from this run's JSON (no replay)")  # fmt: skip
    args = p.parse_args()
    if args.markdown_from:
        out = json.loads(Path(args.markdown_from).read_text())
        out["check"] = check(out["rows"])  # derived from the rows: this version's check
        Path(args.out).with_suffix(".md").write_text(markdown(out))
        print(out["check"]["line"])
        return 0 if out["check"]["ok"] else 1
    if not Path(args.evictor).is_file():
        p.error(
            f"--evictor {args.evictor}: no such file; train one: moert train --trace DIR --predictor reuse"
        )
    out = run(args)
    stem = Path(args.out)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(out))
    print(stem.with_suffix(".md").read_text())
    print(out["check"]["line"])
    if not out["check"]["ok"]:
        print(
            "FAIL: the recommended policy is below the best demand-only policy at the points above",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
