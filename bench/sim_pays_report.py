"""The Markdown page and frontier plot of ``bench_sim.py --what pays`` (see ``sim_pays.py``)."""

from __future__ import annotations

from pathlib import Path

ISSUE_ROWS = ["lru", "belady", "lru+xlayer", "score+xlayer:2", "lru+oracle"]


def _rows(out: dict) -> dict[tuple[str, str, float], dict]:
    return {(r["mode"], r["policy"], r["capacity"]): r for r in out["results"]}


def _point(r: dict, ms: float, bw: float) -> dict:
    return next(g for g in r["grid"] if g["layer_ms"] == ms and g["bandwidth_gbs"] == bw)


def _demand_only(policy: str) -> bool:
    return "+" not in policy


def markdown(out: dict) -> str:
    tr, cm = out["trace"], out["cost_model"]
    lines = [
        "# What pays: predicted tok/s over the cost grid (windowed cost model), DeepSeek-V2-Lite-Chat puffin",
        "",
        f"{out['date']}, commit {out['commit']}, {out['device']}; torch {out['torch']}, numpy {out['numpy']}, "
        f"python {out['python']}. Produced by `{out['command']}` (simulation "
        + ", ".join(f"{k} {v:.0f} s" for k, v in out["sim_seconds"].items())
        + ")."
        + (
            f" Tracked files modified at run time: {', '.join(out['modified_tracked_files'])}."
            if out["modified_tracked_files"]
            else ""
        ),
        "",
        f"Trace: {tr['model_type']}, {tr['layers']} MoE layers, E={tr['experts']}, k={tr['top_k']}; the "
        f"{tr['replayed']['prompts']} held-out prompts (split by prompt, seed {tr['split_seed']}, as "
        f"`predict_puffin.md`), {tr['replayed']['tokens']} tokens. xlayer: "
        + (
            f"trained here ({out['predictor'].get('epochs')} epochs)"
            if out["predictor"] and out["predictor"].get("trained_here")
            else f"{out['predictor']['file'] if out['predictor'] else 'not used'}"
        )
        + f". Cost model: windowed (`moert.sim.CostModel`): expert {cm['expert_bytes'] / 1e6:.1f} MB, attention "
        f"share {cm['attention_share']:g} (the window a layer's own prefetch can hide in), prefetch depth "
        f"{cm['prefetch_depth']}; grid: layer ms {', '.join(f'{x:g}' for x in out['grid']['layer_ms'])} x "
        f"GB/s {', '.join(f'{x:g}' for x in out['grid']['bandwidth_gbs'])}. `pooled`: the earlier model "
        "(prefetches hide behind a whole token's compute).",
        "",
    ]
    lines += _issue_table(out)
    lines += _pays_tables(out, 0.25)
    lines += _stalls(out, 0.25)
    lines += _verdict(out)
    lines += ["", "Plots: `sim_pays_puffin.png` (per-layer), `sim_pays_puffin_global.png` (global).", ""]
    return "\n".join(lines)


