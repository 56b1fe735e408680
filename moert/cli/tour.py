"""``moert tour``: a short tour of the runtime on the CPU twin (or CUDA with ``--device cuda``).

Fills an ExpertPool, runs a SlabCache of fewer slots than experts through a realistic decode-time
expert-access stream (per layer a zipf-skewed expert popularity, plus temporal locality: each of a
token's top-k experts repeats the previous token's choice at that layer with some probability),
with the CopyEngine prefetching the next layer's experts as a stand-in predictor with imperfect
recall would guess them (each true expert with probability ``recall``, plus one wrong guess)
while the current layer "computes". Every acquired slot is checked against its expert's bytes. The same stream is then
replayed through the simulated cache to show that the simulator makes the engine's decisions.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["TourConfig", "add_arguments", "run", "make_stream", "tour"]


@dataclass(frozen=True)
class TourConfig:
    layers: int = 8
    experts: int = 64
    top_k: int = 6
    slots: int = 0  # 0: a quarter of layers * experts
    slab_kb: int = 256
    policy: str = "lru"
    tokens: int = 200
    streams: int = 2
    prefetch: bool = True
    repeat: float = 0.5
    recall: float = 0.6
    zipf: float = 1.1
    device: str = "cpu"
    seed: int = 0


def make_stream(cfg: TourConfig) -> tuple[np.ndarray, np.ndarray]:
    """Decode-order accesses.

    Returns:
        layers: (T*L,) int32, layer of each step (0..L-1 for every token).
        experts: (T*L, k) int32, distinct experts of each step.
    """
    rng = np.random.default_rng(cfg.seed)
    weights = 1.0 / np.arange(1, cfg.experts + 1) ** cfg.zipf
    weights /= weights.sum()
    popular = [rng.permutation(cfg.experts) for _ in range(cfg.layers)]  # per-layer popularity order
    prev = [popular[layer][: cfg.top_k].copy() for layer in range(cfg.layers)]
    experts = np.empty((cfg.tokens * cfg.layers, cfg.top_k), dtype=np.int32)
    for t in range(cfg.tokens):
        for layer in range(cfg.layers):
            keep = prev[layer][rng.random(cfg.top_k) < cfg.repeat]
            chosen = list(dict.fromkeys(keep.tolist()))
            while len(chosen) < cfg.top_k:
                e = int(popular[layer][rng.choice(cfg.experts, p=weights)])
                if e not in chosen:
                    chosen.append(e)
            prev[layer] = np.array(chosen, dtype=np.int32)
            experts[t * cfg.layers + layer] = prev[layer]
    layers = np.tile(np.arange(cfg.layers, dtype=np.int32), cfg.tokens)
    return layers, experts


def tour(cfg: TourConfig, progress: bool = True) -> dict:
    """Runs the tour and returns its numbers (see ``run`` for the printed form)."""
    import torch
    from tqdm import tqdm

    from moert.engine.runtime import CopyEngine, ExpertPool, SlabCache

    slab = cfg.slab_kb * 1024
    slots = cfg.slots or max(cfg.top_k, cfg.layers * cfg.experts // 4)
    layers, experts = make_stream(cfg)

    t0 = time.perf_counter()
    pool = ExpertPool(cfg.layers, cfg.experts, slab)
    buf = torch.empty(slab // 4, dtype=torch.int32)  # (slab/4,) int32: every word is the expert's tag
    for layer in range(cfg.layers):
        for e in range(cfg.experts):
            pool.fill(layer, e, buf.fill_(layer * cfg.experts + e))
    fill_s = time.perf_counter() - t0

    cache = SlabCache(pool, slots, policy=cfg.policy, device=cfg.device, min_slots=cfg.top_k)
    engine = CopyEngine(cache, cfg.streams)
    rng = np.random.default_rng(cfg.seed + 1)
    mismatches = checked = 0
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.tokens), desc="tokens", unit="tok", disable=None if progress else True)
    for t in bar:
        for layer in range(cfg.layers):
            i = t * cfg.layers + layer
            if cfg.prefetch and layer + 1 < cfg.layers:
                # while this layer computes, fetch what a predictor guesses the next layer needs
                truth = experts[i + 1]
                guess = truth[rng.random(cfg.top_k) < cfg.recall].tolist() + [int(rng.integers(cfg.experts))]
                engine.prefetch(layer + 1, guess)
            ids = experts[i]
            got = engine.acquire(layer, ids)
            mismatches += _bad_slots(cache, got, [layer * cfg.experts + e for e in ids.tolist()], slab)
            checked += len(got) * slab
            engine.release(layer, ids)
        if t % 20 == 0:
            s = cache.stats()
            bar.set_postfix(hit=f"{s['hits'] / max(1, s['hits'] + s['misses']):.2f}")
    engine.synchronize()
    wall = time.perf_counter() - t0
    stats, estats = cache.stats(), engine.stats()
    engine.close()
    cache.close()

    # The simulator makes the same decisions (exactly so without prefetch, where timing cannot matter).
    sim = SlabCache.simulated(
        cfg.layers, cfg.experts, slots, policy=cfg.policy, slab_bytes=slab, min_slots=cfg.top_k
    )
    t1 = time.perf_counter()
    replayed = sim.replay(layers, experts)
    sim_s = time.perf_counter() - t1
    accesses = int(experts.size)
    return {
        "config": asdict(cfg) | {"slots": slots},
        "accesses": accesses,
        "hits": stats["hits"],
        "misses": stats["misses"],
        "hit_rate": stats["hits"] / max(1, accesses),
        "prefetches": stats["prefetches"],
        "prefetch_hits": stats["prefetch_hits"],
        "prefetch_wasted": stats["prefetch_wasted"],
        "prefetch_cancelled": stats["prefetch_cancelled"],
        "evictions": stats["evictions"],
        "bytes_loaded": stats["bytes_loaded"],
        "copies": estats["copies"],
        "copy_gbps": estats["bytes"] / max(estats["busy_s"], 1e-12) / 1e9,
        "demand_stall_s": estats["demand_stall_s"],
        "tokens_per_s": cfg.tokens / wall,
        "wall_s": wall,
        "fill_s": fill_s,
        "mismatches": mismatches,
        "checked_bytes": checked,
        "sim_hit_rate_no_prefetch": replayed["hits"] / max(1, accesses),
        "sim_accesses_per_s": accesses / max(sim_s, 1e-12),
    }


def _bad_slots(cache: Any, slots: list[int], tags: list[int], slab: int) -> int:
    """How many of ``slots`` do not hold their expert's tag in every word (every device: on CUDA the read
    is ordered after the copy by the stream wait that acquire made, and ``.cpu()`` waits for it)."""
    import torch

    bad = 0
    for s, tag in zip(slots, tags):
        words = cache.slot_view(s, torch.int32, (slab // 4,)).cpu()  # [slab/4]
        bad += not bool((words == tag).all())
    return bad


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TourConfig()
    parser.add_argument("--layers", type=int, default=d.layers, help="MoE layers L")
    parser.add_argument("--experts", type=int, default=d.experts, help="routed experts per layer E")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="experts per token per layer")
    parser.add_argument("--slots", type=int, default=d.slots, help="cache slots (0: L*E/4)")
    parser.add_argument("--slab-kb", type=int, default=d.slab_kb, help="bytes per expert, in KiB")
    parser.add_argument("--policy", default=d.policy, choices=["lru", "lfu", "priority"])
    parser.add_argument("--tokens", type=int, default=d.tokens, help="decode steps")
    parser.add_argument("--streams", type=int, default=None, help="copy lanes (default MOERT_COPY_STREAMS)")
    parser.add_argument("--no-prefetch", action="store_true", help="demand loads only")
    parser.add_argument("--device", default=d.device, choices=["cpu", "sim", "cuda"])
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")


def run(args: argparse.Namespace) -> int:
    from moert import envs

    for name in ("layers", "experts", "top_k", "slab_kb", "tokens"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.top_k > args.experts:
        raise SystemExit(f"--top-k {args.top_k} is larger than --experts {args.experts}")
    cfg = TourConfig(
        layers=args.layers,
        experts=args.experts,
        top_k=args.top_k,
        slots=args.slots,
        slab_kb=args.slab_kb,
        policy=args.policy,
        tokens=args.tokens,
        streams=args.streams or envs.copy_streams(),
        prefetch=not args.no_prefetch,
        device=args.device,
        seed=args.seed,
    )
    out = tour(cfg, progress=not args.json)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0 if out["mismatches"] == 0 else 1
    c = out["config"]
    print(
        f"pool: {c['layers']} layers x {c['experts']} experts x {c['slab_kb']} KiB "
        f"(filled in {out['fill_s']:.2f} s); cache: {c['slots']} slots ({c['policy']}) on {c['device']}, "
        f"{c['streams']} copy lanes, top-{c['top_k']}, prefetch {'on' if c['prefetch'] else 'off'}"
    )
    print(
        f"accesses {out['accesses']}: hits {out['hits']}  misses {out['misses']}  "
        f"hit rate {out['hit_rate']:.3f}  evictions {out['evictions']}"
    )
    print(
        f"prefetches {out['prefetches']}: used {out['prefetch_hits']}  wasted {out['prefetch_wasted']}  "
        f"cancelled {out['prefetch_cancelled']}"
    )
    print(
        f"bytes loaded {out['bytes_loaded'] / 2**20:.1f} MiB in {out['copies']} copies at "
        f"{out['copy_gbps']:.2f} GB/s per lane-second; demand stall {out['demand_stall_s'] * 1e3:.1f} ms"
    )
    print(
        f"throughput {out['tokens_per_s']:.0f} tokens/s ({out['wall_s']:.2f} s); slot checks: {out['mismatches']} mismatches in {out['checked_bytes'] / 1e6:.1f} MB checked"
    )
    print(
        f"simulator replay (no prefetch): hit rate {out['sim_hit_rate_no_prefetch']:.3f} "
        f"at {out['sim_accesses_per_s'] / 1e6:.1f} M accesses/s"
    )
    return 0 if out["mismatches"] == 0 else 1
