"""``bench_sim.py --what speculative``: speculative decoding's verify passes (MoE-SpAc) on the puffin traces."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moert import envs
from moert.cli.simulate import environment
from moert.provenance import modified_files
from moert.sim import SimConfig, parse_policies, simulate

RESULTS = Path(__file__).parent / "results"

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
