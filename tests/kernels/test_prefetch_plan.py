"""The prefetch plan: PyTorch reference vs a brute-force loop, and both Triton versions (standalone
program, and the fused predictive-norm kernel's epilogue) vs the reference, in the interpreter."""

from __future__ import annotations

import math

import pytest
import torch
from moert.kernels.predictive_norm import PredictiveNormConfig, predictive_norm_forward
from moert.kernels.prefetch_plan import PlanSpec, prefetch_plan, prefetch_plan_reference

pytestmark = pytest.mark.usefixtures("triton_interpret")


def _brute_force(logits: torch.Tensor, spec: PlanSpec) -> tuple[list[list[int]], list[list[float]]]:
    """The plan written as loops over Python lists (the definition in the module docstring)."""
    T, n, E = logits.shape
    rows = logits.tolist()
    ids_out, scores_out = [], []
    for j in range(n):
        best = [max(rows[t][j][e] for t in range(T)) for e in range(E)]
        order = sorted(range(E), key=lambda e: (-best[e], e))[: spec.width]
        ids, scores = [], [0.0] * E
        for rank, e in enumerate(order):
            v = best[e]
            p = 1.0 / (1.0 + math.exp(-v)) if spec.probabilities == "sigmoid" else min(max(v, 0.0), 1.0)
            if spec.adaptive and rank >= spec.top_k and not p > spec.threshold:
                ids.append(-1)
                continue
            ids.append(e)
            scores[e] = p * spec.score_decay**j
        ids_out.append(ids)
        scores_out.append(scores)
    return ids_out, scores_out


SPECS = [
    PlanSpec(8, 6),
    PlanSpec(5, 2, adaptive=True, threshold=0.6, score_decay=0.5),
    PlanSpec(4, 2, probabilities="clamp"),
    PlanSpec(6, 2, adaptive=True, threshold=0.3, probabilities="clamp", score_decay=0.8),
]


def _logits(T: int, n: int, E: int, seed: int, probabilities: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = 1.0 if probabilities == "clamp" else 2.0
    x = torch.randn(T, n, E, generator=g) * scale
    return x.contiguous()


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("T,n,E", [(1, 1, 8), (3, 2, 20), (17, 3, 64), (70, 1, 12)])
def test_reference_is_the_definition(spec, T, n, E):
    logits = _logits(T, n, E, seed=T * 7 + E, probabilities=spec.probabilities)
    ids, scores = prefetch_plan_reference(logits, spec)
    want_ids, want_scores = _brute_force(logits, spec)
    assert ids.dtype == torch.int32 and scores.dtype == torch.float32
    assert ids.tolist() == want_ids
    torch.testing.assert_close(scores, torch.tensor(want_scores), atol=1e-6, rtol=1e-6)
    if spec.adaptive:
        assert (ids[:, : spec.top_k] >= 0).all(), "the adaptive mode must keep the first k"


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("T,n,E", [(1, 1, 8), (3, 2, 20), (17, 3, 64), (70, 1, 12), (5, 1, 128)])
def test_standalone_kernel_matches_reference(spec, T, n, E):
    logits = _logits(T, n, E, seed=T + E, probabilities=spec.probabilities)
    ids, scores = prefetch_plan(logits, spec)
    want_ids, want_scores = prefetch_plan_reference(logits, spec)
    assert torch.equal(ids, want_ids), f"ids {ids.tolist()} != {want_ids.tolist()}"
    torch.testing.assert_close(scores, want_scores, atol=1e-6, rtol=1e-6)


def test_ties_go_to_the_lower_expert():
    logits = torch.zeros(2, 1, 10)
    logits[1, 0, 7] = 1.0
    ids, _ = prefetch_plan(logits, PlanSpec(4, 2))
    assert ids.tolist() == [[7, 0, 1, 2]]


# (T, H, D, E, lookahead, config): one program; D split over programs (atomics); several row blocks.
FUSED = [
    (1, 48, 40, 20, 0, None),
    (17, 48, 40, 12, 3, PredictiveNormConfig(d_splits=3)),
    (70, 32, 48, 8, 0, PredictiveNormConfig(block_t=16, d_splits=2)),
]


@pytest.mark.parametrize("spec", SPECS[:3], ids=str)
@pytest.mark.parametrize("case", FUSED, ids=lambda c: f"T{c[0]}-d{c[4]}-{c[5]}")
def test_fused_epilogue_matches_reference_on_its_logits(spec, case):
    T, H, D, E, lookahead, config = case
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g)
    nw = 1.0 + 0.1 * torch.randn(H, generator=g)
    w1 = torch.randn(D, H, generator=g) / H**0.5
    w2 = 3.0 * torch.randn(max(lookahead, 1) * E, D, generator=g) / D**0.5
    normed, logits, ids, scores = predictive_norm_forward(
        x, nw, None, 1e-6, "rms", w1, None, w2, None, "silu", lookahead, config=config, prefetch=spec
    )
    plain_normed, plain_logits = predictive_norm_forward(
        x, nw, None, 1e-6, "rms", w1, None, w2, None, "silu", lookahead, config=config
    )
    assert torch.equal(normed, plain_normed), "the plan changed the normed rows"
    torch.testing.assert_close(logits, plain_logits, atol=1e-5, rtol=1e-5)
    n = max(lookahead, 1)
    want_ids, want_scores = prefetch_plan_reference(logits.reshape(T, n, E), spec)
    assert ids.shape == (n, spec.width) and scores.shape == (n, E)
    assert torch.equal(ids, want_ids), f"ids {ids.tolist()} != {want_ids.tolist()}"
    torch.testing.assert_close(scores, want_scores, atol=1e-6, rtol=1e-6)


