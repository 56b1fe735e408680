"""The model-adapter interface: what moert needs to know about one MoE architecture.

An adapter describes an HF transformers model instance without changing it: where the decoder
layers, their pre-attention norms, routers, fused experts modules and shared experts are, how the
router turns a hidden row into probabilities, and how the checkpoint names expert weights. Nothing
here imports transformers or touches CUDA; adapters read module attributes only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["MoELayerRef", "ModelAdapter", "ExpertKey"]


@dataclass(frozen=True)
class MoELayerRef:
    """One MoE decoder layer of a model.

    Attributes:
        index: decoder layer index (``model.model.layers[index]``).
        layer: the decoder layer module.
        norm: its pre-attention norm (``input_layernorm``).
        router: the gate module that computes routing.
        experts: the fused experts module, called by transformers as
            ``experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``.
        shared: the shared-experts module, or None.
    """

    index: int
    layer: nn.Module
    norm: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: nn.Module | None


@dataclass(frozen=True)
class ExpertKey:
    """What a checkpoint key holds when it is a routed-expert weight.

    Attributes:
        layer: decoder layer index.
        expert: expert id, or None for a fused ``[E, ...]`` tensor.
        part: ``"gate"``, ``"up"``, ``"down"`` (per-expert ``[I, H]`` / ``[H, I]``) or ``"gate_up"``
            (fused or per-expert ``[2I, H]``).
    """

    layer: int
    expert: int | None
    part: str


class ModelAdapter:
    """Describes one model instance of a supported architecture (subclass per ``model_type``).

    Args:
        model: an HF ``*ForCausalLM`` (or the bare ``*Model``) whose ``config.model_type`` matches.
    """

    model_type: ClassVar[str] = ""
    #: attribute of the decoder layer's MLP that holds the router
    router_attr: ClassVar[str] = "gate"
    #: attribute of the decoder layer's MLP that holds shared experts, or "" when there are none
    shared_attr: ClassVar[str] = ""
    #: (regex, replacement) applied to non-expert checkpoint keys to get the model's parameter names
    key_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: per-expert checkpoint weight names -> part
    expert_parts: ClassVar[dict[str, str]] = {
        "gate_proj": "gate",
        "up_proj": "up",
        "down_proj": "down",
        "w1": "gate",
        "w3": "up",
        "w2": "down",
    }

    _PER_EXPERT = re.compile(
        r"^(?:model\.)?layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$"
    )
    _FUSED = re.compile(
        r"^(?:model\.)?layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$"
    )

    def __init__(self, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        found = getattr(config, "model_type", None)
        if found != self.model_type:
            raise ValueError(
                f"{type(self).__name__} describes model_type {self.model_type!r}, got {found!r}; "
                "use moert.models.get_adapter(model) to pick the right adapter"
            )
        self.model = model
        self.config = config

    # -- sizes -------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer."""
        raise NotImplementedError

    @property
    def top_k(self) -> int:
        """Experts selected per token."""
        return int(self.config.num_experts_per_tok)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    # -- structure ---------------------------------------------------------------------------
    def decoder_layers(self) -> list[nn.Module]:
        """The decoder layers, in order."""
        base = getattr(self.model, "model", self.model)
        layers = getattr(base, "layers", None)
        if layers is None:
            raise ValueError(
                f"{type(self.model).__name__} has no `.model.layers` or `.layers`; expected an HF "
                f"{self.model_type} model (e.g. AutoModelForCausalLM)"
            )
        return list(layers)

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer ``index`` has routed experts, according to the config."""
        raise NotImplementedError

    def moe_layers(self) -> list[MoELayerRef]:
        """Every MoE decoder layer, checked: raises ValueError naming what was found if the
        module structure does not match the architecture."""
        refs = []
        for index, layer in enumerate(self.decoder_layers()):
            if not self.is_moe_layer(index):
                continue
            mlp = getattr(layer, "mlp", None)
            experts = getattr(mlp, "experts", None)
            router = getattr(mlp, self.router_attr, None)
            norm = getattr(layer, "input_layernorm", None)
            shared = getattr(mlp, self.shared_attr, None) if self.shared_attr else None
            missing = [
                name
                for name, obj in (
                    ("mlp.experts", experts),
                    (f"mlp.{self.router_attr}", router),
                    ("input_layernorm", norm),
                )
                if obj is None
            ]
            if self.shared_attr and shared is None:
                missing.append(f"mlp.{self.shared_attr}")
            if missing:
                raise ValueError(
                    f"{self.model_type} decoder layer {index} should be an MoE layer but lacks "
                    f"{', '.join(missing)} (its mlp is {type(mlp).__name__}); the module structure does not "
                    "match this transformers version's layout"
                )
            self._check_experts(index, experts)
            refs.append(MoELayerRef(index, layer, norm, router, experts, shared))
        if not refs:
            raise ValueError(f"{self.model_type} model has no MoE layers; nothing to offload")
        return refs

    def _check_experts(self, index: int, experts: nn.Module) -> None:
        gate_up = getattr(experts, "gate_up_proj", None)
        down = getattr(experts, "down_proj", None)
        problems = []
        if gate_up is None or down is None:
            problems.append("no fused gate_up_proj/down_proj parameters")
        else:
            e, two_i, h = tuple(gate_up.shape) if gate_up.dim() == 3 else (None, None, None)
            if e != self.num_experts or h != self.hidden_size or two_i is None or two_i % 2:
                problems.append(f"gate_up_proj has shape {tuple(gate_up.shape)}, expected [E, 2I, H]")
            elif tuple(down.shape) != (e, h, two_i // 2):
                problems.append(f"down_proj has shape {tuple(down.shape)}, expected {(e, h, two_i // 2)}")
        for flag, want in (("has_gate", True), ("has_bias", False), ("is_transposed", False)):
            if getattr(experts, flag, want) != want:
                problems.append(f"{flag}={getattr(experts, flag)} (moert supports {flag}={want})")
        if not hasattr(experts, "act_fn"):
            problems.append("no act_fn")
        if problems:
            raise ValueError(
                f"{self.model_type} layer {index}: experts module {type(experts).__name__} does not match the fused "
                f"layout moert supports: {'; '.join(problems)}"
            )

    # -- routing -----------------------------------------------------------------------------
    def router_scores(self, ref: MoELayerRef, hidden_states: torch.Tensor) -> torch.Tensor:
        """The router's probabilities over experts.

        Args:
            ref: the layer.
            hidden_states: (T, H) the post-attention normed rows the router sees.

        Returns:
            (T, E) fp32 probabilities (softmax of the router logits).
        """
        import torch

        logits = torch.nn.functional.linear(hidden_states.float(), ref.router.weight.float())  # [T, E]
        return logits.softmax(dim=-1)

    # -- checkpoints -------------------------------------------------------------------------
    def parse_expert_key(self, key: str) -> ExpertKey | None:
        """Parse a checkpoint key naming a routed-expert weight; None for every other key."""
        m = self._PER_EXPERT.match(key)
        if m is not None:
            part = self.expert_parts.get(m.group(3))
            if part is None:
                raise ValueError(f"unknown expert weight {m.group(3)!r} in checkpoint key {key!r}")
            return ExpertKey(int(m.group(1)), int(m.group(2)), part)
        m = self._FUSED.match(key)
        if m is not None:
            return ExpertKey(int(m.group(1)), None, "gate_up" if m.group(2) == "gate_up_proj" else "down")
        return None

    def rename_key(self, key: str) -> str:
        """Map a non-expert checkpoint key to the model's parameter name."""
        for pattern, repl in self.key_renames:
            key = re.sub(pattern, repl, key)
        return key

    def describe(self) -> dict[str, Any]:
        """A short summary for logs and reports."""
        return {
            "model_type": self.model_type,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "hidden_size": self.hidden_size,
            "moe_layers": [r.index for r in self.moe_layers()],
        }
