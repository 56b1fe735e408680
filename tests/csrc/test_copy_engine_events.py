"""CopyEngine predictions (DESIGN §3 step 2): ``predict`` (applied at once) and ``predict_async``
(the engine's prediction thread waits on an event, then applies), and the planning of
the predictor planner (``moert.policy.score.ScorePlanner``) the runtime drives; race checks on the CPU twin with every slot's bytes verified at use."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from layer_accounting import check_layer_rows

from moert.engine import runtime
from moert.policy import planner_of, runtime_policy

L, E, SLAB = 3, 16, 256


def make_pool(layers: int = L, experts: int = E) -> runtime.ExpertPool:
    pool = runtime.ExpertPool(layers, experts, SLAB)
    for layer in range(layers):
        for e in range(experts):
            pool.fill(layer, e, expected(layer, e))
    return pool


def expected(layer: int, expert: int) -> torch.Tensor:
    """(SLAB/4,) int32: a pattern unique to (layer, expert) in every word."""
    i = torch.arange(SLAB // 4, dtype=torch.int32)
    return (layer * 1_000_003 + expert * 7919 + i * 31) % 2_147_483_647


def test_predict_sets_priorities_clears_and_prefetches():
    pool = make_pool()
    cache = runtime.SlabCache(pool, 4, policy="priority", min_slots=1)
    engine = runtime.CopyEngine(cache, num_streams=1)
    try:
        scores = torch.zeros(1, E)
        scores[0, [0, 1, 2, 3]] = torch.tensor([0.9, 0.1, 0.8, 0.7])
        queued = engine.predict([0], [[0, 1, -1, 2, 3]], scores)
        engine.synchronize()
        assert queued == 4 and cache.resident(0).nonzero().flatten().tolist() == [0, 1, 2, 3]
        engine.acquire(1, [5])  # a demand load evicts the lowest predicted score: (0, 1)
        engine.release(1, [5])
        assert cache.lookup(0, 1) == -1 and all(cache.lookup(0, e) >= 0 for e in (0, 2, 3))
        # layer 0 ran: clearing it makes recency order its experts again; (1, 5) was used last
        engine.predict([1], np.zeros((1, 0), np.int32), torch.zeros(1, E), clear=[0])
        engine.acquire(2, [7])
        engine.release(2, [7])
        gone = [e for e in (0, 2, 3) if cache.lookup(0, e) == -1]
        assert len(gone) == 1 and cache.lookup(1, 5) >= 0, gone
        # a negative clear score sends the cleared layer below every other: (1, 5) goes next,
        # though it was used after both remaining layer-0 experts
        engine.predict([2], np.zeros((1, 0), np.int32), clear=[1], clear_score=-1.0)
        engine.acquire(2, [8])
        engine.release(2, [8])
        assert cache.lookup(1, 5) == -1 and sum(cache.lookup(0, e) >= 0 for e in (0, 2, 3)) == 2
        st = cache.stats()
        assert st["prefetches"] == 4 and st["prefetch_wasted"] == 2, st
        assert engine.stats()["predictions"] == 3
    finally:
        engine.close()
        cache.close()
        pool.close()


def test_predict_validates_before_changing_anything():
    pool = make_pool()
    cache = runtime.SlabCache(pool, 4, policy="priority")
    engine = runtime.CopyEngine(cache)
    try:
        cases = [
            (lambda: engine.predict([0], [[1, E]]), f"expert {E} is out of range"),
            (lambda: engine.predict([L], [[1]]), f"layer {L} is out of range"),
            (lambda: engine.predict([0], [[1]], clear=[-1]), "layer -1 is out of range"),
            (lambda: engine.predict([0, 1], [[1]]), "ids must be \\(2, width\\)"),
            (lambda: engine.predict([0], [[1]], torch.zeros(1, E - 1)), f"scores must be \\(1, {E}\\)"),
            (lambda: engine.predict([0], [[1]], torch.full((1, E), float("nan"))), "not finite"),
            (lambda: engine.predict([0], [[1]], clear=[1], clear_score=float("inf")), "clear_score inf"),
            (
                lambda: engine.predict_async([0], torch.zeros(1, 2, dtype=torch.int64)),
                "contiguous 2-D int32 host tensor",
            ),
        ]
        for call, match in cases:
            with pytest.raises(ValueError, match=match):
                call()
        engine.synchronize()
        assert not cache.resident(0).any() and cache.stats()["prefetches"] == 0
    finally:
        engine.close()
        cache.close()
        pool.close()


def test_predict_async_applies_in_order_and_reports_bad_ids():
    pool = make_pool()
    cache = runtime.SlabCache(pool, 8, policy="lru")
    engine = runtime.CopyEngine(cache)
    try:
        bufs = [torch.tensor([[e, -1]], dtype=torch.int32) for e in range(6)]
        tickets = [engine.predict_async([e % L], b) for e, b in enumerate(bufs)]
        assert tickets == list(range(1, 7))
        engine.wait_predictions(tickets[-1])
        assert engine.predictions_done() == 6
        engine.synchronize()
        for e in range(6):
            assert cache.lookup(e % L, e) >= 0, e
        bad = torch.tensor([[E + 3]], dtype=torch.int32)
        t = engine.predict_async([0], bad)
        with pytest.raises(RuntimeError, match=f"prediction {t}: expert {E + 3} is out of range"):
            engine.wait_predictions(t)
    finally:
        engine.close()
        cache.close()
        pool.close()


def plan_reference(
    logits: torch.Tensor, k: int, width: int, adaptive: float | None, decay: float, L: int, ordinal: int
):
    """Loops over layers and experts: probabilities = max over rows of sigmoid, top `width` in
    descending order (ties: lower id first), adaptive keeps rank < k or p > tau."""
    T, D, E_ = logits.shape
    n = min(D, L - ordinal)
    ids, scores = [], []
    for j in range(n):
        p = [max(1 / (1 + np.exp(-float(logits[t, j, e]))) for t in range(T)) for e in range(E_)]
        order = sorted(range(E_), key=lambda e: (-p[e], e))[:width]
        row, sc = [], [0.0] * E_
        for r, e in enumerate(order):
            if adaptive is None or r < k or p[e] > adaptive:
                row.append(e)
                sc[e] = p[e] * decay**j
            else:
                row.append(-1)
        ids.append(row)
        scores.append(sc)
    return list(range(ordinal, ordinal + n)), ids, scores


@pytest.mark.parametrize("overprovision", [0, 3, "adaptive"])
@pytest.mark.parametrize("lookahead,ordinal,T", [(0, 0, 1), (2, 1, 3), (2, 2, 5)])
def test_prefetcher_plan_matches_reference(overprovision, lookahead, ordinal, T):
    k = 2
    policy = runtime_policy(
        "lru",
        lookahead=lookahead,
        overprovision=overprovision,
        threshold=0.6,
        max_overprovision=3,
        score_decay=0.5,
    )
    policy.bind(L, E, k)
    pf = planner_of(policy)
    g = torch.Generator().manual_seed(T + ordinal)
    logits = torch.randn(T, lookahead + 1, E, generator=g) * 2
    layers, ids, scores = pf.plan(ordinal, logits if lookahead else logits[:, 0])
    width = k + 3 if overprovision in (3, "adaptive") else k
    want = plan_reference(logits, k, width, 0.6 if overprovision == "adaptive" else None, 0.5, L, ordinal)
    assert list(layers) == want[0]
    assert ids.tolist() == want[1], (ids.tolist(), want[1])
    err = (scores - torch.tensor(want[2])).abs().max().item()
    assert err < 1e-6, f"worst score mismatch {err:.2e}"


@pytest.mark.parametrize("policy", ["priority", "lru"])
def test_predictions_race_demand_loads_and_evictions(policy):
    """3 compute threads acquire/verify/release random experts while a predictor thread submits
    async and sync predictions (prefetch, priorities, clears); every acquired slot must hold exactly
    its expert's bytes, and the counters must balance once idle."""
    pool = make_pool()
    cache = runtime.SlabCache(pool, 8, policy=policy, min_slots=3)
    engine = runtime.CopyEngine(cache, num_streams=2)
    errors: list[str] = []
    stop = threading.Event()

    def compute(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(500):
                layer = int(rng.integers(L))
                experts = rng.choice(E, size=3, replace=False).tolist()
                slots = engine.acquire(layer, experts)
                for e, s in zip(experts, slots):
                    got = cache.slot_view(s, torch.int32, (SLAB // 4,))
                    if not torch.equal(got, expected(layer, e)):
                        bad = (got != expected(layer, e)).nonzero()[0].item()
                        errors.append(f"slot {s} for ({layer}, {e}) differs first at word {bad}")
                engine.release(layer, experts)
        except Exception as exc:  # surfaced below
            errors.append(f"compute {seed}: {exc!r}")

    def predictor() -> None:
        rng = np.random.default_rng(99)
        ring = [(torch.zeros(2, 5, dtype=torch.int32), torch.zeros(2, E), 0) for _ in range(4)]
        i = 0
        try:
            while not stop.is_set():
                ids, sc, ticket = ring[i]
                if ticket:
                    engine.wait_predictions(ticket)
                ids.copy_(torch.from_numpy(rng.integers(-1, E, size=(2, 5)).astype(np.int32)))
                sc.copy_(torch.from_numpy(rng.random((2, E)).astype(np.float32)))
                layer = int(rng.integers(L - 1))
                ticket = engine.predict_async(
                    [layer, layer + 1], ids, sc, clear=[(layer - 1) % L], clear_score=-float(i + 1)
                )
                ring[i] = (ids, sc, ticket)
                i = (i + 1) % len(ring)
                engine.predict([int(rng.integers(L))], rng.integers(-1, E, size=(1, 4)))
            # the host buffers must outlive every request that reads them
            engine.wait_predictions(max(t for _, _, t in ring))
        except Exception as exc:
            errors.append(f"predictor: {exc!r}")

    threads = [threading.Thread(target=compute, args=(s,)) for s in range(3)]
    pred = threading.Thread(target=predictor)
    t0 = time.perf_counter()
    pred.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stop.set()
    pred.join(timeout=60)
    try:
        assert not errors, errors[:5]
        assert time.perf_counter() - t0 < 60, "stress run hung"
        engine.synchronize()
        st = cache.stats()
        assert st["bytes_loaded"] == st["loads"] * SLAB, st
        assert st["loads"] == st["demand_loads"] + st["prefetch_loads"], st
        assert st["misses"] == st["demand_loads"], st
        assert st["prefetches"] == st["prefetch_loads"] + st["prefetch_cancelled"], st
        assert st["prefetches"] > 0 and st["hits"] > 0 and engine.stats()["predictions"] > 0, st
        check_layer_rows(cache.stats(per_layer=True), SLAB)
    finally:
        engine.close()
        cache.close()
        pool.close()


@pytest.mark.gpu
def test_predict_async_waits_for_the_device_to_host_copy():
    """On CUDA the ids are still on the device when predict_async returns: the engine applies them
    only after the stream's copy (delayed by a sleep kernel) lands in pinned memory."""
    pool = runtime.ExpertPool(2, 8, SLAB, pin=True)
    cache = runtime.SlabCache(pool, 4, policy="priority", device="cuda")
    engine = runtime.CopyEngine(cache)
    try:
        stream = torch.cuda.Stream()
        host = torch.full((1, 3), -1, dtype=torch.int32, pin_memory=True)
        with torch.cuda.stream(stream):
            dev = torch.tensor([[5, 6, 7]], dtype=torch.int32, device="cuda")
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the copy
            host.copy_(dev, non_blocking=True)
            t0 = time.perf_counter()
            ticket = engine.predict_async([1], host)
            returned = time.perf_counter() - t0
        assert returned < 0.05, f"predict_async blocked the caller for {returned:.3f} s"
        assert engine.predictions_done() < ticket
        engine.wait_predictions(ticket)
        engine.synchronize()
        assert [cache.lookup(1, e) >= 0 for e in (5, 6, 7)] == [True] * 3
    finally:
        engine.close()
        cache.close()
        pool.close()
