"""Heterogeneous mode (``cpu_experts=True``, moert.engine.hetero): misses split between the host CPU and
the copy engine. On the CPU twin the host experts run the same ops on the same bytes as a slot, so
outputs stay bit-identical to all-resident; the split follows moert.sim.cost.cpu_split."""

from __future__ import annotations

import pytest
import torch

import moert
from moert.engine.hetero import CpuExperts
from moert.models.tiny import Reference, agree_until_near_tie, greedy, prompt_ids, single_thread, tiny_model
from moert.sim.cost import cpu_split

ARCH_VARIANTS = ("deepseek_v2-greedy", "qwen3_moe-nonorm-sparse", "phimoe")
EQUAL_TIMES = dict(cpu_expert_ms=1.0, copy_expert_ms=1.0, activation_us=0.0)  # about half the misses


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def _run(ref: Reference, **kw):
    model = ref.copy()
    handle = moert.patch(model, device="cpu", **kw)
    out = greedy(model, ref.prompt, ref.new_tokens)
    st = handle.stats()
    times = handle.cpu_expert_ms
    handle.undo()
    return out, st, times


@pytest.mark.parametrize("name", ARCH_VARIANTS)
def test_host_experts_keep_the_numbers_and_replace_loads(name, tmp_path):
    ref = Reference(name, tmp_path, batch=2, new_tokens=10)
    full, _, _ = _run(ref, cache_experts=1.0)
    plain, st_off, times_off = _run(ref, cache_experts=0.25)
    mixed, st, times = _run(ref, cache_experts=0.25, cpu_experts=True, **EQUAL_TIMES)
    assert times_off is None and times == (1.0, 1.0)
    assert torch.equal(mixed[0], ref.out[0]), f"{name}: tokens changed"
    assert torch.equal(mixed[1], full[1]), f"{name}: logits not bit-identical to all-resident"
    assert torch.equal(plain[1], full[1])
    assert st.cpu_experts > 0 and st.misses > 0 and st.misses < st_off.misses, (st, st_off)
    assert st.cpu_experts == sum(v.cpu_experts for v in st.per_layer.values())
    # every layer call's union is counted once: as a hit, a miss or a host expert
    for layer, v in st.per_layer.items():
        off = st_off.per_layer[layer]
        assert v.hits + v.misses + v.cpu_experts == off.hits + off.misses, (layer, v, off)
    slab = (st_off.bytes_copied - st_off.prefetch_bytes) // st_off.misses
    assert st.bytes_copied == st.misses * slab + st.prefetch_bytes  # host experts copy nothing
    assert st.as_dict()["cpu_experts"] == st.cpu_experts
    assert st.hit_rate == st.hits / (st.hits + st.misses + st.cpu_experts)


def test_choose_takes_the_last_misses_by_the_cost_split():
    hetero = CpuExperts(pool=None, layout=None, cpu_s=1.0, copy_s=1.0, activation_s=0.0)
    union = [3, 9, 1, 4, 7, 2]
    present = {9, 4}
    misses = [3, 1, 7, 2]
    c = int(cpu_split(len(misses), 1.0, 1.0, 0.0)[0][0])
    assert c == 2 and hetero.choose(union, present) == misses[-c:]
    assert hetero.choose(union, set(union)) == []
    slow = CpuExperts(pool=None, layout=None, cpu_s=100.0, copy_s=1.0, activation_s=0.0)
    assert slow.choose(union, present) == []  # a slow host gets nothing
    fast = CpuExperts(pool=None, layout=None, cpu_s=1e-3, copy_s=1.0, activation_s=0.0)
    assert fast.choose(union, present) == misses  # a fast host takes every miss


def test_measured_times_and_multi_wave_layers(tmp_path):
    """With no times given they are measured at patch time; a layer whose experts outnumber the
    cache (a prefill) streams in waves as before, with no host experts."""
    model = tiny_model("deepseek_v2", topk_method="greedy")
    k = model.config.num_experts_per_tok
    handle = moert.patch(model, cache_experts=k + 2, device="cpu", cpu_experts=True)
    cpu_ms, copy_ms = handle.cpu_expert_ms
    assert 0 < cpu_ms < 1e3 and 0 < copy_ms < 1e3
    with torch.no_grad():
        model(prompt_ids(2, 24, vocab=model.config.vocab_size, seed=7))
    st = handle.stats()
    handle.undo()
    assert st.cpu_experts == 0 and st.misses > 0
    assert all(v.waves > v.calls for v in st.per_layer.values())


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(cpu_experts="yes"), "cpu_experts='yes' must be True or False"),
        (dict(cpu_experts=True, cpu_expert_ms=0.0), "cpu_expert_ms=0.0 must be a positive number"),
        (dict(cpu_experts=True, copy_expert_ms=float("nan")), "copy_expert_ms=nan must be a positive"),
        (dict(cpu_experts=True, activation_us=-1.0), "activation_us=-1.0 must be a number of microseconds"),
    ],
)
def test_bad_settings_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        moert.OffloadConfig(**kw)


@pytest.mark.gpu
def test_cuda_host_experts_within_bf16_tolerance():
    model = tiny_model("deepseek_v2", topk_method="greedy").to("cuda", torch.bfloat16)
    prompt = prompt_ids(batch=2, length=6, vocab=model.config.vocab_size).cuda()
    want_seq, want_logits = greedy(model, prompt)
    handle = moert.patch(model, cache_experts=0.25, device="cuda", cpu_experts=True, **EQUAL_TIMES)
    seq, logits = greedy(model, prompt)
    st = handle.stats()
    handle.undo()
    assert st.cpu_experts > 0 and st.misses > 0
    agree_until_near_tie(want_seq, want_logits, seq, logits)  # host experts: within bf16 tolerance
