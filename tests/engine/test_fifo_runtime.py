"""Policy ``fifo`` in a patched model: the runtime drives the one ``moert.policy.fifo.Fifo`` object
that the simulator steps (``parity.check_runtime_is_the_simulator``: exact outputs, offloading happened,
the same hits, misses and resident sets as the simulator's stepping over the routing the model made)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import moert
from moert.models.tiny import greedy, prompt_ids, single_thread, tiny_model
from moert.policy.fifo import Fifo

sys.path.insert(0, str(Path(__file__).parent))
from parity import check_runtime_is_the_simulator  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.mark.parametrize("name", ["deepseek_v2-greedy", "qwen3_moe-nonorm-sparse", "phimoe"])
@pytest.mark.parametrize("batch", [1, 2])
def test_fifo_runtime_is_the_simulators_fifo(name, batch):
    check_runtime_is_the_simulator(name, batch, Fifo, policy="fifo")


def test_fifo_evicts_by_load_order_not_by_use():
    """The runtime's fifo and lru differ on the same model (fifo ignores hits), and both keep the numbers."""
    model = tiny_model("deepseek_v2", topk_method="greedy")
    prompt = prompt_ids(1, 6, vocab=model.config.vocab_size, seed=2)
    runs = {}
    for policy in ("lru", "fifo"):
        h = moert.patch(model, cache_experts=0.25, policy=policy, device="cpu", overlap_waves=False)
        runs[policy] = (greedy(model, prompt, 12), h.stats())
        h.undo()
    assert torch.equal(runs["lru"][0][1], runs["fifo"][0][1])
    assert runs["fifo"][1].misses > 0


def test_fifo_needs_the_runtime_backend():
    with pytest.raises(ValueError, match="policy='fifo' needs backend='runtime'"):
        moert.OffloadConfig(policy="fifo", backend="reference")
