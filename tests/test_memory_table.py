"""bench/memory_table.py: expert and model sizes from the config dimensions, checked against DESIGN.md §1
and the model cards; the fit rules on a hand-computed case."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import memory_table as mt  # noqa: E402

ROWS = {name: mt.model_row(name, c) for name, c in mt.CONFIGS.items()}


@pytest.mark.parametrize(
    "name, expert_mb, routed_gb, total_b",
    [
        ("DeepSeek-V2-Lite", 17.3, 28.8, 15.7),
        ("Qwen3-30B-A3B", 9.4, 58.0, 30.5),
        ("Phi-mini-MoE", 23.6, 12.1, 7.6),
    ],
)
def test_sizes_match_design_and_cards(name, expert_mb, routed_gb, total_b):
    r = ROWS[name]
    assert r["expert_bytes"] / 1e6 == pytest.approx(expert_mb, abs=0.05)
    assert r["routed_bytes"] / 1e9 == pytest.approx(routed_gb, abs=0.05)
    # the cards' totals (DeepSeek: "16B" = 15.7B)
    assert r["total_params_b"] == pytest.approx(total_b, rel=0.01)


def test_active_parameters_match_cards():
    assert ROWS["Qwen3-30B-A3B"]["active_params_b"] == pytest.approx(3.3, rel=0.02)
    embed = 102400 * 2048 / 1e9  # DeepSeek's card counts the active parameters without the input embedding
    assert ROWS["DeepSeek-V2-Lite"]["active_params_b"] - embed == pytest.approx(2.4, rel=0.03)
    assert ROWS["Phi-mini-MoE"]["active_params_b"] == pytest.approx(2.4, rel=0.03)


def test_fit_rules_by_hand():
    row = {"expert_bytes": 1e9, "routed_bytes": 10e9, "non_expert_bytes": 2e9, "kv_bytes_per_token": 0,
           "moe_layers": 2, "experts_per_layer": 5, "top_k": 2}  # fmt: skip
    # GPU 8 GB: 8 - 2 - 1.5 = 4.5 GB -> 4 experts; host 10 GB: 6 GB pool -> 6 of 10 experts
    f = mt.fit(row, 8, 10)
    assert (f["slab_cache_experts"], f["pool_experts"], f["all_in_host"], f["ssd_tier_fits"]) == (
        4,
        6,
        False,
        True,
    )
    assert f["host_capacity"] == 0.6
    assert mt.fit(row, 14, 14)["all_in_host"] and not mt.fit(row, 4, 64)["gpu_fits"]  # 0.5 GB: no top-k
