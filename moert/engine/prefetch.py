"""Predictive prefetch inside a patched model (DESIGN.md §3 steps 1-2, 6): the runtime's hook.

``moert.patch(model, predictor=..., policy="score", overprovision=m | "adaptive")`` puts a
``PrefetchNorm`` (the fused ``PredictiveNorm`` plus a hook) in place of every MoE layer's
``input_layernorm``. Right after the norm of MoE layer ``l`` (before attention), the hook hands the
predictor's logits to the model's policy, ``policy.on_prediction(l, logits, kernel_plan)``
(``moert.policy.base``), and submits the :class:`~moert.policy.base.Plan` it returns to the copy
engine. How logits become prefetch ids and priorities is written once, in the policy's planner
(:class:`moert.policy.score.ScorePlanner`, whose ``spec`` the fused kernel's epilogue follows); the
simulator drives the same object.

On CUDA the plan stays on the device until one non-blocking copy of ``(ids, scores)`` into a pinned
ring buffer; ``CopyEngine.predict_async`` records an event after it and the engine's prediction
thread applies the plan once the bytes arrive, while attention runs: the Python thread never waits
for the predictor. On the CPU twin there is nothing to overlap: the same C++ ``CopyEngine.predict``
is applied at once and its copies are waited for (deterministic, so tests can count hits).

The hook also keeps the predictor's online recall per layer (``observe``, called by the experts
forward with the router's real top-k): recall@k of the per-row top-k and the coverage of the planned
set (true experts that were prefetched), accumulated on the device, read by ``stats``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moert.kernels.predictive_norm import _MAX_LOGITS as MAX_KERNEL_LOGITS
from moert.kernels.predictive_norm import PredictiveNorm

if TYPE_CHECKING:
    from torch import nn

    from moert.models import ModelAdapter, MoELayerRef
    from moert.policy.base import Plan, Policy

__all__ = [
    "ModelDims",
    "PredictionFeed",
    "PrefetchNorm",
    "model_dims",
    "load_pipeline_predictor",
    "attach",
    "detach",
    "capture_and_train",
    "capture_and_train_many",
]

_RING = 8  # pinned host buffers in flight per PredictionFeed (a request holds one until applied)


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


def model_dims(adapter: ModelAdapter, refs: list[MoELayerRef]) -> ModelDims:
    """What a predictor for this model must match."""
    return ModelDims(
        model_type=adapter.model_type,
        layers=tuple(r.index for r in refs),
        num_experts=adapter.num_experts,
        top_k=adapter.top_k,
        hidden_size=adapter.hidden_size,
    )


class PrefetchNorm(PredictiveNorm):
    """``PredictiveNorm`` that hands its logits to a ``PredictionFeed`` right after the norm (before
    attention), then returns the normed rows unchanged."""

    def set_hook(self, feed: PredictionFeed, ordinal: int) -> None:
        object.__setattr__(self, "_feed", feed)  # not a submodule
        self.ordinal = ordinal

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = super().forward(hidden_states)
        feed = self.__dict__.get("_feed")
        if feed is not None and self.last_logits is not None:
            feed.on_logits(self.ordinal, self.last_logits, self.last_plan)
        return normed


class PredictionFeed:
    """Feeds each MoE layer's predictor logits to the model's policy and its plans to the copy engine.

    Args:
        engine: the patched model's ``runtime.CopyEngine``.
        policy: the model's bound policy (``moert.policy.runtime_policy`` with a ``lookahead``).
        device: ``"cpu"``, ``"sim"`` or ``"cuda:N"``.

    Raises:
        ValueError: the policy has no predictor planner (``moert.policy.planner_of``).
    """

    def __init__(self, engine: Any, policy: Policy, device: str) -> None:
        from moert.policy import planner_of

        planner = planner_of(policy)
        if planner is None:
            raise ValueError(f"policy {policy.name!r} takes no predictor; build it with a lookahead")
        self.engine, self.policy, self.planner, self.device = engine, policy, planner, device
        self.L, self.E, self.k = planner.num_layers, planner.num_experts, planner.top_k
        self.d, self.width = planner.lookahead, planner.width
        #: submit through ``predict_async`` (pinned ring + event); the default on CUDA. On the CPU twin
        #: tests set it to run the same path, with the prediction thread applying asynchronously.
        self.asynchronous = device.startswith("cuda")
        self._pred_topk: list[torch.Tensor | None] = [None] * self.L
        self._pred_set: list[torch.Tensor | None] = [None] * self.L
        self._recall: torch.Tensor | None = None  # [L, 2] int64 on the device: top-k hits, covered
        self._total = [0] * self.L
        self._ring: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self._next = 0

    @property
    def spec(self) -> Any:
        """The planner's ``PlanSpec``: how the fused kernel's epilogue makes ids and scores."""
        return self.planner.spec

    # -- the hook ------------------------------------------------------------------------------

    def on_logits(
        self, ordinal: int, logits: torch.Tensor, kernel_plan: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """Called by ``PrefetchNorm`` of MoE layer ``ordinal`` before attention runs.

        Args:
            ordinal: cache layer.
            logits: (..., 1+d, E) or (..., E) fp32 logits of the batch's rows, on the device.
            kernel_plan: ``(ids (1+d, width) int32, scores (1+d, E) fp32)`` made by the fused kernel
                with ``self.spec``, or None (the planner makes them).
        """
        with torch.no_grad():
            logits = logits.detach()
            plan = self.policy.on_prediction(ordinal, logits, kernel_plan)
            planned = self.planner.last_planned  # [n, width], also when nothing is prefetched
            own = logits.reshape(-1, self.d + 1, self.E)[:, 0]  # [T, E]
            self._pred_topk[ordinal] = own.topk(self.k, dim=-1).indices  # [T, k]
            self._pred_set[ordinal] = planned[0] if self.planner.do_prefetch else planned[0, : self.k]
            if plan is None:
                return
            if self.asynchronous:
                self._submit_async(plan)
            elif self.engine.predict(*plan.predict_args()):
                # CPU twin: synchronous, so every eviction decision (made among ready slots) and
                # every count is the same from run to run
                self.engine.synchronize()

    def _submit_async(self, plan: Plan) -> None:
        """One non-blocking device-to-host copy into a pinned ring slot, then ``predict_async``."""
        if not self._ring:
            pin = self.device.startswith("cuda")  # page-locked: the device-to-host copy is truly asynchronous
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
        n = len(plan.layers)
        if plan.ids is None:  # prefetch="off": an (n, 0) block
            hid = host_ids[:n, :0]
        else:
            hid = host_ids[:n, : plan.ids.shape[1]]
            hid.copy_(plan.ids, non_blocking=True)
        hsc = None
        if plan.scores is not None:
            hsc = host_scores[:n]
            hsc.copy_(plan.scores, non_blocking=True)
        ticket = self.engine.predict_async(list(plan.layers), hid, hsc, list(plan.clear), plan.clear_score)
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
    model: nn.Module, refs: list[MoELayerRef], predictor: Any, policy: Policy, engine: Any, device: str
) -> tuple[PredictionFeed, list[tuple[nn.Module, nn.Module]]]:
    """Installs a ``PrefetchNorm`` on every MoE layer of ``refs`` and returns the feed and the
    ``(layer, original norm)`` pairs that ``detach`` restores.

    Args:
        model: the patched model.
        refs: its MoE layers.
        predictor: the loaded ``preattn`` predictor (``load_pipeline_predictor``).
        policy: the model's bound policy, built with the predictor's lookahead.
        engine: the model's ``runtime.CopyEngine``.
        device: the cache's device.

    Raises:
        ValueError: the fused kernel cannot hold the predictor's outputs, or a norm is not one
            ``PredictiveNorm`` knows.
    """
    meta = predictor.meta
    num_experts = policy.num_experts
    lookahead = meta.lookahead + 1 if meta.lookahead else 0  # PredictiveNorm's d: (T, d, E) blocks
    outputs = (meta.lookahead + 1) * num_experts
    if device.startswith("cuda") and outputs > MAX_KERNEL_LOGITS:
        raise ValueError(
            f"the predictor has (1+lookahead)*E = {outputs} outputs per row; the fused kernel holds at most "
            f"{MAX_KERNEL_LOGITS}: use a predictor with lookahead <= {MAX_KERNEL_LOGITS // num_experts - 1}"
        )
    feed = PredictionFeed(engine, policy, device)
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
            prefetch=feed.spec,
        )
        norm.set_hook(feed, ordinal)
        norms.append((ref.layer, ref.norm, norm))
    for layer, _, norm in norms:
        layer.input_layernorm = norm
    return feed, [(layer, original) for layer, original, _ in norms]


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
    return capture_and_train_many(
        model,
        prompts,
        (lookahead,),
        new_tokens=new_tokens,
        val_prompts=val_prompts,
        dim=dim,
        epochs=epochs,
        seed=seed,
    )[lookahead]


def capture_and_train_many(
    model: nn.Module,
    prompts: list[torch.Tensor],
    lookaheads: tuple[int, ...],
    *,
    new_tokens: int = 16,
    val_prompts: int = 4,
    dim: int = 64,
    epochs: int = 15,
    seed: int = 0,
) -> dict[int, Any]:
    """``capture_and_train`` for several lookahead depths from one capture: ``{d: predictor}``."""
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
    return {
        d: train_preattn(
            meta, seqs[:n], seqs[n:], arch="linear2", loss="wbce", lookahead=d, dim=dim, cfg=cfg
        )[0]
        for d in lookaheads
    }
