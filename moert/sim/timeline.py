"""The windowed cost model's per-step traffic and the copy link's timeline (see :class:`CostModel`).

A run's replay logs, per step ``s`` ((token or verify pass, MoE layer), token-major: ``s = t * L + l``
over the whole trace): the demand misses, the prefetch copies queued (each numbered by its cache,
``SlabCache.prefetch_seq``), and which prefetched copies the step's access uses for the first time
(:class:`StepLog`). :meth:`StepLog.traffic` puts every prefetch copy in one FIFO order (by step, then
in the order they were queued) and :func:`link_timeline` replays the link step by step.

A copy is queued at a step's start, or (``mid=True``: a prefetch for a later layer planned when this
step's router picked, ``moert.sim.step``) right after the step's own copies are waited for: it then
hides behind the rest of this step's compute and the next step's attention.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["StepLog", "Traffic", "link_timeline"]

_EPS = 1e-9


@dataclass(frozen=True)
class Traffic:
    """One run's per-step traffic, the link timeline's input.

    Attributes:
        demand: (S,) int64 demand misses of each step (distinct experts loaded on demand).
        issued: (S,) int64 prefetch copies queued at each step's start (FIFO order = global index).
        issued_mid: (S,) int64 of them queued only after the step's wait (its router picked them for a
            later layer): they follow the step's start copies in the FIFO; None: none.
        use_steps: (U,) int64 steps, ascending, at which a prefetched copy is used for the first time.
        use_copies: (U,) int64 the global FIFO index of that copy.
    """

    demand: np.ndarray
    issued: np.ndarray
    use_steps: np.ndarray
    use_copies: np.ndarray
    issued_mid: np.ndarray | None = None

    @property
    def steps(self) -> int:
        return int(self.demand.size)


class StepLog:
    """Collects a run's per-step traffic while it replays (the drivers call it; see the module doc).

    Args:
        num_layers: L (steps per token or pass).
        num_caches: caches of the run (their prefetch sequence numbers are counted separately).
    """

    def __init__(self, num_layers: int, num_caches: int) -> None:
        self.L, self.num_caches = int(num_layers), int(num_caches)
        self._demand: list[np.ndarray] = []
        self._issue: list[tuple[np.ndarray, ...]] = []  # (step, order, cache, seq0, count, mid)
        self._use: list[tuple[np.ndarray, ...]] = []  # (step, cache, seq)
        self._order = 0

    def demand(self, misses: np.ndarray) -> None:
        """Appends a chunk's demand misses: (L, T) int, the chunk's rows following the earlier ones."""
        self._demand.append(np.ascontiguousarray(np.asarray(misses, dtype=np.int64).T).ravel())

    def issued(self, steps, cache, seq0, counts, mid: bool = False) -> None:
        """Prefetch copies queued: at ``steps`` (n,), by ``cache`` (int or (n,)), numbered ``seq0`` (n,)
        on, ``counts`` (n,); events logged later go later in the FIFO within a step (and its phase);
        ``mid``: queued after the step's wait (see the module doc)."""
        steps = np.atleast_1d(np.asarray(steps, dtype=np.int64))
        counts = np.atleast_1d(np.asarray(counts, dtype=np.int64))
        keep = counts > 0
        if not keep.any():
            return
        n = steps.size
        order = np.arange(self._order, self._order + n, dtype=np.int64)
        self._order += n
        cache = np.broadcast_to(np.asarray(cache, dtype=np.int64), (n,))
        seq0 = np.atleast_1d(np.asarray(seq0, dtype=np.int64))
        phase = np.full(int(keep.sum()), int(mid), dtype=np.int64)
        self._issue.append((steps[keep], order[keep], cache[keep], seq0[keep], counts[keep], phase))

    def used(self, steps, cache, seqs) -> None:
        """First uses of prefetched copies: (n,) steps, cache (int or (n,)), (n,) sequence numbers."""
        steps = np.atleast_1d(np.asarray(steps, dtype=np.int64))
        if steps.size:
            cache = np.broadcast_to(np.asarray(cache, dtype=np.int64), steps.shape)
            self._use.append((steps, cache.copy(), np.atleast_1d(np.asarray(seqs, dtype=np.int64))))

    def traffic(self) -> Traffic:
        """The logged traffic, every prefetch copy numbered in one FIFO order."""
        demand = np.concatenate(self._demand) if self._demand else np.zeros(0, np.int64)
        S = demand.size
        cat = [np.concatenate(c) if self._issue else np.zeros(0, np.int64) for c in zip(*self._issue)]
        step, order, cache, seq0, count, mid = cat if self._issue else [np.zeros(0, np.int64)] * 6
        idx = np.lexsort((order, mid, step))
        step, cache, seq0, count, mid = step[idx], cache[idx], seq0[idx], count[idx], mid[idx]
        last = np.searchsorted(step, S)  # after the last step's call: nothing uses them
        step, cache, seq0, count, mid = step[:last], cache[:last], seq0[:last], count[:last], mid[:last]
        issued = np.bincount(step, weights=count, minlength=S).astype(np.int64)
        issued_mid = np.bincount(step, weights=count * mid, minlength=S).astype(np.int64)
        g0 = (np.cumsum(count) - count).astype(np.int64)  # first global index per event
        ends = [
            int((seq0[cache == c] + count[cache == c]).max()) if (cache == c).any() else 0
            for c in range(self.num_caches)
        ]
        g_of = [np.full(e, -1, dtype=np.int64) for e in ends]
        within = np.arange(int(count.sum())) - np.repeat(g0, count)
        seqs, caches_rep = np.repeat(seq0, count) + within, np.repeat(cache, count)
        for c in range(self.num_caches):
            sel = caches_rep == c
            g_of[c][seqs[sel]] = np.flatnonzero(sel)
        if self._use:
            u_step, u_cache, u_seq = (np.concatenate(c) for c in zip(*self._use))
        else:
            u_step = u_cache = u_seq = np.zeros(0, np.int64)
        u_g = np.full(u_seq.size, -1, dtype=np.int64)
        for c in range(self.num_caches):
            sel = u_cache == c
            if sel.any():
                if u_seq[sel].max() >= g_of[c].size:
                    raise RuntimeError("a used prefetch copy was never logged as queued")
                u_g[sel] = g_of[c][u_seq[sel]]
        if (u_g < 0).any():
            raise RuntimeError("a used prefetch copy was never logged as queued")
        idx = np.argsort(u_step, kind="stable")
        return Traffic(demand, issued, u_step[idx], u_g[idx], issued_mid if issued_mid.any() else None)


