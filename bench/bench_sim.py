"""Simulator speed: expert accesses per second through the C++ replay loop (``SlabCache.simulated``).

Two measurements, each repeated; median and p20/p80 reported:
- ``replay``: one ``SlabCache.replay`` call over the whole token-major stream (one global cache);
- ``simulate``: :func:`moert.sim.simulate` end to end (per-layer caches, chunked, trace streaming).
The stream is the shared DeepSeek-V2-Lite trace when present (converted once to the moert format
in a temporary directory), else a synthetic Zipf stream of the same shape. Writes
``bench/results/sim_speed.json`` with versions, commit and date.

Usage: ``python bench/bench_sim.py [--repeats 5] [--out bench/results/sim_speed.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moert import envs, runtime
from moert.sim import SimConfig, parse_policies, simulate
from moert.sim_cli import environment
from moert.trace import InMemoryTrace, SequenceTrace, TraceMeta, TraceWriter, open_trace


def load_stream() -> tuple[InMemoryTrace | object, str]:
    src = envs.shared_dir() / "data" / "traces" / "deepseek-v2-lite-chat-puffin"
    if src.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix="moert_bench_sim_"))
        trace = open_trace(src)
        with TraceWriter(tmp / "t", trace.meta) as w:
            for s in trace.sequences():
                w.add(s)
        return open_trace(tmp / "t"), f"shared trace {src.name} (converted)"
    rng = np.random.default_rng(0)
    L, E, k, T = 26, 64, 6, 96
    p = 1.0 / np.arange(1, E + 1)
    seqs = []
    for i in range(1000):
        ex = np.stack([[rng.choice(E, k, replace=False, p=p / p.sum()) for _ in range(T)] for _ in range(L)])
        seqs.append(SequenceTrace(i, torch.arange(T), torch.from_numpy(ex), torch.ones(T, dtype=torch.bool)))
    return InMemoryTrace(TraceMeta("synthetic", tuple(range(L)), E, k), seqs), "synthetic zipf stream"


def percentiles(xs: list[float]) -> dict:
    return {
        "median": float(np.median(xs)),
        "p20": float(np.percentile(xs, 20)),
        "p80": float(np.percentile(xs, 80)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sim_speed.json"))
    args = parser.parse_args()

    trace, what = load_stream()
    meta = trace.meta
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    experts = np.concatenate([s.experts.numpy() for s in trace.sequences()], axis=1).astype(
        np.int32
    )  # [L, N, k]
    N = experts.shape[1]
    steps = np.ascontiguousarray(experts.transpose(1, 0, 2)).reshape(N * L, k)  # token-major
    layers = np.tile(np.arange(L, dtype=np.int32), N)
    accesses = steps.size

    rows = {}
    for policy in ("lru", "lfu"):
        rates = []
        for _ in range(args.repeats + 1):  # the first run warms up
            cache = runtime.SlabCache.simulated(L, E, int(0.25 * L * E), policy=policy, min_slots=k)
            t0 = time.perf_counter()
            cache.replay(layers, steps)
            rates.append(accesses / (time.perf_counter() - t0))
            cache.close()
        rows[f"replay-global-{policy}"] = {"accesses": accesses, "accesses_per_s": percentiles(rates[1:])}

    config = SimConfig(capacities=(0.25,), policies=tuple(parse_policies(["lru"])), mode="per-layer")
    rates = []
    for _ in range(max(1, args.repeats // 2) + 1):
        t0 = time.perf_counter()
        simulate(trace, config)
        rates.append(accesses / (time.perf_counter() - t0))
    rows["simulate-per-layer-lru-end-to-end"] = {
        "accesses": accesses,
        "accesses_per_s": percentiles(rates[1:]),
    }

    result = {
        "stream": what,
        "tokens": N,
        "layers": L,
        "experts": E,
        "top_k": k,
        "results": rows,
        **environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, row in rows.items():
        r = row["accesses_per_s"]
        print(
            f"{name:40s} {r['median'] / 1e6:7.2f} M accesses/s (p20 {r['p20'] / 1e6:.2f}, p80 {r['p80'] / 1e6:.2f})"
        )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
