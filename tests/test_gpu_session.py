"""bench/gpu_session.sh: a failed step fails the script, and each call's step budgets fit its time.

The whole dry run (``make gpu-dry-run``, about 3 minutes) runs in CI from .ci/run; these checks are
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


def _sweep_module():
    import importlib.util

    path = SCRIPT.parent / "_one_pool.py"
    spec = importlib.util.spec_from_file_location("_one_pool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benches_sweep_patches_once_and_stops_adding_rounds_at_its_deadline(tmp_path):
    """bench/_one_pool.sweep: one patch and one undo, a reconfigure per switch with nothing carried
    over (each config's tokens equal the unpatched model's, with misses), unpatched runs split
    around the patch, and no round after the first once the deadline is near."""
    import time

    import torch

    import moert
    from moert.models.tiny import Reference, greedy, single_thread

    sweep = _sweep_module().sweep
    ref = Reference("deepseek_v2-greedy", tmp_path, new_tokens=4)
    model = ref.copy()
    configs = [("a", dict(cache_experts=4, copy_streams=1)), ("b", dict(cache_experts=0.5, policy="lfu"))]
    calls: list[tuple] = []

    def measure(name, handle):
        seq, _ = greedy(model, ref.prompt, ref.new_tokens)
        cfg = handle.config
        calls.append((name, cfg.cache_experts, cfg.policy, cfg.copy_streams, handle.stats().misses))
        assert torch.equal(seq, ref.out[0]) and handle.stats().misses > 0, name

    def unpatched():
        assert moert.handle_of(model) is None
        calls.append(("unpatched",))

    with single_thread():
        rec = sweep(model, "cpu", configs, 3, measure, unpatched, lambda: None)
        assert rec["rounds_run"] == 3 and len(rec["reconfigure_s"]) == 5 and rec["saved_ratio"] > 0
        names = [c[0] for c in calls]
        assert names == ["unpatched", "unpatched", "a", "b", "a", "b", "a", "b", "unpatched"], names
        assert {c[1:4] for c in calls if c[0] == "a"} == {(4, "lru", 1)}
        assert {c[1:4] for c in calls if c[0] == "b"} == {(0.5, "lfu", None)}, "config a leaked into b"
        assert rec["skipped"] == []
        # a second round that would end after the deadline does not start
        calls.clear()

        def slow(name, handle):
            measure(name, handle)
            time.sleep(1.0)

        rec = sweep(
            model, "cpu", configs, 3, slow, unpatched, lambda: None, deadline=time.perf_counter() + 3.0
        )
        assert rec["rounds_run"] == 1 and rec["skipped"] == []
        assert [c[0] for c in calls] == ["unpatched", "unpatched", "a", "b"]
        # past the deadline, the first round measures its first config and skips the rest
        calls.clear()
        rec = sweep(model, "cpu", configs, 3, measure, unpatched, lambda: None, deadline=time.perf_counter())
        assert rec["rounds_run"] == 1 and rec["skipped"] == ["b"]
        assert [c[0] for c in calls] == ["unpatched", "unpatched", "a"]
    assert moert.handle_of(model) is None
