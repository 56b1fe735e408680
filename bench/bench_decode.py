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

Predictor variants (``--predictor-fractions``, default 0.25): the patched model with a ``preattn``
predictor fused with each MoE layer's norm: LRU with m=2 prefetch, and policy ``score`` with
over-provisioning m=2, adaptive, and a lookahead-1 predictor. On the CPU twin a prefetch is a
memcpy on the same two cores as the model, waited for before attention (nothing overlaps), so
these rows show hits and bytes, not the GPU's speed-up. The predictors are trained in the run (seconds) on routing traces captured
from the same model on other prompts (``--predictor PATH`` uses a trained file instead of the m=2
and adaptive ones). The columns "prefetch hits", "wasted MB/token", "recall" and "exposed copy"
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
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import moert
from moert import envs
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


def build(device: str, seed: int, path: Path | None = None) -> tuple[Any, str]:
    """The model to benchmark and its description."""
    from transformers import AutoModelForCausalLM

    if path is not None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
        return model.eval(), f"{path} ({str(dtype).replace('torch.', '')})"
    if device == "cuda":
        torch.manual_seed(seed)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(deepseek_v2_lite_config(), dtype=torch.bfloat16)
        return model.eval(), "DeepSeek-V2-Lite dims, random bf16 weights"
    return tiny_model(demo_config(), seed=seed), "demo_config(): DeepSeek-V2-Lite layout scaled down, fp32"


def train_predictors(model: Any, seed: int, lookaheads: tuple[int, ...]) -> dict[int, Any]:
    """One linear2/wbce ``preattn`` predictor per lookahead depth, trained on routing traces of
    ``model`` captured on 24 prompts that are not the benchmark's (32 decode tokens each)."""
    from moert.engine.prefetch import capture_and_train

    prompts = [prompt_ids(1, 16, vocab=model.config.vocab_size, seed=1000 + seed + i)[0] for i in range(24)]
    return {
        d: capture_and_train(model, prompts, new_tokens=32, lookahead=d, dim=256, epochs=20, seed=seed)
        for d in lookaheads
    }


