"""``moert demo``: the main job, end to end.

By default it builds a tiny DeepSeek-V2-Lite-shaped model (seeded random weights; the real layout
of 64 routed experts, top-6, 2 shared experts and a dense first layer, with dimensions scaled down),
saves it with ``save_pretrained``, loads it back with ``moert.load`` and a 25% expert cache,
generates greedily, and checks the tokens against the unpatched model. ``--model PATH`` does the
same for any local model directory of a supported architecture. It prints the per-layer cache
table, tokens/s and memory with and without offloading (``--json`` for a machine-readable record).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run", "run_demo"]

_MB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, default=None, help="local HF model directory (default: built-in tiny model)"
    )
    parser.add_argument(
        "--cache",
        type=float,
        default=0.25,
        help="cache size: fraction of routed experts (<= 1.0) or, when > 1, a number of slots (default 0.25)",
    )
    parser.add_argument(
        "--policy",
        choices=("lru", "lfu", "utility"),
        default="lru",
        help="eviction for the main run (utility: moving average of each expert's use, with prefetch)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: CUDA when one can run"
    )
    parser.add_argument(
        "--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's, else float32)"
    )
    parser.add_argument("--tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--prompt-len", type=int, default=16, help="random prompt length (default 16)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for the built-in tiny model, whose matmuls are too small to "
        "gain from more; torch's default for --model)",
    )
    parser.add_argument(
        "--no-check", action="store_true", help="skip the unpatched reference run (large models)"
    )
    parser.add_argument(
        "--predictor",
        default="auto",
        help="pre-attention predictor for a second run with predictive prefetch (policy score, "
        "over-provision 2): a PRED.safetensors from `moert train`, 'auto' (default: train one on the "
        "built-in model's own routing over other prompts, ~10 s; skipped for --model) or 'none'",
    )
    parser.add_argument(
        "--host-budget",
        default=None,
        help="host memory for experts (bytes, a size such as 16GiB, or a fraction <= 1.0 of all experts): "
        "the pinned pool holds that much, the rest is read from the checkpoint files when needed",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON record instead of the report")


def _host_budget_arg(value: str | None) -> int | float | str | None:
    """``--host-budget``: None, a fraction (float <= 1), bytes (an int) or a size string."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return value  # a size string, checked by moert.load
    return number if number <= 1.0 or number != int(number) else int(number)


def _cache_arg(value: float) -> int | float:
    if value > 1.0:
        if value != int(value):
            raise ValueError(f"--cache {value}: a slot count must be an integer (or use a fraction <= 1.0)")
        return int(value)
    return float(value)


