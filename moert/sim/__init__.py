"""The trace-replay simulator: routing traces replayed through the real C++ ``SlabCache`` and the
policies of :mod:`moert.policy`, with a cost model that turns counts into predicted tokens/s.

- :mod:`moert.sim.replay`: :func:`simulate`, :class:`SimConfig`, verify passes;
- :mod:`moert.sim.cost`: :class:`CostModel`, :func:`cpu_split` (heterogeneous mode).
"""

from __future__ import annotations

from moert.sim.cost import CostModel, cpu_split
from moert.sim.replay import (
    PassSequence,
    PassTrace,
    PolicySpec,
    SimConfig,
    group_verify_passes,
    heterogeneous_table,
    num_slots,
    parse_policies,
    result_table,
    simulate,
)

__all__ = [
    "CostModel",
    "PassSequence",
    "PassTrace",
    "PolicySpec",
    "SimConfig",
    "cpu_split",
    "group_verify_passes",
    "num_slots",
    "parse_policies",
    "simulate",
    "result_table",
    "heterogeneous_table",
]
