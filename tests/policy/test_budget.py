"""The budgeted prefetcher (``moert.policy.budget``): the budget arithmetic by hand, late prefetches
never issued, no eviction of an expert worth more than the one it brings, and zero slack = demand only
(the same hits, misses and bytes as the eviction policy alone) through the simulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import zipf_trace  # noqa: E402

from moert.policy.budget import BudgetPlanner, Calibration, CostWindow, FixedWindow, fill_budget
from moert.policy.predictor import policy_from_spec
from moert.sim import CostModel, SimConfig, parse_policies, simulate
from moert.sim.step import Caches

F, T_ = False, True


@pytest.mark.parametrize(
    "window, probs, present, victims, want",
    [
        # D = .9+.6+.3+0 = 1.8; +e0 (1-.9) -> 1.9, +e1 (1-.6) -> 2.3; a 3rd copy would end at 3 > 2.5: late
        (2.5, [0.9, 0.6, 0.3, 0.1, 0.0], [F, F, F, T_, F], [0, 0, 0, 0], [0, 1]),
        # W = 4: +e2 (1-.3) -> 3.0 fits; e4 (p = 0) is worth no more than a free slot
        (4.0, [0.9, 0.6, 0.3, 0.1, 0.0], [F, F, F, T_, F], [0, 0, 0, 0], [0, 1, 2]),
        # the link: D = 1.5, +e0 -> 2.0 <= 2, +e1 -> 2.5 > 2
        (2.0, [0.5, 0.5, 0.5], [F, F, F], [0, 0, 0], [0]),
        # the 2nd prefetch would evict an expert worth .7 > .6: stop
        (4.0, [0.9, 0.6, 0.3], [F, F, F], [0.0, 0.7, 0.0], [0]),
        # nothing left to evict after one
        (4.0, [0.9, 0.8, 0.7], [F, F, F], [0.1], [0]),
        # no copy lands within W < 1
        (0.99, [1.0, 1.0], [F, F], [0, 0], []),
        # present experts are never prefetched; most probable absent first: D = 1.15, +e2 -> 1.2, +e1 -> 2.0
        (3.0, [1.0, 0.2, 0.95, 0.99], [T_, F, F, T_], [0, 0, 0], [2, 1]),
        # ... and with W = 1.9 the second no longer fits the link (2.0 > 1.9)
        (1.9, [1.0, 0.2, 0.95, 0.99], [T_, F, F, T_], [0, 0, 0], [2]),
    ],
)
def test_fill_budget_by_hand(window, probs, present, victims, want):
    got = fill_budget(window, np.array(probs), np.array(present), np.array(victims, dtype=float))
    assert got == want


def test_late_copies_are_not_issued_whatever_the_link_load():
    """With the window's demand charged elsewhere (demand=0), certain candidates add no load: only the
    landing rule stops them (the 3rd copy would end at 3 > 2.5). With the policy's own demand term the
    link check alone would stop them too (n + D_rest <= W implies n <= W)."""
    ones = np.ones(4)
    assert fill_budget(2.5, ones, np.zeros(4, bool), np.zeros(4), demand=0.0) == [0, 1]
    assert fill_budget(4.0, ones, np.zeros(4, bool), np.zeros(4), demand=0.0) == [0, 1, 2, 3]
    assert fill_budget(0.9, ones, np.zeros(4, bool), np.zeros(4), demand=0.0) == []


def test_cost_window_is_the_hiding_compute_over_copy_time():
    # copy 0.5 ms; windowed: an own-layer prefetch hides behind the attention share (0.2) of 1.5 ms
    cost = CostModel(expert_bytes=10_000_000, bandwidth_gbs=20.0, layer_compute_ms=1.5)
    assert CostWindow(cost)(3) == pytest.approx(0.6)
    pooled = CostModel(expert_bytes=10_000_000, bandwidth_gbs=20.0, layer_compute_ms=1.5, window="pooled")
    assert CostWindow(pooled)(3) == pytest.approx(3.0)  # the whole layer
    assert CostWindow(CostModel())(0) == pytest.approx(0.2 * 0.2e-3 / (3 * 2048 * 1408 * 2 / 25e9))


def test_calibration_maps_bins_to_observed_rates():
    raw = np.array([0.05, 0.05, 0.05, 0.05, 0.95, 0.95, 0.55, 0.55])
    sel = np.array([1, 0, 0, 0, 1, 1, 0, 0], dtype=bool)
    cal = Calibration.fit(raw, sel, bins=10)
    np.testing.assert_allclose(cal(np.array([0.01, 0.96])), [0.25, 1.0])
    # the 0.55 bin observed 0 < 0.25: kept monotone
    assert cal(np.array([0.55]))[0] == 0.25


def _planner(window: float, L: int = 2, E: int = 8, k: int = 2) -> BudgetPlanner:
    p = BudgetPlanner(
        lookahead=0, probabilities="clamp", overprovision=0, scores=False, window=FixedWindow(window)
    )
    p.bind(L, E, k)
    return p


def _logits(E: int, hot: dict[int, float]) -> torch.Tensor:
    row = torch.zeros(1, E)
    for e, v in hot.items():
        row[0, e] = v
    return row


def test_late_prefetches_are_not_issued():
    """Five certain candidates, free slots: they are the window's expected demand (5 copies), so with
    W = 4.99 the 5th copy would land late and the link is over budget: nothing is issued; with W = 5 all
    five land in time. (With the expected demand counted, a copy that lands late, n > W, never fits the
    link either: n + D_rest <= W implies n <= W.)"""
    p = _planner(4.99)
    caches = Caches("per-layer", 2, 8, 6, "lru", min_slots=2)
    p.set_context(caches=caches)
    assert p.on_prediction(0, _logits(8, {e: 1.0 for e in range(5)})) is None
    p.window = FixedWindow(5.0)
    assert p.on_prediction(1, _logits(8, {e: 1.0 for e in range(5)})).ids.tolist() == [[0, 1, 2, 3, 4]]
    assert p.issued == 5


def test_never_evicts_an_expert_worth_more():
    """A full per-layer cache of 2: the least recently used resident expert (4) is predicted 0.9, so a
    candidate at 0.8 may not take its slot; at 0.95 it may (and evicts 4, the LRU one, not 3)."""
    from moert.sim.step import access, apply_plan

    E = 8
    p = _planner(4.0, L=1, E=E)
    caches = Caches("per-layer", 1, E, 2, "lru", min_slots=2)
    p.set_context(caches=caches)
    for ids in ([4], [3]):  # 4 used first, then 3: 4 is the LRU victim (not the lowest id)
        counts = np.bincount(ids, minlength=E)
        p.on_routed(0, counts, caches.at(0)[0].resident(0).numpy())
        access(caches, 0, np.array(ids))
    assert p.on_prediction(0, _logits(E, {4: 0.9, 3: 0.1, 6: 0.8})) is None
    plan = p.on_prediction(0, _logits(E, {4: 0.9, 3: 0.1, 6: 0.95}))
    assert plan.ids.tolist() == [[6]]
    apply_plan(caches, plan)
    assert np.flatnonzero(caches.at(0)[0].resident(0).numpy()).tolist() == [3, 6]


def _trace(n=6, **kw):
    return zipf_trace(n=n, **kw)


KEYS = ("hits", "demand_misses", "bytes_loaded", "prefetches", "cache_stats")


@pytest.mark.parametrize("mode", ["per-layer", "global"])
@pytest.mark.parametrize("evict", ["lru", "lfu"])
def test_zero_slack_is_demand_only(mode, evict):
    """At 0.2 ms per layer (W = 0.06 copies: the attention share of the layer) the budget issues nothing:
    every count equals the eviction policy alone. With slack (30 ms: W = 8.7) it does prefetch, and its
    hits do not fall."""
    trace, meta, seqs = _trace()
    rows = {}
    for ms in (0.2, 30.0):
        pre = {"prev-token:budget": policy_from_spec("prev-token:budget", meta, seqs)}
        names = [evict, f"{evict}+prev-token:budget"]
        cfg = SimConfig(
            capacities=(0.25, 0.5),
            policies=tuple(parse_policies(names, prefetchers=pre)),
            mode=mode,
            cost=CostModel(layer_compute_ms=ms),
        )
        for r in simulate(trace, cfg, prefetchers=pre)["results"]:
            rows[(ms, r["policy"], r["capacity"])] = r
    for c in (0.25, 0.5):
        alone, budget = rows[(0.2, evict, c)], rows[(0.2, f"{evict}+prev-token:budget", c)]
        assert {k: budget[k] for k in KEYS} == {k: alone[k] for k in KEYS}, c
        assert budget["predicted_tok_s"] == alone["predicted_tok_s"]
        slack = rows[(30.0, f"{evict}+prev-token:budget", c)]
        assert slack["prefetches"] > 0 and slack["hits"] >= rows[(30.0, evict, c)]["hits"], c


def test_cli_budget_prefetcher(tmp_path, capsys):
    """``moert simulate --policy lru --prefetch prev-token:budget``: at 0.2 ms the row is lru's, at 30 ms
    it prefetches; a bad ':' argument names 'budget' among the fixes."""
    import argparse
    import json

    from moert.cli import simulate as sim_cli
    from moert.trace import TraceWriter

    trace, _, _ = _trace(n=3)
    with TraceWriter(tmp_path / "t", trace.meta) as w:
        for s in trace.sequences():
            w.add(s)

    def cli(*argv):
        parser = argparse.ArgumentParser()
        sim_cli.add_arguments(parser)
        return sim_cli.run(parser.parse_args([str(tmp_path / "t"), "--no-progress", *argv]))

    for ms in ("0.2", "30"):
        out = tmp_path / f"r{ms}.json"
        args = ("--policy", "lru,lru+prev-token:budget", "--layer-compute-ms", ms, "--json", str(out))
        assert cli(*args) == 0
        rows = {r["policy"]: r for r in json.loads(out.read_text())["results"]}
        lru, budget = rows["lru"], rows["lru+prev-token:budget"]
        assert (budget["hits"] == lru["hits"] and budget["prefetches"] == 0) == (ms == "0.2"), ms
    capsys.readouterr()
    assert cli("--policy", "lru+x.safetensors:budgte") == 2
    assert "'budget'" in capsys.readouterr().err
