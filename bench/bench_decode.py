"""Decode throughput and per-token latency: all-resident vs moert (cache 0.1/0.25/0.5 x lru/lfu) vs
a naive offload that copies every selected expert on every use (no cache; what Accelerate-style
offloading does). Every row is a ratio to all-resident measured in the same run, on the same model,
prompt and tokens.

CPU (default): the demo's DeepSeek-V2-Lite-shaped tiny model in fp32 on the CPU twin (the "device"
slots are host memory, so a miss costs a memcpy, not a PCIe copy). GPU (``--device cuda``): a
random-weight model with DeepSeek-V2-Lite's real dimensions in bf16. Random weights do not route like
trained ones (routing is near-uniform, so hit rates are lower than on real traffic): the GPU numbers
are timing only.

    python bench/bench_decode.py                      # CPU, writes bench/results/decode_cpu.{json,md}
    python bench/bench_decode.py --device cuda        # GPU, writes bench/results/decode_cuda.{json,md}
    python bench/bench_decode.py --prefill-len 256    # prefill mode: bench/results/prefill_cpu.{json,md}

Predictor variants (``--predictor-fractions``, default 0.25): a ``preattn`` predictor fused with
each MoE layer's norm: LRU with m=2 prefetch, policy ``score`` with m=2, adaptive, and lookahead 1.
On the CPU twin a prefetch is a memcpy waited for before attention (nothing overlaps): these rows
show hits and bytes, not the GPU's speed-up. The predictors are trained in the run on routing
captured once from the same model on ``--predictor-prompts`` other prompts (``--predictor PATH``
uses a trained file instead of the m=2 and adaptive ones).

The model is patched once: every configuration is reached by ``PatchHandle.reconfigure`` over the
same filled host pool (``bench/_one_pool.py``); the set-up times are recorded beside the table. The columns "prefetch hits", "wasted MB/token", "recall" and "exposed copy"
(``Stats.exposed_copy``: host stall in acquire plus, on CUDA, the device time the compute stream
waited for copies, over copy-lane busy time: the share of copy time not hidden behind compute; goal
<= 0.2 on a GPU) come from ``handle.stats()``.

Prefill mode (``--prefill-len N``): the time of one forward over an N-token prompt (``--batch`` rows)
at each ``--prefill-caches`` size (a fraction, or an int number of slots), with plain waves
(acquire, wait for the copies, compute, release) and with overlapped waves (wave i+1 prefetched while
wave i computes; ``moert.engine.layer``), against the unpatched model and moert with every expert cached
(warm), all in the same run over the same ``--prefill-prompts`` distinct prompts. A layer streams in
waves only when its union of selected experts exceeds the cache; a union that fits is one wave and
the two modes run the same code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moert.engine.devices import tensor_device
from moert.engine.layout import ExpertLayout
from moert.models import get_adapter
from moert.models.tiny import deepseek_v2_lite_config, demo_config, prompt_ids, tiny_model
from moert.provenance import device_name, git_commit, utc_now, versions

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decode(
    model: Any, prompt: torch.Tensor, steps: int, warmup: int, device: str, on_warm: Any = None
) -> dict[str, Any]:
    """Prefill ``prompt``, then time ``steps`` single-token greedy decode steps after ``warmup`` steps
    (``on_warm()`` is called once the warm-up is done, e.g. to reset counters).

    Returns per-token latencies (s), the generated ids and the prefill time.
    """
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        ids, lat = [], []
        for i in range(warmup + steps):
            if i == warmup and on_warm is not None:
                on_warm()
            _sync(device)
            t0 = time.perf_counter()
            out = model(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            _sync(device)
            if i >= warmup:
                lat.append(time.perf_counter() - t0)
            cache = out.past_key_values
            ids.append(nxt)
    return {"latency_s": lat, "ids": torch.cat(ids, dim=1).cpu(), "prefill_s": prefill_s}


def _q(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def summarize(lat: list[float], batch: int) -> dict[str, float]:
    med = statistics.median(lat)
    return {
        "tok_s": batch * len(lat) / sum(lat),
        "latency_ms_median": med * 1e3,
        "latency_ms_p20": _q(lat, 0.2) * 1e3,
        "latency_ms_p80": _q(lat, 0.8) * 1e3,
    }


def build(device: str, seed: int, path: Path | None = None, scale: int = 1) -> tuple[Any, str]:
    """The model to benchmark and its description (``scale``: the demo model's widths x scale)."""
    from transformers import AutoModelForCausalLM

    if path is not None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(tensor_device(device))
        return model.eval(), f"{path} ({str(dtype).replace('torch.', '')})"
    if device == "cuda":
        torch.manual_seed(seed)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(deepseek_v2_lite_config(), dtype=torch.bfloat16)
        return model.eval(), "DeepSeek-V2-Lite dims, random bf16 weights"
    if scale != 1:
        widths = dict(
            hidden_size=256 * scale, intermediate_size=1368 * scale, moe_intermediate_size=176 * scale
        )
        return tiny_model(demo_config(**widths), seed=seed), f"demo_config() with widths x{scale}, fp32"
    return tiny_model(demo_config(), seed=seed), "demo_config(): DeepSeek-V2-Lite layout scaled down, fp32"


def train_predictors(
    model: Any, seed: int, lookaheads: tuple[int, ...], n_prompts: int = 24
) -> dict[int, Any]:
    """One linear2/wbce ``preattn`` predictor per lookahead depth, trained on routing traces of
    ``model`` captured once on ``n_prompts`` prompts that are not the benchmark's (32 decode tokens each)."""
    from moert.engine.prefetch import capture_and_train_many

    prompts = [
        prompt_ids(1, 16, vocab=model.config.vocab_size, seed=1000 + seed + i)[0] for i in range(n_prompts)
    ]
    return capture_and_train_many(model, prompts, lookaheads, new_tokens=32, dim=256, epochs=20, seed=seed)


def _versions() -> dict[str, str]:
    return {
        **versions("torch", "transformers"),
        "commit": git_commit(),
        "date": utc_now(),
        "device_name": device_name("cuda" if torch.cuda.is_available() else "cpu"),
        "cpu_threads": str(torch.get_num_threads()),
        "load_avg_1m": f"{os.getloadavg()[0]:.2f}",
    }


def _model_dims(cfg: Any, adapter: Any, layout: ExpertLayout) -> dict[str, Any]:
    """The benchmarked model's dimensions, recorded beside every table."""
    return {
        "model_type": cfg.model_type,
        "hidden": cfg.hidden_size,
        "moe_intermediate": layout.intermediate,
        "layers": cfg.num_hidden_layers,
        "moe_layers": len(adapter.moe_layers()),
        "experts": adapter.num_experts,
        "top_k": adapter.top_k,
        "expert_MB": layout.expert_bytes / 1e6,
    }


def load(args: argparse.Namespace) -> tuple[Any, str, Any, ExpertLayout]:
    """The model (:func:`build`), its description, its adapter and its expert layout."""
    model, described = build(args.device, args.seed, args.model, args.demo_scale)
    adapter = get_adapter(model)
    gate_up = adapter.moe_layers()[0].experts.gate_up_proj
    layout = ExpertLayout(hidden=gate_up.shape[2], intermediate=gate_up.shape[1] // 2, dtype=gate_up.dtype)
    return model, described, adapter, layout


#: (name, cache fraction, policy, backend, extra patch arguments); backend "" = unpatched
Config = tuple[str, float | None, str | None, str, dict[str, Any]]


def decode_configs(args: argparse.Namespace) -> list[Config]:
    """All-resident, the cache x policy grid, and at the middle cache size the other wait protocol and
    the heterogeneous mode."""
    configs: list[Config] = [("all-resident", None, None, "", {})]
    configs += [
        (f"moert {frac:g} {pol}", frac, pol, "runtime", {})
        for frac in args.fractions
        for pol in args.policies
    ]
    # the wait protocol the device does not use by default (deferred waits: on for CUDA, off for the
    # CPU twin) at the middle cache size, so one run shows what it costs or saves here
    mid = sorted(args.fractions)[len(args.fractions) // 2]
    other = args.device != "cuda"
    configs.append(
        (
            f"moert {mid:g} lru, deferred waits {'on' if other else 'off'}",
            mid,
            "lru",
            "runtime",
            dict(deferred_waits=other),
        )
    )
    # heterogeneous mode: misses split between the host CPU and copies by times measured at patch time
    configs.append((f"moert {mid:g} lru + cpu experts", mid, "lru", "runtime", dict(cpu_experts=True)))
    return configs


def predictor_configs(frac: float, main_pred: Any, lookahead_1: Any) -> list[Config]:
    """The predictor variants at one cache fraction."""
    m2 = dict(predictor=main_pred, overprovision=2)
    return [  # lru+pred: the same prefetches with LRU eviction, isolating what the score policy adds
        (f"moert {frac:g} lru+pred m=2", frac, "lru", "runtime", m2),
        (f"moert {frac:g} score+pred m=2", frac, "score", "runtime", m2),
        (
            f"moert {frac:g} score+pred adaptive",
            frac,
            "score",
            "runtime",
            {**m2, "overprovision": "adaptive"},
        ),
        (
            f"moert {frac:g} score+pred lookahead-1 m=2",
            frac,
            "score",
            "runtime",
            dict(predictor=lookahead_1, overprovision=2),
        ),
    ]


def decode_rounds(
    args: argparse.Namespace, model: Any, prompt: torch.Tensor, configs: list[Config]
) -> tuple[dict[str, list[float]], dict[str, Any], dict[str, Any]]:
    """Latencies per config pooled over the rounds, each config's last (result, stats, slots), and
    the set-up times (``_one_pool.sweep``).

    The model is patched once and every moert config reached by ``PatchHandle.reconfigure`` over the
    same filled pool; rounds interleave the moert configs so that drift in machine load hits them
    alike, and all-resident runs half its rounds before the patch and half after the undo (its
    tokens after the undo must equal those before: ``resident_after_undo_match``).
    """
    device = args.device
    lat: dict[str, list[float]] = {c[0]: [] for c in configs}
    last: dict[str, Any] = {}
    resident_ids: list[torch.Tensor] = []

    def unpatched() -> None:
        res = decode(model, prompt, args.tokens, args.warmup, device)
        lat["all-resident"] += res["latency_s"]
        last.setdefault("all-resident", (res, None, None))
        resident_ids.append(res["ids"])

    def measure(name: str, handle: Any) -> None:
        # counters cover the timed decode steps only (not prefill or warm-up)
        res = decode(model, prompt, args.tokens, args.warmup, device, on_warm=handle.reset_stats)
        lat[name] += res["latency_s"]
        last[name] = (res, handle.stats(), handle.num_slots)

    patched = [
        (name, dict(cache_experts=frac, policy=pol, backend=backend, **extra))
        for name, frac, pol, backend, extra in configs
        if backend
    ]
    setup = _bench_module("_one_pool").sweep(
        model, device, patched, args.rounds, measure, unpatched, lambda: _sync(device), args.deadline
    )
    setup["resident_after_undo_match"] = all(torch.equal(ids, resident_ids[0]) for ids in resident_ids)
    return lat, last, setup


def decode_row(args: argparse.Namespace, config: Config, lat: list[float], last: Any, base: dict) -> dict:
    """One patched config's row: latency summary and the handle's counters of the last round."""
    name, frac, pol, backend, _extra = config
    res, st, slots = last
    s = summarize(lat, args.batch)
    moved = st.bytes_copied / (args.tokens * args.batch)
    return {
        "config": name,
        "cache": frac if backend != "naive" else 0,
        "policy": pol if backend != "naive" else None,
        "slots": slots if backend != "naive" else 0,
        **s,
        "hit_rate": st.hit_rate,
        "bytes_per_token": moved,
        "copy_GB_s": st.bytes_copied / max(sum(res["latency_s"]), 1e-9) / 1e9,  # last round
        "demand_stall_s": st.demand_stall_s,
        "demand_misses_per_token": st.misses / (args.tokens * args.batch),
        "cpu_experts_per_token": st.cpu_experts / (args.tokens * args.batch),
        "prefetch_hits": st.prefetch_hits,
        "prefetch_late": st.prefetch_late,
        "wasted_bytes_per_token": st.prefetch_wasted_bytes / (args.tokens * args.batch),
        "recall": st.recall,
        "coverage": st.coverage,
        "device_stall_s": st.device_stall_s,
        "exposed_copy": st.exposed_copy,
        "tokens_match": bool(torch.equal(res["ids"], base["ids"])),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    model, described, adapter, layout = load(args)
    cfg = model.config
    prompt = prompt_ids(args.batch, args.prompt_len, vocab=cfg.vocab_size, seed=args.seed + 1)
    prompt = prompt.to(tensor_device(device))
    configs = decode_configs(args)
    if args.predictor_fractions:
        t0 = time.perf_counter()
        preds = train_predictors(model, args.seed, (0, 1), args.predictor_prompts)
        train_s = time.perf_counter() - t0
        main_pred: Any = str(args.predictor) if args.predictor is not None else preds[0]
        for frac in args.predictor_fractions:
            configs += predictor_configs(frac, main_pred, preds[1])
    if device != "sim":  # the device model runs the runtime backend only
        configs.append(("naive (copy every use)", 1.0, "lru", "naive", {}))
    lat, last, setup = decode_rounds(args, model, prompt, configs)
    base = last["all-resident"][0]
    resident = summarize(lat["all-resident"], args.batch)
    rows: list[dict[str, Any]] = [
        {"config": "all-resident", "cache": None, "policy": None, **resident, "tokens_match": True}
    ]
    rows += [decode_row(args, c, lat[c[0]], last[c[0]], base) for c in configs[1:] if c[0] in last]
    for r in rows:
        r["tok_s_ratio"] = r["tok_s"] / resident["tok_s"]
        r["latency_ratio"] = r["latency_ms_median"] / resident["latency_ms_median"]
    return {
        "bench": "decode",
        "device": device,
        "model": described,
        "model_dims": _model_dims(cfg, adapter, layout),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "tokens": args.tokens,
        "warmup": args.warmup,
        "rounds": setup["rounds_run"],
        "predictor_train_s": train_s if args.predictor_fractions else None,
        "setup": setup,
        "note": _note(device, args.model is not None),
        "versions": _versions(),
        "rows": rows,
    }


def _note(device: str, real_weights: bool) -> str:
    parts = []
    if device == "cpu":
        parts.append("CPU twin: slots are host memory, a miss is a memcpy (not a PCIe copy)")
    if device == "sim":
        parts.append("device model: slots are host memory, each copy takes the modelled time (MOERT_SIM_*)")
    if not real_weights:
        parts.append("random weights do not route like trained ones (near-uniform routing): timing only")
    return "; ".join(parts) or "trained weights"


def markdown(rec: dict[str, Any]) -> str:
    v = rec["versions"]
    out = [
        f"# Decode benchmark ({rec['device']})",
        "",
        f"{rec['model']}; dims {rec['model_dims']}; batch {rec['batch']}, prompt {rec['prompt_len']}, "
        f"{rec['tokens']} timed tokens after {rec['warmup']} warm-up, x {rec['rounds']} interleaved rounds "
        "(latencies pooled; hit rate and bytes from the last round).",
        f"Note: {rec['note']}.",
        _bench_module("_one_pool").setup_line(rec["setup"]),
        f"moert {v['moert']}, torch {v['torch']}, transformers {v['transformers']}, commit {v['commit']}, "
        f"{v['date']}, {v['device_name']}, {v['cpu_threads']} CPU threads, load average {v['load_avg_1m']} at the end.",
        "",
        "| config | tok/s | x resident | latency ms median (p20-p80) | hit rate | misses/token | host experts/token "
        "| MB/token | copy GB/s | prefetch hits | wasted MB/token | recall | exposed copy | tokens = resident |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def fmt(r: dict[str, Any], key: str, spec: str, scale: float = 1.0) -> str:
        v = r.get(key)
        return "-" if v is None else format(v * scale, spec)

    for r in rec["rows"]:
        out.append(
            f"| {r['config']} | {r['tok_s']:.1f} | {r['tok_s_ratio']:.2f} | {r['latency_ms_median']:.1f} "
            f"({r['latency_ms_p20']:.1f}-{r['latency_ms_p80']:.1f}) | {fmt(r, 'hit_rate', '.1%')} "
            f"| {fmt(r, 'demand_misses_per_token', '.2f')} | {fmt(r, 'cpu_experts_per_token', '.2f')} "
            f"| {fmt(r, 'bytes_per_token', '.2f', 1e-6)} "
            f"| {fmt(r, 'copy_GB_s', '.2f')} | {fmt(r, 'prefetch_hits', '.0f')} "
            f"| {fmt(r, 'wasted_bytes_per_token', '.2f', 1e-6)} | {fmt(r, 'recall', '.2f')} "
            f"| {fmt(r, 'exposed_copy', '.2f')} | {r['tokens_match']} |"
        )
    return "\n".join(out) + "\n"


def _cache_arg(text: str) -> int | float:
    """``--prefill-caches`` values: ``"0.1"`` is a fraction, ``"32"`` a number of slots."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _bench_module(name: str) -> Any:
    """A module of bench/ (``bench_prefill``: the prefill mode; ``_one_pool``), with bench/ put on
    ``sys.path`` first: ``python -P bench/bench_decode.py`` leaves it off."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device",
        choices=("cpu", "sim", "cuda"),
        default="cpu",
        help="cpu: the CPU twin; sim: the asynchronous device model (MOERT_SIM_* timing); cuda: a GPU",
    )
    p.add_argument("--demo-scale", type=int, default=1, help="cpu/sim: the demo model's widths x this")
    p.add_argument("--model", type=Path, default=None, help="a local model directory instead of the built-in")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument("--policies", nargs="+", default=["lru", "lfu"])
    p.add_argument(
        "--predictor-fractions",
        type=float,
        nargs="*",
        default=[0.25],
        help="cache fractions for the predictor variants (none: skip them and the predictor training)",
    )
    p.add_argument(
        "--predictor-prompts",
        type=int,
        default=24,
        help="prompts (x 32 decode tokens) whose routing trains the predictors; >= 5 (4 validate)",
    )
    p.add_argument(
        "--predictor", type=Path, default=None, help="a trained preattn predictor file for this model"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds over the moert configs, latencies pooled; all-resident runs half of them "
        "before the one patch, half after the undo (default 3 on the CPU, 2 on CUDA)",
    )
    p.add_argument("--time-budget", type=float, help="seconds: a round after the first runs only if it fits")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared box)")
    p.add_argument(
        "--prefill-len",
        type=int,
        default=None,
        help="prefill mode: time the prefill of prompts of this many tokens (plain vs overlapped waves)",
    )
    p.add_argument(
        "--prefill-caches",
        type=_cache_arg,
        nargs="+",
        default=[0.1, 0.25],
        help="prefill mode: cache sizes, fractions (0.1) or slots (32)",
    )
    p.add_argument("--prefill-prompts", type=int, default=6, help="prefill mode: prompts timed per config")
    p.add_argument("--out", type=Path, help="output stem (default bench/results/{decode,prefill}_<device>)")
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    args.deadline = None if args.time_budget is None else time.perf_counter() + args.time_budget
    if args.rounds is None:
        args.rounds = 2 if args.device == "cuda" else 3
    if args.predictor_fractions and args.predictor_prompts < 5:
        p.error(f"--predictor-prompts {args.predictor_prompts} must be >= 5 (4 of them validate)")
    if args.prefill_len is not None and (args.prefill_len < 1 or args.prefill_prompts < 1):
        p.error(f"--prefill-len {args.prefill_len} and --prefill-prompts {args.prefill_prompts} must be >= 1")
    torch.set_num_threads(args.threads)
    mode = "decode" if args.prefill_len is None else "prefill"
    prefill_mode = None if mode == "decode" else _bench_module("bench_prefill")
    rec = run(args) if prefill_mode is None else prefill_mode.run_prefill(args)
    stem = args.out or RESULTS / f"{mode}_{args.device}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(rec, indent=2) + "\n")
    md = markdown(rec) if prefill_mode is None else prefill_mode.markdown_prefill(rec)
    stem.with_suffix(".md").write_text(md)
    print(md)
    if rec["setup"]["skipped"]:  # written, but incomplete: the GPU session's step says so
        sys.exit(f"{len(rec['setup']['skipped'])} configurations skipped at --time-budget {args.time_budget}")


if __name__ == "__main__":
    main()
