"""Phi-mini-MoE / Phi-3.5-MoE (``model_type="phimoe"``), with transformers' native classes.

Every decoder layer is sparse; the router sits at ``mlp.router`` and selects top-2 with
sparsemixer; norms are LayerNorm with bias. Checkpoints in the original layout name the block
``block_sparse_moe`` with experts ``w1``/``w3``/``w2`` and the router ``gate``.
"""

from __future__ import annotations

from moert.models.base import ModelAdapter

__all__ = ["PhimoeAdapter"]


class PhimoeAdapter(ModelAdapter):
    model_type = "phimoe"
    router_attr = "router"
    key_renames = (
        (r"\.block_sparse_moe\.gate\.weight$", ".mlp.router.weight"),
        (r"\.block_sparse_moe\.", ".mlp."),
    )

    @property
    def num_experts(self) -> int:
        return int(self.config.num_local_experts)

    def is_moe_layer(self, index: int) -> bool:
        return True
