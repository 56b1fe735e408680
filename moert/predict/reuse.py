"""``reuse``: a learned forecast of how soon each expert of a layer is used again (learned eviction).

After each call of MoE layer l (a decode token t), for every expert e of that layer, the model gives
``p_h = P(e is used at layer l within the next n_h calls)`` for the horizons ``n_h = 1, 2, 4, ..., 64``
(:data:`HORIZONS`). Since ``log2 min(d, 128) = sum_h [d > n_h]`` for the distance d >= 1 to the next use,
``sum_h (1 - p_h)`` estimates ``E[log2 min(d, 128)]`` (:meth:`ReuseModel.log2_distance`). The eviction
policy (``moert.policy.learned``) ranks by the forecast hit density (:meth:`ReuseModel.log2_density`,
LHD: the hits a slot earns per call held), or under ``learned:next`` by the forecast next use, Belady's
score (``moert.policy.belady``) with the forecast in place of the truth; either compares the experts of
all layers of one global cache.

Features of (l, e), all online, O(W E) per call (:class:`ReuseState`; Hawkeye / LRB / Parrot featurise
the same way: recency, past inter-use gaps, frequencies over several windows, a per-object bias):

- recency: the calls since e's last use at l, in log2 buckets (:data:`AGE_EDGES`, plus "never");
- the last two gaps between e's uses (log2, with "none" flags) and age relative to the last gap;
- frequency: moving averages of e's use with decays :data:`DECAYS` (windows ~2 to ~100 calls);
- a learned bias per (l, e, horizon);
- co-activation: the experts of this call and of this token at layer l-1, through learned (E, E)
  matrices per layer (which experts of layer l tend to come back soon after these were picked);
- induction (:mod:`moert.predict.reuse_induction`): how often e followed, within 1-32 tokens, the past
  tokens (of the last 1024) routed like this one, and preceded by a token routed like the previous one,
  at layers l, l-1, ..., l-5 (tokens repeat).

The net is a small MLP over the dense features and the two co-activation scores, plus the bias and
co-activation terms::

    a_e = (u_l A_l)[e], b_e = (u_{l-1} B_l)[e]
    logits[e, h] = W2 relu(W1 [x_e, a_e, b_e] + c1) + c2 + bias[l, e, h] + s_h a_e + r_h b_e

Training (:mod:`moert.predict.reuse_train`) uses Belady's labels: the true next use in the trace. At run
time the forward pass is numpy float64 (a few small matmuls), the same code in the simulator and the
runtime; the forecast is rounded to 1/256 of a log2 step so that batching cannot change a decision.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moert.predict.base import PredictorMeta
from moert.predict.reuse_induction import InductionState, induction_config, num_induction_features

__all__ = [
    "AGE_EDGES",
    "DECAYS",
    "DENSITY_FROM",
    "FEATURE_GROUPS",
    "HORIZONS",
    "ReuseModel",
    "ReuseState",
    "dense_features",
    "ensemble",
    "load_reuse",
    "next_use_distance",
    "num_dense_features",
    "save_reuse",
]

#: forecast horizons n_h (calls of the layer)
HORIZONS = (1, 2, 4, 8, 16, 32, 64)
#: moving-average decays of e's use (windows of about 1 / (1 - decay) calls)
DECAYS = (0.5, 0.8, 0.9, 0.97, 0.99)
#: recency bucket upper edges (calls since last use): [0], [1], [2], [3,4], ..., (64, inf); then "never"
AGE_EDGES = (0, 1, 2, 4, 8, 16, 32, 64)
#: ablation groups of the model (``ReuseModel.groups``)
FEATURE_GROUPS = ("recency", "gaps", "frequency", "bias", "coact", "induction")
#: rounding of the forecast log2 distance (1/256 of a doubling)
QUANTUM = 256.0
#: the hit density is the best over horizons n_h, h >= this (index into HORIZONS: 2 calls and more;
#: chosen on the validation prompts, README "Learned eviction toward Belady")
DENSITY_FROM = 1
#: the lowest log2 hit density (a forecast that rounds to 0)
DENSITY_FLOOR_LOG2 = -64.0
#: a cap on the clock so the float32 priorities keep integer steps exact (2^24 / L steps)
NEVER_LOG2 = float(len(HORIZONS))


def _log2p(x: np.ndarray) -> np.ndarray:
    return np.log2(1.0 + np.maximum(x, 0).astype(np.float64))


def num_dense_features() -> int:
    """F: length of :func:`dense_features`' rows plus the induction columns (:func:`induction_features`)."""
    return (len(AGE_EDGES) + 2) + 5 + len(DECAYS) + num_induction_features()


