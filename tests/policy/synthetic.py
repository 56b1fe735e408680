"""Synthetic routing traces for the policy tests (no shared data needed)."""

from __future__ import annotations

import numpy as np
import torch

from moert.trace import InMemoryTrace, SequenceTrace, TraceMeta


def zipf_trace(L=4, E=16, k=2, T=40, n=6, seed=0):
    """``n`` sequences of ``T`` tokens over ``L`` layers, each token's top-``k`` drawn without replacement
    with P(expert e) ~ 1/(e+1). Returns (trace, meta, seqs)."""
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, E + 1)
    seqs = []
    for i in range(n):
        ex = np.stack([[rng.choice(E, k, replace=False, p=w / w.sum()) for _ in range(T)] for _ in range(L)])
        seqs.append(SequenceTrace(i, torch.arange(T), torch.from_numpy(ex), torch.ones(T, dtype=torch.bool)))
    meta = TraceMeta("synthetic", tuple(range(L)), E, k)
    return InMemoryTrace(meta, seqs), meta, seqs
