"""``bench_sim.py --what hetero``: CPU experts in the cost model (DESIGN.md §7) on the puffin traces."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from moert import envs
from moert.cli.simulate import environment
from moert.engine import runtime
from moert.provenance import modified_files
from moert.sim import SimConfig, parse_policies, simulate

RESULTS = Path(__file__).parent / "results"

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
    cost = out["cost_model"]
    rows = {(r["policy"], r["capacity"]): r for r in out["results"]}
    copy_ms = cost["expert_bytes"] / (cost["bandwidth_gbs"] * 1e9) * 1e3
    lines = _hetero_header(out, copy_ms) + _hetero_table(out, rows)
    lines += _hetero_sensitivity(out, rows)
    if out["exact_uncached"]:
        lines += _hetero_exact(out, rows)
    lines += _hetero_notes(out, rows, copy_ms)
    return "\n".join(lines)


def _hetero_header(out: dict, copy_ms: float) -> list[str]:
    """The title, the run's provenance, the trace and the cost model with its CPU calibration."""
    cost, tr, cal = out["cost_model"], out["trace"], out["cpu_calibration"]
    return [
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
    ]  # fmt: skip


def _hetero_table(out: dict, rows: dict) -> list[str]:
    """Hit rate, tok/s copy only and +CPU, misses on the CPU and bytes saved, per policy and capacity."""
    caps = out["capacities"]
    lines = [
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
    return lines


def _hetero_sensitivity(out: dict, rows: dict) -> list[str]:
    """tok/s +CPU and misses on the CPU at multiples of the calibrated CPU time."""
    caps = out["capacities"]
    lines = ["", "## Sensitivity to the CPU time (same replay, tok/s +CPU and misses on the CPU)", ""]
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
    return lines


def _hetero_exact(out: dict, rows: dict) -> list[str]:
    """The cost model against the exact replay with the CPU-computed experts not cached."""
    lines = [
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
    return lines


def _hetero_notes(out: dict, rows: dict, copy_ms: float) -> list[str]:
    """Reading notes computed from the rows, then what the columns mean and what is left out."""
    return [
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
