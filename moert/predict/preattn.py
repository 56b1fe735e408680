"""Pre-attention expert predictor: one small MLP per MoE layer on the normalized pre-attention row.

Architectures (pre-attention paper §4.3, DESIGN §5), input ``x: (T, H)``, output ``(T, (1+d) E)``:

- ``linear2``: Linear(H, D) → SiLU → Linear(D, (1+d) E)
- ``mlp_bn``: Linear(H, D) → BatchNorm1d(D) → GELU → Dropout(0.1) → Linear(D, (1+d) E); at export the
  BatchNorm is folded into the first Linear, so inference is two matmuls and an activation.

With lookahead ``d`` the head at layer l also predicts layers l+1..l+d from the same row (output
block j is layer l+j); blocks past the last layer are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moert.predict.base import Predictor, PredictorMeta
from moert.predict.data import flatten, require_hidden
from moert.predict.losses import NEEDS_SCORES, check_loss, get_loss, multi_hot
from moert.predict.metrics import MetricAccumulator
from moert.predict.train import TrainConfig, fit, pick_device

__all__ = ["ARCHS", "make_head", "fold_batchnorm", "PreattnNet", "PreattnPredictor", "train_preattn"]

ARCHS = ("linear2", "mlp_bn")
_ACTS = {"silu": F.silu, "gelu": F.gelu}


def make_head(arch: str, hidden_size: int, dim: int, outputs: int) -> nn.Sequential:
    """One layer's predictor network (training form)."""
    if arch == "linear2":
        return nn.Sequential(nn.Linear(hidden_size, dim), nn.SiLU(), nn.Linear(dim, outputs))
    if arch == "mlp_bn":
        return nn.Sequential(
            nn.Linear(hidden_size, dim),
            nn.BatchNorm1d(dim),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(dim, outputs),
        )
    raise ValueError(f"arch {arch!r} is not one of {', '.join(ARCHS)}")


