"""The budget composed with its eviction part (``moert.policy.victims``), one layer ahead, and the
windowed model's copies queued at a router (``moert.sim.timeline``'s ``mid``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic import zipf_trace  # noqa: E402

from moert.policy.base import Plan
from moert.policy.budget import fill_budget
from moert.policy.learned import Learned
from moert.policy.predictor import policy_from_spec
from moert.policy.victims import EvictorView
from moert.predict.reuse import ReuseModel
from moert.sim import CostModel, SimConfig, parse_policies, simulate
from moert.sim.step import Caches, apply_plan
from moert.sim.timeline import StepLog, Traffic, link_timeline


def _previous_fill_budget(window, probs, present, victims):
    """The rule as it was written before (a loop over candidates): the reference."""
    p, absent = np.asarray(probs, dtype=np.float64), ~np.asarray(present, dtype=bool)
    load = float(p[absent].sum())
    order = np.flatnonzero(absent)
    order = order[np.argsort(-p[order], kind="stable")]
    chosen = []
    for e in order:
        n = len(chosen) + 1
        if n > window or n > len(victims):
            break
        if load + 1.0 - p[e] > window or p[e] <= victims[n - 1]:
            break
        load += 1.0 - p[e]
        chosen.append(int(e))
    return chosen


def test_fill_budget_makes_the_previous_decisions():
    """With victims valued as before (``lru``: probabilities) the split rule chooses what the old loop
    did, on random cases with many ties (calibrated probabilities come in bins)."""
    rng = np.random.default_rng(0)
    issued = 0
    for _ in range(3000):
        E = int(rng.integers(2, 20))
        probs = rng.choice([0.0, 0.05, 0.2, 0.5, 0.8, 0.95, 1.0], E)
        present = rng.random(E) < 0.3
        victims = np.sort(rng.choice([0.0, 0.1, 0.3, 0.6, 0.9], int(rng.integers(0, 8))))
        window = float(rng.uniform(0, 8))
        want = _previous_fill_budget(window, probs, present, victims)
        assert fill_budget(window, probs, present, victims) == want
        issued += len(want)
    assert issued > 500  # the cases prefetch


def _caches(mode: str, slots: int, L: int = 3, E: int = 8) -> Caches:
    return Caches(mode, L, E, slots, "priority", min_slots=1)


@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_the_view_names_the_caches_victim(mode):
    """Priorities pushed by plans (as ``learned``'s) and uses: the first victim the view names for a
    prefetch is the entry the C++ cache evicts, including ties broken by recency."""
    rng = np.random.default_rng(1)
    L, E, slots = 3, 8, 4 if mode == "per-layer" else 9
    caches, view = _caches(mode, slots, L, E), EvictorView(L, E, "next")
    for trial in range(300):
        layer = int(rng.integers(L))
        if rng.random() < 0.5:  # a plan of the eviction part: one layer's E priorities (with ties)
            plan = Plan((layer,), scores=rng.choice([-3.0, -2.0, -1.0], (1, E)).astype(np.float32))
            apply_plan(caches, plan)
            view.observe(plan)
        used = np.sort(rng.choice(E, 2, replace=False))  # the budget sees a call's experts by id
        cache, cl = caches.at(layer)
        hit = cache.resident(cl).numpy()[used]
        caches.sim_access(layer, used)
        view.touch(layer, np.concatenate([used[hit], used[~hit]]))  # the cache renews hits, then loads
        present = cache.resident(cl).numpy()
        if present.all():
            continue
        before = np.stack([caches.at(x)[0].resident(caches.at(x)[1]).numpy() for x in range(L)])
        scope = [layer] if mode == "per-layer" else list(range(L))
        flat = np.flatnonzero(before[scope].ravel()) + (layer * E if mode == "per-layer" else 0)
        if flat.size < slots:
            continue  # a free slot: nothing evicted
        want = int(flat[view.order(flat, 1)][0])
        new = int(np.flatnonzero(~present)[0])
        caches.prefetch(layer, np.array([new]))
        view.touch(layer, [new])
        after = np.stack([caches.at(x)[0].resident(caches.at(x)[1]).numpy() for x in range(L)])
        gone = np.argwhere(before & ~after)
        assert gone.tolist() == [[want // E, want % E]], trial


def test_learned_values_are_the_hit_density():
    """``learned``'s priority is log2 of the victim's hit density (hits per call held): the victim is worth
    that density. A candidate of p = 0.2 (0.2 hits in the one call it is held for) does not displace a
    victim of density 0.25; p = 0.3 does."""
    view = EvictorView(2, 4, "density")
    view.primary[1] = np.log2([0.5, 0.25, 0.125, 1.0])
    v = view.values(np.array([4, 5, 6, 7]), np.zeros((2, 4)), 1)
    assert v == pytest.approx([0.5, 0.25, 0.125, 1.0])
    present = np.array([False, True, True, True])
    assert fill_budget(3, np.array([0.2, 0, 0, 0]), present, v[1:2]) == []
    assert fill_budget(3, np.array([0.3, 0, 0, 0]), present, v[1:2]) == [0]
    assert EvictorView.kind_of(Learned()) == "density"
    assert EvictorView.kind_of(Learned(rank="next")) == "next"


def test_learned_next_values_are_the_forecast_next_use():
    """``learned:next``'s priority of an expert at layer 1 of 2 last scored at call 8 with a forecast of 4
    calls: next use at token 12 (+ 1/2); before call 10 of layer 1 it is 2 tokens away: value 1/3. A
    candidate of p = 0.3 (expected (1 - p) / p = 2.33 calls away) does not displace it; p = 0.4 (1.5)
    does."""
    view = EvictorView(2, 4, "next")
    view.primary[1] = -(8 + 4 + 1 / 2)
    view.calls[1] = 10
    v = view.values(np.array([1 * 4 + 2]), np.zeros((2, 4)), 1)
    assert v == pytest.approx([1 / 3])
    present = np.array([False, True, True, True])
    assert fill_budget(3, np.array([0.3, 0, 0, 0]), present, v) == []
    assert fill_budget(3, np.array([0.4, 0, 0, 0]), present, v) == [0]
    # overdue (the forecast use is past): never evicted
    view.calls[1] = 20
    assert view.values(np.array([6]), np.zeros((2, 4)), 1) == pytest.approx([1.0])


def test_a_prefetch_is_not_issued_when_it_would_evict_an_earlier_one():
    """A priority evictor keeps a prefetched expert's old priority: if it is below the next victim's key,
    the next prefetch would evict it, so the budget stops there."""
    probs, present = np.array([0.9, 0.8, 0.0, 0.0]), np.array([False, False, True, True])
    victims = np.array([0.1, 0.1])
    own = np.array([-5.0, -5.0, 0.0, 0.0])  # the candidates' keys once loaded
    assert fill_budget(4, probs, present, victims, stale=(own, np.array([-3.0, -3.0]))) == [0]
    assert fill_budget(4, probs, present, victims, stale=(own, np.array([-9.0, -9.0]))) == [0, 1]
    assert fill_budget(4, probs, present, victims) == [0, 1]


def _trace(n=5, **kw):
    return zipf_trace(n=n, **kw)


KEYS = ("hits", "demand_misses", "bytes_loaded", "prefetches", "cache_stats", "predicted_tok_s")


def _rows(tmp_path, ms: float, mode: str, names=("learned", "learned+prev-token:budget-ahead")) -> dict:
    trace, meta, seqs = _trace()
    path = tmp_path / "reuse.safetensors"
    if not path.exists():
        from moert.predict.reuse import save_reuse

        save_reuse(
            path, ReuseModel.random(4, 16, seed=3), model_type="synthetic", layers=tuple(range(4)), top_k=2
        )
    pre = {"prev-token:budget-ahead": policy_from_spec("prev-token:budget-ahead", meta, seqs)}
    cfg = SimConfig(capacities=(0.25, 0.5), policies=tuple(parse_policies(list(names), prefetchers=pre)), mode=mode,
                    cost=CostModel(layer_compute_ms=ms), evictor=str(path))  # fmt: skip
    return {(r["policy"], r["capacity"]): r for r in simulate(trace, cfg, prefetchers=pre)["results"]}


@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_no_window_is_learned_bit_for_bit(tmp_path, mode):
    """At 0.2 ms both windows (own layer 0.06, one layer ahead 0.29 copies) hold no copy: the recommended
    policy issues nothing and every count (hits, misses, bytes, the C++ stats, tok/s) is ``learned``'s.
    At 30 ms it prefetches, ahead too (copies queued at a router)."""
    rows = _rows(tmp_path, 0.2, mode)
    for c in (0.25, 0.5):
        alone, rec = rows[("learned", c)], rows[("learned+prev-token:budget-ahead", c)]
        assert {k: rec[k] for k in KEYS} == {k: alone[k] for k in KEYS}, c
    slack = _rows(tmp_path, 30.0, mode)
    assert all(slack[("learned+prev-token:budget-ahead", c)]["prefetches"] > 0 for c in (0.25, 0.5))


def test_stepped_learned_rows_are_the_call_by_call_rows(tmp_path, monkeypatch):
    """Stepped, ``learned``'s rows of a sequence are made at its start (its fast path): the run equals the
    one that asks the evictor call by call."""
    fast = _rows(tmp_path, 30.0, "global", ("learned+prev-token:budget-ahead",))
    monkeypatch.setattr(Learned, "plans_before_access", False)  # no rows made ahead: on_routed per call
    slow = _rows(tmp_path, 30.0, "global", ("learned+prev-token:budget-ahead",))
    for key, r in fast.items():
        assert {k: r[k] for k in KEYS} == {k: slow[key][k] for k in KEYS}


def test_a_copy_queued_at_the_router_waits_for_nothing_and_hides_behind_the_layer():
    """Two steps of 1 copy time each (attention share 0.2). Step 0 has one demand miss and queues one
    prefetch used at step 1. Queued at the step's start it is committed before the demand copy (0.8 copy
    left after attention): step 0 stalls 1.8; queued at the router (``mid``) the demand copy goes first
    (stall 1.0) and the prefetch lands during the rest of step 0 and step 1's attention (0.8 + 0.2)."""
    base = dict(
        demand=np.array([1, 0]), issued=np.array([1, 0]), use_steps=np.array([1]), use_copies=np.array([0])
    )
    kw = dict(compute_s=1.0, copy_s=1.0, attention_share=0.2, depth=2)
    assert link_timeline(Traffic(**base), **kw)["seconds"] == pytest.approx(3.8)
    got = link_timeline(Traffic(**base, issued_mid=np.array([1, 0])), **kw)
    assert got["seconds"] == pytest.approx(3.0)
    assert got["late_prefetches"] == 0


