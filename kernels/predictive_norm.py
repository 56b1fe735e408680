"""Fused pre-attention norm + expert predictor (DESIGN.md §3 step 1, §5).

One Triton launch computes the decoder layer's ``input_layernorm`` on rows ``x: (T, H)`` and, on
those same normed rows, the expert predictor ``Linear(H, D) -> act -> Linear(D, d·E)``:

    normed, logits = predictive_norm_forward(x, norm_weight, norm_bias, eps, "rms",
                                             w1, b1, w2, b2, act="silu", lookahead=0)
    # normed: (T, H) x.dtype, equal to the model's norm; logits: (T, E) or (T, d, E) fp32

Layers: ``predictive_norm_kernel`` (``_predictive_norm_kernel.py``, imported lazily so this module
never imports Triton) -> ``predictive_norm_forward`` (checks; block sizes and grid from
``_predictive_norm_plan.py``) -> ``PredictiveNorm`` (drop-in for ``input_layernorm``; Triton on
CUDA, PyTorch on CPU). The reference, ``predictive_norm_reference``, lives in
``predictive_norm_reference.py``. With ``prefetch=PlanSpec(...)`` the last program of the launch
also turns the logits into the prefetch plan (``moert.kernels.prefetch_plan``): one launch from
the layer's input rows to the ids and scores the copy engine takes. ``predictive_norm_topk``
(``torch.topk`` after the kernel) is the plain alternative; ``bench/bench_predictive_norm.py``
times them all on a GPU.

Inference only (no autograd). On CUDA, when D is split over several programs the logits are
summed with fp32 atomics, so their last bits may vary from run to run; the normed rows never do.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import nn

from ._predictive_norm_plan import PredictiveNormConfig, plan_launch
from .predictive_norm_reference import (
    ACTIVATIONS,
    NORM_KINDS,
    fold_batchnorm,
    predictive_norm_reference,
    predictor_reference,
)
from .prefetch_plan import PlanSpec, prefetch_plan_reference

__all__ = [
    "PredictiveNormConfig",
    "PredictiveNorm",
    "predictive_norm_forward",
    "predictive_norm_topk",
    "predictive_norm_reference",
    "fold_batchnorm",
    "describe_norm",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BACKENDS = ("auto", "triton", "torch")
_MAX_LOGITS = 512  # d·E held in one register tile per program (more spills registers)


def _check_tensor(name: str, t: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if t.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {like.dtype} (the dtype of x); cast it first")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, expected {like.device} (the device of x)")
    if not t.is_contiguous():
        raise ValueError(f"{name} (shape {tuple(t.shape)}) is not contiguous; pass {name}.contiguous()")


def _load_kernel(device: torch.device):
    """The kernel module, after checking it can run on ``device``."""
    interpret_env = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    if device.type == "cpu" and not interpret_env:
        raise ValueError(
            "predictive_norm_forward got CPU tensors; the Triton kernel needs CUDA. Use "
            "predictive_norm_reference (PredictiveNorm does so on CPU), or set TRITON_INTERPRET=1 "
            "before the kernel is first imported (tests only: the interpreter is very slow)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"x is on {device}; predictive_norm_forward runs on cuda (or cpu under TRITON_INTERPRET=1)"
        )
    try:
        module = importlib.import_module(f"{__package__}._predictive_norm_kernel")
    except ImportError as exc:
        raise ImportError(
            f"the predictive-norm kernel needs Triton ({exc}); install it with `pip install moert[kernels]`"
        ) from exc
    if device.type == "cpu" and not module.INTERPRET:
        raise ValueError(
            "TRITON_INTERPRET=1 was set after the predictive-norm kernel was first imported, which "
            "compiled it for the GPU; set it before the first call (or reload "
            f"{module.__name__})"
        )
    return module


def predictive_norm_forward(
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
    *,
    config: PredictiveNormConfig | None = None,
    prefetch: PlanSpec | None = None,
) -> tuple[torch.Tensor, ...]:
    """Norm + predictor (+ prefetch plan) in one Triton launch.

    Args:
        x: (T, H) fp32 / fp16 / bf16, contiguous, on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        norm_weight: (H,); norm_bias: (H,) or None (``"layernorm"`` only).
        eps: the norm's epsilon (>= 0).
        norm_kind: ``"rms"`` (DeepSeek, Qwen: HF RMSNorm) or ``"layernorm"`` (Phi: ``nn.LayerNorm``).
        w1: (D, H), b1: (D,) or None: first Linear (for ``mlp_bn``, BatchNorm folded in).
        w2: (d·E, D), b2: (d·E,) or None: second Linear, d = max(lookahead, 1), d·E <= 512.
        act: ``"silu"`` (``linear2``) or ``"gelu"`` (``mlp_bn``, erf GELU).
        lookahead: 0 for logits (T, E); d >= 1 for (T, d, E).
        config: block sizes / splits; default picked from the shapes.
        prefetch: also make the prefetch plan of these logits (n = max(d, 1) predicted layers).

    All tensors share x's dtype and device and are contiguous.

    Returns:
        ``(normed (T, H) x.dtype, logits (T, E) or (T, d, E) fp32)``; with ``prefetch`` also
        ``ids (n, width) int32, scores (n, E) fp32`` (see ``moert.kernels.prefetch_plan``; T = 0
        gives ids -1 and scores 0).

    Raises:
        ValueError: naming the offending argument and the fix.
    """
    if norm_kind not in NORM_KINDS:
        raise ValueError(f"norm_kind={norm_kind!r} is not one of {NORM_KINDS}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r} is not one of {ACTIVATIONS}")
    if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 0:
        raise ValueError(f"lookahead={lookahead!r} must be an int >= 0")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor (T, H), got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; supported: float32, float16, bfloat16")
    if not x.is_contiguous():
        raise ValueError(f"x (shape {tuple(x.shape)}) is not contiguous; pass x.contiguous()")
    T, H = x.shape
    if H == 0:
        raise ValueError("x has H=0 columns; nothing to normalise")
    if not isinstance(eps, (int, float)) or not eps >= 0.0 or eps == float("inf"):
        raise ValueError(f"eps={eps!r} must be a finite float >= 0")
    _check_tensor("norm_weight", norm_weight, (H,), x)
    if norm_bias is not None:
        if norm_kind == "rms":
            raise ValueError("norm_kind='rms' takes no bias; pass norm_bias=None")
        _check_tensor("norm_bias", norm_bias, (H,), x)
    if not isinstance(w1, torch.Tensor) or w1.dim() != 2:
        raise ValueError(f"w1 must be a 2-D tensor (D, H), got {getattr(w1, 'shape', type(w1).__name__)}")
    D = w1.shape[0]
    _check_tensor("w1", w1, (D, H), x)
    if D == 0:
        raise ValueError("w1 has D=0 rows; the predictor needs a hidden width >= 1")
    if b1 is not None:
        _check_tensor("b1", b1, (D,), x)
    if not isinstance(w2, torch.Tensor) or w2.dim() != 2:
        raise ValueError(f"w2 must be a 2-D tensor (d·E, D), got {getattr(w2, 'shape', type(w2).__name__)}")
    EO = w2.shape[0]
    _check_tensor("w2", w2, (EO, D), x)
    depth = max(lookahead, 1)
    if EO == 0 or EO % depth:
        raise ValueError(f"w2 has {EO} outputs, not a positive multiple of lookahead depth {depth} (d·E)")
    if EO > _MAX_LOGITS:
        raise ValueError(f"w2 has {EO} outputs (d·E); the kernel holds at most {_MAX_LOGITS} per row")
    if b2 is not None:
        _check_tensor("b2", b2, (EO,), x)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, norm_weight, norm_bias, w1, b1, w2, b2)
    ):
        raise ValueError(
            "predictive_norm_forward is inference-only (no autograd); call it under torch.no_grad() "
            "or use predictive_norm_reference for gradients"
        )

    if prefetch is not None:
        if not isinstance(prefetch, PlanSpec):
            raise ValueError(
                f"prefetch must be a moert.kernels.prefetch_plan.PlanSpec, got {type(prefetch).__name__}"
            )
        prefetch.check(EO // depth)
    kernel = _load_kernel(x.device)
    plan = plan_launch(
        config or PredictiveNormConfig(),
        T,
        H,
        D,
        EO,
        eps,
        x.dtype,
        x.device,
        norm_kind=norm_kind,
        act=act,
        has_norm_bias=norm_bias is not None,
        has_b1=b1 is not None,
        has_b2=b2 is not None,
        interpret=kernel.INTERPRET,
        prefetch=prefetch,
        depth=depth,
    )
    normed = torch.empty_like(x)
    if prefetch is None:
        alloc = torch.zeros if plan.atomic else torch.empty
        logits = alloc((T, EO), dtype=torch.float32, device=x.device)
        ids = scores = counter = logits  # unread
    else:
        # one zeroed allocation (one memset) holds the logits and, as int32 bits, the counter
        work = torch.zeros(T * EO + 1, dtype=torch.float32, device=x.device)
        logits = work[: T * EO].view(T, EO)
        counter = work[T * EO :].view(torch.int32)
        # the plan writes every entry; with no rows there is no launch, and no expert is predicted
        ids = torch.empty(depth, prefetch.width, dtype=torch.int32, device=x.device)
        scores = torch.empty(depth, EO // depth, dtype=torch.float32, device=x.device)
        if T == 0:
            ids.fill_(-1)
            scores.zero_()
    if T > 0:
        kernel.predictive_norm_kernel[plan.grid](
            x,
            norm_weight,
            norm_bias if norm_bias is not None else norm_weight,  # unread when HAS_NB is False
            w1,
            b1 if b1 is not None else w1,
            w2,
            b2 if b2 is not None else w2,
            normed,
            logits,
            ids,
            scores,
            counter,
            **plan.scalars,
            **plan.constexprs,
            **plan.options,
        )
    if lookahead:
        logits = logits.view(T, lookahead, EO // lookahead)  # [T, d, E]
    if prefetch is None:
        return normed, logits
    return normed, logits, ids, scores


def predictive_norm_topk(*args, k: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``predictive_norm_forward`` followed by ``torch.topk`` over the experts.

    Args:
        *args, **kwargs: as ``predictive_norm_forward``.
        k: experts to select per row and depth (the model's top-k plus over-provisioning m).

    Returns:
        ``(normed (T, H), logits (T, E) or (T, d, E) fp32, ids (T, k) or (T, d, k) int64)``,
        ids ordered by descending logit.
    """
    normed, logits = predictive_norm_forward(*args, **kwargs)
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k={k} must be in 1..{logits.shape[-1]} (the number of experts)")
    return normed, logits, torch.topk(logits, k, dim=-1).indices


