"""``moert simulate``: replay a routing trace through the real cache under several policies.

Usage::

    moert simulate TRACE [--format moert|moe-beyond-csv|esft] --capacity 0.1,0.25,0.5
                   --policy lru,lfu,fifo,moe-infinity,belady[,lru+oracle][,score+PRED.safetensors:2]
                   [--per-layer|--global]
                   [--prefetch oracle|moe-infinity|PRED.safetensors[:m|:adaptive]|prev-token[:m]|frequency[:m]]
                   [--score-decay 0.5] [--threshold 0.3] [--max-overprovision 4]
                   [--split auto|test|all] [--json OUT.json] [--plot OUT.png] [--markdown OUT.md]
                   [--expert-mb 17.3] [--layer-ms 0.2[,0.5,1,2]] [--bandwidth 25[,55]]
                   [--window windowed|pooled] [--attention-share 0.2]
                   [--cpu-expert-ms X [--activation-us 20]]
                   [--verify-tokens N] [--utility-decay 0.7] [--evictor R.safetensors]
                   [--host-capacity F[,F...] [--ssd-bandwidth 3,7] [--host-policy lru|lfu|belady]]

Predicted tok/s comes from the windowed cost model (``moert.sim.CostModel``: a prefetch hides only behind
the compute after it is issued); lists ``--layer-ms`` / ``--bandwidth`` predict every row at every pair.

Policy ``score`` is the runtime's predictor-score eviction (``moert.policy.score``): it needs a
prefetcher that gives scores (a trained predictor, ``prev-token`` or ``frequency``), whose
predictions are made by the runtime's own hook, so ``score+P`` and ``lru+P`` prefetch the same ids.

``--cpu-expert-ms X`` adds the heterogeneous prediction (DESIGN.md §7): a step's demand misses are split
between the host CPU (X ms per expert per token, plus one activation round trip) and the copy engine so
that the step's stall is smallest (``moert.sim.CostModel``). Calibrate X on your host with
``python bench/bench_cpu_expert.py``.

``--verify-tokens N`` (N = gamma + 1) replays speculative decoding's verify passes: each sequence's tokens
in consecutive groups of N, each MoE layer accessing the union of a pass's experts once (every drafted
token accepted, the draft model not simulated; see :mod:`moert.sim`). Policy ``utility`` and prefetcher
``utility[:m]`` (MoE-SpAc; ``--utility-decay``) evict and prefetch by a moving average of each expert's
count per call, e.g. ``--policy lru,utility,utility+utility:2,lru+utility:2 --verify-tokens 3``.

Policy ``learned`` evicts by a reuse model's forecast, ``--evictor R.safetensors`` (made by ``moert train
--predictor reuse``): the expert of the lowest forecast hit density (hits per call held) goes first;
``learned:next`` evicts the latest forecast next use instead (Belady's rule on the forecast); it replays every sequence of the trace (``--split`` narrows to a
routing predictor's held-out prompts only).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from moert.cli.simulate_args import _floats, _grid

__all__ = ["add_arguments", "environment", "plot", "run"]


def _one(values: tuple[float, ...], flag: str) -> float:
    if len(values) != 1 or not 0 <= values[0] <= 1:
        raise ValueError(f"{flag} takes one fraction in [0, 1], got {','.join(f'{v:g}' for v in values)}")
    return values[0]


def _positive_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a CPU time: give the host CPU's time for one expert and one token in ms, a "
            "number > 0 (e.g. 2.5); measure it with `python bench/bench_cpu_expert.py`"
        )
    return value


def _activation_us(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a round-trip time: give the activation row's device-host round trip in µs, a number "
            ">= 0 (default 20)"
        )
    return value


def _verify_tokens(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a verify-pass size: give gamma + 1, an integer >= 1 (e.g. 3 for gamma = 2; 1 = "
            "autoregressive decode)"
        )
    return value


def _decay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value < 1):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a decay: give the weight of the past in the utility's moving average, a number "
            "in (0, 1) (e.g. 0.7)"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_trace_arguments(parser)
    _add_policy_arguments(parser)
    _add_output_arguments(parser)
    _add_cost_arguments(parser)
    _add_replay_arguments(parser)
    from moert.cli.simulate_args import add_tier_arguments

    add_tier_arguments(parser)


def _add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    """The trace and how to read imported formats."""
    parser.add_argument("trace", help="trace directory (moert, MoE-Beyond CSV or ESFT) or one CSV")
    parser.add_argument("--format", default="auto", choices=["auto", "moert", "moe-beyond-csv", "esft"])
    parser.add_argument("--num-experts", type=int, default=64, help="E for imported formats (default 64)")
    parser.add_argument(
        "--top-k", type=int, default=None, help="k for imported formats (CSV: inferred; ESFT: 6)"
    )
    parser.add_argument(
        "--model-type", default="deepseek_v2", help="model_type recorded for imported formats"
    )


def _add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """Cache sizes, policies, cache mode, prefetchers and which sequences to replay."""
    from moert.api.config import OffloadConfig

    oc = OffloadConfig()
    parser.add_argument(
        "--capacity", type=_floats, default=(0.1, 0.25, 0.5), help="fractions, e.g. 0.1,0.25,0.5"
    )
    parser.add_argument(
        "--policy",
        default="lru,lfu,moe-infinity,belady",
        help="comma-separated EVICT[+PREFETCH]: lru, lfu, fifo, moe-infinity, belady, score, utility; e.g. lru+oracle, "
        "utility+utility:2, "
        "score+PRED.safetensors:2 (score needs a predictor prefetcher: a trained file, prev-token or frequency)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--per-layer",
        dest="mode",
        action="store_const",
        const="per-layer",
        help="one cache per layer (default)",
    )
    mode.add_argument(
        "--global", dest="mode", action="store_const", const="global", help="one cache for all layers"
    )
    parser.set_defaults(mode="per-layer")
    parser.add_argument(
        "--prefetch",
        default=None,
        help="prefetcher for every policy without its own: oracle, moe-infinity, a trained predictor "
        "PRED.safetensors[:m] (prefetch its top-(k+m); :adaptive for every expert above --threshold, at least "
        "k, at most k + --max-overprovision), prev-token[:m] or frequency[:m]; a policy can name its own as "
        "EVICT+PREFETCH, e.g. lru+xlayer.safetensors:2",
    )
    parser.add_argument(
        "--score-decay",
        type=float,
        default=oc.score_decay,
        help=f"policy score: weight decay**j of a lookahead prediction for layer l+j (default {oc.score_decay})",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=oc.threshold,
        help=f"PRED:adaptive: the probability threshold (default {oc.threshold})",
    )
    parser.add_argument(
        "--max-overprovision",
        type=int,
        default=oc.max_overprovision,
        help=f"PRED:adaptive: the most experts prefetched beyond k (default {oc.max_overprovision})",
    )
    parser.add_argument(
        "--split",
        default="auto",
        choices=["auto", "test", "all"],
        help="which sequences to replay: test = the held-out sequences recorded in the (first) trained "
        "predictor file, so it is judged on prompts it never saw; all = every sequence; auto (default) = "
        "test when a trained predictor prefetches, else all",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the report, the plot and the Markdown table go."""
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument("--plot", help="write hit rate vs capacity per policy here (PNG, matplotlib)")
    parser.add_argument("--markdown", help="write a Markdown table (with versions, commit, date) here")


