"""The policy contract: one object per policy, driven by the runtime and by the simulator alike.

A :class:`Policy` never picks victims: the C++ ``SlabCache`` does, by its ``cache_policy``
(``lru``, ``lfu``, or ``priority``: lowest score first, ties by least recent use). A policy answers
at fixed points of a MoE layer call with a :class:`Plan` (scores to push, experts to prefetch), and
both drivers call those hooks at the same points, for layer ``l`` of every token (decode) or verify
pass (speculative decoding), token-major::

    plan = on_prediction(l, logits)        before layer l runs (attention still to come)
    apply(plan)
    plan = on_routed(l, counts, resident)  the router picked; the experts are not acquired yet
    apply(plan)
    ... the layer's experts are acquired (hits, demand loads), computed, released ...
    plan = after_call(l, counts)           the layer's call is over
    apply(plan)

``apply`` is ``CopyEngine.predict(*plan.predict_args())`` in the runtime and
:func:`moert.sim.step.apply_plan` (the same order on a simulated ``SlabCache``) in the simulator.

- The runtime (``moert.engine``) builds one policy per patched model, calls :meth:`Policy.bind`
  once, then the three hooks; ``on_prediction`` only where a predictor runs (``PrefetchNorm``).
  Policies with ``offline = True`` read the future or the trace and are refused there.
- The simulator's stepping driver (:mod:`moert.sim.step`, the definition) calls ``bind``,
  :meth:`Policy.prepare` (the whole trace, once), then per sequence :meth:`Policy.begin_sequence`,
  per token :meth:`Policy.begin_token` and the three hooks (``on_prediction`` at every access, with
  the logits of :meth:`Policy.sequence_logits` or None), then :meth:`Policy.end_sequence`.
- The simulator's fast path (:mod:`moert.sim.fast`) asks instead, per sequence, for
  :meth:`Policy.sequence_plan`: the same plans for every step at once, as arrays
  (:class:`SequencePlan`), replayed by a few C++ calls. Tests replay every registered policy both
  ways and check that they agree access by access.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from moert.trace import SequenceTrace, Trace, TraceMeta

__all__ = ["Plan", "Policy", "Predictions", "SequencePlan", "TokenContext", "as_numpy"]

ROLES = ("evict", "prefetch")


def as_numpy(x: Any, dtype: Any) -> np.ndarray:
    """A contiguous host numpy array of ``x`` (numpy array, torch tensor on any device, or a list)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


def _rows(x: Any) -> int:
    return int(x.shape[0])


@dataclass(frozen=True)
class Plan:
    """What a policy asks of the cache at one hook: the arguments of the C++ ``CopyEngine.predict``.

    Applied in this order (csrc/include/moert/copy_engine.h, "Predictions"): every expert of each
    layer in ``clear`` gets the priority ``clear_score``; row ``j`` of ``scores`` replaces all E
    priorities of ``layers[j]``; then row ``j`` of ``ids`` is prefetched into ``layers[j]``, rows in
    order (the cache skips resident and in-flight experts; a prefetch never evicts the experts
    pinned for the running layer). Priorities only matter under ``cache_policy == "priority"``.

    ``ids`` and ``scores`` are numpy arrays or torch tensors, on the host or (runtime: what the
    fused kernel made) on the device; :meth:`predict_args` and ``moert.sim.step.apply_plan`` take
    either. A plan is never modified after it is returned.

    Attributes:
        layers: the n cache layers the rows are for (the runtime's MoE layer ordinals).
        ids: (n, w) int32 expert ids, most wanted first, -1 pads; or None (nothing prefetched).
        scores: (n, E) float32 priorities replacing each listed layer's, or None (none replaced).
        clear: layers whose E priorities all drop to ``clear_score`` first.
        clear_score: a finite float.
    """

    layers: tuple[int, ...] = ()
    ids: Any = None
    scores: Any = None
    clear: tuple[int, ...] = ()
    clear_score: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.layers)
        for name in ("ids", "scores"):
            rows = getattr(self, name)
            if rows is not None and (len(rows.shape) != 2 or _rows(rows) != n):
                raise ValueError(
                    f"Plan.{name} has shape {tuple(rows.shape)}; it needs one row per layer of {self.layers}"
                )

    @property
    def empty(self) -> bool:
        """True when applying the plan changes nothing."""
        return not self.clear and self.scores is None and (self.ids is None or self.ids.shape[1] == 0)

    def predict_args(self) -> tuple[list[int], Any, Any, list[int], float]:
        """``(layers, ids, scores, clear, clear_score)`` for ``CopyEngine.predict``; ``ids`` is an
        (n, 0) int32 array when the plan prefetches nothing."""
        ids = np.empty((len(self.layers), 0), dtype=np.int32) if self.ids is None else self.ids
        return list(self.layers), ids, self.scores, list(self.clear), float(self.clear_score)

    def priorities_only(self) -> Plan | None:
        """The plan without its prefetch (None when nothing is left)."""
        if self.scores is None and not self.clear:
            return None
        return Plan(self.layers, None, self.scores, self.clear, self.clear_score)

    def prefetch_only(self) -> Plan | None:
        """The plan without its priorities (None when nothing is left)."""
        if self.ids is None:
            return None
        return Plan(self.layers, self.ids, None)

    @staticmethod
    def merge(first: Plan | None, then: Plan | None) -> Plan | None:
        """One plan that applies ``first``'s priorities, then ``then``'s (both as one ``predict``).

        At most one of them may set priorities, and only ``then`` may prefetch. Rows of layers that
        only ``then`` lists need ``first`` to replace no scores (else ValueError: no single plan
        leaves those layers' priorities unchanged).
        """
        if first is None or first.empty:
            return then
        if then is None or then.empty:
            return first
        if first.ids is not None or then.scores is not None or then.clear:
            raise ValueError("Plan.merge: the first plan may only set priorities, the second only prefetch")
        layers = list(first.layers) + [layer for layer in then.layers if layer not in first.layers]
        if first.scores is not None and len(layers) > len(first.layers):
            raise ValueError(
                f"Plan.merge: layers {layers[len(first.layers) :]} are prefetched but get no scores while "
                f"layers {first.layers} do; return the two plans from different hooks"
            )
        src = as_numpy(then.ids, np.int32)  # [n_then, w]
        ids = np.full((len(layers), src.shape[1]), -1, dtype=np.int32)
        for j, layer in enumerate(then.layers):
            ids[layers.index(layer)] = src[j]
        return Plan(tuple(layers), ids, first.scores, first.clear, first.clear_score)


