"""The kernel compiles for real GPUs (sm_90, sm_80) at the launcher's picked launch parameters.

No device is needed: Triton lowers to PTX and its bundled ptxas assembles a cubin, which is where
GPU-only mistakes show (dot shapes, operand dtypes, constexpr branches) that the interpreter
lets through. The cubin's resource usage then shows whether the picked tiles spill registers.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from moert.kernels.prefetch_plan import PlanSpec, plan_constexprs, plan_scalars

pytestmark = pytest.mark.usefixtures("triton_compiled")

_TL_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# pointers whose element type is fixed; the others point at x's dtype
_FIXED_POINTERS = {"logits_ptr": "*fp32", "scores_ptr": "*fp32", "ids_ptr": "*i32", "counter_ptr": "*i32"}


def _compile(fn, scalars: dict, constexprs: dict, options: dict, dtype: torch.dtype, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = _FIXED_POINTERS.get(name, f"*{_TL_DTYPES[dtype]}")
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            value = scalars[name]
            signature[name] = "fp32" if isinstance(value, float) else "i32"
            if isinstance(value, int) and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _spilled_bytes(cubin: bytes) -> int:
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    assert cuobjdump.exists(), f"Triton's bundled cuobjdump is missing at {cuobjdump}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(cubin)
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    usage = next(line for line in out.stdout.splitlines() if "REG:" in line)
    return int(usage.split("STACK:")[1].split()[0])


# (model, T, H, E x lookahead, norm kind, act, dtype, arch, prefetch plan or None, depth):
# decode shapes of the three models at D=2048.
CASES = [
    ("deepseek-v2-lite", 1, 2048, 64, "rms", "silu", torch.bfloat16, 90, None, 1),
    ("deepseek-v2-lite + plan", 1, 2048, 64, "rms", "silu", torch.bfloat16, 90, PlanSpec(8, 6), 1),
    ("qwen3-30b-a3b lookahead 4", 64, 2048, 512, "rms", "gelu", torch.bfloat16, 90, None, 4),
    (
        "qwen3-30b-a3b lookahead 4 + adaptive plan",
        64, 2048, 512, "rms", "gelu", torch.bfloat16, 90,
        PlanSpec(12, 8, adaptive=True, threshold=0.3, score_decay=0.7), 4,
    ),
    ("phi-mini-moe", 8, 4096, 16, "layernorm", "gelu", torch.float16, 80, None, 1),
    ("phi-mini-moe + clamp plan", 8, 4096, 16, "layernorm", "gelu", torch.float16, 80, PlanSpec(4, 2, probabilities="clamp"), 1),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_compiles_for_gpus_without_spills(case, monkeypatch):
    from moert.kernels import _predictive_norm_kernel as kernel
    from moert.kernels import _predictive_norm_plan as pn

    assert not kernel.INTERPRET, "kernel module was imported under TRITON_INTERPRET=1"
    _, T, H, EO, norm_kind, act, dtype, arch, prefetch, depth = case
    monkeypatch.setattr(pn, "_sm_count", lambda index: 132)
    plan = pn.plan_launch(
        pn.PredictiveNormConfig(), T, H, 2048, EO, 1e-6, dtype, torch.device("cuda", 0),
        norm_kind=norm_kind, act=act, has_norm_bias=norm_kind == "layernorm", has_b1=True, has_b2=True,
        interpret=False, prefetch=prefetch, depth=depth,
    )  # fmt: skip
    compiled = _compile(
        kernel.predictive_norm_kernel, plan.scalars, plan.constexprs, plan.options, dtype, arch
    )
    spilled = _spilled_bytes(compiled.asm["cubin"])
    assert spilled == 0, f"{case[0]}: {spilled} bytes of registers spilled with {plan}"
    if prefetch is not None:
        # the plan epilogue really is in the binary: the atomic count of finished programs
        assert "atom.global" in compiled.asm["ptx"] or "red.global" in compiled.asm["ptx"]


@pytest.mark.parametrize("probabilities", ["sigmoid", "clamp"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_standalone_plan_kernel_compiles(probabilities, adaptive):
    from moert.kernels import _prefetch_plan_kernel as kernel

    spec = PlanSpec(10, 8, adaptive=adaptive, probabilities=probabilities)
    scalars = {"T": 64, "n": 2, "E": 128, **plan_scalars(spec)}
    constexprs = {**plan_constexprs(spec), "BLOCK_T": 64, "BLOCK_E": 128}
    compiled = _compile(
        kernel.prefetch_plan_kernel,
        scalars,
        constexprs,
        {"num_warps": 4, "enable_fp_fusion": True},
        torch.float32,
        90,
    )
    assert _spilled_bytes(compiled.asm["cubin"]) == 0