def test_step_log_puts_router_copies_after_the_steps_start_copies():
    log = StepLog(2, 1)
    log.demand(np.zeros((2, 1)))
    log.issued(0, 0, [0], [1], mid=True)  # logged first, queued at the router
    log.issued(0, 0, [1], [1])  # queued at the step's start
    log.used([1], 0, [0])
    tr = log.traffic()
    assert tr.issued.tolist() == [2, 0] and tr.issued_mid.tolist() == [1, 0]
    assert tr.use_copies.tolist() == [1]  # the router's copy is second in the FIFO


def test_bench_check_names_every_point_below():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import bench_budget

    def row(pol, tok, ms=1.0):
        return {"mode": "global", "layer_ms": ms, "bandwidth_gbs": 25.0, "capacity": 0.25, "policy": pol,
                "predicted_tok_s": tok}  # fmt: skip

    rows = [row("lru", 10.0), row("lfu", 9.0), row("learned", 11.0), row(bench_budget.REC, 10.995)]
    rows += [
        row(p, t, 2.0) for p, t in (("lru", 5.0), ("lfu", 4.0), ("learned", 6.0), (bench_budget.REC, 5.9))
    ]
    # just past the tolerance (-0.15%): below, it fails
    rows += [
        row(p, t, 4.5) for p, t in (("lru", 9.0), ("lfu", 8.0), ("learned", 10.0), (bench_budget.REC, 9.985))
    ]
    got = bench_budget.check(rows)
    assert not got["ok"] and len(got["below"]) == 2 and "global 2 ms 25 GB/s @0.25" in got["below"][0]
    assert "global 4.5 ms 25 GB/s @0.25" in got["below"][1]
    assert ", below at 2" in got["line"] and "equal at 0" in got["line"]
    # 10.995 vs 11.0: below by 0.045%, within the tolerance: passes, named with its loss
    assert got["near"] == ["global 1 ms 25 GB/s @0.25: -0.0455% vs learned"]
    assert "below within the 0.1% tolerance at 1 (global 1 ms 25 GB/s @0.25" in got["line"]


