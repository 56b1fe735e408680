"""The host tier (``moert.load(host_budget=...)``): file -> pinned-pool read throughput, decode at host
budgets, and peak host RSS while loading and generating.

1. Read throughput. One file of ``--read-mb`` random bytes cut into experts of ``--expert-mb`` (three
   parts each, placed in the slab in another order, as a checkpoint's down/gate/up tensors are). The
   engine's reader (the tiered ``ExpertPool``'s C++ ``pread`` or ``mmap`` + memcpy, on 1 or 2
   threads calling ``pool.load``, the GIL released) against a plain sequential ``readinto`` of the
   same file in 8 MiB chunks. Before every timed read the file's pages are dropped from the page
   cache with ``posix_fadvise(DONTNEED)`` (the file is fsync'ed first, so its pages are clean;
   ``/proc/sys/vm/drop_caches`` needs privileges this machine does not give); ``cold`` is that,
   ``warm`` the same reads with the file in the page cache. Goal: engine / plain >= 0.8 (cold).
2. Decode on the CPU twin: a qwen3_moe model whose experts dominate its bytes (``--layers`` x
   ``--experts`` experts of 3 x H x I fp32), greedy decode at host budgets 100/50/25 % of its experts
   (and without ``host_budget``: every expert read into the pool at load), the device cache at
   ``--cache`` of the experts; then a lookahead-1 predictor trained on the model drives the
   ``score`` policy at budgets 100/50/25 % without and with ``read_ahead=1`` (SSD -> pool reads of
   the planned and predicted experts started at once). Tokens must equal the run without a budget.
   tok/s (and the ratio to the same row without read-ahead) and the stats per tier. The experts' pages are dropped from the page cache before each timed run, but reads during
   the run fill it again, so repeated reads of one expert come from the page cache (host memory the
   kernel may reclaim; not counted in RSS).
3. Peak host RSS: a fresh process per budget loads the model and decodes; its VmHWM minus its RSS
   after imports, against budget (the pool) + non-expert weights + the slab cache (on the CPU twin
   the cache is host memory too).

Usage: python bench/bench_tiers.py [--read-mb 512] [--expert-mb 8] [--tokens 32] [--out bench/results]
Writes bench/results/tiers_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moert.engine.pool import ExpertPool
from moert.provenance import device_name, git_commit, modified_files, utc_now, versions

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (None, 1.0, 0.5, 0.25)
_MB = 1 << 20


def drop_cache(path: Path) -> None:
    """Drops the file's (clean) pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_random(path: Path, nbytes: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        left = nbytes
        while left:
            n = min(left, 64 * _MB)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
        f.flush()
        os.fsync(f.fileno())


