"""The "moert" experts forward of one offloaded MoE layer, as a fixed pipeline.

``OffloadedLayer.forward`` runs, for the ``(T, k)`` routing of one layer call:

1. route: group the ``T*k`` (token, slot) positions by expert (``Route``; the one host sync of the
   call is its per-expert counts); order the union resident experts first; split it between device
   and host (the offloader's placement: ``moert.engine.hetero``);
2. policy: the call sites where the predictor's recall and the model's policy see the routing
   (``_policy_observe_routing``: ``policy.on_routed`` before the waves; ``_policy_observe_call``:
   ``policy.after_call`` after the compute; ``moert.policy.base`` has the contract), each plan
   applied by the offloader; a hook the policy does not override costs one attribute check;
3. waves: stream the device experts through the cache (``wave_bounds``): acquire a wave, prefetch
   the next one, wait per expert when the acquire was deferred, release;
4. compute: ``expert_forward`` of each expert's rows from its slot views into a ``(T*k, H)`` buffer
   grouped by expert, the host experts alike;
5. reduce: weight the products, scatter them to their ``(T, k, H)`` routing positions and sum over
   ``k`` in routing order (DESIGN §8), so the result never depends on which experts were resident or
   in which wave they arrived.

A union that fits the cache is one wave (every decode step at batch 1). A larger union (prefill of a
long prompt, a big batch, a small cache) streams through the cache. With ``overlap_waves`` and an
offloader that can prefetch (the runtime), the waves hold at most half the slots and wave ``i+1`` is
prefetched (low priority, never evicting pinned slots) right after wave ``i`` is acquired, so its
copies run while wave ``i`` computes; the next acquire finds it resident or still loading (a
prefetch hit, late or not). Without overlap (or with the ``reference`` / ``naive`` stores, which have
no prefetch path) the waves hold all slots and each waits for its own copies.
"""

from __future__ import annotations

from itertools import accumulate
from typing import TYPE_CHECKING

import numpy as np
import torch

from moert.engine.layout import GateFn, expert_forward, gate_of

if TYPE_CHECKING:
    from torch import nn

    from moert.engine.offloader import OffloaderBase

__all__ = ["Route", "OffloadedLayer", "wave_bounds", "moert_experts_forward"]


class Route:
    """One layer call's routing grouped by expert.

    Attributes:
        order: (T*k,) int64 flat (token, slot) positions grouped by expert, routing order within each.
        rows: (T*k,) int64 the token of each position in ``order``.
        counts: (E,) selections per expert (Python ints: the call's one host sync).
        starts: (E+1,) expert ``e`` owns ``order[starts[e] : starts[e + 1]]``.
        union: the experts selected at least once, ascending.

    Raises:
        ValueError: an expert id outside the layer's ``num_experts``.
    """

    def __init__(self, top_k_index: torch.Tensor, num_experts: int, layer: int) -> None:
        flat = top_k_index.reshape(-1)  # [T*k]
        k = top_k_index.shape[-1]
        self.order = torch.argsort(flat, stable=True)  # [T*k]
        self.rows = self.order // k  # [T*k]
        self.counts = torch.bincount(flat, minlength=num_experts).tolist()  # the host sync
        if len(self.counts) > num_experts:
            raise ValueError(
                f"routing selected expert {len(self.counts) - 1} but layer {layer} has {num_experts} experts"
            )
        self.starts = [0, *accumulate(self.counts)]
        self.union = [e for e, c in enumerate(self.counts) if c]

    def span(self, expert: int) -> tuple[int, int]:
        """``(start, end)`` of ``expert``'s positions in ``order``."""
        return self.starts[expert], self.starts[expert + 1]


