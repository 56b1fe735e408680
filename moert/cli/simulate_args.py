"""``moert simulate``'s argument types and the SSD tier's flags (kept apart from the command's body)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from moert.sim.tiers import HOST_POLICIES, TierConfig

__all__ = ["_floats", "_grid", "add_tier_arguments", "tier_config"]


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _grid(flag: str, what: str, example: str, *, positive: bool = False):
    """An argparse type: one number or a comma-separated list of numbers (>= 0, or > 0)."""

    def parse(text: str) -> tuple[float, ...]:
        values = []
        for part in text.split(","):
            try:
                v = float(part)
            except ValueError:
                v = math.nan
            if not (math.isfinite(v) and (v > 0 if positive else v >= 0)):
                raise argparse.ArgumentTypeError(
                    f"{part.strip()!r} in {flag} {text} is not a number of {what} "
                    f"({'> 0' if positive else '>= 0'}); give one or a comma-separated list, e.g. {flag} {example}"
                )
            values.append(v)
        return tuple(values)

    return parse


def add_tier_arguments(parser: Any) -> None:
    """``moert simulate``'s ``--host-capacity``, ``--ssd-bandwidth``, ``--ssd-latency-us`` and ``--host-policy``."""
    parser.add_argument(
        "--host-capacity",
        type=_floats,
        default=None,
        help="SSD tier: the host pinned pool holds only this fraction of all L*E experts (a list, e.g. "
        "0.25,0.5,1); a device miss that misses the pool reads the expert from SSD first. 1 = every expert "
        "pinned (two levels). Default: off",
    )
    parser.add_argument(
        "--ssd-bandwidth",
        type=_floats,
        default=None,
        help="with --host-capacity: SSD -> pinned memory read rate(s), GB/s (NVMe ~3-7; default 5)",
    )
    parser.add_argument(
        "--ssd-latency-us",
        type=float,
        default=None,
        help="with --host-capacity: fixed time per SSD read, µs, on top of size / bandwidth (default 0)",
    )
    parser.add_argument(
        "--host-policy",
        default=None,
        help=f"with --host-capacity: the pool's eviction, one or a list of {', '.join(HOST_POLICIES)} (default lru)",
    )


def tier_config(args: Any) -> TierConfig | None:
    """The :class:`TierConfig` of ``moert simulate``'s arguments (None without --host-capacity)."""
    if args.host_capacity is None:
        if args.ssd_bandwidth is not None or args.host_policy is not None or args.ssd_latency_us is not None:
            raise ValueError(
                "--ssd-bandwidth / --ssd-latency-us / --host-policy need --host-capacity F (e.g. 0.5)"
            )
        return None
    return TierConfig(
        host_capacities=args.host_capacity,
        ssd_bandwidths_gbs=args.ssd_bandwidth or (5.0,),
        host_policies=tuple(p.strip() for p in (args.host_policy or "lru").split(",") if p.strip()),
        ssd_latency_us=0.0 if args.ssd_latency_us is None else args.ssd_latency_us,
    )
