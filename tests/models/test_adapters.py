"""Adapters: registry, layer discovery per routing variant, router scores vs the model's own router."""

from __future__ import annotations

import pytest
import torch

from moert.models import SUPPORTED, get_adapter
from moert.models.tiny import VARIANTS, tiny_model

EXPECTED_MOE_LAYERS = {
    "deepseek_v2-greedy": [1, 2],
    "deepseek_v2-group": [1, 2],
    "qwen3_moe-norm": [0, 1, 2],
    "qwen3_moe-nonorm-sparse": [1, 2],
    "qwen3_moe-step2": [1],
    "phimoe": [0, 1, 2],
}


def test_supported_types():
    assert set(SUPPORTED) == {"deepseek_v2", "qwen3_moe", "phimoe"}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_moe_layers_and_router_scores(name):
    model_type, overrides = VARIANTS[name]
    model = tiny_model(model_type, **overrides)
    adapter = get_adapter(model)
    refs = adapter.moe_layers()
    assert [r.index for r in refs] == EXPECTED_MOE_LAYERS[name]
    cfg = model.config
    assert adapter.top_k == cfg.num_experts_per_tok
    for ref in refs:
        assert ref.layer is model.model.layers[ref.index]
        assert ref.experts is ref.layer.mlp.experts
        assert ref.norm is ref.layer.input_layernorm
        assert ref.experts.gate_up_proj.shape[0] == adapter.num_experts
        if model_type == "deepseek_v2":
            assert ref.shared is ref.layer.mlp.shared_experts
        else:
            assert ref.shared is None
        if model_type == "phimoe":
            assert ref.router is ref.layer.mlp.router
            assert isinstance(ref.norm, torch.nn.LayerNorm) and ref.norm.bias is not None
    # router_scores are the probabilities the model's router ranks: its top-k are the router's choice
    x = torch.randn(5, adapter.hidden_size)
    ref = refs[0]
    scores = adapter.router_scores(ref, x)
    assert scores.shape == (5, adapter.num_experts) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.sum(-1), torch.ones(5))
    _, _, chosen = ref.router(x)
    if model_type != "deepseek_v2" or overrides.get("topk_method") == "greedy":
        want = set(map(tuple, chosen.sort(-1).values.tolist()))
        got = set(map(tuple, scores.topk(adapter.top_k, -1).indices.sort(-1).values.tolist()))
        assert got == want, f"router top-k {want} != scores top-k {got}"


def test_unsupported_model_type_lists_supported():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
    )
    with pytest.raises(ValueError, match=r"mixtral.*deepseek_v2, phimoe, qwen3_moe"):
        get_adapter(MixtralForCausalLM(cfg))


def test_structure_mismatch_is_named():
    model = tiny_model("qwen3_moe")
    del model.model.layers[1].mlp.gate
    with pytest.raises(ValueError, match=r"layer 1 .*lacks mlp\.gate"):
        get_adapter(model).moe_layers()
    model = tiny_model("deepseek_v2")
    model.model.layers[2].mlp.experts.down_proj = torch.nn.Parameter(torch.zeros(16, 64, 8))
    with pytest.raises(ValueError, match=r"layer 2.*down_proj has shape"):
        get_adapter(model).moe_layers()