def test_fused_plan_without_rows_predicts_nothing():
    x = torch.randn(0, 32)
    _, logits, ids, scores = predictive_norm_forward(
        x, torch.ones(32), None, 1e-6, "rms", torch.randn(16, 32), None, torch.randn(8, 16), None,
        prefetch=PlanSpec(3, 2),
    )  # fmt: skip
    assert logits.shape == (0, 8)
    assert ids.tolist() == [[-1, -1, -1]] and scores.abs().sum() == 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(width=1, top_k=2), "width=1 must be an int >= top_k=2"),
        (dict(width=2, top_k=0), "top_k=0 must be an int >= 1"),
        (dict(width=4, top_k=2, threshold=1.0), "threshold=1.0 must be in"),
        (dict(width=4, top_k=2, probabilities="softmax"), "probabilities='softmax' is not one of"),
        (dict(width=4, top_k=2, score_decay=0.0), "score_decay=0.0 must be in"),
    ],
)
def test_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PlanSpec(**kwargs)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="width=9 exceeds the 8 experts"):
        prefetch_plan_reference(torch.randn(2, 1, 8), PlanSpec(9, 2))
    with pytest.raises(ValueError, match="width=9 exceeds the 8 experts"):
        predictive_norm_forward(
            torch.randn(2, 16), torch.ones(16), None, 1e-6, "rms", torch.randn(16, 16), None,
            torch.randn(8, 16), None, prefetch=PlanSpec(9, 2),
        )  # fmt: skip
    with pytest.raises(ValueError, match="logits must be a \\(T, n, E\\) tensor"):
        prefetch_plan(torch.randn(4, 8), PlanSpec(2, 2))
    with pytest.raises(ValueError, match="contiguous float32"):
        prefetch_plan(torch.randn(2, 1, 8, dtype=torch.float64), PlanSpec(2, 2))
    with pytest.raises(ValueError, match="prefetch must be a moert.kernels.prefetch_plan.PlanSpec"):
        predictive_norm_forward(
            torch.randn(2, 16), torch.ones(16), None, 1e-6, "rms", torch.randn(16, 16), None,
            torch.randn(8, 16), None, prefetch=(2, 2),
        )  # fmt: skip