class OffloadedLayer:
    """The offloaded experts of one MoE layer (attached to the experts module as ``_moert``).

    Args:
        offloader: the model's offloader (``moert.engine.offloader``) or a reference store.
        ordinal: this layer's index in the pool (its cache layer).
    """

    def __init__(self, offloader: OffloaderBase, ordinal: int) -> None:
        self.offloader = offloader
        self.ordinal = ordinal

    def forward(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted sum of the selected experts, as the model computes it.

        Args:
            module: the experts module (for ``act_fn`` / ``_apply_gate``).
            hidden_states: (T, H) rows entering the experts.
            top_k_index: (T, k) int selected experts, routing order.
            top_k_weights: (T, k) routing weights (fp32 or the model dtype).

        Returns:
            (T, H) in ``hidden_states.dtype``.
        """
        off, ordinal = self.offloader, self.ordinal
        self._check_device(hidden_states)
        num_tokens, hidden = hidden_states.shape
        k = top_k_index.shape[-1]
        if top_k_index.numel() == 0:
            return torch.zeros_like(hidden_states)
        # 1. route
        route = Route(top_k_index, off.num_experts, off.layer_ids[ordinal])
        off.counters.calls[ordinal] += 1
        resident = off.resident(ordinal)
        union = self._resident_first(route.union, resident)
        union, host_work = off.placement.place(off, ordinal, union, route, hidden_states)
        # 2. policy
        self._policy_observe_routing(top_k_index, route.counts, resident)
        # 3-4. waves and compute: products grouped by expert, in the weights' dtype
        gate_fn = gate_of(module)
        ys = torch.empty(
            num_tokens * k, hidden, dtype=off.layout.dtype, device=hidden_states.device
        )  # [T*k, H]
        self._waves(union, route, hidden_states, ys, gate_fn)
        host_work.finish(ys, gate_fn)
        self._policy_observe_call(route.counts)
        # 5. reduce: weighted products at their (token, slot) positions, summed over k in routing order
        weights = top_k_weights.reshape(-1)[route.order].unsqueeze(-1)  # [T*k, 1] grouped by expert
        out_dtype = torch.promote_types(hidden_states.dtype, top_k_weights.dtype)
        buf = torch.empty(num_tokens * k, hidden, dtype=out_dtype, device=hidden_states.device)  # [T*k, H]
        buf[route.order] = ys * weights
        return buf.view(num_tokens, k, hidden).sum(dim=1).to(hidden_states.dtype)  # [T, k, H] -> [T, H]

    def _check_device(self, hidden_states: torch.Tensor) -> None:
        off = self.offloader
        if hidden_states.device != off.tensor_device:
            raise RuntimeError(
                f"layer {off.layer_ids[self.ordinal]}: activations are on {hidden_states.device} but the expert "
                f"cache is on {off.device}; the model was moved after moert.patch: undo(), move, patch again"
            )

    @staticmethod
    def _resident_first(union: list[int], resident: set[int]) -> list[int]:
        """``union`` (ascending) with the ``resident`` experts first: later waves may evict them
        otherwise. Numerics do not depend on the order."""
        return [e for e in union if e in resident] + [e for e in union if e not in resident]

    def _policy_observe_routing(
        self, top_k_index: torch.Tensor, counts: list[int], resident: set[int]
    ) -> None:
        """Policy hooks, before the waves: the predictor scores its prediction of this layer; the
        policy's ``on_routed(l, counts (E,), resident (E,) bool)``, resident before the call."""
        off = self.offloader
        if off.prefetcher is not None:
            off.prefetcher.observe(self.ordinal, top_k_index)
        if off.policy_routed:
            mask = np.zeros(off.num_experts, dtype=bool)  # [E]
            mask[list(resident)] = True
            plan = off.policy.on_routed(self.ordinal, np.asarray(counts), mask)
            if plan is not None:
                off.apply(plan)

    def _policy_observe_call(self, counts: list[int]) -> None:
        """Policy hook, after the compute: ``after_call(l, counts (E,))``, e.g. priorities and
        prefetches for the layer's next call."""
        off = self.offloader
        if off.policy_after:
            plan = off.policy.after_call(self.ordinal, np.asarray(counts))
            if plan is not None:
                off.apply(plan)

    def _waves(
        self, union: list[int], route: Route, hidden_states: torch.Tensor, ys: torch.Tensor, gate_fn: GateFn
    ) -> None:
        """Streams ``union`` through the cache and writes each expert's products into ``ys`` at its span."""
        off, ordinal = self.offloader, self.ordinal
        overlap = off.overlap_waves and off.can_prefetch
        bounds = wave_bounds(len(union), off.num_slots, overlap)
        for i, (w0, w1) in enumerate(bounds):
            wave = union[w0:w1]
            if off.deferred_waits:
                views, pending = off.acquire_deferred(ordinal, wave)
            else:
                views, pending = off.acquire(ordinal, wave), None
            try:
                if overlap and i + 1 < len(bounds):
                    # after this wave is pinned (a prefetch never evicts it), before it computes
                    n0, n1 = bounds[i + 1]
                    off.counters.wave_prefetches[ordinal] += off.prefetch(ordinal, union[n0:n1])
                for j, (e, (gate_up, down)) in enumerate(zip(wave, views)):
                    if pending is not None and pending[j]:  # its copy may still run; the ones before computed
                        off.wait(ordinal, e)
                    s, t = route.span(e)
                    ys[s:t] = expert_forward(hidden_states[route.rows[s:t]], gate_up, down, gate_fn)  # [n, H]
            finally:
                off.release(ordinal, wave)


def wave_bounds(union: int, num_slots: int, overlap: bool) -> list[tuple[int, int]]:
    """How a layer's union of ``union`` experts streams through a cache of ``num_slots`` slots.

    Args:
        union: distinct experts the layer needs (resident ones first).
        num_slots: cache slots.
        overlap: whether wave ``i+1`` is prefetched while wave ``i`` computes.

    Returns:
        ``[(start, end), ...]`` half-open ranges into the union, in order. A union that fits the cache is
        one wave. Otherwise, without overlap, waves of ``num_slots``; with overlap, waves of
        ``num_slots // 2`` (the pinned current wave plus the prefetched next one fit the cache), the
        last one shorter. Full front waves put the resident experts (at most ``num_slots``; all but
        one when it is odd) in the first two waves, which the first prefetch cannot evict (wave 0 is
        pinned, wave 1 is the prefetch's own); a short last wave shortens the one compute that nothing
        overlaps. With one slot there is nothing to overlap.
    """
    if union <= 0:
        return []
    if num_slots < 1:
        raise ValueError(f"num_slots={num_slots} must be >= 1")
    wave = num_slots
    if overlap and union > num_slots and num_slots >= 2:
        wave = num_slots // 2
    return [(w0, min(w0 + wave, union)) for w0 in range(0, union, wave)]


def moert_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The "moert" entry of transformers' ``ExpertsInterface``.

    Args:
        self: the experts module (patched by ``moert.patch``).
        hidden_states: (T, H).
        top_k_index: (T, k).
        top_k_weights: (T, k).
    """
    layer = self.__dict__.get("_moert")
    if layer is None:
        raise RuntimeError(
            f"{type(self).__name__} runs with experts_implementation='moert' but was not patched by moert. "
            "Models that share one config object cannot be patched separately: give each its own config "
            "(copy.deepcopy(config)) or call model.set_experts_implementation('grouped_mm')"
        )
    return layer.forward(self, hidden_states, top_k_index, top_k_weights)