def test_bench_summary_table_is_best_demand_recommended_belady():
    """The README's table (``bench_budget._summary``): the best of lru/lfu/learned per cell, the
    recommended with its gain over that (``=`` where it is learned's run), belady; [] for a partial run."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import bench_budget

    rows = {}
    for mode in ("per-layer", "global"):
        for c in bench_budget.CAPS:
            for pol, tok in (
                ("lru", 10.0),
                ("lfu", 12.0),
                ("learned", 11.0),
                ("belady", 20.0),
                (bench_budget.REC, 13.2),
            ):
                rows[(mode, 1.0, 25.0, pol, c)] = {"predicted_tok_s": tok}
    rows[("global", 1.0, 25.0, bench_budget.REC, 0.5)]["from_learned"] = True
    lines = bench_budget._summary(rows, [(1.0, 25.0)])
    best, rec, bel = lines[4:7]
    assert best == "| 1 | 25 | best demand-only | " + " | ".join(["12.00"] * 6) + " |"
    assert rec.split(" | ")[3] == "**13.20** (+10.0%)" and rec.endswith("**13.20** = |")
    assert bel.startswith("| 1 | 25 | belady") and bel.count("20.00") == 6
    del rows[("per-layer", 1.0, 25.0, "belady", 0.1)]
    assert bench_budget._summary(rows, [(1.0, 25.0)]) == []


def test_cli_recommended_policy(tmp_path, capsys):
    """``moert simulate --policy learned --evictor R --prefetch prev-token:budget-ahead``: at 0.2 ms the row
    is learned's; ``:budget-ahead`` on a predictor whose input is not known a layer ahead is refused."""
    import argparse
    import json

    from moert.cli import simulate as sim_cli
    from moert.predict.reuse import save_reuse
    from moert.trace import TraceWriter

    trace, meta, _ = _trace(n=2)
    with TraceWriter(tmp_path / "t", trace.meta) as w:
        for s in trace.sequences():
            w.add(s)
    save_reuse(tmp_path / "r.safetensors", ReuseModel.random(4, 16, seed=3), model_type="synthetic",
               layers=tuple(range(4)), top_k=2)  # fmt: skip
    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    out = tmp_path / "r.json"
    argv = [str(tmp_path / "t"), "--no-progress", "--policy", "learned", "--evictor", str(tmp_path / "r.safetensors"),
            "--prefetch", "prev-token:budget-ahead", "--layer-compute-ms", "0.2", "--json", str(out)]  # fmt: skip
    assert sim_cli.run(parser.parse_args(argv)) == 0
    rows = {r["policy"]: r for r in json.loads(out.read_text())["results"]}
    rec = rows["learned+prev-token:budget-ahead"]
    assert rec["prefetches"] == 0 and rec["hits"] > 0
    capsys.readouterr()
    from moert.policy.budget import BudgetPredictor
    from moert.predict.baselines import PrevTokenPredictor

    pred = PrevTokenPredictor.for_trace(meta)
    with pytest.raises(ValueError, match="one layer ahead|layer l's router"):
        BudgetPredictor(_FakeKind(pred, "preattn"), ahead=True)


