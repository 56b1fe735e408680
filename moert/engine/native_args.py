"""How torch / numpy values cross into the native runtime (``moert.engine.runtime``): expert ids and
int arrays narrowed without silent casts, and tensors that alias native memory (host: ``torch.frombuffer``;
CUDA: ``__cuda_array_interface__``) while keeping its owner alive, so a view never dangles."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "Experts",
    "count",
    "expert_ids",
    "int64_list",
    "int32_array",
    "host_view",
    "CudaArray",
    "view_bytes",
]

Experts = int | Sequence[int] | np.ndarray | torch.Tensor

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def expert_ids(experts: Experts, name: str = "experts") -> np.ndarray:
    """Any 1-D integer collection (or one int) -> (n,) int64 numpy, without silent casts."""
    if isinstance(experts, torch.Tensor):
        if experts.is_floating_point() or experts.is_complex() or experts.dtype == torch.bool:
            raise ValueError(f"{name} must be integers, got a {experts.dtype} tensor")
        arr = experts.detach().to("cpu", torch.int64).reshape(-1).numpy()
    elif isinstance(experts, (int, np.integer)) and not isinstance(experts, bool):
        if not _INT64_MIN <= int(experts) <= _INT64_MAX:
            raise ValueError(f"{name}: expert id {int(experts)} is out of range (ids are 0 .. E-1)")
        arr = np.array([int(experts)], dtype=np.int64)
    else:
        arr = np.asarray(experts)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.dtype.kind not in "iu":
            # ints past int64 make an object array: name the value rather than its dtype
            big = [v for v in arr.reshape(-1).tolist() if isinstance(v, int) and not isinstance(v, bool)]
            if arr.dtype.kind == "O" and len(big) == arr.size:
                raise ValueError(f"{name}: expert id {max(big, key=abs)} is out of range (ids are 0 .. E-1)")
            raise ValueError(f"{name} must be integers, got {arr.dtype} values: {experts!r}"[:200])
        if arr.dtype.kind == "u" and arr.max() > _INT64_MAX:  # would wrap to a negative id
            raise ValueError(f"{name}: expert id {int(arr.max())} is out of range (ids are 0 .. E-1)")
        arr = arr.astype(np.int64).reshape(-1)
    return np.ascontiguousarray(arr)


def count(value: Any, name: str) -> int:
    """An integer argument (a count or size) as int, without silently truncating 1.5 or parsing "3"."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r} must be an integer")
    return int(value)


def int64_list(values: Sequence[int]) -> np.ndarray:
    return np.asarray([int(v) for v in values], dtype=np.int64).reshape(-1)


def int32_array(x: Any, name: str, ndim: int) -> np.ndarray:
    """A (N,) or (N, k) integer array/tensor -> contiguous int32 numpy (range-checked)."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(arr.shape)}")
    if arr.dtype != np.int32:
        if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{name} has values outside int32: min {arr.min()}, max {arr.max()}")
        arr = arr.astype(np.int32)
    return np.ascontiguousarray(arr)


def host_view(
    address: int, nbytes: int, owner: Any, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """A CPU tensor aliasing ``nbytes`` at ``address``; keeps ``owner`` alive."""
    buf = (ctypes.c_uint8 * nbytes).from_address(address)
    buf._moert_owner = owner  # the tensor holds buf, buf holds the native object
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


class CudaArray:
    """The minimal ``__cuda_array_interface__`` (v3) of slot bytes; holds the owner."""

    def __init__(self, address: int, nbytes: int, owner: Any) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "strides": None,
            "version": 3,
        }
        self._owner = owner


def view_bytes(dtype: torch.dtype, shape: tuple[int, ...], offset: int, limit: int, what: str) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"{what}: negative dimension in shape {shape}")
    nbytes = itemsize * int(np.prod(shape, dtype=np.int64))
    if offset < 0 or offset % itemsize:
        raise ValueError(f"{what}: offset {offset} must be >= 0 and a multiple of {itemsize} ({dtype})")
    if offset + nbytes > limit:
        raise ValueError(
            f"{what}: offset {offset} + {nbytes} bytes of {dtype}{list(shape)} runs past the {limit}-byte slab"
        )
    return nbytes
