"""The fast path: a policy's :class:`~moert.policy.base.SequencePlan` replayed by few C++ calls.

What stepping the hooks would apply (:mod:`moert.sim.step`) comes as arrays for a chunk of tokens;
:func:`replay_plan` applies them to one run's caches in the same order:

- plans that fit the C++ ``replay`` (a prefetch row of the accessed layer before each access, the
  accessed experts' priorities after it, then the layer's E priorities and a prefetch row into it
  after the call): one ``replay`` per cache per run of steps, cut where the
  per-token priorities change (set first: setting equal scores again is a no-op); a call whose union
  exceeds the cache streams in waves inside the replay, as :func:`moert.sim.step.access` does;
- anything else (clears and score rows, lookahead rows into other layers): access by access, a few
  C++ calls each, in the stepping driver's order.
"""

from __future__ import annotations

import numpy as np

from moert.policy.base import SequencePlan
from moert.sim.step import Caches, access

__all__ = ["distinct_counts", "replay_plan"]


def replay_plan(caches: Caches, experts: np.ndarray, plan: SequencePlan) -> np.ndarray:
    """Replays a chunk: experts (L, T, w) int32, -1 pads, token-major; returns (L, T) int64 hits."""
    L, T, _ = experts.shape
    if plan.before is not None and plan.before.ids.shape[:2] != (T, L):
        raise RuntimeError(f"plans for {plan.before.ids.shape[:2]} (T, L) steps, experts for {(T, L)}")
    if plan.stepwise:
        return _steps(caches, experts, plan)
    prefetch = None if plan.before is None else plan.before.own_rows()  # [L, T, m]
    if caches.mode == "per-layer":
        return _per_layer(caches, experts, plan, prefetch)
    return _global(caches, experts, plan, prefetch)


def distinct_counts(experts: np.ndarray) -> np.ndarray:
    """(L, T, w) expert ids (-1 pads) -> (L, T) int64 distinct valid ids per step (the cache's accesses)."""
    s = np.sort(experts, axis=-1)
    new = s >= 0  # [L, T, w]
    new[..., 1:] &= s[..., 1:] != s[..., :-1]
    return new.sum(axis=-1, dtype=np.int64)


def _runs(changed: np.ndarray) -> list[tuple[int, int]]:
    """Half-open runs [a, b) of steps starting where ``changed`` (T,) is True (step 0 always starts one)."""
    changed = changed.copy()
    changed[0] = True
    bounds = [*np.flatnonzero(changed).tolist(), changed.size]
    return list(zip(bounds[:-1], bounds[1:]))


def _slice(a: np.ndarray | None, a0: int, a1: int) -> np.ndarray | None:
    return None if a is None else np.ascontiguousarray(a[a0:a1])


def _per_layer(
    caches: Caches, experts: np.ndarray, plan: SequencePlan, prefetch: np.ndarray | None
) -> np.ndarray:
    """Per-layer caches, layer by layer: runs of steps in one C++ replay each, cut where the layer's
    per-token priorities change."""
    L, T, _ = experts.shape
    token_scores, access_scores = plan.token_scores, plan.access_scores
    hits = np.zeros((L, T), dtype=np.int64)
    for layer in range(L):
        cache, cl = caches.at(layer)
        ex = experts[layer]  # [T, w]
        pre = None if prefetch is None else prefetch[layer]
        prio = None if access_scores is None else access_scores[layer]
        after = None if plan.after_scores is None else plan.after_scores[:, layer]  # [T, E]
        after_ids = None if plan.after_ids is None else plan.after_ids[:, layer]  # [T, w]
        changed = np.zeros(T, dtype=bool)
        if token_scores is not None:
            tp = token_scores[:, layer]  # [T, E]
            changed[0] = True
            changed[1:] = (tp[1:] != tp[:-1]).any(axis=1)
        for a, b in _runs(changed):
            if token_scores is not None:
                cache.set_priority(cl, caches.all_ids, np.ascontiguousarray(tp[a]))
            out = cache.replay(
                np.full(b - a, cl, dtype=np.int32),
                np.ascontiguousarray(ex[a:b]),
                prefetch=_slice(pre, a, b),
                priorities=_slice(prio, a, b),
                after_scores=_slice(after, a, b),
                after_prefetch=_slice(after_ids, a, b),
                waves=True,
                track_prefetch=caches.log is not None,
            )
            hits[layer, a:b] = out["hits_per_step"].numpy()
            _log(caches, out, (caches.row0 + np.arange(a, b)) * L + layer, layer)
    return hits


