"""``prefetch="budget"`` in a patched model (``moert.policy.budget.BudgetPlanner``): outputs bit-identical
to all-resident (DESIGN §8) with misses and prefetches, on the CPU twin and the device model; and, given
the same window, the same prefetch decisions, hits and misses as the simulator's stepping of the same
policy over the logits and routing the model made (the window is injected: measured times differ)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import moert
from moert.models.tiny import greedy, prompt_ids, random_predictor, single_thread, tiny_model
from moert.policy import planner_of, runtime_policy
from moert.policy.budget import BudgetPlanner, FixedWindow, MeasuredWindow
from moert.sim.step import Caches, apply_plan, selections


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def _record(handle, experts):
    """Events in call order: ("predict", layer, logits, planned ids) and ("route", layer, (T, k) ids)."""
    events: list[tuple] = []
    policy = handle.offloader.policy
    inner = policy.on_prediction

    def on_prediction(layer, logits=None, kernel_plan=None):
        plan = inner(layer, logits, kernel_plan)
        ids = [] if plan is None or plan.ids is None else [int(e) for e in plan.ids[0] if e >= 0]
        events.append(("predict", layer, logits.detach().clone(), ids))
        return plan

    policy.on_prediction = on_prediction
    hooks = [
        module.register_forward_pre_hook(
            lambda mod, args, o=ordinal: events.append(
                ("route", o, args[1].detach().reshape(-1, args[1].shape[-1]).clone())
            )
        )
        for ordinal, module in enumerate(experts)
    ]
    return events, hooks


def _simulate(events, window, L, E, k, slots):
    """The simulator's stepping of a fresh budget policy over the recorded events: (planned ids per
    prediction, (L,) hits, (L,) misses)."""
    policy = runtime_policy("lru", lookahead=0, budget=True)
    policy.bind(L, E, k)
    planner_of(policy).window = FixedWindow(window)
    caches = Caches("global", L, E, slots, policy.cache_policy, min_slots=k)
    policy.set_context(caches=caches)
    planned, hits, misses = [], np.zeros(L, dtype=np.int64), np.zeros(L, dtype=np.int64)
    for ev in events:
        layer = ev[1]
        cache, cl = caches.at(layer)
        if ev[0] == "predict":
            plan = policy.on_prediction(layer, ev[2])
            planned.append(
                [] if plan is None or plan.ids is None else [int(e) for e in plan.ids[0] if e >= 0]
            )
            apply_plan(caches, plan)
            continue
        index = ev[2].numpy().astype(np.int64)
        counts = selections(index.reshape(-1), E)
        resident = cache.resident(cl).numpy()
        policy.on_routed(layer, counts, resident)
        union = np.unique(index)
        order = np.concatenate([union[resident[union]], union[~resident[union]]])  # the runtime's order
        for w0 in range(0, order.size, slots):  # waves of all slots without overlap
            got = cache.sim_access(cl, order[w0 : w0 + slots])
            hits[layer] += got
            misses[layer] += min(slots, order.size - w0) - got
    return planned, hits, misses


@pytest.mark.parametrize("device", ["cpu", "sim"])
@pytest.mark.parametrize("window", [0.5, 3.0])
def test_budget_runtime_is_exact_and_the_simulators(device, window):
    model = tiny_model("deepseek_v2", topk_method="greedy")
    adapter = moert.models.get_adapter(model)
    k, E = adapter.top_k, adapter.num_experts
    experts = [ref.experts for ref in adapter.moe_layers()]
    prompt = prompt_ids(1, 6, vocab=model.config.vocab_size, seed=2)
    full = copy.deepcopy(model)
    h = moert.patch(full, cache_experts=1.0, device="cpu")
    want = greedy(full, prompt, 10)
    h.undo()

    pred = random_predictor(model)
    slots = 3 * k
    h = moert.patch(
        model, cache_experts=slots, policy="lru", predictor=pred, prefetch="budget", device=device,
        overlap_waves=False,
    )  # fmt: skip
    planner = planner_of(h.offloader.policy)
    assert isinstance(planner, BudgetPlanner) and isinstance(planner.window, MeasuredWindow)
    planner.window = FixedWindow(window)
    events, hooks = _record(h, experts)
    got = greedy(model, prompt, 10)
    for hook in hooks:
        hook.remove()
    st = h.stats()
    h.undo()

    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), "not bit-identical to all-resident"
    assert st.misses > 0, st
    run_planned = [ev[3] for ev in events if ev[0] == "predict"]
    L = len(experts)
    sim_planned, sim_hits, sim_misses = _simulate(events, window, L, E, k, slots)
    assert run_planned == sim_planned
    rows = [st.per_layer[i] for i in h.layer_ids]
    np.testing.assert_array_equal([r.hits for r in rows], sim_hits)
    np.testing.assert_array_equal([r.misses for r in rows], sim_misses)
    issued = sum(len(p) for p in run_planned)
    assert (issued == 0) == (window < 1.0) and st.prefetches == issued, (issued, st.prefetches)


def test_measured_window_reads_layer_time_and_copy_time():
    """The runtime's window: (prediction -> router time) / (engine busy time per copy), EMAs."""

    class Engine:
        def __init__(self):
            self.s = {"busy_s": 0.0, "copies": 0}

        def stats(self):
            return dict(self.s)

    eng, now = Engine(), [10.0]
    w = MeasuredWindow(eng, num_layers=2, decay=0.5, clock=lambda: now[0])
    w.start(0)
    now[0] += 0.004  # the router 4 ms after the prediction
    w.routed(0)
    assert w(0) == 0.0  # no copy measured yet: no window
    eng.s = {"busy_s": 0.002, "copies": 1}
    w.start(0)  # layer 0: reads the engine once per token
    assert w.copy_s == pytest.approx(0.002)
    assert w(0) == pytest.approx(0.004 / 0.002)
    eng.s = {"busy_s": 0.012, "copies": 3}  # 2 more copies of 5 ms: EMA 0.5 * 2 + 0.5 * 5 ms
    w.start(0)
    assert w.copy_s == pytest.approx(0.0035)
    now[0] += 0.008  # this token's layer 0 took 8 ms to its router: EMA 0.5 * 4 + 0.5 * 8 ms
    w.routed(0)
    assert w(0) == pytest.approx(0.006 / 0.0035) and w(1) == 0.0


