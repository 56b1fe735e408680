"""Host-side overhead of moert when every expert is cached: a patched model
(``moert.patch(model, cache_experts=1.0, device="cpu", policy="lru")``, the CPU twin) against the same
model unpatched, decoding greedily at batch 1. Nothing is copied in the timed steps (every expert is
resident; the run checks it), so what the patched model costs beyond the unpatched one is moert's
host work per MoE layer call: routing bookkeeping, native calls, per-expert dispatch.

Two figures per model, both measured in the same run:

1. Host time per decoded token: median and p20/p80 of per-token ``time.perf_counter`` times pooled
   over ``--rounds`` rounds; each round times both configurations on the same model object
   (patch -> measure -> undo), in alternating order (ABBA) so drift in machine load hits both alike.
   The ratio patched / unpatched is the headline (goal <= 1.15).
2. Native calls: every call into the extension ``moert._C`` (methods, property reads, constructors
   and module functions of ``ExpertPool``, ``SlabCache``, ``CopyEngine``), counted in a separate,
   untimed pass over the same decode, per token and per MoE layer call (goal <= 12), with a
   breakdown by method. The counter proves itself on a known sequence of native calls first.

Models (``--models``): ``demo`` (``moert.models.tiny.demo_config()``, fp32: hidden 256, 7 MoE layers of
64 experts, top-6) and ``v2lite`` (DeepSeek-V2-Lite's real dimensions with 3 layers: 1 dense + 2 MoE
at hidden 2048, expert intermediate 1408, 64 experts top-6; vocab cut to ``--v2lite-vocab``; bf16 by
default, ~2.5 GB of weights, ~7.5 GB peak RSS while patched: pool, slots and undo's rebuilt experts).
Random weights: timing only.

    python bench/bench_overhead.py                    # writes bench/results/overhead_cpu.{json,md}
    python bench/bench_overhead.py --tag _before      # bench/results/overhead_cpu_before.{json,md}
    python bench/bench_overhead.py --models demo --rounds 6 --json
    python bench/bench_overhead.py --policy learned --tag _learned   # the learned eviction's host cost
    python bench/bench_overhead.py --models demo --prefetch budget --tag _budget  # its cost: minus async's
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import moert
from moert import envs
from moert.models import get_adapter
from moert.models.tiny import deepseek_v2_lite_config, demo_config, prompt_ids, random_predictor, tiny_model
from moert.provenance import device_name, git_commit, modified_files, utc_now, versions

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_RATIO = 1.15  # patched / unpatched host time per token, every expert cached
GOAL_CALLS_PER_LAYER = 12.0  # native calls per MoE layer call
FILL_LEN = 256  # tokens of the untimed forward that loads every expert into the patched cache
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATCH: dict[str, Any] = {}  # --prefetch async|budget: {"prefetch": ...}, with a random preattn predictor


def native_calls() -> Any:
    """``bench/_native_calls.py`` (``NativeCallCounter``, ``self_check``), with bench/ put on ``sys.path``
    first: ``python -P bench/bench_overhead.py`` leaves it off."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("_native_calls")


