"""The policy object a patched model drives: ``runtime_policy(OffloadConfig.policy, ...)``.

The engine builds it once per model, calls ``bind(L, E, k)``, creates its cache with
``policy.cache_policy``, then at every MoE layer call (``moert.policy.base`` has the order):
``on_prediction(l, logits, kernel_plan)`` from ``PrefetchNorm`` where a predictor runs,
``on_routed(l, counts, resident)`` after the router, ``after_call(l, counts)`` after the experts,
applying each returned :class:`~moert.policy.base.Plan` with ``CopyEngine.predict(*plan.predict_args())``.
"""

from __future__ import annotations

from typing import Any

from moert.policy.base import Policy
from moert.policy.budget import BudgetPlanner
from moert.policy.combine import Combination
from moert.policy.registry import REGISTRY
from moert.policy.score import ScorePlanner
from moert.policy.utility import DEFAULT_DECAY, Utility

__all__ = ["check_runtime_name", "planner_of", "runtime_policy"]


def check_runtime_name(name: str) -> None:
    """Raises ValueError unless ``name`` is a policy a model runs (``REGISTRY.runtime_names()``); a
    simulator-only policy's message names ``moert simulate``."""
    names = REGISTRY.runtime_names()
    if name in names:
        return
    message = f"policy={name!r} is not one of {', '.join(names)}"
    base = name.partition(":")[0]
    if base != name and base in names:
        raise ValueError(
            f"{message}: a model runs {base!r} as it is; the variants {base}:ARG exist in the simulator only "
            f"(`moert simulate TRACE --policy {name}`)"
        )
    if name in REGISTRY:
        message += (
            ": those are the policies a model runs; belady, oracle and moe-infinity need the whole trace "
            "(the future, or request boundaries) and run only in the simulator: "
            f"`moert simulate TRACE --policy {name}`"
        )
    raise ValueError(message)


def runtime_policy(
    name: str,
    *,
    lookahead: int | None = None,
    probabilities: str = "sigmoid",
    overprovision: int | str = 2,
    prefetch: bool = True,
    threshold: float = 0.3,
    max_overprovision: int = 4,
    score_decay: float = 0.5,
    utility_decay: float = DEFAULT_DECAY,
    evictor: Any = None,
    budget: bool = False,
) -> Policy:
    """A fresh (unbound) policy for a patched model.

    Args:
        name: a registered policy that is not ``offline``: ``lru``, ``lfu``, ``score``, ``utility``, ``fifo``,
            ``learned``
            (``REGISTRY.runtime_names()``).
        lookahead: the attached predictor's d, or None when no predictor runs.
        probabilities: how the predictor's logits become probabilities (``sigmoid`` or ``clamp``).
        overprovision: m (prefetch the top-(k+m)), or ``"adaptive"`` (predictor only).
        prefetch: prefetch (``prefetch="async"``); False: predictions and utility only order eviction.
        threshold, max_overprovision, score_decay: the predictor's plan (see ``moert.policy.score``).
        utility_decay: ``utility``'s weight of the past.
        evictor: ``learned``'s reuse model (a file path or a loaded ``ReuseModel``).
        budget: the predictor's prefetch is budgeted (``moert.policy.budget.BudgetPlanner``: only what the
            measured link slack hides, by expected value).

    ``utility`` takes no predictor (``OffloadConfig`` refuses one); the others combine with one: ``score``
    is the planner itself, ``lru`` / ``lfu`` / ``fifo`` prefetch its ids (:func:`planner_of` finds it).

    Raises:
        ValueError: an unknown or simulator-only name, or ``score`` without a predictor.
    """
    check_runtime_name(name)
    if name == "utility":
        if isinstance(overprovision, bool) or not isinstance(overprovision, int):
            raise ValueError(
                f"policy 'utility' prefetches its top k + m experts: overprovision={overprovision!r}"
            )
        return Utility(overprovision if prefetch else None, utility_decay)
    planner = None
    if lookahead is not None:
        planner = (BudgetPlanner if budget else ScorePlanner)(
            lookahead=lookahead,
            probabilities=probabilities,
            overprovision=overprovision,
            threshold=threshold,
            max_overprovision=max_overprovision,
            score_decay=score_decay,
            scores=name == "score",
            prefetch=prefetch,
        )
    if name == "score":
        if planner is None:
            raise ValueError("policy 'score' orders eviction by a predictor's scores: attach a predictor")
        return planner
    base = REGISTRY.build(name, "evict", evictor=evictor)
    return base if planner is None else Combination(base, planner)


def planner_of(policy: Policy) -> ScorePlanner | None:
    """The predictor planner inside a runtime policy (its ``spec`` goes to the fused kernel, its
    ``last_planned`` to the online recall), or None when no predictor runs."""
    if isinstance(policy, ScorePlanner):
        return policy
    if isinstance(policy, Combination) and isinstance(policy.prefetch, ScorePlanner):
        return policy.prefetch
    return None
