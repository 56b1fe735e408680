"""Offloading never changes the numbers (DESIGN §8), for every architecture and routing variant.

fp32, batch 2, greedy 32 tokens (prefill + decode): patched == unpatched tokens and logits within
1e-5 relative; bit-identical logits across cache sizes (one layer's top-k .. all experts) and
policies; the same through ``moert.load`` of the ``save_pretrained`` directory.
"""

from __future__ import annotations

import pytest
import torch

import moert
from moert.models.tiny import VARIANTS, greedy

POLICIES = ("lru", "lfu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_matches(name: str, what: str, got, ref) -> None:
    seq, logits = got
    ref_seq, ref_logits = ref
    if not torch.equal(seq, ref_seq):
        diff = (seq != ref_seq).nonzero()
        raise AssertionError(
            f"{name} {what}: tokens differ first at (batch, pos) {diff[0].tolist()}: {seq} vs {ref_seq}"
        )
    err = rel_err(logits, ref_logits)
    assert err <= 1e-5, f"{name} {what}: logits relative error {err:.3e} > 1e-5"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_patch_exact_across_cache_sizes_and_policies(name, references):
    ref = references(name)
    k = ref.model.config.num_experts_per_tok
    logits, stats = {}, {}
    for slots in (k, 2 * k + 1, 1.0):  # one layer's top-k .. every expert
        for policy in POLICIES:
            model = ref.copy()
            handle = moert.patch(model, cache_experts=slots, policy=policy)
            got = greedy(model, ref.prompt)
            st = handle.stats()
            handle.undo()
            assert_matches(name, f"cache={slots} {policy}", got, ref.out)
            # wave prefetches (unions larger than the cache) are bytes too
            assert (
                st.misses > 0 and st.bytes_copied == st.misses * handle.layout.slab_bytes + st.prefetch_bytes
            )
            assert st.hits + st.misses == sum(s.hits + s.misses for s in st.per_layer.values())
            logits[(slots, policy)], stats[(slots, policy)] = got[1], st
    # with every expert cached, each (layer, expert) used misses exactly once (cold)
    used = stats[(1.0, "lru")].misses
    assert stats[(1.0, "lru")].evictions == 0 and stats[(1.0, "lfu")].misses == used
    for (slots, policy), st in stats.items():
        if slots != 1.0 and slots < used:
            # the cache is smaller than the experts used: some expert is loaded again (on demand or
            # by a wave prefetch)
            loads = st.misses + st.prefetches
            assert loads > used and st.evictions > 0, (slots, policy, st.misses, st.prefetches, used)
    base_key = (k, "lru")
    for key, v in logits.items():
        if not torch.equal(v, logits[base_key]):
            worst = (v - logits[base_key]).abs().max().item()
            raise AssertionError(
                f"{name}: logits at {key} not bit-identical to {base_key} (max diff {worst:.3e})"
            )


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_load_exact(name, references):
    ref = references(name)
    model = moert.load(ref.path, cache_experts=0.25, policy="lru", progress=False)
    handle = moert.handle_of(model)
    got = greedy(model, ref.prompt)
    assert_matches(name, "moert.api.load 0.25", got, ref.out)
    assert handle.stats().misses > 0
    # bit-identical to the in-memory patch with every expert resident
    resident = ref.copy()
    h2 = moert.patch(resident, cache_experts=1.0)
    full = greedy(resident, ref.prompt)
    h2.undo()
    assert torch.equal(got[1], full[1]), (
        f"{name}: load vs all-resident max diff {(got[1] - full[1]).abs().max():.3e}"
    )
    handle.undo()
    want, have = ref.model.state_dict(), model.state_dict()
    assert want.keys() == have.keys()
    bad = [k for k in want if not torch.equal(want[k], have[k])]
    assert not bad, f"{name}: after load+undo these differ from the saved model: {bad[:5]}"


@pytest.mark.parametrize("policy", POLICIES)
def test_runtime_counts_match_reference_cache(policy, references):
    """The runtime's hits/misses equal the pure-Python dict cache's on the same run."""
    ref = references("deepseek_v2-greedy")
    counts = {}
    for backend in ("runtime", "reference"):
        model = ref.copy()
        # plain waves: the reference store cannot prefetch, so overlapped waves would count differently
        handle = moert.patch(model, cache_experts=7, policy=policy, backend=backend, overlap_waves=False)
        got = greedy(model, ref.prompt)
        counts[backend] = (handle.stats().hits, handle.stats().misses, got[1])
        handle.undo()
    (h1, m1, l1), (h2, m2, l2) = counts["runtime"], counts["reference"]
    assert (h1, m1) == (h2, m2), f"runtime hits/misses {(h1, m1)} != reference {(h2, m2)}"
    assert torch.equal(l1, l2)
