"""Pure-PyTorch reference of the fused pre-attention norm + expert predictor (never edited to match).

This is the obviously-correct twin of ``moert.kernels.predictive_norm``: the model's own norm
math, then the predictor MLP written with ``torch.nn.functional`` at the input dtype. The Triton
kernel is tested against it; ``PredictiveNorm`` runs its predictor half on CPU devices.
Importing this module imports only torch.

Norms:
  * ``"rms"``: HF ``DeepseekV2RMSNorm`` / ``Qwen3MoeRMSNorm``: statistics in fp32, the normalised
    row cast back to the input dtype, then multiplied by the weight.
  * ``"layernorm"``: ``nn.LayerNorm`` (Phi-mini-MoE), weight and optional bias.

Predictor: ``Linear(H, D) -> act -> Linear(D, d·E)`` with ``act`` ``"silu"`` (``linear2``) or
``"gelu"`` (exact erf GELU, ``mlp_bn`` with its BatchNorm folded by :func:`fold_batchnorm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NORM_KINDS",
    "ACTIVATIONS",
    "norm_reference",
    "predictor_reference",
    "predictive_norm_reference",
    "fold_batchnorm",
]

NORM_KINDS = ("rms", "layernorm")
ACTIVATIONS = ("silu", "gelu")


def norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, norm_kind: str
) -> torch.Tensor:
    """The model's pre-attention norm.

    Args:
        x: (T, H) rows, any float dtype.
        weight: (H,) norm weight.
        bias: (H,) LayerNorm bias, or None (always None for ``"rms"``).
        eps: the norm's epsilon.
        norm_kind: ``"rms"`` or ``"layernorm"``.

    Returns:
        (T, H) normed rows, dtype as the model's module returns it (x's dtype when weight matches).
    """
    if norm_kind == "rms":
        if bias is not None:
            raise ValueError("norm_kind='rms' takes no bias; pass bias=None")
        rows = x.to(torch.float32)
        variance = rows.pow(2).mean(-1, keepdim=True)
        rows = rows * torch.rsqrt(variance + eps)
        return weight * rows.to(x.dtype)
    if norm_kind == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    raise ValueError(f"norm_kind={norm_kind!r} is not one of {NORM_KINDS}")


def predictor_reference(
    normed: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    act: str,
    lookahead: int,
) -> torch.Tensor:
    """The predictor MLP on normed rows, at the weights' dtype.

    Args:
        normed: (T, H) normed rows.
        w1: (D, H), b1: (D,) or None: first Linear (BatchNorm already folded for ``mlp_bn``).
        w2: (d·E, D), b2: (d·E,) or None: second Linear; d = max(lookahead, 1).
        act: ``"silu"`` or ``"gelu"``.
        lookahead: 0 for logits (T, E); d >= 1 for (T, d, E).

    Returns:
        fp32 logits (T, E) or (T, d, E).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r} is not one of {ACTIVATIONS}")
    hidden = F.linear(normed, w1, b1)  # [T, D]
    hidden = F.silu(hidden) if act == "silu" else F.gelu(hidden)
    logits = F.linear(hidden, w2, b2).to(torch.float32)  # [T, d·E]
    if lookahead == 0:
        return logits
    return logits.view(logits.shape[0], lookahead, -1)  # [T, d, E]


def predictive_norm_reference(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    eps: float,
    norm_kind: str,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    act: str = "silu",
    lookahead: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm then predictor, unfused: the semantics of ``predictive_norm_forward``.

    Returns:
        ``(normed (T, H) x.dtype, logits (T, E) or (T, d, E) fp32)``.
    """
    normed = norm_reference(x, norm_weight, norm_bias, eps, norm_kind)
    return normed, predictor_reference(normed, w1, b1, w2, b2, act, lookahead)


@torch.no_grad()
def fold_batchnorm(linear: nn.Linear, bn: nn.BatchNorm1d) -> nn.Linear:
    """Fold an eval-mode ``BatchNorm1d`` that follows ``linear`` into a new ``nn.Linear``.

    ``bn(linear(x))`` in eval mode is ``(W x + b - mean) * g + beta`` with
    ``g = gamma / sqrt(var + eps)``, so the folded layer has ``W' = g[:, None] * W`` and
    ``b' = (b - mean) * g + beta``. Computed in fp64, stored in ``linear``'s dtype.

    Args:
        linear: Linear(H, D), bias optional.
        bn: BatchNorm1d(D) with running statistics (affine optional).

    Returns:
        A new Linear(H, D) with a bias, on ``linear``'s device and dtype; the inputs are untouched.
    """
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    if not isinstance(bn, nn.BatchNorm1d):
        raise ValueError(f"bn must be an nn.BatchNorm1d, got {type(bn).__name__}")
    if bn.num_features != linear.out_features:
        raise ValueError(
            f"bn.num_features={bn.num_features} != linear.out_features={linear.out_features}; "
            "the BatchNorm must follow this Linear"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn has no running statistics (track_running_stats=False); it cannot be folded")
    weight = linear.weight.to(torch.float64)
    bias = linear.bias.to(torch.float64) if linear.bias is not None else torch.zeros_like(weight[:, 0])
    gamma = bn.weight.to(torch.float64) if bn.weight is not None else torch.ones_like(bias)
    beta = bn.bias.to(torch.float64) if bn.bias is not None else torch.zeros_like(bias)
    scale = gamma / torch.sqrt(bn.running_var.to(torch.float64) + bn.eps)  # [D]
    folded = nn.Linear(
        linear.in_features, linear.out_features, bias=True, device=weight.device, dtype=linear.weight.dtype
    )
    folded.weight.copy_(weight * scale[:, None])
    folded.bias.copy_((bias - bn.running_mean.to(torch.float64)) * scale + beta)
    return folded
