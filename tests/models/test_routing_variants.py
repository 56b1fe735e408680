"""The tiny variants really exercise the routing rules the exactness tests claim to cover."""

from __future__ import annotations

import torch

from moert.models import get_adapter
from moert.models.tiny import VARIANTS, tiny_model


def routed(name: str, tokens: int = 64):
    model_type, overrides = VARIANTS[name]
    model = tiny_model(model_type, **overrides)
    ref = get_adapter(model).moe_layers()[0]
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    _, weights, index = ref.router(x)
    return model, ref, x, weights, index


def test_deepseek_group_limited_greedy_with_scaling():
    model, ref, x, weights, index = routed("deepseek_v2-group")
    cfg = model.config
    assert ref.router.topk_method == "group_limited_greedy" and cfg.n_group == 4 and cfg.topk_group == 2
    group_size = cfg.n_routed_experts // cfg.n_group
    groups_used = torch.tensor([len(set((row // group_size).tolist())) for row in index])
    assert groups_used.max() <= cfg.topk_group and groups_used.max() == cfg.topk_group
    probs = get_adapter(model).router_scores(ref, x)
    want = probs.gather(1, index) * cfg.routed_scaling_factor
    torch.testing.assert_close(weights, want)


def test_deepseek_greedy_unnormalised():
    model, ref, x, weights, index = routed("deepseek_v2-greedy")
    probs = get_adapter(model).router_scores(ref, x)
    assert ref.router.topk_method == "greedy"
    torch.testing.assert_close(weights, probs.gather(1, index))
    assert (weights.sum(-1) < 1).all()


def test_qwen3_norm_topk_prob_on_and_off():
    _, _, _, weights, _ = routed("qwen3_moe-norm")
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[0]))
    _, _, _, weights, _ = routed("qwen3_moe-nonorm-sparse")
    assert (weights.sum(-1) < 1 - 1e-3).all()


def test_phimoe_sparsemixer_top2():
    model, ref, _, weights, index = routed("phimoe")
    assert index.shape[-1] == 2 and model.config.num_experts_per_tok == 2
    assert (index[:, 0] != index[:, 1]).all()
    assert ((weights > 0) & (weights <= 1)).all()
