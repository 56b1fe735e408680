"""``budget``: prefetch only what the link can copy behind compute, by expected value.

``moert simulate --policy EVICT --prefetch PRED.safetensors:budget`` (any eviction policy, through
:class:`~moert.policy.combine.Combination`), runtime ``moert.patch(..., predictor=P, prefetch="budget")``.

Before MoE layer l runs (``on_prediction``), with the predictor's calibrated probabilities ``p`` (E,) of
the layer's experts and the experts ``present`` in the cache (ready or in flight):

- the **window** ``W`` is the link time the layer's compute hides, in expert copies: simulator
  ``attention_share * layer_compute_ms / copy_ms`` of the :class:`~moert.sim.cost.CostModel` (its windowed
  model: an own-layer prefetch hides only behind the compute before the router; the whole layer under
  ``window="pooled"``; 4.5 ms at 25 GB/s and 17.3 MB experts: W = 1.3); runtime: the measured time from the layer's prediction to its router (an EMA over
  tokens) over the copy engine's measured time per copy (:class:`MeasuredWindow`);
- the link already owes the window its expected **demand copies** ``D = sum of p over experts not
  present and not prefetched``; candidates (not present, most probable first) are added while
  ``n + D <= W``: adding ``c`` changes the link's load by ``1 - p_c``;
- a candidate whose copy would **land late** (the n-th prefetch ends at ``n`` copies, after the window
  when ``n > W``) is never issued: the simulator has no partial hits, and in the runtime a copy queued
  past the window would only delay the demand copies behind it. So with ``W < 1`` nothing is issued
  and the run is exactly demand-only (the same hits, misses and bytes);
- a candidate is issued only if its value ``p_c * t_copy`` is higher than the value of the expert it
  evicts (:func:`fill_budget`): free slots first (value 0), then victims in the eviction part's own
  order, valued in the same unit (:mod:`moert.policy.victims`: the cache's key mirrored from the uses,
  the budget's prefetches and the eviction part's priority plans; ``learned``: a victim forecast ``r``
  tokens away is worth ``1 / (1 + r)``, ``lru``: the latest calibrated probability its layer's
  predictor gave it); one cache per layer, or all layers' entries in one global cache. Under a
  priority evictor a prefetched expert keeps its old priority, so a prefetch that would evict an
  earlier one of the same call is not issued; one layer ahead, the routed call's own experts (not
  pinned yet) are never a victim.

**One layer ahead** (``PRED:budget-ahead``, the simulator's :class:`BudgetPredictor` with
``ahead=True``; predictors whose input for layer l+1 is known once layer l's router picked:
``xlayer``, ``prev-token``, ``frequency``): at layer l's router (``on_routed``) the same rule plans
layer l+1 with the window ``layer_compute_ms / copy_ms`` (the rest of layer l and layer l+1's
attention: the windowed model queues these copies right after the step's own demand copies,
``moert.sim.timeline``), on top of the own-layer rule before each layer.

Probabilities: the predictor's (sigmoid or clamped) outputs mapped by a :class:`Calibration`: per bin of
the raw probability, the observed selection rate on sequences the policy is not judged on (the CLI:
up to 100 of the non-held-out sequences; ``bench/bench_budget.py``: the validation split), made
monotone. Without one (the runtime default) the raw probability is used.

What it assumes: the value of a prefetch is its use at this call (a later use before eviction is not
counted: conservative); the victim order is the cache's for ``lru`` and priority evictors (``learned``)
up to ties among one call's experts, and LRU order for ``lfu`` (its counts are not mirrored: an
approximation); in one global cache the residency of another layer is read again only when its
entries would be victims. The runtime planner (:class:`BudgetPlanner`) plans the own layer only (its
predictor runs at each layer's input; lookahead rows are ignored).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moert.policy.base import Plan, as_numpy
from moert.policy.budget_windows import Calibration, CostWindow, FixedWindow, MeasuredWindow
from moert.policy.predictor import WIDTH_BUILDERS, PredictorPolicy
from moert.policy.score import CLEAR_WRAP, ScorePlanner
from moert.policy.victims import EvictorView

#: predictor kinds whose input for layer l+1 is known when layer l's router has picked (the experts of
#: l and l-1 for this token, earlier tokens', the token id): ``ahead`` may plan l+1 then
AHEAD_KINDS = ("xlayer", "prev-token", "frequency")

__all__ = [
    "AHEAD_KINDS",
    "BudgetPlanner",
    "BudgetPredictor",
    "Calibration",
    "CostWindow",
    "FixedWindow",
    "MeasuredWindow",
    "candidates",
    "fill_budget",
    "within_victims",
]


def fill_budget(
    window: float,
    probs: np.ndarray,
    present: np.ndarray,
    victims: np.ndarray,
    demand: float | None = None,
    stale: np.ndarray | None = None,
) -> list[int]:
    """The experts to prefetch for one layer call (see the module doc).

    Args:
        window: W, link time hidden by the window's compute, in expert copies.
        probs: (E,) calibrated probability that each expert is used at this call.
        present: (E,) bool, resident or in flight (never prefetched; their use needs no copy).
        victims: (V,) values (probabilities) of what the 1st, 2nd, ... prefetch would evict, in
            eviction order; 0.0 for a free slot. Past its end nothing can be evicted.
        demand: the window's expected demand copies without prefetch; None: ``probs`` summed over the
            absent experts (the policy's). A prefetched expert takes its ``p`` off it.
        stale: with ``keys`` (V,) of the victims, the eviction part's key of each expert (E,) once
            prefetched: ``(stale, keys)``; the n-th prefetch is issued only if every earlier one keeps a
            key above the n-th victim's (else it would evict an earlier prefetch). None: never.

    Returns:
        Expert ids, most probable first.
    """
    p = np.asarray(probs, dtype=np.float64)
    present = np.asarray(present, dtype=bool)
    rank = np.argsort(-p, kind="stable").tolist()  # most probable first, ties by id
    ids = candidates(window, p, present, rank, demand)[: len(victims)]
    return within_victims(ids, p, victims, stale)


def candidates(
    window: float, p: np.ndarray, present: np.ndarray, rank: list[int], demand: float | None = None
) -> list[int]:
    """The prefix of absent experts (in ``rank`` order: most probable first) that the window holds:
    the n-th lands within it (``n <= W``) and the link's expected load stays in it (see :func:`fill_budget`)."""
    n_max = int(np.floor(window))  # the n-th lands after n copies
    if n_max <= 0:
        return []
    load = float(p[~present].sum()) if demand is None else float(demand)  # expected demand copies
    pl, pres = p.tolist(), present.tolist()
    chosen: list[int] = []
    for e in rank:
        if pres[e]:
            continue
        load += 1.0 - pl[e]  # adding e: the link's load + (1 - p_e)
        if len(chosen) >= n_max or load > window:
            break
        chosen.append(e)
    return chosen


def within_victims(ids: list[int], p: np.ndarray, victims: np.ndarray, stale: Any = None) -> list[int]:
    """The prefix of ``ids`` worth more than what each evicts (see :func:`fill_budget`)."""
    vic = np.asarray(victims, dtype=np.float64).tolist()
    own = None if stale is None else np.asarray(stale[0]).tolist()
    keys = None if stale is None else np.asarray(stale[1]).tolist()
    low = np.inf  # lowest key among the prefetches so far
    for n, e in enumerate(ids):
        if n >= len(vic) or float(p[e]) <= vic[n]:
            return ids[:n]
        if own is not None:
            if n and low < keys[n]:  # the n-th would evict an earlier prefetch
                return ids[:n]
            low = min(low, own[e])
    return ids


class _Budgeted:
    """The budget rule over a :class:`ScorePlanner` (mixed in first; see the module doc)."""

    fast_path = False  # its plans depend on the cache
    window: Any = None
    calibration: Calibration | None = None
    #: also plan layer l+1 when layer l's router picked (simulator; see the module doc)
    ahead = False
    window_ahead: Any = None

    def bind(self, num_layers: int, num_experts: int, top_k: int) -> None:
        super().bind(num_layers, num_experts, top_k)  # type: ignore[misc]
        self.view = EvictorView(num_layers, num_experts, getattr(self, "_view_kind", "lru"))
        self.known = np.zeros((num_layers, num_experts), dtype=bool)  # [L, E] believed present
        self.value = np.zeros((num_layers, num_experts))  # [L, E] latest calibrated probabilities
        self._present: Any = None
        self._slots, self._shared = 0, True
        self.issued = 0
        self._pending: tuple[int, np.ndarray] | None = None  # (layer, used) of a routed, unserved call

    def use_evictor(self, evict: Any) -> None:
        """Orders and values victims as ``evict`` (the eviction part) does (:mod:`moert.policy.victims`)."""
        self._view_kind = EvictorView.kind_of(evict)
        if getattr(self, "view", None) is not None:
            self.view.kind = self._view_kind

    def observe_evict_plan(self, plan: Plan | None) -> None:
        """The eviction part's plan of the current hook (before this part plans)."""
        self.view.observe(plan)

    def priority_rows(self, layers: list[int]) -> np.ndarray:
        """(n, E) float32 the cache's priorities of ``layers`` as mirrored (unchanged by a plan carrying them)."""
        return self.view.primary[layers].copy()

    def set_context(self, **context: Any) -> None:
        """Simulator: ``cost`` (CostModel -> the windows unless injected) and ``caches``
        (``moert.sim.step.Caches``); runtime: ``offloader`` (its cache, and its engine's timing)."""
        caches, off = context.get("caches"), context.get("offloader")
        if caches is not None:
            self._slots, self._shared = caches.slots, caches.mode == "global"

            def present(layer: int) -> np.ndarray:
                cache, cl = caches.at(layer)
                return cache.resident(cl).numpy()

            self._present = present
            if context.get("cost") is not None:
                if self.window is None:
                    self.window = CostWindow(context["cost"])
                if self.window_ahead is None:
                    self.window_ahead = CostWindow(context["cost"], whole_layer=True)
        elif off is not None:
            self._slots, self._shared = off.num_slots, True
            self._present = lambda layer: off.cache.resident(layer, in_flight=True).numpy()
            if self.window is None:
                self.window = MeasuredWindow(getattr(off, "engine", None), self.num_layers)

    def probs_of(self, logits: Any) -> np.ndarray:
        """(E,) calibrated probabilities of the layer's own row (max over a batch's rows)."""
        x = as_numpy(logits, np.float64).reshape(-1, self.lookahead + 1, self.num_experts)[:, 0].max(axis=0)
        # max over rows, then the monotone map: the same as mapping each row first
        p = 1.0 / (1.0 + np.exp(-x)) if self.probabilities_mode == "sigmoid" else np.clip(x, 0.0, 1.0)
        return p if self.calibration is None else self.calibration(p)

    def _victims(self, layer: int, present: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Values and primary keys of the first ``n`` entries a prefetch into ``layer`` would evict (a
        free slot: value 0, key -inf), in the eviction part's order."""
        view, E = self.view, self.num_experts
        if not self._shared:
            flat = layer * E + np.flatnonzero(present)
            free = min(max(self._slots - flat.size, 0), n)
            got = flat[view.order(flat, n - free)]
        else:
            # ``known``: exact for ``layer``, a superset for the others (their entries may have been
            # evicted since; nothing else enters a layer between its calls but its prefetches): read the
            # residency of the layers the victims would come from until they are all verified
            known, fresh = self.known, {layer}
            while True:
                flat = np.flatnonzero(known.ravel())
                free = min(max(self._slots - flat.size, 0), n)
                got = flat[view.order(flat, n - free)]
                stale = {g // E for g in got.tolist()} - fresh
                if not stale:
                    break
                for other in stale:
                    known[other] = self._present(other)
                    if self._pending is not None and other == self._pending[0]:
                        known[other] |= self._pending[1]  # the routed call's experts: loaded next
                fresh |= stale
        values = view.values(got, self.value, layer)
        if self._pending is not None:  # the routed call's own experts: evicting one would cost it a copy
            routed, used = self._pending
            values[(got // E == routed) & used[got % E]] = np.inf
        values = np.concatenate([np.zeros(free), values])
        keys = np.concatenate([np.full(free, -np.inf), view.primary.ravel()[got].astype(np.float64)])
        return values, keys

    def _plan_layer(self, layer: int, p: np.ndarray, w: float, rank: Any = None) -> list[int]:
        """The prefetch into ``layer`` for its next call (updates the mirror with what it issues);
        ``rank``: the experts by ``p``, most probable first (ties by id), if known."""
        self.value[layer] = p
        if w < 1.0 or self._present is None:  # no copy lands within the window: demand only
            return []
        present = self._present(layer)
        self.known[layer] = present
        rank = np.argsort(-p, kind="stable").tolist() if rank is None else rank
        # :func:`fill_budget` in two halves: the window's prefix, then only its victims are looked up
        ids = candidates(w, p, present, rank)
        if ids:
            values, keys = self._victims(layer, present, len(ids))
            stale = (self.view.primary[layer], keys) if self.view.ordered else None
            ids = within_victims(ids, p, values, stale)
        if ids:
            self.view.touch(layer, ids)
            self.known[layer, ids] = True
            self.issued += len(ids)
        return ids

    def budget_ids(self, layer: int, logits: Any) -> list[int]:
        """The own-layer prefetch of this call (before its attention)."""
        p = self.layer_probs(layer, logits)
        if self.window is not None and hasattr(self.window, "start"):
            self.window.start(layer)
        return self._plan_layer(
            layer, p, 0.0 if self.window is None else self.window(layer), self.layer_rank(layer)
        )

    def layer_rank(self, layer: int) -> list[int] | None:
        """``layer``'s experts by probability at this call if known in advance (else None)."""
        return None

    def layer_probs(self, layer: int, logits: Any) -> np.ndarray:
        """(E,) calibrated probabilities for ``layer``'s call from its logits."""
        return self.probs_of(logits)

    def _base_plan(self, layer: int, logits: Any, kernel_plan: Any) -> Plan:
        """The plan before the budget's ids (priorities and clears of ``score``; none here)."""
        return Plan((layer,))

    def on_prediction(self, layer: int, logits: Any = None, kernel_plan: Any = None) -> Plan | None:
        if logits is None:
            raise ValueError(f"{self.name}: on_prediction needs the predictor's logits")
        base = self._base_plan(layer, logits, kernel_plan)
        ids = self.budget_ids(layer, logits)
        rows = np.full((len(base.layers), max(len(ids), 1)), -1, dtype=np.int32)  # [n, w]
        rows[0, : len(ids)] = ids
        ids_t = torch.from_numpy(rows) if ids else None  # torch: the runtime's pinned ring copies it
        plan = Plan(base.layers, ids_t, base.scores, base.clear, base.clear_score)
        return None if plan.empty else plan

    def on_routed(self, layer: int, counts: np.ndarray, resident: np.ndarray) -> Plan | None:
        if self.window is not None and hasattr(self.window, "routed"):
            self.window.routed(layer)
        used = np.asarray(counts) > 0
        self.view.calls[layer] += 1
        self.known[layer] = np.asarray(resident, dtype=bool) | used
        nxt, ids = layer + 1, []
        if self.ahead and nxt < self.num_layers and self.window_ahead is not None:
            # before the call's access (its experts are not pinned yet, their recency not renewed)
            self._pending = (layer, used)
            ids = self._plan_layer(nxt, self.ahead_probs(nxt), self.window_ahead(nxt), self.layer_rank(nxt))
            self._pending = None
        hit = used & np.asarray(resident, dtype=bool)  # the access, after the prefetch: hits, then loads
        self.view.touch(layer, np.concatenate([np.flatnonzero(hit), np.flatnonzero(used & ~hit)]))
        return Plan((nxt,), np.array([ids], dtype=np.int32)) if ids else None

    def ahead_probs(self, layer: int) -> np.ndarray:
        """(E,) calibrated probabilities of ``layer``'s coming call, known at the previous layer's router."""
        raise NotImplementedError(f"{self.name}: no prediction one layer ahead")


class BudgetPlanner(_Budgeted, ScorePlanner):
    """The runtime's budgeted prefetcher (``prefetch="budget"``): a :class:`ScorePlanner` (so the
    predictor's norm hook, online recall and ``score`` priorities work as before) whose prefetch is
    :func:`fill_budget`'s. Args as :class:`ScorePlanner`, plus ``window`` (None: measured)."""

    name = "budget"

    def __init__(self, *, window: Any = None, calibration: Calibration | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.window, self.calibration = window, calibration
        self.probabilities_mode = self.probabilities

    def _base_plan(self, layer: int, logits: Any, kernel_plan: Any) -> Plan:
        # the planner's own plan: its scores and clears (policy score), last_planned (online recall)
        if kernel_plan is not None or self.push_scores or self.lookahead or self.adaptive:
            return ScorePlanner.on_prediction(self, layer, logits, kernel_plan)
        # no scores to push and no kernel plan (the CPU twin): only last_planned, the top-width experts
        # by probability (the reference kernel's ids up to ties), without its torch ops
        x = as_numpy(logits, np.float32).reshape(-1, self.num_experts).max(axis=0)
        self.step = self.step % CLEAR_WRAP + 1
        self.last_planned = torch.from_numpy(
            np.argsort(-x, kind="stable")[: self.width].astype(np.int32)[None]
        )
        return Plan((layer,))


class BudgetPredictor(_Budgeted, PredictorPolicy):
    """``PRED.safetensors:budget`` in the simulator: a trace-fed predictor, budgeted.

    Args:
        predictor: any predictor whose outputs are probabilities.
        calibration: the raw -> observed mapping, or None.
        window: a fixed window (tests), or None: the simulator's cost model.
        name: label in tables.
    """

    def __init__(
        self,
        predictor: Any,
        calibration: Calibration | None = None,
        window: Any = None,
        name: str | None = None,
        ahead: bool = False,
    ) -> None:
        super().__init__(predictor, 0, name)
        if self.mode is None:
            raise ValueError(
                f"{predictor.meta.kind} predictor outputs are not probabilities; the budget needs them "
                "(train with a BCE-style loss or mse)"
            )
        if ahead and predictor.meta.kind not in AHEAD_KINDS:
            raise ValueError(
                f"ahead=True needs a predictor whose input for layer l+1 is known at layer l's router "
                f"({', '.join(AHEAD_KINDS)}); {predictor.meta.kind!r} is not one"
            )
        self.window, self.calibration, self.ahead = window, calibration, ahead
        self.probabilities_mode = self.mode
        self.gives_scores = False
        self._logits: dict[int, torch.Tensor] = {}  # shared by the simulator's copies: computed once
        self._probs: np.ndarray | None = None  # [L, T, E] this sequence's calibrated probabilities
        self._t = 0

    def sequence_logits(self, seq: Any) -> torch.Tensor:
        got = self._logits.get(seq.seq_id)
        if got is None:
            got = self._logits[seq.seq_id] = super().sequence_logits(seq)
        return got

    def begin_sequence(self, seq: Any, token_offset: int) -> None:
        super().begin_sequence(seq, token_offset)
        x = self.sequence_logits(seq)[:, :, 0].numpy().astype(np.float64)  # [L, T, E], as probs_of
        p = 1.0 / (1.0 + np.exp(-x)) if self.probabilities_mode == "sigmoid" else np.clip(x, 0.0, 1.0)
        self._probs = p if self.calibration is None else self.calibration(p)
        self._rank = np.argsort(-self._probs, axis=-1, kind="stable")  # [L, T, E]

    def begin_token(self, t: int) -> None:
        super().begin_token(t)
        self._t = t

    def end_sequence(self, seq: Any) -> None:
        super().end_sequence(seq)
        self._probs = None

    def layer_probs(self, layer: int, logits: Any) -> np.ndarray:
        return self.probs_of(logits) if self._probs is None else self._probs[layer, self._t]

    def layer_rank(self, layer: int) -> list[int] | None:
        return None if self._probs is None else self._rank[layer, self._t].tolist()

    def ahead_probs(self, layer: int) -> np.ndarray:
        assert self._probs is not None, "BudgetPredictor: begin_sequence must run first"
        return self._probs[layer, self._t]

    @staticmethod
    def calibrate(predictor: Any, sequences: list[Any], bins: int = 20) -> Calibration:
        """A :class:`Calibration` of ``predictor``'s own-layer probabilities on ``sequences``."""
        probe = PredictorPolicy(predictor, 0)
        raw, sel = [], []
        for seq in sequences:
            logits = probe.sequence_logits(seq)[:, :, 0]  # [L, T, E]
            raw.append((torch.sigmoid(logits) if probe.mode == "sigmoid" else logits.clamp(0, 1)).numpy())
            ex = seq.experts.numpy()  # [L, T, k]
            hot = np.zeros(logits.shape, dtype=bool)
            L, T, _ = ex.shape
            li, ti = np.meshgrid(np.arange(L), np.arange(T), indexing="ij")
            for j in range(ex.shape[2]):
                ok = ex[:, :, j] >= 0
                hot[li[ok], ti[ok], ex[:, :, j][ok]] = True
            sel.append(hot)
        return Calibration.fit(
            np.concatenate([r.ravel() for r in raw]), np.concatenate([s.ravel() for s in sel]), bins
        )


def _from_spec(predictor: Any, fit_sequences: Any, label: str, ahead: bool = False) -> BudgetPredictor:
    """``PRED:budget`` (``PRED:budget-ahead``: also one layer ahead): calibrated on up to 100 sequences it
    is not judged on (``fit_sequences``)."""
    seqs = list(fit_sequences or [])[:100]
    cal = BudgetPredictor.calibrate(predictor, seqs) if seqs else None
    return BudgetPredictor(predictor, cal, name=label, ahead=ahead)


WIDTH_BUILDERS["budget"] = _from_spec
WIDTH_BUILDERS["budget-ahead"] = lambda pred, fit, label: _from_spec(pred, fit, label, ahead=True)
