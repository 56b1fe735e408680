"""The runtime's CLI faces (`moert info`, `moert tour`) on the CPU twin, small and fast."""

from __future__ import annotations

import argparse
import json

import numpy as np

from moert.cli import info, tour


def _args(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_info_json(capsys):
    assert info.run(_args(info, ["--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backends"]["cpu"]["can_run"] is True and "cuda" in out["backends"]


def test_tour_small_run_checks_every_slot(capsys):
    argv = [
        "--layers",
        "3",
        "--experts",
        "10",
        "--top-k",
        "2",
        "--slots",
        "7",
        "--slab-kb",
        "4",
        "--tokens",
        "30",
        "--json",
    ]
    assert tour.run(_args(tour, argv)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mismatches"] == 0 and out["accesses"] == 3 * 30 * 2
    # every byte of every acquired slot was compared with its expert's tag
    assert out["checked_bytes"] == out["accesses"] * 4096
    assert out["hits"] + out["misses"] == out["accesses"]
    assert out["bytes_loaded"] == out["copies"] * 4096


def test_tour_without_prefetch_matches_the_simulator(capsys):
    argv = [
        "--layers",
        "2",
        "--experts",
        "12",
        "--top-k",
        "3",
        "--slots",
        "8",
        "--slab-kb",
        "1",
        "--tokens",
        "40",
    ]
    assert tour.run(_args(tour, [*argv, "--no-prefetch", "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hit_rate"] == out["sim_hit_rate_no_prefetch"]


def test_stream_has_distinct_topk_and_locality():
    layers, experts = tour.make_stream(tour.TourConfig(layers=2, experts=16, top_k=4, tokens=50))
    assert layers.shape == (100,) and experts.shape == (100, 4)
    assert all(len(set(row)) == 4 for row in experts.tolist())
    repeats = np.mean([len(set(experts[i]) & set(experts[i - 2])) / 4 for i in range(2, 100)])
    assert repeats > 0.3  # temporal locality across tokens at the same layer
