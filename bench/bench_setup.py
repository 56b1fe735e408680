"""Set-up time per benchmark configuration: a fresh ``moert.patch`` + ``undo`` per configuration (what
the decode and prefill benchmarks did) against ``PatchHandle.reconfigure`` over one filled pool (what
they do now, ``bench/_one_pool.py``), measured in the same run on the CPU twin and on the
asynchronous device model (``device="sim"``), and what it means at DeepSeek-V2-Lite size on CUDA as
an estimate.

    python bench/bench_setup.py          # writes bench/results/setup_reuse.{json,md}

The model is the demo model with widths x ``--scale`` (default 2: DeepSeek-V2-Lite's layout with
hidden 512, expert intermediate 352, 7 MoE layers x 64 experts, a 0.97 GB fp32 pool): a mid-size
configuration between the demo (0.24 GB) and DeepSeek-V2-Lite (28.8 GB bf16). Every configuration
decodes a few greedy tokens after its set-up; their tokens must equal the all-resident model's and
their misses be > 0 (DESIGN §8), else the run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import moert
from moert.models.tiny import demo_config, prompt_ids, tiny_model
from moert.provenance import device_name, git_commit, utc_now, versions

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ (``python -P`` leaves it off)
from _one_pool import sweep  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: (name, patch arguments): the decode grid's kinds of switch (cache size, policy, lanes, waits)
CONFIGS = [
    ("0.25 lru", dict(cache_experts=0.25, policy="lru")),
    ("0.1 lru", dict(cache_experts=0.1, policy="lru")),
    ("0.5 lru", dict(cache_experts=0.5, policy="lru")),
    ("0.25 lfu", dict(cache_experts=0.25, policy="lfu")),
    ("0.25 lru, 1 lane", dict(cache_experts=0.25, policy="lru", copy_streams=1)),
    ("0.25 lru, deferred waits", dict(cache_experts=0.25, policy="lru", deferred_waits=True)),
]
#: DeepSeek-V2-Lite: 26 MoE layers x 64 experts of 3 x 1408 x 2048 bf16 weights
DSV2_LITE_POOL_BYTES = 26 * 64 * 3 * 1408 * 2048 * 2


def greedy_ids(model: Any, prompt: torch.Tensor, tokens: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
    return out[:, prompt.shape[1] :]


def host_copy_gbs(nbytes: int = 256 << 20) -> float:
    """Host memcpy bandwidth (torch copy of ``nbytes`` between two touched buffers), best of 5."""
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return nbytes / best / 1e9


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def one_device(model: Any, prompt: torch.Tensor, want: torch.Tensor, device: str, tokens: int) -> dict:
    """Per configuration: patch + undo (fresh) and reconfigure (one pool), each checked for exactness."""
    checks: list[dict[str, Any]] = []

    def check(name: str, handle: Any, how: str) -> None:
        handle.reset_stats()
        ids = greedy_ids(model, prompt, tokens)
        st = handle.stats()
        checks.append(
            {"config": name, "how": how, "tokens_match": bool(torch.equal(ids, want)), "misses": st.misses}
        )

    fresh = []
    for name, kwargs in CONFIGS:
        t0 = time.perf_counter()
        handle = moert.patch(model, device=device, **kwargs)
        patch_s = time.perf_counter() - t0
        check(name, handle, "patch")
        undo_s = _timed(handle.undo)
        fresh.append({"config": name, "patch_s": patch_s, "undo_s": undo_s})
    setup = sweep(
        model, device, CONFIGS, 1, lambda n, h: check(n, h, "reconfigure"), lambda: None, lambda: None
    )
    per_config_fresh = statistics.median(r["patch_s"] + r["undo_s"] for r in fresh)
    bad = [c for c in checks if not c["tokens_match"] or c["misses"] <= 0]
    if bad:
        raise SystemExit(f"offloading changed the tokens or never missed: {bad}")
    return {
        "fresh": fresh,
        "one_pool": setup,
        "fresh_per_config_s": per_config_fresh,
        "reconfigure_per_config_s": setup["reconfigure_s_median"],
        "ratio": per_config_fresh / setup["reconfigure_s_median"],
        "checks": checks,
    }


def estimate(rec: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V2-Lite on CUDA, estimated (nothing here ran on a GPU): a fresh patch + undo moves the
    pool three times: device -> host (the fill's reads), host -> pool (the fill's writes), pool ->
    device (undo). Link rates: the H200 session's best measured pinned copy rate (decode_cuda.json)
    for both directions, the host copy rate measured here for the writes. Page-locking 28.8 GB and
    first-touching it come on top and are not in the estimate."""
    cuda = json.loads((RESULTS / "decode_cuda.json").read_text())
    link = max(r["copy_GB_s"] for r in cuda["rows"] if r.get("copy_GB_s"))
    host = rec["host_copy_GB_s"]
    gb = DSV2_LITE_POOL_BYTES / 1e9
    per_config = 2 * gb / link + gb / host
    twin = rec["devices"]["cpu"]
    twin_rate = rec["pool_bytes"] / 1e9 / twin["fresh_per_config_s"]  # GB of pool set up and undone per s
    return {
        "pool_GB": gb,
        "link_GB_s": link,
        "link_source": f"bench/results/decode_cuda.json (commit {cuda['versions']['commit']}, {cuda['versions']['date']})",
        "host_copy_GB_s": host,
        "fresh_per_config_s_from_rates": per_config,
        "fresh_per_config_s_scaled_from_twin": gb / twin_rate,
        "decode_grid_configs": 13,
    }


