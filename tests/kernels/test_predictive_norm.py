"""The fused norm + predictor Triton kernel (Triton interpreter on CPU) against its PyTorch reference.

Three checks per case: the kernel against ``predictive_norm_reference`` at the same dtype with a
per-dtype (atol, rtol) table; the flash-attention rule against an fp64 chain written out here
(error(kernel) <= 2 x error(PyTorch at the same dtype) + floor); and the normed rows against the
models' own norm modules.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from moert.kernels.predictive_norm import (
    PredictiveNorm,
    PredictiveNormConfig,
    predictive_norm_forward,
    predictive_norm_topk,
)
from moert.kernels.predictive_norm_reference import (
    fold_batchnorm,
    predictive_norm_reference,
    predictor_reference,
)
from torch import nn
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

pytestmark = pytest.mark.usefixtures("triton_interpret")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (normed atol, rtol), (logits atol, rtol) against the reference at the same dtype. The kernel
# keeps the hidden layer's accumulation in fp32 where the eager predictor rounds it, so logits
# differ by a few roundings of the dtype.
TOLERANCES = {
    torch.float32: ((1e-6, 1e-5), (1e-5, 1e-5)),
    torch.float16: ((1e-3, 1e-3), (5e-3, 5e-3)),
    torch.bfloat16: ((1e-2, 1.6e-2), (5e-2, 3e-2)),
}
# Absolute floor of the flash-attention rule (errors of fp32 PyTorch can be ~0).
RULE_FLOOR = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got.double() - want.double()).abs()
    excess = diff - (atol + rtol * want.double().abs())
    worst = int(excess.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
    assert excess.max() <= 0, (
        f"{name}: worst mismatch at {idx}: got {got[idx].item():.8g}, want {want[idx].item():.8g}, "
        f"|diff| {diff[idx].item():.3g} > atol {atol} + rtol {rtol} * |want|; "
        f"{int((excess > 0).sum())} of {diff.numel()} elements out of tolerance"
    )


def _make(T, H, D, E, lookahead, dtype, norm_kind, *, b1=True, b2=True, seed=0):
    """Inputs in fp32 rounded to ``dtype``: x (T, H), norm weight/bias, predictor weights."""
    g = torch.Generator().manual_seed(seed)
    outputs = max(lookahead, 1) * E
    t = {
        "x": 2.0 * torch.randn(T, H, generator=g) + 0.3,
        "norm_weight": 1.0 + 0.2 * torch.randn(H, generator=g),
        "norm_bias": 0.2 * torch.randn(H, generator=g) if norm_kind == "layernorm" else None,
        "w1": torch.randn(D, H, generator=g) / H**0.5,
        "b1": 0.1 * torch.randn(D, generator=g) if b1 else None,
        "w2": torch.randn(outputs, D, generator=g) / D**0.5,
        "b2": 0.1 * torch.randn(outputs, generator=g) if b2 else None,
    }
    return {k: None if v is None else v.to(dtype) for k, v in t.items()}


def _call(fn, t, eps, norm_kind, act, lookahead, **kw):
    return fn(
        t["x"], t["norm_weight"], t["norm_bias"], eps, norm_kind,
        t["w1"], t["b1"], t["w2"], t["b2"], act, lookahead, **kw,
    )  # fmt: skip


def _gold(t, eps, norm_kind, act, lookahead):
    """The whole chain in fp64 from the (rounded) inputs: no intermediate rounding at all."""
    d = {k: None if v is None else v.double() for k, v in t.items()}
    x = d["x"]
    if norm_kind == "rms":
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * d["norm_weight"]
    else:
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        normed = (x - mean) / torch.sqrt(var + eps) * d["norm_weight"]
        if d["norm_bias"] is not None:
            normed = normed + d["norm_bias"]
    hidden = normed @ d["w1"].T + (d["b1"] if d["b1"] is not None else 0.0)
    hidden = F.silu(hidden) if act == "silu" else F.gelu(hidden)
    logits = hidden @ d["w2"].T + (d["b2"] if d["b2"] is not None else 0.0)
    return normed, logits if lookahead == 0 else logits.view(x.shape[0], lookahead, -1)


def _check_rule(name, kernel, torch_same_dtype, gold, floor):
    err_kernel = (kernel.double() - gold).abs().max().item()
    err_torch = (torch_same_dtype.double() - gold).abs().max().item()
    assert err_kernel <= 2 * err_torch + floor, (
        f"{name}: max error vs fp64 {err_kernel:.3g} > 2 x PyTorch-same-dtype error {err_torch:.3g} + {floor}"
    )


SHAPES = [(40, 48, 24), (72, 48, 60)]  # (H, D, E): none of H and E a power of two
HEADS = [("silu", 0), ("gelu", 2)]  # linear2 / mlp_bn (folded), plain and lookahead logits


@pytest.mark.parametrize("T", [1, 3, 17, 64])
@pytest.mark.parametrize("H, D, E", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_kind", ["rms", "layernorm"])
@pytest.mark.parametrize("act, lookahead", HEADS)
def test_matches_reference(T, H, D, E, dtype, norm_kind, act, lookahead):
    eps = 1e-6 if norm_kind == "rms" else 1e-5
    t = _make(T, H, D, E, lookahead, dtype, norm_kind, seed=T * 1000 + H)
    # Odd T also splits D over programs (atomic logits) with the smallest tiles.
    config = PredictiveNormConfig(block_d=16, block_k=16, d_splits=3) if T % 2 else None
    normed, logits = _call(predictive_norm_forward, t, eps, norm_kind, act, lookahead, config=config)
    ref_normed, ref_logits = _call(predictive_norm_reference, t, eps, norm_kind, act, lookahead)

    assert normed.dtype == dtype and logits.dtype == torch.float32
    expected = (T, E) if lookahead == 0 else (T, lookahead, E)
    assert tuple(logits.shape) == expected
    (n_atol, n_rtol), (l_atol, l_rtol) = TOLERANCES[dtype]
    _assert_close("normed", normed, ref_normed, n_atol, n_rtol)
    _assert_close("logits", logits, ref_logits, l_atol, l_rtol)

    gold_normed, gold_logits = _gold(t, eps, norm_kind, act, lookahead)
    _check_rule("normed", normed, ref_normed, gold_normed, RULE_FLOOR[dtype])
    _check_rule("logits", logits, ref_logits, gold_logits, RULE_FLOOR[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "make_norm",
    [
        pytest.param(lambda H: DeepseekV2RMSNorm(H, eps=1e-6), id="DeepseekV2RMSNorm"),
        pytest.param(lambda H: Qwen3MoeRMSNorm(H, eps=1e-6), id="Qwen3MoeRMSNorm"),
        pytest.param(lambda H: nn.LayerNorm(H, eps=1e-5), id="LayerNorm"),
    ],
)
def test_normed_equals_model_norm(dtype, make_norm):
    T, H, D, E = 64, 200, 32, 24
    norm = make_norm(H)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.3 * torch.randn(H))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(0.3 * torch.randn(H))
    norm = norm.to(dtype)
    pn = PredictiveNorm(norm, torch.randn(D, H) / H**0.5, None, torch.randn(E, D) / D**0.5, None)
    x = (3.0 * torch.randn(T, H) + 0.5).to(dtype)
    with torch.no_grad():
        want = norm(x)
        got, _ = predictive_norm_forward(
            x, pn.weight, pn.bias, pn.eps, pn.norm_kind, pn.w1, pn.b1, pn.w2, pn.b2, pn.act, pn.lookahead
        )
    assert got.dtype == want.dtype == dtype
    diff = (got.double() - want.double()).abs()
    ulp = torch.finfo(dtype).eps * want.double().abs().clamp_min(torch.finfo(dtype).tiny)
    worst = int(diff.argmax())
    detail = f"worst {got.flatten()[worst].item()!r} vs {want.flatten()[worst].item()!r}"
    if dtype == torch.float32:
        # The row statistics are reduced in another order (and torch's CPU rsqrt is not correctly
        # rounded), so fp32 is equal to a few ulps of the largest term, not bitwise.
        scale = want.double().abs().max() + (x.double().abs().max() * norm.weight.double().abs().max())
        assert diff.max() <= 8 * torch.finfo(dtype).eps * scale, detail
    else:
        # 16-bit rows equal the module's except where the fp32 statistics land on a rounding tie.
        mismatched = (got != want).double().mean().item()
        assert mismatched <= 1e-3, f"{mismatched:.2%} of normed elements differ; {detail}"
        assert (diff <= ulp).all(), f"a normed element differs by more than one ulp; {detail}"


def test_predictive_norm_module_cpu_path_is_the_model_norm():
    H, D, E, d = 40, 48, 24, 2
    norm = Qwen3MoeRMSNorm(H, eps=1e-6)
    w1, b1, w2, b2 = torch.randn(D, H), torch.randn(D), torch.randn(d * E, D), torch.randn(d * E)
    pn = PredictiveNorm(norm, w1, b1, w2, b2, act="gelu", lookahead=d)
    x = torch.randn(2, 5, H)  # [B, S, H]
    with torch.no_grad():
        out = pn(x)
    assert torch.equal(out, norm(x))
    assert pn.last_logits.shape == (2, 5, d, E)
    want = predictor_reference(norm(x).reshape(-1, H), w1, b1, w2, b2, "gelu", d).view(2, 5, d, E)
    assert torch.equal(pn.last_logits, want)
    # Drop-in: the same parameter objects under the same names, predictor weights not persisted.
    assert pn.norm is norm and pn.weight is norm.weight
    assert list(pn.state_dict()) == list(norm.state_dict()) == ["weight"]
    ln = nn.LayerNorm(H)
    assert list(PredictiveNorm(ln, w1, b1, w2, b2).state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("lookahead", [0, 2])
def test_predictive_norm_module_kernel_path(lookahead):
    """The path CUDA inputs take (forced here onto the interpreter): reshapes, dtypes, logits."""
    H, D, E = 72, 48, 60
    norm = nn.LayerNorm(H, eps=1e-5)
    nn.init.normal_(norm.weight, 1.0, 0.2)
    nn.init.normal_(norm.bias, 0.0, 0.2)
    norm = norm.to(torch.bfloat16)
    outputs = max(lookahead, 1) * E
    w1, b1, w2, b2 = torch.randn(D, H) / H**0.5, torch.randn(D), torch.randn(outputs, D) / D**0.5, None
    pn = PredictiveNorm(norm, w1, b1, w2, b2, act="gelu", lookahead=lookahead, backend="triton")
    x = torch.randn(2, 9, H).to(torch.bfloat16)  # [B, S, H]
    with torch.no_grad():
        out = pn(x)
        want = norm(x)
        want_logits = predictor_reference(want.reshape(-1, H), pn.w1, pn.b1, pn.w2, pn.b2, "gelu", lookahead)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert (out != want).double().mean() <= 1e-3
    lead = (2, 9) if lookahead == 0 else (2, 9, lookahead)
    assert pn.last_logits.shape == (*lead, E) and pn.last_logits.dtype == torch.float32
    _assert_close("module logits", pn.last_logits, want_logits.view(*lead, E), *TOLERANCES[torch.bfloat16][1])
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        PredictiveNorm(norm, w1, b1, w2, b2, backend="cuda")


def test_predictive_norm_rejects_unknown_norm():
    class Gemma(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))
            self.eps = 1e-6

    with pytest.raises(ValueError, match="unsupported norm module Gemma"):
        PredictiveNorm(Gemma(), torch.randn(16, 8), None, torch.randn(4, 16), None)
    with pytest.raises(ValueError, match="only a 1-D LayerNorm with a weight"):
        PredictiveNorm(
            nn.LayerNorm(8, elementwise_affine=False), torch.randn(16, 8), None, torch.randn(4, 16), None
        )


@pytest.mark.parametrize("lookahead", [0, 2])
def test_topk_after_kernel(lookahead):
    t = _make(17, 72, 48, 60, lookahead, torch.float32, "rms")
    normed, logits, ids = _call(predictive_norm_topk, t, 1e-6, "rms", "silu", lookahead, k=8)
    assert ids.shape == logits.shape[:-1] + (8,) and ids.dtype == torch.int64
    top = torch.gather(logits, -1, ids)
    assert (top[..., :-1] >= top[..., 1:]).all(), "ids not in descending logit order"
    assert (top[..., -1:] >= logits.masked_fill(F.one_hot(ids, 60).sum(-2).bool(), -1e30)).all()
    with pytest.raises(ValueError, match="k=61 must be in 1..60"):
        _call(predictive_norm_topk, t, 1e-6, "rms", "silu", lookahead, k=61)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fold_batchnorm_is_exact(dtype):
    H, D = 24, 40
    linear = nn.Linear(H, D).to(dtype)
    bn = nn.BatchNorm1d(D).to(dtype)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(D))
        bn.running_var.copy_(torch.rand(D) + 0.5)
        bn.weight.copy_(torch.randn(D))
        bn.bias.copy_(torch.randn(D))
    bn.eval()
    x = torch.randn(33, H, dtype=dtype)
    with torch.no_grad():
        want, got = bn(linear(x)), fold_batchnorm(linear, bn)(x)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    _assert_close("folded", got, want, tol, tol)


def test_mlp_bn_head_through_the_kernel():
    """Linear -> BatchNorm1d -> GELU -> Dropout -> Linear (eval) == the kernel on folded weights."""
    H, D, E = 72, 48, 60
    first, bn, second = nn.Linear(H, D), nn.BatchNorm1d(D), nn.Linear(D, E)
    with torch.no_grad():
        bn.running_mean.copy_(0.1 * torch.randn(D))
        bn.running_var.copy_(torch.rand(D) + 0.5)
    head = nn.Sequential(first, bn, nn.GELU(), nn.Dropout(0.1), second).eval()
    norm = DeepseekV2RMSNorm(H)
    x = torch.randn(17, H)
    folded = fold_batchnorm(first, bn)
    with torch.no_grad():
        want = head(norm(x))
        _, got = predictive_norm_forward(
            x, norm.weight, None, norm.variance_epsilon, "rms",
            folded.weight, folded.bias, second.weight, second.bias, "gelu", 0,
        )  # fmt: skip
    _assert_close("mlp_bn logits", got, want, 1e-5, 1e-5)


def test_without_biases_and_zero_rows():
    t = _make(3, 40, 48, 24, 0, torch.float32, "layernorm", b1=False, b2=False)
    t["norm_bias"] = None
    normed, logits = _call(predictive_norm_forward, t, 1e-5, "layernorm", "silu", 0)
    ref_normed, ref_logits = _call(predictive_norm_reference, t, 1e-5, "layernorm", "silu", 0)
    _assert_close("normed", normed, ref_normed, *TOLERANCES[torch.float32][0])
    _assert_close("logits", logits, ref_logits, *TOLERANCES[torch.float32][1])
    t["x"] = t["x"][:0]
    normed, logits = _call(predictive_norm_forward, t, 1e-5, "layernorm", "silu", 0)
    assert normed.shape == (0, 40) and logits.shape == (0, 24)


def _bad(**changes):
    t = _make(3, 40, 48, 24, 0, torch.float32, "rms")
    args = {"eps": 1e-6, "norm_kind": "rms", "act": "silu", "lookahead": 0, **t}
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"norm_kind": "batchnorm"}, "norm_kind='batchnorm' is not one of"),
        ({"act": "relu"}, "act='relu' is not one of"),
        ({"lookahead": -1}, "lookahead=-1 must be an int >= 0"),
        ({"x": torch.randn(3, 4, 40)}, "x must be a 2-D tensor"),
        ({"x": torch.randn(3, 40, dtype=torch.float64)}, "x has dtype torch.float64"),
        ({"x": torch.randn(40, 3).T}, "x .shape \\(3, 40\\). is not contiguous"),
        ({"eps": -1.0}, "eps=-1.0 must be a finite float >= 0"),
        ({"norm_weight": torch.randn(41)}, "norm_weight has shape \\(41,\\), expected \\(40,\\)"),
        (
            {"norm_weight": torch.randn(40).half()},
            "norm_weight has dtype torch.float16, expected torch.float32",
        ),
        ({"norm_bias": torch.randn(40)}, "norm_kind='rms' takes no bias"),
        ({"w1": torch.randn(48, 41)}, "w1 has shape \\(48, 41\\), expected \\(48, 40\\)"),
        ({"w1": torch.randn(40, 48).T}, "w1 .shape \\(48, 40\\). is not contiguous"),
        ({"b1": torch.randn(47)}, "b1 has shape \\(47,\\), expected \\(48,\\)"),
        ({"w2": torch.randn(24, 47)}, "w2 has shape \\(24, 47\\), expected \\(24, 48\\)"),
        (
            {"w2": torch.randn(25, 48), "lookahead": 2},
            "w2 has 25 outputs, not a positive multiple of lookahead",
        ),
        (
            {"w2": torch.randn(1024, 48), "b2": None},
            "w2 has 1024 outputs .d·E.; the kernel holds at most 512",
        ),
        ({"b2": torch.randn(24, dtype=torch.bfloat16)}, "b2 has dtype torch.bfloat16"),
        ({"w1": torch.randn(48, 40, device="meta")}, "w1 is on meta, expected cpu"),
        ({"w1": torch.randn(48, 40, requires_grad=True)}, "inference-only"),
    ],
)
def test_launcher_rejects_bad_arguments(changes, message):
    with pytest.raises(ValueError, match=message):
        predictive_norm_forward(**_bad(**changes))


def test_launcher_config_validation():
    with pytest.raises(ValueError, match="block_k=8 must be a power of two >= 16"):
        PredictiveNormConfig(block_k=8)
    with pytest.raises(ValueError, match="block_d=48 must be a power of two >= 16"):
        PredictiveNormConfig(block_d=48)
    with pytest.raises(ValueError, match="d_splits=0 must be >= 1"):
        PredictiveNormConfig(d_splits=0)


def test_cpu_without_interpreter_names_the_pytorch_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="Use predictive_norm_reference .* or set TRITON_INTERPRET=1"):
        predictive_norm_forward(**_bad())


def test_picked_launch_parameters_keep_dots_valid_on_gpus(monkeypatch):
    """Whatever the shapes, every tl.dot keeps M, N, K >= 16 and the grid covers T and D."""
    from moert.kernels import _predictive_norm_plan as pn

    monkeypatch.setattr(pn, "_sm_count", lambda index: 132)
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        for dtype in DTYPES:
            for T in (1, 8, 64, 300):
                for H, D, EO in [(40, 48, 60), (2048, 2048, 64), (4096, 2048, 16), (2048, 2048, 512)]:
                    plan = pn.plan_launch(
                        PredictiveNormConfig(), T, H, D, EO, 1e-6, dtype, device,
                        norm_kind="rms", act="silu", has_norm_bias=False, has_b1=True, has_b2=True,
                        interpret=False,
                    )  # fmt: skip
                    c = plan.constexprs
                    case = (device, dtype, T, H, D, EO, c)
                    for name in ("BLOCK_T", "BLOCK_K", "BLOCK_D", "BLOCK_E"):
                        assert c[name] >= 16 and c[name] & (c[name] - 1) == 0, case
                    assert c["BLOCK_E"] >= EO and plan.grid[0] * c["BLOCK_T"] >= T, case
                    assert plan.grid[1] * plan.scalars["d_per_split"] >= D, case
                    assert plan.scalars["d_per_split"] % c["BLOCK_D"] == 0, case
                    assert c["ATOMIC"] == (plan.grid[1] > 1) and plan.num_warps in (4, 8), case
