"""Tiny random models of the supported architectures, shared by tests, the demo and benchmarks.

Every model is built from the real transformers config class with seeded random weights, so it runs
the real modeling code. Dims are multiples of 8 (transformers' grouped_mm on CPU wants 16-byte
strides). ``VARIANTS`` names each routing variant the tests must cover.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "VARIANTS",
    "tiny_config",
    "tiny_model",
    "save_tiny",
    "deepseek_v2_lite_config",
    "demo_config",
    "prompt_ids",
    "greedy",
    "agree_until_near_tie",
    "Reference",
    "single_thread",
    "random_predictor",
]

# name -> (model_type, config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "deepseek_v2-greedy": ("deepseek_v2", {"topk_method": "greedy"}),
    "deepseek_v2-group": (
        "deepseek_v2",
        {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5},
    ),
    "qwen3_moe-norm": ("qwen3_moe", {"norm_topk_prob": True}),
    "qwen3_moe-nonorm-sparse": (
        "qwen3_moe",
        {"norm_topk_prob": False, "mlp_only_layers": [0], "decoder_sparse_step": 1},
    ),
    "qwen3_moe-step2": ("qwen3_moe", {"norm_topk_prob": True, "decoder_sparse_step": 2}),
    "phimoe": ("phimoe", {}),
}


def tiny_config(model_type: str, **overrides: Any):
    """A tiny config of the real class for ``model_type``: 3 layers, 16 experts, vocab 160.

    Args:
        model_type: ``"deepseek_v2"``, ``"qwen3_moe"`` or ``"phimoe"``.
        **overrides: config fields to change.
    """
    common = dict(
        vocab_size=160,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    if model_type == "deepseek_v2":
        from transformers import DeepseekV2Config

        kw = dict(
            common,
            num_key_value_heads=4,
            intermediate_size=128,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=4,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_group=1,
            topk_group=1,
        )
        kw.update(overrides)
        return DeepseekV2Config(**kw)
    if model_type == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        kw = dict(
            common,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=16,
            num_experts_per_tok=4,
            head_dim=16,
            norm_topk_prob=True,
        )
        kw.update(overrides)
        return Qwen3MoeConfig(**kw)
    if model_type == "phimoe":
        from transformers import PhimoeConfig

        kw = dict(common, intermediate_size=32, num_local_experts=16, num_experts_per_tok=2)
        kw.update(overrides)
        return PhimoeConfig(**kw)
    from moert.models import adapter_class

    adapter_class(model_type)  # raises listing the supported types
    raise ValueError(f"no tiny config for model_type {model_type!r}")


def tiny_model(model_type_or_config: Any, *, seed: int = 0, dtype: Any = None, **overrides: Any) -> nn.Module:
    """A seeded random ``*ForCausalLM`` in eval mode (its own config object).

    Args:
        model_type_or_config: a model_type (built with ``tiny_config``) or a config instance (copied).
        seed: torch seed for the weights.
        dtype: torch dtype of the weights (default fp32).
        **overrides: config fields, when a model_type is given.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(model_type_or_config, str):
        config = tiny_config(model_type_or_config, **overrides)
    else:
        config = copy.deepcopy(model_type_or_config)
    gen = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(gen)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save_tiny(model: nn.Module, path: str | Path) -> Path:
    """``save_pretrained`` into ``path`` (safetensors); returns the path."""
    path = Path(path)
    model.save_pretrained(path)
    return path


def prompt_ids(batch: int = 1, length: int = 6, *, vocab: int = 160, seed: int = 1):
    """(batch, length) int64 prompt ids drawn with their own generator (ids >= 2: no bos/pad)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=g)


def deepseek_v2_lite_config(**overrides: Any):
    """DeepSeek-V2-Lite's real dimensions (from its config.json), as a ``DeepseekV2Config``."""
    from transformers import DeepseekV2Config

    kw: dict[str, Any] = dict(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        first_k_dense_replace=1,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_group=1,
        topk_group=1,
        topk_method="greedy",
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=100000,
        eos_token_id=100001,
    )
    kw.update(overrides)
    return DeepseekV2Config(**kw)


