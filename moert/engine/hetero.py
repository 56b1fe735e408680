"""Heterogeneous mode (DESIGN §7): some of a layer's missed experts are computed on the host CPU,
straight from the pinned pool, instead of being copied into the device cache.

For each MoE layer call whose experts fit the cache (one wave: every decode step), the experts
neither resident nor already on their way (prefetched) are the misses; ``moert.sim.cost.cpu_split``
picks how many of them go to the CPU so that ``max(c * t_cpu + t_activation, (n - c) * t_copy)``
is smallest, the same rule as ``moert simulate --cpu-expert-ms``. The last ``c`` misses in the
layer's order go to the CPU (the first ones are copied, so their copies start first). Their rows
go to the host once per layer call, each expert runs there with the pool's own weights, and the
products come back once, into the same ``(T, k, H)`` buffer at their routing positions: the
reduction order over k does not change. The device computes its experts meanwhile (its kernels
are queued before the host starts).

Numbers: on the CPU twin the host expert runs the same ops on the same bytes as the slot would,
so outputs stay bit-identical; on CUDA a host expert is computed by the CPU's kernels, within the
fp tolerance of the device result (DESIGN §8 allows this one exception; the mode is off by
default). ``t_cpu`` and ``t_copy`` are measured at patch time unless given
(``OffloadConfig.cpu_expert_ms`` / ``copy_expert_ms``).
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

import torch

from moert.sim.cost import cpu_split

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from moert.engine.offload import ExpertLayout

__all__ = ["CpuExperts", "calibrate"]


class CpuExperts:
    """Chooses and computes a layer's host experts.

    Args:
        pool: the host pool (``view(layer, expert, dtype, shape, offset)``).
        layout: expert layout.
        cpu_s: seconds of one expert for one token on the host.
        copy_s: seconds of one expert's copy into the cache.
        activation_s: seconds of moving the rows to the host and the products back.
    """

    def __init__(
        self, pool: Any, layout: ExpertLayout, cpu_s: float, copy_s: float, activation_s: float
    ) -> None:
        cpu_split(0, cpu_s, copy_s, activation_s)  # validates the times
        self.pool, self.layout = pool, layout
        self.cpu_s, self.copy_s, self.activation_s = cpu_s, copy_s, activation_s
        self._views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def choose(self, union: Sequence[int], present: set[int]) -> list[int]:
        """The experts of ``union`` to compute on the host: the last ``c`` of its misses."""
        misses = [e for e in union if e not in present]
        if not misses:
            return []
        c = int(cpu_split(len(misses), self.cpu_s, self.copy_s, self.activation_s)[0][0])
        return misses[len(misses) - c :] if c else []

    def weights(self, ordinal: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host views ``(gate_up (2I, H), down (H, I))`` of one expert in the pool (made once: a
        view of native memory costs tens of microseconds)."""
        key = (ordinal, expert)
        if key not in self._views:
            self._views[key] = self.layout.views(
                lambda dtype, shape, offset: self.pool.view(ordinal, expert, dtype, tuple(shape), offset)
            )
        return self._views[key]

    def rows_to_host(self, hidden_states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(n, H) host copy of ``hidden_states[rows]`` (one transfer per layer call)."""
        return hidden_states[rows].to("cpu")

    def compute(
        self,
        ordinal: int,
        experts: Sequence[int],
        host_rows: torch.Tensor,
        spans: Sequence[int],
        gate_fn: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
    ) -> torch.Tensor:
        """Each expert's product on the host, stacked and sent to ``device`` once.

        Args:
            ordinal: MoE layer.
            experts: (m,) host experts, in the order their rows are stacked in ``host_rows``.
            host_rows: (sum(spans), H) their input rows on the host.
            spans: (m,) rows per expert.
            gate_fn: the experts module's gate (``act(gate) * up``).
            device: where the products go.

        Returns:
            (sum(spans), H) products on ``device``, in the weights' dtype.
        """
        out, start = [], 0
        for e, n in zip(experts, spans):
            gate_up, down = self.weights(ordinal, e)
            x = host_rows[start : start + n].to(gate_up.dtype)  # [n, H]
            h = gate_fn(torch.nn.functional.linear(x, gate_up))  # [n, I]
            out.append(torch.nn.functional.linear(h, down))  # [n, H]
            start += n
        return torch.cat(out).to(device)


def calibrate(pool: Any, layout: ExpertLayout, device: str, reps: int = 5) -> tuple[float, float]:
    """``(cpu_s, copy_s)`` measured here: one expert's forward for one token on the host from the
    pool (weights read from memory: a different expert each rep), and one expert's copy from the
    pool into device memory (CUDA: pinned host to device; CPU twin: a memcpy). Medians of ``reps``."""
    ordinal, experts = 0, pool.num_experts
    cpu, copy = [], []
    from moert.engine.runtime import tensor_device

    dev = tensor_device(device)
    slab = torch.empty(pool.slab_bytes, dtype=torch.uint8, device=dev)
    x = torch.zeros(1, layout.hidden, dtype=layout.dtype)
    with torch.no_grad():
        for r in range(reps + 1):  # the first rep warms up and is dropped
            e = r % experts
            gate_up, down = layout.views(
                lambda dtype, shape, offset, e=e: pool.view(ordinal, e, dtype, tuple(shape), offset)
            )
            t0 = time.perf_counter()
            h = torch.nn.functional.linear(x, gate_up)
            gate, up = h.chunk(2, dim=-1)
            torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down)
            t1 = time.perf_counter()
            src = pool.view(ordinal, (e + 1) % experts, torch.uint8, (pool.slab_bytes,), 0)
            slab.copy_(src, non_blocking=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t2 = time.perf_counter()
            if r:
                cpu.append(t1 - t0)
                copy.append(t2 - t1)
    return max(statistics.median(cpu), 1e-7), max(statistics.median(copy), 1e-7)
