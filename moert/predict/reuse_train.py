"""Training the ``reuse`` forecast (:mod:`moert.predict.reuse`) on routing traces: imitation of Belady.

The examples are (token t, layer l) positions of the concatenated training sequences (every
``stride``-th token, all layers), each with its E experts' features after the call, this call's and
layer l-1's experts, and the label: the calls to the next use of (l, e) (Belady's knowledge), as the
targets ``[d <= n_h]`` per horizon. Loss: binary cross-entropy averaged over experts and horizons.
Adam, seeded batch order, early stopping on the validation sequences' loss (every token there).
Runs in torch on the CPU (``torch.set_num_threads``); the result is a numpy :class:`ReuseModel`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moert.predict.reuse import (
    AGE_EDGES,
    DECAYS,
    FEATURE_GROUPS,
    HORIZONS,
    ReuseModel,
    ReuseState,
    ensemble,
    next_use_distance,
    num_dense_features,
)

__all__ = ["ReuseData", "ReuseTrainConfig", "build_data", "feature_mask", "train_ensemble", "train_reuse"]


@dataclass(frozen=True)
class ReuseTrainConfig:
    """Settings of :func:`train_reuse`.

    Attributes:
        hidden: D of the MLP.
        epochs: maximum passes; patience: epochs without validation gain before stopping.
        batch_size: (token, layer) positions per step.
        lr: Adam learning rate; weight_decay: on the co-activation matrices and biases.
        stride: every stride-th training token is an example (validation: every token).
        seed: seeds torch, the batch order and the sampling offset.
        threads: ``torch.set_num_threads``.
        groups: the feature groups used (:data:`FEATURE_GROUPS`); the others are zero.
        lr_final: the learning rate of the last epoch as a share of ``lr`` (cosine decay over ``epochs``;
            1: constant).
        focus: > 0: the loss weighs the ``focus`` most recently used experts of the layer by 1 and the
            others by ``focus_weight`` (the eviction only ever compares resident experts, which are
            mostly the recent ones); 0: every expert alike.
    """

    hidden: int = 64
    epochs: int = 8
    patience: int = 2
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-6
    stride: int = 8
    seed: int = 0
    threads: int = 1
    groups: tuple[str, ...] = FEATURE_GROUPS
    focus: int = 0
    focus_weight: float = 0.1
    lr_final: float = 1.0


def feature_mask(groups: Sequence[str]) -> np.ndarray:
    """(F,) bool: the dense feature columns of ``groups`` (recency, gaps, frequency)."""
    bad = [g for g in groups if g not in FEATURE_GROUPS]
    if bad:
        raise ValueError(f"feature groups {bad} are not among {', '.join(FEATURE_GROUPS)}")
    nb = len(AGE_EDGES) + 2
    nf = nb + 5 + len(DECAYS)
    spans = {"recency": (0, nb), "gaps": (nb, nb + 5), "frequency": (nb + 5, nf),
             "induction": (nf, num_dense_features())}  # fmt: skip
    mask = np.zeros(num_dense_features(), dtype=bool)
    for g, (a, b) in spans.items():
        if g in groups:
            mask[a:b] = True
    return mask


@dataclass
class ReuseData:
    """Examples: x (M, E, F) float32, layer (M,) int64, used / prev (M, E) bool, dist (M, E) int64 (0 =
    never), rank (M, E) int64 recency rank of e in its layer (0: used last; never used: E)."""

    x: torch.Tensor
    layer: torch.Tensor
    used: torch.Tensor
    prev: torch.Tensor
    dist: torch.Tensor
    rank: torch.Tensor

    def __len__(self) -> int:
        return int(self.layer.shape[0])


def build_data(experts: np.ndarray, num_experts: int, stride: int = 1, offset: int = 0) -> ReuseData:
    """Examples of the concatenated sequences' tokens t = offset, offset + stride, ... (all layers).

    Args:
        experts: (L, N, k) expert ids, -1 pads, the sequences one after another (as the simulator sees them).
    """
    L, N, _ = experts.shape
    dist = next_use_distance(experts, num_experts)  # [N, L, E]
    state = ReuseState(L, num_experts)
    rows = np.arange(L)[:, None]
    xs, used, prev, ds, ranks = [], [], [], [], []
    for t in range(N):
        hot = np.zeros((L, num_experts), dtype=bool)
        ids = experts[:, t]
        hot[np.broadcast_to(rows, ids.shape)[ids >= 0], ids[ids >= 0]] = True
        state.update(slice(None), hot)
        if t % stride == offset % stride:
            xs.append(state.features(slice(None)).astype(np.float32))  # [L, E, F]
            used.append(hot)
            prev.append(np.concatenate([np.zeros((1, num_experts), dtype=bool), hot[:-1]]))
            ds.append(dist[t])
            key = np.where(state.last >= 0, state.last, -1)  # [L, E]
            ranks.append(np.argsort(np.argsort(-key, axis=1, kind="stable"), axis=1, kind="stable"))
    n = len(xs)
    return ReuseData(
        x=torch.from_numpy(np.stack(xs).reshape(n * L, num_experts, -1)),
        layer=torch.arange(L).repeat(n),
        used=torch.from_numpy(np.stack(used).reshape(n * L, num_experts)),
        prev=torch.from_numpy(np.stack(prev).reshape(n * L, num_experts)),
        dist=torch.from_numpy(np.stack(ds).reshape(n * L, num_experts)),
        rank=torch.from_numpy(np.stack(ranks).reshape(n * L, num_experts).astype(np.int16)),
    )


class _Net(torch.nn.Module):
    def __init__(self, L: int, E: int, F: int, D: int, groups: Sequence[str]) -> None:
        super().__init__()
        H = len(HORIZONS)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(F + 2, D), torch.nn.ReLU(), torch.nn.Linear(D, H))
        self.bias = torch.nn.Parameter(torch.zeros(L, E, H), requires_grad="bias" in groups)
        co = "coact" in groups
        self.coact_self = torch.nn.Parameter(torch.zeros(L, E, E), requires_grad=co)
        self.coact_prev = torch.nn.Parameter(torch.zeros(L, E, E), requires_grad=co)
        self.s_self = torch.nn.Parameter(torch.ones(H) * 0.1, requires_grad=co)
        self.s_prev = torch.nn.Parameter(torch.ones(H) * 0.1, requires_grad=co)
        self.register_buffer("mask", torch.from_numpy(feature_mask(groups)).float())

    def forward(self, x, layer, used, prev):  # [B, E, F], [B], [B, E], [B, E] -> [B, E, H]
        co_s = torch.bmm(used.float().unsqueeze(1), self.coact_self[layer]).squeeze(1)  # [B, E]
        co_p = torch.bmm(prev.float().unsqueeze(1), self.coact_prev[layer]).squeeze(1)
        h = (
            self.mlp(torch.cat([x * self.mask, co_s.unsqueeze(-1), co_p.unsqueeze(-1)], -1))
            + self.bias[layer]
        )
        return h + co_s.unsqueeze(-1) * self.s_self + co_p.unsqueeze(-1) * self.s_prev

    def export(self, groups: Sequence[str], info: dict[str, Any]) -> ReuseModel:
        def a(t: torch.Tensor) -> np.ndarray:
            return t.detach().double().numpy().copy()

        keep = np.concatenate([feature_mask(groups), [True, True]])
        w1 = a(self.mlp[0].weight).T * keep[:, None]  # unused columns: zero weight
        return ReuseModel(
            w1=w1, c1=a(self.mlp[0].bias), w2=a(self.mlp[2].weight).T, c2=a(self.mlp[2].bias),
            bias=a(self.bias), coact_self=a(self.coact_self), coact_prev=a(self.coact_prev),
            s_self=a(self.s_self), s_prev=a(self.s_prev), groups=tuple(groups), info=info,
        )  # fmt: skip


def _targets(dist: torch.Tensor) -> torch.Tensor:
    n = torch.tensor(HORIZONS, dtype=torch.int64)
    return ((dist.unsqueeze(-1) > 0) & (dist.unsqueeze(-1) <= n)).float()  # [B, E, H]


def _loss(
    net: _Net, data: ReuseData, idx: torch.Tensor, focus: int = 0, focus_weight: float = 1.0
) -> torch.Tensor:
    logits = net(data.x[idx], data.layer[idx], data.used[idx], data.prev[idx])
    if focus <= 0:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, _targets(data.dist[idx]))
    w = torch.where(data.rank[idx] < focus, 1.0, focus_weight).unsqueeze(-1).expand_as(logits)  # [B, E, H]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, _targets(data.dist[idx]), weight=w, reduction="sum"
    )
    return loss / w.sum()


def _evaluate(net: _Net, data: ReuseData, cfg: ReuseTrainConfig, batch: int = 2048) -> float:
    with torch.no_grad():
        total = 0.0
        for a in range(0, len(data), batch):
            idx = torch.arange(a, min(a + batch, len(data)))
            total += float(_loss(net, data, idx, cfg.focus, cfg.focus_weight)) * len(idx)
    return total / max(len(data), 1)


def train_reuse(
    train: ReuseData, val: ReuseData, num_layers: int, num_experts: int, cfg: ReuseTrainConfig,
    info: dict[str, Any] | None = None, log: Any = None,
) -> ReuseModel:  # fmt: skip
    """Fits the forecast; keeps the epoch with the lowest validation loss. ``info`` goes into the file
    with the curve (``info["curve"]``: per epoch train loss, validation loss, learning rate, seconds)."""
    torch.manual_seed(cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        net = _Net(num_layers, num_experts, num_dense_features(), cfg.hidden, cfg.groups)
        decayed = [net.bias, net.coact_self, net.coact_prev]
        others = [p for p in net.parameters() if all(p is not q for q in decayed)]
        opt = torch.optim.Adam(
            [{"params": others}, {"params": decayed, "weight_decay": cfg.weight_decay}], lr=cfg.lr
        )
        gen = torch.Generator().manual_seed(cfg.seed)
        curve = [{"epoch": 0, "train_loss": None, "val_loss": _evaluate(net, val, cfg), "seconds": 0.0}]
        best, best_state, bad = curve[0]["val_loss"], None, 0
        t0 = time.perf_counter()
        for epoch in range(1, cfg.epochs + 1):
            share = 0.5 * (1 + np.cos(np.pi * (epoch - 1) / max(cfg.epochs - 1, 1)))  # 1 .. 0
            for group in opt.param_groups:
                group["lr"] = cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * share)
            order = torch.randperm(len(train), generator=gen)
            total = 0.0
            for a in range(0, len(train), cfg.batch_size):
                idx = order[a : a + cfg.batch_size]
                loss = _loss(net, train, idx, cfg.focus, cfg.focus_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            v = _evaluate(net, val, cfg)
            curve.append({"epoch": epoch, "train_loss": total / len(train), "val_loss": v,
                          "lr": float(opt.param_groups[0]["lr"]), "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
            if log is not None:
                log(curve[-1])
            if v < best - 1e-5:
                best, bad = v, 0
                best_state = {k: t.clone() for k, t in net.state_dict().items()}
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        meta = {
            **(info or {}),
            "curve": curve,
            "best_val_loss": best,
            "config": cfg.__dict__ | {"groups": list(cfg.groups)},
        }
        return net.export(cfg.groups, meta)
    finally:
        torch.set_num_threads(threads)


def train_ensemble(
    stream: np.ndarray, val: ReuseData, num_layers: int, num_experts: int, cfg: ReuseTrainConfig,
    members: int = 1, info: dict[str, Any] | None = None, log: Any = None,
) -> ReuseModel:  # fmt: skip
    """``members`` forecasts trained with the seeds ``cfg.seed``, ``cfg.seed + 1``, ... (each on the
    training tokens of its own offset in the stride: ``seed % stride``), as one ensemble (the mean of
    their probabilities, :func:`moert.predict.reuse.ensemble`); one member is :func:`train_reuse`.

    ``stream``: (L, N, k) the training tokens' experts. The first member's ``info`` gets ``"members"``:
    every member's seed, best validation loss and curve."""
    if members < 1:
        raise ValueError(f"members={members} must be >= 1 (--ensemble: models averaged)")
    models = []
    for m in range(members):
        seed = cfg.seed + m
        train = build_data(stream, num_experts, stride=cfg.stride, offset=seed % cfg.stride)
        one = dataclasses.replace(cfg, seed=seed)
        more = dict(info or {})
        more["examples"] = {**more.get("examples", {}), "train": len(train)}
        models.append(train_reuse(train, val, num_layers, num_experts, one, info=more, log=log))
        del train
    if members > 1:
        models[0].info["members"] = [
            {"seed": cfg.seed + m, "best_val_loss": x.info.get("best_val_loss"), "curve": x.info.get("curve")}
            for m, x in enumerate(models)
        ]
    return ensemble(models)
