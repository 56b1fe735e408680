"""The registry of ``EVICT[+PREFETCH]`` names: what each name builds, the errors, adding a policy."""

from __future__ import annotations

import numpy as np
import pytest

from moert.policy import REGISTRY, Combination, Plan, Policy, build, combination, register
from moert.policy.registry import Registry
from moert.policy.utility import Utility


def test_names_and_roles():
    assert REGISTRY.names("evict") == [
        "lru",
        "lfu",
        "moe-infinity",
        "belady",
        "score",
        "utility",
        "fifo",
        "learned[:next]",
    ]
    assert REGISTRY.names("prefetch") == ["moe-infinity", "utility[:m]", "oracle"]
    assert REGISTRY.names("evict", verify_passes=True) == ["lru", "lfu", "belady", "utility", "fifo"]
    assert REGISTRY.names("prefetch", verify_passes=True) == ["utility[:m]", "oracle"]
    assert {build(n).cache_policy for n in ("lru", "lfu")} == {"lru", "lfu"}
    assert {build(n).cache_policy for n in ("fifo", "belady", "score", "utility", "moe-infinity")} == {
        "priority"
    }
    assert build("belady").offline and build("oracle", "prefetch").offline and not build("fifo").offline


def test_one_name_two_roles():
    evict, fetch = build("utility", utility_decay=0.8), build("utility:3", "prefetch", utility_decay=0.8)
    assert isinstance(evict, Utility) and evict.extra is None and evict.decay == 0.8
    assert fetch.extra == 3 and fetch.name == "utility:3"
    both = combination("utility", "utility:2")
    assert (
        isinstance(both, Combination) and both.name == "utility+utility:2" and both.cache_policy == "priority"
    )
    both.bind(2, 8, 2)
    plan = both.after_call(1, np.array([0, 2, 0, 0, 1, 0, 0, 0]))
    assert plan.layers == (1,) and plan.scores.shape == (1, 8) and plan.ids[0].tolist() == [1, 4, -1, -1]
    lru_fetch = combination("lru", "utility:2")
    lru_fetch.bind(2, 8, 2)
    plan = lru_fetch.after_call(0, np.array([1, 0, 0, 0, 0, 0, 0, 0]))
    assert plan.scores is None and plan.ids[0].tolist()[:1] == [0]  # lru keeps no priorities


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: build("mru"), "unknown eviction policy 'mru'; use one of lru, lfu, moe-infinity"),
        (lambda: build("oracle"), "unknown eviction policy 'oracle'"),
        (lambda: build("psychic", "prefetch"), "unknown prefetcher 'psychic'; use one of moe-infinity"),
        (lambda: build("lru", "prefetch"), "unknown prefetcher 'lru'"),
        (lambda: build("utility:2"), "takes no ':' argument"),
        (lambda: build("utility:x", "prefetch"), "utility:2"),
        (lambda: build("lru", "both"), "role='both'"),
    ],
)
def test_errors_name_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_adding_a_policy_is_one_class_and_one_line():
    class Mru(Policy):
        """Evicts the most recently used expert (a test policy)."""

        name = "mru"
        cache_policy = "priority"

        def bind(self, num_layers, num_experts, top_k):
            super().bind(num_layers, num_experts, top_k)
            self.clock = 0

        def after_call(self, layer, counts):
            self.clock += 1
            used = np.asarray(counts) > 0
            return Plan((layer,), scores=np.where(used, -self.clock, 0).astype(np.float32)[None])

    registry = Registry()
    registry.register("mru", Mru)
    policy = registry.build("mru")
    policy.bind(1, 4, 1)
    assert policy.after_call(0, np.array([0, 1, 0, 0])).scores.tolist() == [[0, -1, 0, 0]]
    with pytest.raises(ValueError, match="not a moert.policy.Policy subclass"):
        register("bad", object)