def _add_cost_arguments(parser: argparse.ArgumentParser) -> None:
    """The cost model's times (copy only, and the heterogeneous mode)."""
    from moert.sim import CostModel

    d = CostModel()
    parser.add_argument(
        "--expert-mb", type=float, default=d.expert_bytes / 1e6, help="MB per expert (default 17.3)"
    )
    parser.add_argument(
        "--bandwidth",
        "--bandwidth-gbs",
        dest="bandwidth",
        type=_grid("--bandwidth", "host->device GB/s", "25,55", positive=True),
        default=(d.bandwidth_gbs,),
        help=f"host->device GB/s, one or a comma-separated list (a grid; default {d.bandwidth_gbs:g})",
    )
    parser.add_argument(
        "--layer-ms",
        "--layer-compute-ms",
        dest="layer_ms",
        type=_grid("--layer-ms", "GPU ms per MoE layer", "0.2,0.5,1,2"),
        default=(d.layer_compute_ms,),
        help=f"compute per MoE layer, ms, one or a list (a grid; default {d.layer_compute_ms:g}); every row is "
        "predicted at every (layer ms, GB/s) pair, the first pair in the main table",
    )
    parser.add_argument(
        "--window",
        default=d.window,
        choices=["windowed", "pooled"],
        help="cost model: windowed (default: a prefetch hides only behind the compute after it is issued, "
        "one copy link replayed step by step) or pooled (behind a whole token's compute; the earlier model)",
    )
    parser.add_argument(
        "--attention-share",
        type=_grid("--attention-share", "share of a layer's compute before its experts are needed", "0.2"),
        default=(d.attention_share,),
        help=f"windowed: the share of a layer's compute before the router's pick (default {d.attention_share:g})",
    )
    parser.add_argument(
        "--cpu-expert-ms",
        type=_positive_ms,
        default=None,
        help="heterogeneous mode: host CPU time of one expert for one token, ms, read from the host pool "
        "(calibrate with bench/bench_cpu_expert.py). Each step's demand misses are then split between the "
        "CPU and PCIe copies to minimise the stall; rows add tok/s with CPU experts, the share of misses "
        "computed on the CPU and the bytes kept off PCIe (default: off)",
    )
    parser.add_argument(
        "--activation-us",
        type=_activation_us,
        default=None,
        help=f"with --cpu-expert-ms: the activation row's round trip device->host->device, µs "
        f"(default {d.activation_us:g})",
    )


