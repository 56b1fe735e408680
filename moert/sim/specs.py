"""``EVICT[+PREFETCH]`` names of ``moert simulate --policy``: :class:`PolicySpec` and :func:`parse_policies`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from moert.policy import REGISTRY
from moert.policy.score import NO_SCORES_HELP

__all__ = ["PolicySpec", "parse_policies"]


@dataclass(frozen=True)
class PolicySpec:
    """One simulated configuration: an eviction policy and an optional prefetcher."""

    evict: str
    prefetch: str | None = None

    @property
    def label(self) -> str:
        return self.evict if self.prefetch is None else f"{self.evict}+{self.prefetch}"


def parse_policies(
    names: Iterable[str], prefetch: str | None = None, *, prefetchers: Iterable[str] = ()
) -> list[PolicySpec]:
    """Parses ``EVICT[+PREFETCH]`` names; ``prefetch`` applies to names without their own.

    Args:
        names: e.g. ``["lru", "belady", "lru+oracle"]``.
        prefetch: the prefetcher of names that have none (``None``/``"none"``: demand only).
        prefetchers: extra prefetcher names that will be passed to :func:`simulate` as objects.
    """
    extra = set(prefetchers)
    specs = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        evict, _, pre = name.partition("+")
        scored = REGISTRY.build(evict, "evict").uses_prediction_scores  # validates the name
        pre = pre or prefetch
        if pre in ("", "none"):
            pre = None
        gives = pre is None or pre in extra or REGISTRY.build(pre, "prefetch").gives_scores  # validates it
        if scored and not gives:
            raise ValueError(f"{name!r}: prefetcher {pre!r} gives no scores; {NO_SCORES_HELP}")
        if scored and pre is None:
            raise ValueError(f"{name!r} has no prefetcher: {NO_SCORES_HELP}")
        specs.append(PolicySpec(evict, pre))
    if not specs:
        raise ValueError("no policies given; e.g. --policy lru,lfu,moe-infinity,belady")
    return specs
