"""Architecture adapters: where the decoder layers, attention output projection and head geometry live.

Every stage that touches model internals (activation capture, head attribution,
ablation, weight folding) goes through an adapter found by
`config.architectures[0]`. An unknown architecture is a clear error listing the
supported ones, never a guess from the model path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from refusal_cliff.core.errors import UserError


@dataclass(frozen=True)
class HeadGeometry:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Names where one model family keeps the parts this toolkit needs.

    All the families below share the Llama layout
    (`model.model.layers[i].self_attn.o_proj`, `model.model.norm`), but each is
    listed explicitly so that a new family is a deliberate, tested addition.
    """

    name: str
    base_model_attr: str = "model"
    layers_attr: str = "layers"
    attention_attr: str = "self_attn"
    o_proj_attr: str = "o_proj"
    final_norm_attr: str = "norm"
    embed_attr: str = "embed_tokens"
    mlp_attr: str = "mlp"
    # the MLP's output projection (`down_proj` in every family here; `fc2` elsewhere): an MLP's
    # scaling folds into it (`components.fold_component_scaling`)
    mlp_down_attr: str = "down_proj"
    # Families that normalise a sub-layer's output before adding it to the residual stream
    # (Gemma 2/3) name those norms here; the exact logit decomposition freezes their scale.
    post_attention_norm_attr: str | None = None
    post_mlp_norm_attr: str | None = None
    # Gemma multiplies embeddings by sqrt(d_model) inside the model: the adapter records it
    # so that the exact logit decomposition can account for it.
    embedding_scale: Callable[[object], float] | None = None

    # -- module access -------------------------------------------------------------------
    def base_model(self, model: nn.Module) -> nn.Module:
        """The decoder without its LM head (e.g. `LlamaModel`)."""
        base = getattr(model, self.base_model_attr, None)
        if base is None:
            if hasattr(model, self.layers_attr):  # already the base model
                return model
            raise UserError(f"{self.name}: model has no '{self.base_model_attr}' submodule")
        return base

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.base_model(model), self.layers_attr)

    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        return getattr(self.layers(model)[layer], self.attention_attr)

    def o_proj(self, model: nn.Module, layer: int) -> nn.Linear:
        return getattr(self.attention(model, layer), self.o_proj_attr)

    def mlp(self, model: nn.Module, layer: int) -> nn.Module:
        return getattr(self.layers(model)[layer], self.mlp_attr)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return getattr(self.base_model(model), self.final_norm_attr)

    def embed_tokens(self, model: nn.Module) -> nn.Module:
        return getattr(self.base_model(model), self.embed_attr)

    def geometry(self, model_or_config) -> HeadGeometry:
        config = getattr(model_or_config, "config", model_or_config)
        config = getattr(config, "text_config", None) or config
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return HeadGeometry(
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            d_model=config.hidden_size,
        )

    def check(self, model: nn.Module) -> None:
        """Fail loudly if the named modules are not where the adapter says."""
        geometry = self.geometry(model)
        layers = self.layers(model)
        if len(layers) != geometry.n_layers:
            raise UserError(f"{self.name}: found {len(layers)} layers, config says {geometry.n_layers}")
        o_proj = self.o_proj(model, 0)
        expected = geometry.n_heads * geometry.head_dim
        if o_proj.in_features != expected:
            raise UserError(
                f"{self.name}: o_proj takes {o_proj.in_features} inputs, "
                f"expected n_heads*head_dim = {expected}"
            )


def _gemma_scale(config) -> float:
    config = getattr(config, "text_config", None) or config
    return float(config.hidden_size) ** 0.5


_REGISTRY: dict[str, ArchitectureAdapter] = {}


def register(adapter: ArchitectureAdapter) -> ArchitectureAdapter:
    _REGISTRY[adapter.name] = adapter
    return adapter


for _name in (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "Phi3ForCausalLM",
):
    register(ArchitectureAdapter(name=_name))
for _name in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
    register(
        ArchitectureAdapter(
            name=_name,
            embedding_scale=_gemma_scale,
            post_attention_norm_attr="post_attention_layernorm",
            post_mlp_norm_attr="post_feedforward_layernorm",
        )
    )


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model_or_config) -> ArchitectureAdapter:
    """The adapter for a model or config, keyed by `config.architectures[0]`."""
    config = getattr(model_or_config, "config", model_or_config)
    architectures = getattr(config, "architectures", None) or []
    name = architectures[0] if architectures else type(model_or_config).__name__
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(
            f"unsupported architecture {name!r}; supported: {', '.join(supported_architectures())}. "
            "Add an ArchitectureAdapter in refusal_cliff/architectures.py to support it."
        ) from None


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
