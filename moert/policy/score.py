"""The runtime's ``score`` eviction policy in the simulator: a predictor's scores, then recency.

``moert.patch(model, predictor=..., policy="score")`` orders eviction by the predictor
(``moert.engine.prefetch``): before MoE layer l runs, its prediction sets the priorities of layer l (and
of l+1..l+d for a lookahead predictor) to the probabilities of the prefetched experts (0 for the
rest), weighted ``score_decay ** j`` for layer l+j, and gives the layer that just ran (l-1,
cyclically) a score below every earlier one (-1, -2, ...: in a decode cycle it is needed again
last). The C++ cache's ``priority`` policy evicts the lowest score first, ties by recency.

Here the scores come from the prefetcher: ``score+PRED.safetensors[:m]`` replays, before every
access, exactly the prediction the runtime's hook would apply (the hook's own code makes it:
:class:`moert.policy.predictor.PredictorPrefetcher`), so ``score+P`` and ``lru+P`` prefetch the
same ids and differ only in eviction. Which prefetchers give scores, and what they are:

| prefetcher | scores of the prefetched ids |
|---|---|
| ``PRED.safetensors`` (BCE-style loss: wbce, focal, rank) | ``sigmoid(logit)`` |
| ``PRED.safetensors`` (``mse`` on router scores) | ``clamp(logit, 0, 1)`` |
| ``prev-token`` | 1 for the previous token's experts, 0 else |
| ``frequency`` | the expert's selection rate in the counted sequences (count / tokens) |

``oracle`` and ``moe-infinity`` give none (``moe-infinity`` is its own eviction policy).

Per-layer caches (one per layer) see only their own layer's rows: a layer's scores are set just
before its prefetch and access, so the clear of the layer that just ran changes nothing there (the
next prediction for that layer overwrites it before its cache is used again); the cross-layer
order matters for one global cache.
"""

from __future__ import annotations

from moert.policy.base import EvictionPolicy

__all__ = ["ScorePolicy", "NO_SCORES_HELP"]

#: How to fix ``score`` without a prefetcher that gives scores (appended to the error).
NO_SCORES_HELP = (
    "policy 'score' evicts by a predictor's scores and needs a prefetcher that gives them: "
    "score+PRED.safetensors[:m] (a trained predictor; :adaptive for the adaptive width), "
    "score+prev-token[:m] or score+frequency[:m], or --prefetch PRED.safetensors:2 for every policy"
)


class ScorePolicy(EvictionPolicy):
    """Evicts the lowest predicted score first, ties by recency (see the module doc)."""

    name = "score"
    cpp_policy = "priority"
    predictor_scores = True
