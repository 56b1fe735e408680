"""How many Triton kernel variants the GPU tests (``pytest -m gpu``) compile, counted on the CPU.

Triton compiles one binary per specialisation: the constexpr values, the compile options, and per
runtime argument its type and specialisation (a tensor's dtype and 16-byte alignment, an int equal
to 1 or divisible by 16). This script makes every launch the GPU tests make, with CPU tensors of the
same shapes, dtypes and allocations, through the real launchers (``kernels/predictive_norm.py``,
``kernels/prefetch_plan.py``) with the launch plan computed for an H200 (132 SMs, compiled, not
interpreted); the kernel itself is not run, its key is taken with Triton's own specialiser
(``triton.runtime.jit.native_specialize_impl``). The launches:

- ``tests/kernels/test_predictive_norm_gpu.py``: its three tests, from their own parameter lists;
- ``tests/engine/test_prefetch.py::test_cuda_pipeline_is_exact_and_asynchronous``: the patched tiny
  models decode on the CPU twin (fp32 as on CUDA) and each ``PrefetchNorm`` call is keyed as the
  CUDA path would launch it.

No other GPU test launches a Triton kernel (the others run the cache, the copy engine and patched
models without a predictor).

    python bench/gpu_compile_count.py     # writes bench/results/gpu_compile_count.{json,md}
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

os.environ["TRITON_INTERPRET"] = (
    "1"  # the kernel modules load on the CPU (nothing is interpreted: no launch runs)
)
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
H200_SMS = 132


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the key."""

    def __init__(self, name: str, kernel: Any, keys: collections.Counter, origin: list[str]) -> None:
        import inspect

        self.name, self.keys, self.origin = name, keys, origin
        params = inspect.signature(kernel.fn).parameters
        self.names = list(params)
        self.constexprs = {n for n, prm in params.items() if "constexpr" in str(prm.annotation)}

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            from triton.backends.compiler import BaseBackend
            from triton.runtime.jit import native_specialize_impl

            names = self.names
            bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
            options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))
            spec = []
            for name in names:
                value = bound[name]
                if name in self.constexprs:
                    spec.append((name, value))
                else:
                    spec.append((name, native_specialize_impl(BaseBackend, value, False, True, True)))
            self.keys[(self.name, tuple(spec), options)] += 1
            self.origin.append(self.name)

        return launch


def install(keys: collections.Counter, origin: list[str]) -> None:
    """Launch plans for an H200, compiled; recorders in place of both kernels."""
    from moert.kernels import _predictive_norm_plan as plan_mod
    from moert.kernels import predictive_norm as pn

    real_plan = plan_mod.plan_launch

    def cuda_plan(*args: Any, **kwargs: Any) -> Any:
        args = list(args)
        args[7] = torch.device("cuda", 0)  # (config, T, H, D, EO, eps, dtype, device)
        return real_plan(*args, **{**kwargs, "interpret": False})

    plan_mod._sm_count = lambda index: H200_SMS
    pn.plan_launch = cuda_plan
    for module, attr in (
        ("moert.kernels._predictive_norm_kernel", "predictive_norm_kernel"),
        ("moert.kernels._prefetch_plan_kernel", "prefetch_plan_kernel"),
    ):
        mod = importlib.import_module(module)
        setattr(mod, attr, Recorder(attr, getattr(mod, attr), keys, origin))


def kernel_tests() -> int:
    """The launches of tests/kernels/test_predictive_norm_gpu.py; returns how many tests."""
    sys.path.insert(0, str(REPO / "tests" / "kernels"))
    t = importlib.import_module("test_predictive_norm_gpu")
    from moert.kernels.predictive_norm import PredictiveNorm, predictive_norm_forward
    from moert.kernels.prefetch_plan import PlanSpec, prefetch_plan

    D = 2048
    for T, H, E, norm_kind, dtype, act, lookahead in t.KERNEL_CASES:
        d = max(lookahead, 1)
        z = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt)  # noqa: E731
        nb = z(H) if norm_kind == "layernorm" else None
        for _ in range(2):  # the test launches twice
            predictive_norm_forward(
                z(T, H), z(H), nb, 1e-6, norm_kind, z(D, H), z(D), z(d * E, D), z(d * E), act, lookahead
            )
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm

    norm = DeepseekV2RMSNorm(2048).to(torch.bfloat16)
    pn = PredictiveNorm(
        norm, torch.zeros(D, 2048), torch.zeros(D), torch.zeros(64, D), None, backend="triton"
    )
    pn(torch.zeros(1, 7, 2048, dtype=torch.bfloat16))
    n = len(t.KERNEL_CASES) + 1
    for T in (1, 300):
        for H, E, norm_kind in t.REAL:
            for lookahead, adaptive in ((0, False), (3, True)):
                d, dtype, k = max(lookahead, 1), torch.bfloat16, 2 if E == 16 else 6
                z = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt)  # noqa: E731
                nb = z(H) if norm_kind == "layernorm" else None
                spec = PlanSpec(min(E, k + 4), k, adaptive=adaptive, threshold=0.7, score_decay=0.5)
                for _ in range(5):
                    predictive_norm_forward(
                        z(T, H),
                        z(H),
                        nb,
                        1e-6,
                        norm_kind,
                        z(D, H),
                        None,
                        z(d * E, D),
                        None,
                        "silu",
                        lookahead,
                        prefetch=spec,
                    )
                prefetch_plan(torch.zeros(T, d, E), spec)
                n += 1
    return n