def describe_norm(norm: nn.Module) -> tuple[str, float]:
    """``(norm_kind, eps)`` of a model's norm module, or a ValueError naming what was found.

    Supported: ``nn.LayerNorm`` over the last dim with a weight (Phi-mini-MoE), and HF-style
    RMSNorm modules with ``weight`` and ``variance_epsilon`` whose forward is the fp32
    normalise-cast-scale of ``DeepseekV2RMSNorm`` / ``Qwen3MoeRMSNorm``.
    """
    if isinstance(norm, nn.LayerNorm):
        if len(norm.normalized_shape) != 1 or norm.weight is None:
            raise ValueError(
                f"nn.LayerNorm{tuple(norm.normalized_shape)} with elementwise_affine={norm.elementwise_affine}: "
                "only a 1-D LayerNorm with a weight is supported"
            )
        return "layernorm", float(norm.eps)
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1 and isinstance(eps, (int, float)):
        if getattr(norm, "bias", None) is not None:
            raise ValueError(f"{type(norm).__name__} has a bias; HF RMSNorm modules have none")
        return "rms", float(eps)
    raise ValueError(
        f"unsupported norm module {type(norm).__name__}: expected nn.LayerNorm or an HF RMSNorm with "
        "`weight` and `variance_epsilon` (DeepseekV2RMSNorm, Qwen3MoeRMSNorm)"
    )