def plain_read(path: Path, chunk: int = 8 * _MB) -> float:
    """Seconds of a sequential ``readinto`` of the whole file."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t0


def tier_pool(path: Path, experts: int, slab: int, read_mode: str) -> ExpertPool:
    """A tiered pool of ``experts // 2`` slabs whose expert e is bytes [e * slab, (e + 1) * slab) of the
    file, as three parts placed in the slab in another order (file: down, gate, up; slab: gate, up,
    down). Its slabs are touched once (the first half of the experts read), as a running pool's are."""
    pool = ExpertPool(1, experts, slab, pin=False, capacity=experts // 2, read_mode=read_mode)
    fid = pool.add_file(str(path))
    third = slab // 3 // 16 * 16
    sizes = (slab - 2 * third, third, third)  # down, gate, up in the file
    slab_at = (2 * third, 0, third)
    for e in range(experts):
        at, rows = e * slab, []
        for size, dst in zip(sizes, slab_at):
            rows.append((fid, at, size, dst))
            at += size
        pool.set_source(0, e, rows)
    for e in range(experts // 2):
        pool.load(0, e)
    return pool


def engine_read(pool: ExpertPool, experts: int, threads: int) -> float:
    """Seconds to read the second half of the experts (each evicting one of the first half) on
    ``threads`` threads, each a contiguous range, in order."""
    half = experts // 2
    bounds = np.linspace(half, experts, threads + 1).astype(int)

    def work(lo: int, hi: int) -> None:
        for e in range(lo, hi):
            pool.load(0, e)

    workers = [threading.Thread(target=work, args=(bounds[i], bounds[i + 1])) for i in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - t0


def _check_bytes(pool: ExpertPool, path: Path, expert: int, slab: int) -> None:
    """The expert's slab holds its file bytes, parts in slab order (an independent read)."""
    with open(path, "rb") as f:
        f.seek(expert * slab)
        raw = np.frombuffer(f.read(slab), np.uint8)
    down = slab - 2 * (slab // 3 // 16 * 16)
    want = np.concatenate([raw[down:], raw[:down]])
    assert np.array_equal(pool.copy_out(0, expert).numpy(), want), "the engine read other bytes"


def read_throughput(workdir: Path, read_mb: int, expert_mb: int, repeats: int) -> dict[str, Any]:
    """Median GB/s of each reader, cold and warm, interleaved over ``repeats``."""
    slab = expert_mb * _MB
    experts = read_mb // expert_mb // 2 * 2
    path = workdir / "tier_read.bin"
    write_random(path, experts * slab)
    nbytes = experts // 2 * slab  # the engine reads the second half; the plain read the whole file
    readers = {"plain": None, "pread_1": ("pread", 1), "pread_2": ("pread", 2), "mmap_1": ("mmap", 1)}
    gbps: dict[str, dict[str, list[float]]] = {k: {"cold": [], "warm": []} for k in readers}
    for _ in range(repeats):
        for name, spec in readers.items():
            for state in ("cold", "warm"):
                if spec is None:
                    if state == "cold":
                        drop_cache(path)
                    gbps[name][state].append(experts * slab / plain_read(path) / 1e9)
                    continue
                pool = tier_pool(path, experts, slab, spec[0])
                if state == "cold":
                    drop_cache(path)
                gbps[name][state].append(nbytes / engine_read(pool, experts, spec[1]) / 1e9)
                _check_bytes(pool, path, experts - 1, slab)
                pool.close()
                del pool
    path.unlink()
    out: dict[str, Any] = {
        "file_bytes": experts * slab,
        "expert_bytes": slab,
        "experts": experts,
        "repeats": repeats,
    }
    for name in readers:
        out[name] = {s: float(np.median(v)) for s, v in gbps[name].items()}
    for name in readers:
        if name != "plain":
            out[name]["vs_plain_cold"] = out[name]["cold"] / out["plain"]["cold"]
            out[name]["vs_plain_warm"] = out[name]["warm"] / out["plain"]["warm"]
    return out


def bench_config(layers: int, experts: int) -> Any:
    from moert.models.tiny import tiny_config

    return tiny_config(
        "qwen3_moe",
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=256,
        num_experts=experts,
        num_experts_per_tok=4,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
    )


_STAT_FIELDS = (
    "hits",
    "misses",
    "bytes_copied",
    "demand_stall_s",
    "pool_hits",
    "ssd_reads",
    "ssd_bytes",
    "ssd_read_s",
    "ssd_stall_s",
    "pool_evictions",
    "read_ahead_reads",
    "read_ahead_used",
    "read_ahead_wasted",
    "read_ahead_dropped",
    "read_ahead_wait_s",
    "prefetches",
    "recall",
)


def configs(predictor: Any) -> list[tuple[str, Any, dict[str, Any]]]:
    """``(label, host_budget, moert.load kwargs)``: demand-only lru at every budget of ``BUDGETS``
    (the first, no budget, is the reference for tokens and tok/s), then the predictor's plans
    (``score``, lookahead 1, overprovision 2) at 100/50/25 % without and with ``read_ahead=1``."""
    out: list[tuple[str, Any, dict[str, Any]]] = [("lru", b, {}) for b in BUDGETS]
    pred = dict(policy="score", predictor=predictor, overprovision=2)
    for ra in (0, 1):
        out += [(f"score+pred, read_ahead={ra}", b, {**pred, "read_ahead": ra}) for b in BUDGETS[1:]]
    return out


def decode(
    path: Path, cache: float, tokens: int, rounds: int = 5, predictor: Any = None
) -> list[dict[str, Any]]:
    """Greedy decode of ``tokens`` in every configuration of :func:`configs`: all models loaded, then
    ``rounds`` rounds that time each once in turn (drift on a shared machine hits every one alike),
    the file's pages dropped before each run. The median tok/s; the stats of each model's last run."""
    import moert
    from moert.models.tiny import greedy, prompt_ids

    runs = configs(predictor)
    models = [
        moert.load(path, cache_experts=cache, device="cpu", host_budget=b, progress=False, **kw)
        for _, b, kw in runs
    ]
    prompt = prompt_ids(1, 8, vocab=models[0].config.vocab_size)
    times: list[list[float]] = [[] for _ in models]
    seqs: list[Any] = [None] * len(models)
    for m in models:
        greedy(m, prompt, 2)
    for _ in range(rounds):
        for i, m in enumerate(models):
            moert.handle_of(m).reset_stats()
            for f in path.glob("*.safetensors"):
                drop_cache(f)
            t0 = time.perf_counter()
            seqs[i], _ = greedy(m, prompt, tokens)
            times[i].append(time.perf_counter() - t0)
    out = []
    for (label, b, kw), m, ts, seq in zip(runs, models, times, seqs):
        handle = moert.handle_of(m)
        handle.offloader.engine.synchronize()
        st = handle.stats()
        out.append(
            {
                "config": label,
                "budget": b,
                "read_ahead": kw.get("read_ahead", 0),
                "tok_s": tokens / float(np.median(ts)),
                "tok_s_runs": [tokens / t for t in ts],
                "identical": bool(torch.equal(seq, seqs[0])),
                "pool_bytes": handle.pool_bytes,
                "tiered": bool(handle.load_report.get("host_tier", {}).get("tiered", False)),
                "stats": {k: getattr(st, k) for k in _STAT_FIELDS},
            }
        )
        handle.undo()
    return out


def train_predictor(path: Path, seconds: list[float]) -> Any:
    """A lookahead-1 ``preattn`` predictor for the saved model (``capture_and_train`` on 24 prompts
    of seeds the decode prompt does not use); appends the seconds it took to ``seconds``."""
    from transformers import AutoModelForCausalLM

    from moert.engine.prefetch import capture_and_train
    from moert.models.tiny import prompt_ids

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompts = [prompt_ids(1, 16, vocab=model.config.vocab_size, seed=100 + i)[0] for i in range(24)]
    pred = capture_and_train(model, prompts, new_tokens=16, lookahead=1, dim=64)
    seconds.append(time.perf_counter() - t0)
    return pred


def rss_child(path: str, budget: str, cache: float, tokens: int) -> None:
    """In a fresh process: RSS after imports, then load + decode; prints one JSON line."""
    torch.set_num_threads(1)
    import transformers  # noqa: F401  (imported before the baseline, like moert and torch)

    import moert
    from moert.models.tiny import greedy, prompt_ids

    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    from moert.models.tiny import tiny_model

    warm = tiny_model("qwen3_moe")  # transformers' model code imported, torch's CPU kernels set up
    greedy(warm, prompt_ids(1, 8), 2)
    del warm
    base = status("VmRSS")
    b = None if budget == "none" else float(budget)
    model = moert.load(path, cache_experts=cache, device="cpu", host_budget=b, progress=False)
    handle = moert.handle_of(model)
    loaded = status("VmHWM")
    greedy(model, prompt_ids(1, 8, vocab=model.config.vocab_size), tokens)
    rep = handle.load_report
    print(
        json.dumps(
            {
                "budget": b,
                "baseline_rss": base,
                "peak_after_load": loaded - base,
                "peak": status("VmHWM") - base,
                "pool_bytes": handle.pool_bytes,
                "cache_bytes": handle.cache_bytes,
                "non_expert_bytes": rep["non_expert_bytes"],
                "all_experts_bytes": rep["all_experts_bytes"],
            }
        )
    )


def peak_rss(path: Path, cache: float, tokens: int) -> list[dict[str, Any]]:
    rows = []
    for b in BUDGETS:
        cmd = [sys.executable, "-P", __file__, "--rss-child", str(path), "none" if b is None else str(b)]
        cmd += ["--cache", str(cache), "--tokens", str(tokens)]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row["accounted"] = row["pool_bytes"] + row["non_expert_bytes"] + row["cache_bytes"]
        row["over_accounted"] = row["peak"] - row["accounted"]
        rows.append(row)
    return rows


def _pct(b: Any) -> str:
    return "no budget" if b is None else f"{b:.0%}"


def markdown(rec: dict[str, Any]) -> str:
    r = rec["read"]
    lines = [
        "# Host tier: SSD -> pinned pool reads, decode at host budgets, peak RSS (CPU)",
        "",
        f"{rec['date']}, commit {rec['commit']}, {rec['host']}, torch {rec['versions'].get('torch')}. "
        f"`{rec['command']}`.",
        "",
        f"## Read throughput ({r['file_bytes'] / _MB:.0f} MiB file, {r['expert_bytes'] / _MB:.0f} MiB experts "
        f"in 3 parts, median of {r['repeats']})",
        "",
        "cold: the file's pages dropped (posix_fadvise DONTNEED) before each read; warm: in the page cache.",
        "",
        "| reader | cold GB/s | warm GB/s | cold vs plain | warm vs plain |",
        "|---|---:|---:|---:|---:|",
        f"| plain sequential readinto (8 MiB) | {r['plain']['cold']:.2f} | {r['plain']['warm']:.2f} | 1.00 | 1.00 |",
    ]
    for name, label in (
        ("pread_1", "engine pread, 1 thread"),
        ("pread_2", "engine pread, 2 threads"),
        ("mmap_1", "engine mmap + memcpy, 1 thread"),
    ):
        x = r[name]
        lines.append(
            f"| {label} | {x['cold']:.2f} | {x['warm']:.2f} | {x['vs_plain_cold']:.2f} | {x['vs_plain_warm']:.2f} |"
        )
    d = rec["decode"]
    m = d["model"]
    lines += [
        "",
        f"## Decode on the CPU twin ({m['layers']} MoE layers x {m['experts']} experts of "
        f"{m['expert_bytes'] / _MB:.2f} MiB, experts {m['experts_bytes'] / _MB:.0f} MiB of "
        f"{m['experts_bytes'] / _MB + m['non_expert_bytes'] / _MB:.0f} MiB; device cache {d['cache']:.0%}; "
        f"{d['tokens']} tokens, batch 1, 1 thread; median of {d['rounds']} interleaved rounds)",
        "",
        "Rows 1-4: demand-only lru (no predictor). Then a lookahead-1 preattn predictor trained on the model "
        f"({d['predictor_s']:.0f} s) drives the `score` policy (overprovision 2) without and with `read_ahead=1`. "
        "SSD stall: demand reads plus demand waits on a read-ahead in flight; device stall: the engine's demand "
        "stall (it includes the SSD stall). vs ra=0: tok/s over the same row without read-ahead.",
        "",
        "| config | host budget | tok/s | vs no budget | vs ra=0 | tokens | device misses | pool hits | SSD reads | "
        "read-ahead (used / wasted) | SSD MB | SSD stall ms | device stall ms | recall |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = d["runs"][0]["tok_s"]
    no_ra = {(r["budget"], r["config"].split(",")[0]): r["tok_s"] for r in d["runs"] if not r["read_ahead"]}
    for run in d["runs"]:
        s = run["stats"]
        ref = no_ra.get((run["budget"], run["config"].split(",")[0]))
        vs_ra = f"{run['tok_s'] / ref:.2f}" if run["read_ahead"] and ref else ""
        ra = f"{s['read_ahead_reads']} ({s['read_ahead_used']} / {s['read_ahead_wasted']})"
        recall = "" if s["recall"] is None else f"{s['recall']:.2f}"
        lines.append(
            f"| {run['config']} | {_pct(run['budget'])} | {run['tok_s']:.1f} | {run['tok_s'] / base:.2f} | {vs_ra} | "
            f"{'identical' if run['identical'] else 'DIFFERENT'} | {s['misses']} | {s['pool_hits']} | "
            f"{s['ssd_reads']} | {ra} | {s['ssd_bytes'] / _MB:.1f} | "
            f"{(s['ssd_stall_s'] + s['read_ahead_wait_s']) * 1e3:.1f} | {s['demand_stall_s'] * 1e3:.1f} | {recall} |"
        )
    lines += [
        "",
        "## Peak host RSS while loading and generating (fresh process per budget; MiB over its RSS after imports "
        "and a warm-up run of a small model of the same class)",
        "",
        "| host budget | pool | non-expert | slab cache | accounted | peak after load | peak | peak - accounted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rec["rss"]:
        lines.append(
            f"| {_pct(row['budget'])} | {row['pool_bytes'] / _MB:.1f} | {row['non_expert_bytes'] / _MB:.1f} | "
            f"{row['cache_bytes'] / _MB:.1f} | {row['accounted'] / _MB:.1f} | {row['peak_after_load'] / _MB:.1f} | "
            f"{row['peak'] / _MB:.1f} | {row['over_accounted'] / _MB:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--read-mb", type=int, default=512)
    p.add_argument("--expert-mb", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--cache", type=float, default=0.1, help="device cache, fraction of experts (default 0.1)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="decode rounds over the budgets (median tok/s)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--workdir", type=Path, default=None, help="where the files go (default: a temp dir)")
    p.add_argument("--rss-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child is not None:
        rss_child(args.rss_child[0], args.rss_child[1], args.cache, args.tokens)
        return
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        print("read throughput ...", flush=True)
        read = read_throughput(work, args.read_mb, args.expert_mb, args.repeats)
        from moert.models.tiny import save_tiny, tiny_model

        model = tiny_model(bench_config(args.layers, args.experts))
        path = save_tiny(model, work / "model")
        n_exp = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
        m = {
            "layers": args.layers,
            "experts": args.experts,
            "expert_bytes": n_exp // (args.layers * args.experts),
            "experts_bytes": n_exp,
            "non_expert_bytes": sum(p.numel() * 4 for p in model.parameters()) - n_exp,
        }
        del model
        print("predictor ...", flush=True)
        train_s: list[float] = []
        predictor = train_predictor(path, train_s)
        print("decode ...", flush=True)
        runs = decode(path, args.cache, args.tokens, args.rounds, predictor)
        print("peak RSS ...", flush=True)
        rss = peak_rss(path, args.cache, args.tokens)
    rec = {
        "date": utc_now(),
        "commit": git_commit(),
        "modified_files": modified_files(),
        "host": device_name("cpu"),
        "versions": versions("torch", "transformers", "numpy"),
        "command": "python bench/bench_tiers.py " + " ".join(sys.argv[1:]),
        "read": read,
        "decode": {
            "model": m,
            "cache": args.cache,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "predictor_s": train_s[0],
            "runs": runs,
        },
        "rss": rss,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tiers_cpu.json").write_text(json.dumps(rec, indent=2) + "\n")
    md = markdown(rec)
    (args.out / "tiers_cpu.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
