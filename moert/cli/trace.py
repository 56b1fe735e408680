"""``moert trace``: capture routing traces from a model, convert peers' formats, summarise a trace.

Usage::

    moert trace --model PATH (--prompts FILE.txt | --builtin | --random-prompts N) --max-new-tokens N --out DIR [--with-hidden] [--with-scores]
    moert trace convert [--format moe-beyond-csv|esft] SRC --out DIR [--num-experts E] [--top-k K]
    moert trace info TRACE [--format ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["add_arguments", "importer_options", "reporting_errors", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF model directory (or hub id, with network) to capture from")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="text file, one prompt per line")
    src.add_argument("--builtin", action="store_true", help="use moert's small built-in prompt set")
    src.add_argument(
        "--random-prompts",
        type=int,
        metavar="N",
        help="N prompts of seeded random token ids (for models without a tokenizer, e.g. test models)",
    )
    parser.add_argument("--prompt-len", type=int, default=16, help="tokens per --random-prompts prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-prompts")
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)"
    )
    parser.add_argument("--out", help="output trace directory")
    parser.add_argument(
        "--with-hidden", action="store_true", help="store normalized pre-attention rows (fp16)"
    )
    parser.add_argument("--with-scores", action="store_true", help="store router scores (fp32)")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing trace in --out")
    sub = parser.add_subparsers(dest="trace_command", metavar="{convert,info}")

    conv = sub.add_parser("convert", help="convert a MoE-Beyond CSV or ESFT trace to the moert format")
    conv.add_argument("src", help="source directory (or one CSV)")
    conv.add_argument(
        "--format", dest="src_format", default="auto", choices=["auto", "moe-beyond-csv", "esft"]
    )
    conv.add_argument("--out", dest="convert_out", required=True, help="output moert trace directory")
    conv.add_argument("--num-experts", type=int, default=64, help="routed experts per layer E (default 64)")
    conv.add_argument("--top-k", type=int, default=None, help="experts per token k (CSV: inferred; ESFT: 6)")
    conv.add_argument(
        "--model-type", default="deepseek_v2", help="model_type to record (default deepseek_v2)"
    )
    conv.add_argument("--overwrite", dest="convert_overwrite", action="store_true")

    info = sub.add_parser("info", help="print a trace's metadata and simple routing statistics")
    info.add_argument("trace")
    info.add_argument("--format", dest="info_format", default="auto")


def importer_options(fmt: str, num_experts: int, top_k: int | None, model_type: str) -> dict:
    """Options for :func:`moert.trace.open_trace` of an imported format (none for ``moert``)."""
    if fmt == "moert":
        return {}
    options = {"num_experts": num_experts, "model_type": model_type}
    if top_k is not None:
        options["top_k"] = top_k
    return options


def _convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from moert.trace import TraceWriter, detect_format, open_trace

    fmt = detect_format(args.src) if args.src_format == "auto" else args.src_format
    if fmt == "moert":
        print(f"moert trace convert: {args.src} is already a moert trace", file=sys.stderr)
        return 2
    trace = open_trace(args.src, fmt, **importer_options(fmt, args.num_experts, args.top_k, args.model_type))
    meta = trace.meta
    with TraceWriter(args.convert_out, meta, overwrite=args.convert_overwrite) as writer:
        bar = tqdm(total=meta.num_tokens, unit="tok", desc=f"convert {fmt}", file=sys.stderr)
        for seq in trace.sequences():
            writer.add(seq)
            bar.update(seq.num_tokens)
        bar.close()
    final = writer.meta
    print(
        f"wrote {args.convert_out}: {final.num_sequences} sequences, {final.num_tokens} tokens, "
        f"L={final.num_layers}, E={final.num_experts}, k={final.top_k}"
    )
    if getattr(trace, "has_predictions", False):
        print(
            f"note: {args.src} also records predictions (Predicted Expert IDs); the moert format keeps the routing "
            f"only: evaluate them with `moert eval --predictions {args.src}`"
        )
    return 0


def _info(args: argparse.Namespace) -> int:
    from moert.trace import open_trace

    trace = open_trace(args.trace, args.info_format)
    meta = trace.meta
    print(trace)
    prev_overlap = total = 0
    for seq in trace.sequences():
        e = seq.experts  # [L, T, k]
        if e.shape[1] > 1:
            same = (e[:, 1:, :, None] == e[:, :-1, None, :]).any(-1)  # [L, T-1, k]
            prev_overlap += int(same.sum())
            total += same.numel()
    if total:
        print(
            f"previous-token expert overlap: {prev_overlap / total:.3f} (of k={meta.top_k} per layer and token)"
        )
    return 0


def reporting_errors(
    command: str, body: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    """Runs ``body(args)``; bad input (a malformed or missing file, a bad option) prints one line naming
    the problem and returns 2 instead of a traceback."""
    try:
        return body(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"moert {command}: error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    return reporting_errors("trace", _run, args)


def _run(args: argparse.Namespace) -> int:
    if args.trace_command == "convert":
        return _convert(args)
    if args.trace_command == "info":
        return _info(args)
    if not args.model or not args.out or not (args.prompts or args.builtin or args.random_prompts):
        print(
            "moert trace: capture needs --model PATH, --prompts FILE.txt, --builtin or --random-prompts N, "
            "and --out DIR "
            "(or use `moert trace convert ...` / `moert trace info ...`)",
            file=sys.stderr,
        )
        return 2
    from moert.trace.record import capture_cli

    return capture_cli(args)