def _global(
    caches: Caches, experts: np.ndarray, plan: SequencePlan, prefetch: np.ndarray | None
) -> np.ndarray:
    """One global cache: runs of tokens in one token-major C++ replay each, cut where the per-token
    priorities change (every layer's set at the run's start)."""
    L, T, _ = experts.shape
    token_scores, access_scores = plan.token_scores, plan.access_scores
    after = None if plan.after_scores is None else plan.after_scores.transpose(1, 0, 2)  # [L, T, E]
    after_ids = None if plan.after_ids is None else plan.after_ids.transpose(1, 0, 2)  # [L, T, w]
    cache = caches.caches[0]
    changed = np.zeros(T, dtype=bool)
    if token_scores is not None:
        changed[1:] = (token_scores[1:] != token_scores[:-1]).any(axis=(1, 2))
    hits = np.zeros((L, T), dtype=np.int64)
    for a, b in _runs(changed):
        if token_scores is not None:
            for layer in range(L):
                cache.set_priority(layer, caches.all_ids, token_scores[a, layer])
        n = b - a
        out = cache.replay(
            np.tile(np.arange(L, dtype=np.int32), n),  # [n*L] token-major
            _token_major(experts[:, a:b]),
            prefetch=None if prefetch is None else _token_major(prefetch[:, a:b]),
            priorities=None if access_scores is None else _token_major(access_scores[:, a:b]),
            after_scores=None if after is None else _token_major(after[:, a:b]),
            after_prefetch=None if after_ids is None else _token_major(after_ids[:, a:b]),
            waves=True,
            track_prefetch=caches.log is not None,
        )
        hits[:, a:b] = out["hits_per_step"].numpy().reshape(n, L).T
        _log(caches, out, (caches.row0 + a) * L + np.arange(n * L), 0)
    return hits


def _token_major(a: np.ndarray) -> np.ndarray:
    """(L, T, w) -> (T * L, w), token-major, contiguous."""
    L, T, w = a.shape
    return np.ascontiguousarray(a.transpose(1, 0, 2)).reshape(T * L, w)


def _log(caches: Caches, out: dict, steps: np.ndarray, layer: int) -> None:
    """Logs a tracked ``replay``'s prefetch copies and first uses (``steps``: (N,) global steps).

    Step i's copies are numbered in the replay's order: its prefetch row (issued at step i), then its
    prefetch after the call (issued for the next step, as the stepping driver logs it), then step
    i+1's; the two kinds are logged interleaved in that order, so the FIFO within a step holds."""
    if caches.log is None:
        return
    before = out["prefetch_queued_per_step"].astype(np.int64)  # [N]
    after = out["prefetch_after_queued_per_step"].astype(np.int64)  # [N]
    counts = np.stack([before, after], axis=1).reshape(-1)  # [2N]: before_0, after_0, before_1, ...
    at = np.stack([steps, steps + 1], axis=1).reshape(-1)
    seq0 = out["prefetch_seq_start"] + np.concatenate([[0], np.cumsum(counts)[:-1]])
    index = caches.index(layer)
    caches.log.issued(at, index, seq0, counts)
    used = out["prefetch_used"]  # [N, k]
    hit = used >= 0
    caches.log.used(np.broadcast_to(steps[:, None], used.shape)[hit], index, used[hit])


def _prefetch_row(caches: Caches, layer: int, ids: np.ndarray | None) -> None:
    if ids is not None and (ids >= 0).any():
        caches.prefetch(layer, ids[ids >= 0].astype(np.int64))


def _access_scores(caches: Caches, layer: int, ex: np.ndarray, scores: np.ndarray | None) -> None:
    """The accessed experts' priorities after a call (-1 pads skipped), in trace order."""
    if scores is not None:
        valid = ex >= 0
        cache, cl = caches.at(layer)
        cache.set_priority(cl, ex[valid].astype(np.int64), np.ascontiguousarray(scores[valid]))


def _after_call(caches: Caches, layer: int, scores: np.ndarray | None, ids: np.ndarray | None) -> None:
    """A plan after a call of ``layer``: its E priorities, then a prefetch row into it (issued for the
    next step)."""
    if scores is not None:
        cache, cl = caches.at(layer)
        cache.set_priority(cl, caches.all_ids, scores)
    caches.step += 1
    _prefetch_row(caches, layer, ids)


def _steps(caches: Caches, experts: np.ndarray, plan: SequencePlan) -> np.ndarray:
    """Access by access, token-major, in the stepping driver's order: the token's priorities, then per
    layer the plan before the access (clear, score rows, prefetch rows), the access, the accessed
    experts' priorities, the layer's priorities and prefetch after the call."""
    L, T, _ = experts.shape
    pred = plan.before
    n = 0 if pred is None else pred.ids.shape[2]
    hits = np.zeros((L, T), dtype=np.int64)
    for t in range(T):
        if plan.token_scores is not None:
            for layer in range(L):
                cache, cl = caches.at(layer)
                cache.set_priority(cl, caches.all_ids, plan.token_scores[t, layer])
        for layer in range(L):
            caches.step = (caches.row0 + t) * L + layer
            rows = min(n, L - layer)  # lookahead past the last layer is ignored
            if pred is not None and pred.clear is not None and not np.isnan(pred.clear[t, layer]):
                cache, cl = caches.at((layer - 1) % L)
                cache.set_priority(cl, caches.all_ids, float(pred.clear[t, layer]))
            if pred is not None and pred.scores is not None:
                for j in range(rows):
                    cache, cl = caches.at(layer + j)
                    cache.set_priority(cl, caches.all_ids, pred.scores[t, layer, j])
            for j in range(rows):
                _prefetch_row(caches, layer + j, pred.ids[t, layer, j])
            hits[layer, t] = access(caches, layer, experts[layer, t])
            _access_scores(
                caches,
                layer,
                experts[layer, t],
                None if plan.access_scores is None else plan.access_scores[layer, t],
            )
            _after_call(
                caches,
                layer,
                None if plan.after_scores is None else plan.after_scores[t, layer],
                None if plan.after_ids is None else plan.after_ids[t, layer],
            )
    return hits
