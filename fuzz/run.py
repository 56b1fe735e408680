"""Runs every fuzz target for N inputs each from its committed seeds; prints inputs/s and findings.

Usage (from the repository root; ``make fuzz`` / ``make fuzz-smoke`` call it)::

    python fuzz/run.py [--runs 100000] [--targets moe_beyond_csv,esft,...] [--out out/fuzz] [--timeout 30]

Each target runs in its own process: ``fuzz/fuzz_<target>.py WORK SEEDS -atheris_runs=N``. New
interesting inputs go to ``OUT/<target>/corpus`` (the committed seeds are never written), a finding's
input to ``OUT/<target>/crash-*`` (or ``timeout-*``, ``oom-*``). Exit status 1 when any target found
something.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
TARGETS = ("moe_beyond_csv", "esft", "trace_store", "predictor_io", "native")


def run_target(target: str, runs: int, out: Path, timeout: int, rss_mb: int) -> dict:
    work = out / target / "corpus"
    work.mkdir(parents=True, exist_ok=True)
    for old in (out / target).glob("*-*"):
        if old.is_file():
            old.unlink()
    cmd = [
        sys.executable,
        str(FUZZ / f"fuzz_{target}.py"),
        str(work),
        str(FUZZ / "corpus" / target),
        f"-atheris_runs={runs}",
        f"-timeout={timeout}",
        f"-rss_limit_mb={rss_mb}",
        f"-artifact_prefix={out / target}/",
        "-max_len=8192",
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=FUZZ.parent)
    wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    (out / target / "log.txt").write_text(log)
    done = re.findall(r"Done (\d+) in (\d+) second", log)
    executed = int(done[-1][0]) if done else None
    artifacts = sorted(p.name for p in (out / target).glob("*-*") if p.is_file())
    return {
        "target": target,
        "inputs": executed,
        "seconds": wall,
        "rate": (executed / wall) if executed else None,
        "status": proc.returncode,
        "artifacts": artifacts,
        "log": out / target / "log.txt",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100_000, help="inputs per target (default 100000)")
    p.add_argument(
        "--targets", default=",".join(TARGETS), help="comma-separated, from: " + ", ".join(TARGETS)
    )
    p.add_argument("--out", default="out/fuzz", help="work corpora, logs and findings (default out/fuzz)")
    p.add_argument("--timeout", type=int, default=30, help="seconds one input may take (libFuzzer -timeout)")
    p.add_argument(
        "--rss-mb", type=int, default=4096, help="memory one target may use (libFuzzer -rss_limit_mb)"
    )
    args = p.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        p.error(f"unknown targets {unknown}; use {', '.join(TARGETS)}")
    out = Path(args.out).resolve()
    found = False
    print(f"{'target':<16} {'inputs':>8} {'seconds':>8} {'inputs/s':>9}  result")
    total = time.perf_counter()
    for target in targets:
        r = run_target(target, args.runs, out, args.timeout, args.rss_mb)
        ok = r["status"] == 0 and not r["artifacts"] and r["inputs"] == args.runs
        found |= not ok
        rate = f"{r['rate']:.0f}" if r["rate"] else "-"
        inputs = r["inputs"] if r["inputs"] is not None else "-"
        result = (
            "ok"
            if ok
            else f"FINDING (exit {r['status']}): {', '.join(r['artifacts']) or 'no artifact'}; see {r['log']}"
        )
        print(f"{target:<16} {inputs:>8} {r['seconds']:>8.1f} {rate:>9}  {result}", flush=True)
    print(f"all targets: {time.perf_counter() - total:.1f} s")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
