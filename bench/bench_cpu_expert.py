"""CPU time of one routed expert's forward, read from the host pool: the value of ``--cpu-expert-ms``.

In heterogeneous mode (DESIGN.md §7) a missed expert may run on the host CPU from its pool entry
instead of being copied to the GPU. This measures that computation as the runtime would run it:
the weights are views of a ``moert.engine.runtime.ExpertPool`` entry in the runtime's layout
(``moert.engine.layout.ExpertLayout``: gate_up (2I, H), then down (H, I)), the rows ``x: (B, H)`` are cast to
the weights' dtype, and ``y = down(silu(gate) * up)`` with ``gate, up = gate_up(x).chunk(2)``.

Real dims: DeepSeek-V2-Lite (H=2048, I=1408) and Qwen3-30B-A3B (H=2048, I=768); fp32 and bf16; B = 1
(batch-1 decode, what ``moert simulate --cpu-expert-ms`` models) and a few rows; 1 and 2 torch threads.

Timing: ``time.perf_counter`` around one call. ``cold``: each call uses the next of a rotation of pool
entries that together exceed the last-level cache several times (a missed expert has not been read
lately: its weights come from DRAM); ``hot``: the same entry again and again (its weights partly in
cache). Rounds interleave every configuration so that drift on a shared machine hits all alike;
median and p20/p80 per configuration, GB/s = weight bytes / median. The pool is page-locked only
when a CUDA device can run (as the runtime pins it); the result records which.

Usage::

    python bench/bench_cpu_expert.py [--repeats 60] [--rounds 4] [--host NAME] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moert import provenance
from moert.engine.layout import ExpertLayout
from moert.engine.layout import expert_forward as layout_expert_forward
from moert.engine.runtime import ExpertPool


@dataclass(frozen=True)
class ModelDims:
    """One routed expert's dims; ``name`` as in the model's config (``model_type``, hub id)."""

    name: str
    model_type: str
    hidden: int
    intermediate: int


MODELS = (
    ModelDims("DeepSeek-V2-Lite", "deepseek_v2", 2048, 1408),
    ModelDims("Qwen3-30B-A3B", "qwen3_moe", 2048, 768),
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: the configuration whose cold median is the value printed for ``--cpu-expert-ms``
CALIBRATE = ("DeepSeek-V2-Lite", "bf16", 1)


def silu_gate(h: torch.Tensor) -> torch.Tensor:
    """(B, 2I) -> (B, I): ``silu(gate) * up``, the gate of DeepSeek / Qwen / Phi experts."""
    gate, up = h.chunk(2, dim=-1)  # [B, I] each
    return F.silu(gate) * up


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert, computed by the runtime's own ``moert.engine.layout.expert_forward``: (B, H) -> (B, H)."""
    return layout_expert_forward(x, gate_up, down, silu_gate)


class PoolExperts:
    """``n`` experts of one model and dtype in an ExpertPool (one layer), random weights (std 0.02)."""

    def __init__(self, dims: ModelDims, dtype: torch.dtype, min_bytes: int, seed: int = 0) -> None:
        self.layout = ExpertLayout(dims.hidden, dims.intermediate, dtype)
        self.n = max(4, math.ceil(min_bytes / self.layout.expert_bytes))
        self.pool = ExpertPool(1, self.n, self.layout.slab_bytes)
        g = torch.Generator().manual_seed(seed)
        for e in range(self.n):
            gate_up = (torch.randn(self.layout.gate_up_shape, generator=g) * 0.02).to(dtype)
            down = (torch.randn(self.layout.down_shape, generator=g) * 0.02).to(dtype)
            self.pool.fill(0, e, gate_up)
            self.pool.fill(0, e, down, offset=self.layout.down_offset)
        self.views = [
            self.layout.views(lambda dt, shape, off, e=e: self.pool.view(0, e, dt, shape, off))
            for e in range(self.n)
        ]

    def check(self, x: torch.Tensor) -> float:
        """Max |error| of the pool-view forward (entry 0) against an fp64 reference of the same weights,
        relative to the reference's max |value|."""
        gate_up, down = self.views[0]
        got = expert_forward(x.to(gate_up.dtype), gate_up, down).double()
        h = x.double() @ gate_up.double().T
        gate, up = h.chunk(2, dim=-1)
        want = (F.silu(gate) * up) @ down.double().T
        return float((got - want).abs().max() / want.abs().max())