def _generate(model: Any, prompt: Any, tokens: int) -> tuple[Any, Any, float]:
    import torch

    from moert.models.tiny import greedy

    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    seq, logits = greedy(model, prompt, tokens)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return seq, logits, time.perf_counter() - t0


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo and return its record (see ``--json``)."""
    import torch

    import moert
    from moert.models.tiny import prompt_ids

    torch.manual_seed(args.seed)
    threads = args.threads if args.threads is not None else (1 if args.model is None else None)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads} must be >= 1")
        torch.set_num_threads(threads)
    cache = _cache_arg(args.cache)
    if args.predictor not in ("auto", "none") and not Path(args.predictor).is_file():
        raise FileNotFoundError(f"--predictor {args.predictor}: no such file (or use auto / none)")
    t_build = time.perf_counter()
    tmp, path, source, reference = _model_source(args)
    t_build = time.perf_counter() - t_build
    try:
        model = moert.load(
            path,
            cache_experts=cache,
            policy=args.policy,
            device=args.device,
            dtype=args.dtype,
            progress=not args.json,
            host_budget=_host_budget_arg(getattr(args, "host_budget", None)),
        )
        handle = moert.handle_of(model)
        prompt = prompt_ids(args.batch, args.prompt_len, vocab=model.config.vocab_size, seed=args.seed + 1)
        prompt = prompt.to(handle.device)
        ref = None if args.no_check else _reference_run(args, path, reference, model, prompt)
        if ref is not None:
            reference = ref.pop("model")  # on the model's device and dtype
        predictor, train_s = _predictor(args, reference)
        del reference

        _generate(model, prompt, 2)  # warm-up (also warms the expert cache)
        handle.reset_stats()
        seq, logits, dt = _generate(model, prompt, args.tokens)
        stats = handle.stats()
        check = {"checked": False} if ref is None else _check(seq, logits, ref["seq"], ref["logits"])
        predictive = None
        if predictor is not None:
            predictive = _predictive_run(args, path, cache, prompt, predictor)
            predictive["train_s"] = train_s
            pred_seq = predictive.pop("seq")
            if ref is not None:
                predictive["tokens_identical"] = bool(torch.equal(pred_seq, ref["seq"]))
        record = _record(args, source, model, handle, cache, check, stats, predictive, ref)
        record["tokens_per_s"]["moert"] = args.batch * args.tokens / dt
        record["seconds"] = {"build_and_save": t_build, "load": handle.load_report["seconds"], "generate": dt}
        return record
    finally:
        if tmp is not None:
            tmp.cleanup()


def _model_source(args: argparse.Namespace) -> tuple[Any, Any, str, Any]:
    """``(temporary dir or None, model path, description, unpatched reference model or None)``: the
    built-in model saved into a temporary directory, or ``--model PATH`` checked before loading."""
    from moert.api.load import checkpoint_files
    from moert.models.tiny import demo_config, save_tiny, tiny_model

    if args.model is None:
        tmp = tempfile.TemporaryDirectory(prefix="moert-demo-")
        reference = tiny_model(demo_config(), seed=args.seed)
        path = save_tiny(reference, Path(tmp.name) / "deepseek-v2-lite-tiny")
        return tmp, path, "built-in: DeepSeek-V2-Lite layout scaled down, seeded random weights", reference
    checkpoint_files(args.model)  # clear errors before loading anything
    return None, args.model, str(args.model), None


def _reference_run(
    args: argparse.Namespace, path: Any, reference: Any, model: Any, prompt: Any
) -> dict[str, Any]:
    """The unpatched model's greedy run on the same prompt: ``seq``, ``logits``, ``tok_s``, ``bytes`` and
    the ``model`` itself (moved to the prompt's device and the patched model's dtype)."""
    from moert.api.load import tensor_bytes

    if reference is None:
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=model.dtype)
    reference = reference.to(device=prompt.device, dtype=model.dtype).eval()
    _generate(reference, prompt, 2)  # warm-up (kernel caches for these shapes)
    seq, logits, dt = _generate(reference, prompt, args.tokens)
    return {
        "seq": seq,
        "logits": logits,
        "tok_s": args.batch * args.tokens / dt,
        "bytes": tensor_bytes(reference),
        "model": reference,
    }


def _check(seq: Any, logits: Any, ref_seq: Any, ref_logits: Any) -> dict[str, Any]:
    """Tokens identical to the unpatched model's (and where they first differ), logits' relative error."""
    import torch

    rel = ((logits.float() - ref_logits.float()).abs().max() / ref_logits.float().abs().max()).item()
    same = bool(torch.equal(seq, ref_seq))
    first = None if same else (seq != ref_seq).nonzero()[0].tolist()
    return {"checked": True, "tokens_identical": same, "first_difference": first, "logits_rel_err": rel}


def _record(
    args: argparse.Namespace,
    source: str,
    model: Any,
    handle: Any,
    cache: Any,
    check: dict[str, Any],
    stats: Any,
    predictive: dict[str, Any] | None,
    ref: dict[str, Any] | None,
) -> dict[str, Any]:
    """The demo's JSON record (``tokens_per_s["moert"]`` and ``seconds`` are added by the caller)."""
    import torch

    rep = handle.load_report
    non_expert = rep["non_expert_bytes"]
    full_bytes = ref["bytes"] if ref is not None else non_expert + rep["all_experts_bytes"]
    return {
        "model": source,
        "model_type": model.config.model_type,
        "moe_layers": handle.layer_ids,
        "num_experts": handle.adapter.num_experts,
        "top_k": handle.adapter.top_k,
        "cache_slots": handle.num_slots,
        "cache_experts": cache,
        "policy": args.policy,
        "device": handle.device,
        "cpu_threads": torch.get_num_threads(),
        "dtype": rep["dtype"],
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.tokens,
        "check": check,
        "tokens_per_s": {"moert": None, "unpatched": None if ref is None else ref["tok_s"]},
        "stats": stats.as_dict(),
        "predictive": predictive,
        "memory_bytes": {
            "device_without_offload": full_bytes,
            "device_with_offload": non_expert + handle.cache_bytes,
            "device_peak_during_load": rep["peak_device_bytes"],
            "device_peak_method": rep["peak_method"],
            "host_pool": handle.pool_bytes,
            "experts_all": rep["all_experts_bytes"],
            "slab_cache": handle.cache_bytes,
            "non_expert": non_expert,
            "host_tier": rep.get("host_tier"),
        },
        "versions": _versions(),
    }


