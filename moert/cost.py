"""The split of a layer's demand misses between the host CPU and the copy engine (DESIGN §7).

:func:`cpu_split` is used by the simulator's cost model (``moert simulate --cpu-expert-ms``) and by
the runtime's heterogeneous mode (``OffloadConfig.cpu_experts``), so both decide the same way; it
sits here, outside both :mod:`moert.engine` and :mod:`moert.sim`, so that neither imports the other
for it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cpu_split"]


def cpu_split(
    n: np.ndarray | int, cpu_s: float, copy_s: float, activation_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """The split of one step's ``n`` demand misses between the CPU and the copy engine.

    Minimises ``T(c) = max(c * cpu_s + activation_s, (n - c) * copy_s)`` over ``1 <= c <= n`` and
    ``T(0) = n * copy_s``. On ``c >= 1`` the first term rises and the second falls, so the best
    integer sits next to where they cross, ``c* = (n * copy_s - activation_s) / (cpu_s + copy_s)``;
    the integers around it (and 0) are compared, ties going to the fewest CPU experts.

    Args:
        n: () or (S,) int demand misses of each step, >= 0.
        cpu_s: seconds of one expert on the CPU, > 0.
        copy_s: seconds of one expert's copy, > 0.
        activation_s: seconds of the activation round trip, >= 0 (paid once per step that uses the CPU).

    Returns:
        ``(c, seconds)``: (S,) int64 experts computed on the CPU and (S,) float64 step stall.
    """
    n = np.atleast_1d(np.asarray(n, dtype=np.int64))
    if cpu_s <= 0 or copy_s <= 0 or activation_s < 0 or (n < 0).any():
        raise ValueError(
            f"cpu_split: cpu_s={cpu_s}, copy_s={copy_s} must be > 0, activation_s={activation_s} >= 0 and "
            f"n >= 0 (min {n.min() if n.size else 0})"
        )
    cross = np.floor((n * copy_s - activation_s) / (cpu_s + copy_s)).astype(np.int64)  # [S]
    best_c = np.zeros_like(n)
    best_t = n * copy_s
    for d in (-1, 0, 1, 2):  # floor(c*) +- rounding; the argmin is floor(c*) or floor(c*) + 1
        c = np.clip(cross + d, 1, np.maximum(n, 1))
        t = np.maximum(c * cpu_s + activation_s, (n - c) * copy_s)
        better = (n > 0) & ((t < best_t) | ((t == best_t) & (c < best_c)))
        best_c = np.where(better, c, best_c)
        best_t = np.where(better, t, best_t)
    return best_c, best_t.astype(np.float64)