def demo_config(**overrides: Any):
    """DeepSeek-V2-Lite's shape scaled down for the demo: 64 experts, top-6, 1 dense + 7 MoE layers,
    shared experts, hidden 256 (real: 2048), expert intermediate 176 (real: 1408), vocab 1024."""
    kw: dict[str, Any] = dict(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=1368,
        moe_intermediate_size=176,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=512,
        initializer_range=0.05,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    kw.update(overrides)
    return deepseek_v2_lite_config(**kw)


def agree_until_near_tie(
    want_seq: Any, want_logits: Any, seq: Any, logits: Any, *, rel_tol: float = 2e-2
) -> list[int]:
    """Compares a run with a reference run whose numerics differ by rounding (bf16: the unpatched
    model's grouped GEMM with a bf16 combine vs moert's per-expert GEMMs with an fp32 sum), step by
    step while both runs still share a prefix.

    With ``tol = rel_tol * max|want_logits|``, at every step whose prefix is shared the logits must
    agree within ``tol``; the step's token must agree too unless the reference's top-2 margin is
    below ``2 * tol`` (a near tie, which rounding may flip), where the comparison of that row ends:
    after a flipped token the two runs continue from different prefixes.

    Args:
        want_seq, seq: (B, P+N) int64 sequences of the reference and the run (P prompt tokens).
        want_logits, logits: (N, B, V) logits of the N generated steps.
        rel_tol: tolerance relative to the reference's largest logit.

    Returns:
        Per row, the number of steps compared (N when no near tie came first).

    Raises:
        AssertionError: naming the row, the step and the error or the tokens.
    """
    ref, got = want_logits.float(), logits.float()
    n, batch, _ = ref.shape
    prompt_len = want_seq.shape[1] - n
    tol = rel_tol * ref.abs().max().item()
    top2 = ref.topk(2, dim=-1).values  # [N, B, 2]
    margin = top2[..., 0] - top2[..., 1]  # [N, B]
    compared = []
    for b in range(batch):
        steps = n
        for t in range(n):
            err = (got[t, b] - ref[t, b]).abs().max().item()
            assert err <= tol, f"row {b} step {t}: logits differ by {err:.3e} > tol {tol:.3e} (shared prefix)"
            if margin[t, b].item() < 2 * tol:
                steps = t + 1  # a near tie: the token may flip, and the prefixes part here
                break
            a, w = int(seq[b, prompt_len + t]), int(want_seq[b, prompt_len + t])
            assert a == w, f"row {b} step {t}: token {a} != reference {w} with margin {margin[t, b]:.3e}"
        compared.append(steps)
    return compared


def greedy(model: nn.Module, prompt: Any, new_tokens: int = 32, **generate: Any) -> tuple[Any, Any]:
    """Greedy generation of exactly ``new_tokens`` tokens.

    Args:
        model: a causal LM.
        prompt: (B, L) int64 ids.
        new_tokens: N.
        **generate: more ``generate`` arguments, e.g. ``assistant_model=draft`` (assisted decoding).

    Returns:
        ``(sequences (B, L+N) int64, logits (N, B, V) fp32)``.
    """
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=model.config.pad_token_id,
            **generate,
        )
    return out.sequences, torch.stack(out.logits)


class Reference:
    """An unpatched tiny model of a routing variant, saved with ``save_pretrained``, and its greedy output.

    Args:
        name: a key of ``VARIANTS``.
        root: directory to save into (``root / name``).
        batch, length: prompt shape.
        new_tokens: tokens to generate.
    """

    def __init__(
        self, name: str, root: str | Path, batch: int = 2, length: int = 6, new_tokens: int = 32
    ) -> None:
        model_type, overrides = VARIANTS[name]
        self.name = name
        self.model = tiny_model(model_type, **overrides)
        self.path = save_tiny(self.model, Path(root) / name)
        self.prompt = prompt_ids(batch=batch, length=length, vocab=self.model.config.vocab_size)
        self.new_tokens = new_tokens
        self.out = greedy(self.model, self.prompt, new_tokens)

    def copy(self) -> nn.Module:
        """A deep copy of the unpatched model (its own config object)."""
        return copy.deepcopy(self.model)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One torch intra-op thread inside the block: tiny models gain nothing from more, and on a
    loaded 2-core CI box spinning OpenMP workers slow them down by an order of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def random_predictor(
    model: nn.Module, *, lookahead: int = 0, dim: int = 24, seed: int = 0, **meta_overrides: Any
) -> Any:
    """An untrained preattn predictor shaped for ``model`` (random, so it prefetches wrong experts too)."""
    from moert.models import get_adapter
    from moert.predict.base import PredictorMeta
    from moert.predict.preattn import PreattnPredictor

    adapter = get_adapter(model)
    refs = adapter.moe_layers()
    L, E, H = len(refs), adapter.num_experts, adapter.hidden_size
    fields = dict(
        kind="preattn",
        model_type=adapter.model_type,
        layers=tuple(r.index for r in refs),
        num_experts=E,
        top_k=adapter.top_k,
        hidden_size=H,
        arch="linear2",
        dims={"hidden": dim, "act": "silu"},
        lookahead=lookahead,
        loss="wbce",
    )
    fields.update(meta_overrides)
    meta = PredictorMeta(**fields)
    g = torch.Generator().manual_seed(seed)
    E2 = (1 + lookahead) * meta.num_experts
    tensors = {
        "w1": torch.randn(L, dim, meta.hidden_size, generator=g) / meta.hidden_size**0.5,
        "b1": torch.randn(L, dim, generator=g) * 0.1,
        "w2": torch.randn(L, E2, dim, generator=g),
        "b2": torch.randn(L, E2, generator=g) * 0.1,
    }
    return PreattnPredictor(meta, tensors, "silu")
