"""``moe-beyond``: the MoE-Beyond predictor (arXiv 2508.17137), a causal transformer encoder.

Input for (sequence, layer l): token embeddings (learned from the trace's vocabulary of token ids or
strings) concatenated with a learned embedding of l, projected to ``d_model``, plus a learned
position embedding. A causal transformer encoder (token t attends to tokens <= t) and a two-layer
GELU head give ``E`` logits per token; sigmoid(logit) is the probability that the expert is
selected at layer l. Defaults follow the paper (4 layers, 8 heads, feed-forward 2048, dropout 0.1,
windows of at most 512 tokens); ``d_model`` and the embedding sizes are moert's choice (the paper
uses the model's 2048-d embeddings and a 512-d layer embedding).

Sequences longer than ``max_len`` are cut into consecutive windows; a token sees only the tokens of
its own window before it.

``layer_input="heads"`` (moert's variant, not the paper's): no layer embedding; one pass of the
encoder over a window and a head of ``L x E`` logits predict every layer at once, so an epoch costs
one encoder pass per sequence instead of ``L`` (26 on DeepSeek-V2-Lite).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moert.predict.base import NetPredictor, PredictorMeta
from moert.predict.data import TokenVocab, chunks
from moert.predict.losses import NEEDS_SCORES, check_loss, get_loss, multi_hot
from moert.predict.metrics import MetricAccumulator
from moert.predict.train import TrainConfig, fit, pick_device

__all__ = [
    "MoEBeyondConfig",
    "MoEBeyondNet",
    "MoEBeyondPredictor",
    "train_moe_beyond",
    "load_embedding_matrix",
]


@dataclass(frozen=True)
class MoEBeyondConfig:
    """Sizes of the MoE-Beyond network (defaults: the paper's encoder; tests use tiny ones)."""

    d_model: int = 512
    d_token: int = 512
    d_layer: int = 128
    num_layers: int = 4
    num_heads: int = 8
    ff: int = 2048
    dropout: float = 0.1
    max_len: int = 512
    layer_input: str = "embed"

    def __post_init__(self) -> None:
        if self.layer_input not in ("embed", "heads"):
            raise ValueError(f"layer_input={self.layer_input!r} is not one of embed (the paper's), heads")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of num_heads={self.num_heads}")
        if min(self.d_model, self.d_token, self.d_layer, self.num_layers, self.ff, self.max_len) < 1:
            raise ValueError(f"every MoE-Beyond size must be >= 1, got {self}")


class MoEBeyondNet(nn.Module):
    """``forward(tok (B, T) int64, layer (B,) int64) -> (B, T, E)`` logits; causal over T <= max_len."""

    def __init__(self, vocab_size: int, num_moe_layers: int, num_experts: int, cfg: MoEBeyondConfig):
        super().__init__()
        self.cfg = cfg
        self.heads = cfg.layer_input == "heads"
        self.num_layers, self.num_experts = num_moe_layers, num_experts
        self.tok = nn.Embedding(vocab_size, cfg.d_token)
        self.lay = None if self.heads else nn.Embedding(num_moe_layers, cfg.d_layer)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.proj = nn.Linear(cfg.d_token + (0 if self.heads else cfg.d_layer), cfg.d_model)
        block = nn.TransformerEncoderLayer(
            cfg.d_model,
            cfg.num_heads,
            cfg.ff,
            cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(block, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.d_model, num_experts * (num_moe_layers if self.heads else 1)),
        )

    def forward(self, tok: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        B, T = tok.shape
        if self.heads:  # one pass for every layer; keep row b's layer
            return self.forward_all(tok)[torch.arange(B, device=tok.device), layer]  # [B, T, E]
        lay = self.lay(layer)[:, None, :].expand(B, T, -1)
        return self._encode(torch.cat([self.tok(tok), lay], dim=-1))  # [B, T, E]

    def forward_all(self, tok: torch.Tensor) -> torch.Tensor:
        """``layer_input="heads"`` only: ``(B, T) -> (B, L, T, E)`` logits of every layer."""
        if not self.heads:
            raise ValueError("forward_all needs layer_input='heads'; this network embeds the layer")
        B, T = tok.shape
        out = self._encode(self.tok(tok))  # [B, T, L*E]
        return out.view(B, T, self.num_layers, self.num_experts).transpose(1, 2)

    def _encode(self, feats: torch.Tensor) -> torch.Tensor:
        T = feats.shape[1]
        if self.cfg.max_len < T:
            raise ValueError(f"window of {T} tokens exceeds max_len={self.cfg.max_len}")
        x = self.proj(feats) + self.pos.weight[:T]  # [B, T, d_model]
        # right padding only, so the causal mask alone keeps real tokens from seeing pads
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=feats.device, dtype=x.dtype)
        h = self.encoder(x, mask=mask, is_causal=True)
        return self.head(self.norm(h))


class MoEBeyondPredictor(NetPredictor):
    """Inference wrapper: vocabulary + network; ``predict_all`` runs all L layers as one batch."""

    @classmethod
    def build_net(cls, meta: PredictorMeta, vocab_size: int) -> MoEBeyondNet:
        fields = MoEBeyondConfig.__dataclass_fields__
        cfg = MoEBeyondConfig(**{k: v for k, v in meta.dims.items() if k in fields})
        return MoEBeyondNet(vocab_size, meta.num_layers, meta.num_experts, cfg)

    @torch.no_grad()
    def _run(self, tok: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        dev = next(self.net.parameters()).device
        outs = []
        for a, b in chunks(tok.shape[0], self.net.cfg.max_len):
            if self.net.heads:
                outs.append(self.net.forward_all(tok[a:b].to(dev)[None])[0, layers.to(dev)].float().cpu())
                continue
            window = tok[a:b].to(dev)[None].expand(layers.numel(), -1)
            outs.append(self.net(window, layers.to(dev)).float().cpu())
        return torch.cat(outs, dim=1)  # [len(layers), T, E]

    def predict(self, layer: int, context: Any) -> torch.Tensor:
        return self._run(self.vocab.encode(context), torch.tensor([layer]))[0]

    def predict_all(self, context: Any) -> torch.Tensor:
        return self._run(self.vocab.encode(context), torch.arange(self.meta.num_layers))


def load_embedding_matrix(model_dir: str | Path) -> torch.Tensor:
    """(V, H) fp32 input embedding matrix of an HF checkpoint, read from its safetensors shards.

    Only the ``*embed_tokens.weight`` tensor is read (memory-mapped), not the model.
    """
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no *.safetensors files; pass the directory of an HF checkpoint")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key.endswith("embed_tokens.weight"):
                    return st.get_tensor(key).float()
    raise ValueError(f"{model_dir}: no '*embed_tokens.weight' tensor in {[f.name for f in files]}")


def _frozen_rows(vocab: TokenVocab, embeddings: torch.Tensor) -> torch.Tensor:
    """(len(vocab), H) rows of the model's embedding matrix for the vocabulary (row 0, unk, is zero)."""
    if vocab.kind != "ids":
        raise ValueError(
            "token embeddings from the model need token ids in the trace, but it has only strings; "
            "train without --embeddings-from (embeddings learned from the strings)"
        )
    ids = torch.tensor([int(key) for key in vocab.keys], dtype=torch.long)
    if len(ids) and int(ids.max()) >= embeddings.shape[0]:
        raise ValueError(
            f"token id {int(ids.max())} is outside the model's embedding matrix ({embeddings.shape[0]} rows); "
            "wrong model for this trace?"
        )
    return torch.cat([torch.zeros(1, embeddings.shape[1]), embeddings[ids].float()])


def train_moe_beyond(
    trace_meta: Any,
    train_seqs: Sequence[Any],
    val_seqs: Sequence[Any],
    *,
    net_cfg: MoEBeyondConfig | None = None,
    loss: str = "wbce",
    min_count: int = 2,
    token_embeddings: torch.Tensor | None = None,
    cfg: TrainConfig | None = None,
    train_info: dict[str, Any] | None = None,
    on_epoch: Callable[[int, dict[str, Any], MoEBeyondPredictor], None] | None = None,
) -> tuple[MoEBeyondPredictor, dict[str, Any]]:
    """Trains on (sequence window, layer) samples; one epoch visits every pair once.

    Args:
        token_embeddings: (V, H) the model's input embedding matrix (``load_embedding_matrix``); when
            given, token embeddings are its rows (frozen, ``d_token = H``) instead of learned ones.
        on_epoch: called after each epoch's validation with ``(epoch, history, predictor)``; the
            predictor holds that epoch's weights (checkpoints, progress logs).
    """
    cfg = cfg or TrainConfig(batch_size=32)
    net_cfg = net_cfg or MoEBeyondConfig()
    check_loss(loss, trace_meta.has_scores)
    if net_cfg.layer_input == "heads" and loss in NEEDS_SCORES:
        raise ValueError(
            f"loss {loss!r} needs router scores, which layer_input='heads' does not batch; use wbce or focal"
        )
    L, E, k = len(trace_meta.layers), trace_meta.num_experts, trace_meta.top_k
    vocab = TokenVocab.build(train_seqs, min_count=min_count)
    tokens = [vocab.encode(s) for s in train_seqs]
    experts = [s.experts.long() for s in train_seqs]
    scores = [s.scores.float() for s in train_seqs] if loss in NEEDS_SCORES else None
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    net, net_cfg, source = _build_net(vocab, L, E, net_cfg, token_embeddings)
    net = net.to(device)
    loss_fn = get_loss(loss)
    max_len = net_cfg.max_len
    if net_cfg.layer_input == "heads":  # one sample per sequence, labels of every layer
        pairs = [(si, -1) for si in range(len(train_seqs))]
    else:
        pairs = [(si, li) for si in range(len(train_seqs)) for li in range(L)]

    def batches(gen: torch.Generator) -> list[list[tuple[int, int, int, int]]]:
        return _window_batches(pairs, [t.shape[0] for t in tokens], max_len, cfg.batch_size, gen)

    def batch_loss(items: list[tuple[int, int, int, int]]) -> torch.Tensor:
        tok, valid, labels, sc, layer = _window_batch(items, tokens, experts, scores, E)
        if net.heads:  # [B, L, T, E] -> rows of valid (token, layer) pairs
            logits = net.forward_all(tok.to(device)).transpose(1, 2)[valid.to(device)].reshape(-1, E)
            return loss_fn(logits, labels[valid].reshape(-1, E).to(device), None)
        logits = net(tok.to(device), layer.to(device))[valid.to(device)]  # [n_valid, E]
        return loss_fn(logits, labels[valid].to(device), sc[valid].to(device) if sc is not None else None)

    predictor = MoEBeyondPredictor(_meta(trace_meta, net_cfg, loss, vocab, {}, source), net, vocab)

    def validate() -> float:
        acc = MetricAccumulator(L, E, k, ())
        for s in val_seqs:
            out = predictor.predict_all(s)
            for i in range(L):
                acc.update(i, out[i], s.experts[i])
        return acc.result()["overall"][f"recall@{k}"]

    def epoch_done(epoch: int, hist: dict[str, Any]) -> None:
        if on_epoch is not None:
            on_epoch(epoch, hist, predictor)

    history = fit(net, batches, batch_loss, validate, cfg, desc=f"moe-beyond/{loss}", on_epoch=epoch_done)
    n_tok = sum(t.shape[0] for t in tokens)
    info = {**(train_info or {}), "train_tokens": n_tok, "history": history}
    return MoEBeyondPredictor(
        _meta(trace_meta, net_cfg, loss, vocab, info, source), net.cpu().eval(), vocab
    ), history


def _build_net(
    vocab: TokenVocab, L: int, E: int, net_cfg: MoEBeyondConfig, token_embeddings: torch.Tensor | None
) -> tuple[MoEBeyondNet, MoEBeyondConfig, str]:
    """The network, its config (``d_token`` from the model's embeddings when given) and the token source."""
    if token_embeddings is None:
        return MoEBeyondNet(len(vocab), L, E, net_cfg), net_cfg, "learned"
    rows = _frozen_rows(vocab, token_embeddings)
    net_cfg = replace(net_cfg, d_token=rows.shape[1])
    net = MoEBeyondNet(len(vocab), L, E, net_cfg)
    net.tok.weight.data.copy_(rows)
    net.tok.weight.requires_grad_(False)
    return net, net_cfg, "model"


def _window_batches(
    pairs: list[tuple[int, int]], lengths: list[int], max_len: int, batch_size: int, gen: torch.Generator
) -> list[list[tuple[int, int, int, int]]]:
    """One epoch of ``(sequence, layer, start, end)`` windows in batches: every (sequence, layer) pair
    once, a random window of at most ``max_len`` tokens each; windows of similar length share a batch
    (little padding): shuffle, sort within pools of 64 batches by length, cut batches, shuffle the
    batch order."""
    perm = torch.randperm(len(pairs), generator=gen).tolist()
    items = []
    for p in perm:
        si, li = pairs[p]
        T = lengths[si]
        start = int(torch.randint(0, T - max_len + 1, (1,), generator=gen)) if max_len < T else 0
        items.append((si, li, start, min(T, start + max_len)))
    pool = 64 * batch_size
    out = []
    for s in range(0, len(items), pool):
        chunk = sorted(items[s : s + pool], key=lambda it: it[3] - it[2])
        out += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(out), generator=gen).tolist()
    return [out[i] for i in order]


def _window_batch(
    items: list[tuple[int, int, int, int]],
    tokens: list[torch.Tensor],
    experts: list[torch.Tensor],
    scores: list[torch.Tensor] | None,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A padded batch of windows: ``(tokens [B, T] int64, valid [B, T] bool, labels [B, T, E] multi-hot,
    router scores [B, T, E] or None, layer [B] int64)``. Layer ``-1`` (``layer_input="heads"``): labels
    of every layer, ``[B, T, L, E]``, and no scores."""
    T = max(b - a for _, _, a, b in items)
    L = experts[items[0][0]].shape[0]
    every = items[0][1] < 0
    tok = torch.zeros(len(items), T, dtype=torch.long)
    valid = torch.zeros(len(items), T, dtype=torch.bool)
    labels = torch.zeros(len(items), T, *((L,) if every else ()), num_experts)
    sc = torch.zeros(len(items), T, num_experts) if scores is not None and not every else None
    for r, (si, li, a, b) in enumerate(items):
        tok[r, : b - a] = tokens[si][a:b]
        valid[r, : b - a] = True
        if every:
            hot = multi_hot(experts[si][:, a:b].reshape(-1, experts[si].shape[-1]), num_experts)
            labels[r, : b - a] = hot.view(L, b - a, num_experts).transpose(0, 1)
            continue
        labels[r, : b - a] = multi_hot(experts[si][li, a:b], num_experts)
        if sc is not None:
            sc[r, : b - a] = scores[si][li, a:b]
    layer = torch.tensor([li for _, li, _, _ in items])
    return tok, valid, labels, sc, layer


def _meta(
    trace_meta: Any, net_cfg: MoEBeyondConfig, loss: str, vocab: TokenVocab, info: dict, source: str
) -> PredictorMeta:
    return PredictorMeta(
        kind="moe-beyond",
        model_type=trace_meta.model_type,
        layers=tuple(trace_meta.layers),
        num_experts=trace_meta.num_experts,
        top_k=trace_meta.top_k,
        arch="encoder",
        dims={**asdict(net_cfg), "vocab": len(vocab), "token_embedding": source},
        loss=loss,
        train=info,
    )
