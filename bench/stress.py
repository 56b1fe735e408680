"""Stress: randomized pool / cache / copy-engine operations across threads, every slot's bytes
checksummed at every use against the pool.

Each worker thread draws operations from its own seeded generator: demand acquires (plain, or
deferred with a wait per expert) of 1-4 experts followed by a byte-for-byte check of each slot
against the pool and a release; prefetches; priority updates; predictions (clear + priorities +
prefetch, the copy engine's prediction path); and, once, a close of the engine while the other
threads still run (their calls must then fail cleanly with RuntimeError, nothing else). At the end
the cache's and the engine's counters must satisfy their invariants.

With ``--host-slabs N`` (``host_slabs=``) both tiers are active: the pool is a host cache of N slabs
over a file holding every expert (each in two parts, read with pread), so copies also read the file
and evict host slabs while other threads copy; a ``copy_out`` operation checks a host slab (or the
file read) against the expected bytes too. Read-ahead is on (``CopyEngine.read_ahead = 1``, two
reader threads): prefetches and predictions start pool reads at once, and a ``read_ahead`` operation
queues reads directly, so copies race the reader threads for slabs and wait on reads in flight. The
pool's hits + reads - read-ahead reads must equal the engine's copies.

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
        host_slabs: int | None = None,
        workdir: Path | None = None,
    ):
        self.layers, self.experts, self.slab = layers, experts, slab
        self.pool = ExpertPool(layers, experts, slab, capacity=host_slabs)
        self.expected = {}
        for layer in range(layers):
            for e in range(experts):
                data = np.random.default_rng(layer * 7919 + e).integers(0, 256, slab, dtype=np.uint8)
                self.expected[(layer, e)] = torch.from_numpy(data)
                if host_slabs is None:
                    self.pool.fill(layer, e, data)
        if host_slabs is not None:
            self._write_file(workdir)
            self.pool.readers = 2
        self.cache = SlabCache(self.pool, slots, policy=policy, device=device, min_slots=4)
        self.engine = CopyEngine(self.cache, lanes)
        if host_slabs is not None:
            self.engine.read_ahead = 1
        self.stream, self.read_slot = stream, read_slot
        if read_slot is None:
            self.views = [self.cache.slot_view(s, torch.uint8, (slab,)) for s in range(slots)]

    def _write_file(self, workdir: Path | None) -> None:
        """Every expert into one file, in (layer, expert) order after a 64-byte header; each expert's
        halves swapped in the file, so a source is two parts at crossed offsets."""
        path = (workdir or Path("/tmp")) / f"moert_stress_{id(self)}.bin"
        half = self.slab // 2
        with open(path, "wb") as f:
            f.write(b"\0" * 64)
            for _key, data in sorted(self.expected.items()):
                f.write(data[half:].numpy().tobytes() + data[:half].numpy().tobytes())
        fid = self.pool.add_file(str(path))
        for layer, e in self.expected:
            at = 64 + (layer * self.experts + e) * self.slab
            self.pool.set_source(
                layer, e, [(fid, at, self.slab - half, half), (fid, at + self.slab - half, half, 0)]
            )
        self.path = path

    def check_host(self, layer: int, expert: int) -> list[str]:
        got = self.pool.copy_out(layer, expert)
        if torch.equal(got, self.expected[(layer, expert)]):
            return []
        return [
            f"host copy of (layer {layer}, expert {expert}): {int((got != self.expected[(layer, expert)]).sum())} bytes differ"
        ]

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
        if getattr(self, "path", None) is not None:
            self.path.unlink(missing_ok=True)


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
            elif r < 0.32 and world.pool.tiered:
                op = "copy_out"
                e = int(rng.integers(E))
                errors.extend(world.check_host(layer, e))
                checked += world.slab
            elif r < 0.34 and world.pool.tiered:
                op = "read_ahead"
                world.pool.read_ahead(layer, rng.integers(-1, E, size=int(rng.integers(1, 5))).tolist())
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
    if world.pool.tiered:
        ps = world.pool.tier_stats()[0]
        rules["pool hits + reads - ahead_reads == engine copies"] = (
            ps["hits"] + ps["reads"] - ps["ahead_reads"] == es["copies"]
        )
        rules["pool read_bytes == reads * slab"] = ps["read_bytes"] == ps["reads"] * world.slab
        rules["ahead used + wasted <= ahead reads"] = (
            ps["ahead_used"] + ps["ahead_wasted"] <= ps["ahead_reads"] <= ps["reads"]
        )
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
    host_slabs: int | None = None,
    workdir: Path | None = None,
) -> StressReport:
    """Runs ``ops`` operations over ``threads`` workers; at ``close_at`` of the way one thread closes
    the engine while the others continue (None: never). ``stream`` and ``read_slot``: see ``_World``
    (tests/csrc/test_stress.py runs the CUDA backend on the fake CUDA driver with them).
    ``host_slabs``: the pool is a host cache of that many slabs over a file written in ``workdir``
    (default /tmp). Returns the report (``ok`` when clean)."""
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
        host_slabs=host_slabs,
        workdir=workdir,
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
    if world.pool.tiered:
        ps = world.pool.tier_stats()[0]
        report.counts["pool_hits"], report.counts["pool_reads"] = ps["hits"], ps["reads"]
        for k in ("ahead_reads", "ahead_used", "ahead_wasted", "ahead_dropped", "ahead_waits"):
            report.counts[k] = ps[k]
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
    p.add_argument(
        "--host-slabs",
        type=int,
        default=None,
        help="both tiers: the pool holds N of the 64 experts, the rest in a file",
    )
    args = p.parse_args()
    if args.ops < args.threads or args.threads < 2:
        p.error(f"--ops {args.ops} and --threads {args.threads}: need >= 2 threads and ops >= threads")
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    print(
        f"stress: {args.ops:,} operations, {args.threads} threads, device {args.device}, seed {seed}",
        flush=True,
    )
    rep = run_stress(
        args.ops, device=args.device, threads=args.threads, seed=seed, host_slabs=args.host_slabs
    )
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
        name = f"stress_{args.device}" + ("" if args.host_slabs is None else "_tiers")
        record["host_slabs"] = args.host_slabs
        (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text(
            f"# Stress ({args.device})\n\n{record['date']}, commit {record['commit']}, {record['host']}. "
            f"`python bench/stress.py --ops {args.ops} --threads {args.threads} --seed {seed}"
            + ("" if args.host_slabs is None else f" --host-slabs {args.host_slabs}")
            + "`.\n\n"
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