def dense_features(age: np.ndarray, gap1: np.ndarray, gap2: np.ndarray, ema: np.ndarray) -> np.ndarray:
    """The dense feature rows of some (layer, expert) entries.

    Args:
        age: (...,) int64 calls since the last use (0: used in this call), -1: never used.
        gap1, gap2: (...,) int64 the last and the one-before-last gap between uses, -1: none.
        ema: (D, ...) float64 moving averages of use, one per decay.

    Returns:
        (..., F) float64: recency one-hot (len(AGE_EDGES) + 1 buckets and never), gaps (log2(1 + gap) / 8
        and none flags for both, log2((1 + age) / (1 + gap1)) / 8 when both exist), the moving averages.
    """
    never = age < 0
    bucket = np.searchsorted(np.asarray(AGE_EDGES), np.maximum(age, 0), side="left")  # 0..len(EDGES)
    bucket = np.where(never, len(AGE_EDGES) + 1, bucket)
    onehot = np.eye(len(AGE_EDGES) + 2)[bucket]  # [..., B]
    has1, has2 = gap1 >= 0, gap2 >= 0
    rel = np.where(has1 & ~never, (_log2p(age) - _log2p(gap1)) / 8.0, 0.0)
    gaps = np.stack(
        [_log2p(gap1) / 8.0 * has1, ~has1, _log2p(gap2) / 8.0 * has2, ~has2, rel], axis=-1
    ).astype(np.float64)
    return np.concatenate([onehot, gaps, np.moveaxis(ema, 0, -1)], axis=-1)


class ReuseState:
    """What the runtime knows online about L layers of E experts (updated after each call).

    Attributes:
        clock: (L,) int64 calls of each layer so far.
        last: (L, E) int64 call index of the last use (-1: never).
        gap1, gap2: (L, E) int64 the last two gaps between uses (-1: none).
        ema: (D, L, E) float64 moving averages of use.
        used: (L, E) bool: the experts of each layer's last call.
    """

    def __init__(self, num_layers: int, num_experts: int) -> None:
        L, E = num_layers, num_experts
        self.clock = np.zeros(L, dtype=np.int64)
        self.last = np.full((L, E), -1, dtype=np.int64)
        self.gap1 = np.full((L, E), -1, dtype=np.int64)
        self.gap2 = np.full((L, E), -1, dtype=np.int64)
        self.ema = np.zeros((len(DECAYS), L, E), dtype=np.float64)
        self.used = np.zeros((L, E), dtype=bool)
        self.induction = InductionState(L, E)
        self._decay = np.asarray(DECAYS, dtype=np.float64)

    def update(self, layer: int | slice, used: np.ndarray) -> None:
        """One call of ``layer`` (or one token of every layer, ``slice(None)``) that used ``used`` ((E,) or (L, E) bool)."""
        used = np.asarray(used, dtype=bool)
        c = self.clock[layer]
        c_col = c if np.ndim(c) == 0 else c[:, None]
        last, g1 = self.last[layer], self.gap1[layer]
        seen = used & (last >= 0)
        self.gap2[layer] = np.where(seen, g1, self.gap2[layer])
        self.gap1[layer] = np.where(seen, c_col - last, g1)
        self.last[layer] = np.where(used, c_col, last)
        d = self._decay.reshape((-1,) + (1,) * used.ndim)
        self.ema[:, layer] = d * self.ema[:, layer] + (1.0 - d) * used
        self.used[layer] = used
        self.induction.update(layer, c, used)
        self.clock[layer] += 1

    def features(self, layer: int | slice) -> np.ndarray:
        """(E, F) (or (L, E, F)) float64 features after the layer's last call (see :func:`dense_features`)."""
        c = self.clock[layer] - 1
        c_col = c if np.ndim(c) == 0 else c[:, None]
        last = self.last[layer]
        age = np.where(last >= 0, c_col - last, -1)
        dense = dense_features(age, self.gap1[layer], self.gap2[layer], self.ema[:, layer])
        return np.concatenate([dense, self.induction.features(layer, c)], axis=-1)

    def previous_layer_used(self, layer: int) -> np.ndarray:
        """(E,) bool: this token's experts at layer - 1 (none for layer 0)."""
        return self.used[layer - 1] if layer > 0 else np.zeros(self.used.shape[1], dtype=bool)


