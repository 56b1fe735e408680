"""``learned``: eviction by a learned forecast of each expert's next use (toward Belady).

After each call of MoE layer l (token t), the policy updates its online state
(:class:`moert.predict.reuse.ReuseState`), asks the ``reuse`` model (``moert train --predictor reuse``)
for every expert's forecast ``g = E[log2 min(d, 128)]`` of the calls d to its next use at l, and
replaces the layer's E priorities by (C++ ``priority``: lowest evicted first, ties by recency)::

    priority(l, e) = -((t mod W) + 2 ** g + l / L)          W = 4096 tokens

that is Belady's score (``moert.policy.belady``: ``-(step of the next use)``, in tokens) with the
forecast in place of the truth, so one global cache compares experts of different layers by when they
will be needed: a layer that already ran in this token is needed one token later than one still to run.
Priorities stay small (float32 keeps 1/2048 of a token at 4096): the clock wraps every W tokens, and
for the one token after a wrap the rows pushed before it look W tokens later than they are (they go
first). The runtime and the simulator run the same numpy code (float64, the forecast rounded to
1/256), so both make the same decisions.

Hook: ``after_call`` (runtime and simulator). Fast path: the same calls for a whole sequence, the rows
as ``after_scores`` (replayed access by access).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from moert.policy.base import Plan, Policy, SequencePlan

if TYPE_CHECKING:
    from moert.trace import SequenceTrace

__all__ = ["WRAP", "Learned"]

#: tokens after which the priority clock wraps
WRAP = 4096

EVICTOR_HELP = "give a reuse model: --evictor R.safetensors (made by `moert train --trace DIR --predictor reuse`)"


class Learned(Policy):
    """Eviction by the forecast next use of a ``reuse`` model (see the module doc).

    Args:
        evictor: the model file, or a loaded :class:`~moert.predict.reuse.ReuseModel`.
    """

    name = "learned"
    cache_policy = "priority"
    fast_path = True

    def __init__(self, evictor: Any = None) -> None:
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
        super().from_spec(arg, role=role)  # no argument
        return cls(evictor)

    def bind(self, num_layers: int, num_experts: int, top_k: int) -> None:
        from moert.predict.reuse import ReuseState

        super().bind(num_layers, num_experts, top_k)
        if self.model is None:
            raise ValueError(f"policy 'learned' has no model: {EVICTOR_HELP}")
        if (self.model.num_layers, self.model.num_experts) != (num_layers, num_experts):
            raise ValueError(
                f"the reuse model {self.path or ''} is for {self.model.num_layers} MoE layers of "
                f"{self.model.num_experts} experts, the model/trace has {num_layers} of {num_experts}: "
                "train one on this model's routing (`moert train --predictor reuse`)"
            )
        self.state = ReuseState(num_layers, num_experts)

    def priorities(self, layer: int, used: np.ndarray) -> np.ndarray:
        """Updates the state with a call of ``layer`` that used ``used`` (E,) bool; (E,) float32 priorities."""
        state = self.state
        state.update(layer, used)
        g = self.model.log2_distance(layer, state.features(layer), used, state.previous_layer_used(layer))
        t = float((state.clock[layer] - 1) % WRAP)
        return (-(t + np.exp2(g) + layer / self.num_layers)).astype(np.float32)

    def after_call(self, layer: int, counts: np.ndarray) -> Plan:
        return Plan((layer,), scores=self.priorities(layer, np.asarray(counts) > 0)[None])

    def sequence_plan(self, seq: SequenceTrace) -> SequencePlan:
        ex = seq.experts.numpy()  # [L, T, w]
        L, T, _ = ex.shape
        out = np.empty((T, L, self.num_experts), dtype=np.float32)
        for t in range(T):
            for layer in range(L):
                row = ex[layer, t]
                used = np.zeros(self.num_experts, dtype=bool)
                used[row[row >= 0]] = True
                out[t, layer] = self.priorities(layer, used)
        return SequencePlan(after_scores=out)
