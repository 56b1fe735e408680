"""bench/gpu_session.sh: a failed step fails the script, and each call's step budgets fit its time.

The whole dry run (``make gpu-dry-run``, about 2 minutes) runs in CI from .ci/run; these checks are
the fast part that ``make test`` runs.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_session.sh"
#: the decode call must fit 8 minutes with margin; the tests call its 10-minute limit with margin
LIMITS_S = {"decode": 450, "tests": 570}


def test_a_failed_install_fails_the_script(tmp_path):
    env = {**os.environ, "PY": "false", "OUT": str(tmp_path)}
    out = subprocess.run(["bash", str(SCRIPT), "tests"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0, out.stdout
    assert "step 'install' FAILED" in out.stdout and "step(s) FAILED: install" in out.stdout, out.stdout
    assert (tmp_path / "results_tests.tar.gz").exists(), "the results are packed even on failure"


def step_budgets(text: str) -> dict[str, list[tuple[str, int, float | None]]]:
    """``{part: [(step, budget s, --time-budget s or None)]}`` of the GPU (not dry-run) section."""
    gpu = text[text.rindex("MOERT_CUDA=ON step install") :]
    parts: dict[str, list[tuple[str, int, float | None]]] = {"tests": [], "decode": []}
    only = None
    for line in gpu.splitlines():
        if re.match(r'if \[ "\$PART" != (decode|tests) \]', line.strip()):
            only = "tests" if "!= decode" in line else "decode"
        elif line.strip() == "fi":
            only = None
        m = re.search(r"\bstep ([\w-]+) (\d+) ", line)
        if m:
            rest = gpu[gpu.index(line) :].split("\n  step ")[0].split("\nfi")[0]
            tb = re.search(r"--time-budget (\d+)", rest)
            entry = (m.group(1), int(m.group(2)), float(tb.group(1)) if tb else None)
            for part in parts if only is None else (only,):
                parts[part].append(entry)
    return parts


def test_each_call_fits_its_time_and_benches_stop_before_their_step():
    parts = step_budgets(SCRIPT.read_text())
    assert [s[0] for s in parts["decode"]] == [
        "install",
        "info",
        "cuda-can-run",
        "bench-decode",
        "bench-prefill",
    ]
    assert "gpu-tests" in [s[0] for s in parts["tests"]]
    for part, steps in parts.items():
        total = sum(b for _, b, _ in steps)
        assert total <= LIMITS_S[part], f"{part}: step budgets sum to {total} s > {LIMITS_S[part]} s"
    for name, budget, run_budget in parts["decode"]:
        if name.startswith("bench-"):
            assert run_budget is not None and run_budget <= budget - 20, (name, budget, run_budget)
