"""``moert info``: which backends were compiled and which can run here (``--json`` for machines)."""

from __future__ import annotations

import argparse
import json
import platform

__all__ = ["add_arguments", "run", "collect"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


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


def run(args: argparse.Namespace) -> int:
    info = collect()
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
    return 0