def pipeline_test() -> int:
    """The launches of test_cuda_pipeline_is_exact_and_asynchronous, keyed from the CPU twin."""
    import tempfile

    from moert.kernels.predictive_norm import PredictiveNorm, predictive_norm_forward

    import moert
    from moert.models.tiny import Reference, greedy, random_predictor, single_thread

    real_forward = PredictiveNorm.forward

    def keyed(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
        rows = hidden_states.reshape(-1, hidden_states.shape[-1]).contiguous()
        predictive_norm_forward(
            rows, self.weight, self.bias, self.eps, self.norm_kind, self.w1, self.b1, self.w2, self.b2,
            self.act, self.lookahead, config=self.config, prefetch=self.prefetch,
        )  # fmt: skip
        return real_forward(self, hidden_states)

    PredictiveNorm.forward = keyed
    names = ("deepseek_v2-greedy", "qwen3_moe-nonorm-sparse", "phimoe")  # test_prefetch.ARCH_VARIANTS
    try:
        with single_thread(), tempfile.TemporaryDirectory() as root:
            for name in names:
                ref = Reference(name, root, new_tokens=24)
                pred = random_predictor(ref.model, lookahead=1)
                for cache in (1.0, 0.25):
                    model = ref.copy()
                    handle = moert.patch(
                        model,
                        cache_experts=cache,
                        policy="score",
                        predictor=pred,
                        overprovision="adaptive",
                        device="cpu",
                    )
                    greedy(model, ref.prompt, ref.new_tokens)
                    handle.undo()
    finally:
        PredictiveNorm.forward = real_forward
    return len(names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS / "gpu_compile_count")
    args = p.parse_args()
    from moert.provenance import git_commit, utc_now, versions

    keys: collections.Counter = collections.Counter()
    origin: list[str] = []
    install(keys, origin)
    with torch.no_grad():
        n_kernel_tests = kernel_tests()
        before = set(keys)
        n_pipeline = pipeline_test()
    per_kernel = collections.Counter(k[0] for k in keys)
    rec = {
        "bench": "gpu_compile_count",
        "variants": len(keys),
        "per_kernel": dict(per_kernel),
        "launches": len(origin),
        "from_kernel_tests": len(before),
        "added_by_pipeline_test": len(set(keys) - before),
        "tests": {
            "tests/kernels/test_predictive_norm_gpu.py": n_kernel_tests,
            "test_cuda_pipeline (archs)": n_pipeline,
        },
        "assumed_sms": H200_SMS,
        "versions": {**versions("torch", "triton"), "commit": git_commit(), "date": utc_now()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rec, indent=2) + "\n")
    v = rec["versions"]
    md = (
        "# Triton kernel variants the GPU tests compile\n\n"
        f"Counted on the CPU by `bench/gpu_compile_count.py` (launch plans for an H200, {H200_SMS} SMs; keys from "
        f"Triton's own specialiser): **{rec['variants']} distinct variants** over {rec['launches']} launches "
        f"({', '.join(f'{k}: {n}' for k, n in per_kernel.items())}); {rec['from_kernel_tests']} from "
        f"tests/kernels/test_predictive_norm_gpu.py ({n_kernel_tests} tests), {rec['added_by_pipeline_test']} more "
        f"from the CUDA prediction pipeline test ({n_pipeline} tiny models). torch {v['torch']}, triton {v['triton']}, "
        f"commit {v['commit']}, {v['date']}.\n"
    )
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
