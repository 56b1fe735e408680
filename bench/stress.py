"""Stress: randomized pool / cache / copy-engine operations across threads, every slot's bytes
checksummed at every use against the pool.

Each worker thread draws operations from its own seeded generator: demand acquires (plain, or
deferred with a wait per expert) of 1-4 experts followed by a byte-for-byte check of each slot
against the pool and a release; prefetches; priority updates; predictions (clear + priorities +
prefetch, the copy engine's prediction path); and, once, a close of the engine while the other
threads still run (their calls must then fail cleanly with RuntimeError, nothing else). At the end
the cache's and the engine's counters must satisfy their invariants.

A failure prints the base seed; ``--seed S`` reproduces the run's draws (thread interleavings vary,
so a race may need a few runs).

    python bench/stress.py --ops 1000000          # make stress: the million, recorded in bench/results
    python bench/stress.py --ops 100000 --no-record   # the CI slice (tests/csrc/test_stress.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moert.engine.runtime import CopyEngine, ExpertPool, SlabCache
from moert.provenance import device_name, git_commit, modified_files, utc_now, versions

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class StressReport:
    """What a run did and found."""

    device: str
    seed: int
    threads: int
    ops: int
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    checked_bytes: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


#: reads a slot's bytes on the host once the work queued on the caller's stream is done:
#: (cache, slot, nbytes) -> uint8 tensor
SlotReader = Callable[[SlabCache, int, int], torch.Tensor]


class _World:
    """A filled pool (each entry a distinct pseudo-random slab), its cache and engine. ``stream``
    is the callers' stream handle (None: the engine's default), ``read_slot`` how slots are read
    (None: ``slot_view(...).cpu()``)."""

    def __init__(
        self,
        device: str,
        layers: int,
        experts: int,
        slab: int,
        slots: int,
        lanes: int,
        policy: str,
        stream: int | None = None,
        read_slot: SlotReader | None = None,
    ):
        self.layers, self.experts, self.slab = layers, experts, slab
        self.pool = ExpertPool(layers, experts, slab)
        self.expected = {}
        for layer in range(layers):
            for e in range(experts):
                data = np.random.default_rng(layer * 7919 + e).integers(0, 256, slab, dtype=np.uint8)
                self.pool.fill(layer, e, data)
                self.expected[(layer, e)] = torch.from_numpy(data)
        self.cache = SlabCache(self.pool, slots, policy=policy, device=device, min_slots=4)
        self.engine = CopyEngine(self.cache, lanes)
        self.stream, self.read_slot = stream, read_slot
        if read_slot is None:
            self.views = [self.cache.slot_view(s, torch.uint8, (slab,)) for s in range(slots)]

    def check(self, layer: int, experts: list[int], slots: list[int]) -> list[str]:
        bad = []
        for e, s in zip(experts, slots):
            got = self.views[s].cpu() if self.read_slot is None else self.read_slot(self.cache, s, self.slab)
            if not torch.equal(got, self.expected[(layer, e)]):
                n = int((got != self.expected[(layer, e)]).sum())
                bad.append(f"(layer {layer}, expert {e}) in slot {s}: {n}/{self.slab} bytes differ")
        return bad

    def close(self) -> None:
        if not self.engine.closed:
            self.engine.close()
        self.cache.close()
        self.pool.close()


def _worker(
    world: _World, rng: np.random.Generator, n_ops: int, report: StressReport, lock: threading.Lock
) -> None:
    counts: dict[str, int] = {}
    checked = 0
    errors: list[str] = []
    L, E = world.layers, world.experts
    for _ in range(n_ops):
        layer = int(rng.integers(L))
        r = rng.random()
        try:
            if r < 0.2:
                op = "prefetch"
                world.engine.prefetch(layer, rng.integers(E, size=int(rng.integers(1, 6))))
            elif r < 0.3:
                op = "priority"
                world.cache.set_priority(
                    layer, rng.integers(E, size=3), rng.standard_normal(3).astype(np.float32)
                )
            elif r < 0.35:
                op = "predict"
                rows = min(2, L - layer)
                ids = rng.integers(-1, E, size=(rows, 4)).astype(np.int32)
                scores = rng.random((rows, E), dtype=np.float32)
                world.engine.predict(list(range(layer, layer + rows)), ids, scores, [(layer - 1) % L], -1.0)
            else:
                ids = rng.choice(E, size=int(rng.integers(1, 5)), replace=False).tolist()
                if rng.random() < 0.5:
                    op = "acquire"
                    slots = world.engine.acquire(layer, ids, stream=world.stream)
                else:
                    op = "acquire_deferred"
                    slots, pending = world.engine.acquire_deferred(layer, ids, stream=world.stream)
                    for e, p in zip(ids, pending):
                        if p:
                            world.engine.wait_ready(layer, [e], stream=world.stream)
                try:
                    errors.extend(world.check(layer, ids, slots))
                    checked += len(ids) * world.slab
                finally:
                    world.engine.release(layer, ids, stream=world.stream)
        except RuntimeError as exc:
            if world.engine.closed and "closed" in str(exc):
                counts["after_close"] = counts.get("after_close", 0) + 1
                continue
            errors.append(f"{type(exc).__name__} in {op}: {exc}")
        except Exception as exc:  # anything else is a finding
            errors.append(f"{type(exc).__name__} in {op}: {exc}")
        counts[op] = counts.get(op, 0) + 1
        if len(errors) > 20:
            break
    with lock:
        for k, v in counts.items():
            report.counts[k] = report.counts.get(k, 0) + v
        report.checked_bytes += checked
        report.errors.extend(errors)


def _invariants(world: _World) -> list[str]:
    s, es = world.cache.stats(), world.engine.stats()
    rules = {
        "bytes_loaded == loads * slab": s["bytes_loaded"] == s["loads"] * world.slab,
        "loads == demand_loads + prefetch_loads": s["loads"] == s["demand_loads"] + s["prefetch_loads"],
        "misses == demand_loads": s["misses"] == s["demand_loads"],
        "engine bytes == cache bytes_loaded": es["bytes"] == s["bytes_loaded"],
        "engine copies == cache loads": es["copies"] == s["loads"],
    }
    return [f"invariant broken: {name} ({s}, {es})" for name, ok in rules.items() if not ok]


def run_stress(
    ops: int,
    *,
    device: str = "cpu",
    threads: int = 4,
    seed: int = 0,
    policy: str | None = None,
    close_at: float = 0.9,
    stream: int | None = None,
    read_slot: SlotReader | None = None,
) -> StressReport:
    """Runs ``ops`` operations over ``threads`` workers; at ``close_at`` of the way one thread closes
    the engine while the others continue (None: never). Returns the report (``ok`` when clean).
    ``stream`` and ``read_slot``: see ``_World`` (tests/csrc/test_stress.py runs the CUDA backend on
    the fake CUDA driver with them)."""
    rng = np.random.default_rng(seed)
    policy = policy or ("lru", "lfu", "priority")[int(rng.integers(3))]
    world = _World(
        device,
        layers=4,
        experts=16,
        slab=4096,
        slots=10,
        lanes=3,
        policy=policy,
        stream=stream,
        read_slot=read_slot,
    )
    report = StressReport(device, seed, threads, ops)
    lock = threading.Lock()
    per = ops // threads
    before_close = int(per * close_at) if close_at is not None else per
    workers = [
        threading.Thread(
            target=_worker, args=(world, np.random.default_rng([seed, i]), before_close, report, lock)
        )
        for i in range(threads)
    ]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    world.engine.synchronize()
    report.errors.extend(_invariants(world))
    if close_at is not None:
        # the rest of the run races a close: every call then succeeds or raises RuntimeError("closed")
        tail = [
            threading.Thread(
                target=_worker,
                args=(world, np.random.default_rng([seed, 100 + i]), per - before_close, report, lock),
            )
            for i in range(threads - 1)
        ]
        for w in tail:
            w.start()
        world.engine.close()
        for w in tail:
            w.join()
    report.seconds = time.perf_counter() - t0
    world.close()
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=int, default=1_000_000, help="operations in all (default 1,000,000)")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--seed", type=int, default=None, help="base seed (default: from the clock, printed)")
    p.add_argument("--device", default="cpu", help="cpu (the CPU twin), or sim / cuda where available")
    p.add_argument("--no-record", action="store_true", help="do not write bench/results/stress_<device>.*")
    args = p.parse_args()
    if args.ops < args.threads or args.threads < 2:
        p.error(f"--ops {args.ops} and --threads {args.threads}: need >= 2 threads and ops >= threads")
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    print(
        f"stress: {args.ops:,} operations, {args.threads} threads, device {args.device}, seed {seed}",
        flush=True,
    )
    rep = run_stress(args.ops, device=args.device, threads=args.threads, seed=seed)
    rate = args.ops / rep.seconds if rep.seconds else 0.0
    print(
        f"  {rep.seconds:.1f} s ({rate:,.0f} ops/s), {rep.checked_bytes / 1e9:.2f} GB of slot bytes checked"
    )
    print(f"  operations: {json.dumps(rep.counts, sort_keys=True)}")
    if not args.no_record:
        record: dict[str, Any] = {
            "ops": args.ops,
            "threads": args.threads,
            "device": args.device,
            "seed": seed,
            "seconds": rep.seconds,
            "ops_per_s": rate,
            "counts": rep.counts,
            "checked_bytes": rep.checked_bytes,
            "errors": rep.errors,
            "commit": git_commit(),
            "modified_files": modified_files(),
            "versions": versions("torch", "numpy"),
            "host": device_name("cpu"),
            "date": utc_now(),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"stress_{args.device}.json").write_text(json.dumps(record, indent=2) + "\n")
        (RESULTS / f"stress_{args.device}.md").write_text(
            f"# Stress ({args.device})\n\n{record['date']}, commit {record['commit']}, {record['host']}. "
            f"`python bench/stress.py --ops {args.ops} --threads {args.threads} --seed {seed}`.\n\n"
            f"{args.ops:,} randomized pool/cache/engine operations over {args.threads} threads in "
            f"{rep.seconds:.1f} s ({rate:,.0f} ops/s); {rep.checked_bytes / 1e9:.2f} GB of slot bytes checked "
            f"against the pool at every use; errors: {len(rep.errors)}.\n\n"
            f"Operations: {', '.join(f'{k} {v:,}' for k, v in sorted(rep.counts.items()))}.\n"
        )
    if rep.errors:
        print(f"FAILED (seed {seed}): {len(rep.errors)} problems, first: {rep.errors[:3]}", file=sys.stderr)
        sys.exit(1)
    print("  no mismatches, invariants hold")


if __name__ == "__main__":
    main()
