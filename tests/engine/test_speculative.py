"""Speculative decoding through a patched model (HF assisted generation with a draft model) and
MoE-SpAc's utility policy in the runtime (the ``moert.policy.utility.Utility`` object the patched model
drives): numbers unchanged, the moving average against an independent recomputation, config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moert
from moert.models.tiny import Reference, agree_until_near_tie, greedy, prompt_ids, single_thread, tiny_model

ARCH_VARIANTS = ("deepseek_v2-greedy", "qwen3_moe-nonorm-sparse", "phimoe")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def _assisted(model, draft, prompt, new_tokens):
    return greedy(model, prompt, new_tokens, assistant_model=draft)


@pytest.mark.parametrize("policy", ["lru", "utility"])
def test_assisted_generation_through_a_patched_model_is_exact(policy):
    """The target verifies gamma+1 drafted tokens per call; the patched target's tokens equal plain
    greedy decoding and its logits are bit-identical to moert with every expert cached."""
    target = tiny_model("deepseek_v2", topk_method="greedy")
    draft = tiny_model("deepseek_v2", topk_method="greedy", seed=1, num_hidden_layers=2)
    prompt = prompt_ids(1, 6, vocab=target.config.vocab_size)
    new_tokens = 16
    want, _ = greedy(target, prompt, new_tokens)
    h = moert.patch(target, cache_experts=1.0, device="cpu")
    full_seq, full_logits = _assisted(target, draft, prompt, new_tokens)
    h.undo()
    experts = moert.models.get_adapter(target).moe_layers()[0].experts
    h = moert.patch(target, cache_experts=0.25, device="cpu", policy=policy)
    rows: list[int] = []
    hook = experts.register_forward_pre_hook(lambda mod, args: rows.append(int(args[0].shape[0])))
    seq, logits = _assisted(target, draft, prompt, new_tokens)
    hook.remove()
    st = h.stats()
    h.undo()
    assert torch.equal(seq, want) and torch.equal(full_seq, want)
    assert logits.shape == full_logits.shape and torch.equal(logits, full_logits)
    assert st.misses > 0
    # after the prompt, the target's layers verified several drafted tokens per call
    assert len(rows) > 1 and max(rows[1:]) > 1, rows
    if policy == "utility":
        assert st.prefetches > 0 and st.prefetch_hits > 0, st


@pytest.mark.parametrize("name", ARCH_VARIANTS)
def test_utility_policy_keeps_the_numbers(name, tmp_path):
    ref = Reference(name, tmp_path, batch=2, new_tokens=10)
    outs = {}
    for cache in (1.0, 0.25):
        model = ref.copy()
        h = moert.patch(model, cache_experts=cache, device="cpu", policy="utility")
        outs[cache] = greedy(model, ref.prompt, ref.new_tokens)
        st = h.stats()
        h.undo()
    assert torch.equal(outs[0.25][0], ref.out[0]), f"{name}: tokens changed"
    assert torch.equal(outs[0.25][1], outs[1.0][1]), f"{name}: not bit-identical to all-resident"
    assert st.misses > 0 and st.prefetches > 0


def test_utility_is_the_moving_average_of_each_calls_counts(tmp_path):
    ref = Reference("qwen3_moe-nonorm-sparse", tmp_path, batch=2, new_tokens=8)
    model = ref.copy()
    decay = 0.6
    h = moert.patch(model, cache_experts=0.25, device="cpu", policy="utility", utility_decay=decay)
    policy = h.offloader.policy
    seen: list[tuple[int, list[int]]] = []
    after_call = policy.after_call
    policy.after_call = lambda ordinal, counts: (
        seen.append((ordinal, [int(c) for c in counts])),
        after_call(ordinal, counts),
    )[1]
    routed: list[tuple[int, list[int]]] = []  # the router's own selections, counted independently
    for layer in [m.__dict__["_moert"] for m in model.modules() if "_moert" in m.__dict__]:
        forward = layer.forward

        def counting(module, hidden, top_k_index, weights, layer=layer, forward=forward):
            E = layer.offloader.num_experts
            routed.append((layer.ordinal, torch.bincount(top_k_index.reshape(-1), minlength=E).tolist()))
            return forward(module, hidden, top_k_index, weights)

        layer.forward = counting
    greedy(model, ref.prompt, ref.new_tokens)
    got = policy.utility.copy()
    h.undo()
    assert seen == routed, "after_call did not get the router's per-expert selection counts"
    want = np.zeros_like(got)
    for ordinal, counts in routed:
        for e, c in enumerate(counts):
            want[ordinal, e] = decay * want[ordinal, e] + (1 - decay) * c
    assert seen and np.allclose(got, want, rtol=1e-12, atol=0), np.abs(got - want).max()
    # counts are per-token selections, not 0/1: the prefill of 2 x 6 tokens picks experts several times
    assert max(max(c) for _, c in seen) >= 2


def test_utility_without_prefetch_only_orders_eviction(tmp_path):
    ref = Reference("deepseek_v2-greedy", tmp_path, batch=1, new_tokens=8)
    model = ref.copy()
    h = moert.patch(model, cache_experts=0.25, device="cpu", policy="utility", prefetch="off")
    out = greedy(model, ref.prompt, ref.new_tokens)
    st = h.stats()
    h.undo()
    assert torch.equal(out[0], ref.out[0])
    waves = sum(v.wave_prefetches for v in st.per_layer.values())
    assert st.prefetches == waves  # nothing but the overlapped waves of the prompt


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(policy="utility", utility_decay=1.0), "utility_decay=1.0 must be in \\(0, 1\\)"),
        (
            dict(policy="utility", predictor="p.safetensors"),
            "policy='utility' orders eviction by the experts",
        ),
        (dict(policy="utility", backend="reference"), "policy='utility' needs backend='runtime'"),
        (dict(policy="utility", overprovision="adaptive"), "give an int overprovision=m"),
        (dict(policy="mru"), "policy='mru' is not one of lru, lfu, score, utility, fifo"),
    ],
)
def test_bad_settings_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        moert.OffloadConfig(**kw)


@pytest.mark.gpu
def test_cuda_assisted_generation_with_utility_is_exact_across_cache_sizes():
    """bf16 on CUDA: the patched target's assisted generation gives the unpatched greedy tokens, and
    its logits are bit-identical between a 25% cache (utility policy, prefetches) and every expert."""
    target = tiny_model("deepseek_v2", topk_method="greedy").to("cuda", torch.bfloat16)
    draft = tiny_model("deepseek_v2", topk_method="greedy", seed=1, num_hidden_layers=2).to(
        "cuda", torch.bfloat16
    )
    prompt = prompt_ids(1, 6, vocab=target.config.vocab_size).cuda()
    want, want_logits = greedy(target, prompt, 16)
    outs = {}
    for cache, policy in ((1.0, "lru"), (0.25, "utility")):
        h = moert.patch(target, cache_experts=cache, device="cuda", policy=policy)
        outs[cache] = _assisted(target, draft, prompt, 16)
        st = h.stats()
        h.undo()
    assert torch.equal(outs[0.25][1], outs[1.0][1]), "not bit-identical across cache sizes on CUDA"
    assert torch.equal(outs[0.25][0], outs[1.0][0])
    # vs the unpatched model (other rounding): tolerance, up to the first near tie
    agree_until_near_tie(want, want_logits, outs[1.0][0], outs[1.0][1])
    assert st.misses > 0 and st.prefetches > 0