def decode(
    model: Any,
    fill: torch.Tensor,
    prompt: torch.Tensor,
    tokens: int,
    warmup: int,
    timed: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[list[float], list[float], torch.Tensor]:
    """One untimed forward over ``fill`` (with moert: loads every expert into the cache), prefill of
    ``prompt`` (1, P), ``warmup`` greedy steps, then ``tokens`` timed greedy steps with the KV cache,
    inside ``timed`` when given (entered after the warm-up, left after the last step).

    Returns the per-token wall times (s), the per-token CPU times of the calling thread (s:
    ``time.thread_time``, the host work itself, which other processes on a loaded machine do not
    inflate) and the (1, tokens) generated ids of the timed steps.
    """
    lat: list[float] = []
    cpu: list[float] = []
    ids: list[torch.Tensor] = []
    with torch.no_grad(), contextlib.ExitStack() as stack:
        model(fill, use_cache=False)
        out = model(prompt, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)  # [1, 1]
        for i in range(warmup + tokens):
            if i == warmup and timed is not None:
                stack.enter_context(timed)
            t0, c0 = time.perf_counter(), time.thread_time()
            out = model(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            cache = out.past_key_values
            if i >= warmup:
                lat.append(dt)
                cpu.append(dc)
                ids.append(nxt)
    return lat, cpu, torch.cat(ids, dim=1)


def _q(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _ms(xs: list[float]) -> dict[str, float]:
    return {
        "ms_median": statistics.median(xs) * 1e3,
        "ms_p20": _q(xs, 0.2) * 1e3,
        "ms_p80": _q(xs, 0.8) * 1e3,
    }


#: --policy: the patched configuration's eviction (learned: random weights, an ensemble of --members)
POLICY = {"name": "lru", "members": 2}


def _patch(model: Any) -> Any:
    extra = dict(PATCH, predictor=random_predictor(model)) if PATCH else {}
    if POLICY["name"] == "learned":
        from moert.predict.reuse import ReuseModel, ensemble
        from moert.predict.reuse_train import ReuseTrainConfig

        a, hidden = get_adapter(model), ReuseTrainConfig().hidden  # the trained model's size
        members = [ReuseModel.random(len(a.moe_layers()), a.num_experts, seed=s, hidden=hidden)
                   for s in range(POLICY["members"])]  # fmt: skip
        extra["evictor"] = ensemble(members)
    return moert.patch(model, cache_experts=1.0, device="cpu", policy=POLICY["name"], **extra)


def build(name: str, args: argparse.Namespace) -> tuple[Any, str, str]:
    """The model, its description and its dtype's name."""
    if name == "demo":
        return (
            tiny_model(demo_config(), seed=args.seed),
            "demo_config() (DeepSeek-V2-Lite layout scaled down)",
            "fp32",
        )
    from transformers import AutoModelForCausalLM

    cfg = deepseek_v2_lite_config(
        num_hidden_layers=3, vocab_size=args.v2lite_vocab, bos_token_id=1, eos_token_id=None, pad_token_id=0
    )
    rng = torch.random.get_rng_state()
    torch.manual_seed(args.seed)
    try:  # built in its dtype (not fp32 then cast): half the peak memory and init time
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[args.v2lite_dtype])
    finally:
        torch.random.set_rng_state(rng)
    described = (
        f"deepseek_v2_lite_config(num_hidden_layers=3): DeepSeek-V2-Lite dims, 1 dense + 2 MoE layers, "
        f"vocab cut from 102400 to {args.v2lite_vocab}"
    )
    return model.eval(), described, args.v2lite_dtype


def _dims(model: Any, dtype: str) -> dict[str, Any]:
    cfg, adapter = model.config, get_adapter(model)
    inter = cfg.moe_intermediate_size
    itemsize = DTYPES[dtype].itemsize
    return {
        "model_type": cfg.model_type,
        "dtype": dtype,
        "hidden": cfg.hidden_size,
        "moe_intermediate": inter,
        "layers": cfg.num_hidden_layers,
        "moe_layers": len(adapter.moe_layers()),
        "experts": adapter.num_experts,
        "top_k": adapter.top_k,
        "vocab": cfg.vocab_size,
        "expert_MB": 3 * cfg.hidden_size * inter * itemsize / 1e6,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def timed_rounds(
    model: Any, fill: torch.Tensor, prompt: torch.Tensor, args: argparse.Namespace
) -> tuple[
    dict[str, list[float]], dict[str, list[float]], list[dict[str, float]], dict[str, torch.Tensor], int, Any
]:
    """``--rounds`` rounds, each timing unpatched and patched (patch -> decode -> undo) in ABBA order.

    Returns wall and CPU seconds per token per configuration (pooled), each round's medians and ratio,
    the generated ids, the patched runs' timed cache misses and MoE layer calls per token.
    """
    lat: dict[str, list[float]] = {"unpatched": [], "patched": []}
    cpu: dict[str, list[float]] = {"unpatched": [], "patched": []}
    per_round: list[dict[str, float]] = []
    ids: dict[str, torch.Tensor] = {}
    timed_misses = 0
    moe_calls_per_token = None
    for r in range(args.rounds):
        order = ("unpatched", "patched") if r % 2 == 0 else ("patched", "unpatched")  # ABBA
        medians: dict[str, float] = {}
        for config in order:
            gc.collect()
            if config == "unpatched":
                times, cpus, out = decode(model, fill, prompt, args.tokens, args.warmup)
            else:
                handle = _patch(model)
                try:
                    # counters cover the timed steps: they must show no copy (every expert resident)
                    times, cpus, out = decode(
                        model, fill, prompt, args.tokens, args.warmup, timed=_on_enter(handle.reset_stats)
                    )
                    st = handle.stats()
                finally:
                    handle.undo()
                timed_misses += st.misses
                moe_calls_per_token = sum(v.calls for v in st.per_layer.values()) / args.tokens
            lat[config] += times
            cpu[config] += cpus
            ids[config] = out
            medians[config] = statistics.median(times) * 1e3
        per_round.append(
            {
                "order": "/".join(order),
                "unpatched_ms_median": medians["unpatched"],
                "patched_ms_median": medians["patched"],
                "ratio": medians["patched"] / medians["unpatched"],
            }
        )
    return lat, cpu, per_round, ids, timed_misses, moe_calls_per_token


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    model, described, dtype = build(name, args)
    build_s = time.perf_counter() - t_start
    dims = _dims(model, dtype)
    vocab = model.config.vocab_size
    fill = prompt_ids(1, FILL_LEN, vocab=vocab, seed=args.seed + 2)
    prompt = prompt_ids(1, args.prompt_len, vocab=vocab, seed=args.seed + 1)
    lat, cpu, per_round, ids, timed_misses, moe_calls_per_token = timed_rounds(model, fill, prompt, args)
    timing_s = time.perf_counter() - t_start - build_s
    calls = count_native_calls(model, fill, prompt, args)
    unp, pat = _ms(lat["unpatched"]), _ms(lat["patched"])
    ratio = pat["ms_median"] / unp["ms_median"]
    unp_cpu, pat_cpu = _ms(cpu["unpatched"]), _ms(cpu["patched"])
    ratio_cpu = pat_cpu["ms_median"] / unp_cpu["ms_median"]
    moe_layers = dims["moe_layers"]
    rec = {
        "model": name,
        "described": described,
        "dims": dims,
        "build_s": build_s,
        "timing_s": timing_s,
        "unpatched": unp,
        "patched": pat,
        "ratio": ratio,
        "unpatched_cpu": unp_cpu,
        "patched_cpu": pat_cpu,
        "ratio_cpu": ratio_cpu,
        "ratio_min_max_rounds": [min(r["ratio"] for r in per_round), max(r["ratio"] for r in per_round)],
        "overhead_us_per_moe_layer_call": (pat["ms_median"] - unp["ms_median"]) * 1e3 / moe_layers,
        "per_round": per_round,
        "timed_misses": timed_misses,
        "moe_layer_calls_per_token": moe_calls_per_token,
        "same_tokens": bool(torch.equal(ids["patched"], ids["unpatched"])),
        "native": calls,
        "goals": {
            # judged on the thread's CPU time: on a shared machine wall time measures the neighbours too
            "ratio": {"goal": GOAL_RATIO, "value": ratio_cpu, "wall": ratio, "pass": ratio_cpu <= GOAL_RATIO},
            "native_calls_per_moe_layer_call": {
                "goal": GOAL_CALLS_PER_LAYER,
                "value": calls["per_moe_layer_call"],
                "pass": calls["per_moe_layer_call"] <= GOAL_CALLS_PER_LAYER,
            },
        },
        "peak_rss_GB_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }
    del model
    gc.collect()
    return rec


@contextlib.contextmanager
def _on_enter(fn: Any) -> Any:
    fn()
    yield


def count_native_calls(
    model: Any, fill: torch.Tensor, prompt: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    """The instrumented pass: the same decode on the patched model, native calls counted in the timed
    steps only (after fill, prefill and warm-up; not during the timed rounds)."""
    counter = native_calls().NativeCallCounter()
    handle = _patch(model)
    try:
        decode(model, fill, prompt, args.tokens, args.warmup, timed=_reset_then(handle.reset_stats, counter))
        st = handle.stats()  # outside the counted window
    finally:
        handle.undo()
    counter.check()  # raises unless the profiler saw the same calls
    if counter.total == 0:
        raise RuntimeError("no native call counted in the decode of the patched model")
    layer_calls = sum(v.calls for v in st.per_layer.values())
    breakdown = [
        {"call": k, "per_token": v / args.tokens, "per_moe_layer_call": v / layer_calls}
        for k, v in counter.counts.most_common()
    ]
    return {
        "tokens": args.tokens,
        "total": counter.total,
        "per_token": counter.total / args.tokens,
        "moe_layer_calls": layer_calls,
        "per_moe_layer_call": counter.total / layer_calls,
        "misses": st.misses,
        "profiler_agrees": True,
        "breakdown": breakdown,
    }


@contextlib.contextmanager
def _reset_then(fn: Any, counter: Any) -> Any:
    fn()
    with counter:
        yield


def _provenance(threads: int) -> dict[str, Any]:
    return {
        **versions("torch", "transformers", "numpy"),
        "commit": git_commit(),
        "modified_files": modified_files(),
        "date": utc_now(),
        "device": "cpu (moert CPU twin)",
        "device_name": device_name("cpu"),
        "cpu_threads": threads,
        "copy_streams": envs.copy_streams(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    check = native_calls().self_check()
    models = [bench_model(m, args) for m in args.models]
    return {
        "bench": "overhead",
        "device": "cpu",
        "config": f"moert.patch(model, cache_experts=1.0, device='cpu', policy='{POLICY['name']}') vs unpatched"
        + (
            f" (evictor: a random reuse ensemble of {POLICY['members']})"
            if POLICY["name"] == "learned"
            else ""
        ),
        "prefetch": PATCH.get("prefetch", "none (no predictor)"),
        "batch": 1,
        "prompt_len": args.prompt_len,
        "fill_len": FILL_LEN,
        "tokens": args.tokens,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "counter_self_check": check,
        "provenance": {
            **_provenance(torch.get_num_threads()),
            "load_avg_1m_start": round(load_start, 2),
            "load_avg_1m_end": round(os.getloadavg()[0], 2),
        },
        "total_s": time.perf_counter() - t0,
        "models": models,
        "note": NOTE,
    }


NOTE = (
    "Fairness: each round times both configurations on the same model object and the same prompt with "
    "the same decode loop: unpatched, then patch -> time -> undo (undo copies the experts back into "
    "their original Parameter objects), in ABBA order over rounds; patch, undo and the untimed "
    f"{FILL_LEN}-token forward that loads every expert into the cache are outside the timed steps ("
    "'timed misses': cache misses the patched run counted in them, 0 when nothing was copied). Both configurations share every non-expert "
    "weight; the unpatched experts run transformers' own implementation (grouped_mm), the patched ones "
    "moert's per-expert loop over cache slots. The native-call pass is separate and untimed: every "
    "native attribute of moert._C (methods, property reads, constructors, module functions) is wrapped "
    "for the pass, cross-checked against sys.setprofile c_call events, after a self-check on a known "
    "call sequence. Random weights (near-uniform routing): timing only."
)


def markdown(rec: dict[str, Any]) -> str:
    v = rec["provenance"]
    mods = ", ".join(v["modified_files"]) or "none"
    out = [
        "# Host overhead of moert with every expert cached (CPU twin)",
        "",
        f"`{rec['config']}`, prefetch: {rec.get('prefetch', 'none')}; batch 1, prompt {rec['prompt_len']}, {rec['tokens']} timed greedy tokens after "
        f"{rec['warmup']} warm-up (and a {rec['fill_len']}-token untimed fill), x {rec['rounds']} interleaved "
        "rounds (per-token times pooled).",
        f"moert {v['moert']}, torch {v['torch']}, transformers {v['transformers']}, python {v['python']}, "
        f"commit {v['commit']} (modified: {mods}), {v['date']}, {v['device_name']}, {v['cpu_threads']} torch "
        f"thread(s), {v['copy_streams']} copy lane(s), load average {v['load_avg_1m_start']} at the start, "
        f"{v['load_avg_1m_end']} at the end; the run took {rec['total_s']:.0f} s.",
        "",
        "## Host time per decoded token",
        "",
        "| model | dtype | unpatched ms median (p20-p80) | patched ms median (p20-p80) | patched / unpatched "
        "| per-round ratios | CPU ms unpatched / patched | CPU patched / unpatched | overhead us / MoE layer call "
        f"| timed misses | same tokens | goal <= {GOAL_RATIO:g} (CPU) |",
        "|---|---|---|---|---:|---|---|---:|---:|---:|---|---|",
    ]
    for m in rec["models"]:
        u, p = m["unpatched"], m["patched"]
        rounds = ", ".join(f"{r['ratio']:.2f}" for r in m["per_round"])
        out.append(
            f"| {m['model']} | {m['dims']['dtype']} | {u['ms_median']:.2f} ({u['ms_p20']:.2f}-{u['ms_p80']:.2f}) "
            f"| {p['ms_median']:.2f} ({p['ms_p20']:.2f}-{p['ms_p80']:.2f}) | {m['ratio']:.3f} | {rounds} "
            f"| {m['unpatched_cpu']['ms_median']:.2f} / {m['patched_cpu']['ms_median']:.2f} | {m['ratio_cpu']:.3f} "
            f"| {m['overhead_us_per_moe_layer_call']:.0f} | {m['timed_misses']} | {m['same_tokens']} "
            f"| {'pass' if m['goals']['ratio']['pass'] else 'FAIL'} |"
        )
    out += [
        "",
        "## Native calls (moert._C) in the patched decode",
        "",
        f"| model | calls / token | MoE layer calls / token | calls / MoE layer call | goal <= {GOAL_CALLS_PER_LAYER:g} "
        "| top calls per MoE layer call |",
        "|---|---:|---:|---:|---|---|",
    ]
    for m in rec["models"]:
        n = m["native"]
        top = ", ".join(f"`{b['call']}` {b['per_moe_layer_call']:g}" for b in n["breakdown"][:5])
        out.append(
            f"| {m['model']} | {n['per_token']:g} | {n['moe_layer_calls'] / n['tokens']:g} "
            f"| {n['per_moe_layer_call']:.2f} "
            f"| {'pass' if m['goals']['native_calls_per_moe_layer_call']['pass'] else 'FAIL'} | {top} |"
        )
    for m in rec["models"]:
        n = m["native"]
        out += [
            "",
            f"Breakdown, {m['model']} (per token; {n['tokens']} counted tokens):",
            "",
            "| call | per token | per MoE layer call |",
            "|---|---:|---:|",
            *(
                f"| `{b['call']}` | {b['per_token']:g} | {b['per_moe_layer_call']:g} |"
                for b in n["breakdown"]
            ),
        ]
    out += ["", "## Models", ""]
    for m in rec["models"]:
        out.append(
            f"- {m['model']}: {m['described']}; {m['dims']}; built in {m['build_s']:.0f} s, timed rounds and "
            f"count pass {m['timing_s']:.0f} s, peak RSS so far {m['peak_rss_GB_so_far']:.1f} GB."
        )
    out += ["", f"Note: {rec['note']}", ""]
    return "\n".join(out)


def _models(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in ("demo", "v2lite")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--models takes demo and/or v2lite, comma-separated; got {text!r}")
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models", type=_models, default=["demo", "v2lite"], help="demo and/or v2lite (default both)"
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per model (default 3)")
    p.add_argument("--tokens", type=int, default=64, help="timed decode tokens per config and round")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode tokens before the timed ones")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument(
        "--v2lite-vocab", type=int, default=4096, help="v2lite's vocabulary (real: 102400; default 4096)"
    )
    p.add_argument("--v2lite-dtype", choices=sorted(DTYPES), default="bf16", help="v2lite's dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: stable on a shared 2-core box)"
    )
    p.add_argument("--tag", default="", help="output name suffix: bench/results/overhead_cpu{TAG}.json/.md")
    p.add_argument("--prefetch", choices=["none", "async", "budget"], default="none", help="see the doc")  # fmt: skip
    p.add_argument("--json", action="store_true", help="also print the JSON record")
    p.add_argument("--policy", choices=["lru", "learned"], default="lru", help="the patched model's policy")
    p.add_argument("--members", type=int, default=2,
                   help="policy learned: models in its random reuse ensemble (bench_evict trains 2)")  # fmt: skip
    args = p.parse_args()
    if args.members < 1:
        p.error(f"--members {args.members} must be >= 1")
    POLICY.update(name=args.policy, members=args.members)
    PATCH.update({} if args.prefetch == "none" else {"prefetch": args.prefetch})
    if min(args.rounds, args.tokens, args.prompt_len) < 1 or args.warmup < 0:
        p.error("--rounds, --tokens and --prompt-len must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    rec = run(args)
    stem = RESULTS / f"overhead_cpu{args.tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(rec, indent=2) + "\n")
    md = markdown(rec)
    stem.with_suffix(".md").write_text(md)
    print(md)
    if args.json:
        print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