def _add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    """Speculative verify passes, the utility policy's decay and the progress bar."""
    parser.add_argument(
        "--verify-tokens",
        type=_verify_tokens,
        default=1,
        help="speculative decoding: gamma + 1 tokens per verify pass; each MoE layer of a pass accesses the "
        "union of its tokens' experts once (every draft accepted, draft model not simulated; eviction lru, "
        "lfu, belady, utility; prefetch utility[:m] or oracle). Default 1 = autoregressive",
    )
    parser.add_argument(
        "--utility-decay",
        type=_decay,
        default=0.7,
        help="policy/prefetcher utility: weight of the past in the moving average of each expert's count "
        "per layer call, in (0, 1) (default 0.7)",
    )
    parser.add_argument(
        "--evictor",
        default=None,
        metavar="R.safetensors",
        help="policy learned: the reuse model (`moert train --predictor reuse`)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def environment() -> dict:
    """Versions, commit, date and device, recorded beside every result."""
    from moert import provenance

    return {
        "device": f"{provenance.device_name('cpu')}, simulated cache",
        **provenance.versions("torch", "numpy"),
        "commit": provenance.git_commit(),
        "date": provenance.utc_now(),
    }


def plot(report: dict, out: str) -> None:
    """Hit rate vs capacity, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hetero = any("cpu_predicted_tok_s" in r for r in report["results"])
    fig, axes = plt.subplots(1, 2 if hetero else 1, figsize=(12 if hetero else 6, 4), squeeze=False)
    ax = axes[0, 0]
    by_policy: dict[str, list[dict]] = {}
    for r in report["results"]:
        by_policy.setdefault(r["policy"], []).append(r)
    xlabel = f"cache capacity (fraction of {'one layer' if report['config']['mode'] == 'per-layer' else 'all'} experts)"
    for policy, rows in by_policy.items():
        rows.sort(key=lambda r: r["capacity"])
        caps = [r["capacity"] for r in rows]
        line = ax.plot(caps, [r["hit_rate"] for r in rows], marker="o", label=policy)[0]
        if hetero:
            tok = axes[0, 1]
            tok.plot(
                caps, [r["predicted_tok_s"] for r in rows], marker="o", color=line.get_color(), label=policy
            )
            tok.plot(
                caps,
                [r["cpu_predicted_tok_s"] for r in rows],
                marker="s",
                linestyle="--",
                color=line.get_color(),
                label=f"{policy} +CPU experts",
            )
    meta = report["trace"]
    ax.set_xlabel(xlabel)
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(
        f"{meta['model_type']}: {meta['num_sequences']} seqs, {meta['num_tokens']} tokens, {report['config']['mode']}"
    )
    ax.legend()
    if hetero:
        cost = report["config"]["cost_model"]
        tok = axes[0, 1]
        tok.set_xlabel(xlabel)
        tok.set_ylabel("predicted decode tok/s")
        tok.set_ylim(bottom=0)
        tok.grid(alpha=0.3)
        tok.set_title(
            f"copy only (solid) vs CPU experts (dashed): {cost['cpu_expert_ms']:g} ms/expert, "
            f"{cost['activation_us']:g} µs activation",
            fontsize=9,
        )
        tok.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def markdown(report: dict) -> str:
    """The Markdown page of a report (:func:`moert.sim.report.markdown_report`)."""
    from moert.sim.report import markdown_report

    return markdown_report(report)


def run(args: argparse.Namespace) -> int:
    from moert.cli.trace import reporting_errors

    return reporting_errors("simulate", _run, args)


def _run(args: argparse.Namespace) -> int:
    from moert.cli.simulate_args import tier_config
    from moert.cli.trace import importer_options
    from moert.sim import CostModel, SimConfig, parse_policies, simulate
    from moert.trace import detect_format, open_trace

    if args.activation_us is not None and args.cpu_expert_ms is None:
        raise ValueError(
            f"--activation-us {args.activation_us:g} only applies to the CPU path; add --cpu-expert-ms X "
            "(measure X with `python bench/bench_cpu_expert.py`) or drop --activation-us"
        )
    cpu = {} if args.cpu_expert_ms is None else {"cpu_expert_ms": args.cpu_expert_ms}
    if args.activation_us is not None:
        cpu["activation_us"] = args.activation_us
    fmt = detect_format(args.trace) if args.format == "auto" else args.format
    trace = open_trace(
        args.trace, fmt, **importer_options(fmt, args.num_experts, args.top_k, args.model_type)
    )
    names = args.policy.split(",")
    options = {
        "threshold": args.threshold,
        "max_overprovision": args.max_overprovision,
        "score_decay": args.score_decay,
    }
    prefetchers, trace = _predictor_prefetchers(names, args.prefetch, trace, args.split, options)
    config = SimConfig(
        capacities=args.capacity,
        policies=tuple(parse_policies(names, args.prefetch, prefetchers=prefetchers)),
        mode=args.mode,
        cost=CostModel(
            expert_bytes=int(round(args.expert_mb * 1e6)),
            bandwidth_gbs=args.bandwidth[0],
            layer_compute_ms=args.layer_ms[0],
            window=args.window,
            attention_share=_one(args.attention_share, "--attention-share"),
            **cpu,
        ),
        verify_tokens=args.verify_tokens,
        utility_decay=args.utility_decay,
        evictor=args.evictor,
        layer_ms=args.layer_ms,
        bandwidths=args.bandwidth,
        tiers=tier_config(args),
    )
    report = simulate(trace, config, progress=not args.no_progress, prefetchers=prefetchers)
    report["environment"] = environment()
    print(markdown(report))
    slowest = min((r["accesses_per_s"] or math.inf) for r in report["results"])
    print(f"replay speed: >= {slowest / 1e6:.2f} M expert accesses/s (slowest policy)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
    if args.plot:
        plot(report, args.plot)
    return 0


def _predictor_prefetchers(
    names: list[str], default: str | None, trace, split: str, options: dict | None = None
):
    """Builds the prefetchers that are predictors (files or baselines) rather than built-in names;
    ``options`` (threshold, max_overprovision, score_decay) go to each.

    Returns:
        ``({spec: PredictorPolicy}, trace)``; the trace is narrowed to the held-out sequences of the first
        trained predictor file when ``split`` asks for it (``frequency`` then counts the others).
    """
    from moert.policy import REGISTRY

    specs = {default} if default not in (None, "", "none") else set()
    specs |= {n.strip().partition("+")[2] for n in names if "+" in n}
    external = []
    for spec in sorted(specs):
        try:
            REGISTRY.build(spec, "prefetch")
        except ValueError:
            external.append(spec)
    if not external:
        if split == "test":
            raise ValueError(
                "--split test needs a trained predictor (PRED.safetensors) to take the split from"
            )
        return {}, trace

    from moert.policy.predictor import SequenceListTrace, parse_prefetch_spec, policy_from_spec
    from moert.predict.io import load_predictor

    files = [
        parse_prefetch_spec(s)[0] for s in external if parse_prefetch_spec(s)[0].endswith(".safetensors")
    ]
    held_out: set[int] | None = None
    if split == "test" or (split == "auto" and files):
        if not files:
            raise ValueError(
                "--split test needs a trained predictor (PRED.safetensors) to take the split from"
            )
        recorded = load_predictor(files[0]).meta.train.get("split")
        if not recorded:
            raise ValueError(f"{files[0]} records no train/val/test split; use --split all")
        held_out = {int(i) for i in recorded["test"]}
    seqs = list(trace.sequences())
    if held_out is not None:
        replay = [q for q in seqs if q.seq_id in held_out]
        if not replay:
            raise ValueError(
                f"none of the {len(held_out)} held-out sequences of {files[0]} are in this trace; "
                "was it trained on another trace? use --split all"
            )
        fit = [q for q in seqs if q.seq_id not in held_out]
        print(
            f"replaying the {len(replay)} held-out sequences recorded in {files[0]} (--split all for every one)",
            file=sys.stderr,
        )
        trace = SequenceListTrace(trace.meta, replay, path=str(trace.path))
    else:
        fit = seqs  # frequency counts the replayed sequences themselves: an optimistic baseline
        trace = SequenceListTrace(trace.meta, seqs, path=str(trace.path))
    return {spec: policy_from_spec(spec, trace.meta, fit, **(options or {})) for spec in external}, trace
