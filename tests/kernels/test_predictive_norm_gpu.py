"""The compiled kernel on a CUDA device, at the real models' dimensions (``make test-gpu``)."""

from __future__ import annotations

import pytest
import torch
from moert.kernels.predictive_norm import PredictiveNorm, predictive_norm_forward
from moert.kernels.predictive_norm_reference import predictive_norm_reference
from torch import nn
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm

pytestmark = pytest.mark.gpu

# (H, E) of DeepSeek-V2-Lite, Qwen3-30B-A3B and Phi-mini-MoE; D = 2048 as the predictors use.
REAL = [(2048, 64, "rms"), (2048, 128, "rms"), (4096, 16, "layernorm")]
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 4e-2)}


# A grid sized for a few-minute GPU session: each case may JIT-compile a new kernel variant (1-2 s on
# a fresh machine), so instead of the full product (72 cases) every model runs decode (T=1) and a
# multi-block prefill (T=300) in bf16, and the other dtypes, activations and lookahead run once each.
KERNEL_CASES = [
    *[(T, *shape, torch.bfloat16, "silu", 0) for shape in REAL for T in (1, 300)],
    (8, *REAL[0], torch.float16, "gelu", 3),
    (64, *REAL[0], torch.float32, "gelu", 3),
    (64, *REAL[1], torch.bfloat16, "gelu", 3),
    (8, *REAL[2], torch.float32, "silu", 0),
]


@pytest.mark.parametrize("T, H, E, norm_kind, dtype, act, lookahead", KERNEL_CASES)
@torch.no_grad()
def test_compiled_kernel_matches_reference(T, H, E, norm_kind, dtype, act, lookahead):
    D, d = 2048, max(lookahead, 1)
    g = torch.Generator(device="cuda").manual_seed(T + H + E)

    def rand(*shape, scale=1.0, shift=0.0):
        return (scale * torch.randn(*shape, generator=g, device="cuda") + shift).to(dtype)

    x = rand(T, H, scale=2.0, shift=0.3)
    nw, nb = rand(H, scale=0.2, shift=1.0), rand(H, scale=0.2) if norm_kind == "layernorm" else None
    w1, b1 = rand(D, H, scale=H**-0.5), rand(D, scale=0.1)
    w2, b2 = rand(d * E, D, scale=D**-0.5), rand(d * E, scale=0.1)
    eps = 1e-6
    normed, logits = predictive_norm_forward(x, nw, nb, eps, norm_kind, w1, b1, w2, b2, act, lookahead)
    ref_normed, ref_logits = predictive_norm_reference(
        x, nw, nb, eps, norm_kind, w1, b1, w2, b2, act, lookahead
    )
    atol, rtol = TOLERANCES[dtype]
    diff = (logits - ref_logits).abs()
    assert torch.allclose(logits, ref_logits, atol=atol, rtol=rtol), (
        f"logits: worst |diff| {diff.max().item():.3g}"
    )
    ndiff = (normed.float() - ref_normed.float()).abs()
    one_ulp = torch.finfo(dtype).eps * ref_normed.float().abs().clamp_min(1e-30)
    assert (ndiff <= 2 * one_ulp + 1e-6).all(), f"normed: worst |diff| {ndiff.max().item():.3g}"
    again, _ = predictive_norm_forward(x, nw, nb, eps, norm_kind, w1, b1, w2, b2, act, lookahead)
    assert torch.equal(normed, again), "normed rows are not deterministic"


@torch.no_grad()
def test_module_on_cuda_uses_the_kernel_and_matches_the_norm():
    H, D, E = 2048, 2048, 64
    norm = DeepseekV2RMSNorm(H).cuda().to(torch.bfloat16)
    nn.init.normal_(norm.weight, 1.0, 0.2)
    pn = PredictiveNorm(norm, torch.randn(D, H) / H**0.5, torch.zeros(D), torch.randn(E, D) / D**0.5, None)
    x = torch.randn(1, 7, H, device="cuda", dtype=torch.bfloat16)
    out = pn(x)
    want = norm(x)
    assert (out != want).float().mean().item() <= 1e-3
    assert pn.last_logits.shape == (1, 7, E) and pn.last_logits.is_cuda


@pytest.mark.parametrize("T", [1, 300])
@pytest.mark.parametrize("H, E, norm_kind", REAL)
@pytest.mark.parametrize("lookahead, adaptive", [(0, False), (3, True)])
@torch.no_grad()
def test_fused_plan_epilogue_on_the_gpu(T, H, E, norm_kind, lookahead, adaptive):
    """The last-program election and the plan on a real GPU (many programs, atomics, L2 reads):
    the plan equals the PyTorch reference applied to the launch's own logits, every time."""
    from moert.kernels.prefetch_plan import PlanSpec, prefetch_plan, prefetch_plan_reference

    D, d, dtype = 2048, max(lookahead, 1), torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(T + E)
    x = torch.randn(T, H, generator=g, device="cuda").to(dtype)
    nw = torch.ones(H, device="cuda", dtype=dtype)
    nb = torch.zeros(H, device="cuda", dtype=dtype) if norm_kind == "layernorm" else None
    w1 = (torch.randn(D, H, generator=g, device="cuda") * H**-0.5).to(dtype)
    w2 = (torch.randn(d * E, D, generator=g, device="cuda") * 3 * D**-0.5).to(dtype)
    k = 2 if E == 16 else 6
    spec = PlanSpec(min(E, k + 4), k, adaptive=adaptive, threshold=0.7, score_decay=0.5)
    for _ in range(5):  # the election must hold launch after launch
        _, logits, ids, scores = predictive_norm_forward(
            x, nw, nb, 1e-6, norm_kind, w1, None, w2, None, "silu", lookahead, prefetch=spec
        )
        want_ids, want_scores = prefetch_plan_reference(logits.reshape(T, d, E), spec)
        assert torch.equal(ids, want_ids), f"ids {ids.tolist()} != {want_ids.tolist()}"
        torch.testing.assert_close(scores, want_scores, atol=1e-6, rtol=1e-6)
    alone_ids, alone_scores = prefetch_plan(logits.reshape(T, d, E).contiguous(), spec)
    assert torch.equal(alone_ids, want_ids)
    torch.testing.assert_close(alone_scores, want_scores, atol=1e-6, rtol=1e-6)
