"""Markdown tables of a :func:`moert.sim.simulate` report."""

from __future__ import annotations

__all__ = ["grid_table", "heterogeneous_table", "result_table"]


def result_table(report: dict) -> str:
    """A Markdown table of a :func:`simulate` report: one row per policy, hit rate per capacity, tok/s."""
    caps = report["config"]["capacities"]
    rows: dict[str, dict[float, dict]] = {}
    for r in report["results"]:
        rows.setdefault(r["policy"], {})[r["capacity"]] = r
    slots = {r["capacity"]: r["slots_per_cache"] for r in report["results"]}
    head = (
        ["policy"]
        + [f"hit rate @{c:g} ({slots.get(c)} slots)" for c in caps]
        + [f"tok/s @{c:g}" for c in caps]
    )
    speculative = report["config"].get("verify_tokens", 1) > 1
    if speculative:
        head += [f"token hit rate @{c:g}" for c in caps] + [f"loads/token @{c:g}" for c in caps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for policy, by_cap in rows.items():
        hit = [f"{by_cap[c]['hit_rate']:.3f}" if c in by_cap else "" for c in caps]
        tok = [f"{by_cap[c]['predicted_tok_s']:.1f}" if c in by_cap else "" for c in caps]
        if speculative:
            tok += [f"{by_cap[c]['token_hit_rate']:.3f}" if c in by_cap else "" for c in caps]
            tok += [f"{by_cap[c]['loads_per_token']:.2f}" if c in by_cap else "" for c in caps]
        lines.append("| " + " | ".join([policy, *hit, *tok]) + " |")
    if any("cpu_predicted_tok_s" in r for r in report["results"]):
        lines += ["", heterogeneous_table(report).rstrip("\n")]
    return "\n".join(lines) + "\n"


def heterogeneous_table(report: dict) -> str:
    """Markdown: per policy and capacity, tok/s copy only and with CPU experts, the share of demand misses
    computed on the CPU and the demand MB per token kept off PCIe."""
    caps = report["config"]["capacities"]
    rows: dict[str, dict[float, dict]] = {}
    for r in report["results"]:
        if "cpu_predicted_tok_s" in r:
            rows.setdefault(r["policy"], {})[r["capacity"]] = r
    head = ["policy"]
    for what in ("tok/s copy", "tok/s +CPU", "misses on CPU", "MB/token saved"):
        head += [f"{what} @{c:g}" for c in caps]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def cell(r: dict | None, key: str, fmt: str) -> str:
        return "" if r is None or r.get(key) is None else format(r[key], fmt)

    for policy, by_cap in rows.items():
        cells = [policy]
        cells += [cell(by_cap.get(c), "predicted_tok_s", ".1f") for c in caps]
        cells += [cell(by_cap.get(c), "cpu_predicted_tok_s", ".1f") for c in caps]
        cells += [cell(by_cap.get(c), "cpu_miss_share", ".1%") for c in caps]
        cells += [
            "" if c not in by_cap else f"{by_cap[c]['cpu_bytes_saved_per_token'] / 1e6:.0f}" for c in caps
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


GRID_COLUMNS = (
    ("tok/s", "predicted_tok_s", 1.0, ".1f"),
    ("pooled tok/s", "pooled_tok_s", 1.0, ".1f"),
    ("stall demand ms", "stall_demand_ms", 1.0, ".2f"),
    ("stall behind prefetch ms", "stall_behind_prefetch_ms", 1.0, ".2f"),
    ("stall late prefetch ms", "stall_late_prefetch_ms", 1.0, ".2f"),
)


def grid_table(report: dict) -> str:
    """Markdown: per policy, capacity and cost-grid point (layer ms, GB/s), the predicted tok/s (windowed,
    and pooled beside it), the hit rate, MB per token moved on demand, prefetched and wasted, and the
    stall per token split into demand copies, waiting behind committed prefetches and late prefetches."""
    head = ["policy", "capacity", "layer ms", "GB/s", "hit rate", "demand MB/tok", "prefetch MB/tok"]
    head += ["wasted MB/tok"] + [c[0] for c in GRID_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def cell(v, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    for r in report["results"]:
        traffic = [
            f"{r['hit_rate']:.3f}",
            f"{r['demand_bytes_per_token'] / 1e6:.0f}",
            f"{r['prefetch_bytes_per_token'] / 1e6:.0f}",
            f"{r['wasted_bytes_per_token'] / 1e6:.0f}",
        ]
        for g in r["grid"]:
            cells = [
                r["policy"],
                f"{r['capacity']:g}",
                f"{g['layer_ms']:g}",
                f"{g['bandwidth_gbs']:g}",
                *traffic,
            ]
            cells += [cell(g.get(key), fmt) for _, key, _, fmt in GRID_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(report: dict) -> str:
    """The ``moert simulate --markdown`` page: the trace, the cost model, the tables, provenance."""
    env, meta, cfg = report["environment"], report["trace"], report["config"]
    cost = cfg["cost_model"]
    grid = cfg.get("grid", [])
    lines = [
        f"# moert simulate: {meta['source'] or meta['model_type']}",
        "",
        f"{meta['num_sequences']} sequences, {meta['num_tokens']} tokens, L={len(meta['layers'])} MoE layers, "
        f"E={meta['num_experts']}, k={meta['top_k']}; caches: {cfg['mode']}.",
        f"Cost model ({cost.get('window', 'pooled')}; `moert.sim.CostModel`): expert "
        f"{cost['expert_bytes'] / 1e6:.1f} MB, {cost['bandwidth_gbs']:g} GB/s, {cost['layer_compute_ms']:g} ms "
        f"compute per MoE layer, attention share {cost.get('attention_share', 0):g}, prefetch depth "
        f"{cost.get('prefetch_depth', 0)} (tok/s = predicted decode speed).",
        *_heterogeneous_note(cost),
        *_speculative_note(cfg),
        "",
        result_table(report),
    ]
    if len(grid) > 1:
        lines += ["Over the cost grid (MB per token; stalls in ms per token):", "", grid_table(report)]
    from moert.sim.tiers import tier_note

    lines += [
        *tier_note(report),
        f"device: {env['device']}; torch {env['torch']}, numpy {env['numpy']}, python {env['python']}; "
        f"commit {env['commit']}; {env['date']}",
        "",
    ]
    return "\n".join(lines)


def _speculative_note(cfg: dict) -> list[str]:
    n = cfg.get("verify_tokens", 1)
    if n == 1:
        return []
    return [
        f"Speculative decoding: verify passes of {n} tokens (gamma = {n - 1}); each MoE layer of a pass "
        "accesses the union of its experts once; every draft accepted, the draft model not simulated; a pass "
        "costs one token's compute. Hit rate: per distinct expert of a layer call; token hit rate = 1 - demand "
        "misses / (tokens * k); tok/s per generated token."
    ]


def _heterogeneous_note(cost: dict) -> list[str]:
    if cost.get("cpu_expert_ms") is None:
        return []
    return [
        f"CPU experts (heterogeneous): {cost['cpu_expert_ms']:g} ms per expert per token on the host, "
        f"{cost['activation_us']:g} µs activation round trip; each step's demand misses are split between "
        "the CPU and PCIe copies to minimise the step's stall (`moert.sim.CostModel`; the cache is assumed "
        "to evolve as with copies only)."
    ]
