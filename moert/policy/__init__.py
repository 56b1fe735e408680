"""Cache policies: one :class:`Policy` object per policy, driven by the runtime and the simulator.

The contract (hooks, :class:`Plan`, when each driver calls what) is in :mod:`moert.policy.base`.
One file per policy, one registry line each (below); ``EVICT+PREFETCH`` is
:class:`~moert.policy.combine.Combination`:

  ``lru``, ``lfu``      the C++ cache's own orders (:mod:`~moert.policy.native`)
  ``fifo``              first loaded, first evicted (:mod:`~moert.policy.fifo`)
  ``score``             a predictor's scores, then recency; with ``+PRED.safetensors[:m]``,
                        ``+prev-token[:m]`` or ``+frequency[:m]`` (:mod:`~moert.policy.score`,
                        :mod:`~moert.policy.predictor`)
  ``utility[:m]``       MoE-SpAc's utility: priorities, and as a prefetcher the top-(k+m)
                        (:mod:`~moert.policy.utility`)
  ``moe-infinity``      activation-matrix matching: priorities, or as a prefetcher its top experts
  ``learned``           a learned forecast of each expert's next use, toward Belady
                        (:mod:`~moert.policy.learned`, ``--evictor R.safetensors``)
  ``belady``            optimal offline eviction (the upper bound)
  ``oracle``            prefetches the true experts (the ceiling)

``belady``, ``oracle``, ``moe-infinity`` and the trace-fed predictors are ``offline`` (simulator only);
a model builds any other registered policy with :func:`runtime_policy`.
"""

from __future__ import annotations

from moert.policy.base import Plan, Policy, Predictions, SequencePlan, TokenContext
from moert.policy.belady import Belady
from moert.policy.combine import Combination
from moert.policy.fifo import Fifo
from moert.policy.learned import Learned
from moert.policy.moe_infinity import MoEInfinity
from moert.policy.native import Lfu, Lru
from moert.policy.oracle import Oracle
from moert.policy.registry import REGISTRY
from moert.policy.runtime import planner_of, runtime_policy
from moert.policy.score import Score
from moert.policy.trace_prefetch import TracePrefetcher
from moert.policy.utility import Utility

__all__ = [
    "REGISTRY",
    "Combination",
    "Plan",
    "Policy",
    "Predictions",
    "SequencePlan",
    "TokenContext",
    "TracePrefetcher",
    "build",
    "combination",
    "planner_of",
    "register",
    "runtime_policy",
]

register = REGISTRY.register
build = REGISTRY.build
combination = REGISTRY.combination

register("lru", Lru)
register("lfu", Lfu)
register("moe-infinity", MoEInfinity)
register("belady", Belady)
register("score", Score)
register("utility", Utility)
register("fifo", Fifo)
register("oracle", Oracle)
register("learned", Learned)