def test_budget_needs_a_predictor():
    with pytest.raises(ValueError, match="prefetch='budget'.*predictor="):
        moert.OffloadConfig(prefetch="budget")


def test_load_with_budget(tmp_path):
    """``moert.load(..., prefetch="budget")``: the same policy object; tokens equal the all-resident load's,
    with misses and prefetches (window injected: the CPU twin's measured times are meaningless)."""
    from moert.models.tiny import Reference

    ref = Reference("deepseek_v2-greedy", tmp_path, batch=1, new_tokens=8)
    full = moert.load(ref.path, cache_experts=1.0, device="cpu", progress=False)
    want = greedy(full, ref.prompt, ref.new_tokens)
    moert.handle_of(full).undo()
    model = moert.load(
        ref.path, cache_experts=0.25, device="cpu", predictor=random_predictor(ref.model),
        prefetch="budget", progress=False, overlap_waves=False,
    )  # fmt: skip
    h = moert.handle_of(model)
    planner = planner_of(h.offloader.policy)
    assert isinstance(planner, BudgetPlanner)
    planner.window = FixedWindow(100.0)  # the random predictor's expected demand is large: a wide window
    got = greedy(model, ref.prompt, ref.new_tokens)
    st = h.stats()
    h.undo()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert st.misses > 0 and st.prefetches > 0 and planner.issued == st.prefetches, st