def fold_batchnorm(linear: nn.Linear, bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Folds an eval-mode BatchNorm1d into the Linear before it.

    ``bn(W x + b) = s ⊙ (W x + b - μ) + β`` with ``s = γ / sqrt(σ² + ε)``, so
    ``W' = diag(s) W`` and ``b' = s ⊙ (b - μ) + β``.

    Returns:
        ``(W' (D, H), b' (D,))`` fp32.
    """
    s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    w = linear.weight.detach() * s[:, None]
    b = (linear.bias.detach() - bn.running_mean) * s + bn.bias.detach()
    return w.float(), b.float()


class PreattnNet(nn.Module):
    """L per-layer heads (training form). ``forward(i, x (N, H)) -> (N, 1+d, E)``."""

    def __init__(
        self, num_layers: int, hidden_size: int, dim: int, num_experts: int, arch: str, lookahead: int
    ):
        super().__init__()
        self.arch, self.E, self.d = arch, num_experts, lookahead
        self.heads = nn.ModuleList(
            make_head(arch, hidden_size, dim, (1 + lookahead) * num_experts) for _ in range(num_layers)
        )

    def forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.heads[i](x).view(x.shape[0], 1 + self.d, self.E)  # [N, 1+d, E]

    def export(self) -> tuple[dict[str, torch.Tensor], str]:
        """Inference tensors ``w1 (L, D, H), b1 (L, D), w2 (L, (1+d)E, D), b2 (L, (1+d)E)`` and the activation."""
        w1, b1, w2, b2 = [], [], [], []
        for head in self.heads:
            if self.arch == "mlp_bn":
                w, b = fold_batchnorm(head[0], head[1])
            else:
                w, b = head[0].weight.detach().float(), head[0].bias.detach().float()
            w1.append(w)
            b1.append(b)
            w2.append(head[-1].weight.detach().float())
            b2.append(head[-1].bias.detach().float())
        tensors = {"w1": torch.stack(w1), "b1": torch.stack(b1), "w2": torch.stack(w2), "b2": torch.stack(b2)}
        return {k: v.cpu().contiguous() for k, v in tensors.items()}, (
            "silu" if self.arch == "linear2" else "gelu"
        )


class PreattnPredictor(Predictor):
    """Inference form: per layer ``act(x W1ᵀ + b1) W2ᵀ + b2`` (BatchNorm already folded)."""

    def __init__(self, meta: PredictorMeta, tensors: dict[str, torch.Tensor], act: str):
        if act not in _ACTS:
            raise ValueError(f"activation {act!r} is not one of {sorted(_ACTS)}")
        L, E, d, H = meta.num_layers, meta.num_experts, meta.lookahead, meta.hidden_size
        w1, b1, w2, b2 = (tensors[k].float() for k in ("w1", "b1", "w2", "b2"))
        D = w1.shape[1]
        expected = {"w1": (L, D, H), "b1": (L, D), "w2": (L, (1 + d) * E, D), "b2": (L, (1 + d) * E)}
        for name, t in zip(expected, (w1, b1, w2, b2)):
            if tuple(t.shape) != expected[name]:
                raise ValueError(
                    f"preattn tensor {name!r} has shape {tuple(t.shape)}, header implies {expected[name]}"
                )
        self.meta, self.act = meta, act
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2

    @classmethod
    def from_state(cls, meta: PredictorMeta, tensors: dict[str, torch.Tensor], extra: dict[str, Any]):
        return cls(meta, tensors, extra.get("act", ""))

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}, {"act": self.act}

    def kernel_weights(self, layer: int) -> dict[str, Any]:
        """Layer ``layer``'s weights in the fused kernel's convention (``moert.kernels.predictive_norm``).

        Returns:
            ``{"w1": (D, H), "b1": (D,), "w2": (n·E, D), "b2": (n·E,), "act": "silu"|"gelu",
            "lookahead": 0 or n}``: the kernel's ``lookahead`` counts all output blocks (n = 1 + d,
            block 0 = this layer), and 0 means plain (T, E) logits.
        """
        d = self.meta.lookahead
        return {
            "w1": self.w1[layer], "b1": self.b1[layer], "w2": self.w2[layer], "b2": self.b2[layer],
            "act": self.act, "lookahead": 0 if d == 0 else 1 + d,
        }  # fmt: skip

    def forward_rows(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """(N, 1+d, E) fp32 logits from rows x: (N, H) (any float dtype)."""
        h = _ACTS[self.act](F.linear(x.float(), self.w1[layer], self.b1[layer]))
        return F.linear(h, self.w2[layer], self.b2[layer]).view(x.shape[0], 1 + self.meta.lookahead, -1)

    def _rows(self, layer: int, context: Any) -> torch.Tensor:
        if context.hidden is None:
            raise ValueError(
                f"preattn predictor needs hidden rows; sequence {context.seq_id} has none "
                "(capture the trace with `moert trace --with-hidden`)"
            )
        return context.hidden[layer]

    def predict(self, layer: int, context: Any) -> torch.Tensor:
        return self.forward_rows(layer, self._rows(layer, context))[:, 0]

    def predict_ahead(self, layer: int, context: Any) -> torch.Tensor:
        """(T, 1+d, E) logits for layers layer..layer+d (blocks past the last layer are meaningless)."""
        return self.forward_rows(layer, self._rows(layer, context))


def _validate_net(
    net: PreattnNet, data, L: int, E: int, k: int, device: torch.device, batch: int = 8192
) -> float:
    acc = MetricAccumulator(L, E, k, ())
    for i in range(L):
        for s in range(0, data.num_tokens, batch):
            x = data.hidden[i, s : s + batch].to(device).float()
            acc.update(i, net(i, x)[:, 0], data.experts[i, s : s + batch])
    return acc.result()["overall"][f"recall@{k}"]


def train_preattn(
    trace_meta: Any,
    train_seqs: Sequence[Any],
    val_seqs: Sequence[Any],
    *,
    arch: str = "linear2",
    loss: str = "wbce",
    lookahead: int = 0,
    dim: int = 2048,
    cfg: TrainConfig | None = None,
    train_info: dict[str, Any] | None = None,
) -> tuple[PreattnPredictor, dict[str, Any]]:
    """Trains one head per MoE layer on the pre-attention rows; returns the exported predictor and history."""
    cfg = cfg or TrainConfig()
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r} is not one of {', '.join(ARCHS)}")
    L, E, k, H = len(trace_meta.layers), trace_meta.num_experts, trace_meta.top_k, trace_meta.hidden_size
    if not trace_meta.has_hidden or not H:
        raise ValueError(
            "the trace has no hidden rows (has_hidden=False); preattn trains on the normalized pre-attention "
            "rows: capture with `moert trace --with-hidden`"
        )
    if not 0 <= lookahead < L:
        raise ValueError(f"--lookahead {lookahead} must be in [0, L-1={L - 1}]")
    check_loss(loss, trace_meta.has_scores)
    require_hidden(train_seqs)
    require_hidden(val_seqs)
    loss_fn = get_loss(loss)
    need_scores = loss in NEEDS_SCORES
    train = flatten(train_seqs, scores=need_scores, hidden=True)
    val = flatten(val_seqs, hidden=True)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    net = PreattnNet(L, H, dim, E, arch, lookahead).to(device)
    X = train.hidden.to(device)
    experts = train.experts.to(device)
    scores = train.scores.to(device) if train.scores is not None else None
    N = train.num_tokens

    def batches(gen: torch.Generator):
        perm = torch.randperm(N, generator=gen)
        # drop a last batch of 1 row: BatchNorm cannot normalise a single row
        return [perm[s : s + cfg.batch_size] for s in range(0, N, cfg.batch_size) if N - s > 1 or s == 0]

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(device)
        terms = []
        for i in range(L):
            out = net(i, X[i, idx].float())  # [B, 1+d, E]
            for j in range(min(lookahead, L - 1 - i) + 1):
                labels = multi_hot(experts[i + j, idx], E)
                sc = scores[i + j, idx] if scores is not None else None
                terms.append(loss_fn(out[:, j], labels, sc))
        return torch.stack(terms).mean()

    history = fit(
        net,
        batches,
        batch_loss,
        lambda: _validate_net(net, val, L, E, k, device),
        cfg,
        desc=f"preattn/{arch}/{loss}",
    )
    tensors, act = net.cpu().export()
    meta = PredictorMeta(
        kind="preattn",
        model_type=trace_meta.model_type,
        layers=tuple(trace_meta.layers),
        num_experts=E,
        top_k=k,
        hidden_size=H,
        arch=arch,
        dims={"hidden": dim, "act": act},
        lookahead=lookahead,
        loss=loss,
        train={**(train_info or {}), "train_tokens": N, "val_tokens": val.num_tokens, "history": history},
    )
    return PreattnPredictor(meta, tensors, act), history