@dataclass(frozen=True)
class Predictions:
    """The plans one hook makes before every access of a sequence, as arrays (fast path).

    Before the access of MoE layer ``l`` for token ``t``, in this order (one ``Plan``): every expert
    of layer ``(l - 1) % L`` gets the priority ``clear[t, l]`` (NaN: nothing is cleared); the E
    priorities of layer ``l + j`` become ``scores[t, l, j]``; then ``ids[t, l, j]`` are prefetched
    into layer ``l + j``, for ``j = 0 .. n-1`` with ``l + j < L`` (rows past the last layer are
    ignored).

    Attributes:
        ids: (T, L, n, w) int32 expert ids, most likely first, -1 pads.
        scores: (T, L, n, E) float32 priorities, or None (none set).
        clear: (T, L) float32 priority of the layer that just ran (NaN: none), or None.
    """

    ids: np.ndarray
    scores: np.ndarray | None = None
    clear: np.ndarray | None = None

    def __post_init__(self) -> None:
        T, L, n, _ = self.ids.shape
        if (self.scores is not None and self.scores.shape[:3] != (T, L, n)) or (
            self.clear is not None and self.clear.shape != (T, L)
        ):
            raise ValueError(
                f"Predictions: ids {self.ids.shape}, scores {getattr(self.scores, 'shape', None)} and clear "
                f"{getattr(self.clear, 'shape', None)} must be (T, L, n, w), (T, L, n, E) and (T, L)"
            )

    @property
    def lookahead(self) -> int:
        """d: rows per access beyond the accessed layer's own."""
        return self.ids.shape[2] - 1

    @property
    def simple(self) -> bool:
        """Only the accessed layer's prefetch (a C++ ``replay`` prefetch row per step)."""
        return self.lookahead == 0 and self.scores is None and self.clear is None

    def own_rows(self) -> np.ndarray:
        """(L, T, w) int32: the prefetch ids of each access's own layer."""
        return np.ascontiguousarray(self.ids[:, :, 0].transpose(1, 0, 2))

    def ids_only(self) -> Predictions:
        return Predictions(self.ids)

    @staticmethod
    def from_rows(rows: np.ndarray) -> Predictions:
        """Own-layer prefetch rows (L, T, w) as Predictions."""
        L, T, w = rows.shape
        return Predictions(np.ascontiguousarray(rows.transpose(1, 0, 2)).reshape(T, L, 1, w).astype(np.int32))

    @staticmethod
    def concatenate(parts: Sequence[Predictions]) -> Predictions:
        """The predictions of consecutive sequences as one (tokens concatenated)."""

        def cat(name: str) -> np.ndarray | None:
            got = [getattr(p, name) for p in parts]
            return None if any(g is None for g in got) else np.concatenate(got)

        width = max(p.ids.shape[3] for p in parts)
        ids = [
            np.pad(p.ids, ((0, 0),) * 3 + ((0, width - p.ids.shape[3]),), constant_values=-1) for p in parts
        ]
        return Predictions(np.concatenate(ids), cat("scores"), cat("clear"))