def _predictor(args: argparse.Namespace, reference: Any) -> tuple[Any, float | None]:
    """The predictor of the predictive run: a file, or one trained on the built-in model's routing
    over 24 prompts that are not the demo's (``auto``); None when skipped."""
    if args.predictor == "none" or (
        args.predictor == "auto" and (args.model is not None or reference is None)
    ):
        return None, None
    if args.predictor != "auto":
        return args.predictor, None  # a file, checked before anything was loaded
    from moert.engine.prefetch import capture_and_train
    from moert.models.tiny import prompt_ids

    t0 = time.perf_counter()
    vocab = reference.config.vocab_size
    prompts = [prompt_ids(1, 16, vocab=vocab, seed=1000 + args.seed + i)[0] for i in range(24)]
    pred = capture_and_train(reference, prompts, new_tokens=32, dim=256, epochs=20, seed=args.seed)
    return pred, time.perf_counter() - t0


def _predictive_run(args: argparse.Namespace, path: Any, cache: Any, prompt: Any, predictor: Any) -> dict:
    """The same generation with the pre-attention predictor prefetching (policy ``score``, m=2)."""
    import moert

    model = moert.load(
        path,
        cache_experts=cache,
        policy="score",
        predictor=predictor,
        overprovision=2,
        device=args.device,
        dtype=args.dtype,
        progress=False,
    )
    handle = moert.handle_of(model)
    try:
        _generate(model, prompt, 2)
        handle.reset_stats()
        seq, _, dt = _generate(model, prompt, args.tokens)
        return {"seq": seq, "tokens_per_s": args.batch * args.tokens / dt, "stats": handle.stats().as_dict()}
    finally:
        handle.undo()


def _versions() -> dict[str, str]:
    from moert.provenance import versions

    return versions("torch", "transformers")