def markdown(rec: dict[str, Any]) -> str:
    v, est = rec["versions"], rec["estimate"]
    out = [
        "# Set-up per configuration: fresh patch + undo vs reconfigure over one filled pool",
        "",
        f"{rec['model']}; pool {rec['pool_bytes'] / 1e9:.2f} GB; {rec['tokens']} greedy tokens per configuration, "
        "each equal to the all-resident model's with misses > 0 (checked). "
        f"moert {v['moert']}, torch {v['torch']}, transformers {v['transformers']}, commit {v['commit']}, {v['date']}, "
        f"{v['device_name']}, {v['cpu_threads']} CPU threads, load average {v['load_avg_1m']} at the end.",
        "",
        "| device | configs | fresh patch + undo per config (median) | reconfigure per config (median) | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for dev, d in rec["devices"].items():
        out.append(
            f"| {dev} | {len(d['fresh'])} | {d['fresh_per_config_s'] * 1e3:.0f} ms "
            f"| {d['reconfigure_per_config_s'] * 1e3:.0f} ms | {d['ratio']:.1f}x |"
        )
    out += [
        "",
        f"Estimate for DeepSeek-V2-Lite on CUDA (not measured; {est['pool_GB']:.1f} GB pool): a fresh patch + undo "
        f"moves the pool device -> host, host -> pool and pool -> device: 2 x {est['pool_GB']:.1f} GB at "
        f"{est['link_GB_s']:.1f} GB/s (the H200 session's best copy rate, {est['link_source']}) + "
        f"{est['pool_GB']:.1f} GB at {est['host_copy_GB_s']:.1f} GB/s (host copy measured here) = "
        f"**{est['fresh_per_config_s_from_rates']:.1f} s per configuration**, before page-locking and first-touching "
        f"{est['pool_GB']:.1f} GB (not in the estimate). Scaling the CPU twin's set-up per GB measured above "
        f"(which includes first-touching fresh memory, on a shared 2-core box) gives "
        f"{est['fresh_per_config_s_scaled_from_twin']:.0f} s: an upper indication, not an estimate. Over the "
        f"decode grid's {est['decode_grid_configs']} configurations that is at least "
        f"{est['decode_grid_configs'] * est['fresh_per_config_s_from_rates']:.0f} s per round that reconfigure "
        "saves (a device cache allocation and no copies instead); the GPU session records the real figures "
        "(`setup` in decode_cuda.json / prefill_cuda.json).",
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=2, help="the demo model's widths x this")
    p.add_argument("--tokens", type=int, default=3)
    p.add_argument("--devices", nargs="+", default=["cpu", "sim"], choices=("cpu", "sim"), help="cpu first")
    p.add_argument("--out", type=Path, default=RESULTS / "setup_reuse")
    args = p.parse_args()
    if "cpu" not in args.devices:
        p.error(f"--devices {args.devices}: include cpu (the estimate scales the CPU twin's figures)")
    torch.set_num_threads(1)
    s = args.scale
    model = tiny_model(
        demo_config(hidden_size=256 * s, intermediate_size=1368 * s, moe_intermediate_size=176 * s), seed=0
    )
    prompt = prompt_ids(1, 16, vocab=model.config.vocab_size, seed=1)
    want = greedy_ids(model, prompt, args.tokens)
    devices = {d: one_device(model, prompt, want, d, args.tokens) for d in args.devices}
    rec: dict[str, Any] = {
        "bench": "setup_reuse",
        "model": f"demo_config() with widths x{s}, fp32",
        "pool_bytes": devices[args.devices[0]]["one_pool"]["pool_bytes"],
        "tokens": args.tokens,
        "host_copy_GB_s": host_copy_gbs(),
        "devices": devices,
        "versions": {
            **versions("torch", "transformers"),
            "commit": git_commit(),
            "date": utc_now(),
            "device_name": device_name("cpu"),
            "cpu_threads": str(torch.get_num_threads()),
            "load_avg_1m": f"{os.getloadavg()[0]:.2f}",
        },
    }
    rec["estimate"] = estimate(rec)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rec, indent=2) + "\n")
    md = markdown(rec)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
