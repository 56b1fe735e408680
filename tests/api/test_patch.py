"""moert.patch: undo, memory released, stats, waves, and clear errors for bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import moert
from moert.models.tiny import (
    VARIANTS,
    Reference,
    agree_until_near_tie,
    greedy,
    prompt_ids,
    single_thread,
    tiny_model,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return Reference("deepseek_v2-greedy", tmp_path_factory.mktemp("patch"))


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def expert_bytes(model) -> int:
    return sum(
        p.numel() * p.element_size()
        for layer in model.model.layers
        if hasattr(layer.mlp, "experts")
        for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj)
    )


def test_undo_restores_modules_weights_and_implementation(ds):
    model = ds.copy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    params = {n: p for n, p in model.named_parameters()}
    impl = model.config._experts_implementation
    handle = moert.patch(model, cache_experts=5)
    assert model.config._experts_implementation == "moert"
    greedy(model, ds.prompt, 4)
    handle.undo()
    assert model.config._experts_implementation == impl
    assert dict(model.named_modules()) == modules, "module objects changed"
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    assert all(now[n] is params[n] for n in params), "parameter objects were replaced"
    after = model.state_dict()
    assert after.keys() == before.keys()
    bad = [k for k in before if not torch.equal(before[k], after[k])]
    assert not bad, f"weights differ after undo: {bad[:5]}"
    seq, _ = greedy(model, ds.prompt)
    assert torch.equal(seq, ds.out[0])
    assert moert.handle_of(model) is None
    with pytest.raises(RuntimeError, match="already undone"):
        handle.undo()
    assert handle.stats().misses > 0  # final stats survive undo
    # patchable again after undo
    moert.patch(model, cache_experts=5).undo()


def test_patching_twice_raises(ds):
    model = ds.copy()
    handle = moert.patch(model, cache_experts=5)
    with pytest.raises(RuntimeError, match="already patched"):
        moert.patch(model, cache_experts=5)
    handle.undo()


def test_expert_memory_is_released(ds):
    model = ds.copy()
    total, experts = param_bytes(model), expert_bytes(model)
    handle = moert.patch(model, cache_experts=5)
    assert param_bytes(model) == total - experts
    assert handle.freed_bytes == experts
    assert handle.pool_bytes >= experts
    assert handle.cache_bytes == 5 * handle.layout.slab_bytes
    # pool contents are the original experts
    gu, dn = handle.expert_weights(2, 7)
    orig = ds.model.model.layers[2].mlp.experts
    assert torch.equal(gu, orig.gate_up_proj[7]) and torch.equal(dn, orig.down_proj[7])
    handle.undo()
    assert param_bytes(model) == total


def test_stats_per_layer_waves_and_reset(ds):
    model = ds.copy()
    k = model.config.num_experts_per_tok
    handle = moert.patch(model, cache_experts=k)
    long_prompt = prompt_ids(batch=3, length=20, vocab=model.config.vocab_size, seed=5)
    with torch.no_grad():
        model(long_prompt)  # prefill: the union of 60 tokens' experts exceeds k slots -> waves
    st = handle.stats()
    assert set(st.per_layer) == {1, 2}
    for layer, ls in st.per_layer.items():
        assert ls.calls == 1 and ls.waves > 1, (layer, ls)
        assert ls.hits + ls.misses >= ls.waves
    assert st.hits == sum(s.hits for s in st.per_layer.values())
    assert st.misses == sum(s.misses for s in st.per_layer.values())
    assert st.bytes_copied == sum(s.bytes_copied for s in st.per_layer.values())
    assert st.demand_stall_s > 0
    d = st.as_dict()
    json.dumps(d)
    assert d["per_layer"]["1"]["waves"] == st.per_layer[1].waves
    handle.reset_stats()
    assert handle.stats().misses == 0 and handle.stats().per_layer[1].calls == 0
    handle.undo()


def test_offload_config_object_and_overrides(ds):
    model = ds.copy()
    cfg = moert.OffloadConfig(cache_experts=0.25, policy="lfu")
    handle = moert.patch(model, cfg)
    assert handle.num_slots == 8 and handle.config.policy == "lfu"  # 0.25 * 2 layers * 16
    handle.undo()
    handle = moert.patch(model, cfg, policy="lru")
    assert handle.config.policy == "lru"
    handle.undo()
    with pytest.raises(TypeError, match="OffloadConfig"):
        moert.patch(model, {"cache_experts": 4})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cache_experts": 3}, r"3 slots, fewer than one layer's top-k \(4\)"),
        ({"cache_experts": 0.05}, r"fewer than one layer's top-k"),
        ({"cache_experts": 0.0}, r"not a fraction in \(0, 1\]"),
        ({"cache_experts": -0.5}, r"not a fraction in \(0, 1\]"),
        ({"cache_experts": 1.5}, r"not a fraction in \(0, 1\]"),
        ({"cache_experts": float("nan")}, r"not a fraction"),
        ({"cache_experts": 0}, r"must be positive"),
        ({"cache_experts": -2}, r"must be positive"),
        ({"cache_experts": 33}, r"only 32 routed experts"),
        (
            {"policy": "belady"},
            r"policy='belady' is not one of lru, lfu, score, utility, fifo.*`moert simulate TRACE --policy belady`",
        ),
        ({"device": "tpu"}, r"device='tpu'"),
    ],
)
def test_bad_config_is_a_clear_error(ds, kwargs, match):
    model = ds.copy()
    with pytest.raises(ValueError, match=match):
        moert.patch(model, **kwargs)
    assert moert.handle_of(model) is None
    assert "gate_up_proj" in dict(model.model.layers[1].mlp.experts.named_parameters())


def test_unsupported_model_type_lists_supported():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(ValueError, match=r"model_type 'llama'; supported: deepseek_v2, phimoe, qwen3_moe"):
        moert.patch(LlamaForCausalLM(cfg))


def test_device_map_and_meta_models_are_refused(ds):
    model = ds.copy()
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers": "cpu", "lm_head": "disk"}
    with pytest.raises(ValueError, match="device map"):
        moert.patch(model)
    with torch.device("meta"):
        meta = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="meta device"):
        moert.patch(meta)


def test_cache_on_another_device_moves_the_rest(ds):
    model = ds.copy()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda' was requested but no CUDA device can run"):
            moert.patch(model, device="cuda")
        assert moert.handle_of(model) is None
        return
    params = dict(model.named_parameters())
    handle = moert.patch(model, cache_experts=5, device="cuda")  # a CPU model offloaded onto the GPU
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    seq, _ = greedy(model, ds.prompt.cuda())
    assert torch.equal(seq.cpu(), ds.out[0])
    handle.undo()
    assert all(p.device.type == "cpu" and p is params[n] for n, p in model.named_parameters())


def test_shared_config_is_a_clear_error(ds):
    a = ds.copy()
    b = copy.deepcopy(a)
    b.config = a.config  # two models, one config object
    for layer in b.model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts.config = a.config
    handle = moert.patch(a, cache_experts=5)
    with pytest.raises(RuntimeError, match="share one config object"):
        b(ds.prompt)
    handle.undo()


def test_patch_callable_after_submodule_import(ds):
    import moert.api.load
    import moert.api.patch

    assert callable(moert.patch) and callable(moert.load)
    model = ds.copy()
    moert.patch(model, cache_experts=4).undo()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["deepseek_v2-greedy", "deepseek_v2-group", "qwen3_moe-norm", "phimoe"])
def test_cuda_bf16_equivalence(name):
    model_type, overrides = VARIANTS[name]
    model = tiny_model(model_type, **overrides).to("cuda", torch.bfloat16)
    prompt = prompt_ids(batch=2, length=6, vocab=model.config.vocab_size).cuda()
    want_seq, want_logits = greedy(model, prompt)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    experts = expert_bytes(model)
    outs = []
    for slots, policy in ((model.config.num_experts_per_tok, "lru"), (0.5, "lfu"), (1.0, "lru")):
        handle = moert.patch(model, cache_experts=slots, policy=policy, device="cuda")
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= before - experts + handle.cache_bytes + (1 << 20)
        seq, logits = greedy(model, prompt)
        misses = handle.stats().misses
        handle.undo()
        assert misses > 0, f"{name} cache={slots}: nothing was loaded"
        # the unpatched model rounds differently (grouped GEMM, bf16 combine): tolerance, up to a near tie
        agree_until_near_tie(want_seq, want_logits, seq, logits)
        outs.append(logits)
    assert all(torch.equal(outs[0], o) for o in outs[1:]), "not bit-identical across cache sizes on CUDA"


def test_transformers_version_guard(monkeypatch):
    import transformers

    from moert.api.patch import register_experts_implementation

    monkeypatch.setattr(transformers, "__version__", "5.16.2")
    with pytest.raises(ImportError, match=r"transformers 5\.16\.2 is too old: moert needs >= 5\.17"):
        register_experts_implementation()
    monkeypatch.setattr(transformers, "__version__", "5.17.0.dev0")
    register_experts_implementation()


def test_dense_layers_and_shared_experts_stay_resident(ds):
    model = ds.copy()
    dense = {n: p for n, p in model.model.layers[0].mlp.named_parameters()}
    shared = {n: p for n, p in model.model.layers[1].mlp.shared_experts.named_parameters()}
    handle = moert.patch(model, cache_experts=4)
    assert handle.layer_ids == [1, 2]  # first_k_dense_replace=1: layer 0 is dense
    assert dict(model.model.layers[0].mlp.named_parameters()) == dense
    assert dict(model.model.layers[1].mlp.shared_experts.named_parameters()) == shared
    assert all(p.numel() > 0 for p in list(dense.values()) + list(shared.values()))
    slab = handle.layout.slab_bytes
    assert 2 * 16 * slab <= handle.pool_bytes < 3 * 16 * slab  # 2 layers of routed experts only
    handle.undo()
