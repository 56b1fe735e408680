"""The runtime-vs-simulator check of an eviction policy in a patched model (``test_fifo_runtime``,
``test_learned_runtime``): the numbers do not change (bit-identical to every expert cached), offloading
happened, and the runtime's hits and misses per layer and what stays resident equal the simulator's
stepping (``moert.sim.step``) of the same policy object over the routing the model made.

Exact agreement needs the runtime's access order to be the simulator's: no predictor, no overlapped
waves (a union larger than the cache streams in waves of all slots, resident experts first, then by
id, in both), and each call's distinct experts given to the simulated cache once (the runtime
acquires a call's union)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

import moert
from moert.models.tiny import VARIANTS, greedy, prompt_ids, tiny_model
from moert.sim.step import Caches, access, apply_plan, selections


def routing_recorder(experts):
    """Records ``(ordinal, top_k_index (T, k))`` of every call of the ``experts`` modules, in call order."""
    calls: list[tuple[int, torch.Tensor]] = []
    hooks = [
        module.register_forward_pre_hook(
            lambda mod, args, o=ordinal: calls.append(
                (o, args[1].detach().reshape(-1, args[1].shape[-1]).clone())
            )
        )
        for ordinal, module in enumerate(experts)
    ]
    return calls, hooks


def step_simulator(policy, calls, num_layers, num_experts, top_k, slots):
    """The simulator's stepping driver over recorded calls: (L,) hits, (L,) misses, the final caches."""
    policy.bind(num_layers, num_experts, top_k)
    caches = Caches("global", num_layers, num_experts, slots, policy.cache_policy, min_slots=top_k)
    hits, misses = np.zeros(num_layers, dtype=np.int64), np.zeros(num_layers, dtype=np.int64)
    for layer, index in calls:
        union = np.unique(index.numpy()).astype(np.int64)
        counts = selections(index.numpy().reshape(-1).astype(np.int64), num_experts)
        cache, cl = caches.at(layer)
        apply_plan(caches, policy.on_routed(layer, counts, cache.resident(cl).numpy()))
        got = access(caches, layer, union)
        apply_plan(caches, policy.after_call(layer, counts))
        hits[layer] += got
        misses[layer] += union.size - got
    return hits, misses, caches


def check_runtime_is_the_simulator(name: str, batch: int, policy_type: type, **patch: Any) -> None:
    """Patches the tiny ``name`` model with ``patch`` (a policy of ``policy_type`` that plans at the
    router only, 2k + 1 slots), decodes 8 tokens and asserts the module doc's agreements."""
    model_type, overrides = VARIANTS[name]
    model = tiny_model(model_type, **overrides)
    adapter = moert.models.get_adapter(model)
    k, E = adapter.top_k, adapter.num_experts
    experts = [ref.experts for ref in adapter.moe_layers()]
    prompt = prompt_ids(batch, 6, vocab=model.config.vocab_size, seed=2)
    full = copy.deepcopy(model)
    h = moert.patch(full, cache_experts=1.0, device="cpu")
    want = greedy(full, prompt, 8)
    h.undo()

    slots = 2 * k + 1
    h = moert.patch(model, cache_experts=slots, device="cpu", overlap_waves=False, **patch)
    policy = h.offloader.policy
    assert isinstance(policy, policy_type) and h.offloader.policy_routed and not h.offloader.policy_after
    calls, hooks = routing_recorder(experts)
    got = greedy(model, prompt, 8)
    for hook in hooks:
        hook.remove()
    st = h.stats()
    resident = [h.offloader.resident(layer) for layer in range(len(h.layer_ids))]
    h.undo()

    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"{name}: not bit-identical"
    assert st.misses > 0 and st.evictions > 0, st
    # the same object, bound afresh, stepped by the simulator over the routing the model made
    L = len(resident)
    sim_hits, sim_misses, caches = step_simulator(policy, calls, L, E, k, slots)
    rows = [st.per_layer[layer_id] for layer_id in h.layer_ids]
    assert [r.calls for r in rows] == [sum(1 for o, _ in calls if o == layer) for layer in range(L)]
    np.testing.assert_array_equal([r.hits for r in rows], sim_hits, err_msg=f"{name}: hits per layer")
    np.testing.assert_array_equal([r.misses for r in rows], sim_misses, err_msg=f"{name}: misses per layer")
    for layer in range(L):
        cache, cl = caches.at(layer)
        sim_resident = set(np.flatnonzero(cache.resident(cl).numpy()).tolist())
        assert resident[layer] == sim_resident, (name, layer, resident[layer], sim_resident)