@dataclass(frozen=True)
class SequencePlan:
    """A policy's plans for every step of one sequence, made at once: the simulator's fast path.

    Each field is what stepping the hooks through the sequence applies, as arrays; None: nothing.
    T counts tokens (or verify passes), L MoE layers.

    Attributes:
        token_scores: (T, L, E) float32: before token t (its first hook), every layer's priorities.
        before: the plans applied before each access (``on_prediction`` / ``on_routed``).
        access_scores: (L, T, w) float32: right after each access, the priorities of the accessed
            experts (the step's experts, in trace order; entries at -1 pads are ignored).
        after_scores: (T, L, E) float32: after each call of layer l, its E priorities.
        after_ids: (T, L, w) int32: after each call of layer l, prefetched into l (-1 pads).
    """

    token_scores: np.ndarray | None = None
    before: Predictions | None = None
    access_scores: np.ndarray | None = None
    after_scores: np.ndarray | None = None
    after_ids: np.ndarray | None = None

    @property
    def stepwise(self) -> bool:
        """True when some plan cannot be a C++ ``replay`` row (it replays access by access)."""
        return self.before is not None and not self.before.simple

    @staticmethod
    def concatenate(parts: Sequence[SequencePlan]) -> SequencePlan:
        """The plans of consecutive sequences as one (tokens concatenated)."""

        def cat(name: str, axis: int) -> np.ndarray | None:
            got = [getattr(p, name) for p in parts]
            if all(g is None for g in got):
                return None
            if any(g is None for g in got):
                raise ValueError(f"SequencePlan.concatenate: {name} is missing for some sequences")
            return np.concatenate(got, axis=axis)

        before = [p.before for p in parts]
        return SequencePlan(
            token_scores=cat("token_scores", 0),
            before=None if before[0] is None else Predictions.concatenate(before),
            access_scores=cat("access_scores", 1),
            after_scores=cat("after_scores", 0),
            after_ids=cat("after_ids", 0),
        )