def percentiles(xs: list[float]) -> dict:
    return {
        "median": float(np.median(xs)),
        "p20": float(np.percentile(xs, 20)),
        "p80": float(np.percentile(xs, 80)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=60, help="timed calls per configuration and round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over every configuration")
    parser.add_argument("--rows", default="1,2,4,8", help="batch rows B")
    parser.add_argument("--threads", default="1,2", help="torch thread counts")
    parser.add_argument("--pool-mb", type=int, default=256, help="cold rotation: at least this many MB")
    parser.add_argument("--host", default=None, help="name in the output files (default: the hostname)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    threads_list = [int(t) for t in args.threads.split(",")]
    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", args.host or socket.gethostname()) or "host"

    env = _environment()
    pools = {
        (m.name, d): PoolExperts(m, dt, args.pool_mb << 20, seed=i)
        for i, (m, (d, dt)) in enumerate((m, kv) for m in MODELS for kv in DTYPES.items())
    }
    g = torch.Generator().manual_seed(1)
    xs = {b: torch.randn(b, 2048, generator=g) for b in rows_list}
    errors = {f"{name} {d}": p.check(xs[rows_list[-1]]) for (name, d), p in pools.items()}

    configs = [
        (name, d, b, t, how)
        for (name, d) in pools
        for b in rows_list
        for t in threads_list
        for how in ("cold", "hot")
    ]
    t_start = time.perf_counter()
    times = _measure(args, pools, xs, configs, t_start)

    results = _results(times, pools)
    env["loadavg_at_end"] = os.getloadavg()[0]
    env["seconds"] = time.perf_counter() - t_start
    calib = _calibration(results)
    out = {
        "what": "CPU time of one routed expert's forward from a host-pool entry (moert heterogeneous mode)",
        **env,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "relative_error_vs_fp64": errors,
        "calibration": calib,
        "results": results,
        "command": " ".join(["python", *sys.argv]),
    }
    stem = Path(args.out) / f"cpu_expert_{host}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(out))
    print(stem.with_suffix(".md").read_text())
    for c in calib:
        print(f"{c['model']}: --cpu-expert-ms {c['cpu_expert_ms']:.2f} --expert-mb {c['expert_mb']:.1f}")
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    return 0


def _environment() -> dict:
    """Device, versions, commit, date and load at the start; recorded beside the results."""
    return {
        "device": provenance.device_name("cpu"),
        **provenance.versions("torch", "numpy"),
        "commit": provenance.git_commit(),
        "date": provenance.utc_now(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loadavg_at_start": os.getloadavg()[0],
        "modified_tracked_files": provenance.modified_files(),
    }


def _measure(args: argparse.Namespace, pools: dict, xs: dict, configs: list, t_start: float) -> dict:
    """ms per call of every configuration, ``--rounds`` rounds (alternate rounds in reverse order) of
    ``--repeats`` timed calls after 3 warm-up calls; ``cold`` rotates through the pool."""
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    cursor = dict.fromkeys(pools, 0)
    for rnd in range(args.rounds):
        for cfg in configs if rnd % 2 == 0 else configs[::-1]:
            name, d, b, t, how = cfg
            pool = pools[name, d]
            torch.set_num_threads(t)
            x = xs[b].to(DTYPES[d])
            for i in range(args.repeats + 3):  # 3 warm-up calls
                if how == "cold":
                    e = cursor[name, d] = (cursor[name, d] + 1) % pool.n
                else:
                    e = 0
                gate_up, down = pool.views[e]
                t0 = time.perf_counter()
                expert_forward(x, gate_up, down)
                dt = time.perf_counter() - t0
                if i >= 3:
                    times[cfg].append(dt * 1e3)
        print(f"round {rnd + 1}/{args.rounds} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    return times


def _results(times: dict, pools: dict) -> list[dict]:
    """One row per configuration: percentiles, ms per row and weight GB/s."""
    results = []
    for cfg, ms in times.items():
        name, d, b, t, how = cfg
        pool = pools[name, d]
        p = percentiles(ms)
        results.append(
            {
                "model": name,
                "hidden": pool.layout.hidden,
                "intermediate": pool.layout.intermediate,
                "dtype": d,
                "rows": b,
                "threads": t,
                "weights": how,
                "expert_bytes": pool.layout.expert_bytes,
                "pool_entries": pool.n,
                "pinned": pool.pool.pinned,
                "ms": p,
                "ms_per_row": p["median"] / b,
                "gb_s": pool.layout.expert_bytes / (p["median"] * 1e-3) / 1e9,
                "calls": len(ms),
            }
        )
    return results


def _calibration(results: list[dict]) -> list[dict]:
    """Per model: bf16 (the pool's dtype), one row, cold weights, the faster thread count."""
    out = []
    for m in MODELS:
        rows = [
            r
            for r in results
            if r["model"] == m.name and r["dtype"] == "bf16" and r["rows"] == 1 and r["weights"] == "cold"
        ]
        best = min(rows, key=lambda r: r["ms"]["median"])
        out.append(
            {
                "model": m.name,
                "cpu_expert_ms": round(best["ms"]["median"], 3),
                "threads": best["threads"],
                "expert_mb": best["expert_bytes"] / 1e6,
            }
        )
    return out


def markdown(out: dict) -> str:
    by = {(r["model"], r["dtype"], r["rows"], r["threads"], r["weights"]): r for r in out["results"]}
    rows_list = sorted({r["rows"] for r in out["results"]})
    threads_list = sorted({r["threads"] for r in out["results"]})
    lines = [
        "# CPU time of one routed expert (moert heterogeneous mode)",
        "",
        f"{out['date']}, commit {out['commit']}, {out['device']} (torch CPU capability "
        f"{out['torch_cpu_capability']}); torch {out['torch']}, numpy {out['numpy']}, python {out['python']}. "
        f"Produced by `{out['command']}` in {out['seconds']:.0f} s; load average {out['loadavg_at_start']:.1f} "
        f"-> {out['loadavg_at_end']:.1f}."
        + (f" Tracked files modified at run time (other streams' work in the shared checkout): "
           f"{', '.join(out['modified_tracked_files'])}." if out["modified_tracked_files"] else ""),
        "",
        "**This is a 2-core shared VM: a pessimistic point.** A host with many cores and several DDR channels "
        "computes an expert several times faster. The point of `moert simulate --cpu-expert-ms` is that "
        "you calibrate it on your own host: run `python bench/bench_cpu_expert.py` there.",
        "",
        "One expert's forward `y = down(silu(gate) * up)`, `gate, up = gate_up(x).chunk(2)`, with the weights "
        "read through `moert.engine.runtime.ExpertPool.view` in the runtime's layout (gate_up (2I, H) then down (H, I), "
        f"one entry each; pool {'page-locked' if out['results'][0]['pinned'] else 'not page-locked (no CUDA device: the runtime pins only for a GPU)'}). "
        "`cold`: every call the next entry of a rotation larger than the last-level cache (a missed expert "
        "comes from DRAM: the case the simulator models); `hot`: the same entry every call. ms = median "
        f"(p20-p80) of {out['repeats'] * out['rounds']} calls in {out['rounds']} interleaved rounds; GB/s = "
        "weight bytes / median. Relative error of the pool-view forward vs fp64 of the same weights: "
        + ", ".join(f"{k} {v:.1e}" for k, v in out["relative_error_vs_fp64"].items())
        + ".",
        "",
    ]  # fmt: skip
    for m in MODELS:
        lines += [
            f"## {m.name} (`{m.model_type}`): H={m.hidden}, I={m.intermediate}",
            "",
            "| dtype | weights | MB | "
            + " | ".join(f"B={b}, {t} thr ms" for b in rows_list for t in threads_list)
            + " | GB/s (B=1, best) |",
            "|---|---|---:|" + "---:|" * (len(rows_list) * len(threads_list) + 1),
        ]
        for d in DTYPES:
            for how in ("cold", "hot"):
                cells = []
                for b in rows_list:
                    for t in threads_list:
                        r = by[m.name, d, b, t, how]
                        cells.append(f"{r['ms']['median']:.2f} ({r['ms']['p20']:.2f}-{r['ms']['p80']:.2f})")
                gbs = max(by[m.name, d, 1, t, how]["gb_s"] for t in threads_list)
                mb = by[m.name, d, 1, threads_list[0], how]["expert_bytes"] / 1e6
                lines.append(f"| {d} | {how} | {mb:.1f} | " + " | ".join(cells) + f" | {gbs:.1f} |")
        lines.append("")
    lines += ["## Value for `moert simulate`", ""]
    for c in out["calibration"]:
        lines.append(
            f"- {c['model']}: `--cpu-expert-ms {c['cpu_expert_ms']:.2f} --expert-mb {c['expert_mb']:.1f}` "
            f"(bf16, the pool's dtype; one row; cold; {c['threads']} thread(s), the faster)."
        )
    dsv2 = by[CALIBRATE[0], CALIBRATE[1], CALIBRATE[2], out["calibration"][0]["threads"], "cold"]
    dsv2_rows = by[CALIBRATE[0], CALIBRATE[1], rows_list[-1], out["calibration"][0]["threads"], "cold"]
    lines += [
        "",
        f"Reading: at batch 1 an expert is a matrix-vector product, bound by reading its weights; "
        f"{CALIBRATE[0]} bf16 from DRAM runs at {dsv2['gb_s']:.1f} GB/s here, so one expert takes about as "
        "long on this CPU as its copy over PCIe Gen4 (~25 GB/s pinned) would. fp32 (twice the bytes) takes "
        f"{min(by[CALIBRATE[0], 'fp32', 1, t, 'cold']['ms']['median'] for t in threads_list):.2f} ms. In bf16 "
        f"{rows_list[-1]} rows cost "
        f"{dsv2_rows['ms']['median'] / dsv2['ms']['median']:.2f}x one row (the weights are read once per "
        "call): batching several tokens' rows of one expert on the CPU (prefill, batch > 1; not modelled by "
        "the simulator) would pay.",
        "",
        "Not measured here: the activation row's device-host round trip (`--activation-us`, default 20 µs; "
        "needs a GPU), and contention between the CPU's reads of the pool and the copy engine's DMA reads "
        "of the same memory while both run.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
