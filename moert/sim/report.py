"""Markdown tables of a :func:`moert.sim.simulate` report."""

from __future__ import annotations

__all__ = ["heterogeneous_table", "result_table"]


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
