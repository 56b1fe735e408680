"""Where host memory pays most: predicted tok/s against the host pool's size with an SSD tier below it.

DeepSeek-V2-Lite-Chat puffin traces, the 100 held-out prompts of ``bench/bench_predict.py``'s split
(seed 0), per-layer device caches (lru) at a few capacities; the host pool (``moert.sim.tiers``) holds
a fraction F of all 26 x 64 experts (F x 28.8 GB in bf16), its own lru, lfu (and belady, the ceiling);
a device miss that misses the pool reads the expert from SSD first. Cost: the windowed two-tier timeline
(``moert.sim.tier_timeline``: the SSD a second link, reads pipelined with PCIe copies), 17.3 MB experts,
25 GB/s host-to-device, 0.2 / 1 / 2 ms compute per MoE layer, SSD at 3 and 7 GB/s. One device replay per
device capacity gives every F and cost point (the pool sees only the device's load stream).

    python bench/sim_tiers.py        # -> bench/results/sim_tiers_puffin.{json,md,png}  (make bench-sim-tiers)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moert import envs
from moert.cli.simulate import environment
from moert.provenance import modified_files
from moert.sim import CostModel, SimConfig, parse_policies, simulate
from moert.sim.tiers import TierConfig

RESULTS = Path(__file__).parent / "results"
HOST = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SSD = (3.0, 7.0)
LAYER_MS = (0.2, 1.0, 2.0)  # the first is the default cost point of the tables


def _trace(args):
    from moert.policy.predictor import SequenceListTrace
    from moert.predict.data import open_sequences, split_sequences
    from moert.predict.evaluate import select_sequences

    path = Path(args.trace) if args.trace else envs.shared_dir() / "data/traces/deepseek-v2-lite-chat-puffin"
    meta, seqs = open_sequences(str(path))
    split = split_sequences([s.seq_id for s in seqs], 0.1, 0.1, seed=args.seed)
    test = select_sequences(seqs, split.test)[: args.max_prompts or None]
    return SequenceListTrace(meta, test, path="puffin-test"), path


def run(args) -> dict:
    trace, path = _trace(args)
    cost = CostModel(bandwidth_gbs=args.bandwidth)
    device = tuple(float(x) for x in args.device.split(","))
    rows = []
    t0 = time.perf_counter()
    policies = tuple(args.host_policies.split(","))
    cfg = SimConfig(
        capacities=device,
        policies=tuple(parse_policies(args.policies.split(","))),
        cost=cost,
        tiers=TierConfig(host_capacities=HOST, ssd_bandwidths_gbs=SSD, host_policies=policies),
        layer_ms=LAYER_MS,
    )
    for r in simulate(trace, cfg)["results"]:
        two = {g["layer_ms"]: g["predicted_tok_s"] for g in r["grid"]}
        rows += [
            {"policy": r["policy"], "device_capacity": r["capacity"], "device_hit_rate": r["hit_rate"],
             "two_level_tok_s": two[t["layer_ms"]], "tokens": r["tokens"], **t}
            for t in r["tiers"]
        ]  # fmt: skip
    meta = trace.meta
    return {
        "environment": {**environment(), "modified_files": modified_files()},
        "command": " ".join(["python", *sys.argv]),
        "trace": {"path": str(path), "prompts": meta.num_sequences, "tokens": meta.num_tokens,
                  "split": "test (seed 0; bench/bench_predict.py)", "L": meta.num_layers, "E": meta.num_experts,
                  "k": meta.top_k},
        "cost_model": {"expert_bytes": cost.expert_bytes, "bandwidth_gbs": cost.bandwidth_gbs,
                       "layer_compute_ms": cost.layer_compute_ms, "layer_ms": list(LAYER_MS), "ssd_gbs": list(SSD),
                       "window": cost.window, "attention_share": cost.attention_share,
                       "prefetch_depth": cost.prefetch_depth},
        "all_experts_bytes": meta.num_layers * meta.num_experts * cost.expert_bytes,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def _rows(res: dict, **match) -> list[dict]:
    return [r for r in res["rows"] if all(r[k] == v for k, v in match.items())]


def markdown(res: dict) -> str:
    env, tr, cm = res["environment"], res["trace"], res["cost_model"]
    total = res["all_experts_bytes"] / 1e9
    lines = [
        "# SSD tier: predicted tok/s against the host pool's size (DeepSeek-V2-Lite-Chat, puffin)",
        "",
        f"{env['date']}, commit {env['commit']}{' (modified: ' + ', '.join(env['modified_files']) + ')' if env['modified_files'] else ''}; "
        f"torch {env['torch']}, numpy {env['numpy']}. `{res['command']}` (`make bench-sim-tiers`), {res['seconds']:.0f} s.",
        "",
        f"Trace: {tr['prompts']} held-out prompts, {tr['tokens']} tokens ({tr['split']}), L={tr['L']}, E={tr['E']}, k={tr['k']}. "
        f"Device: per-layer caches, lru, capacity = fraction of each layer's 64 experts. Host pool: fraction F of all "
        f"{tr['L'] * tr['E']} experts ({total:.1f} GB in bf16), cold at the start (each expert's first load is an SSD "
        "read) except F = 1 (every expert pinned at load: today's two levels). Cost: the windowed two-tier timeline "
        "(`moert.sim.tier_timeline` states every assumption: the SSD is a second link, a PCIe copy overlaps the next "
        "expert's read, demand reads go before read-ahead, a read blocks compute only through the step's demand "
        f"chain), {cm['expert_bytes'] / 1e6:.1f} MB experts, {cm['bandwidth_gbs']:g} GB/s host-to-device, "
        f"{cm['layer_compute_ms']:g} ms per MoE layer unless said (also {', '.join(f'{x:g}' for x in cm['layer_ms'][1:])} ms), "
        f"attention share {cm['attention_share']:g}. `pooled` = the earlier formula (`tier_pooled_tok_s`).",
        "",
    ]
    for policy in dict.fromkeys(r["host_policy"] for r in res["rows"]):
        for bw in cm["ssd_gbs"]:
            lines += _table(res, policy, bw)
    lines += _stall_table(res) + _layer_table(res) + _where_it_pays(res)
    lines.append(
        f"Plot: `sim_tiers_puffin.png` (tok/s against host GB at {cm['layer_compute_ms']:g} ms, one line per device "
        "capacity and pool policy)."
    )
    return "\n".join(lines) + "\n"


def _table(res: dict, policy: str, bw: float) -> list[str]:
    base = res["cost_model"]["layer_compute_ms"]
    rows = _rows(res, host_policy=policy, ssd_bandwidth_gbs=bw, layer_ms=base)
    hosts = sorted({r["host_capacity"] for r in rows})
    total = res["all_experts_bytes"] / 1e9
    out = [
        f"## tok/s (pool hit rate), host pool {policy}, SSD {bw:g} GB/s, {base:g} ms per layer",
        "",
        "| device cap (hit) | " + " | ".join(f"F={f:g} ({f * total:.1f} GB)" for f in hosts) + " |",
        "|---|" + "---:|" * len(hosts),
    ]
    for dev in sorted({r["device_capacity"] for r in rows}):
        by = {r["host_capacity"]: r for r in rows if r["device_capacity"] == dev}
        first = by[hosts[0]]
        out.append(
            f"| {first['policy']} {dev:g} ({first['device_hit_rate']:.3f}) | "
            + " | ".join(f"{by[f]['tier_tok_s']:.2f} ({by[f]['pool_hit_rate']:.2f})" for f in hosts)
            + " |"
        )
    return [*out, ""]


def _stall_table(res: dict, dev: float = 0.25) -> list[str]:
    """Per pool policy, F and SSD bandwidth at device capacity ``dev``: MB per token per tier, the stall
    per token waiting for SSD reads and for PCIe copies, tok/s windowed and pooled."""
    base = res["cost_model"]["layer_compute_ms"]
    out = [
        f"## Per tier: traffic and stall per token (device capacity {dev:g}, {base:g} ms per layer)",
        "",
        "| pool policy | F | SSD GB/s | PCIe MB/tok | SSD MB/tok | stall PCIe ms | stall SSD ms | tok/s | pooled tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(
        _rows(res, device_capacity=dev, layer_ms=base),
        key=lambda r: (r["host_policy"], r["host_capacity"], r["ssd_bandwidth_gbs"]),
    ):
        if r["host_capacity"] in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
            out.append(
                f"| {r['host_policy']} | {r['host_capacity']:g} | {r['ssd_bandwidth_gbs']:g} | "
                f"{r['link_bytes_per_token'] / 1e6:.0f} | {r['ssd_bytes_per_token'] / 1e6:.0f} | "
                f"{r['stall_pcie_ms']:.2f} | {r['stall_ssd_ms']:.2f} | {r['tier_tok_s']:.2f} | {r['tier_pooled_tok_s']:.2f} |"
            )
    return [*out, ""]


def _layer_table(res: dict, dev: float = 0.25) -> list[str]:
    """tok/s and the share of the all-in-host speed against F at each layer time (device capacity ``dev``)."""
    hosts = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    out = [
        f"## Layer time: tok/s (share of F = 1) at device capacity {dev:g}",
        "",
        "| layer ms | SSD GB/s | pool policy | " + " | ".join(f"F={f:g}" for f in hosts) + " |",
        "|---:|---:|---|" + "---:|" * len(hosts),
    ]
    for ms in res["cost_model"]["layer_ms"]:
        for bw in res["cost_model"]["ssd_gbs"]:
            for policy in dict.fromkeys(r["host_policy"] for r in res["rows"]):
                by = {r["host_capacity"]: r["tier_tok_s"] for r in _rows(
                    res, device_capacity=dev, layer_ms=ms, ssd_bandwidth_gbs=bw, host_policy=policy)}  # fmt: skip
                cells = [f"{by[f]:.2f} ({by[f] / by[1.0]:.2f})" for f in hosts]
                out.append(f"| {ms:g} | {bw:g} | {policy} | " + " | ".join(cells) + " |")
    return [*out, ""]


def _where_it_pays(res: dict) -> list[str]:
    """Per (layer ms, SSD bandwidth, device capacity, pool policy): the host pool (F) that reaches half and
    90% of the all-in-host speed, and tok/s per host GB over the lower and upper half of F."""
    total = res["all_experts_bytes"] / 1e9
    lines = [
        "## Where host memory pays most",
        "",
        "Smallest F on the grid reaching 50% / 90% of the all-in-host speed (F = 1), and the speed gained per "
        "host GB from F = 0.1 to 0.5 and from 0.5 to 1.",
        "",
        "| layer ms | SSD GB/s | device cap | pool policy | F for 50% | F for 90% | tok/s per GB, F 0.1-0.5 | F 0.5-1 |",
        "|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for ms in res["cost_model"]["layer_ms"]:
        for bw in res["cost_model"]["ssd_gbs"]:
            for dev in sorted({r["device_capacity"] for r in res["rows"]}):
                for policy in dict.fromkeys(r["host_policy"] for r in res["rows"]):
                    by = {r["host_capacity"]: r["tier_tok_s"] for r in _rows(
                        res, host_policy=policy, ssd_bandwidth_gbs=bw, device_capacity=dev, layer_ms=ms)}  # fmt: skip
                    full = by[1.0]
                    half = min(f for f, v in by.items() if v >= 0.5 * full)
                    ninety = min(f for f, v in by.items() if v >= 0.9 * full)
                    low = (by[0.5] - by[0.1]) / (0.4 * total)
                    high = (full - by[0.5]) / (0.5 * total)
                    lines.append(
                        f"| {ms:g} | {bw:g} | {dev:g} | {policy} | {half:g} | {ninety:g} | {low:.2f} | {high:.2f} |"
                    )
    return [*lines, ""]


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = res["all_experts_bytes"] / 1e9
    bws = res["cost_model"]["ssd_gbs"]
    fig, axes = plt.subplots(1, len(bws), figsize=(5.5 * len(bws), 4), sharey=True)
    for ax, bw in zip(axes, bws):
        for dev in sorted({r["device_capacity"] for r in res["rows"]}):
            for policy, style in (("lru", "-"), ("lfu", "--"), ("belady", ":")):
                rows = sorted(
                    _rows(res, host_policy=policy, ssd_bandwidth_gbs=bw, device_capacity=dev,
                          layer_ms=res["cost_model"]["layer_compute_ms"]),
                    key=lambda r: r["host_capacity"],
                )  # fmt: skip
                if rows:
                    ax.plot([r["host_capacity"] * total for r in rows], [r["tier_tok_s"] for r in rows], style,
                            marker="o", ms=3, label=f"device {dev:g}, pool {policy}")  # fmt: skip
        ax.set_title(f"SSD {bw:g} GB/s, link {res['cost_model']['bandwidth_gbs']:g} GB/s")
        ax.set_xlabel(f"host pool, GB (of {total:.1f} GB of experts)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted tok/s")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="0.1,0.25,0.5", help="device capacities (fraction of each layer's E)")
    p.add_argument("--policies", default="lru", help="device policies")
    p.add_argument("--host-policies", default="lru,lfu,belady")
    p.add_argument("--bandwidth", type=float, default=25.0, help="host-to-device GB/s")
    p.add_argument("--max-prompts", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "sim_tiers_puffin"))
    args = p.parse_args(argv)
    res = run(args)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    plot(res, out.with_suffix(".png"))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