def _report(r: dict[str, Any]) -> str:
    lines = []
    mem = r["memory_bytes"]
    lines.append(f"moert demo — {r['model']}")
    lines.append(
        f"  {r['model_type']}: {len(r['moe_layers'])} MoE layers x {r['num_experts']} experts, top-{r['top_k']}; "
        f"cache {r['cache_slots']} slots ({r['cache_experts']}), policy {r['policy']}, device {r['device']} ({r['cpu_threads']} CPU threads), {r['dtype']}"
    )
    lines.append(
        f"  batch {r['batch']}, prompt {r['prompt_len']} tokens, generated {r['new_tokens']} greedy tokens"
    )
    c = r["check"]
    if c["checked"]:
        verdict = "IDENTICAL" if c["tokens_identical"] else f"DIFFERENT (first at {c['first_difference']})"
        lines.append(
            f"  tokens vs unpatched model: {verdict}; logits max relative error {c['logits_rel_err']:.2e}"
        )
    else:
        lines.append("  tokens vs unpatched model: not checked (--no-check)")
    lines.append("")
    lines.append(
        f"  {'layer':>5} {'hits':>7} {'misses':>7} {'hit rate':>8} {'MB copied':>10} {'forwards':>8} {'waves':>6}"
    )
    for layer, s in sorted(r["stats"]["per_layer"].items(), key=lambda kv: int(kv[0])):
        n = s["hits"] + s["misses"]
        rate = s["hits"] / n if n else 0.0
        lines.append(
            f"  {layer:>5} {s['hits']:>7} {s['misses']:>7} {rate:>8.1%} {s['bytes_copied'] / _MB:>10.2f} {s['calls']:>8} {s['waves']:>6}"
        )
    st = r["stats"]
    lines.append(
        f"  {'all':>5} {st['hits']:>7} {st['misses']:>7} {st['hit_rate']:>8.1%} {st['bytes_copied'] / _MB:>10.2f}"
        f"   demand stall {st['demand_stall_s'] * 1e3:.1f} ms"
    )
    tier = r["memory_bytes"].get("host_tier")
    if tier is not None and tier["tiered"]:
        fs = tier["filesystem"]
        lines.append(
            f"  host tier: {tier['capacity']}/{tier['all_experts']} experts pinned ({tier['policy']}); device loads "
            f"from the pool {st['pool_hits']}, from the files {st['ssd_reads']} ({st['ssd_bytes'] / _MB:.2f} MB, "
            f"{st['ssd_read_s'] * 1e3:.1f} ms read, {st['ssd_stall_s'] * 1e3:.1f} ms of it stalled) on "
            f"{fs['fstype']}{' (read-only)' if fs['read_only'] else ''}"
        )
    p = r["predictive"]
    if p is not None:
        ps, how = p["stats"], f"trained here in {p['train_s']:.1f} s" if p["train_s"] else "from file"
        same = {True: "IDENTICAL", False: "DIFFERENT", None: "not checked"}[p.get("tokens_identical")]
        lines.append("")
        lines.append(f"  with the pre-attention predictor ({how}; policy score, prefetch top-(k+2)):")
        lines.append(
            f"    hit rate {st['hit_rate']:.1%} -> {ps['hit_rate']:.1%}, demand misses {st['misses']} -> "
            f"{ps['misses']}, prefetch hits {ps['prefetch_hits']}, wasted prefetch "
            f"{ps['prefetch_wasted_bytes'] / _MB:.1f} MB, online recall@k {ps['recall']:.2f}; tokens: {same}"
        )
    lines.append("")
    tps = r["tokens_per_s"]
    ref = f"{tps['unpatched']:.1f}" if tps["unpatched"] else "n/a"
    lines.append(f"  tokens/s: moert {tps['moert']:.1f}, unpatched (all experts resident) {ref}")
    lines.append(
        f"  device memory: {mem['device_without_offload'] / _MB:.1f} MB without offloading -> "
        f"{mem['device_with_offload'] / _MB:.1f} MB with moert (non-expert {mem['non_expert'] / _MB:.1f} MB + "
        f"slab cache {mem['slab_cache'] / _MB:.1f} MB); peak while loading {mem['device_peak_during_load'] / _MB:.1f} MB"
    )
    lines.append(
        f"  host memory: expert pool {mem['host_pool'] / _MB:.1f} MB (all {mem['experts_all'] / _MB:.1f} MB of experts)"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        record = run_demo(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"moert demo: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(_report(record))
    c, p = record["check"], record["predictive"]
    if c["checked"] and (not c["tokens_identical"] or (p is not None and not p["tokens_identical"])):
        print("moert demo: FAILED — offloaded tokens differ from the unpatched model", file=sys.stderr)
        return 1
    return 0