def next_use_distance(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """(N, L, E) int64: calls from token t to the next use of (l, e) after t (0: never again).

    Args:
        experts: (L, N, k) expert ids of N consecutive tokens, -1 pads.
    """
    L, N, _ = experts.shape
    out = np.zeros((N, L, num_experts), dtype=np.int64)
    nxt = np.full((L, num_experts), -1, dtype=np.int64)  # the next use at or after t + 1
    for t in range(N - 1, -1, -1):
        out[t] = np.where(nxt >= 0, nxt - t, 0)
        row = experts[:, t]
        for layer in range(L):
            ids = row[layer][row[layer] >= 0]
            nxt[layer, ids] = t
    return out


@dataclass
class ReuseModel:
    """The forecast's parameters (numpy float64) and its forward pass (see the module doc).

    Attributes:
        w1: (F + 2, D), c1: (D,), w2: (D, H), c2: (H,): the MLP over the dense features and the two
            co-activation scores.
        bias: (L, E, H) per (layer, expert, horizon).
        coact_self: (L, E, E), coact_prev: (L, E, E): co-activation of this call's and layer l-1's experts.
        s_self, s_prev: (H,) their weight per horizon.
        groups: the feature groups the model was trained with (others are zero).
        info: training provenance (trace, split, curve, metrics).
        horizons_used: the forecast is E[log2 min(d, 2 n)] over the first this many horizons (n the
            last one's): the horizon the eviction looks ahead.
        members: more models of the same shapes (other training seeds): the forecast's probabilities
            are the mean over this model and them (an ensemble, :func:`ensemble`); () for one model.
    """

    w1: np.ndarray
    c1: np.ndarray
    w2: np.ndarray
    c2: np.ndarray
    bias: np.ndarray
    coact_self: np.ndarray
    coact_prev: np.ndarray
    s_self: np.ndarray
    s_prev: np.ndarray
    groups: tuple[str, ...] = FEATURE_GROUPS
    info: dict[str, Any] = field(default_factory=dict)
    horizons_used: int = len(HORIZONS)
    members: tuple[ReuseModel, ...] = ()

    TENSORS = ("w1", "c1", "w2", "c2", "bias", "coact_self", "coact_prev", "s_self", "s_prev")

    @property
    def num_layers(self) -> int:
        return self.bias.shape[0]

    @property
    def num_experts(self) -> int:
        return self.bias.shape[1]

    def logits(self, layers: Any, x: np.ndarray, used: np.ndarray, prev: np.ndarray) -> np.ndarray:
        """(N, E, H) float64 logits of N calls of ``layers`` ((N,) ints) from features x (N, E, F) and
        each call's experts at l and l-1 ((N, E) bool each)."""
        layers = np.asarray(layers, dtype=np.int64).reshape(-1)
        N, E, F = x.shape
        co_self = np.empty(used.shape, dtype=np.float64)  # [N, E]
        co_prev = np.empty(used.shape, dtype=np.float64)
        for layer in np.unique(layers):  # rows of one layer share their (E, E) matrices
            rows = np.flatnonzero(layers == layer)
            co_self[rows] = used[rows].astype(np.float64) @ self.coact_self[layer]
            co_prev[rows] = prev[rows].astype(np.float64) @ self.coact_prev[layer]
        flat = np.concatenate(  # [N * E, F + 2]: one BLAS call
            [x.reshape(N * E, F), co_self.reshape(N * E, 1), co_prev.reshape(N * E, 1)], axis=1
        )
        h = (
            (np.maximum(flat @ self.w1 + self.c1, 0.0) @ self.w2).reshape(N, E, -1)
            + self.c2
            + self.bias[layers]
        )
        return h + co_self[..., None] * self.s_self + co_prev[..., None] * self.s_prev

    def probabilities(self, layers: Any, x: np.ndarray, used: np.ndarray, prev: np.ndarray) -> np.ndarray:
        """(N, E, horizons_used) float64 p_h of N calls (as :meth:`logits`): the sigmoid of the logits, the
        mean over the members of an ensemble (summed in order, then divided)."""
        total = None
        for model in (self, *self.members):
            p = 1.0 / (1.0 + np.exp(-model.logits(layers, x, used, prev)[..., : self.horizons_used]))
            total = p if total is None else total + p
        return total if not self.members else total / (1 + len(self.members))

    def log2_distance(self, layers: Any, x: np.ndarray, used: np.ndarray, prev: np.ndarray) -> np.ndarray:
        """(N, E) float64 forecast E[log2 min(d, 128)] of N calls (as :meth:`logits`), rounded to 1/QUANTUM."""
        p = self.probabilities(layers, x, used, prev)
        return np.round((1.0 - p).sum(axis=-1) * QUANTUM) / QUANTUM

    def log2_density(self, layers: Any, x: np.ndarray, used: np.ndarray, prev: np.ndarray) -> np.ndarray:
        """(N, E) float64 log2 of each expert's forecast **hit density** (LHD, Beckmann et al., NSDI 2018)
        of N calls (as :meth:`logits`), rounded to 1/QUANTUM.

        The hits a slot earns per call it is held, kept until the next use or for n_H calls, whichever
        comes first, at the best horizon H >= :data:`DENSITY_FROM`::

            density = max_H  p_H / E[min(d, n_H)],   E[min(d, n_H)] = 1 + sum_{h < H} n_h (1 - p_h)

        (``E[min(d, n)] = sum_{j < n} P(d > j)``, with ``P(d > j) = 1 - p_h`` for ``n_h <= j < 2 n_h``).
        At horizon 1 it is ``p_1``: the unit of a prefetch's probability of use at its call."""
        p = self.probabilities(layers, x, used, prev)
        n = np.asarray(HORIZONS[: p.shape[-1]], dtype=np.float64)
        held = n * (1.0 - p)
        expected = 1.0 + np.cumsum(held, axis=-1) - held  # E[min(d, n_H)] per horizon
        lo = min(DENSITY_FROM, p.shape[-1] - 1)
        density = (p / expected)[..., lo:].max(axis=-1)
        return np.round(np.log2(np.maximum(density, 2.0**DENSITY_FLOOR_LOG2)) * QUANTUM) / QUANTUM

    def forecaster(self) -> Any:
        """The native forecast of this model (``moert._C.ReuseForecaster``, a fresh online state): the
        same features and forward pass as :class:`ReuseState` and :meth:`log2_density` /
        :meth:`log2_distance`, one layer call at a time, in C++ (policy ``learned``'s runtime and
        simulator both call it, so they make the same decisions)."""
        from moert import _C
        from moert.predict import reuse_induction as ind

        def arr(name: str) -> np.ndarray:  # the members' tensors one after the other
            return np.ascontiguousarray(
                np.stack([getattr(m, name) for m in (self, *self.members)]), dtype=np.float64
            )

        return _C.ReuseForecaster(
            layers=self.num_layers, experts=self.num_experts, age_edges=list(AGE_EDGES),
            decays=list(DECAYS), window=ind.INDUCTION_WINDOW, induction_layers=ind.INDUCTION_LAYERS,
            bigram=bool(ind.INDUCTION_BIGRAM), match=list(ind.INDUCTION_MATCH),
            ahead=list(ind.INDUCTION_AHEAD), horizons=list(HORIZONS), horizons_used=self.horizons_used,
            density_from=DENSITY_FROM, quantum=QUANTUM, floor_log2=DENSITY_FLOOR_LOG2,
            members=1 + len(self.members), **{name: arr(name) for name in self.TENSORS},
        )  # fmt: skip

    @staticmethod
    def random(num_layers: int, num_experts: int, seed: int = 0, hidden: int = 8) -> ReuseModel:
        """An untrained model with seeded random weights (tests, benchmarks of the host cost)."""
        g = np.random.default_rng(seed)
        L, E, F, H = num_layers, num_experts, num_dense_features() + 2, len(HORIZONS)

        def r(*shape: int) -> np.ndarray:
            return g.standard_normal(shape)

        return ReuseModel(r(F, hidden), r(hidden), r(hidden, H), r(H), r(L, E, H), r(L, E, E) * 0.3,
                          r(L, E, E) * 0.3, r(H), r(H), info={"random_seed": seed})  # fmt: skip

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file's tensors: this model's by name, member k's (k >= 1) as ``member{k}.NAME``."""
        out = {}
        for k, model in enumerate((self, *self.members)):
            for name in self.TENSORS:
                out[name if k == 0 else f"member{k}.{name}"] = torch.from_numpy(
                    np.ascontiguousarray(getattr(model, name))
                )
        return out


def ensemble(models: list[ReuseModel]) -> ReuseModel:
    """One forecast from several models of the same shapes (e.g. other training seeds): the first with
    the others as its ``members``; ValueError if their tensors' shapes or feature groups differ."""
    if not models:
        raise ValueError("an ensemble needs at least one model")
    first = models[0]
    for k, other in enumerate(models[1:], 1):
        bad = [n for n in ReuseModel.TENSORS if getattr(other, n).shape != getattr(first, n).shape]
        if bad or other.groups != first.groups or other.members:
            raise ValueError(
                f"ensemble member {k} does not match member 0 (tensors {bad}, groups {other.groups} vs "
                f"{first.groups}): train every member with the same --hidden and --features"
            )
    return dataclasses.replace(first, members=tuple(models[1:]))


def _meta(model: ReuseModel, model_type: str, layers: tuple[int, ...], top_k: int) -> PredictorMeta:
    return PredictorMeta(
        kind="reuse",
        model_type=model_type,
        layers=layers,
        num_experts=model.num_experts,
        top_k=top_k,
        arch="mlp-coact",
        dims={
            "hidden": int(model.w1.shape[1]),
            "features": int(model.w1.shape[0]),
            "horizons": list(HORIZONS),
        },
        loss="bce",
        train=model.info,
    )


def save_reuse(
    path: str | os.PathLike, model: ReuseModel, *, model_type: str, layers: tuple[int, ...], top_k: int
) -> Path:
    """Writes the model as a predictor file of kind ``reuse`` (safetensors + JSON header)."""
    from moert.predict.io import save_predictor

    extra = {"groups": list(model.groups), "horizons": list(HORIZONS), "decays": list(DECAYS),
             "horizons_used": model.horizons_used, "induction": induction_config(),
             "members": 1 + len(model.members)}  # fmt: skip
    return save_predictor(path, _meta(model, model_type, layers, top_k), model.tensors(), extra)


def load_reuse(path: str | os.PathLike) -> tuple[ReuseModel, PredictorMeta]:
    """Reads a ``reuse`` file; ValueError naming the file when it is not one (e.g. a routing predictor)."""
    from moert.predict.io import read_predictor_file

    meta, tensors, extra = read_predictor_file(path)
    if meta.kind != "reuse":
        raise ValueError(
            f"{path} is a {meta.kind!r} routing predictor, not a reuse (eviction) model: pass it as the "
            "prefetcher (--policy lru+FILE / predictor=...), and give --evictor a file made by "
            "`moert train --predictor reuse`"
        )
    if extra.get("horizons") != list(HORIZONS) or extra.get("decays") != list(DECAYS):
        raise ValueError(f"{path}: made with other horizons/decays ({extra}); train it again with this moert")
    if extra.get("induction") != induction_config():
        raise ValueError(
            f"{path}: made with other induction features ({extra.get('induction')}; this moert: "
            f"{induction_config()}); train it again with this moert"
        )
    count = extra.get("members", 1)
    if not (isinstance(count, int) and count >= 1):
        raise ValueError(f"{path}: members={count!r} must be an int >= 1; corrupt file? train it again")
    names = [n if k == 0 else f"member{k}.{n}" for k in range(count) for n in ReuseModel.TENSORS]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{path}: tensors {missing} are missing; corrupt file? train it again")
    arrays = {n: tensors[n].double().numpy() for n in ReuseModel.TENSORS}
    L, E, H = arrays["bias"].shape
    F = num_dense_features() + 2
    want = {"w1": (F, None), "bias": (len(meta.layers), meta.num_experts, len(HORIZONS)),
            "coact_self": (L, E, E), "coact_prev": (L, E, E)}  # fmt: skip
    for name, shape in want.items():
        got = arrays[name].shape
        if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
            raise ValueError(f"{path}: tensor {name!r} has shape {got}, expected {shape}; corrupt file?")
    groups = tuple(extra.get("groups", FEATURE_GROUPS))
    used = extra.get("horizons_used", len(HORIZONS))
    if not (isinstance(used, int) and 1 <= used <= len(HORIZONS)):
        raise ValueError(f"{path}: horizons_used={used!r} must be an int in 1..{len(HORIZONS)}")
    models = [ReuseModel(**arrays, groups=groups, info=dict(meta.train), horizons_used=used)]
    for k in range(1, count):
        more = {n: tensors[f"member{k}.{n}"].double().numpy() for n in ReuseModel.TENSORS}
        models.append(ReuseModel(**more, groups=groups, horizons_used=used))
    return ensemble(models), meta
