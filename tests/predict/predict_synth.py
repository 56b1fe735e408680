"""Synthetic routing traces (helpers for tests/predict; fixtures in conftest.py) with planted structure, shaped like ``moert.trace.SequenceTrace``.

Per layer l the "router" is a fixed random matrix ``W_l (E, H)``; a token's pre-attention row at
layer l is its vocabulary vector ``v_tok`` rotated by a per-layer random map plus small noise, and
its experts are ``topk(W_l x)``. So the experts are a (noisy) function of the row (preattn can learn
it) and of the token identity (xlayer / moe-beyond can), while per-layer frequencies are nearly flat.
"""

from __future__ import annotations

import torch

from moert.trace import SequenceTrace, TraceMeta, TraceWriter


def make_trace(
    *,
    num_seqs: int = 40,
    seq_len: int = 48,
    L: int = 4,
    E: int = 16,
    k: int = 2,
    H: int = 32,
    vocab: int = 60,
    noise: float = 0.05,
    seed: int = 0,
    hidden: bool = True,
    scores: bool = True,
    strings: bool = False,
) -> tuple[TraceMeta, list[SequenceTrace]]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(L, E, H, generator=g)
    rot = torch.randn(L, H, H, generator=g) / H**0.5
    V = torch.randn(vocab, H, generator=g)
    meta = TraceMeta(
        model_type="synthetic",
        layers=tuple(range(1, L + 1)),
        num_experts=E,
        top_k=k,
        hidden_size=H if hidden else None,
        num_tokens=num_seqs * seq_len,
        num_sequences=num_seqs,
        has_scores=scores,
        has_hidden=hidden,
        source="synthetic",
    )
    seqs = []
    for s in range(num_seqs):
        ids = torch.randint(0, vocab, (seq_len,), generator=g)
        x = torch.einsum("th,lhg->ltg", V[ids], rot) + noise * torch.randn(L, seq_len, H, generator=g)
        x = x / x.norm(dim=-1, keepdim=True) * H**0.5  # [L, T, H] "normalized" rows
        logits = torch.einsum("lth,leh->lte", x, W)
        probs = logits.softmax(-1)
        experts = probs.topk(k, dim=-1).indices
        seqs.append(
            SequenceTrace(
                seq_id=s,
                positions=torch.arange(seq_len),
                experts=experts,
                is_prefill=torch.ones(seq_len, dtype=torch.bool),
                token_ids=None if strings else ids,
                tokens=[f"t{int(i)}" for i in ids] if strings else None,
                scores=probs.float() if scores else None,
                hidden=x.half() if hidden else None,
            )
        )
    return meta, seqs


def write_trace(path, meta: TraceMeta, seqs: list[SequenceTrace]):
    with TraceWriter(path, meta) as w:
        for s in seqs:
            w.add(s)
    return path
