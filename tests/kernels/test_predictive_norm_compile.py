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

pytestmark = pytest.mark.usefixtures("triton_compiled")

_TL_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _compile(plan, dtype: torch.dtype, arch: int):
    import triton
    from moert.kernels import _predictive_norm_kernel as kernel
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.predictive_norm_kernel
    assert not kernel.INTERPRET, "kernel module was imported under TRITON_INTERPRET=1"
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in plan.constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name == "logits_ptr" else f"*{_TL_DTYPES[dtype]}"
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            value = plan.scalars[name]
            signature[name] = "fp32" if isinstance(value, float) else "i32"
            if isinstance(value, int) and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, plan.constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=plan.options)


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


# (model, T, H, E x lookahead, norm kind, act, dtype): decode shapes of the three models at D=2048.
CASES = [
    ("deepseek-v2-lite", 1, 2048, 64, "rms", "silu", torch.bfloat16, 90),
    ("qwen3-30b-a3b lookahead 4", 64, 2048, 512, "rms", "gelu", torch.bfloat16, 90),
    ("phi-mini-moe", 8, 4096, 16, "layernorm", "gelu", torch.float16, 80),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_compiles_for_gpus_without_spills(case, monkeypatch):
    from moert.kernels import _predictive_norm_plan as pn

    _, T, H, EO, norm_kind, act, dtype, arch = case
    monkeypatch.setattr(pn, "_sm_count", lambda index: 132)
    plan = pn.plan_launch(
        pn.PredictiveNormConfig(), T, H, 2048, EO, 1e-6, dtype, torch.device("cuda", 0),
        norm_kind=norm_kind, act=act, has_norm_bias=norm_kind == "layernorm", has_b1=True, has_b2=True,
        interpret=False,
    )  # fmt: skip
    compiled = _compile(plan, dtype, arch)
    spilled = _spilled_bytes(compiled.asm["cubin"])
    assert spilled == 0, f"{case[0]}: {spilled} bytes of registers spilled with {plan}"
