"""DeepSeek-V2 / DeepSeek-V2-Lite (``model_type="deepseek_v2"``).

Dense MLPs in the first ``first_k_dense_replace`` layers, routed experts plus resident
``shared_experts`` after that. Routing (``DeepseekV2TopkRouter``): softmax in fp32, then ``greedy``
top-k or ``group_limited_greedy`` (top ``topk_group`` of ``n_group`` groups first), weights scaled
by ``routed_scaling_factor``.
"""

from __future__ import annotations

from moert.models.base import ModelAdapter

__all__ = ["DeepseekV2Adapter"]


class DeepseekV2Adapter(ModelAdapter):
    model_type = "deepseek_v2"
    router_attr = "gate"
    shared_attr = "shared_experts"

    @property
    def num_experts(self) -> int:
        return int(self.config.n_routed_experts)

    def is_moe_layer(self, index: int) -> bool:
        return index >= int(self.config.first_k_dense_replace or 0)
