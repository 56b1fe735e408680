"""The trace-replay simulator: routing traces replayed through the real C++ ``SlabCache`` and the
policies of :mod:`moert.policy`, with a cost model that turns counts into predicted tokens/s.

- :mod:`moert.sim.replay`: :func:`simulate`, :class:`SimConfig`, ``EVICT[+PREFETCH]`` names;
- :mod:`moert.sim.step`: the stepping driver (a policy's hooks access by access: the definition);
- :mod:`moert.sim.fast`: the fast path (a policy's plans for whole sequences, few C++ calls);
- :mod:`moert.sim.passes`: speculative decoding's verify passes;
- :mod:`moert.sim.report`: Markdown tables;
- :mod:`moert.sim.cost`: :class:`CostModel`, :func:`cpu_split` (heterogeneous mode);
- :mod:`moert.sim.timeline`: the windowed cost model's per-step traffic log and copy-link timeline;
- :mod:`moert.sim.tiers`: the SSD tier (a host pool holding a fraction of the experts), ``SimConfig.tiers``.
"""

from __future__ import annotations

from moert.sim.cost import CostModel, cpu_split
from moert.sim.passes import PassSequence, PassTrace, group_verify_passes
from moert.sim.replay import PolicySpec, SimConfig, make_policy, num_slots, parse_policies, simulate
from moert.sim.report import heterogeneous_table, result_table

__all__ = [
    "CostModel",
    "PassSequence",
    "PassTrace",
    "PolicySpec",
    "SimConfig",
    "cpu_split",
    "group_verify_passes",
    "heterogeneous_table",
    "make_policy",
    "num_slots",
    "parse_policies",
    "result_table",
    "simulate",
]
