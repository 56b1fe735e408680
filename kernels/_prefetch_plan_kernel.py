"""Triton side of ``moert.kernels.prefetch_plan`` (imported lazily by its launchers).

``_plan`` is the program that turns a batch's logits into a prefetch plan; it runs on its own
(``prefetch_plan_kernel``, one program) or as the epilogue of the fused predictive-norm kernel.
As there, only Triton builtins and combiners defined here are used, so the module can be
interpreted (``TRITON_INTERPRET=1``, set before its first import) even when Triton itself was
imported earlier in normal mode.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["prefetch_plan_kernel"]


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _argmax_combine(v1, i1, v2, i2):
    # the larger value; on ties the lower index (deterministic, whatever the reduction order)
    first = (v1 > v2) | ((v1 == v2) & (i1 < i2))
    return tl.where(first, v1, v2), tl.where(first, i1, i2)


@triton.jit
def _plan(
    logits_ptr,  # (T, n, E) fp32
    ids_ptr,  # (n, width) int32
    scores_ptr,  # (n, E) fp32
    T,
    n,
    E,
    width,
    top_k,
    threshold,
    score_decay,
    PROB: tl.constexpr,  # 0 sigmoid, 1 clamp
    ADAPTIVE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """The whole plan in one program: for each predicted layer, the max logit over rows, then
    ``width`` rounds of argmax (select, write, mask out). Logits are read through L2 (``.cg``):
    in the fused kernel other programs wrote them moments ago."""
    es = tl.arange(0, BLOCK_E)
    e_mask = es < E
    weight = 1.0
    for j in range(0, n):
        agg = tl.full((BLOCK_E,), float("-inf"), tl.float32)
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            mask = (rows < T)[:, None] & e_mask[None, :]
            x = tl.load(
                logits_ptr + rows[:, None] * (n * E) + j * E + es[None, :],
                mask=mask,
                other=float("-inf"),
                cache_modifier=".cg",
            )
            agg = tl.maximum(agg, tl.reduce(x, 0, _max_combine))
        score = tl.full((BLOCK_E,), 0.0, tl.float32)
        for w in range(0, width):
            best, idx = tl.reduce((agg, es), 0, _argmax_combine)
            if PROB == 0:
                p = 1.0 / (1.0 + tl.exp(-best))
            else:
                p = tl.minimum(tl.maximum(best, 0.0), 1.0)
            keep = True
            if ADAPTIVE:
                keep = (w < top_k) | (p > threshold)
            tl.store(ids_ptr + j * width + w, tl.where(keep, idx, -1))
            score = tl.where((es == idx) & keep, p * weight, score)
            agg = tl.where(es == idx, float("-inf"), agg)
        tl.store(scores_ptr + j * E + es, score, mask=e_mask)
        weight = weight * score_decay


@triton.jit
def prefetch_plan_kernel(
    logits_ptr,
    ids_ptr,
    scores_ptr,
    T,
    n,
    E,
    width,
    top_k,
    threshold,
    score_decay,
    PROB: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    _plan(
        logits_ptr,
        ids_ptr,
        scores_ptr,
        T,
        n,
        E,
        width,
        top_k,
        threshold,
        score_decay,
        PROB,
        ADAPTIVE,
        BLOCK_T,
        BLOCK_E,
    )
