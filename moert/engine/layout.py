"""One routed expert: its bytes in a slab and its math.

Expert ``(l, e)`` lives in pool entry ``(l, e)`` as one slab, ``gate_up [2I, H]`` then ``down [H, I]``
(offset aligned to 16 bytes), so one copy moves one expert. Every path that computes an expert (a
device slot, a host pool view in heterogeneous mode) calls ``expert_forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ExpertLayout", "expert_forward", "gate_of"]

_ALIGN = 16


def _round_up(n: int, m: int = _ALIGN) -> int:
    return (n + m - 1) // m * m


@dataclass(frozen=True)
class ExpertLayout:
    """Byte layout of one expert's slab.

    Attributes:
        hidden: H.
        intermediate: I (per-expert intermediate size).
        dtype: weight dtype.
    """

    hidden: int
    intermediate: int
    dtype: torch.dtype

    @property
    def gate_up_shape(self) -> tuple[int, int]:
        return (2 * self.intermediate, self.hidden)

    @property
    def down_shape(self) -> tuple[int, int]:
        return (self.hidden, self.intermediate)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def down_offset(self) -> int:
        return _round_up(2 * self.intermediate * self.hidden * self.itemsize)

    @property
    def expert_bytes(self) -> int:
        """Bytes of weights of one expert (gate_up + down, no padding)."""
        return 3 * self.intermediate * self.hidden * self.itemsize

    @property
    def slab_bytes(self) -> int:
        return _round_up(self.down_offset + self.hidden * self.intermediate * self.itemsize)

    def views(self, get_view: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up (2I, H), down (H, I))`` through ``get_view(dtype, shape, offset)``."""
        return (
            get_view(self.dtype, self.gate_up_shape, 0),
            get_view(self.dtype, self.down_shape, self.down_offset),
        )


GateFn = Callable[[torch.Tensor], torch.Tensor]


def expert_forward(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, gate_fn: GateFn
) -> torch.Tensor:
    """One expert on its rows: ``down(gate_fn(gate_up(x)))``.

    Args:
        x: (n, H) rows routed to the expert (any float dtype; cast to the weights').
        gate_up: (2I, H) fused gate and up projections.
        down: (H, I) down projection.
        gate_fn: (n, 2I) -> (n, I), the experts module's gate (``act(gate) * up``).

    Returns:
        (n, H) in the weights' dtype.
    """
    h = F.linear(x.to(gate_up.dtype), gate_up)  # [n, 2I]
    return F.linear(gate_fn(h), down)  # [n, I] -> [n, H]


def gate_of(module: nn.Module) -> GateFn:
    """The experts module's gate: its ``_apply_gate`` when it has one, else ``act_fn(gate) * up``."""
    apply_gate = getattr(module, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate

    def gate(h: torch.Tensor) -> torch.Tensor:
        g, up = h.chunk(2, dim=-1)  # [n, I] each
        return module.act_fn(g) * up

    return gate
