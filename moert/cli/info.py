"""``moert info``: which backends were compiled and which can run here (``--json`` for machines)."""

from __future__ import annotations

import argparse
import json
import platform
import sys

__all__ = ["add_arguments", "run", "collect"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--model",
        default=None,
        help="a model directory: also say which filesystem holds it and how moert.load(host_budget=) reads it",
    )


def collect() -> dict:
    """Backends (see ``moert.engine.runtime.backends``) plus the versions that matter for a bug report."""
    import torch

    import moert
    from moert.engine import runtime

    return {
        "moert": moert.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "backends": runtime.backends(),
    }


def model_storage(path: str) -> dict:
    """The filesystem of a model directory and what the host tier (``host_budget``) does there.

    Raises:
        FileNotFoundError: ``path`` is not a directory.
    """
    import os

    from moert.api.tier import filesystem_of

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path}: no such directory")
    fs = filesystem_of(path)
    if fs["network"]:
        note = "network filesystem: host_budget works, expert reads are slower (network latency)"
    elif fs["read_only"]:
        note = "read-only: host_budget works (the files are only read)"
    else:
        note = "local: host_budget reads experts from the files with pread"
    return {"path": os.path.realpath(path), **fs, "host_tier": note}


def run(args: argparse.Namespace) -> int:
    info = collect()
    if getattr(args, "model", None) is not None:
        try:
            info["model_storage"] = model_storage(args.model)
        except FileNotFoundError as exc:
            print(f"moert info: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"moert {info['moert']}  python {info['python']}  torch {info['torch']}")
    rows = [("backend", "compiled", "can run", "detail")]
    for name, b in info["backends"].items():
        detail = b.get("device_name") or b["reason"] or "-"
        if b.get("driver_version"):
            v = b["driver_version"]
            detail += f" (driver: CUDA {v // 1000}.{v % 1000 // 10}, {b['driver_library']})"
        rows.append((name, "yes" if b["compiled"] else "no", "yes" if b["can_run"] else "no", detail))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    st = info.get("model_storage")
    if st is not None:
        print(f"model {st['path']}: {st['fstype']} at {st['mount']}; {st['host_tier']}")
    return 0
