"""ExpertPool: layout, alignment, fill and views against plain byte arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moert.engine.runtime import ExpertPool


@pytest.mark.parametrize(("layers", "experts", "slab"), [(1, 1, 16), (2, 3, 272), (3, 5, 4096), (1, 7, 1008)])
def test_layout_is_page_aligned_with_fixed_stride(layers, experts, slab):
    pool = ExpertPool(layers, experts, slab, pin=False)
    stride = -(-slab // 256) * 256
    assert (pool.stride, pool.nbytes, pool.slab_bytes, pool.pinned) == (
        stride,
        layers * experts * stride,
        slab,
        False,
    )
    base = pool.address(0, 0)
    assert base % 4096 == 0
    for layer in range(layers):
        for e in range(experts):
            assert pool.address(layer, e) == base + (layer * experts + e) * stride


def test_fill_and_view_roundtrip_every_entry():
    pool = ExpertPool(2, 4, 1040, pin=False)
    want = {}
    for layer in range(2):
        for e in range(4):
            gate_up = torch.randn(2, 64)  # (2*I, H) fp32 = 512 bytes
            down = torch.randn(132).to(torch.bfloat16)  # 264 bytes
            pool.fill(layer, e, gate_up)
            pool.fill(layer, e, down, offset=512)
            want[(layer, e)] = (gate_up, down)
    for (layer, e), (gate_up, down) in want.items():
        assert torch.equal(pool.view(layer, e, torch.float32, (2, 64)), gate_up)
        assert torch.equal(pool.view(layer, e, torch.bfloat16, (132,), offset=512), down)
        tail = pool.view(layer, e, torch.uint8, (1040 - 776,), offset=776)
        assert int(tail.sum()) == 0  # untouched bytes stay zero


def test_view_aliases_pool_memory_and_outlives_close():
    pool = ExpertPool(1, 2, 64, pin=False)
    v = pool.view(0, 1, torch.int32, (16,))
    v[:] = torch.arange(16, dtype=torch.int32)
    assert torch.equal(pool.view(0, 1, torch.int32, (4, 4)).reshape(-1), torch.arange(16, dtype=torch.int32))
    pool.fill(0, 1, np.full(4, 7, dtype=np.int32), offset=16)
    assert v[4:8].tolist() == [7, 7, 7, 7]
    pool.close()
    del pool
    assert v.tolist() == [0, 1, 2, 3, 7, 7, 7, 7, *range(8, 16)]  # the view keeps the memory alive


def test_fill_validates_source():
    pool = ExpertPool(1, 2, 64, pin=False)
    with pytest.raises(ValueError, match="contiguous"):
        pool.fill(0, 0, torch.zeros(4, 4)[:, 0])
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        pool.fill(0, 0, b"abc")
    with pytest.raises(ValueError, match="runs past the end"):
        pool.fill(0, 0, torch.zeros(17, dtype=torch.float32))
    with pytest.raises(ValueError, match="runs past the end"):
        pool.fill(0, 1, torch.zeros(8, dtype=torch.float32), offset=40)
    pool.fill(0, 1, torch.zeros(0))  # empty is fine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_layer_view_stacks_every_expert_without_copying(dtype):
    pool = ExpertPool(3, 5, 1008, pin=False)  # stride 1024: rows are not back to back
    g = torch.Generator().manual_seed(0)
    for layer in range(3):
        for e in range(5):
            pool.fill(layer, e, torch.randint(0, 256, (1008,), dtype=torch.uint8, generator=g))
    shape, offset = (7, 9), 16
    for layer in range(3):
        stacked = pool.layer_view(layer, dtype, shape, offset)
        assert stacked.shape == (5, *shape)
        for e in range(5):
            row = pool.view(layer, e, dtype, shape, offset)
            assert torch.equal(stacked[e].view(torch.uint8), row.view(torch.uint8)), (layer, e)
            assert stacked[e].data_ptr() == row.data_ptr()
    stacked.zero_()  # writes go to the pool itself
    assert pool.view(2, 4, dtype, shape, offset).view(torch.uint8).sum() == 0
    with pytest.raises(ValueError, match="layer=3 is out of range 0..2"):
        pool.layer_view(3, dtype, shape)
    with pytest.raises(ValueError, match="runs past the 1008-byte slab"):
        pool.layer_view(0, torch.float32, (253,))
    pool.close()
