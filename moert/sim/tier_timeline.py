"""The SSD link as a second resource of the windowed timeline (:func:`tier_timeline`).

The copy link (PCIe) is replayed exactly as :func:`moert.sim.timeline.link_timeline` does (the formula and
its assumptions: :class:`moert.sim.CostModel`); a second link, the SSD, reads into the host pool the
experts the pool does not hold. Per step ``s`` (one MoE layer of one token), in copy units (``c = S / BW``
is 1; ``r = (S / BW_ssd + latency) / c`` is one read)::

    t0                 the step's prefetch copies join the PCIe FIFO; those whose expert misses the pool
                       join the SSD's read-ahead FIFO (same order);
    [t0, t0 + a*C)     both links work through their FIFOs; a prefetch copy whose read has not landed
                       does not start (the PCIe FIFO waits at it: head of line);
    t0 + a*C           routing. The committed PCIe window ends at the first copy whose read has not
                       landed. Demand copies and promoted used prefetches wait for the committed window,
                       then copy: pool hits (and promoted copies whose read landed) at once, the others
                       as their reads land. Their reads go before the SSD's read-ahead, after the read on
                       the SSD now (not preempted). The PCIe link idles while the next demand copy waits
                       for its read: that idle time is the step's SSD stall;
    stall W_s          = committed rest + copies + SSD idle; without a copy to make, the wait for the
                       latest committed used prefetch (as one link);
    [.., + (1-a)*C)    compute; both links work through their FIFOs again.

What it assumes (besides :class:`moert.sim.CostModel`'s):

- two separate resources: NVMe -> pinned pool, then pool -> device; a PCIe copy may overlap the SSD read
  of the next expert (pipelined), but an expert's own copy starts only after its read has landed;
- one read at a time at ``BW_ssd``, each with a fixed ``latency`` (no overlap of several reads' latency,
  as with a deep NVMe queue: pessimistic for small experts); a read in progress is not preempted;
- SSD priorities as the copy engine's: reads of demand misses (and of promoted prefetches still queued on
  the SSD) before read-ahead; read-ahead reads FIFO in the order their prefetch copies were queued;
- a read blocks compute only through the demand chain: a step waits for its own demand reads and for
  reads of the prefetches it uses, never for read-ahead it does not use;
- head of line on PCIe: a pool hit queued behind a prefetch copy waiting for its read waits too (the
  prefetch queue is FIFO); the link does not start a queued prefetch during a demand chain's idle time;
- the pool's hits and misses are those of the pool replay (:func:`moert.sim.tiers.replay_pool`); a read
  always finds a slot (no waiting for a pool slot pinned by a copy);
- the backlog carries across steps on both links; what is still queued when the trace ends is charged:
  the PCIe copies as a stall behind prefetches, the time their reads add as SSD stall.
- a consequence, not a rule: since a copy whose read has not landed is not committed, a demand copy may
  wait behind fewer prefetches with slower reads, so on a link that prefetches more than it moves the
  time is not always monotone in ``BW_ssd`` (very slow reads always cost; instant ones are one link).

With no SSD read at all it is :func:`link_timeline` itself (tested bit for bit, also of the loop here).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from moert.sim.timeline import Traffic, _advance, link_timeline

__all__ = ["TierTraffic", "tier_timeline"]

_EPS = 1e-9
_INF = math.inf


@dataclass(frozen=True)
class TierTraffic:
    """Which copies of a run's :class:`Traffic` need an SSD read first (their expert missed the pool).

    Attributes:
        demand_reads: (S,) int64, of each step's demand misses those not in the pool (<= ``demand``).
        prefetch_reads: (N,) bool, per prefetch copy (global FIFO index): its expert was not in the pool.
    """

    demand_reads: np.ndarray
    prefetch_reads: np.ndarray

    @property
    def reads(self) -> int:
        return int(self.demand_reads.sum()) + int(self.prefetch_reads.sum())


def tier_timeline(
    traffic: Traffic, reads: TierTraffic, *, compute_s: float, copy_s: float, read_s: float,
    attention_share: float, depth: int, loop: bool = False,
) -> dict:  # fmt: skip
    """Replays both links over every step (see the module doc).

    Args:
        traffic: the run's per-step PCIe traffic.
        reads: which of its copies need an SSD read first.
        compute_s, copy_s, attention_share, depth: as :func:`link_timeline`.
        read_s: one expert's SSD read, seconds (``S / BW_ssd`` + latency).
        loop: always run the step loop (tests; the default takes :func:`link_timeline` without reads and a
            closed form without prefetches).

    Returns:
        :func:`link_timeline`'s dict plus ``stall_ssd_s`` (PCIe idle waiting for reads) and
        ``read_backlog`` (read-ahead reads still queued when the trace ends).
    """
    S, D = traffic.steps, traffic.demand
    M = reads.demand_reads
    if M.shape != D.shape or (M > D).any() or (M < 0).any():
        raise ValueError("demand_reads must be (S,) counts, each at most the step's demand misses")
    if reads.prefetch_reads.size != int(traffic.issued.sum()):
        raise ValueError(
            f"prefetch_reads has {reads.prefetch_reads.size} copies; the traffic queued {int(traffic.issued.sum())}"
        )
    kw = dict(compute_s=compute_s, copy_s=copy_s, attention_share=attention_share, depth=depth)
    if not loop and reads.reads == 0:  # no SSD tier: the single link, exactly
        return {**link_timeline(traffic, **kw), "stall_ssd_s": 0.0, "read_backlog": 0.0}
    if traffic.issued_mid is not None and traffic.issued_mid.any():
        raise ValueError(
            "copies queued at a router for a later layer (a ':budget-ahead' prefetch) are not modelled with "
            "the SSD tier yet; use ':budget' with --host-capacity, or leave out --host-capacity"
        )
    rho = read_s / copy_s
    if not loop and traffic.issued.sum() == 0:  # demand only: pool hits copy during the first read
        m, dem = M.astype(np.float64), D.astype(np.float64)
        wait = np.where(M > 0, np.maximum(dem, np.maximum(rho + m, m * rho + 1.0)), dem)
        ssd = float((wait - dem).sum())
        return {
            "seconds": S * compute_s + (float(dem.sum()) + ssd) * copy_s,
            "stall_demand_s": float(dem.sum()) * copy_s,
            "stall_behind_prefetch_s": 0.0,
            "stall_late_prefetch_s": 0.0,
            "stall_ssd_s": ssd * copy_s,
            "late_prefetches": 0,
            "promoted_prefetches": 0,
            "prefetch_backlog": 0.0,
            "read_backlog": 0.0,
        }
    return _Loop(traffic, reads, compute_s, copy_s, rho, attention_share, depth).run()


class _Loop:
    """The step loop of :func:`tier_timeline`; times in copy units. Without reads each PCIe update is
    :func:`moert.sim.timeline._loop`'s own expression, so the result is bit for bit the same."""

    def __init__(self, traffic, reads, compute_s, copy_s, rho, share, depth) -> None:
        self.tr, self.compute_s, self.copy_s, self.rho, self.depth = traffic, compute_s, copy_s, rho, depth
        self.before, self.after = share * compute_s / copy_s, (1.0 - share) * compute_s / copy_s
        ra = np.flatnonzero(reads.prefetch_reads)  # FIFO indices of copies needing a read, in order
        pos = np.full(reads.prefetch_reads.size, -1, dtype=np.int64)
        pos[ra] = np.arange(ra.size)
        self.ra, self.pos = ra.tolist(), pos.tolist()
        self.rissued_after = np.searchsorted(ra, np.cumsum(traffic.issued), side="left").tolist()
        self.done = [_INF] * ra.size  # each read's landing time
        self.M = reads.demand_reads.tolist()
        self.head, self.issued, self.promoted = 0.0, 0, []  # PCIe prefetch FIFO (as _loop)
        self.gp = 0  # next read-gated copy of the PCIe FIFO (index into ra)
        self.rhead, self.rissued, self.rprom, self.rprom_set = 0.0, 0, [], set()  # SSD read-ahead FIFO

    # -- the SSD read-ahead FIFO --------------------------------------------------------------------------
    def ssd(self, t: float, budget: float) -> None:
        """``budget`` time units of read-ahead from time ``t``; landing times into ``done``."""
        while budget > _EPS and self.rhead < self.rissued - _EPS:
            if self.rprom and self.rprom[0] <= self.rhead + _EPS:
                self.rhead = max(self.rhead, heapq.heappop(self.rprom) + 1.0)  # read on demand already
                continue
            k = math.floor(self.rhead + _EPS)
            rest = (k + 1 - self.rhead) * self.rho
            if rest <= budget:
                t, budget = t + rest, budget - rest
                self.rhead, self.done[k] = float(k + 1), t
            else:
                self.rhead, budget = self.rhead + budget / self.rho, 0.0

    def first_unread(self) -> int | None:
        """The SSD position of the first read-ahead read not landed (in progress or queued), or None."""
        k = math.floor(self.rhead + _EPS)
        while k < self.rissued and k in self.rprom_set:
            k += 1
        return k if k < self.rissued else None

    # -- the PCIe prefetch FIFO ---------------------------------------------------------------------------
    def gated(self) -> bool:
        """Whether a copy still to start in the PCIe FIFO needs a read (else :func:`_loop`'s updates)."""
        while self.gp < self.rissued and self.ra[self.gp] < self.head - _EPS:
            self.gp += 1  # started (or promoted) already
        return self.gp < self.rissued

    def pcie(self, t: float, budget: float) -> float:
        """``budget`` time units of the PCIe FIFO from ``t``, a copy starting only once its read landed;
        returns the time the link stopped (``t + budget``, or earlier when the FIFO ran empty)."""
        if not self.gated():
            if budget > _EPS:
                self.head = _advance(self.head, budget, self.issued, self.promoted)
            return t + budget
        head = self.head
        while budget > _EPS and head < self.issued - _EPS:
            if self.promoted and self.promoted[0] <= head + _EPS:
                head = max(head, heapq.heappop(self.promoted) + 1.0)
                continue
            limit = min(self.issued, self.promoted[0]) if self.promoted else self.issued
            while self.gp < self.rissued and self.ra[self.gp] < head - _EPS:
                self.gp += 1
            if self.gp < self.rissued:
                g = self.ra[self.gp]
                if g <= head + _EPS:  # copy g starts now if its read has landed
                    wait = self.done[self.gp] - t
                    if wait > _EPS:
                        w = min(wait, budget)
                        t, budget = t + w, budget - w
                    else:
                        self.gp += 1
                    continue
                limit = min(limit, g)
            step = min(budget, limit - head)
            head, t, budget = head + step, t + step, budget - step
        self.head = head
        return t

    def compute(self, t: float, span: float) -> None:
        """Both links during ``span`` of compute from ``t``: the SSD first (the PCIe gates on it)."""
        self.ssd(t, span)
        if self.head < self.issued:
            if self.gated():
                self.pcie(t, span)
            else:
                h, q, p = self.head, self.issued, self.promoted
                self.head = min(h + span, q) if not p else _advance(h, span, q, p)

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self) -> dict:
        tr = self.tr
        D, Q = tr.demand.tolist(), tr.issued.tolist()
        bounds = np.searchsorted(tr.use_steps, np.arange(tr.steps + 1)).tolist()
        uses = tr.use_copies.tolist()
        self.tot = dict(dem=0.0, behind=0.0, late=0.0, ssd=0.0, n_late=0, n_prom=0)
        now, C = 0.0, self.before + self.after
        for s in range(tr.steps):
            self.issued += Q[s]
            self.rissued = self.rissued_after[s]
            d, u0, u1 = D[s], bounds[s], bounds[s + 1]
            if self.head >= self.issued and d == 0 and u0 == u1:
                now += C
                continue  # nothing queued, nothing to load: the step computes
            self.compute(now, self.before)
            t_r = now + self.before
            if u0 == u1 and d == 0:
                self.compute(t_r, self.after)
                now = t_r + self.after
                continue
            wait = self.demand(t_r, d, self.M[s], uses[u0:u1])
            now = t_r + wait
            self.compute(now, self.after)
            now += self.after
        return self.finish(now)

    def demand(self, t_r: float, d: int, m: int, used: list[int]) -> float:
        """The step's demand chain at its routing time ``t_r``: returns its stall, adds to the totals."""
        head, tot = self.head, self.tot
        window = min(
            math.floor(head + _EPS) + self.depth,
            self.issued,
            self.promoted[0] if self.promoted else self.issued,
        )
        k = self.first_unread()
        if k is not None:
            window = min(window, self.ra[k])  # a copy whose read has not landed is not committed
        need, prom = head, []
        for g in used:
            if g + 1 <= head + _EPS:
                continue  # arrived
            tot["n_late"] += 1
            if g < window:
                need = max(need, g + 1.0)  # committed: wait for it
            else:
                heapq.heappush(self.promoted, g)  # still queued: promoted to a demand copy
                prom.append(g)
        tot["n_prom"] += len(prom)
        copies, idle = d + len(prom), 0.0
        if copies > 0:
            commit = max(0.0, window - head)
            later, ssd_free = self.demand_reads(t_r, m, prom)
            end = commit + (copies - len(later))  # pool hits and landed reads copy back to back
            for r in sorted(later):
                if r > end:
                    idle += r - end
                    end = r
                end += 1.0
            wait = commit + copies + idle
            b = commit if d > 0 else 0.0
            lt = len(prom) + (commit if d == 0 else 0.0)
            self.ssd(t_r + ssd_free, wait - ssd_free)
            self.head = head + commit
            self.pcie(t_r + wait, wait - commit - copies - idle)
        else:
            lw = need - head
            wait = max(lw, 0.0)
            b, lt = 0.0, max(0.0, lw)
            self.ssd(t_r, wait)
            if self.gated():
                self.pcie(t_r, wait)
            else:
                self.head = _advance(head, wait, self.issued, self.promoted)
        tot["dem"] += wait - b - lt - idle
        tot["behind"] += b
        tot["late"] += lt
        tot["ssd"] += idle
        return wait

    def demand_reads(self, t_r: float, m: int, prom: list[int]) -> tuple[list[float], float]:
        """The chain's reads: ``m`` demand misses and the promoted copies whose read has not landed.
        Returns their landing times after ``t_r`` and when the SSD is free for read-ahead again."""
        k = math.floor(self.rhead + _EPS)
        busy = k < self.rissued and self.rhead > k + _EPS  # read k in progress: it finishes first
        first = (k + 1 - self.rhead) * self.rho if busy else 0.0
        later, n = [], m
        for g in prom:
            p = self.pos[g]
            if p < 0 or self.done[p] <= t_r + _EPS:
                continue  # a pool hit, or its read landed: copies at once
            if busy and p == k:
                later.append(first)
            else:  # still queued on the SSD: a demand read now
                heapq.heappush(self.rprom, p)
                self.rprom_set.add(p)
                n += 1
        if n == 0:
            return later, 0.0
        if busy:
            self.rhead, self.done[k] = float(k + 1), t_r + first
        later += [first + j * self.rho for j in range(1, n + 1)]
        return later, first + n * self.rho

    def finish(self, now: float) -> dict:
        """Totals; the backlog still queued after the last step is charged (module doc)."""
        tot = self.tot
        backlog = self.issued - self.head - len(self.promoted)
        read_backlog = 0.0
        if self.gated():  # queued copies still wait for reads: drain both links
            read_backlog = self.rissued - self.rhead - len(self.rprom)
            self.ssd(now, _INF)
            end = self.pcie(now, _INF)
            tot["ssd"] += max(0.0, end - now - backlog)
        tot["behind"] += backlog
        return {
            "seconds": self.tr.steps * self.compute_s
            + (tot["dem"] + tot["behind"] + tot["late"] + tot["ssd"]) * self.copy_s,
            "stall_demand_s": tot["dem"] * self.copy_s,
            "stall_behind_prefetch_s": tot["behind"] * self.copy_s,
            "stall_late_prefetch_s": tot["late"] * self.copy_s,
            "stall_ssd_s": tot["ssd"] * self.copy_s,
            "late_prefetches": tot["n_late"],
            "promoted_prefetches": tot["n_prom"],
            "prefetch_backlog": backlog,
            "read_backlog": read_backlog,
        }
