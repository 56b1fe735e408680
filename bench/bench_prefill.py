"""Prefill mode of ``bench/bench_decode.py`` (``--prefill-len N``): plain vs overlapped waves.

Run through ``python bench/bench_decode.py --prefill-len N ...`` (its module docstring describes the mode);
this module holds the measurement, the rows and the Markdown.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from _one_pool import setup_line, sweep
from bench_decode import _model_dims, _note, _q, _sync, _versions, load

from moert import envs
from moert.engine.devices import tensor_device
from moert.engine.layout import ExpertLayout
from moert.models.tiny import prompt_ids


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


#: (name, cache, overlap); cache None = unpatched
PrefillConfig = tuple[str, int | float | None, bool]


def prefill_configs(args: argparse.Namespace) -> list[PrefillConfig]:
    """Unpatched, every expert cached, and per ``--prefill-caches`` size plain and overlapped waves."""
    configs: list[PrefillConfig] = [
        ("unpatched", None, False),
        ("moert 1.0 (every expert cached)", 1.0, False),
    ]
    for c in args.prefill_caches:
        configs += [(f"moert {c:g} waves", c, False), (f"moert {c:g} overlapped waves", c, True)]
    return configs


def prefill_rounds(
    args: argparse.Namespace,
    model: Any,
    warm: torch.Tensor,
    prompts: list[torch.Tensor],
    configs: list[PrefillConfig],
) -> tuple[dict[str, list[float]], dict[str, Any], dict[str, Any]]:
    """Seconds per prompt per config pooled over the rounds, each config's last (logits, stats, slots)
    and the set-up times. The model is patched once; the moert configs are reached by
    ``PatchHandle.reconfigure`` over the same pool and interleaved per round, the unpatched runs
    come half before the patch and half after the undo (``_one_pool.sweep``). ``warm`` runs once
    after each switch, untimed."""
    device = args.device
    lat: dict[str, list[float]] = {c[0]: [] for c in configs}
    last: dict[str, Any] = {}

    def unpatched() -> None:
        with torch.no_grad():
            model(warm, use_cache=False)
        times, logits = prefill(model, prompts, device)
        lat["unpatched"] += times
        last.setdefault("unpatched", (logits, None, None))

    def measure(name: str, handle: Any) -> None:
        with torch.no_grad():
            model(warm, use_cache=False)
        handle.reset_stats()  # counters cover the timed prefills only
        times, logits = prefill(model, prompts, device)
        lat[name] += times
        last[name] = (logits, handle.stats(), handle.num_slots)

    patched = [
        (name, dict(cache_experts=cache, policy="lru", overlap_waves=overlap))
        for name, cache, overlap in configs
        if cache is not None
    ]
    setup = sweep(
        model, device, patched, args.rounds, measure, unpatched, lambda: _sync(device), args.deadline
    )
    return lat, last, setup


def stats_columns(st: Any, n: int) -> dict[str, Any]:
    """A patched config's counters, per prefill of the last round."""
    calls = sum(v.calls for v in st.per_layer.values())
    return {
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


def prefill_rows(
    args: argparse.Namespace, configs: list[PrefillConfig], lat: dict[str, list[float]], last: dict[str, Any]
) -> list[dict[str, Any]]:
    """One row per config: times, ratios to unpatched and to every-expert-cached, exactness, counters."""
    base = statistics.median(lat["unpatched"])
    cached = statistics.median(lat[configs[1][0]])
    ref_logits = last["unpatched"][0]
    resident_logits = last[configs[1][0]][0]
    n = args.prefill_prompts
    n_tok = args.batch * args.prefill_len
    rows: list[dict[str, Any]] = []
    for name, cache, overlap in (c for c in configs if c[0] in last):  # skipped at the run budget: no row
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
            row.update(stats_columns(st, n))
        rows.append(row)
    plain = {r["cache"]: r["prefill_ms_median"] for r in rows if r["overlap"] is False}
    for r in rows:
        r["overlap_speedup"] = plain[r["cache"]] / r["prefill_ms_median"] if r["overlap"] else None
    return rows


def run_prefill(args: argparse.Namespace) -> dict[str, Any]:
    """Prefill latency: unpatched, moert with every expert cached, and per cache size plain vs
    overlapped waves; rounds interleave the configs; counters from the last round."""
    device = args.device
    model, described, adapter, layout = load(args)
    cfg = model.config
    n_tok = args.batch * args.prefill_len

    def prompt(seed: int) -> torch.Tensor:
        return prompt_ids(args.batch, args.prefill_len, vocab=cfg.vocab_size, seed=seed).to(
            tensor_device(device)
        )

    warm = prompt(args.seed + 10_000)  # run once after each patch, untimed (also warms the cache)
    prompts = [prompt(args.seed + 1 + i) for i in range(args.prefill_prompts)]
    configs = prefill_configs(args)
    lat, last, setup = prefill_rounds(args, model, warm, prompts, configs)
    rows = prefill_rows(args, configs, lat, last)
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
        "prompts": args.prefill_prompts,
        "rounds": setup["rounds_run"],
        "copy_lanes": envs.copy_streams(),
        "note": _note(device, args.model is not None),
        "cpu_contention": probe,
        "setup": setup,
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
        setup_line(rec["setup"]),
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
