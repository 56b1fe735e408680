"""Simulator benchmarks: replay speed, and policy ``score`` against lru/lfu/belady on the real traces.

``speed`` (default): expert accesses per second through the C++ replay loop (``SlabCache.simulated``).
Two measurements, each repeated; median and p20/p80 reported:
- ``replay``: one ``SlabCache.replay`` call over the whole token-major stream (one global cache);
- ``simulate``: :func:`moert.sim.simulate` end to end (per-layer caches, chunked, trace streaming), with
  ``lru`` and with ``utility+utility:2`` (a full priority row and a prefetch row after every call).
The stream is the shared DeepSeek-V2-Lite trace when present (converted once to the moert format
in a temporary directory), else a synthetic Zipf stream of the same shape. Writes
``bench/results/sim_speed.json`` with versions, commit and date.

``score``: the runtime's eviction policy ``score`` on the DeepSeek-V2-Lite-Chat puffin traces, next
to lru, lfu (the same prefetches) and belady, per-layer and global, on the held-out prompts. The
predictor is the xlayer of ``bench/results/predict_puffin.md`` (same split, seed, dims and
training: ``--epochs 5``), trained here unless ``--predictor`` names one that records that split.
Writes ``bench/results/sim_score_puffin.{json,md,png}``.

``hetero``: the heterogeneous cost model (CPU experts, DESIGN.md §7) on the puffin traces: lru, lfu and
belady per-layer at 0.1/0.25/0.5 on every prompt, predicted tok/s copy only and with CPU experts at the
calibrated ``--cpu-expert-ms`` (by default read from ``bench/results/cpu_expert_<host>.json``, made by
``bench/bench_cpu_expert.py``), with a sensitivity sweep over the CPU time (free: the misses per step
are replayed once) and an exact check of the model's one optimistic assumption: lru and lfu replayed
again step by step with the CPU-computed experts *not* entering the cache. Writes
``bench/results/sim_heterogeneous_puffin.{json,md,png}``.

``pays``: every policy of ``--policies`` (xlayer[:m]: the trained xlayer) on the held-out puffin prompts,
per-layer and global at 0.1/0.25/0.5, predicted at every (layer ms, GB/s) of the grid by the windowed cost
model, the pooled one beside it. Writes ``bench/results/sim_pays_puffin.{json,md,png}`` (see ``sim_pays.py``).

``speculative``: speculative decoding's verify passes (``SimConfig.verify_tokens`` N = gamma + 1,
DESIGN.md §7, MoE-SpAc) on the puffin traces: lru, lfu, utility, utility+utility:2, lru+utility:2 and
belady at N = 1, 3, 5, per-layer caches at 0.1/0.25/0.5 on every prompt and one global cache on the
first ``--global-prompts`` prompts; hit rate per layer call, token hit rate, loads per generated token,
predicted tok/s (a verify pass costs one token's compute; draft model free, every draft accepted).
Writes ``bench/results/sim_speculative_puffin.{json,md,png}``.

Usage::

    python bench/bench_sim.py [--repeats 5] [--out bench/results/sim_speed.json]
    python bench/bench_sim.py --what score [--predictor xlayer.safetensors] [--m 0,2,4]
    python bench/bench_sim.py --what hetero [--cpu-expert-ms 0.6] [--max-prompts N]
    python bench/bench_sim.py --what speculative [--verify-tokens 1,3,5] [--max-prompts N] [--global-prompts 250]
    python bench/bench_sim.py --what pays [--policies lru,...,score+xlayer:2] [--layer-ms 0.2,...] [--bandwidths 25,55]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moert import envs
from moert.cli.simulate import environment
from moert.engine import runtime
from moert.sim import SimConfig, parse_policies, simulate
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


RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--what", default="speed", choices=["speed", "score", "hetero", "speculative", "pays"]
    )
    parser.add_argument("--repeats", type=int, default=5, help="speed: repeats")
    parser.add_argument("--out", default=None, help="speed: JSON path; score: path stem (.json/.md/.png)")
    parser.add_argument("--predictor", default=None, help="score: an xlayer file recording the split")
    parser.add_argument(
        "--work", default="/tmp/moert-bench-sim-score", help="score: where the predictor goes"
    )
    parser.add_argument("--epochs", type=int, default=5, help="score: xlayer training epochs")
    parser.add_argument("--m", default="0,2,4", help="score: over-provisions m to compare")
    parser.add_argument(
        "--capacity",
        default=None,
        help="score/hetero: cache fractions (default 0.125,0.25,0.5 / 0.1,0.25,0.5)",
    )
    parser.add_argument(
        "--max-prompts",
        type=int,
        default=0,
        help="score: at most N held-out prompts; hetero: the first N prompts",
    )
    parser.add_argument(
        "--cpu-expert-ms",
        type=float,
        default=None,
        help="hetero: CPU ms per expert (default: --calibration's)",
    )
    parser.add_argument(
        "--calibration", default=None, help="hetero: a bench_cpu_expert.py JSON (default: this host's)"
    )
    parser.add_argument("--activation-us", type=float, default=20.0, help="hetero: activation round trip")
    parser.add_argument(
        "--exact-policies", default="lru,lfu", help="hetero: policies replayed with CPU experts not cached"
    )
    parser.add_argument("--verify-tokens", default="1,3,5", help="speculative: N = gamma + 1 values")
    parser.add_argument("--utility-decay", type=float, default=0.7, help="speculative: utility's decay")
    parser.add_argument(
        "--global-prompts",
        type=int,
        default=250,
        help="speculative: prompts of the global-cache run (0: none)",
    )
    parser.add_argument(
        "--policies",
        default="lru,lfu,belady,lru+oracle,lru+xlayer,score+xlayer:2",
        help="pays: EVICT[+PREFETCH] names; xlayer[:m] is the trained xlayer (add e.g. learned, budget)",
    )
    parser.add_argument("--evictor", default=None, help="pays: policy learned's reuse model (R.safetensors)")
    parser.add_argument("--layer-ms", default="0.2,0.5,1,2,4.5", help="pays: ms per MoE layer (grid)")
    parser.add_argument("--bandwidths", default="25,55", help="pays: GB/s (grid)")
    parser.add_argument("--no-progress", action="store_true", help="pays: no progress bar")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return speed(args) if args.what == "speed" else study(args.what)(args)


def study(what: str):
    """``score``, ``hetero`` or ``speculative``: the entry point in ``bench/sim_<what>.py``.

    Imported here, with bench/ put on ``sys.path`` first: ``python -P bench/bench_sim.py`` leaves it off.
    """
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return getattr(importlib.import_module(f"sim_{what}"), what)


def speed(args: argparse.Namespace) -> int:
    args.out = args.out or str(RESULTS / "sim_speed.json")
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

    for policy in ("lru", "utility+utility:2"):  # utility: a full priority row and a prefetch per call
        config = SimConfig(capacities=(0.25,), policies=tuple(parse_policies([policy])), mode="per-layer")
        rates = []
        for _ in range(max(1, args.repeats // 2) + 1):
            t0 = time.perf_counter()
            simulate(trace, config)
            rates.append(accesses / (time.perf_counter() - t0))
        rows[f"simulate-per-layer-{policy}-end-to-end"] = {
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
