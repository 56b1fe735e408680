"""Copy throughput of the CopyEngine vs chunk (expert) size and lanes, against torch in the same run.

CPU (the CPU twin): the engine's worker threads memcpy pool entries into cache slots; the
baseline is ``torch.Tensor.copy_`` of the same bytes between the same buffers (slot views from
pool views), chunk by chunk. Goal: engine / torch >= 0.8.
GPU: H2D through the engine (pinned pool -> device slots on K streams) against
``slot.copy_(pool_entry, non_blocking=True)`` from the same pinned memory. Goal: >= 0.9.

Each repeat loads N = total / chunk experts that are not resident (the pool holds 2N entries and
alternates halves), timing prefetch() -> synchronize(). Engine and torch repeats are interleaved
so that drift on a shared machine hits both alike. Reports median and p20/p80 GB/s.

Usage: python bench/bench_copy.py [--device cpu|cuda] [--total-mb 256] [--repeats 10] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moert.engine.native_args import CudaArray, host_view
from moert.engine.runtime import CopyEngine, ExpertPool, SlabCache
from moert.provenance import device_name, git_commit

CHUNKS_MB = (1, 4, 16, 64)
LANES = (1, 2, 4)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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
    engine.prefetch(check, experts)
    engine.synchronize()
    ok = all(
        torch.equal(cache.slot_view(cache.lookup(check, e), torch.uint8, (chunk,)), src[check][e])
        for e in experts[:4]
    )
    stats = cache.stats()
    engine.close()
    cache.close()
    nbytes = n * chunk

    def summary(ts: list[float]) -> dict:
        gbps = np.array([nbytes / t / 1e9 for t in ts])
        return {
            "median_gbps": float(np.median(gbps)),
            "p20_gbps": float(np.percentile(gbps, 20)),
            "p80_gbps": float(np.percentile(gbps, 80)),
        }

    eng, ref, bulk = summary(t_engine), summary(t_torch), summary(t_bulk)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
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
