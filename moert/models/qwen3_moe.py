"""Qwen3-MoE, e.g. Qwen3-30B-A3B (``model_type="qwen3_moe"``).

A decoder layer is sparse unless listed in ``mlp_only_layers`` or skipped by
``decoder_sparse_step``; no shared experts. Routing (``Qwen3MoeTopKRouter``): softmax in fp32,
top-k, renormalised when ``norm_topk_prob``.
"""

from __future__ import annotations

from moert.models.base import ModelAdapter

__all__ = ["Qwen3MoeAdapter"]


class Qwen3MoeAdapter(ModelAdapter):
    model_type = "qwen3_moe"
    router_attr = "gate"

    @property
    def num_experts(self) -> int:
        return int(self.config.num_experts)

    def is_moe_layer(self, index: int) -> bool:
        cfg = self.config
        mlp_only = cfg.mlp_only_layers or []
        return index not in mlp_only and cfg.num_experts > 0 and (index + 1) % cfg.decoder_sparse_step == 0