class Policy:
    """Base class: every hook does nothing (the C++ ``cache_policy`` alone decides).

    Class attributes:
        name: registry name (``moert simulate --policy NAME``).
        cache_policy: the C++ victim order: ``"lru"``, ``"lfu"`` or ``"priority"``.
        offline: needs the whole trace (the future, or sequence boundaries): simulator only.
        fast_path: :meth:`sequence_plan` gives the plans of a whole sequence at once.
        roles: where it may stand in ``EVICT[+PREFETCH]``.
        uses_prediction_scores: as ``EVICT``, it orders eviction by the ``PREFETCH`` part's scores
            and clears (``score``).
        gives_scores: as ``PREFETCH``, its plans carry scores fit for ``score``.
        verify_passes: replays speculative verify passes (a call = a pass; ``counts`` up to N).
        arg_help: the argument a ``PREFETCH`` name takes, for help texts (e.g. ``"[:m]"``).
        evict_arg_help: the argument an ``EVICT`` name takes (e.g. ``"[:next]"``); "": none (the
            registry refuses one).
    """

    name: str = "policy"
    cache_policy: str = "lru"
    offline: bool = False
    fast_path: bool = False
    roles: tuple[str, ...] = ("evict",)
    uses_prediction_scores: bool = False
    gives_scores: bool = False
    verify_passes: bool = False
    arg_help: str = ""
    evict_arg_help: str = ""
    num_layers = num_experts = top_k = 0

    @classmethod
    def from_spec(cls, arg: str | None, *, role: str, **options: Any) -> Policy:
        """A fresh policy from a registry name's argument (``utility:2`` -> ``"2"``) for ``role``.

        ``options`` are the simulator's settings (e.g. ``utility_decay``); each policy takes the ones it
        knows. The default takes no argument.
        """
        if arg is not None:
            raise ValueError(f"policy {cls.name!r} takes no ':' argument (got {arg!r})")
        return cls()

    # -- both drivers ------------------------------------------------------------------------------

    def bind(self, num_layers: int, num_experts: int, top_k: int) -> None:
        """Fresh state for a model (runtime) or a trace (simulator) of L MoE layers, E experts, top-k."""
        self.num_layers, self.num_experts, self.top_k = int(num_layers), int(num_experts), int(top_k)

    def on_prediction(self, layer: int, logits: Any = None, kernel_plan: Any = None) -> Plan | None:
        """Before MoE layer ``layer`` runs (runtime: right after its pre-attention norm).

        Args:
            layer: MoE layer ordinal (cache layer).
            logits: (..., 1+d, E) or (..., E) fp32 predictor logits of the layer's rows, on the device
                (simulator: the row of :meth:`sequence_logits`); None where no predictor runs
                (simulator only: trace-driven prefetchers predict here without logits).
            kernel_plan: ``(ids (1+d, w) int32, scores (1+d, E) fp32)`` already made from ``logits``
                by the fused kernel (CUDA), or None.
        """
        return None

    def on_routed(self, layer: int, counts: np.ndarray, resident: np.ndarray) -> Plan | None:
        """The router picked; the layer's experts are not acquired yet.

        Args:
            layer: MoE layer ordinal.
            counts: (E,) how many of the call's tokens selected each expert (0/1 at batch-1 decode).
            resident: (E,) bool, ready in the cache before the call.
        """
        return None

    def after_call(self, layer: int, counts: np.ndarray) -> Plan | None:
        """The layer's experts computed; ``counts`` as in :meth:`on_routed`."""
        return None

    def set_context(self, **context: Any) -> None:
        """What a driver knows that a policy may use, handed once after :meth:`bind` (default: ignored).

        The simulator's stepping driver passes ``cost`` (its :class:`moert.sim.cost.CostModel`) and
        ``caches`` (the run's ``moert.sim.step.Caches``); the runtime passes ``offloader`` (the model's
        ``moert.engine.offloader.Offloader``). A policy reads only residency and timing from them.
        """

    def acts_on(self, hook: str) -> bool:
        """Whether ``hook`` (``"on_prediction"``, ``"on_routed"`` or ``"after_call"``) may return a plan:
        the class overrides it. The runtime skips a hook that cannot act (and what it would cost to
        call it, e.g. the resident mask of ``on_routed``)."""
        return getattr(type(self), hook) is not getattr(Policy, hook)

    # -- simulator only ----------------------------------------------------------------------------

    def prepare(self, trace: Trace) -> None:
        """Once before a replay, after :meth:`bind` (e.g. Belady reads the whole trace's future)."""

    def begin_sequence(self, seq: SequenceTrace, token_offset: int) -> None:
        """Before a sequence; ``token_offset`` is its first token's index in the whole trace."""

    def begin_token(self, t: int) -> None:
        """Stepping driver: before token (or verify pass) ``t`` of the current sequence."""

    def sequence_logits(self, seq: SequenceTrace) -> torch.Tensor | None:
        """(L, T, 1+d, E) fp32: what ``on_prediction`` gets at each (layer, token) of ``seq``, or None."""
        return None

    def sequence_plan(self, seq: SequenceTrace) -> SequencePlan:
        """Fast path (``fast_path = True``): the plans stepping through ``seq`` would apply.

        Called between :meth:`begin_sequence` and :meth:`end_sequence` instead of the per-step
        hooks; the state afterwards must be the same as after stepping.
        """
        raise NotImplementedError(f"policy {self.name!r} has no fast path; step it (moert.sim.step)")

    def end_sequence(self, seq: SequenceTrace) -> None:
        """After a sequence (e.g. MoE-Infinity adds its activation matrix to the collection)."""


@dataclass(frozen=True)
class TokenContext:
    """What a trace prefetcher may look at before layer ``layer`` of token ``t`` of ``seq``.

    The sequence object holds the whole routing (it is a trace); an honest predictor reads only
    :meth:`history`, the token itself, and the hidden row of the current layer.
    """

    seq: SequenceTrace
    t: int
    layer: int
    meta: TraceMeta

    @property
    def token_id(self) -> int | None:
        return None if self.seq.token_ids is None else int(self.seq.token_ids[self.t])

    @property
    def token(self) -> str | None:
        return None if self.seq.tokens is None else self.seq.tokens[self.t]

    @property
    def hidden(self) -> torch.Tensor | None:
        """(H,) fp16 normalized pre-attention row of this layer and token, when the trace has it."""
        return None if self.seq.hidden is None else self.seq.hidden[self.layer, self.t]

    def history(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(earlier tokens' experts (L, t, k), this token's experts of earlier layers (layer, k))."""
        return self.seq.experts[:, : self.t], self.seq.experts[: self.layer, self.t]


def as_id_list(ids: Iterable[int] | torch.Tensor) -> list[int]:
    """Expert ids as a list of Python ints."""
    if isinstance(ids, torch.Tensor):
        return [int(x) for x in ids.reshape(-1).tolist()]
    return [int(x) for x in ids]
