"""Policy ``learned`` in a patched model: exact outputs, offloading happened, and the runtime's hits,
misses and resident sets equal the simulator's stepping of the same policy over the routing the model
made (``parity.check_runtime_is_the_simulator``, whose conditions for exact agreement apply)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import moert
from moert.models.tiny import VARIANTS, greedy, prompt_ids, single_thread, tiny_model
from moert.policy.learned import Learned
from moert.predict.reuse import ReuseModel, save_reuse

sys.path.insert(0, str(Path(__file__).parent))
from parity import check_runtime_is_the_simulator  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.mark.parametrize("name", ["deepseek_v2-greedy", "qwen3_moe-nonorm-sparse"])
@pytest.mark.parametrize("batch", [1, 2])
def test_learned_runtime_is_the_simulators_learned(name, batch, tmp_path):
    model_type, overrides = VARIANTS[name]
    model = tiny_model(model_type, **overrides)
    adapter = moert.models.get_adapter(model)
    L, k, E = len(adapter.moe_layers()), adapter.top_k, adapter.num_experts
    path = save_reuse(tmp_path / "r.safetensors", ReuseModel.random(L, E, seed=5), model_type=model_type,
                      layers=tuple(range(L)), top_k=k)  # fmt: skip
    check_runtime_is_the_simulator(name, batch, Learned, policy="learned", evictor=str(path))


def test_learned_decides_differently_from_lru():
    """The same model under lru and learned: equal outputs, different eviction (else the test above
    could pass with priorities that change nothing)."""
    model = tiny_model("deepseek_v2", topk_method="greedy")
    adapter = moert.models.get_adapter(model)
    rm = ReuseModel.random(len(adapter.moe_layers()), adapter.num_experts, seed=5)
    prompt = prompt_ids(1, 6, vocab=model.config.vocab_size, seed=2)
    runs = {}
    for policy, extra in (("lru", {}), ("learned", {"evictor": rm})):
        h = moert.patch(model, cache_experts=0.25, policy=policy, device="cpu", overlap_waves=False, **extra)
        runs[policy] = (greedy(model, prompt, 12), h.stats())
        h.undo()
    assert torch.equal(runs["lru"][0][1], runs["learned"][0][1])
    assert runs["learned"][1].misses > 0
    assert (
        runs["learned"][1].misses != runs["lru"][1].misses or runs["learned"][1].hits != runs["lru"][1].hits
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"policy": "learned"}, "policy='learned' evicts by a reuse model: pass evictor="),
        ({"policy": "lru", "evictor": "r.safetensors"}, "evictor= is the model of policy='learned'"),
        (
            {"policy": "learned", "evictor": "r.safetensors", "backend": "reference"},
            "needs backend='runtime'",
        ),
        (
            {"policy": "learned:next", "evictor": "r.safetensors"},
            r"a model runs 'learned' as it is; .* \(`moert simulate TRACE --policy learned:next`\)",
        ),
    ],
)
def test_config_errors_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        moert.OffloadConfig(**kwargs)
