"""``learned``: eviction by a learned forecast of each expert's reuse (toward Belady).

When the router of MoE layer l has picked (token t; the experts are not acquired yet), the policy
updates its online state with the call's experts (as :class:`moert.predict.reuse.ReuseState`), asks the
``reuse`` model (``moert train --predictor reuse``) for every expert's probabilities ``p_h`` of use at l
within the next ``n_h = 1, 2, 4, ..., 64`` calls, and replaces the layer's E priorities (C++
``priority``: lowest evicted first, ties by recency) by one of two ranks:

- ``learned`` (``learned:density``, the default): the log2 of the forecast **hit density**
  (:meth:`~moert.predict.reuse.ReuseModel.log2_density`, LHD: Beckmann et al., NSDI 2018): the hits the
  slot is expected to earn per call it is held, at the best horizon. An uncertain forecast is ranked by
  what keeping the expert is worth, not by a guess of when it comes back; experts of all layers of one
  global cache compare in one unit (a hit per call held). On the validation prompts it beats the next
  use rank, global and per-layer (README "Learned eviction toward Belady");
- ``learned:next``: the forecast next use, ``g = E[log2 min(d, 128)] = sum_h (1 - p_h)``::

      priority(l, e) = -((t mod W) + 2 ** g + l / L)          W = 4096 tokens

  that is Belady's score (``moert.policy.belady``: ``-(step of the next use)``, in tokens) with the
  forecast in place of the truth; a layer that already ran in this token is needed one token later than
  one still to run. Priorities stay small (float32 keeps 1/2048 of a token at 4096): the clock wraps
  every W tokens, and for the one token after a wrap the rows pushed before it look W tokens later than
  they are (they go first).

The online state and the forecast run natively (``moert._C.ReuseForecaster``: the arithmetic of the
numpy definition, :class:`moert.predict.reuse.ReuseState` and ``ReuseModel.log2_density``, which the
training uses; tests/predict/test_reuse_native.py holds the two equal), one call at a time in the
runtime and a whole sequence per native call in the simulator, the same code, so both make the same
decisions. The forecast is rounded to 1/256 of a log2 step.

The call's own experts are pinned while it runs, so the misses of this call already evict by what is
known after routing: the forecast starts one token later than it would after the call (``after_call``),
which is worth about as much as knowing the next token's experts (bench/results/sim_evict_puffin.md).

Hook: ``on_routed`` (runtime and simulator). Fast path: the same rows for a whole sequence as the
``before`` scores of each access (replayed access by access); ``learned+PREFETCH`` is stepped (its
prefetcher's ``on_prediction`` plans come before these rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from moert.policy.base import Plan, Policy, Predictions, SequencePlan

if TYPE_CHECKING:
    from moert.trace import SequenceTrace

__all__ = ["RANKS", "WRAP", "Learned"]

#: tokens after which the priority clock wraps
WRAP = 4096
#: the ranks of ``learned:RANK`` (the first is the default; see the module doc)
RANKS = ("density", "next")

EVICTOR_HELP = (
    "give a reuse model: --evictor R.safetensors (made by `moert train --trace DIR --predictor reuse`)"
)


class Learned(Policy):
    """Eviction by a ``reuse`` model's forecast (see the module doc).

    Args:
        evictor: the model file, or a loaded :class:`~moert.predict.reuse.ReuseModel`.
        rank: ``"density"`` (hit density) or ``"next"`` (forecast next use): :data:`RANKS`.
    """

    name = "learned"
    cache_policy = "priority"
    fast_path = True
    #: its plans come before each access (``on_routed``): a prefetcher's plans of ``on_prediction`` come
    #: earlier, which ``Predictions`` cannot express, so ``learned+PREFETCH`` is stepped
    plans_before_access = True
    evict_arg_help = "[:next]"

    def __init__(self, evictor: Any = None, rank: str = RANKS[0]) -> None:
        if rank not in RANKS:
            raise ValueError(
                f"policy 'learned' ranks by {' or '.join(map(repr, RANKS))} (got rank={rank!r}): "
                f"use learned:{RANKS[0]} (the default) or learned:{RANKS[1]}"
            )
        self.rank = rank
        self.path = evictor if isinstance(evictor, (str, bytes)) or hasattr(evictor, "__fspath__") else None
        self.model = None
        if evictor is not None and self.path is None:
            self.model = evictor
        elif self.path is not None:
            from moert.predict.reuse import load_reuse

            self.model = load_reuse(self.path)[0]
        self.state: Any = None

    @classmethod
    def from_spec(cls, arg: str | None, *, role: str, evictor: Any = None, **options: Any) -> Learned:
        return cls(evictor, RANKS[0] if arg is None else arg)

    def bind(self, num_layers: int, num_experts: int, top_k: int) -> None:
        super().bind(num_layers, num_experts, top_k)
        if self.model is None:
            raise ValueError(f"policy 'learned' has no model: {EVICTOR_HELP}")
        if (self.model.num_layers, self.model.num_experts) != (num_layers, num_experts):
            raise ValueError(
                f"the reuse model {self.path or ''} is for {self.model.num_layers} MoE layers of "
                f"{self.model.num_experts} experts, the model/trace has {num_layers} of {num_experts}: "
                "train one on this model's routing (`moert train --predictor reuse`)"
            )
        self.state = self.model.forecaster()  # the online state and the forecast, native
        self._value = 0 if self.rank == "density" else 1  # ReuseForecaster: log2 density / distance

    def _priorities(self, layers: np.ndarray, clocks: np.ndarray, g: np.ndarray) -> np.ndarray:
        """``learned:next``: (N, E) float32 priorities of N calls (layers, clocks: (N,) the layer and its
        call index; g: (N, E) the forecast log2 distances)."""
        t = (clocks % WRAP).astype(np.float64)[:, None]
        return (-(t + np.exp2(g) + (layers / self.num_layers)[:, None])).astype(np.float32)

    def _rows(self, layers: np.ndarray, clocks: np.ndarray, values: np.ndarray) -> np.ndarray:
        """(N, E) float32 priorities of N calls from the forecaster's values."""
        if self.rank == "density":
            return values.astype(np.float32)
        return self._priorities(layers, clocks, values)

    def priorities(self, layer: int, used: np.ndarray) -> np.ndarray:
        """Updates the state with a call of ``layer`` that used ``used`` (E,) bool; (E,) float32 priorities."""
        values = self.state.call(layer, np.asarray(used, dtype=bool), self._value)
        layers = np.array([layer])
        return self._rows(layers, np.array([self.state.clock(layer) - 1]), values[None])[0]

    def on_routed(self, layer: int, counts: np.ndarray, resident: np.ndarray) -> Plan:
        return Plan((layer,), scores=self.priorities(layer, np.asarray(counts) > 0)[None])

    def sequence_plan(self, seq: SequenceTrace) -> SequencePlan:
        """Every call of ``seq`` in order (token by token, layer by layer, as the runtime's calls come),
        in one native call."""
        ex = seq.experts.numpy()  # [L, T, w]
        L, T, _ = ex.shape
        E = self.num_experts
        tl = ex.transpose(1, 0, 2)  # [T, L, w]
        hot = np.zeros((T, L, E), dtype=bool)  # [T, L, E] each call's experts
        t_idx, l_idx, j_idx = np.nonzero(tl >= 0)
        hot[t_idx, l_idx, tl[t_idx, l_idx, j_idx]] = True
        start = np.array([self.state.clock(layer) for layer in range(L)], dtype=np.int64)
        values = self.state.sequence(hot, self._value).reshape(T * L, E)
        clocks = (start[None, :] + np.arange(T)[:, None]).reshape(-1)
        out = self._rows(np.tile(np.arange(L), T), clocks, values).reshape(T, L, 1, E)
        return SequencePlan(before=Predictions(np.full((T, L, 1, 0), -1, dtype=np.int32), out))
