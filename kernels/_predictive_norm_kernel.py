"""The Triton kernel behind ``moert.kernels.predictive_norm`` (imported lazily by its launcher).

Kept apart from the launcher so that importing ``moert.kernels.predictive_norm`` (and with it
``PredictiveNorm`` on CPU) never imports Triton. ``TRITON_INTERPRET=1`` must be set before this
module is first imported: Triton decides between compiling and interpreting when a function is
decorated, and ``INTERPRET`` records which one this import got.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

from ._prefetch_plan_kernel import _plan

__all__ = ["INTERPRET", "predictive_norm_kernel"]

INTERPRET: bool = bool(knobs.runtime.interpret)


@triton.jit
def _add(a, b):
    return a + b


# Only Triton builtins are called below (tl.full, not tl.zeros; tl.reduce, not tl.sum; sigmoid
# spelled out): the helpers in triton.language.standard are decorated when Triton is imported, so
# they cannot be interpreted when Triton was imported before TRITON_INTERPRET=1 was set (as a test
# process that imported transformers has). The interpreter reduces with np.sum only for Triton's own
# add combiner (a private name; any other combiner is reduced element by element: right, but slow);
# on the GPU every add combiner compiles to the same reduction.
_ADD = getattr(tl.standard, "_sum_combine", _add)


@triton.jit
def _round(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> ``dtype``, round to nearest even, as the GPU (and PyTorch) rounds.

    The interpreter truncates fp32 -> bf16, so there the rounding is done on the bits.
    """
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _normed_tile(
    x_ptr,
    nw_ptr,
    nb_ptr,
    rows,
    row_mask,
    k0,
    H,
    mean,
    rstd,
    NORM: tl.constexpr,
    HAS_NB: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Normed rows ``[rows, k0:k0+BLOCK_K]`` in x's dtype, zero outside the masks.

    Both the stored output and the predictor's input come from this one function, so the
    predictor sees exactly the rows attention gets.
    """
    cols = k0 + tl.arange(0, BLOCK_K)
    col_mask = cols < H
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * H + cols[None, :], mask=mask, other=0.0)
    w = tl.load(nw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    xf = x.to(tl.float32)
    if NORM == 0:
        # HF RMSNorm: normalise in fp32, cast back to the input dtype, then scale by the weight.
        y = _round(xf * rstd[:, None], x.dtype, INTERPRET).to(tl.float32) * w[None, :]
    else:
        y = (xf - mean[:, None]) * rstd[:, None] * w[None, :]
        if HAS_NB:
            y += tl.load(nb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return _round(tl.where(mask, y, 0.0), x.dtype, INTERPRET)


@triton.jit
def predictive_norm_kernel(
    x_ptr,  # (T, H)
    nw_ptr,  # (H,)
    nb_ptr,  # (H,) or dummy
    w1_ptr,  # (D, H)
    b1_ptr,  # (D,) or dummy
    w2_ptr,  # (EO, D)
    b2_ptr,  # (EO,) or dummy
    y_ptr,  # (T, H) normed rows, x's dtype
    logits_ptr,  # (T, EO) fp32; zeroed beforehand when ATOMIC
    ids_ptr,  # PLAN: (n, width) int32
    scores_ptr,  # PLAN: (n, E) fp32
    counter_ptr,  # PLAN: int32, zero: programs that finished their logits
    T,
    H,
    D,
    EO,
    h_float,  # float(H): H itself may be specialised to a constexpr
    eps,
    d_per_split,  # D columns per program along axis 1, a multiple of BLOCK_D
    n_plan,  # PLAN: predicted layers n (EO = n * E)
    width,  # PLAN: see moert.kernels.prefetch_plan.PlanSpec
    top_k,
    threshold,
    score_decay,
    NORM: tl.constexpr,
    ACT: tl.constexpr,
    HAS_NB: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    ATOMIC: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PLAN: tl.constexpr,
    PROB: tl.constexpr,
    ADAPTIVE: tl.constexpr,
):
    """One program: BLOCK_T rows x one slice of the predictor's hidden width D.

    1. Row statistics over H (fp32; LayerNorm centres before squaring).
    2. Program (., 0) writes the normed rows.
    3. For each BLOCK_D chunk of its D slice: hidden = act(normed @ w1[chunk].T + b1[chunk]),
       then logits += hidden @ w2[:, chunk].T. Slices are summed by fp32 atomics when D is
       split over several programs (ATOMIC), else stored directly.
    4. PLAN: the last program to finish step 3 (counted by an atomic on ``counter_ptr``) reads
       every row's logits back and writes the prefetch plan (``_prefetch_plan_kernel._plan``).
    """
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    ks = tl.arange(0, BLOCK_K)

    # -- 1. statistics ------------------------------------------------------------------------
    acc = tl.full((BLOCK_T,), 0.0, tl.float32)
    for k0 in range(0, H, BLOCK_K):
        cols = k0 + ks
        mask = row_mask[:, None] & (cols < H)[None, :]
        x = tl.load(x_ptr + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if NORM == 0:
            acc += tl.reduce(x * x, 1, _ADD)
        else:
            acc += tl.reduce(x, 1, _ADD)
    if NORM == 0:
        mean = tl.full((BLOCK_T,), 0.0, tl.float32)
        var = tl.math.div_rn(acc, h_float)
    else:
        mean = tl.math.div_rn(acc, h_float)
        acc = tl.full((BLOCK_T,), 0.0, tl.float32)
        for k0 in range(0, H, BLOCK_K):
            cols = k0 + ks
            mask = row_mask[:, None] & (cols < H)[None, :]
            x = tl.load(x_ptr + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean[:, None], 0.0)
            acc += tl.reduce(xc * xc, 1, _ADD)
        var = tl.math.div_rn(acc, h_float)
    rstd = tl.math.div_rn(tl.full((BLOCK_T,), 1.0, tl.float32), tl.math.sqrt_rn(var + eps))

    # -- 2. normed rows for attention ---------------------------------------------------------
    if pid_s == 0:
        for k0 in range(0, H, BLOCK_K):
            y = _normed_tile(
                x_ptr, nw_ptr, nb_ptr, rows, row_mask, k0, H, mean, rstd, NORM, HAS_NB, INTERPRET, BLOCK_K
            )
            cols = k0 + ks
            mask = row_mask[:, None] & (cols < H)[None, :]
            tl.store(y_ptr + rows[:, None] * H + cols[None, :], y, mask=mask)

    # -- 3. predictor on the same rows --------------------------------------------------------
    es = tl.arange(0, BLOCK_E)
    e_mask = es < EO
    logits = tl.full((BLOCK_T, BLOCK_E), 0.0, tl.float32)
    d_start = pid_s * d_per_split
    d_end = tl.minimum(d_start + d_per_split, D)
    for d0 in range(d_start, d_end, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        hidden = tl.full((BLOCK_T, BLOCK_D), 0.0, tl.float32)  # [BLOCK_T, BLOCK_D]
        for k0 in range(0, H, BLOCK_K):
            a = _normed_tile(
                x_ptr, nw_ptr, nb_ptr, rows, row_mask, k0, H, mean, rstd, NORM, HAS_NB, INTERPRET, BLOCK_K
            )
            cols = k0 + ks
            w1 = tl.load(
                w1_ptr + ds[:, None] * H + cols[None, :],
                mask=d_mask[:, None] & (cols < H)[None, :],
                other=0.0,
            )  # [BLOCK_D, BLOCK_K]
            if INTERPRET:
                a = a.to(tl.float32)
                w1 = w1.to(tl.float32)
            hidden = tl.dot(a, tl.trans(w1), hidden, input_precision=DOT_PRECISION)
        if HAS_B1:
            hidden += tl.load(b1_ptr + ds, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        if ACT == 0:
            hidden = hidden / (1.0 + tl.exp(-hidden))
        else:
            hidden = 0.5 * hidden * (1.0 + tl.erf(hidden * 0.7071067811865476))
        w2 = tl.load(
            w2_ptr + es[:, None] * D + ds[None, :], mask=e_mask[:, None] & d_mask[None, :], other=0.0
        )  # [BLOCK_E, BLOCK_D]
        # The hidden row is rounded to the weights' dtype, as the eager predictor would store it.
        h = _round(hidden, w2.dtype, INTERPRET)
        if INTERPRET:
            h = h.to(tl.float32)
            w2 = w2.to(tl.float32)
        logits = tl.dot(h, tl.trans(w2), logits, input_precision=DOT_PRECISION)
    if HAS_B2:
        # Only the first D slice adds the bias.
        b2 = tl.load(b2_ptr + es, mask=e_mask, other=0.0).to(tl.float32)
        logits += tl.where(pid_s == 0, b2, 0.0)[None, :]
    out = logits_ptr + rows[:, None] * EO + es[None, :]
    out_mask = row_mask[:, None] & e_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out, logits, mask=out_mask, sem="relaxed")
    else:
        tl.store(out, logits, mask=out_mask)

    # -- 4. prefetch plan by the last program ---------------------------------------------------
    if PLAN:
        # Every thread's logits are written before the count is released (acq_rel at GPU scope);
        # the program that takes the last count then sees every program's logits.
        tl.debug_barrier()
        done = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
        if done == tl.num_programs(0) * tl.num_programs(1) - 1:
            _plan(
                logits_ptr,
                ids_ptr,
                scores_ptr,
                T,
                n_plan,
                EO // n_plan,
                width,
                top_k,
                threshold,
                score_decay,
                PROB,
                ADAPTIVE,
                BLOCK_T,
                BLOCK_E,
            )
