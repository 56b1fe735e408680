"""bench/bench_predictive_norm.py's GPU code path, run once on CPU in the Triton interpreter with a
stand-in timer: every variant runs, agrees with the others, and the tables are written. (The
timings themselves only mean something on a GPU.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("triton_interpret")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_predictive_norm.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_predictive_norm", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_code_path_runs_on_the_interpreter(monkeypatch, tmp_path):
    import triton.testing

    bench = _load_bench()
    calls = []

    def once(fn, warmup=0, rep=0, quantiles=None):
        calls.append(fn())
        return [1.0, 0.9, 1.1] if quantiles else 1.0

    monkeypatch.setattr(triton.testing, "do_bench", once)
    rows = bench.run_cuda(["deepseek-v2-lite", "phi-mini-moe"], [3], 32, 0, 48, False, device="cpu")
    assert len(rows) == 2 and len(calls) == 2 * 7
    for row in rows:
        assert row["plan_fastest"] in bench.PLAN_WAYS
        assert row["chain_over_fused"] == pytest.approx(1.0)
    # per row, the three plan variants returned the same ids (calls: norm, chain, fused, topk, 3 plans)
    for r in range(2):
        epilogue, kernel, torch_plan = calls[7 * r + 4], calls[7 * r + 5], calls[7 * r + 6]
        assert (epilogue[2] == kernel[0]).all() and (kernel[0] == torch_plan[0]).all()
    path = bench.write_results(rows, tmp_path, device="CPU (interpreter)")
    assert json.loads(path.read_text())["rows"][0]["model"] == "deepseek-v2-lite"
    table = path.with_suffix(".md").read_text()
    assert "| plan: epilogue | plan: kernel | plan: torch | fastest plan |" in table
    assert table.count("| deepseek-v2-lite | 3 |") == 1
