"""Predictive prefetch inside a patched model (DESIGN.md §3 steps 1-2, 6).

``moert.patch(model, predictor=..., policy="score", overprovision=m | "adaptive")`` puts a
``PrefetchNorm`` (the fused ``PredictiveNorm`` plus a hook) in place of every MoE layer's
``input_layernorm``. For MoE layer ``l`` the hook turns the predictor's logits into:

- prefetch ids: per predicted layer (``l``, and ``l+1..l+d`` for a lookahead predictor), the
  top-(k+m) experts by probability (over a batch: the max over rows), or in the adaptive mode
  every expert above ``threshold``, at least k, at most ``k + max_overprovision``; -1 pads a row;
- priorities (policy ``"score"``, evict the lowest first, ties by recency): each predicted layer's
  E priorities become its probabilities of the prefetched ids (0 for the rest), weighted
  ``score_decay ** j`` for layer ``l+j``; the layer that just ran (``l-1``, cyclically) gets a
  negative score lower than every layer before it. In a decode cycle over L layers the layer that
  ran last is needed again last, so it goes first (Belady's order over layers), where LRU would
  evict the layer about to run (``bench/results/decode_cpu.md``: rows "lru+pred m=2" vs
  "score+pred m=2", the same prefetches).

The ids and scores are made by ``moert.kernels.prefetch_plan`` (``PlanSpec``): on CUDA by the
epilogue of the fused norm + predictor kernel, so one launch goes from the layer's rows to the
plan; on CPU devices by its PyTorch reference. On CUDA everything stays on the device until one
non-blocking copy of ``(ids, scores)`` into a pinned ring buffer; ``CopyEngine.predict_async``
records an event after it and the engine's prediction thread applies the prediction once the
bytes arrive, while attention runs: the Python thread never waits for the predictor. On the CPU
twin there is nothing to overlap: the same C++ ``CopyEngine.predict`` is applied at once and its
copies are waited for (deterministic, so tests can count hits).

The hook also keeps the predictor's online recall per layer (``observe``, called by the experts
forward with the router's real top-k): recall@k of the per-row top-k and the coverage of the
prefetched set (true experts that were prefetched), accumulated on the device, read by ``stats``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moert.kernels.predictive_norm import _MAX_LOGITS as MAX_KERNEL_LOGITS
from moert.kernels.predictive_norm import PredictiveNorm
from moert.kernels.prefetch_plan import PlanSpec, prefetch_plan_reference

if TYPE_CHECKING:
    from torch import nn

    from moert.api.config import OffloadConfig
    from moert.models import ModelAdapter, MoELayerRef

__all__ = [
    "ModelDims",
    "Prediction",
    "Prefetcher",
    "PrefetchNorm",
    "load_pipeline_predictor",
    "attach",
    "detach",
    "capture_and_train",
]

_RING = 8  # pinned host buffers in flight per Prefetcher (a request holds one until applied)
# clear scores count down -1, -2, ... and wrap here (float32 holds these integers exactly); at a wrap
# the order of the layers that ran before it is lost once, and recency orders them instead
_CLEAR_WRAP = 1 << 22


@dataclass(frozen=True)
class Prediction:
    """One layer's prediction as the copy engine applies it (``CopyEngine.predict``'s arguments).

    Attributes:
        layers: the n predicted cache layers (the layer's own, then lookahead layers).
        ids: (n, width) int32 experts to prefetch, most likely first, -1 pads ((n, 0) with
            ``prefetch="off"``).
        scores: (n, E) fp32 eviction priorities (policy ``"score"``), else None.
        clear: the layers whose priorities drop to ``clear_score`` first (the layer that just ran).
        clear_score: below every earlier clear.
        planned: (n, width) the plan's ids, also when nothing is prefetched (online recall).
    """

    layers: list[int]
    ids: torch.Tensor
    scores: torch.Tensor | None
    clear: list[int]
    clear_score: float
    planned: torch.Tensor


@dataclass(frozen=True)
class ModelDims:
    """What a predictor must match (the fields ``moert.predict.base.check_compatible`` reads)."""

    model_type: str
    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int


def load_pipeline_predictor(predictor: Any, dims: ModelDims) -> Any:
    """A ``preattn`` predictor object from ``predictor`` (object or file path), checked against the model.

    Raises:
        ValueError: not a preattn predictor, or its header does not match the model (model_type,
            layers, E, k, H), naming every mismatch.
    """
    from moert.predict.base import check_compatible

    where = "predictor"
    if isinstance(predictor, (str, os.PathLike)):
        from moert.predict.io import load_predictor

        where = str(predictor)
        predictor = load_predictor(predictor)
    meta = getattr(predictor, "meta", None)
    if meta is None:
        raise ValueError(
            f"predictor={type(predictor).__name__} is neither a moert predictor nor a path to one; "
            "pass the .safetensors file written by `moert train`"
        )
    if meta.kind != "preattn":
        raise ValueError(
            f"{where} is a {meta.kind!r} predictor; the patched pipeline runs a 'preattn' predictor fused "
            "with the pre-attention norm: train one with `moert train --kind preattn`"
        )
    try:
        check_compatible(meta, dims, where=where)
    except ValueError as exc:
        raise ValueError(str(exc).replace("the trace", "the model").replace("vs trace", "vs model")) from None
    return predictor


class PrefetchNorm(PredictiveNorm):
    """``PredictiveNorm`` that hands its logits to a ``Prefetcher`` right after the norm (before
    attention), then returns the normed rows unchanged."""

    def set_hook(self, prefetcher: Prefetcher, ordinal: int) -> None:
        object.__setattr__(self, "_prefetcher", prefetcher)  # not a submodule
        self.ordinal = ordinal

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = super().forward(hidden_states)
        prefetcher = self.__dict__.get("_prefetcher")
        if prefetcher is not None and self.last_logits is not None:
            prefetcher.on_logits(self.ordinal, self.last_logits, self.last_plan)
        return normed


class Prefetcher:
    """Turns per-layer predictor logits into prefetches and priorities on one copy engine.

    Args:
        engine: the patched model's ``runtime.CopyEngine``.
        cfg: the offload config (``overprovision``, ``threshold``, ``max_overprovision``,
            ``prefetch``, ``policy``, ``score_decay``).
        num_layers: L offloaded MoE layers (cache layers 0..L-1).
        num_experts: E.
        top_k: k.
        lookahead: the predictor's d (its logits are (T, 1+d, E) when d > 0).
        probabilities: ``"sigmoid"`` (logits of a BCE-style loss) or ``"clamp"`` (mse on router scores).
        device: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(
        self,
        engine: Any,
        cfg: OffloadConfig,
        num_layers: int,
        num_experts: int,
        top_k: int,
        lookahead: int,
        probabilities: str,
        device: str,
    ) -> None:
        self.engine, self.cfg = engine, cfg
        self.L, self.E, self.k, self.d = num_layers, num_experts, top_k, lookahead
        self.adaptive = cfg.overprovision == "adaptive"
        m = cfg.max_overprovision if self.adaptive else int(cfg.overprovision)
        self.width = min(num_experts, top_k + m)
        self.probabilities = probabilities
        self.device = device
        #: submit through ``predict_async`` (pinned ring + event); the default on CUDA. On the CPU twin
        #: tests set it to run the same path, with the prediction thread applying asynchronously.
        self.asynchronous = device.startswith("cuda")
        self.push_scores = cfg.policy == "score"
        self.do_prefetch = cfg.prefetch == "async"
        #: how logits become ids and scores (made by the fused kernel's epilogue on CUDA)
        self.spec = PlanSpec(
            width=self.width,
            top_k=top_k,
            adaptive=self.adaptive,
            threshold=cfg.threshold,
            probabilities=probabilities,
            score_decay=cfg.score_decay,
        )
        self._pred_topk: list[torch.Tensor | None] = [None] * num_layers
        self._pred_set: list[torch.Tensor | None] = [None] * num_layers
        self._recall: torch.Tensor | None = None  # [L, 2] int64 on the device: top-k hits, covered
        self._total = [0] * num_layers
        self._ring: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self._next = 0
        self._step = 0

    # -- the hook ------------------------------------------------------------------------------

    def plan(self, ordinal: int, logits: torch.Tensor) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """The prediction for MoE layer ``ordinal``: ``(layers, ids (n, width) int32, scores (n, E) fp32)``.

        Args:
            ordinal: cache layer of the norm that produced ``logits``.
            logits: (..., E) or (..., 1+d, E) fp32 predictor logits, one row per token.
        """
        rows = logits.reshape(-1, self.d + 1, self.E)  # [T, 1+d, E]
        n = self._depth(ordinal)
        ids, scores = prefetch_plan_reference(rows[:, :n], self.spec)
        return list(range(ordinal, ordinal + n)), ids, scores

    def _depth(self, ordinal: int) -> int:
        """Predicted layers of MoE layer ``ordinal``: lookahead past the last MoE layer is ignored."""
        return min(self.d + 1, self.L - ordinal)

    def prediction(
        self, ordinal: int, logits: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> Prediction:
        """What MoE layer ``ordinal`` hands the copy engine for these logits (advances the clear
        counter; applies nothing). The simulator replays exactly this.

        Args:
            ordinal: cache layer.
            logits: (..., 1+d, E) or (..., E) fp32 logits of the batch's rows.
            plan: ``(ids (1+d, width), scores (1+d, E))`` already made from ``logits`` by the fused
                kernel with ``self.spec``, or None to make it here.
        """
        if plan is None:
            layers, ids, scores = self.plan(ordinal, logits)
        else:
            n = self._depth(ordinal)
            layers, ids, scores = list(range(ordinal, ordinal + n)), plan[0][:n], plan[1][:n]
        clear = [(ordinal - 1) % self.L] if self.push_scores and self.L > 1 else []
        # the layer that just ran goes below every earlier one: its next use is the farthest
        self._step = self._step % _CLEAR_WRAP + 1
        return Prediction(
            layers=layers,
            ids=ids if self.do_prefetch else ids[:, :0],
            scores=scores if self.push_scores else None,
            clear=clear,
            clear_score=-float(self._step),
            planned=ids,
        )

    def predict_sequence(
        self, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[int]]:
        """Every decode step of one sequence at once: what ``prediction(l, logits[l, t])`` returns
        for t = 0..T-1 and, within a step, l = 0..L-1 (token-major, as a decode runs), one row per
        step (batch 1). Advances the clear counter as those T*L calls would.

        Args:
            logits: (L, T, 1+d, E) fp32.

        Returns:
            ``(ids (T, L, 1+d, width) int32, scores (T, L, 1+d, E) fp32 or None, clear_score (T, L)
            fp32, clear_layers)``: row j of layer l is for layer l+j (rows past the last layer are
            -1 / 0); ``clear_layers[l]`` is the layer cleared at layer l (-1: none).
        """
        L, T, depth, E = logits.shape
        if (L, depth, E) != (self.L, self.d + 1, self.E):
            raise ValueError(
                f"predict_sequence: logits {tuple(logits.shape)} must be (L={self.L}, T, {self.d + 1}, E={self.E})"
            )
        # [L, T, 1, 1+d, E]: every step is a batch of one row
        ids, scores = prefetch_plan_reference(logits.unsqueeze(2), self.spec)  # [L, T, 1+d, w|E]
        for ordinal in range(L):  # lookahead past the last MoE layer is ignored
            n = self._depth(ordinal)
            ids[ordinal, :, n:] = -1
            scores[ordinal, :, n:] = 0.0
        if not self.do_prefetch:
            ids = ids[..., :0]
        steps = self._step + 1 + torch.arange(T * L, dtype=torch.float64).view(T, L)
        steps = torch.remainder(steps - 1, _CLEAR_WRAP) + 1  # the counter wraps as in `prediction`
        self._step = int(steps[-1, -1].item()) if T else self._step
        clear = -steps.to(torch.float32)
        clear_layers = [(o - 1) % L if self.push_scores and L > 1 else -1 for o in range(L)]
        return (
            ids.transpose(0, 1).contiguous(),
            scores.transpose(0, 1).contiguous() if self.push_scores else None,
            clear,
            clear_layers,
        )

    def on_logits(
        self, ordinal: int, logits: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """Called by ``PrefetchNorm`` of MoE layer ``ordinal`` before attention runs: the
        ``prediction`` goes to the copy engine, and the online-recall bookkeeping is set up."""
        with torch.no_grad():
            logits = logits.detach()
            p = self.prediction(ordinal, logits, plan)
            own = logits.reshape(-1, self.d + 1, self.E)[:, 0]  # [T, E]
            self._pred_topk[ordinal] = own.topk(self.k, dim=-1).indices  # [T, k]
            self._pred_set[ordinal] = p.planned[0] if self.do_prefetch else p.planned[0, : self.k]  # [width]
            if self.asynchronous:
                self._submit_async(p.layers, p.ids, p.scores, p.clear, p.clear_score)
            elif self.engine.predict(p.layers, p.ids, p.scores, p.clear, p.clear_score):
                # CPU twin: synchronous, so every eviction decision (made among ready slots) and
                # every count is the same from run to run
                self.engine.synchronize()

    def _submit_async(
        self,
        layers: list[int],
        ids: torch.Tensor,
        scores: torch.Tensor | None,
        clear: list[int],
        clear_score: float,
    ) -> None:
        """One non-blocking device-to-host copy into a pinned ring slot, then ``predict_async``."""
        if not self._ring:
            pin = ids.is_cuda  # page-locked, so the device-to-host copy is truly asynchronous
            for _ in range(_RING):
                self._ring.append(
                    (
                        torch.empty(self.d + 1, self.width, dtype=torch.int32, pin_memory=pin),
                        torch.empty(self.d + 1, self.E, dtype=torch.float32, pin_memory=pin),
                        0,
                    )
                )
        i = self._next
        host_ids, host_scores, ticket = self._ring[i]
        if ticket and self.engine.predictions_done() < ticket:
            self.engine.wait_predictions(ticket)  # rare: the prediction thread is _RING requests behind
        n, w = ids.shape  # w is self.width, or 0 with prefetch="off": a contiguous block either way
        hid = host_ids[:n, :w]
        hid.copy_(ids, non_blocking=True)
        hsc = None
        if scores is not None:
            hsc = host_scores[:n]
            hsc.copy_(scores, non_blocking=True)
        ticket = self.engine.predict_async(layers, hid, hsc, clear, clear_score)
        self._ring[i] = (host_ids, host_scores, ticket)
        self._next = (i + 1) % _RING

    def observe(self, ordinal: int, top_k_index: torch.Tensor) -> None:
        """Scores this layer's prediction against the router's selection (device ops, no host sync).

        Args:
            ordinal: cache layer.
            top_k_index: (T, k) the router's selected experts.
        """
        pred = self._pred_topk[ordinal]
        pset = self._pred_set[ordinal]
        if pred is None or pset is None:
            return
        true = top_k_index.reshape(-1, top_k_index.shape[-1])  # [T, k]
        if pred.shape[0] != true.shape[0] or pred.device != true.device:
            return
        if self._recall is None:
            self._recall = torch.zeros(self.L, 2, dtype=torch.int64, device=true.device)
        # predicted top-k that the router chose: [T, k, 1] == [T, 1, k] -> any over the router's k
        hit_k = (pred.unsqueeze(-1) == true.unsqueeze(1)).any(dim=-1).sum()
        covered = torch.isin(true, pset).sum()  # chosen experts that were in the prefetched set
        self._recall[ordinal, 0] += hit_k
        self._recall[ordinal, 1] += covered
        self._total[ordinal] += true.numel()
        self._pred_topk[ordinal] = self._pred_set[ordinal] = None

    def recall(self) -> list[tuple[int, int, int]]:
        """Per cache layer ``(top-k hits, covered, selections)`` since the last reset: recall@k is
        ``hits / selections``, coverage ``covered / selections``."""
        if self._recall is None:
            return [(0, 0, 0)] * self.L
        acc = self._recall.cpu().tolist()
        return [(a, c, t) for (a, c), t in zip(acc, self._total)]

    def reset_stats(self) -> None:
        if self._recall is not None:
            self._recall.zero_()
        self._total = [0] * self.L

    def close(self) -> None:
        """Waits until every submitted prediction is applied (the ring buffers may then be freed)."""
        if self._ring:
            last = max(t for _, _, t in self._ring)
            if last and not self.engine.closed:
                self.engine.wait_predictions(last)
        self._ring = []


def attach(
    model: nn.Module,
    adapter: ModelAdapter,
    refs: list[MoELayerRef],
    cfg: OffloadConfig,
    engine: Any,
    device: str,
) -> tuple[Prefetcher, list[tuple[nn.Module, nn.Module]]]:
    """Installs a ``PrefetchNorm`` on every MoE layer of ``refs`` and returns the prefetcher and the
    ``(layer, original norm)`` pairs that ``detach`` restores.

    Raises:
        ValueError: the predictor does not fit the model, or a norm is not one ``PredictiveNorm`` knows.
    """
    dims = ModelDims(
        model_type=adapter.model_type,
        layers=tuple(r.index for r in refs),
        num_experts=adapter.num_experts,
        top_k=adapter.top_k,
        hidden_size=adapter.hidden_size,
    )
    predictor = load_pipeline_predictor(cfg.predictor, dims)
    meta = predictor.meta
    probabilities = "clamp" if meta.loss == "mse" else "sigmoid"
    prefetcher = Prefetcher(
        engine, cfg, len(refs), adapter.num_experts, adapter.top_k, meta.lookahead, probabilities, device
    )
    lookahead = meta.lookahead + 1 if meta.lookahead else 0  # PredictiveNorm's d: (T, d, E) blocks
    outputs = (meta.lookahead + 1) * adapter.num_experts
    if device.startswith("cuda") and outputs > MAX_KERNEL_LOGITS:
        raise ValueError(
            f"the predictor has (1+lookahead)*E = {outputs} outputs per row; the fused kernel holds at most "
            f"{MAX_KERNEL_LOGITS}: use a predictor with lookahead <= {MAX_KERNEL_LOGITS // adapter.num_experts - 1}"
        )
    norms = []
    for ordinal, ref in enumerate(refs):
        if getattr(ref.layer, "input_layernorm", None) is not ref.norm:
            raise ValueError(
                f"decoder layer {ref.index} has no input_layernorm module to replace (found "
                f"{type(getattr(ref.layer, 'input_layernorm', None)).__name__}); the predictor pipeline needs it"
            )
        norm = PrefetchNorm(
            ref.norm,
            predictor.w1[ordinal],
            predictor.b1[ordinal],
            predictor.w2[ordinal],
            predictor.b2[ordinal],
            act=predictor.act,
            lookahead=lookahead,
            prefetch=prefetcher.spec,
        )
        norm.set_hook(prefetcher, ordinal)
        norms.append((ref.layer, ref.norm, norm))
    for layer, _, norm in norms:
        layer.input_layernorm = norm
    return prefetcher, [(layer, original) for layer, original, _ in norms]


def detach(pairs: list[tuple[nn.Module, nn.Module]]) -> None:
    """Puts the original norm modules back (the inverse of ``attach``)."""
    for layer, original in pairs:
        layer.input_layernorm = original


def capture_and_train(
    model: nn.Module,
    prompts: list[torch.Tensor],
    *,
    new_tokens: int = 16,
    val_prompts: int = 4,
    lookahead: int = 0,
    dim: int = 64,
    epochs: int = 15,
    seed: int = 0,
) -> Any:
    """A ``preattn`` predictor for ``model`` in seconds (tiny models): captures its routing with the
    pre-attention rows on ``prompts`` (greedy, ``new_tokens`` each), trains ``linear2`` / ``wbce``
    on all but the last ``val_prompts`` sequences (validated on those) and returns it.

    Args:
        model: an unpatched model of a supported type.
        prompts: (P,) int64 prompt ids each; they should not include the prompts it is judged on.
        new_tokens: decode tokens generated per prompt (decode rows are what a decode cache sees).
        val_prompts: sequences kept for early stopping.
        lookahead: the predictor's d.
        dim: predictor hidden width D.
        epochs: training epochs (early-stopped).
        seed: training seed.
    """
    import tempfile
    from pathlib import Path

    from moert.predict.data import open_sequences
    from moert.predict.preattn import train_preattn
    from moert.predict.train import TrainConfig
    from moert.trace.record import capture

    if not 0 < val_prompts < len(prompts):
        raise ValueError(
            f"val_prompts={val_prompts} must be in 1..{len(prompts) - 1} for {len(prompts)} prompts"
        )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trace"
        capture(model, prompts, out, max_new_tokens=new_tokens, with_hidden=True)
        meta, seqs = open_sequences(str(out))
    cfg = TrainConfig(epochs=epochs, batch_size=128, progress=False, seed=seed, device="cpu")
    n = len(seqs) - val_prompts
    pred, _ = train_preattn(
        meta, seqs[:n], seqs[n:], arch="linear2", loss="wbce", lookahead=lookahead, dim=dim, cfg=cfg
    )
    return pred