class _FakeKind:
    """A predictor whose meta says another kind (the check reads only ``meta.kind`` and ``meta.loss``)."""

    def __init__(self, pred, kind):
        import dataclasses

        self.meta = dataclasses.replace(pred.meta, kind=kind, loss="wbce")
        self._pred = pred

    def __getattr__(self, name):
        return getattr(self._pred, name)


def test_the_stepping_driver_logs_a_routers_prefetch_into_the_next_layer_as_mid():
    """A plan of ``on_routed`` that prefetches into the next layer is queued at the router (``mid``); one
    into the routed layer itself stays at the step's start."""
    from moert.policy.base import Policy
    from moert.sim.step import step_sequence

    class Ahead(Policy):
        name, cache_policy = "ahead", "lru"

        def on_routed(self, layer, counts, resident):
            if layer == 0:
                return Plan((1,), np.array([[7]], dtype=np.int32))  # into the next layer
            return Plan((layer,), np.array([[9]], dtype=np.int32))  # into its own layer

    _, meta, seqs = _trace(L=2, T=1, n=1)
    policy = Ahead()
    policy.bind(2, 16, 2)
    log = StepLog(2, 2)
    caches = Caches("per-layer", 2, 16, 4, "lru", min_slots=2, log=log)
    hits = step_sequence(policy, caches, seqs[0], 0)
    log.demand(np.asarray(seqs[0].experts.numpy() >= 0).sum(axis=2) - hits)
    tr = log.traffic()
    assert tr.issued.tolist() == [1, 1] and tr.issued_mid.tolist() == [1, 0]