def _issue_table(out: dict) -> list[str]:
    """The issue's table (0.2 ms, 25 GB/s) re-run: hit rate, tok/s windowed and pooled."""
    rows, caps = _rows(out), out["capacities"]
    ms, bw = 0.2, 25.0
    if ms not in out["grid"]["layer_ms"] or bw not in out["grid"]["bandwidth_gbs"]:
        return []
    head = ["policy"] + [f"hit @{c:g}" for c in caps] + [f"tok/s @{c:g}" for c in caps]
    head += [f"pooled tok/s @{c:g}" for c in caps]
    lines = [
        f"## The issue's table at {ms:g} ms per layer, {bw:g} GB/s: windowed vs pooled",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for mode in ("per-layer", "global"):
        for p in ISSUE_ROWS:
            if (mode, p, caps[0]) not in rows:
                continue
            rs = [rows[mode, p, c] for c in caps]
            cells = [f"{mode} {p}"] + [f"{r['hit_rate']:.3f}" for r in rs]
            cells += [f"{_point(r, ms, bw)['predicted_tok_s']:.1f}" for r in rs]
            cells += [f"{_point(r, ms, bw)['pooled_tok_s']:.1f}" for r in rs]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _pays_tables(out: dict, cap: float) -> list[str]:
    """tok/s at capacity ``cap`` for every policy and grid point; the best demand-only bold."""
    rows = _rows(out)
    pts = [(m, b) for m in out["grid"]["layer_ms"] for b in out["grid"]["bandwidth_gbs"]]
    lines = [f"## Predicted tok/s at capacity {cap:g}, every grid point (windowed; **best** per column)", ""]
    head = ["policy"] + [f"{m:g} ms, {b:g} GB/s" for m, b in pts]
    for mode in ("per-layer", "global"):
        got = {p: rows[mode, p, cap] for p in out["policies"] if (mode, p, cap) in rows}
        if not got:
            continue
        lines += [f"{mode}:", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * len(pts)]
        best = {pt: max(_point(r, *pt)["predicted_tok_s"] for r in got.values()) for pt in pts}
        for p, r in got.items():
            cells = [p]
            for pt in pts:
                v = _point(r, *pt)["predicted_tok_s"]
                cells.append(f"**{v:.1f}**" if v == best[pt] else f"{v:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _stalls(out: dict, cap: float) -> list[str]:
    """The stall split (ms per token) of the prefetching policies at capacity ``cap``."""
    rows = _rows(out)
    lines = [
        f"## Where a prefetching policy's time goes at capacity {cap:g} (ms per token: demand copies / "
        "behind committed prefetches / late prefetches; MB per token prefetched, wasted)",
        "",
        "| mode | policy | layer ms | GB/s | tok/s | demand | behind | late | prefetch MB | wasted MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in ("per-layer", "global"):
        for p in out["policies"]:
            r = rows.get((mode, p, cap))
            if r is None or _demand_only(p):
                continue
            for g in r["grid"]:
                lines.append(
                    f"| {mode} | {p} | {g['layer_ms']:g} | {g['bandwidth_gbs']:g} | {g['predicted_tok_s']:.1f} | "
                    f"{g['stall_demand_ms']:.1f} | {g['stall_behind_prefetch_ms']:.1f} | "
                    f"{g['stall_late_prefetch_ms']:.1f} | {r['prefetch_bytes_per_token'] / 1e6:.0f} | "
                    f"{r['wasted_bytes_per_token'] / 1e6:.0f} |"
                )
    return lines + [""]


def _verdict(out: dict) -> list[str]:
    """Per mode, capacity and grid point: the best prefetching policy's tok/s over the best online
    demand-only policy's (lru, lfu), windowed and pooled (oracle and belady excluded: they are offline)."""
    rows = _rows(out)
    pts = [(m, b) for m in out["grid"]["layer_ms"] for b in out["grid"]["bandwidth_gbs"]]
    lines = [
        "## Does prefetching pay? Best prefetching policy over the best online demand-only policy (lru, lfu)",
        "",
        "Each cell: windowed ratio (the policy) / pooled ratio. Above 1: prefetching pays.",
        "",
        "| mode | capacity | " + " | ".join(f"{m:g} ms, {b:g} GB/s" for m, b in pts) + " |",
        "|---|---:|" + "---:|" * len(pts),
    ]

    def best(mode: str, cap: float, pt: tuple, key: str, prefetching: bool) -> tuple[str, float]:
        got = [(p, _point(r, *pt)[key]) for (md, p, c), r in rows.items()
               if md == mode and c == cap and _demand_only(p) != prefetching
               and "oracle" not in p and p != "belady"]  # fmt: skip
        return max(got, key=lambda x: x[1]) if got else ("", 0.0)

    for mode in ("per-layer", "global"):
        for cap in out["capacities"]:
            cells = [mode, f"{cap:g}"]
            for pt in pts:
                pw, vw = best(mode, cap, pt, "predicted_tok_s", True)
                _, dw = best(mode, cap, pt, "predicted_tok_s", False)
                _, vp = best(mode, cap, pt, "pooled_tok_s", True)
                _, dp = best(mode, cap, pt, "pooled_tok_s", False)
                cells.append(f"{vw / dw:.2f} ({pw}) / {vp / dp:.2f}" if pw and dw and dp else "")
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def plot(out: dict, mode: str, path: Path) -> None:
    """tok/s against capacity, one panel per (layer ms, GB/s); belady dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms_list, bw_list = out["grid"]["layer_ms"], out["grid"]["bandwidth_gbs"]
    fig, axes = plt.subplots(
        len(bw_list), len(ms_list), figsize=(3.2 * len(ms_list), 3.0 * len(bw_list)), squeeze=False
    )
    for j, ms in enumerate(ms_list):
        for i, bw in enumerate(bw_list):
            ax = axes[i, j]
            for p in out["policies"]:
                rs = sorted((r for r in out["results"] if r["mode"] == mode and r["policy"] == p),
                            key=lambda r: r["capacity"])  # fmt: skip
                if not rs:
                    continue
                ax.plot([r["capacity"] for r in rs], [_point(r, ms, bw)["predicted_tok_s"] for r in rs],
                        marker="o", label=p, linestyle="--" if p == "belady" else "-")  # fmt: skip
            ax.set_title(f"{ms:g} ms/layer, {bw:g} GB/s", fontsize=9)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if i == len(bw_list) - 1:
                ax.set_xlabel("capacity")
            if j == 0:
                ax.set_ylabel("predicted tok/s")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"DeepSeek-V2-Lite-Chat puffin, held-out prompts, {mode} caches, windowed cost model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
