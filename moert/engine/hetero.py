"""Heterogeneous mode (DESIGN §7): some of a layer's missed experts are computed on the host CPU,
straight from the pinned pool, instead of being copied into the device cache.

For each MoE layer call whose experts fit the cache (one wave: every decode step), the experts
neither resident nor already on their way (prefetched) are the misses; ``moert.cost.cpu_split``
picks how many of them go to the CPU so that ``max(c * t_cpu + t_activation, (n - c) * t_copy)``
is smallest, the same rule as ``moert simulate --cpu-expert-ms``. The last ``c`` misses in the
layer's order go to the CPU (the first ones are copied, so their copies start first). Their rows
go to the host once per layer call, each expert runs there with the pool's own weights, and the
products come back once, into the same ``(T, k, H)`` buffer at their routing positions: the
reduction order over k does not change. The device computes its experts meanwhile (its kernels
are queued before the host starts).

In the layer forward this is a placement strategy (``place`` then ``finish``), like ``DEVICE_ONLY``,
the placement without heterogeneous mode: the forward always calls its offloader's placement.

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

from moert.cost import cpu_split
from moert.engine.layout import expert_forward

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from moert.engine.layout import ExpertLayout

__all__ = ["CpuExperts", "DeviceOnly", "DEVICE_ONLY", "calibrate"]


class _NoHostWork:
    def finish(self, ys: torch.Tensor, gate_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        return None


_NO_HOST_WORK = _NoHostWork()


class DeviceOnly:
    """The placement without heterogeneous mode: every selected expert computes on the device."""

    def place(
        self, off: Any, ordinal: int, union: list[int], route: Any, hidden_states: torch.Tensor
    ) -> tuple[list[int], _NoHostWork]:
        return union, _NO_HOST_WORK


DEVICE_ONLY = DeviceOnly()


class _HostWork:
    """Host experts of one layer call whose rows are already on the host; ``finish`` computes them."""

    def __init__(
        self,
        cpu: CpuExperts,
        ordinal: int,
        experts: list[int],
        rows: torch.Tensor,
        spans: list[tuple[int, int]],
    ) -> None:
        self.cpu, self.ordinal, self.experts, self.rows, self.spans = cpu, ordinal, experts, rows, spans

    def finish(self, ys: torch.Tensor, gate_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Writes each host expert's products into ``ys`` (T*k, H) at its span (grouped by expert)."""
        sizes = [t - s for s, t in self.spans]
        y = self.cpu.compute(self.ordinal, self.experts, self.rows, sizes, gate_fn, ys.device)  # [m, H]
        done = 0
        for s, t in self.spans:
            ys[s:t] = y[done : done + t - s]
            done += t - s


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

    def place(
        self, off: Any, ordinal: int, union: list[int], route: Any, hidden_states: torch.Tensor
    ) -> tuple[list[int], Any]:
        """Splits a layer call's union into device experts and host ones (only when it fits the cache:
        one wave) and sends the host ones' rows to the host now, before the device experts are queued,
        so the host never waits for those.

        Args:
            off: the offloader (``present``, ``num_slots``, ``counters``).
            ordinal: MoE layer.
            union: the experts selected, in acquire order.
            route: the call's ``moert.engine.layer.Route``.
            hidden_states: (T, H) the layer's rows.

        Returns:
            ``(device experts, work)``; ``work.finish(ys, gate_fn)`` computes the host experts.
        """
        host = self.choose(union, off.present(ordinal)) if len(union) <= off.num_slots else []
        if not host:
            return union, _NO_HOST_WORK
        off.counters.cpu_experts[ordinal] += len(host)
        spans = [route.span(e) for e in host]
        rows = self.rows_to_host(hidden_states, torch.cat([route.rows[s:t] for s, t in spans]))  # [m, H]
        chosen = set(host)
        return [e for e in union if e not in chosen], _HostWork(self, ordinal, host, rows, spans)

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
            out.append(
                expert_forward(host_rows[start : start + n], *self.weights(ordinal, e), gate_fn)
            )  # [n, H]
            start += n
        return torch.cat(out).to(device)


def calibrate(pool: Any, layout: ExpertLayout, device: str, reps: int = 5) -> tuple[float, float]:
    """``(cpu_s, copy_s)`` measured here: one expert's forward for one token on the host from the
    pool (weights read from memory: a different expert each rep), and one expert's copy from the
    pool into device memory (CUDA: pinned host to device; CPU twin: a memcpy). Medians of ``reps``."""
    ordinal, experts = 0, pool.num_experts
    cpu, copy = [], []
    from moert.engine.devices import tensor_device

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