@pytest.mark.parametrize("ordered", [False, True])
def test_victim_order_is_a_full_stable_sort_prefix(ordered):
    """``EvictorView.order`` partitions before it sorts: its first ``need`` victims are those of a full
    stable sort by (primary, tick), ties (many equal keys) by position in ``flat``."""
    rng = np.random.default_rng(3)
    L, E = 3, 16
    for trial in range(200):
        view = EvictorView(L, E, "next")
        view.ordered = ordered
        view.primary[:] = rng.integers(-3, 1, size=(L, E)).astype(np.float32)  # few values: ties
        view.tick[:] = rng.integers(0, 6, size=(L, E))
        flat = np.sort(rng.choice(L * E, size=int(rng.integers(1, L * E)), replace=False))
        if ordered:
            full = np.lexsort((view.tick.ravel()[flat], view.primary.ravel()[flat]))
        else:
            full = np.argsort(view.tick.ravel()[flat], kind="stable")
        for need in (0, 1, 2, 5, flat.size, flat.size + 3):
            np.testing.assert_array_equal(
                view.order(flat, need), full[:need], err_msg=f"trial {trial} need {need}"
            )


def test_bench_reads_a_copy_of_the_evictor_taken_at_the_start(tmp_path):
    """A reuse model retrained at the same path during the run does not reach later jobs."""
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import bench_budget

    src = tmp_path / "reuse.safetensors"
    src.write_bytes(b"first model")
    args = argparse.Namespace(evictor=str(src), work=str(tmp_path / "work"))
    bench_budget.freeze_evictor(args)
    src.write_bytes(b"retrained meanwhile")
    assert args.evictor_source == str(src) and args.evictor != str(src)
    assert Path(args.evictor).read_bytes() == b"first model"
