"""A patched model's state_dict stays whole (experts as views of the host pool), so save_pretrained
of a patched model writes a checkpoint that loads back into the same model; loading into the
experts of a patched model is refused with the fix named."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import moert
from moert.models.tiny import Reference, greedy, single_thread

ARCHS = ("deepseek_v2-greedy", "qwen3_moe-nonorm-sparse", "phimoe")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.mark.parametrize("backend", ["runtime", "reference"])
@pytest.mark.parametrize("name", ARCHS)
def test_save_pretrained_of_a_patched_model_round_trips(name, backend, tmp_path):
    ref = Reference(name, tmp_path / "ref", batch=1, new_tokens=8)
    want = {k: v.clone() for k, v in ref.model.state_dict().items()}
    model = ref.copy()
    handle = moert.patch(model, cache_experts=0.25, device="cpu", backend=backend)
    state = model.state_dict()
    assert set(state) == set(want)
    bad = [k for k in want if not torch.equal(state[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ from the unpatched model, first {bad[:3]}"
    if backend == "runtime":
        pool = handle.offloader.pool
        lo = pool._c.address(0, 0)
        experts = [k for k in state if k.endswith(("gate_up_proj", "down_proj"))]
        assert experts and all(lo <= state[k].data_ptr() < lo + pool.nbytes for k in experts), (
            "not pool views"
        )
    model.save_pretrained(tmp_path / "saved")
    out = greedy(model, ref.prompt, ref.new_tokens)
    handle.undo()
    assert torch.equal(out[0], ref.out[0])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    again = loaded.state_dict()
    bad = [k for k in want if not torch.equal(again[k], want[k])]
    assert not bad, f"{len(bad)} tensors of the saved checkpoint differ, first {bad[:3]}"
    assert torch.equal(greedy(loaded, ref.prompt, ref.new_tokens)[0], ref.out[0])


def test_loading_into_patched_experts_is_refused_and_undo_removes_the_hooks(tmp_path):
    ref = Reference("deepseek_v2-greedy", tmp_path, batch=1, new_tokens=4)
    model = ref.copy()
    handle = moert.patch(model, cache_experts=0.25, device="cpu")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match="gate_up_proj lives in moert's expert pool.*handle.undo\\(\\), load"
    ):
        model.load_state_dict(state)
    others = {k: v for k, v in state.items() if not k.endswith(("gate_up_proj", "down_proj"))}
    model.load_state_dict(others, strict=False)  # the rest of the model still loads
    assert torch.equal(greedy(model, ref.prompt, ref.new_tokens)[0], ref.out[0])
    handle.undo()
    after = model.state_dict()
    params = dict(model.named_parameters())
    experts = [k for k in after if k.endswith(("gate_up_proj", "down_proj"))]
    assert experts and all(after[k].data_ptr() == params[k].data_ptr() for k in experts)
    model.load_state_dict(state)  # unpatched: loads as usual
