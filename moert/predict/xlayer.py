"""``xlayer``: a cheap cross-layer predictor for traces without hidden rows.

For token t at layer l, the features are the experts actually selected at layers l-1 and l-2 for
token t, token t's identity (a vocabulary built from the trace) and a position bucket, and — known
before layer l runs for token t, so causal — the same layer's recent history: token t-1's experts
at layer l, and a decayed average of layer l's expert use over tokens < t
(``u_t = γ u_{t-1} + (1-γ) onehot(S(l, t-1))``, γ = 0.9). Expert sets are embedding bags (per layer:
a sum of k table rows), the history goes through one (E, D) matrix shared by the layers, so inference is a few gathers and
two small matmuls::

    h = tok[x_t] + pos[b_t] + lay[l] + Σ_e P1[l, e ∈ S(l-1,t)] + Σ_e P2[l, e ∈ S(l-2,t)]
        + Σ_e Q[l, e ∈ S(l,t-1)] + u_t · U
    logits = W2 · GELU(W1 · GELU(LN(h)) + c1) + c2[l]        # (E,)

Missing inputs (l < 2, t = 0) use a per-layer "none" row (or a zero history).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moert.predict.base import NetPredictor, PredictorMeta
from moert.predict.data import (
    NUM_POSITION_BUCKETS,
    LayerTokens,
    TokenVocab,
    flatten,
    position_bucket,
    prev_token_experts,
)
from moert.predict.losses import NEEDS_SCORES, check_loss, get_loss, multi_hot
from moert.predict.metrics import MetricAccumulator
from moert.predict.train import TrainConfig, fit, pick_device

__all__ = ["XLayerNet", "XLayerPredictor", "train_xlayer", "expert_history"]


def expert_history(experts: torch.Tensor, num_experts: int, decay: float) -> torch.Tensor:
    """(L, T, E) fp32 decayed use of each expert at each layer over tokens < t (row t = 0 is zero).

    Args:
        experts: (L, T, k) selected experts of one sequence.
        decay: γ in ``u_t = γ u_{t-1} + (1-γ) onehot(S(t-1))``.
    """
    L, T, k = experts.shape
    hot = multi_hot(experts.reshape(L * T, k), num_experts).view(L, T, num_experts)
    out = torch.zeros(L, T, num_experts)
    for t in range(1, T):
        out[:, t] = decay * out[:, t - 1] + (1.0 - decay) * hot[:, t - 1]
    return out


class XLayerNet(nn.Module):
    """``forward(layer (N,), tok (N,), pos_bucket (N,), prev1/prev2/prevtok (N, k), hist (N, E)) -> (N, E)``.

    Expert-set inputs use ``-1`` for "none"; ids are looked up in per-layer tables of ``E + 1`` rows.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        vocab_size: int,
        dim: int,
        use_prev_token: bool,
        use_history: bool,
    ):
        super().__init__()
        self.L, self.E = num_layers, num_experts
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(NUM_POSITION_BUCKETS, dim)
        self.lay = nn.Embedding(num_layers, dim)
        self.prev1 = nn.Embedding(num_layers * (num_experts + 1), dim)
        self.prev2 = nn.Embedding(num_layers * (num_experts + 1), dim)
        self.prevtok = nn.Embedding(num_layers * (num_experts + 1), dim) if use_prev_token else None
        self.hist = nn.Linear(num_experts, dim, bias=False) if use_history else None
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, num_experts)
        self.out_bias = nn.Parameter(torch.zeros(num_layers, num_experts))
        for emb in (self.tok, self.pos, self.lay, self.prev1, self.prev2, self.prevtok):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)

    def _bag(self, table: nn.Embedding, layer: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        e = torch.where(experts < 0, torch.full_like(experts, self.E), experts)
        return table(layer[:, None] * (self.E + 1) + e).sum(dim=1)  # [N, D]

    def forward(self, layer, tok, pos_bucket, prev1, prev2, prevtok, hist) -> torch.Tensor:
        h = self.tok(tok) + self.pos(pos_bucket) + self.lay(layer)
        h = h + self._bag(self.prev1, layer, prev1) + self._bag(self.prev2, layer, prev2)
        if self.prevtok is not None:
            h = h + self._bag(self.prevtok, layer, prevtok)
        if self.hist is not None:
            h = h + self.hist(hist.float())  # [N, E] @ [E, D], shared by the layers
        h = F.gelu(self.fc1(F.gelu(self.norm(h))))
        return self.fc2(h) + self.out_bias[layer]  # [N, E]


def _features(experts: torch.Tensor, prev_tok: torch.Tensor, i: int, rows: torch.Tensor):
    """Expert-set inputs for layer index i at token rows. experts, prev_tok: (L, N, k)."""
    none = torch.full_like(experts[0, rows], -1)
    p1 = experts[i - 1, rows] if i >= 1 else none
    p2 = experts[i - 2, rows] if i >= 2 else none
    return p1, p2, prev_tok[i, rows]


class XLayerPredictor(NetPredictor):
    """Inference wrapper around a trained XLayerNet and its vocabulary."""

    @classmethod
    def build_net(cls, meta: PredictorMeta, vocab_size: int) -> XLayerNet:
        d = meta.dims
        return XLayerNet(
            meta.num_layers, meta.num_experts, vocab_size, d["dim"], d["prev_token"], d.get("history", False)
        )

    def _history(self, experts: torch.Tensor) -> torch.Tensor:
        return expert_history(experts, self.meta.num_experts, self.meta.dims.get("history_decay", 0.9))

    @torch.no_grad()
    def predict(self, layer: int, context: Any) -> torch.Tensor:
        return self.predict_all(context)[layer]

    @torch.no_grad()
    def predict_all(self, context: Any) -> torch.Tensor:
        experts = context.experts.long()
        L, T, k = experts.shape
        prev_tok = prev_token_experts(experts)
        none = torch.full((1, T, k), -1, dtype=torch.long)
        p1 = torch.cat([none, experts[:-1]])  # [L, T, k]: layer i-1
        p2 = torch.cat([none, none, experts[:-2]])[:L]
        tok = self.vocab.encode(context).repeat(L)
        pos = position_bucket(context.positions).repeat(L)
        lay = torch.arange(L).repeat_interleave(T)
        hist = self._history(experts).reshape(L * T, -1)
        flat = (p1.reshape(L * T, k), p2.reshape(L * T, k), prev_tok.reshape(L * T, k))
        return self.net(lay, tok, pos, *flat, hist).view(L, T, -1).float()


def _history_of(sequences: Sequence[Any], E: int, decay: float) -> torch.Tensor:
    """(L, N, E) fp16 decayed histories of concatenated sequences."""
    return torch.cat([expert_history(s.experts.long(), E, decay).half() for s in sequences], dim=1)


def _validate(net: XLayerNet, data: LayerTokens, hist, L: int, E: int, k: int, device, batch: int = 16384):
    acc = MetricAccumulator(L, E, k, ())
    pos = position_bucket(data.positions)
    for i in range(L):
        for s in range(0, data.num_tokens, batch):
            rows = torch.arange(s, min(s + batch, data.num_tokens))
            p1, p2, pt = _features(data.experts, data.prev_experts, i, rows)
            lay = torch.full((rows.numel(),), i, dtype=torch.long)
            args = (lay, data.tokens[rows], pos[rows], p1, p2, pt, hist[i, rows])
            acc.update(i, net(*(a.to(device) for a in args)), data.experts[i, rows])
    return acc.result()["overall"][f"recall@{k}"]


def train_xlayer(
    trace_meta: Any,
    train_seqs: Sequence[Any],
    val_seqs: Sequence[Any],
    *,
    dim: int = 128,
    loss: str = "wbce",
    use_prev_token: bool = True,
    use_history: bool = True,
    history_decay: float = 0.9,
    min_count: int = 2,
    cfg: TrainConfig | None = None,
    train_info: dict[str, Any] | None = None,
) -> tuple[XLayerPredictor, dict[str, Any]]:
    """Trains xlayer on every (layer, token) sample of the training sequences."""
    cfg = cfg or TrainConfig()
    check_loss(loss, trace_meta.has_scores)
    if not 0.0 <= history_decay < 1.0:
        raise ValueError(f"history_decay={history_decay} must be in [0, 1)")
    L, E, k = len(trace_meta.layers), trace_meta.num_experts, trace_meta.top_k
    vocab = TokenVocab.build(train_seqs, min_count=min_count)
    train = flatten(train_seqs, vocab=vocab, scores=loss in NEEDS_SCORES)
    val = flatten(val_seqs, vocab=vocab)
    hist_train, hist_val = _history_of(train_seqs, E, history_decay), _history_of(val_seqs, E, history_decay)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    net = XLayerNet(L, E, len(vocab), dim, use_prev_token, use_history).to(device)
    loss_fn = get_loss(loss)
    N = train.num_tokens
    pos = position_bucket(train.positions)

    def batches(gen: torch.Generator):
        perm = torch.randperm(L * N, generator=gen)  # (layer, token) samples
        return [perm[s : s + cfg.batch_size] for s in range(0, L * N, cfg.batch_size)]

    def batch_loss(flat: torch.Tensor) -> torch.Tensor:
        layer, rows = flat // N, flat % N
        none = torch.full((flat.numel(), k), -1, dtype=torch.long)
        p1 = torch.where((layer >= 1)[:, None], train.experts[(layer - 1).clamp(min=0), rows], none)
        p2 = torch.where((layer >= 2)[:, None], train.experts[(layer - 2).clamp(min=0), rows], none)
        pt = train.prev_experts[layer, rows]
        args = (layer, train.tokens[rows], pos[rows], p1, p2, pt, hist_train[layer, rows])
        logits = net(*(a.to(device) for a in args))
        labels = multi_hot(train.experts[layer, rows], E).to(device)
        sc = train.scores[layer, rows].to(device) if train.scores is not None else None
        return loss_fn(logits, labels, sc)

    history = fit(
        net,
        batches,
        batch_loss,
        lambda: _validate(net, val, hist_val, L, E, k, device),
        cfg,
        desc=f"xlayer/{loss}",
    )
    meta = PredictorMeta(
        kind="xlayer",
        model_type=trace_meta.model_type,
        layers=tuple(trace_meta.layers),
        num_experts=E,
        top_k=k,
        arch="embed",
        dims={
            "dim": dim,
            "prev_token": use_prev_token,
            "history": use_history,
            "history_decay": history_decay,
            "vocab": len(vocab),
            "min_count": min_count,
        },  # fmt: skip
        loss=loss,
        train={**(train_info or {}), "train_tokens": N, "val_tokens": val.num_tokens, "history": history},
    )
    return XLayerPredictor(meta, net.cpu().eval(), vocab), history
