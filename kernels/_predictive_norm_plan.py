"""Launch parameters of the predictive-norm kernel: block sizes, D split and grid (no Triton import).

Split from ``predictive_norm.py`` so that the launcher and the ahead-of-time compile test
(``tests/kernels/test_predictive_norm_compile.py``) use the very same plan.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .predictive_norm_reference import ACTIVATIONS, NORM_KINDS
from .prefetch_plan import PlanSpec, plan_constexprs, plan_scalars

__all__ = ["PredictiveNormConfig", "LaunchPlan", "plan_launch"]


@dataclasses.dataclass(frozen=True)
class PredictiveNormConfig:
    """Launch parameters; ``None`` fields are picked by the launcher from the shapes and device.

    Attributes:
        block_t: rows per program (power of two, >= 16 so every ``tl.dot`` has M >= 16).
        block_k: H columns per step (power of two, >= 16: K >= 16 for 16-bit dots).
        block_d: hidden columns per step (power of two, >= 16).
        d_splits: programs along D per row block (>= 1); > 1 sums logits with atomics.
        num_warps: warps per program.
    """

    block_t: int | None = None
    block_k: int | None = None
    block_d: int | None = None
    d_splits: int | None = None
    num_warps: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_t", "block_k", "block_d"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value & (value - 1)):
                raise ValueError(f"PredictiveNormConfig.{name}={value} must be a power of two >= 16")
        if self.d_splits is not None and self.d_splits < 1:
            raise ValueError(f"PredictiveNormConfig.d_splits={self.d_splits} must be >= 1")
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"PredictiveNormConfig.num_warps={self.num_warps} must be one of 1, 2, 4, 8, 16")


_NO_PLAN = PlanSpec(width=1, top_k=1)  # fills the unread plan arguments when there is no plan


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Everything the launch needs besides the tensors: grid, scalar arguments, constexprs."""

    grid: tuple[int, int]
    scalars: dict[str, int | float]
    constexprs: dict[str, int | bool | str]
    num_warps: int

    @property
    def atomic(self) -> bool:
        return bool(self.constexprs["ATOMIC"])

    @property
    def options(self) -> dict[str, int | bool]:
        """Compile options. FMA contraction stays on, as in PyTorch's own CUDA norm kernels (nvcc's
        default), and is stated so that Triton 3.9 does not warn about its changing default."""
        return {"num_warps": self.num_warps, "enable_fp_fusion": True}


def plan_launch(
    config: PredictiveNormConfig,
    T: int,
    H: int,
    D: int,
    EO: int,
    eps: float,
    dtype: torch.dtype,
    device: torch.device,
    *,
    norm_kind: str,
    act: str,
    has_norm_bias: bool,
    has_b1: bool,
    has_b2: bool,
    interpret: bool,
    prefetch: PlanSpec | None = None,
    depth: int = 1,
) -> LaunchPlan:
    """Block sizes, D split and grid for these shapes; ``None`` config fields get first guesses.

    The guesses keep every tile in registers without spills when compiled for sm_80/sm_90 (checked
    by ``tests/kernels/test_predictive_norm_compile.py``); their speed is untuned (no GPU was at
    hand): ``bench/bench_predictive_norm.py --sweep`` times the alternatives.

    ``prefetch`` adds the prefetch-plan epilogue over ``depth`` predicted layers (EO = depth * E).
    """
    block_e = max(16, _next_pow2(EO))
    # Decode rows share every weight tile; the (rows x logits) fp32 accumulator is capped at 8K.
    block_t = config.block_t or min(64, max(16, _next_pow2(T)), max(16, 8192 // block_e))
    wide = 1 if dtype == torch.float32 else 2
    block_k = config.block_k or min((64 if block_t == 16 else 32) * wide, max(16, _next_pow2(H)))
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 0
    # At decode the bytes are w1's: split D finely enough that every SM pulls a slice.
    block_d = config.block_d or (16 if _cdiv(D, 32) < sms else min(32, max(16, _next_pow2(D))))
    if config.d_splits is not None:
        d_splits = config.d_splits
    elif sms:
        d_splits = _cdiv(2 * sms, _cdiv(T, block_t))
    else:
        d_splits = 1
    d_splits = min(d_splits, _cdiv(D, block_d))
    num_warps = config.num_warps or (4 if block_t * (block_k + block_e) <= 2048 else 8)
    d_per_split = _cdiv(_cdiv(D, block_d), d_splits) * block_d  # whole BLOCK_D chunks per program
    grid = (_cdiv(T, block_t), _cdiv(D, d_per_split))
    return LaunchPlan(
        grid=grid,
        scalars={
            "T": T,
            "H": H,
            "D": D,
            "EO": EO,
            "h_float": float(H),
            "eps": float(eps),
            "d_per_split": d_per_split,
            "n_plan": depth,
            **plan_scalars(prefetch or _NO_PLAN),
        },
        constexprs={
            "NORM": NORM_KINDS.index(norm_kind),
            "ACT": ACTIVATIONS.index(act),
            "HAS_NB": has_norm_bias,
            "HAS_B1": has_b1,
            "HAS_B2": has_b2,
            "ATOMIC": grid[1] > 1,
            # Interpreter workarounds: fp32 dot operands (its 16-bit dot is wrong), bf16 rounding by bits.
            "INTERPRET": interpret,
            "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "BLOCK_T": block_t,
            "BLOCK_K": block_k,
            "BLOCK_D": block_d,
            "BLOCK_E": block_e,
            "PLAN": prefetch is not None,
            **plan_constexprs(prefetch or _NO_PLAN),
        },
        num_warps=num_warps,
    )