def _advance(head: float, budget: float, issued: int, promoted: list[int]) -> float:
    """The prefetch FIFO after ``budget`` copy-times of transfer: ``head`` copies done (fluid), copies
    promoted to demand skipped."""
    while budget > _EPS and head < issued - _EPS:
        if promoted and promoted[0] <= head + _EPS:
            head = max(head, heapq.heappop(promoted) + 1.0)
            continue
        limit = min(issued, promoted[0]) if promoted else issued
        step = min(budget, limit - head)
        head += step
        budget -= step
    return head


def link_timeline(
    traffic: Traffic,
    *,
    compute_s: float,
    copy_s: float,
    attention_share: float,
    depth: int,
    cpu: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Replays the copy link over every step (the formula and its assumptions: :class:`CostModel`).

    Args:
        traffic: the run's per-step traffic.
        compute_s: a step's compute, seconds (one MoE layer of one token or verify pass).
        copy_s: one expert's copy, seconds.
        attention_share: the share of a step's compute before its experts are needed.
        depth: prefetch copies committed to the link (not overtaken by a demand copy).
        cpu: heterogeneous mode: ``(c, t)`` from :func:`cpu_split` for n = 0..n_max demand misses:
            experts computed on the CPU and the step's stall in seconds without the link's backlog.

    Returns:
        ``{"seconds", "stall_demand_s", "stall_behind_prefetch_s", "stall_late_prefetch_s",
        "late_prefetches", "promoted_prefetches", "prefetch_backlog"}``: totals over the run; the
        backlog: prefetch copies still queued after the last step, charged as a stall behind
        prefetches (the next demand copy would wait for them).
    """
    S = traffic.steps
    D = traffic.demand
    if cpu is not None:
        c_cpu, t_cpu = cpu
        need = int(D.max()) + 1 if S else 1
        if c_cpu.size < need:
            raise ValueError(f"cpu table covers {c_cpu.size - 1} misses per step; a step has {need - 1}")
    if traffic.issued.sum() == 0:  # demand only: no backlog, every step waits for its own copies
        if cpu is None:
            dem = float(D.sum()) * copy_s
        else:
            dem = float(t_cpu[D].sum())
        return {
            "seconds": S * compute_s + dem,
            "stall_demand_s": dem,
            "stall_behind_prefetch_s": 0.0,
            "stall_late_prefetch_s": 0.0,
            "late_prefetches": 0,
            "promoted_prefetches": 0,
            "prefetch_backlog": 0.0,
        }
    return _loop(traffic, compute_s, copy_s, attention_share, depth, cpu)


def _loop(traffic: Traffic, compute_s, copy_s, share, depth, cpu) -> dict:
    """The step loop of :func:`link_timeline` (times in copy units)."""
    before, after = share * compute_s / copy_s, (1.0 - share) * compute_s / copy_s
    M = [0] * traffic.steps if traffic.issued_mid is None else traffic.issued_mid.tolist()
    D, Q = traffic.demand.tolist(), (traffic.issued - np.asarray(M, dtype=np.int64)).tolist()
    bounds = np.searchsorted(traffic.use_steps, np.arange(traffic.steps + 1)).tolist()
    uses = traffic.use_copies.tolist()
    c_cpu = t_cpu = None
    if cpu is not None:
        c_cpu, t_cpu = cpu[0].tolist(), (cpu[1] / copy_s).tolist()
    head, issued, promoted = 0.0, 0, []
    dem = behind = late = 0.0
    n_late = n_prom = 0
    for s in range(traffic.steps):
        issued += Q[s]
        d, u0, u1 = D[s], bounds[s], bounds[s + 1]
        if head < issued:
            head = min(head + before, issued) if not promoted else _advance(head, before, issued, promoted)
        elif d == 0 and u0 == u1 and not M[s]:
            continue  # nothing queued, nothing to load: the step computes
        window = min(math.floor(head + _EPS) + depth, issued, promoted[0] if promoted else issued)
        need, prom = head, 0
        if u0 == u1 and d == 0:
            issued += M[s]  # queued at the router: nothing to wait for
            head = min(head + after, issued) if not promoted else _advance(head, after, issued, promoted)
            continue  # nothing to wait for: the step computes while the link works
        for g in uses[u0:u1]:
            if g + 1 <= head + _EPS:
                continue  # arrived
            n_late += 1
            if g < window:
                need = max(need, g + 1.0)  # committed: wait for it
            else:
                heapq.heappush(promoted, g)  # still queued: promoted to a demand copy
                prom += 1
        n_prom += prom
        on_cpu, t_c = (0, 0.0) if c_cpu is None else (c_cpu[d], t_cpu[d])
        copies = d - on_cpu + prom
        if copies > 0:
            commit = max(0.0, window - head)
            wait = max(commit + copies, t_c)
            b = commit if d > 0 else 0.0
            lt = prom + (commit if d == 0 else 0.0)
            head = _advance(head + commit, wait - commit - copies, issued, promoted)
        else:
            lw = need - head
            wait = max(lw, t_c)
            b, lt = 0.0, max(0.0, lw - t_c)
            head = _advance(head, wait, issued, promoted)
        dem += wait - b - lt
        behind += b
        late += lt
        issued += M[s]  # the router's prefetches for later layers: after the step's own copies
        head = min(head + after, issued) if not promoted else _advance(head, after, issued, promoted)
    backlog = issued - head - len(promoted)  # still queued when the trace ends
    behind += backlog  # what the next demand copy would wait behind: charged, so overload never pays
    return {
        "seconds": traffic.steps * compute_s + (dem + behind + late) * copy_s,
        "stall_demand_s": dem * copy_s,
        "stall_behind_prefetch_s": behind * copy_s,
        "stall_late_prefetch_s": late * copy_s,
        "late_prefetches": n_late,
        "promoted_prefetches": n_prom,
        "prefetch_backlog": backlog,
    }