def _versions() -> dict[str, str]:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        **versions("torch", "transformers"),
        "commit": git_commit(),
        "date": utc_now(),
        "device_name": device_name(dev),
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    model, described = build(device, args.seed, args.model)
    adapter = get_adapter(model)
    gate_up = adapter.moe_layers()[0].experts.gate_up_proj
    layout = ExpertLayout(hidden=gate_up.shape[2], intermediate=gate_up.shape[1] // 2, dtype=gate_up.dtype)
    cfg = model.config
    prompt = prompt_ids(args.batch, args.prompt_len, vocab=cfg.vocab_size, seed=args.seed + 1).to(device)
    configs: list[tuple[str, float | None, str | None, str, dict[str, Any]]] = [
        ("all-resident", None, None, "", {})
    ]
    configs += [
        (f"moert {frac:g} {pol}", frac, pol, "runtime", {})
        for frac in args.fractions
        for pol in args.policies
    ]
    # the wait protocol the device does not use by default (deferred waits: on for CUDA, off for the
    # CPU twin) at the middle cache size, so one run shows what it costs or saves here
    mid = sorted(args.fractions)[len(args.fractions) // 2]
    other = device != "cuda"
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
    if args.predictor_fractions:
        t0 = time.perf_counter()
        preds = train_predictors(model, args.seed, (0, 1))
        train_s = time.perf_counter() - t0
        main_pred: Any = str(args.predictor) if args.predictor is not None else preds[0]
        for frac in args.predictor_fractions:
            configs += [
                (  # the same prefetches with LRU eviction: isolates what the score policy adds
                    f"moert {frac:g} lru+pred m=2",
                    frac,
                    "lru",
                    "runtime",
                    dict(predictor=main_pred, overprovision=2),
                ),
                (
                    f"moert {frac:g} score+pred m=2",
                    frac,
                    "score",
                    "runtime",
                    dict(predictor=main_pred, overprovision=2),
                ),
                (
                    f"moert {frac:g} score+pred adaptive",
                    frac,
                    "score",
                    "runtime",
                    dict(predictor=main_pred, overprovision="adaptive"),
                ),
                (
                    f"moert {frac:g} score+pred lookahead-1 m=2",
                    frac,
                    "score",
                    "runtime",
                    dict(predictor=preds[1], overprovision=2),
                ),
            ]
    configs.append(("naive (copy every use)", 1.0, "lru", "naive", {}))
    # Rounds interleave the configs so that drift in machine load hits all of them alike.
    lat: dict[str, list[float]] = {c[0]: [] for c in configs}
    last: dict[str, Any] = {}
    for _ in range(args.rounds):
        for name, frac, pol, backend, extra in configs:
            if not backend:
                res = decode(model, prompt, args.tokens, args.warmup, device)
                lat[name] += res["latency_s"]
                last[name] = (res, None, None)
                continue
            handle = moert.patch(
                model, cache_experts=frac, policy=pol, device=device, backend=backend, **extra
            )
            try:
                # counters cover the timed decode steps only (not prefill or warm-up)
                res = decode(model, prompt, args.tokens, args.warmup, device, on_warm=handle.reset_stats)
                st = handle.stats()
            finally:
                handle.undo()
            lat[name] += res["latency_s"]
            last[name] = (res, st, handle.num_slots)
    base = last["all-resident"][0]
    resident = summarize(lat["all-resident"], args.batch)
    rows: list[dict[str, Any]] = [
        {"config": "all-resident", "cache": None, "policy": None, **resident, "tokens_match": True}
    ]
    for name, frac, pol, backend, _extra in configs[1:]:
        res, st, slots = last[name]
        s = summarize(lat[name], args.batch)
        moved = st.bytes_copied / (args.tokens * args.batch)
        rows.append(
            {
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
        )
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
        "rounds": args.rounds,
        "predictor_train_s": train_s if args.predictor_fractions else None,
        "note": _note(device, args.model is not None),
        "versions": _versions(),
        "rows": rows,
    }


def _note(device: str, real_weights: bool) -> str:
    parts = []
    if device == "cpu":
        parts.append("CPU twin: slots are host memory, a miss is a memcpy (not a PCIe copy)")
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


# -- prefill mode ------------------------------------------------------------------------------


def prefill(model: Any, prompts: list[torch.Tensor], device: str) -> tuple[list[float], torch.Tensor]:
    """Times one forward (no KV cache kept) over each prompt.

    Returns:
        Seconds per prompt, and the first prompt's logits ``(B, N, V)`` fp32 on the CPU (for the
        exactness check; copied after its timing).
    """
    lat: list[float] = []
    first = torch.empty(0)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            _sync(device)
            t0 = time.perf_counter()
            out = model(p, use_cache=False)
            _sync(device)
            lat.append(time.perf_counter() - t0)
            if i == 0:
                first = out.logits.float().cpu()
            del out
    return lat, first


def _cache_arg(text: str) -> int | float:
    """``--prefill-caches`` values: ``"0.1"`` is a fraction, ``"32"`` a number of slots."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def contention_probe(layout: ExpertLayout, rows: int, slots: int, pool_experts: int) -> dict[str, float]:
    """CPU: expert-shaped matmuls (``rows`` rows through gate_up and down of ``slots`` experts, cycling)
    timed alone and while another thread copies experts from a ``pool_experts``-expert pool into those
    slots, as a copy lane does during an overlapped wave. Best of 3 each (fp32)."""
    import threading

    H, inter = layout.hidden, layout.intermediate
    weights = [(torch.randn(2 * inter, H), torch.randn(H, inter)) for _ in range(slots)]
    x = torch.randn(max(rows, 1), H)
    n_elem = 3 * inter * H
    pool = torch.randn(pool_experts, n_elem)
    dst = torch.empty(slots, n_elem)

    def compute() -> float:
        t0 = time.perf_counter()
        for i in range(2000):
            gate_up, down = weights[i % slots]
            h = torch.nn.functional.linear(x, gate_up)  # [rows, 2I]
            torch.nn.functional.linear(h[:, :inter], down)  # [rows, H]
        return time.perf_counter() - t0

    stop = threading.Event()

    def copier() -> None:
        i = 0
        while not stop.is_set():
            dst[i % slots].copy_(pool[(7 * i) % pool_experts])
            i += 1

    alone = min(compute() for _ in range(3))
    th = threading.Thread(target=copier)
    th.start()
    try:
        loaded = min(compute() for _ in range(3))
    finally:
        stop.set()
        th.join()
    return {"alone_ms": alone * 1e3, "with_memcpy_ms": loaded * 1e3, "slowdown": loaded / alone}


def run_prefill(args: argparse.Namespace) -> dict[str, Any]:
    """Prefill latency: unpatched, moert with every expert cached, and per cache size plain vs
    overlapped waves; rounds interleave the configs; counters from the last round."""
    device = args.device
    model, described = build(device, args.seed, args.model)
    adapter = get_adapter(model)
    gate_up = adapter.moe_layers()[0].experts.gate_up_proj
    layout = ExpertLayout(hidden=gate_up.shape[2], intermediate=gate_up.shape[1] // 2, dtype=gate_up.dtype)
    cfg = model.config
    n_tok = args.batch * args.prefill_len

    def prompt(seed: int) -> torch.Tensor:
        return prompt_ids(args.batch, args.prefill_len, vocab=cfg.vocab_size, seed=seed).to(device)

    warm = prompt(args.seed + 10_000)  # run once after each patch, untimed (also warms the cache)
    prompts = [prompt(args.seed + 1 + i) for i in range(args.prefill_prompts)]
    # (name, cache, overlap); cache None = unpatched
    configs: list[tuple[str, int | float | None, bool]] = [
        ("unpatched", None, False),
        ("moert 1.0 (every expert cached)", 1.0, False),
    ]
    for c in args.prefill_caches:
        configs += [(f"moert {c:g} waves", c, False), (f"moert {c:g} overlapped waves", c, True)]
    lat: dict[str, list[float]] = {c[0]: [] for c in configs}
    last: dict[str, Any] = {}
    for _ in range(args.rounds):
        for name, cache, overlap in configs:
            if cache is None:
                with torch.no_grad():
                    model(warm, use_cache=False)
                times, logits = prefill(model, prompts, device)
                lat[name] += times
                last[name] = (logits, None, None)
                continue
            handle = moert.patch(
                model, cache_experts=cache, policy="lru", device=device, overlap_waves=overlap
            )
            try:
                with torch.no_grad():
                    model(warm, use_cache=False)
                handle.reset_stats()  # counters cover the timed prefills only
                times, logits = prefill(model, prompts, device)
                st = handle.stats()
            finally:
                handle.undo()
            lat[name] += times
            last[name] = (logits, st, handle.num_slots)
    base = statistics.median(lat["unpatched"])
    cached = statistics.median(lat[configs[1][0]])
    ref_logits = last["unpatched"][0]
    resident_logits = last[configs[1][0]][0]
    n = args.prefill_prompts
    rows: list[dict[str, Any]] = []
    for name, cache, overlap in configs:
        logits, st, slots = last[name]
        med = statistics.median(lat[name])
        row: dict[str, Any] = {
            "config": name,
            "cache": cache,
            "overlap": overlap if cache is not None else None,
            "slots": slots,
            "prefill_ms_median": med * 1e3,
            "prefill_ms_p20": _q(lat[name], 0.2) * 1e3,
            "prefill_ms_p80": _q(lat[name], 0.8) * 1e3,
            "tok_s": n_tok / med,
            "x_unpatched": base / med,
            "x_cached": cached / med,
            "rel_err_vs_unpatched": ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item(),
            "identical_to_cached": bool(torch.equal(logits, resident_logits)) if cache is not None else None,
        }
        if st is not None:
            calls = sum(v.calls for v in st.per_layer.values())
            row.update(
                {
                    "hit_rate": st.hit_rate,
                    "misses_per_prefill": st.misses / n,
                    "prefetches_per_prefill": st.prefetches / n,
                    "prefetch_hits_per_prefill": st.prefetch_hits / n,
                    "prefetch_late_per_prefill": st.prefetch_late / n,
                    "waves_per_layer_call": sum(v.waves for v in st.per_layer.values()) / max(calls, 1),
                    "MB_per_prefill": st.bytes_copied / n / 1e6,
                    "copy_GB_s": st.bytes_copied / max(st.copy_busy_s, 1e-9) / 1e9,
                    "stall_ms_per_prefill": st.demand_stall_s / n * 1e3,
                    "copy_busy_ms_per_prefill": st.copy_busy_s / n * 1e3,
                    "device_stall_s": st.device_stall_s,
                    "exposed_copy": st.exposed_copy,
                }
            )
        rows.append(row)
    plain = {r["cache"]: r["prefill_ms_median"] for r in rows if r["overlap"] is False}
    for r in rows:
        r["overlap_speedup"] = plain[r["cache"]] / r["prefill_ms_median"] if r["overlap"] else None
    probe = None
    if device == "cpu":
        waved = [r["slots"] for r in rows if (r.get("waves_per_layer_call") or 1.0) > 1.0]
        total = len(adapter.moe_layers()) * adapter.num_experts
        probe = contention_probe(
            layout,
            rows=max(1, n_tok * adapter.top_k // adapter.num_experts),
            slots=min(waved) if waved else 16,
            pool_experts=min(total, max(1, (512 << 20) // layout.expert_bytes)),
        )
    return {
        "bench": "prefill",
        "device": device,
        "model": described,
        "model_dims": _model_dims(cfg, adapter, layout),
        "batch": args.batch,
        "prefill_len": args.prefill_len,
        "prompts": n,
        "rounds": args.rounds,
        "copy_lanes": envs.copy_streams(),
        "note": _note(device, args.model is not None),
        "cpu_contention": probe,
        "versions": _versions(),
        "rows": rows,
    }


def markdown_prefill(rec: dict[str, Any]) -> str:
    v = rec["versions"]
    d = rec["model_dims"]
    out = [
        f"# Prefill benchmark ({rec['device']}): plain vs overlapped waves",
        "",
        f"{rec['model']}; dims {d}; prompts of {rec['batch']} x {rec['prefill_len']} tokens, "
        f"{rec['prompts']} distinct prompts timed per config after one untimed warm-up prompt, x {rec['rounds']} "
        f"interleaved rounds (times pooled; counters from the last round, per prefill); {rec['copy_lanes']} copy lanes.",
        f"Note: {rec['note']}.",
        f"moert {v['moert']}, torch {v['torch']}, transformers {v['transformers']}, commit {v['commit']}, "
        f"{v['date']}, {v['device_name']}, {v['cpu_threads']} CPU threads, load average {v['load_avg_1m']} at the end.",
        "",
        "| config | slots | prefill ms median (p20-p80) | tok/s | x unpatched | x cached | overlap speed-up "
        "| waves/layer | misses | prefetch hits (late) | MB copied | copy GB/s | stall ms | exposed copy "
        "| = cached | rel err vs unpatched |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]

    def fmt(r: dict[str, Any], key: str, spec: str) -> str:
        val = r.get(key)
        return "-" if val is None else format(val, spec)

    for r in rec["rows"]:
        late = f" ({r['prefetch_late_per_prefill']:.0f})" if "prefetch_late_per_prefill" in r else ""
        out.append(
            f"| {r['config']} | {fmt(r, 'slots', 'd')} | {r['prefill_ms_median']:.1f} "
            f"({r['prefill_ms_p20']:.1f}-{r['prefill_ms_p80']:.1f}) | {r['tok_s']:.0f} | {r['x_unpatched']:.2f} "
            f"| {r['x_cached']:.2f} | {fmt(r, 'overlap_speedup', '.2f')} | {fmt(r, 'waves_per_layer_call', '.2f')} "
            f"| {fmt(r, 'misses_per_prefill', '.0f')} | {fmt(r, 'prefetch_hits_per_prefill', '.0f')}{late} "
            f"| {fmt(r, 'MB_per_prefill', '.1f')} | {fmt(r, 'copy_GB_s', '.1f')} | {fmt(r, 'stall_ms_per_prefill', '.1f')} "
            f"| {fmt(r, 'exposed_copy', '.2f')} | {fmt(r, 'identical_to_cached', '')} "
            f"| {r['rel_err_vs_unpatched']:.1e} |"
        )
    out += ["", *_prefill_notes(rec)]
    return "\n".join(out) + "\n"


def _prefill_notes(rec: dict[str, Any]) -> list[str]:
    """Reading notes computed from the rows (what overlapped waves gained at each cache size)."""
    rows = rec["rows"]
    plain = {r["cache"]: r for r in rows if r["overlap"] is False}
    notes = []
    for r in rows:
        if not r["overlap"]:
            continue
        p = plain[r["cache"]]
        if r.get("waves_per_layer_call", 1.0) <= 1.0:
            notes.append(
                f"- cache {r['cache']:g} ({r['slots']} slots): every layer's union fit the cache, one wave per "
                f"layer, so plain and overlapped ran the same code; their ratio {r['overlap_speedup']:.2f} is noise."
            )
        else:
            notes.append(
                f"- cache {r['cache']:g} ({r['slots']} slots): overlapped waves {r['overlap_speedup']:.2f}x the "
                f"plain waves' speed ({r['waves_per_layer_call']:.2f} waves per layer call; exposed copy "
                f"{r['exposed_copy']:.2f} of the copy time). Plain waves stalled {p['stall_ms_per_prefill']:.1f} ms "
                f"per prefill ({p['stall_ms_per_prefill'] / p['prefill_ms_median']:.0%} of it, the most overlap can "
                f"save), overlapped {r['stall_ms_per_prefill']:.1f} ms."
            )
    if rec["device"] == "cpu":
        notes.append(
            "- On the CPU twin a copy is a memcpy by the copy engine's worker threads (host memory to host "
            f"memory), so this measures the overlap of host copies with CPU compute (torch on "
            f"{rec['versions']['cpu_threads']} thread(s), the copy lanes on the other core). GPU numbers "
            "(PCIe copies on copy streams under GPU compute) come from `bench_decode.py --device cuda "
            "--prefill-len N`."
        )
    probe = rec.get("cpu_contention")
    if probe:
        notes.append(
            f"- Contention probe (same run): expert-shaped matmuls take {probe['with_memcpy_ms']:.0f} ms instead of "
            f"{probe['alone_ms']:.0f} ms ({probe['slowdown']:.2f}x) while another thread copies experts from the pool "
            "into their slots, as a copy lane does: here copies and compute share the memory system, so the "
            "stall that overlap hides comes back in part as slower compute. On a GPU the copies cross PCIe on "
            "the copy engines and take a small share of HBM bandwidth; the GPU run shows what overlap gains there."
        )
    notes.append(
        "- 'x cached': speed relative to moert with every expert cached (the same per-expert compute, no "
        "copies after warm-up); 'x unpatched': relative to the model's own experts implementation. "
        "'= cached': logits bit-identical to the every-expert-cached run; 'exposed copy': acquire stall / "
        "copy-lane busy time."
    )
    return notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--model", type=Path, default=None, help="a local model directory instead of the built-in model"
    )
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
        "--predictor", type=Path, default=None, help="a trained preattn predictor file for this model"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds over all configs, latencies pooled (default 3 on CPU; 1 on CUDA, where each "
        "patch/undo moves ~29 GB)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared 2-core box)"
    )
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
    p.add_argument(
        "--prefill-prompts",
        type=int,
        default=6,
        help="prefill mode: distinct prompts timed per config and round",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output stem (default bench/results/decode_<device>, or prefill_<device> in prefill mode)",
    )
    args = p.parse_args()
    if args.rounds is None:
        args.rounds = 1 if args.device == "cuda" else 3
    if args.prefill_len is not None and (args.prefill_len < 1 or args.prefill_prompts < 1):
        p.error(f"--prefill-len {args.prefill_len} and --prefill-prompts {args.prefill_prompts} must be >= 1")
    torch.set_num_threads(args.threads)
    mode = "decode" if args.prefill_len is None else "prefill"
    rec = run(args) if mode == "decode" else run_prefill(args)
    stem = args.out or RESULTS / f"{mode}_{args.device}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(rec, indent=2) + "\n")
    md = markdown(rec) if mode == "decode" else markdown_prefill(rec)
    stem.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
