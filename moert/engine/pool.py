"""The expert pool: every expert of every MoE layer in one page-aligned host allocation
(:class:`ExpertPool`, over the native ``moert._C.ExpertPool``)."""

from __future__ import annotations

import numpy as np
import torch

from moert.engine.devices import backends, native_module
from moert.engine.native_args import (
    count,
    host_view,
    view_bytes,
)

__all__ = ["ExpertPool"]


class ExpertPool:
    """Every expert of every MoE layer in one page-aligned host allocation.

    Entry (layer, expert) is ``slab_bytes`` long at a fixed ``stride`` (``slab_bytes`` rounded up
    to 256). The caller lays out one expert's bytes contiguously (gate_up, then down).

    Args:
        num_layers: MoE layers L.
        num_experts: routed experts per layer E.
        slab_bytes: bytes of one expert; > 0 and a multiple of 16.
        pin: page-lock with ``cuMemHostRegister``. None: pin when a CUDA device can run.
    """

    def __init__(
        self, num_layers: int, num_experts: int, slab_bytes: int, *, pin: bool | None = None
    ) -> None:
        if pin is None:
            pin = backends()["cuda"]["can_run"]
        self._c = native_module().ExpertPool(
            count(num_layers, "num_layers"),
            count(num_experts, "num_experts"),
            count(slab_bytes, "slab_bytes"),
            bool(pin),
        )

    num_layers = property(lambda self: self._c.num_layers)
    num_experts = property(lambda self: self._c.num_experts)
    slab_bytes = property(lambda self: self._c.slab_bytes)
    stride = property(lambda self: self._c.stride)
    nbytes = property(lambda self: self._c.nbytes)
    pinned = property(lambda self: self._c.pinned)
    closed = property(lambda self: self._c.closed)

    def address(self, layer: int, expert: int) -> int:
        """Host address of entry (layer, expert)."""
        return self._c.address(int(layer), int(expert))

    def fill(self, layer: int, expert: int, src: torch.Tensor | np.ndarray, offset: int = 0) -> None:
        """Copies the bytes of a contiguous CPU tensor (any dtype/shape) into the entry at ``offset``."""
        if isinstance(src, np.ndarray):
            src = torch.from_numpy(np.ascontiguousarray(src))
        if not isinstance(src, torch.Tensor):
            raise ValueError(f"fill: src must be a torch.Tensor or numpy array, got {type(src).__name__}")
        if src.device.type != "cpu":
            raise ValueError(f"fill: src must be on the CPU, got {src.device}; use .cpu() first")
        if not src.is_contiguous():
            raise ValueError("fill: src must be contiguous; use .contiguous() first")
        nbytes = src.numel() * src.element_size()
        if nbytes == 0:
            self._c.address(int(layer), int(expert))  # still validates the entry
            return
        self._c.fill(int(layer), int(expert), src.data_ptr(), nbytes, int(offset))

    def view(
        self, layer: int, expert: int, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0
    ) -> torch.Tensor:
        """A CPU tensor ``dtype[shape]`` aliasing the entry's bytes from ``offset``."""
        address = self._c.address(int(layer), int(expert))
        nbytes = view_bytes(dtype, tuple(shape), int(offset), self.slab_bytes, "ExpertPool.view")
        return host_view(address + int(offset), nbytes, self._c, dtype, tuple(shape))

    def layer_view(
        self, layer: int, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0
    ) -> torch.Tensor:
        """A CPU tensor ``dtype[E, *shape]`` aliasing every entry of ``layer`` from ``offset``: row
        ``e`` is ``view(layer, e, dtype, shape, offset)`` (experts ``stride`` bytes apart; no copy).

        Raises:
            ValueError: ``stride`` or ``offset`` is not a multiple of the dtype's size, or the shape
                does not fit an entry.
        """
        shape = tuple(int(d) for d in shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= int(layer) < self.num_layers:
            raise ValueError(f"ExpertPool.layer_view: layer={layer} is out of range 0..{self.num_layers - 1}")
        if self.stride % itemsize:
            raise ValueError(
                f"ExpertPool.layer_view: stride {self.stride} is not a multiple of {dtype}'s size"
            )
        nbytes = view_bytes(dtype, shape, int(offset), self.slab_bytes, "ExpertPool.layer_view")
        span = (self.num_experts - 1) * self.stride + nbytes  # first row's start to last row's end
        flat = host_view(
            self._c.address(int(layer), 0) + int(offset), span, self._c, dtype, (span // itemsize,)
        )
        inner = torch.empty(shape, device="meta").stride()  # row-major strides of one expert
        return flat.as_strided((self.num_experts, *shape), (self.stride // itemsize, *inner))

    def close(self) -> None:
        """Later calls raise; memory is returned once no cache or view refers to it."""
        self._c.close()

    def __repr__(self) -> str:
        return (
            f"ExpertPool(layers={self.num_layers}, experts={self.num_experts}, slab_bytes={self.slab_bytes}, "
            f"stride={self.stride}, nbytes={self.nbytes}, pinned={self.pinned})"
        )