class PredictiveNorm(nn.Module):
    """Drop-in for a decoder layer's ``input_layernorm`` that also runs the expert predictor.

    ``forward(x)`` returns what the wrapped norm returns and stores the predictor's logits on
    ``self.last_logits`` (``x.shape[:-1] + (E,)`` or ``+ (d, E)``, fp32), and with ``prefetch`` set
    the batch's prefetch plan on ``self.last_plan`` (``(ids, scores)``, see
    ``moert.kernels.prefetch_plan``; made by the kernel's epilogue on the Triton path). With ``backend="auto"``
    CUDA inputs take the fused Triton kernel and other inputs the wrapped norm module itself plus
    ``predictor_reference``; ``"triton"`` or ``"torch"`` force one path (``"triton"`` on CPU
    needs ``TRITON_INTERPRET=1``: tests only).

    The norm's parameters are re-registered here under their own names (``weight``, ``bias``),
    the same Parameter objects, so a patched model's state_dict keys do not change; the wrapped
    module is kept outside the module tree (``self.norm``) for undo. Predictor weights are
    non-persistent buffers in the norm weight's dtype and device.

    Args:
        norm: the layer's norm (see :func:`describe_norm`).
        w1: (D, H), b1: (D,) or None, w2: (d·E, D), b2: (d·E,) or None: predictor weights.
        act: ``"silu"`` or ``"gelu"``.
        lookahead: 0, or the depth d of a lookahead predictor.
        config: optional kernel launch parameters.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        prefetch: a ``PlanSpec`` to also make the prefetch plan, or None.
    """

    def __init__(
        self,
        norm: nn.Module,
        w1: torch.Tensor,
        b1: torch.Tensor | None,
        w2: torch.Tensor,
        b2: torch.Tensor | None,
        *,
        act: str = "silu",
        lookahead: int = 0,
        config: PredictiveNormConfig | None = None,
        backend: str = "auto",
        prefetch: PlanSpec | None = None,
    ) -> None:
        super().__init__()
        self.norm_kind, self.eps = describe_norm(norm)
        if act not in ACTIVATIONS:
            raise ValueError(f"act={act!r} is not one of {ACTIVATIONS}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}")
        object.__setattr__(self, "_norm", norm)
        self.weight = norm.weight
        self.bias = getattr(norm, "bias", None) if self.norm_kind == "layernorm" else None
        like = norm.weight
        for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
            value = None if t is None else t.detach().to(device=like.device, dtype=like.dtype).contiguous()
            self.register_buffer(name, value, persistent=False)
        self.act = act
        self.lookahead = lookahead
        self.config = config
        self.backend = backend
        if prefetch is not None:
            if not isinstance(prefetch, PlanSpec):
                raise ValueError(f"prefetch must be a PlanSpec, got {type(prefetch).__name__}")
            prefetch.check(self.w2.shape[0] // max(lookahead, 1))
        self.prefetch = prefetch
        self.last_logits: torch.Tensor | None = None
        self.last_plan: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def norm(self) -> nn.Module:
        """The wrapped norm module (restore it to undo the patch)."""
        return self._norm

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (..., H) -> normed (..., H); logits land on ``self.last_logits``."""
        lead = hidden_states.shape[:-1]
        use_triton = self.backend == "triton" or (self.backend == "auto" and hidden_states.is_cuda)
        plan = None
        if use_triton:
            normed, logits, *plan = predictive_norm_forward(
                hidden_states.reshape(-1, hidden_states.shape[-1]).contiguous(),
                self.weight,
                self.bias,
                self.eps,
                self.norm_kind,
                self.w1,
                self.b1,
                self.w2,
                self.b2,
                self.act,
                self.lookahead,
                config=self.config,
                prefetch=self.prefetch,
            )
            normed = normed.view(hidden_states.shape)
        else:
            normed = self._norm(hidden_states)
            logits = predictor_reference(
                normed.reshape(-1, normed.shape[-1]),
                self.w1,
                self.b1,
                self.w2,
                self.b2,
                self.act,
                self.lookahead,
            )
            if self.prefetch is not None:
                depth = max(self.lookahead, 1)
                rows = logits.reshape(-1, depth, self.w2.shape[0] // depth)  # [T, n, E]
                plan = prefetch_plan_reference(rows, self.prefetch)
        self.last_logits = logits.view(*lead, *logits.shape[1:])
        self.last_plan = tuple(plan) if plan else None
        return normed

    def extra_repr(self) -> str:
        return (
            f"norm={self.norm_kind}, eps={self.eps}, H={self.w1.shape[1]}, D={self.w1.shape[0]}, "
            f"outputs={self.w2.shape[0]}, act={self.act}, lookahead={self.lookahead}, backend={self.backend}"
        )
