"""Cache policies for the trace-replay simulator (and, later, the engine).

Eviction (the C++ cache chooses victims; Python only pushes scores):
  ``lru``, ``lfu``   the C++ policies as they are
  ``moe-infinity``   activation-matrix matching, scores for the C++ ``priority`` policy
  ``belady``         optimal offline eviction (simulator only), scores = -(next use)
  ``score``          the runtime's predictor scores (needs a prefetcher that gives scores, e.g.
                     ``score+PRED.safetensors:2``; see :mod:`moert.policy.score`)
  ``utility``        MoE-SpAc's utility: a moving average of each expert's count per call
                     (see :mod:`moert.policy.utility`; for speculative verify passes)
Prefetch (a hook before each layer's access):
  ``oracle``         the true expert set (the ceiling)
  ``moe-infinity``   the top experts of the best-matching earlier request's activation matrix
  ``utility[:m]``    the layer's top-(k+m) experts by utility (MoE-SpAc), from past calls only
  anything with ``prefetch(layer, ctx) -> expert ids`` (see :class:`Prefetcher`), e.g. a predictor.
"""

from __future__ import annotations

from moert.policy.base import EvictionPolicy, Predictions, Prefetcher, StaticPolicy, TokenContext

__all__ = [
    "EVICTION_POLICIES",
    "PREFETCHERS",
    "EvictionPolicy",
    "Predictions",
    "Prefetcher",
    "StaticPolicy",
    "TokenContext",
    "get_eviction_policy",
    "get_prefetcher",
    "register_prefetcher",
]

EVICTION_POLICIES = ("lru", "lfu", "moe-infinity", "belady", "score", "utility")
PREFETCHERS: dict[str, type[Prefetcher]] = {}


def get_eviction_policy(name: str) -> EvictionPolicy:
    """A fresh eviction policy object by name (one of ``EVICTION_POLICIES``)."""
    if name in ("lru", "lfu"):
        return StaticPolicy(name)
    if name == "moe-infinity":
        from moert.policy.moe_infinity import MoEInfinity

        return MoEInfinity()
    if name == "belady":
        from moert.policy.belady import Belady

        return Belady()
    if name == "score":
        from moert.policy.score import ScorePolicy

        return ScorePolicy()
    if name == "utility":
        from moert.policy.utility import UtilityPolicy

        return UtilityPolicy()
    raise ValueError(f"unknown eviction policy {name!r}; use one of {', '.join(EVICTION_POLICIES)}")


def register_prefetcher(name: str, cls: type[Prefetcher]) -> None:
    """Makes ``--prefetch NAME`` build ``cls()`` (for predictors living outside this package)."""
    PREFETCHERS[name] = cls


def get_prefetcher(name: str) -> Prefetcher:
    """A fresh prefetcher by name: ``oracle``, ``moe-infinity``, ``utility[:m]`` or one registered with
    :func:`register_prefetcher`."""
    if name == "oracle":
        from moert.policy.oracle import OraclePrefetcher

        return OraclePrefetcher()
    if name == "moe-infinity":
        from moert.policy.moe_infinity import MoEInfinityPrefetcher

        return MoEInfinityPrefetcher()
    base, colon, extra = name.partition(":")
    if base == "utility":
        from moert.policy.utility import UtilityPrefetcher

        if colon and not extra.isdigit():
            raise ValueError(f"prefetcher {name!r}: m must be an integer >= 0, e.g. utility:2")
        return UtilityPrefetcher(int(extra) if colon else 0)
    if name in PREFETCHERS:
        return PREFETCHERS[name]()
    known = ", ".join(["oracle", "moe-infinity", "utility[:m]", *PREFETCHERS])
    raise ValueError(f"unknown prefetcher {name!r}; use one of {known} (or register_prefetcher(name, cls))")
