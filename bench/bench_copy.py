"""Copy throughput of the CopyEngine vs chunk (expert) size and lanes, against torch in the same run.

CPU (the CPU twin): the engine's worker threads memcpy pool entries into cache slots; the
baseline is ``torch.Tensor.copy_`` of the same bytes between the same buffers (slot views from
pool views), chunk by chunk. Goal: engine / torch >= 0.8.
GPU: H2D through the engine (pinned pool -> device slots on K streams) against
``slot.copy_(pool_entry, non_blocking=True)`` from the same pinned memory. Goal: >= 0.9.
sim (the device model, each copy stream at ``--sim-bandwidth-gbs``): no torch baseline (its copies
are modelled); the engine's throughput against the configured ``lanes x bandwidth`` (goal: >= 0.9,
the pipelined lanes leave no gap between copies), and the latency of ``acquire`` of n misses over
l lanes, as the compute stream sees it (timing events, modelled time) against ceil(n/l) copy times.

Each repeat loads N = total / chunk experts that are not resident (the pool holds 2N entries and
alternates halves), timing prefetch() -> synchronize(). Engine and torch repeats are interleaved
so that drift on a shared machine hits both alike. Reports median and p20/p80 GB/s.

Usage: python bench/bench_copy.py [--device cpu|cuda|sim] [--total-mb 256] [--repeats 10] [--out bench/results]
       python bench/bench_copy.py --device sim --chunks 16 --lanes 2 [--sim-bandwidth-gbs 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moert.engine.native_args import CudaArray, host_view
from moert.engine.runtime import CopyEngine, ExpertPool, SimTiming, SlabCache
from moert.provenance import device_name, git_commit

CHUNKS_MB = (1, 4, 16, 64)
LANES = (1, 2, 4)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _gbps(ts: list[float], nbytes: int) -> dict:
    """Median and p20/p80 of GB/s over the timed repeats."""
    gbps = np.array([nbytes / t / 1e9 for t in ts])
    return {
        "median_gbps": float(np.median(gbps)),
        "p20_gbps": float(np.percentile(gbps, 20)),
        "p80_gbps": float(np.percentile(gbps, 80)),
    }


def _fresh_load_ok(
    engine: CopyEngine, cache: SlabCache, layer: int, experts: list[int], src: list, chunk: int
) -> bool:
    """Loads ``layer`` (the one the cache does not hold now) with the engine and checks the first four
    slots byte-exactly against the pool."""
    engine.prefetch(layer, experts)
    engine.synchronize()
    return all(
        torch.equal(cache.slot_view(cache.lookup(layer, e), torch.uint8, (chunk,)).cpu(), src[e].cpu())
        for e in experts[:4]
    )


def measure(device: str, chunk_mb: int, lanes: int, total_mb: int, repeats: int, warmup: int) -> dict:
    chunk = chunk_mb << 20
    n = max(1, total_mb // chunk_mb)
    pool = ExpertPool(2, n, chunk)  # layer 0 and layer 1 alternate: every repeat loads n misses
    for layer in range(2):
        for e in range(n):
            pool.fill(layer, e, torch.full((chunk,), (layer * n + e) % 251, dtype=torch.uint8))
    cache = SlabCache(pool, n, device=device)
    engine = CopyEngine(cache, lanes)
    experts = list(range(n))
    slots = list(range(n))
    dst = [cache.slot_view(s, torch.uint8, (chunk,)) for s in slots]
    src = [[pool.view(layer, e, torch.uint8, (chunk,)) for e in experts] for layer in range(2)]
    # the same bytes as one region each (stride == chunk here): torch's best case, a single copy_
    assert pool.stride == chunk
    total = n * chunk
    src_all = [host_view(pool.address(layer, 0), total, pool._c, torch.uint8, (total,)) for layer in range(2)]
    if device == "cuda":
        dst_all = torch.as_tensor(CudaArray(cache._c.slot_address(0), total, cache._c), device="cuda")
    else:
        dst_all = host_view(cache._c.slot_address(0), total, cache._c, torch.uint8, (total,))

    def run_engine(layer: int) -> float:
        t0 = time.perf_counter()
        engine.prefetch(layer, experts)
        engine.synchronize()
        return time.perf_counter() - t0

    def run_torch(layer: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for d, s in zip(dst, src[layer]):
            d.copy_(s, non_blocking=device == "cuda")
        _sync(device)
        return time.perf_counter() - t0

    def run_bulk(layer: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        dst_all.copy_(src_all[layer], non_blocking=device == "cuda")
        _sync(device)
        return time.perf_counter() - t0

    t_engine, t_torch, t_bulk = [], [], []
    for i in range(warmup + repeats):
        layer = i % 2
        te = run_engine(layer)
        tt = run_torch(1 - layer)  # slots now hold `layer`: torch overwrites them, the cache does not know
        tb = run_bulk(layer)
        if i >= warmup:
            t_engine.append(te)
            t_torch.append(tt)
            t_bulk.append(tb)
    # check a fresh engine load (the layer the cache does not hold now) byte-exactly
    check = 1 - (warmup + repeats - 1) % 2
    ok = _fresh_load_ok(engine, cache, check, experts, src[check], chunk)
    stats = cache.stats()
    engine.close()
    cache.close()
    nbytes = n * chunk
    eng, ref, bulk = (_gbps(ts, nbytes) for ts in (t_engine, t_torch, t_bulk))
    return {
        "device": device,
        "chunk_mb": chunk_mb,
        "lanes": lanes,
        "copies_per_repeat": n,
        "bytes_per_repeat": nbytes,
        "engine": eng,
        "torch_copy": ref,
        "torch_bulk_copy": bulk,
        "ratio": eng["median_gbps"] / ref["median_gbps"],
        "ratio_bulk": eng["median_gbps"] / bulk["median_gbps"],
        "correct": bool(ok and stats["bytes_loaded"] == stats["loads"] * chunk),
    }


def _cell(s: dict) -> str:
    return f"{s['median_gbps']:.2f} ({s['p20_gbps']:.2f}-{s['p80_gbps']:.2f})"


def _spread(values: list[float], scale: float = 1.0) -> dict:
    v = np.asarray(values) * scale
    return {
        "median": float(np.median(v)),
        "p20": float(np.percentile(v, 20)),
        "p80": float(np.percentile(v, 80)),
    }


def measure_sim(
    timing: SimTiming, chunk_mb: int, lanes: int, total_mb: int, repeats: int, warmup: int
) -> dict:
    """The device model: prefetch() -> synchronize() of N = total / chunk misses, GB/s against the
    configured lanes x bandwidth; every slot's bytes checked against the pool at the end."""
    chunk = chunk_mb << 20
    n = max(1, total_mb // chunk_mb)
    pool = ExpertPool(2, n, chunk)
    for layer in range(2):
        for e in range(n):
            pool.fill(layer, e, torch.full((chunk,), (layer * n + e) % 251, dtype=torch.uint8))
    cache = SlabCache(pool, n, device="sim", sim=timing)
    engine = CopyEngine(cache, lanes)
    experts = list(range(n))
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        engine.prefetch(i % 2, experts)
        engine.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    last = (warmup + repeats - 1) % 2
    ok = all(
        torch.equal(
            cache.slot_view(cache.lookup(last, e), torch.uint8, (chunk,)).cpu(),
            pool.view(last, e, torch.uint8, (chunk,)),
        )
        for e in experts
    )
    stats = cache.stats()
    engine.close()
    cache.close()
    nbytes = n * chunk
    gbps = [nbytes / t / 1e9 for t in times]
    eng = {
        "median_gbps": float(np.median(gbps)),
        "p20_gbps": float(np.percentile(gbps, 20)),
        "p80_gbps": float(np.percentile(gbps, 80)),
    }
    configured = lanes * timing.bandwidth_gbs
    return {
        "device": "sim",
        "chunk_mb": chunk_mb,
        "lanes": lanes,
        "copies_per_repeat": n,
        "bytes_per_repeat": nbytes,
        "engine": eng,
        "configured_gbps": configured,
        "ratio": eng["median_gbps"] / configured,
        "correct": bool(ok and stats["bytes_loaded"] == stats["loads"] * chunk),
    }


def measure_sim_acquire(timing: SimTiming, chunk_mb: int, lanes: int, n: int, repeats: int) -> dict:
    """acquire of n misses on a modelled compute stream: the stream's time from a timing event just
    before the call to one after its waits (every copy landed), and the host's time in the call."""
    chunk = chunk_mb << 20
    pool = ExpertPool(2, n, chunk)
    cache = SlabCache(pool, n, device="sim", sim=timing)
    engine = CopyEngine(cache, lanes)
    dev = cache.sim_device()
    stream = dev.create_stream()
    experts = list(range(n))
    device_s, host_s = [], []
    for i in range(repeats + 1):  # the first one warms up
        before, after = dev.event(timing=True), dev.event(timing=True)
        dev.synchronize(stream)
        before.record(stream)
        t0 = time.perf_counter()
        engine.acquire(i % 2, experts, stream=stream)
        t1 = time.perf_counter()
        after.record(stream)
        engine.release(i % 2, experts, stream=stream)
        after.synchronize()
        if i:
            device_s.append(after.seconds_since(before))
            host_s.append(t1 - t0)
    engine.close()
    cache.close()
    copy_s = timing.copy_seconds(chunk)
    want = math.ceil(n / lanes) * copy_s
    dev_ms = _spread(device_s, 1e3)
    return {
        "chunk_mb": chunk_mb,
        "lanes": lanes,
        "misses": n,
        "copy_ms": copy_s * 1e3,
        "ceil_n_over_l_copies_ms": want * 1e3,
        "device_ms": dev_ms,
        "host_acquire_ms": _spread(host_s, 1e3),
        "ratio": dev_ms["median"] / (want * 1e3),
    }


def main_sim(args: argparse.Namespace, meta: dict) -> int:
    timing = SimTiming(bandwidth_gbs=args.sim_bandwidth_gbs, latency_us=args.sim_latency_us)
    meta.update({"sim_bandwidth_gbs_per_lane": timing.bandwidth_gbs, "sim_latency_us": timing.latency_us})
    print(
        f"# device model: {timing.bandwidth_gbs} GB/s per lane, {timing.latency_us} us per copy; host {meta['device_name']}"
    )
    rows, lat = [], []
    for chunk_mb in args.chunks:
        for lanes in args.lanes:
            r = measure_sim(timing, chunk_mb, lanes, args.total_mb, args.repeats, args.warmup)
            rows.append(r)
            print(
                f"{chunk_mb:>4}MB {lanes:>2} lanes: {_cell(r['engine'])} GB/s of {r['configured_gbps']:.2f} configured"
                f" = {r['ratio']:.2f}" + ("" if r["correct"] else "  WRONG BYTES")
            )
            for n in args.misses:
                a = measure_sim_acquire(timing, chunk_mb, lanes, n, args.repeats)
                lat.append(a)
                print(
                    f"    acquire {n} misses: stream {a['device_ms']['median']:.2f} ms vs ceil(n/l) copies "
                    f"{a['ceil_n_over_l_copies_ms']:.2f} ms ({a['ratio']:.2f}); host {a['host_acquire_ms']['median']:.2f} ms"
                )
    meta["loadavg_at_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"copy_sim{args.tag}"
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows, "acquire": lat}, indent=2) + "\n"
    )
    lines = [
        "# CopyEngine on the device model (sim)",
        "",
        f"Device model: every copy stream at {timing.bandwidth_gbs} GB/s, {timing.latency_us} us per copy "
        f"(one {args.chunks[0]} MB copy = {timing.copy_seconds(args.chunks[0] << 20) * 1e3:.2f} ms). Host "
        f"{meta['device_name']}; torch {meta['torch']}, python {meta['python']}, commit {meta['commit']}, "
        f"{meta['date']}; {args.total_mb} MB per repeat, median of {args.repeats} (p20-p80); load average "
        f"{meta['loadavg_at_start']:.1f} -> {meta['loadavg_at_end']:.1f}.",
        "",
        "Throughput: `prefetch` of every expert then `synchronize`, host wall time; the goal is >= 0.9 of "
        "the configured lanes x bandwidth (pipelined lanes: no gap between a lane's copies).",
        "",
        "| chunk | lanes | engine GB/s | configured GB/s | engine / configured |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['chunk_mb']} MB | {r['lanes']} | {_cell(r['engine'])} | {r['configured_gbps']:.2f} | {r['ratio']:.2f} |"
        )
    lines += [
        "",
        "Acquire latency: `acquire` of n misses on a modelled compute stream, from a timing event recorded "
        "just before the call to one recorded after it (the stream's waits: every copy landed), modelled "
        "time; the goal is about ceil(n/l) copy times. `host` is the time the call blocked the host "
        "(it returns once the copies are issued).",
        "",
        "| chunk | lanes | misses | ceil(n/l) copies ms | stream ms | stream / ceil(n/l) copies | host ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in lat:
        d, h = a["device_ms"], a["host_acquire_ms"]
        lines.append(
            f"| {a['chunk_mb']} MB | {a['lanes']} | {a['misses']} | {a['ceil_n_over_l_copies_ms']:.2f} | "
            f"{d['median']:.2f} ({d['p20']:.2f}-{d['p80']:.2f}) | {a['ratio']:.2f} | "
            f"{h['median']:.2f} ({h['p20']:.2f}-{h['p80']:.2f}) |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")
    return 0 if all(r["correct"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda", "sim"]
    )
    parser.add_argument("--total-mb", type=int, default=256, help="bytes moved per repeat")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunks", type=int, nargs="+", default=list(CHUNKS_MB), help="chunk sizes in MB")
    parser.add_argument("--lanes", type=int, nargs="+", default=list(LANES))
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch.set_num_threads for the baselines (0: default)"
    )
    parser.add_argument("--tag", default="", help="suffix of the result files: copy_<device><tag>.json")
    parser.add_argument("--sim-bandwidth-gbs", type=float, default=2.0, help="sim: each copy stream's GB/s")
    parser.add_argument("--sim-latency-us", type=float, default=10.0, help="sim: latency of each copy")
    parser.add_argument(
        "--misses", type=int, nargs="+", default=[1, 2, 4, 6, 8], help="sim: misses per timed acquire"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    meta = {
        "device": args.device,
        "device_name": device_name(args.device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": os.getloadavg()[0],
        "total_mb": args.total_mb,
        "repeats": args.repeats,
    }
    if args.device == "sim":
        return main_sim(args, meta)
    rows = []
    header = (
        f"{'chunk':>6} {'lanes':>5} {'engine GB/s (p20-p80)':>24} {'copy_ per chunk':>24} {'ratio':>6}"
        f" {'one bulk copy_':>24} {'ratio':>6}"
    )
    print(f"# {meta['device_name']}, torch {meta['torch']}, commit {meta['commit']}")
    print(header)
    for chunk_mb in args.chunks:
        for lanes in args.lanes:
            r = measure(args.device, chunk_mb, lanes, args.total_mb, args.repeats, args.warmup)
            rows.append(r)
            cells = [_cell(r[k]) for k in ("engine", "torch_copy", "torch_bulk_copy")]
            print(
                f"{chunk_mb:>4}MB {lanes:>5} {cells[0]:>24} {cells[1]:>24} {r['ratio']:>6.2f}"
                f" {cells[2]:>24} {r['ratio_bulk']:>6.2f}" + ("" if r["correct"] else "  WRONG BYTES")
            )
    meta["loadavg_at_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"copy_{args.device}{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# CopyEngine copy throughput ({args.device})",
        "",
        f"{meta['device_name']}; torch {meta['torch']}, python {meta['python']}, commit {meta['commit']}, "
        f"{meta['date']}; torch threads {meta['torch_threads']}; {args.total_mb} MB per repeat, median of {args.repeats} (p20-p80); "
        f"load average {meta['loadavg_at_start']:.1f} -> {meta['loadavg_at_end']:.1f}.",
        "",
        "GB/s as median (p20-p80). `copy_ per chunk`: one `Tensor.copy_` per expert, the engine's "
        "granularity (the goal's baseline); `one bulk copy_`: all the bytes in a single call.",
        "",
        "| chunk | lanes | engine | copy_ per chunk | engine / copy_ | one bulk copy_ | engine / bulk |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [_cell(r[k]) for k in ("engine", "torch_copy", "torch_bulk_copy")]
        lines.append(
            f"| {r['chunk_mb']} MB | {r['lanes']} | {cells[0]} | {cells[1]} | {r['ratio']:.2f} | {cells[2]} "
            f"| {r['ratio_bulk']:.2f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