@pytest.mark.parametrize("make", [prefetch_plan_reference, prefetch_plan], ids=["reference", "kernel"])
def test_adaptive_mode_drops_unlikely_experts(make):
    logits = torch.tensor([[[-1.0, 3.0, 0.1, 2.0, -2.0, -3.0]]])  # sigmoid: .27 .95 .52 .88 .12 .05
    ids, scores = make(logits, PlanSpec(5, 2, adaptive=True, threshold=0.5, score_decay=0.5))
    assert ids.tolist() == [[1, 3, 2, -1, -1]]
    want = torch.zeros(1, 6)
    want[0, [1, 3, 2]] = torch.sigmoid(torch.tensor([3.0, 2.0, 0.1]))
    torch.testing.assert_close(scores, want)


def test_reference_without_rows_predicts_nothing():
    ids, scores = prefetch_plan_reference(torch.randn(0, 2, 8), PlanSpec(3, 2))
    assert ids.tolist() == [[-1, -1, -1]] * 2 and scores.shape == (2, 8) and scores.abs().sum() == 0


def test_patched_model_on_the_kernel_path_prefetches_as_on_the_torch_path(tmp_path):
    """The CUDA code path of the pipeline (fused kernel + plan epilogue, interpreted) inside a patched
    tiny model on the CPU twin: the same prefetches, hits and tokens as the PyTorch path; and with
    every CUDA default at once (kernel plan, asynchronous submission through the pinned ring and the
    engine's prediction thread, deferred waits, overlapped waves) the tokens stay identical."""
    import moert
    from moert.engine.prefetch import PrefetchNorm
    from moert.models.tiny import Reference, greedy, random_predictor, single_thread

    with single_thread():
        ref = Reference("deepseek_v2-greedy", tmp_path, batch=1, new_tokens=6)
        runs = {}
        for backend, asynchronous in (("torch", False), ("triton", False), ("triton", True)):
            model = ref.copy()
            handle = moert.patch(
                model,
                cache_experts=0.25,
                policy="score",
                predictor=random_predictor(model, lookahead=1),
                overprovision=2,
                device="cpu",
                deferred_waits=asynchronous,  # the CUDA default with the CUDA-like submission
            )
            norms = [m for m in model.modules() if isinstance(m, PrefetchNorm)]
            assert norms and all(n.prefetch is handle.prefetcher.spec for n in norms)
            for norm in norms:
                norm.backend = backend
            handle.prefetcher.asynchronous = asynchronous
            out = greedy(model, ref.prompt, ref.new_tokens)
            handle.prefetcher.close()
            applied = handle.offloader.engine.predictions_done() if asynchronous else None
            st = handle.stats()
            handle.undo()
            runs[(backend, asynchronous)] = (
                out[0],
                st.hits,
                st.misses,
                st.prefetches,
                st.prefetch_hits,
                applied,
            )
    for key, run in runs.items():
        assert torch.equal(run[0], ref.out[0]), f"tokens changed on {key}"
    kernel, torch_path, cuda_like = runs[("triton", False)], runs[("torch", False)], runs[("triton", True)]
    assert kernel[1:5] == torch_path[1:5], f"kernel path {kernel[1:5]} != torch {torch_path[1:5]}"
    assert kernel[2] > 0 and kernel[3] > 0, kernel
    calls = ref.new_tokens * len(norms)  # one prediction per MoE layer and forward (prefill included)
    assert cuda_like[5] == calls and cuda_like[2] > 0 and cuda_like[3] > 0, (cuda_like, calls)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_reference_plans_leading_batches_independently(spec):
    logits = _logits(5 * 3, 2, 20, seed=9, probabilities=spec.probabilities).view(5, 3, 2, 20)
    ids, scores = prefetch_plan_reference(logits, spec)
    assert ids.shape == (5, 2, spec.width) and scores.shape == (5, 2, 20)
    for b in range(5):
        want_ids, want_scores = prefetch_plan_reference(logits[b], spec)
        assert torch.equal(ids[b], want_ids), b
        torch.testing.assert_close(scores[b], want_scores, atol=0, rtol=0)
